"""Differentiable ops, named and ordered as `torch` / `torch.nn.functional`.

Each op is a `Function` with its forward and backward side by side. Composite ops
that would otherwise build many graph nodes and big temporaries (softmax,
log_softmax, cross_entropy, layer_norm, rms_norm, attention, rotary embedding,
linear, and `silu_mul`, the SwiGLU gate) have their backward written directly.

Memory: an op saves for backward only what the gradients it must compute use
(`needs_input_grad`): a linear layer with a frozen weight keeps no input, a norm keeps
its input and one scalar per row (not the normalised copy), attention keeps no
probabilities (they are recomputed block by block). Temporaries are updated in place
where the op owns them; inputs and saved arrays are never written.
"""
import math

import numpy as np

from . import kernels
from .tensor import Function, Tensor, _check_float_dtypes, _to_array

__all__ = [
    "add", "sub", "mul", "div", "neg", "pow", "matmul", "exp", "log", "sqrt", "tanh",
    "sigmoid", "relu", "silu", "silu_mul", "gelu", "sum", "mean", "max", "reshape", "transpose",
    "permute", "unsqueeze", "squeeze", "getitem", "cat", "split", "stack", "where",
    "masked_fill", "embedding", "softmax", "log_softmax", "cross_entropy", "causal_lm_loss",
    "causal_lm_head_loss", "LinearCrossEntropy", "layer_norm", "rms_norm", "dropout", "linear",
    "rotary_embedding", "rotate_half", "rope_cos_sin", "scaled_dot_product_attention", "cast", "manual_seed",
    "default_generator",
]


# -- helpers ---------------------------------------------------------------------------
def _unbroadcast(grad, shape):
    """Sum `grad` over the axes along which an input of `shape` was broadcast."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


def _tensors(op, *xs):
    """Wrap scalars/arrays as Tensors of the common float dtype; raise on mixed floats."""
    arrays = [x.data if isinstance(x, Tensor) else None for x in xs]
    dtype = _check_float_dtypes(op, [a for a in arrays if a is not None])
    for x in xs:
        if isinstance(x, np.ndarray) and x.dtype.kind == "f":
            dtype = _check_float_dtypes(op, ([np.empty(0, dtype)] if dtype else []) + [x])
    out = []
    for x in xs:
        if isinstance(x, Tensor):
            if dtype is not None and x.data.dtype.kind in "biu":
                x = Tensor(x.data.astype(dtype))
            out.append(x)
        else:
            out.append(Tensor(_to_array(x, dtype if dtype is not None else None)))
    return out


def _check_float(op, x):
    if x.data.dtype.kind != "f":
        raise TypeError(f"{op}: expected a float32/float64 tensor, got dtype {x.data.dtype}")


def _axes(dim, ndim):
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, int):
        dim = (dim,)
    return tuple(d % ndim for d in dim)


def _broadcast_shapes(op, *shapes):
    try:
        return np.broadcast_shapes(*shapes)
    except ValueError:
        raise ValueError(f"{op}: shapes {' and '.join(str(tuple(s)) for s in shapes)} do not broadcast") from None


# -- elementwise binary ------------------------------------------------------------------
class Add(Function):
    def forward(self, a, b):
        _broadcast_shapes("add", a.shape, b.shape)
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        sa, sb = self.shapes
        return (_unbroadcast(g, sa) if self.needs_input_grad[0] else None,
                _unbroadcast(g, sb) if self.needs_input_grad[1] else None)


class Sub(Function):
    def forward(self, a, b):
        _broadcast_shapes("sub", a.shape, b.shape)
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        sa, sb = self.shapes
        return (_unbroadcast(g, sa) if self.needs_input_grad[0] else None,
                _unbroadcast(-g, sb) if self.needs_input_grad[1] else None)


class Mul(Function):
    def forward(self, a, b):
        _broadcast_shapes("mul", a.shape, b.shape)
        self.shapes = a.shape, b.shape
        self.a = a if self.needs_input_grad[1] else None
        self.b = b if self.needs_input_grad[0] else None
        return a * b

    def backward(self, g):
        sa, sb = self.shapes
        return (_unbroadcast(g * self.b, sa) if self.needs_input_grad[0] else None,
                _unbroadcast(g * self.a, sb) if self.needs_input_grad[1] else None)


class Div(Function):
    def forward(self, a, b):
        _broadcast_shapes("div", a.shape, b.shape)
        self.shapes, self.b = (a.shape, b.shape), b
        self.a = a if self.needs_input_grad[1] else None
        return a / b

    def backward(self, g):
        (sa, sb), a, b = self.shapes, self.a, self.b
        ga = _unbroadcast(g / b, sa) if self.needs_input_grad[0] else None
        gb = _unbroadcast(-g * a / (b * b), sb) if self.needs_input_grad[1] else None
        return ga, gb


class Pow(Function):
    def forward(self, a, b):
        _broadcast_shapes("pow", a.shape, b.shape)
        self.a, self.b = a, b
        self.out = np.power(a, b)
        return self.out

    def backward(self, g):
        a, b, out = self.a, self.b, self.out
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = _unbroadcast(g * b * np.power(a, b - 1), a.shape)
        if self.needs_input_grad[1]:
            with np.errstate(divide="ignore", invalid="ignore"):
                gb = _unbroadcast(g * out * np.where(a > 0, np.log(np.where(a > 0, a, 1)), 0), b.shape)
        return ga, gb


def add(input, other):
    return Add.apply(*_tensors("add", input, other))


def sub(input, other):
    return Sub.apply(*_tensors("sub", input, other))


def mul(input, other):
    return Mul.apply(*_tensors("mul", input, other))


def div(input, other):
    return Div.apply(*_tensors("div", input, other))


def pow(input, exponent):
    return Pow.apply(*_tensors("pow", input, exponent))


def neg(input):
    return mul(input, -1.0)


# -- matmul ----------------------------------------------------------------------------
class MatMul(Function):
    """a @ b for a (..., n, k) and b (..., k, m), batch dims broadcast."""

    def forward(self, a, b):
        if a.shape[-1] != b.shape[-2]:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} are not aligned")
        _broadcast_shapes("matmul", a.shape[:-2], b.shape[:-2])
        self.shapes = a.shape, b.shape
        self.a = a if self.needs_input_grad[1] else None
        self.b = b if self.needs_input_grad[0] else None
        return a @ b

    def backward(self, g):
        (sa, sb), a, b = self.shapes, self.a, self.b
        ga = _unbroadcast(g @ np.swapaxes(b, -1, -2), sa) if self.needs_input_grad[0] else None
        gb = _unbroadcast(np.swapaxes(a, -1, -2) @ g, sb) if self.needs_input_grad[1] else None
        return ga, gb


def matmul(input, other):
    a, b = _tensors("matmul", input, other)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: both arguments need at least 1 dimension, got {a.shape} and {b.shape}")
    if a.ndim == 1 and b.ndim == 1:
        return reshape(MatMul.apply(reshape(a, (1, -1)), reshape(b, (-1, 1))), ())
    if a.ndim == 1:
        out = MatMul.apply(reshape(a, (1, -1)), b)
        return reshape(out, out.shape[:-2] + out.shape[-1:])
    if b.ndim == 1:
        out = MatMul.apply(a, reshape(b, (-1, 1)))
        return reshape(out, out.shape[:-1])
    return MatMul.apply(a, b)


class Linear(Function):
    """y = x Wᵀ + b; x (..., in), W (out, in), b (out,). One GEMM over all leading dims."""

    def forward(self, x, weight, bias=None):
        if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"linear: input shape {x.shape} does not match weight shape {weight.shape}")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"linear: bias shape {bias.shape} does not match weight shape {weight.shape}")
        need_x, need_w = self.needs_input_grad[:2]
        self.xshape, self.has_bias = x.shape, bias is not None
        self.x = x if need_w else None           # only the weight gradient needs the input
        self.weight = weight if need_x else None  # only the input gradient needs the weight
        x2 = x.reshape(-1, x.shape[-1])                                  # (N, in)
        y = x2 @ weight.T                                                # (N, out)
        if bias is not None:
            y += bias
        return y.reshape(x.shape[:-1] + (weight.shape[0],))

    def backward(self, g):
        g2 = g.reshape(-1, g.shape[-1])                                  # (N, out)
        gx = (g2 @ self.weight).reshape(self.xshape) if self.needs_input_grad[0] else None
        gw = g2.T @ self.x.reshape(-1, self.x.shape[-1]) if self.needs_input_grad[1] else None
        gb = g2.sum(0) if self.has_bias and self.needs_input_grad[2] else None
        return gx, gw, gb


def linear(input, weight, bias=None):
    args = _tensors("linear", input, weight, *([] if bias is None else [bias]))
    _check_float("linear", args[0])
    return Linear.apply(*args)


# -- elementwise unary ------------------------------------------------------------------
class Exp(Function):
    def forward(self, x):
        self.out = np.exp(x)
        return self.out

    def backward(self, g):
        return g * self.out


class Log(Function):
    def forward(self, x):
        self.x = x
        return np.log(x)

    def backward(self, g):
        return g / self.x


class Sqrt(Function):
    def forward(self, x):
        self.out = np.sqrt(x)
        return self.out

    def backward(self, g):
        return g / (2 * self.out)


class Tanh(Function):
    def forward(self, x):
        self.out = np.tanh(x)
        return self.out

    def backward(self, g):
        return g * (1 - self.out * self.out)


_sigmoid = kernels._sigmoid_numpy  # 1 / (1 + exp(-x)) in one new array


class Sigmoid(Function):
    def forward(self, x):
        self.out = _sigmoid(x)
        return self.out

    def backward(self, g):
        return g * self.out * (1 - self.out)


class Relu(Function):
    def forward(self, x):
        self.mask = x > 0
        return np.where(self.mask, x, 0).astype(x.dtype, copy=False)

    def backward(self, g):
        return g * self.mask


def _silu_grad(x, s):
    """d silu / dx = s·(1 + x·(1 − s)) with s = sigmoid(x), in a new array."""
    t = np.subtract(1, s, out=np.empty(s.shape, s.dtype))
    t *= x
    t += 1
    t *= s
    return t


class Silu(Function):
    """x·sigmoid(x); saves only x and recomputes the sigmoid in backward."""

    def forward(self, x):
        self.x = x
        s = _sigmoid(x)
        s *= x
        return s

    def backward(self, g):
        d = _silu_grad(self.x, _sigmoid(self.x))
        d *= g
        return d


class SiluMul(Function):
    """silu(a)·b in one op (the SwiGLU gate): saves a and b only, no silu(a) array; forward and
    backward are one pass each in the C core (kernels.silu_mul_forward / _backward)."""

    def forward(self, a, b):
        if a.shape != b.shape:
            raise ValueError(f"silu_mul: shapes {a.shape} and {b.shape} differ")
        a, b = kernels.contiguous(a), kernels.contiguous(b)
        self.a = a
        self.b = b if self.needs_input_grad[0] else None  # only a's gradient needs b
        return kernels.silu_mul_forward(a, b)

    def backward(self, g):
        return kernels.silu_mul_backward(kernels.contiguous(g), self.a, self.b, *self.needs_input_grad[:2])


def _erf(x):
    """erf elementwise to double precision (math.erf; NumPy has no erf). ~0.3 µs per element."""
    flat = np.fromiter(map(math.erf, x.ravel().tolist()), np.float64, count=x.size)
    return flat.reshape(x.shape).astype(x.dtype, copy=False)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class Gelu(Function):
    """GELU: exact 0.5·x·(1 + erf(x/√2)), or the tanh approximation (GPT-2's gelu_new)."""

    def forward(self, x, approximate="none"):
        self.x, self.approximate = x, approximate
        if approximate == "tanh":
            self.t = np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
            return 0.5 * x * (1 + self.t)
        self.cdf = 0.5 * (1 + _erf(x / x.dtype.type(math.sqrt(2.0))))
        return x * self.cdf

    def backward(self, g):
        x = self.x
        if self.approximate == "tanh":
            t = self.t
            dt = (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
            return g * (0.5 * (1 + t) + 0.5 * x * dt)
        pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return g * (self.cdf + x * pdf)


def _unary(fn_cls, name):
    def op(input):
        (x,) = _tensors(name, input)
        _check_float(name, x)
        return fn_cls.apply(x)

    op.__name__ = name
    return op


exp = _unary(Exp, "exp")
log = _unary(Log, "log")
sqrt = _unary(Sqrt, "sqrt")
tanh = _unary(Tanh, "tanh")
sigmoid = _unary(Sigmoid, "sigmoid")
relu = _unary(Relu, "relu")
silu = _unary(Silu, "silu")


def silu_mul(input, other):
    """silu(input) * other as one op: the gate of a SwiGLU MLP, `silu(gate_proj(x)) * up_proj(x)`."""
    a, b = _tensors("silu_mul", input, other)
    _check_float("silu_mul", a)
    return SiluMul.apply(a, b)


def gelu(input, approximate="none"):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    (x,) = _tensors("gelu", input)
    _check_float("gelu", x)
    return Gelu.apply(x, approximate=approximate)


class Cast(Function):
    def forward(self, x, dtype):
        self.src = x.dtype
        return x.astype(dtype)

    def backward(self, g):
        return g.astype(self.src)


def cast(input, dtype):
    """Differentiable dtype conversion (`tensor.to(dtype)`)."""
    dtype = np.dtype(dtype)
    if input.dtype == dtype:
        return input
    return Cast.apply(input, dtype=dtype)


# -- reductions ------------------------------------------------------------------------
class Sum(Function):
    def forward(self, x, dim=None, keepdim=False):
        self.shape, self.axes, self.keepdim = x.shape, _axes(dim, x.ndim), keepdim
        return np.asarray(x.sum(axis=self.axes, keepdims=keepdim))

    def backward(self, g):
        if not self.keepdim:
            g = np.expand_dims(g, self.axes)
        return np.broadcast_to(g, self.shape).copy()


class Mean(Function):
    def forward(self, x, dim=None, keepdim=False):
        self.shape, self.axes, self.keepdim = x.shape, _axes(dim, x.ndim), keepdim
        self.count = int(np.prod([x.shape[a] for a in self.axes]))
        return np.asarray(x.mean(axis=self.axes, keepdims=keepdim))

    def backward(self, g):
        if not self.keepdim:
            g = np.expand_dims(g, self.axes)
        return np.broadcast_to(g / self.count, self.shape).copy()


class Max(Function):
    """Max over axes; the gradient is shared equally among tied maxima (torch.amax)."""

    def forward(self, x, dim=None, keepdim=False):
        self.axes, self.keepdim = _axes(dim, x.ndim), keepdim
        out = x.max(axis=self.axes, keepdims=True)
        self.mask = x == out
        return out if keepdim else np.squeeze(out, self.axes)

    def backward(self, g):
        if not self.keepdim:
            g = np.expand_dims(g, self.axes)
        mask = self.mask
        return mask * (g / mask.sum(axis=self.axes, keepdims=True))


def sum(input, dim=None, keepdim=False):
    (x,) = _tensors("sum", input)
    return Sum.apply(x, dim=dim, keepdim=keepdim)


def mean(input, dim=None, keepdim=False):
    (x,) = _tensors("mean", input)
    _check_float("mean", x)
    return Mean.apply(x, dim=dim, keepdim=keepdim)


def max(input, dim=None, keepdim=False):
    (x,) = _tensors("max", input)
    return Max.apply(x, dim=dim, keepdim=keepdim)


# -- shape ops -------------------------------------------------------------------------
class Reshape(Function):
    def forward(self, x, shape):
        self.shape = x.shape
        try:
            return x.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape shape {x.shape} into {tuple(shape)}") from None

    def backward(self, g):
        return g.reshape(self.shape)


class Permute(Function):
    def forward(self, x, dims):
        if sorted(d % x.ndim for d in dims) != list(range(x.ndim)):
            raise ValueError(f"permute: dims {tuple(dims)} are not a permutation for shape {x.shape}")
        self.inv = tuple(np.argsort([d % x.ndim for d in dims]))
        return np.transpose(x, dims)

    def backward(self, g):
        return np.transpose(g, self.inv)


def reshape(input, shape):
    (x,) = _tensors("reshape", input)
    return Reshape.apply(x, shape=tuple(shape))


def permute(input, dims):
    (x,) = _tensors("permute", input)
    return Permute.apply(x, dims=tuple(dims))


def transpose(input, dim0, dim1):
    dims = list(range(input.ndim))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return permute(input, dims)


def unsqueeze(input, dim):
    shape = list(input.shape)
    dim = dim % (len(shape) + 1)
    shape.insert(dim, 1)
    return reshape(input, shape)


def squeeze(input, dim=None):
    shape = input.shape
    if dim is None:
        new = [n for n in shape if n != 1]
    else:
        d = dim % len(shape)
        new = [n for i, n in enumerate(shape) if not (i == d and n == 1)]
    return reshape(input, new)


def _index_array(index):
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(_index_array(i) for i in index)
    if isinstance(index, list):
        return np.asarray(index)
    return index


def _is_basic_index(index):
    """True for ints, slices, None and Ellipsis only: such an index selects each element at most once."""
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, np.integer, slice)) for i in items)


class GetItem(Function):
    def forward(self, x, index):
        self.shape, self.index = x.shape, index
        return x[index]

    def backward(self, g):
        out = np.zeros(self.shape, dtype=g.dtype)
        if _is_basic_index(self.index):
            out[self.index] = g
        else:
            np.add.at(out, self.index, g)  # repeated advanced indices accumulate
        return out


def getitem(input, index):
    (x,) = _tensors("getitem", input)
    out = GetItem.apply(x, index=_index_array(index))
    return out


class Cat(Function):
    def forward(self, *xs, dim=0):
        ndim = xs[0].ndim
        self.dim = dim % ndim
        for x in xs[1:]:
            if x.ndim != ndim or any(a != b for i, (a, b) in enumerate(zip(x.shape, xs[0].shape)) if i != self.dim):
                raise ValueError(f"cat: shapes {xs[0].shape} and {x.shape} differ outside dim {dim}")
        self.sizes = [x.shape[self.dim] for x in xs]
        return np.concatenate(xs, axis=self.dim)

    def backward(self, g):
        parts = np.split(g, np.cumsum(self.sizes)[:-1], axis=self.dim)
        return tuple(p if need else None for p, need in zip(parts, self.needs_input_grad))


def cat(tensors, dim=0):
    xs = _tensors("cat", *tensors)
    return Cat.apply(*xs, dim=dim)


def stack(tensors, dim=0):
    xs = _tensors("stack", *tensors)
    shape = xs[0].shape
    for x in xs[1:]:
        if x.shape != shape:
            raise ValueError(f"stack: shapes {shape} and {x.shape} differ")
    return cat([unsqueeze(x, dim) for x in xs], dim=dim)


def split(tensor, split_size_or_sections, dim=0):
    """torch.split: chunks of a given size, or a list of section sizes."""
    n = tensor.shape[dim]
    if isinstance(split_size_or_sections, int):
        sizes = [split_size_or_sections] * (n // split_size_or_sections)
        if n % split_size_or_sections:
            sizes.append(n % split_size_or_sections)
    else:
        sizes = list(split_size_or_sections)
        if np.sum(sizes) != n:
            raise ValueError(f"split: sections {sizes} do not add up to size {n} of dim {dim}")
    out, start = [], 0
    for s in sizes:
        index = [slice(None)] * tensor.ndim
        index[dim] = slice(start, start + s)
        out.append(getitem(tensor, tuple(index)))
        start += s
    return tuple(out)


class Where(Function):
    def forward(self, cond, a, b):
        _broadcast_shapes("where", cond.shape, a.shape, b.shape)
        self.cond, self.sa, self.sb = cond, a.shape, b.shape
        return np.where(cond, a, b)

    def backward(self, g):
        zero = np.zeros((), g.dtype)
        ga = _unbroadcast(np.where(self.cond, g, zero), self.sa) if self.needs_input_grad[1] else None
        gb = _unbroadcast(np.where(self.cond, zero, g), self.sb) if self.needs_input_grad[2] else None
        return None, ga, gb


def where(condition, input, other):
    cond = condition.data if isinstance(condition, Tensor) else np.asarray(condition)
    if cond.dtype != np.bool_:
        raise TypeError(f"where: condition must be bool, got dtype {cond.dtype}")
    a, b = _tensors("where", input, other)
    return Where.apply(Tensor(cond), a, b)


def masked_fill(input, mask, value):
    """Fill where `mask` is True with `value` (mask broadcasts to input)."""
    (x,) = _tensors("masked_fill", input)
    return where(mask, Tensor(np.asarray(value, dtype=x.dtype)), x)


# -- embedding -------------------------------------------------------------------------
class Embedding(Function):
    def forward(self, ids, weight):
        self.ids, self.wshape = ids, weight.shape
        return weight[ids]                                               # (*ids.shape, dim)

    def backward(self, g):
        gw = np.zeros(self.wshape, g.dtype)
        np.add.at(gw, self.ids.reshape(-1), g.reshape(-1, self.wshape[1]))  # scatter-add
        return None, gw


def embedding(input, weight):
    ids = input.data if isinstance(input, Tensor) else np.asarray(input)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: indices must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= weight.shape[0]):
        raise IndexError(f"embedding: index out of range [0, {weight.shape[0]}): min {ids.min()}, max {ids.max()}")
    return Embedding.apply(Tensor(ids), weight)


# -- softmax family --------------------------------------------------------------------
def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _log_softmax(x, axis):
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


class Softmax(Function):
    def forward(self, x, dim):
        self.dim = dim
        self.out = _softmax(x, dim)
        return self.out

    def backward(self, g):
        p = self.out
        return p * (g - (g * p).sum(axis=self.dim, keepdims=True))


class LogSoftmax(Function):
    def forward(self, x, dim):
        self.dim = dim
        self.out = _log_softmax(x, dim)
        return self.out

    def backward(self, g):
        return g - np.exp(self.out) * g.sum(axis=self.dim, keepdims=True)


def softmax(input, dim=-1):
    (x,) = _tensors("softmax", input)
    _check_float("softmax", x)
    return Softmax.apply(x, dim=dim)


def log_softmax(input, dim=-1):
    (x,) = _tensors("log_softmax", input)
    _check_float("log_softmax", x)
    return LogSoftmax.apply(x, dim=dim)


class CrossEntropy(Function):
    """Fused log_softmax + NLL over logits (N, C) and targets (N,)."""

    def forward(self, logits, target, ignore_index=-100, reduction="mean"):
        n, c = logits.shape
        valid = target != ignore_index
        safe = np.where(valid, target, 0)
        if valid.any() and (safe[valid].min() < 0 or safe[valid].max() >= c):
            raise IndexError(f"cross_entropy: target out of range [0, {c}) (ignore_index={ignore_index})")
        m = logits.max(1, keepdims=True)
        lse = m + np.log(np.exp(logits - m).sum(1, keepdims=True))      # (N, 1) log-sum-exp
        nll = (lse[:, 0] - logits[np.arange(n), safe]) * valid          # (N,)
        self.count = int(valid.sum())
        if self.needs_input_grad[0]:  # logits and lse give the probabilities again; no (N, C) copy kept
            self.logits, self.lse, self.safe, self.valid, self.reduction = logits, lse, safe, valid, reduction
        if reduction == "none":
            return nll.astype(logits.dtype)
        if reduction == "sum":
            return np.asarray(nll.sum(), logits.dtype)
        return np.asarray(nll.sum() / self.count if self.count else np.nan, logits.dtype)

    def backward(self, g):
        n = self.logits.shape[0]
        if self.reduction == "none":
            w = g * self.valid                                           # (N,)
        elif self.reduction == "sum":
            w = np.broadcast_to(g, (n,)) * self.valid
        else:
            w = np.broadcast_to(g / self.count, (n,)) * self.valid
        grad = self.logits - self.lse
        np.exp(grad, out=grad)                                           # softmax (N, C)
        grad[np.arange(n), self.safe] -= 1
        grad *= w[:, None].astype(grad.dtype)
        return grad, None


def cross_entropy(input, target, ignore_index=-100, reduction="mean"):
    """torch.nn.functional.cross_entropy for logits (N, C) or (N, C, d...) and integer targets."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    (x,) = _tensors("cross_entropy", input)
    _check_float("cross_entropy", x)
    t = target.data if isinstance(target, Tensor) else np.asarray(target)
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must be integer class indices, got dtype {t.dtype}")
    if x.ndim > 2:  # (N, C, d...) -> (N·d..., C)
        c = x.shape[1]
        x = reshape(permute(x, (0,) + tuple(range(2, x.ndim)) + (1,)), (-1, c))
        out_shape = t.shape
        t = t.reshape(-1)
    else:
        out_shape = t.shape
    if x.ndim != 2 or t.shape != (x.shape[0],):
        raise ValueError(f"cross_entropy: input shape {input.shape} does not match target shape {out_shape}")
    out = CrossEntropy.apply(x, Tensor(t), ignore_index=ignore_index, reduction=reduction)
    return reshape(out, out_shape) if reduction == "none" else out


# -- causal-LM losses (the chunked LM head: logits never held whole) ---------------------
def causal_lm_loss(logits, labels, ignore_index=-100):
    """Mean next-token cross-entropy as transformers computes it: predict labels[:, 1:]
    from logits[:, :-1]; positions labelled -100 are ignored. logits (B, T, V), labels (B, T)."""
    labels = np.asarray(labels.data if isinstance(labels, Tensor) else labels)
    B, T, V = logits.shape
    shift_logits = reshape(logits[:, :-1], (B * (T - 1), V))                   # (B·(T-1), V)
    return cross_entropy(shift_logits, labels[:, 1:].reshape(-1).astype(np.int64), ignore_index=ignore_index)


class LinearCrossEntropy(Function):
    """mean over rows with a target of cross_entropy(h Wᵀ, target), never holding all the
    logits: rows go through the head in chunks. When a gradient is wanted, forward computes it
    too, chunk by chunk, while softmax − one-hot is at hand, and backward only scales it: two
    head matmuls per step instead of three, and what is kept is the gradient (N, C) (plus (V, C)
    when the head trains) instead of the rows of h. Rows whose target is ignore_index cost
    nothing. h (N, C), weight (V, C), target (N,)."""

    def forward(self, h, weight, target, ignore_index=-100, chunk=512):
        rows = np.nonzero(target != ignore_index)[0]
        hr, t, count = h[rows], target[rows].astype(np.int64), len(rows)                 # (M, C), (M,)
        if t.size and (t.min() < 0 or t.max() >= weight.shape[0]):
            raise IndexError(f"cross_entropy: target out of range [0, {weight.shape[0]})")
        need_h, need_w = self.needs_input_grad[:2]
        self.gh = np.zeros((h.shape[0], weight.shape[1]), h.dtype) if need_h else None
        self.gw = np.zeros_like(weight) if need_w else None
        inv = 1.0 / count if count else 0.0
        total = 0.0
        for s in range(0, count, chunk):
            hc, tc = hr[s:s + chunk], t[s:s + chunk]
            logits = hc @ weight.T                                                       # (c, V)
            picked = logits[np.arange(len(tc)), tc]                                      # a copy
            lse = kernels.softmax_rows(logits, scale=inv)                                # logits -> softmax / M
            total += float((lse - picked).sum())
            if need_h or need_w:
                logits[np.arange(len(tc)), tc] -= h.dtype.type(inv)                      # d loss / d logits
                if need_h:
                    self.gh[rows[s:s + chunk]] = logits @ weight                         # (c, C)
                if need_w:
                    self.gw += logits.T @ hc                                             # (V, C)
        return np.asarray(total / count if count else np.nan, h.dtype)

    def backward(self, g):
        scale = self.gh.dtype.type(g) if self.gh is not None else self.gw.dtype.type(g)
        if scale != 1:
            for a in (self.gh, self.gw):
                if a is not None:
                    a *= scale
        return self.gh, self.gw, None


def causal_lm_head_loss(h, weight, labels, ignore_index=-100):
    """causal_lm_loss(h Wᵀ, labels) without the (B, T, V) logits: h (B, T, C), weight (V, C)."""
    labels = np.asarray(labels.data if isinstance(labels, Tensor) else labels)
    B, T, C = h.shape
    target = np.concatenate([labels[:, 1:], np.full((B, 1), ignore_index, labels.dtype)], 1)  # (B, T)
    return LinearCrossEntropy.apply(reshape(h, (B * T, C)), weight, Tensor(target.reshape(-1)),
                                    ignore_index=ignore_index)


# -- normalisation ---------------------------------------------------------------------
class LayerNormFn(Function):
    """Normalise over the last dim: (x - mean) / sqrt(var + eps) · weight + bias."""

    def forward(self, x, weight=None, bias=None, eps=1e-5):
        mu = x.mean(-1, keepdims=True)                                   # (..., 1)
        xhat = x - mu
        var = np.einsum("...i,...i->...", xhat, xhat)[..., None] / xhat.shape[-1]
        rstd = 1 / np.sqrt(var + eps)                                    # (..., 1)
        xhat *= rstd
        self.x, self.mu, self.rstd = x, mu, rstd  # xhat is recomputed in backward
        self.weight, self.has_bias = weight, bias is not None
        if weight is not None:
            xhat *= weight
        if bias is not None:
            xhat += bias
        return xhat

    def backward(self, g):
        rstd, w = self.rstd, self.weight
        xhat = self.x - self.mu
        xhat *= rstd
        lead = tuple(range(g.ndim - 1))
        gw = (g * xhat).sum(lead) if w is not None and self.needs_input_grad[1] else None
        gb = g.sum(lead) if self.has_bias and self.needs_input_grad[2] else None
        gx = None
        if self.needs_input_grad[0]:
            gh = g * w if w is not None else g.copy()
            c = np.einsum("...i,...i->...", gh, xhat)[..., None] / g.shape[-1]
            gh -= gh.mean(-1, keepdims=True)
            xhat *= c
            gh -= xhat
            gh *= rstd
            gx = gh
        return gx, gw, gb


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(input.shape[-len(normalized_shape):]) != normalized_shape:
        raise ValueError(f"layer_norm: input shape {input.shape} does not end in {normalized_shape}")
    args = _tensors("layer_norm", input, *(t for t in (weight, bias) if t is not None))
    x = args[0]
    _check_float("layer_norm", x)
    k = int(np.prod(normalized_shape))
    lead = x.shape[:-len(normalized_shape)]
    x = reshape(x, lead + (k,))
    w = reshape(args[1], (k,)) if weight is not None else None
    b = reshape(args[-1], (k,)) if bias is not None else None
    out = LayerNormFn.apply(x, w, b, eps=eps)
    return reshape(out, input.shape)


class RMSNormFn(Function):
    """x / sqrt(mean(x²) + eps) · weight over the last dim (transformers' LlamaRMSNorm)."""

    def forward(self, x, weight=None, eps=1e-6):
        self.fused = kernels.in_c() and x.shape[-1] > 0 and (weight is None or weight.flags.c_contiguous)
        if self.fused:  # one pass per row in the C core
            x = kernels.contiguous(x)
            out, self.rstd = kernels.rms_norm_forward(x, weight, eps)
            self.x, self.weight = x, weight
            return out
        ms = np.einsum("...i,...i->...", x, x)[..., None] / x.shape[-1]  # (..., 1) mean of squares
        rstd = 1 / np.sqrt(ms + eps)                                     # (..., 1)
        self.x, self.rstd, self.weight = x, rstd, weight  # xhat is recomputed in backward
        out = x * rstd
        if weight is not None:
            out *= weight
        return out

    def backward(self, g):
        w, rstd = self.weight, self.rstd
        if self.fused:
            need_w = w is not None and self.needs_input_grad[1]
            return kernels.rms_norm_backward(kernels.contiguous(g), self.x, w, rstd, self.needs_input_grad[0], need_w)
        xhat = self.x * rstd
        gw = (g * xhat).sum(tuple(range(g.ndim - 1))) if w is not None and self.needs_input_grad[1] else None
        gx = None
        if self.needs_input_grad[0]:
            gh = g * w if w is not None else g.copy()
            c = np.einsum("...i,...i->...", gh, xhat)[..., None] / g.shape[-1]
            xhat *= c
            gh -= xhat
            gh *= rstd
            gx = gh
        return gx, gw


def rms_norm(input, normalized_shape, weight=None, eps=None):
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(normalized_shape) != 1 or input.shape[-1] != normalized_shape[0]:
        raise ValueError(f"rms_norm: input shape {input.shape} does not end in {normalized_shape}")
    args = _tensors("rms_norm", input, *([weight] if weight is not None else []))
    _check_float("rms_norm", args[0])
    if weight is not None and args[1].shape != normalized_shape:
        raise ValueError(f"rms_norm: weight shape {args[1].shape} is not normalized_shape {normalized_shape}")
    if eps is None:
        eps = float(np.finfo(args[0].dtype).eps)
    return RMSNormFn.apply(*args, eps=eps)


# -- dropout ---------------------------------------------------------------------------
_default_generator = [None]  # np.random.default_rng(0) on first use: numpy.random costs ~20 ms to import


def manual_seed(seed):
    """Seed the generator that dropout uses when no generator is given."""
    _default_generator[0] = np.random.default_rng(seed)
    return _default_generator[0]


def default_generator():
    if _default_generator[0] is None:
        _default_generator[0] = np.random.default_rng(0)
    return _default_generator[0]


class DropoutFn(Function):
    """Keep where U >= p for U uniform float32 from the generator (so float32 and float64 get the
    same mask from the same seed), scale kept elements by 1/(1-p). Saves the bool mask only."""

    def forward(self, x, p, generator):
        self.keep = generator.random(x.shape, dtype=np.float32) >= p
        self.scale = x.dtype.type(1 / (1 - p))
        out = x * self.keep
        out *= self.scale
        return out

    def backward(self, g):
        out = g * self.keep
        out *= self.scale
        return out


def dropout(input, p=0.5, training=True, generator=None):
    """Zero elements with probability p and scale the rest by 1/(1-p); identity in eval."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return input
    (x,) = _tensors("dropout", input)
    _check_float("dropout", x)
    return DropoutFn.apply(x, p=p, generator=generator or default_generator())


# -- rotary position embedding ---------------------------------------------------------
def rope_cos_sin(positions, head_dim, base=10000.0, dtype=np.float32):
    """cos, sin tables (T, head_dim), rotate-half layout: angles computed in float64, then cast.

    (transformers computes these angles in float32 even for a float64 model; lora_np's
    float64 mode keeps them exact.)"""
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))   # (D/2,)
    freqs = np.outer(np.asarray(positions, np.float64), inv_freq)                         # (T, D/2)
    emb = np.concatenate([freqs, freqs], axis=-1)                                          # (T, D)
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)


def _rotary(x, cos, sin):
    """x·cos + rotate_half(x)·sin into a new array laid out in memory as x is.

    With x = cat(x₁, x₂) along the last dim, rotate_half(x) = cat(−x₂, x₁), so
    y₁ = x₁·cos₁ − x₂·sin₁ and y₂ = x₂·cos₂ + x₁·sin₂."""
    h = x.shape[-1] // 2
    out = np.multiply(x, cos, out=np.empty_like(x))  # x's memory layout: (B, T, H, D) under a transpose
    t = np.multiply(x[..., h:], sin[..., :h])
    out[..., :h] -= t
    np.multiply(x[..., :h], sin[..., h:], out=t)
    out[..., h:] += t
    return out


def _rotary_transpose(g, cos, sin):
    """The transpose of `_rotary`: gx₁ = g₁·cos₁ + g₂·sin₂, gx₂ = g₂·cos₂ − g₁·sin₁."""
    h = g.shape[-1] // 2
    out = np.multiply(g, cos, out=np.empty_like(g))
    t = np.multiply(g[..., h:], sin[..., h:])
    out[..., :h] += t
    np.multiply(g[..., :h], sin[..., :h], out=t)
    out[..., h:] -= t
    return out


class Rotary(Function):
    """x·cos + rotate_half(x)·sin; x (B, H, T, D), cos/sin (T, D) or broadcastable."""

    def forward(self, x, cos, sin):
        if x.shape[-1] % 2 or np.broadcast_shapes(x.shape, cos.shape) != x.shape:
            raise ValueError(f"rotary_embedding: x shape {x.shape} needs an even last dim and cos/sin "
                             f"shape {cos.shape} broadcastable to it")
        self.cos, self.sin = cos, sin
        self.fused = (kernels.in_c() and x.ndim == 4 and cos.shape == sin.shape == x.shape[2:]
                      and cos.flags.c_contiguous and sin.flags.c_contiguous)
        if self.fused and x.strides[-1] == x.itemsize:
            return kernels.rotary(x, cos, sin)                           # one pass, in x's layout
        return _rotary(x, cos, sin)

    def backward(self, g):
        if self.fused and g.strides[-1] == g.itemsize:
            return kernels.rotary(g, self.cos, self.sin, transpose=True), None, None
        return _rotary_transpose(g, self.cos, self.sin), None, None


def rotary_embedding(x, cos, sin):
    """Apply rotary position embedding, rotate-half convention of transformers' Llama."""
    (x,) = _tensors("rotary_embedding", x)
    _check_float("rotary_embedding", x)
    cos = Tensor(_to_array(cos, x.dtype))
    sin = Tensor(_to_array(sin, x.dtype))
    return Rotary.apply(x, cos, sin)


def rotate_half(x):
    h = x.shape[-1] // 2
    return cat([neg(x[..., h:]), x[..., :h]], dim=-1)


# -- attention -------------------------------------------------------------------------
_ATTN_BLOCK = 64  # query positions per block: bounds the scores' memory, and causal blocks skip hidden keys


class SDPA(Function):
    """softmax(q kᵀ · scale + bias) v with grouped-query heads, the way flash attention keeps memory.

    q (B, Hq, T, D), k and v (B, Hkv, S, D), Hq = Hkv·g. The g query heads that share a
    key/value head are stacked as rows, (B, Hkv, T·g, D) position-major, so K and V are
    never repeated. Scores are built for one block of query positions at a time (all batch
    elements and heads together); a causal block only sees its first n = t1 + S − T keys, so
    the hidden upper triangle is (mostly) never computed, and inside the block the causal
    limit of each row is applied by the row softmax (kernels.softmax_rows), not by a mask
    array. Nothing of size T × S is kept: forward saves the scaled q, k, v, the output and
    each row's log-sum-exp, and backward recomputes the probabilities block by block
    (kernels.exp_rows). A row whose keys are all masked gives 0 (torch's safe softmax), not NaN.

    The output is laid out in memory as (B, T, Hq, D), so the caller's transpose to
    (B, T, Hq·D) is free, and the query gradient is returned in the query's own layout.

    With the C backend and no attn_mask, forward and backward run whole in the C core instead
    (kernels.attention_forward / _backward: the same blocks, register-tiled products, one
    (batch, key/value head) per thread, no NumPy calls per block); the NumPy blocks below are
    the reference and the path for masks.
    """

    def forward(self, q, k, v, bias, is_causal=False, scale=None):
        B, Hq, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        g = Hq // Hkv
        dt = q.dtype
        self.scale = dt.type(scale if scale is not None else 1.0 / math.sqrt(D))
        self.bias = bias
        self.blocks = []  # (t0, t1, keys computed, visible keys of the block's first row)
        for t0 in range(0, T, _ATTN_BLOCK):
            t1 = min(t0 + _ATTN_BLOCK, T)
            n = min(S, t1 + S - T) if is_causal else S
            if n > 0:  # else every key is hidden from the block: output 0
                self.blocks.append((t0, t1, n, t0 + 1 + S - T if is_causal else S))
        k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)           # strided batched GEMMs are slower
        self.fused = bias is None and kernels.in_c() and q.strides[-1] == q.itemsize
        if self.fused:  # the whole op in the C core, one (batch, key/value head) per task
            out, lse = kernels.attention_forward(q, k, v, self.scale, is_causal)
            if any(self.needs_input_grad[:3]):
                self.q, self.k, self.v, self.out, self.lse, self.causal = q, k, v, out, lse, is_causal
            return out.transpose(0, 2, 3, 1, 4).reshape(B, Hq, T, D)      # a view
        qs = np.multiply(q.reshape(B, Hkv, g, T, D).transpose(0, 1, 3, 2, 4), self.scale,
                         out=np.empty((B, Hkv, T, g, D), dt))             # (B, Hkv, T, g, D) scaled
        out = np.zeros((B, T, Hkv, g, D), dt)                             # = (B, T, Hq·D) in memory
        lse = np.full((B, Hkv, T, g), np.inf, dt)                         # log-sum-exp per row
        for t0, t1, n, count0 in self.blocks:
            p = self._scores(qs, k, t0, t1, n)                            # (B·Hkv, tc·g, n)
            lse[:, :, t0:t1] = kernels.softmax_rows(p, count0=count0, group=g, period=p.shape[1]).reshape(
                B, Hkv, t1 - t0, g)
            o = p @ v[:, :, :n].reshape(B * Hkv, n, D)                    # (B·Hkv, tc·g, D)
            out[:, t0:t1] = o.reshape(B, Hkv, t1 - t0, g, D).transpose(0, 2, 1, 3, 4)
        if any(self.needs_input_grad[:3]):
            self.qs, self.k, self.v, self.out, self.lse = qs, k, v, out, lse
        return out.transpose(0, 2, 3, 1, 4).reshape(B, Hq, T, D)          # a view

    def _scores(self, qs, k, t0, t1, n):
        """Scaled scores plus the bias for query positions [t0, t1), keys [0, n): (B·Hkv, tc·g, n)."""
        B, Hkv, _, g, D = qs.shape
        tc = t1 - t0
        s = qs[:, :, t0:t1].reshape(B * Hkv, tc * g, D) @ np.swapaxes(k[:, :, :n].reshape(B * Hkv, n, D), -1, -2)
        if self.bias is not None:  # bias (B or 1, Hkv or 1, g or 1, T, S)
            s.reshape(B, Hkv, tc, g, n)[...] += self.bias[:, :, :, t0:t1, :n].transpose(0, 1, 3, 2, 4)
        return s

    def backward(self, g_out):
        need_q, need_k, need_v = self.needs_input_grad[:3]
        if self.fused:
            if g_out.strides[-1] != g_out.itemsize:
                g_out = np.ascontiguousarray(g_out)
            gq, gk, gv = kernels.attention_backward(g_out, self.q, self.k, self.v, self.out, self.lse, self.scale,
                                                    self.causal, need_q, need_k, need_v)
            return gq, gk, gv, None
        qs, k, v, out, lse, scale = self.qs, self.k, self.v, self.out, self.lse, self.scale
        B, Hkv, T, g, D = qs.shape
        go = g_out.reshape(B, Hkv, g, T, D).transpose(0, 1, 3, 2, 4)     # (B, Hkv, T, g, D), qs' layout
        delta = np.einsum("bhtgd,bthgd->bhtg", go, out)                   # (B, Hkv, T, g) = rowsum(dP·P)
        gq = np.zeros((B, T, Hkv, g, D), qs.dtype) if need_q else None
        gk = np.zeros_like(k) if need_k else None
        gv = np.zeros_like(v) if need_v else None
        for t0, t1, n, count0 in self.blocks:
            tc = t1 - t0
            p = self._scores(qs, k, t0, t1, n)                            # (B·Hkv, tc·g, n)
            kernels.exp_rows(p, np.ascontiguousarray(lse[:, :, t0:t1]).reshape(B * Hkv, tc * g),
                             count0=count0, group=g, period=tc * g)       # probabilities
            gor = go[:, :, t0:t1].reshape(B * Hkv, tc * g, D)             # a copy
            if need_v:
                gv[:, :, :n] += (np.swapaxes(p, -1, -2) @ gor).reshape(B, Hkv, n, D)
            if need_q or need_k:
                ds = gor @ np.swapaxes(v[:, :, :n].reshape(B * Hkv, n, D), -1, -2)   # (B·Hkv, tc·g, n) = dP
                ds -= delta[:, :, t0:t1].reshape(B * Hkv, tc * g, 1)
                ds *= p                                                   # dS / scale
                if need_q:
                    gqr = ds @ k[:, :, :n].reshape(B * Hkv, n, D)         # (B·Hkv, tc·g, D)
                    gqr *= scale
                    gq[:, t0:t1] = gqr.reshape(B, Hkv, tc, g, D).transpose(0, 2, 1, 3, 4)
                if need_k:
                    gk[:, :, :n] += (np.swapaxes(ds, -1, -2) @ qs[:, :, t0:t1].reshape(B * Hkv, tc * g, D)).reshape(
                        B, Hkv, n, D)
        gq = gq.transpose(0, 2, 3, 1, 4).reshape(g_out.shape) if need_q else None
        return gq, gk, gv, None


def _attention_bias(mask, B, Hq, Hkv, T, S, dtype):
    """The additive bias (B or 1, Hkv or 1, g or 1, T, S) of a bool (True = attend) or float mask."""
    m = mask.data if isinstance(mask, Tensor) else np.asarray(mask)
    try:
        m = np.broadcast_to(m, np.broadcast_shapes(m.shape, (1, 1, T, S)))
    except ValueError:
        raise ValueError(f"scaled_dot_product_attention: attn_mask shape {m.shape} does not broadcast "
                         f"to {(B, Hq, T, S)}") from None
    if m.ndim != 4 or m.shape[0] not in (1, B) or m.shape[1] not in (1, Hq):
        raise ValueError(f"scaled_dot_product_attention: attn_mask shape {m.shape} does not broadcast "
                         f"to {(B, Hq, T, S)}")
    if m.dtype == np.bool_:
        m = np.where(m, dtype.type(0), dtype.type(-np.inf))
    elif m.dtype.kind == "f":
        _check_float_dtypes("scaled_dot_product_attention", [np.empty(0, dtype), m])
    else:
        raise TypeError(f"scaled_dot_product_attention: attn_mask must be bool or float, got dtype {m.dtype}")
    return np.ascontiguousarray(m).reshape(
        (m.shape[0], 1, 1, T, S) if m.shape[1] == 1 else (m.shape[0], Hkv, Hq // Hkv, T, S))


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """torch's scaled_dot_product_attention. `attn_mask`: bool (True = attend) or additive float,
    broadcastable to (B, Hq, T, S). Key/value heads may be fewer than query heads
    (grouped-query attention; always allowed). `is_causal` aligns the causal mask to the
    bottom right (query t sees keys up to t + S - T), the same as torch when T == S."""
    if dropout_p:
        raise NotImplementedError("scaled_dot_product_attention: attention dropout is not supported")
    q, k, v = _tensors("scaled_dot_product_attention", query, key, value)
    _check_float("scaled_dot_product_attention", q)
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"scaled_dot_product_attention: query {q.shape}, key {k.shape}, value {v.shape} "
                         "must be (B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D)")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"scaled_dot_product_attention: {q.shape[1]} query heads are not a multiple of "
                         f"{k.shape[1]} key/value heads")
    B, Hq, T, _ = q.shape
    bias = None if attn_mask is None else _attention_bias(attn_mask, B, Hq, k.shape[1], T, k.shape[2], q.dtype)
    return SDPA.apply(q, k, v, bias, is_causal=is_causal, scale=scale)
