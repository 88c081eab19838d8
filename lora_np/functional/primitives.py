"""Differentiable primitives, named as `torch` / `torch.nn.functional`: elementwise ops, matmul
and linear, reductions, shape ops, indexing, embedding and dtype casts.

Each op is a `Function` with its forward and backward side by side, and a function that wraps its
arguments as Tensors of one float dtype (`_tensors`) and applies it. Temporaries are updated in
place where the op owns them; inputs and saved arrays are never written.
"""
import math

import numpy as np

from ..kernels.rows import sigmoid as _sigmoid  # 1 / (1 + exp(-x)) in one new array
from ..tensor import _FLOAT_DTYPES, Function, Tensor, _check_float_dtypes, _to_array


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
    first = xs[0].data.dtype if isinstance(xs[0], Tensor) else None
    if first is not None and first in _FLOAT_DTYPES:  # the common call: Tensors of one float dtype, as they are
        for x in xs[1:]:
            if not isinstance(x, Tensor) or x.data.dtype != first:
                break
        else:
            return list(xs)
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
    if len(shapes) == 2 and shapes[0] == shapes[1]:  # the common case, without NumPy's call
        return tuple(shapes[0])
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
        axes = [d % x.ndim for d in dims]
        if sorted(axes) != list(range(x.ndim)):
            raise ValueError(f"permute: dims {tuple(dims)} are not a permutation for shape {x.shape}")
        self.inv = tuple(sorted(range(x.ndim), key=axes.__getitem__))  # the inverse permutation
        return x.transpose(dims)

    def backward(self, g):
        return g.transpose(self.inv)


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
    def forward(self, ids, weight, padding_idx=None):
        self.ids, self.wshape, self.padding_idx = ids, weight.shape, padding_idx
        return weight[ids]                                               # (*ids.shape, dim)

    def backward(self, g):
        gw = np.zeros(self.wshape, g.dtype)
        np.add.at(gw, self.ids.reshape(-1), g.reshape(-1, self.wshape[1]))  # scatter-add
        if self.padding_idx is not None:
            gw[self.padding_idx] = 0  # torch: the padding row takes no gradient
        return None, gw


def check_padding_idx(padding_idx, num_embeddings, name="embedding: padding_idx"):
    """torch's padding_idx: None, or a row index in [-num_embeddings, num_embeddings), returned as its row
    (a negative one counts from the end); ValueError naming it (as `name`) otherwise."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, bool) or not isinstance(padding_idx, (int, np.integer)) or \
            not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"{name} {padding_idx!r} is not a row of the {num_embeddings}-row embedding (it must "
                         f"lie in [-{num_embeddings}, {num_embeddings}))")
    return int(padding_idx) % num_embeddings


def embedding(input, weight, padding_idx=None):
    """weight[input] as torch.nn.functional.embedding: with padding_idx, the rows it reads at that index get
    no gradient (the forward is the plain lookup)."""
    ids = input.data if isinstance(input, Tensor) else np.asarray(input)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"embedding: indices must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= weight.shape[0]):
        raise IndexError(f"embedding: index out of range [0, {weight.shape[0]}): min {ids.min()}, max {ids.max()}")
    return Embedding.apply(Tensor(ids), weight, padding_idx=check_padding_idx(padding_idx, weight.shape[0]))
