"""Tensor and reverse-mode autograd.

A `Tensor` wraps an ndarray. Every differentiable op is a `Function` subclass with
`forward` (ndarrays in, ndarray out) and `backward` (gradient of the output in,
gradients of the inputs out) side by side; what backward needs is saved on the op.
`needs_input_grad` lets an op skip the gradient of an input nobody asked for (a
frozen weight costs no weight-gradient matmul). `Tensor.backward` walks the graph
in an iterative topological order, accumulates into the leaves' `.grad` with `+=`,
and frees the graph as it goes.

Dtype rule: float32 is the default; float64 is fully supported. Floating tensors of
different dtypes are never mixed silently: an op that gets float32 and float64
raises TypeError naming the op. Python scalars take the tensor's dtype; integer and
bool arrays (masks, ids) are cast to the float operand's dtype.
"""
import numpy as np

__all__ = ["Tensor", "Function", "no_grad", "enable_grad", "is_grad_enabled", "tensor"]

DEFAULT_DTYPE = np.float32
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_grad_enabled = [True]


def is_grad_enabled():
    return _grad_enabled[0]


class _GradMode:
    """Context manager and decorator that sets whether ops record a graph."""

    _mode = True

    def __enter__(self):
        self._prev = _grad_enabled[0]
        _grad_enabled[0] = self._mode

    def __exit__(self, *exc):
        _grad_enabled[0] = self._prev
        return False

    def __call__(self, fn):
        mode_cls = type(self)

        def wrapper(*args, **kwargs):
            with mode_cls():
                return fn(*args, **kwargs)

        wrapper.__name__ = getattr(fn, "__name__", "wrapper")
        wrapper.__doc__ = getattr(fn, "__doc__", None)
        return wrapper


class no_grad(_GradMode):
    """Ops inside build no graph: `with lora_np.no_grad(): ...`."""

    _mode = False


class enable_grad(_GradMode):
    _mode = True


def _check_float_dtypes(op, arrays):
    """The common float dtype of `arrays`; raise TypeError if two float dtypes meet."""
    dtype = None
    for a in arrays:
        if a.dtype.kind == "f":
            if a.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{op}: unsupported dtype {a.dtype} (use float32 or float64)")
            if dtype is None:
                dtype = a.dtype
            elif a.dtype != dtype:
                raise TypeError(
                    f"{op}: dtype mismatch {dtype} vs {a.dtype}; convert explicitly with .to(...)"
                )
    return dtype


class Function:
    """One differentiable op. Subclasses define `forward(*arrays, **kw)` and `backward(grad)`.

    `backward` returns one gradient per positional input (None where not needed);
    each must have the shape of its input. `forward` saves on `self` only what
    `backward` needs for the inputs flagged in `needs_input_grad` (a frozen weight's
    op keeps no activation alive for it).

    The graph holds no input Tensor: `next_nodes` has, per input, the node its
    gradient flows to (the input's own Function, or the input itself when it is a
    leaf that requires grad, else None), so an intermediate array stays alive only
    while some op has saved it.
    """

    def __init__(self, *parents):
        needs = tuple(isinstance(p, Tensor) and p._requires_grad for p in parents) if _grad_enabled[0] \
            else (False,) * len(parents)
        self.needs_input_grad = needs
        if True in needs:  # else no gradient flows through this op: it is not part of any graph
            self.next_nodes = tuple((p._ctx if p._ctx is not None else p) if need else None
                                    for p, need in zip(parents, needs))
            self.input_shapes = tuple(p.data.shape if need else None for p, need in zip(parents, needs))

    @classmethod
    def apply(cls, *args, **kwargs):
        ctx = cls(*args)
        out = ctx.forward(*[a.data if isinstance(a, Tensor) else a for a in args], **kwargs)
        if True in ctx.needs_input_grad:
            result = Tensor(out, requires_grad=True)
            result._ctx = ctx
            return result
        if type(out) is not np.ndarray:
            return Tensor(out)
        result = Tensor.__new__(Tensor)  # no graph: the output as it is, without __init__'s conversions
        result.data, result.grad, result._ctx, result._requires_grad = out, None, None, False
        return result

    def forward(self, *arrays, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, grad):  # pragma: no cover - abstract
        raise NotImplementedError

    def _release(self):
        """Drop everything forward saved; the node can no longer backpropagate."""
        self.__dict__.clear()
        self.next_nodes = None


def _to_array(data, dtype=None):
    if isinstance(data, Tensor):
        data = data.data
    if isinstance(data, np.generic):  # a NumPy scalar (what ops on 0-d arrays return) keeps its dtype
        data = np.asarray(data)
    if isinstance(data, np.ndarray):
        if dtype is not None and data.dtype != np.dtype(dtype):
            return data.astype(dtype)
        return data
    arr = np.asarray(data)
    if dtype is not None:
        return arr.astype(dtype, copy=False)
    if arr.dtype.kind == "f" or arr.dtype == np.dtype(object):
        return arr.astype(DEFAULT_DTYPE)
    return arr


class Tensor:
    """An ndarray with an optional gradient. `requires_grad` only for float32/float64."""

    __slots__ = ("data", "grad", "_requires_grad", "_ctx", "__weakref__")
    __array_priority__ = 100  # ndarray (op) Tensor defers to Tensor's reflected operator

    def __init__(self, data, requires_grad=False, dtype=None):
        self.data = _to_array(data, dtype)
        self.grad = None
        self._ctx = None
        self._requires_grad = False
        self.requires_grad = requires_grad

    # -- autograd state -------------------------------------------------------------
    @property
    def requires_grad(self):
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value):
        if value and self.data.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"only float32/float64 tensors can require grad, not dtype {self.data.dtype}"
            )
        self._requires_grad = bool(value)

    def requires_grad_(self, requires_grad=True):
        self.requires_grad = requires_grad
        return self

    @property
    def is_leaf(self):
        return self._ctx is None

    def detach(self):
        return Tensor(self.data)

    def numpy(self):
        return self.data

    def item(self):
        return self.data.item()

    def backward(self, grad=None):
        """Accumulate d(self)/d(leaf) into every leaf's `.grad`, then free the graph."""
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a scalar output, got shape {self.shape}"
                )
            grad = np.ones_like(self.data)
        else:
            grad = _to_array(grad, self.data.dtype)
            if grad.shape != self.data.shape:
                raise ValueError(f"backward(): gradient shape {grad.shape} != tensor shape {self.shape}")

        root = self._ctx if self._ctx is not None else self
        order = []  # nodes (Functions and leaf Tensors) in post-order
        visited = set()
        stack = [(root, False)]
        while stack:  # iterative post-order DFS: deep graphs never hit the recursion limit
            node, done = stack.pop()
            if done:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            if isinstance(node, Function):
                if node.next_nodes is None:
                    raise RuntimeError("backward() through a graph that was already freed by an earlier "
                                       "backward(); recompute the forward")
                for nxt in node.next_nodes:
                    if nxt is not None and id(nxt) not in visited:
                        stack.append((nxt, False))

        grads = {id(root): grad}
        for node in reversed(order):
            g = grads.pop(id(node), None)
            if isinstance(node, Tensor):  # a leaf: accumulate
                if g is not None:
                    if node.grad is None:
                        node.grad = np.array(g, dtype=node.data.dtype, copy=True)
                    else:
                        node.grad += g
                continue
            if g is None:
                node._release()
                continue
            in_grads = node.backward(g)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            nexts, shapes = node.next_nodes, node.input_shapes
            node._release()  # free the graph as we go
            del g
            for nxt, shape, pg in zip(nexts, shapes, in_grads):
                if nxt is None or pg is None:
                    continue
                pg = np.asarray(pg)  # ops on 0-d arrays give NumPy scalars
                if pg.shape != shape:
                    raise RuntimeError(f"{type(node).__name__}.backward: gradient shape {pg.shape} != "
                                       f"input shape {shape}")
                key = id(nxt)
                grads[key] = pg if key not in grads else grads[key] + pg
        self._ctx = None

    def zero_grad(self):
        self.grad = None

    # -- array-like attributes ---------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    def dim(self):
        return self.data.ndim

    def size(self, dim=None):
        return self.data.shape if dim is None else self.data.shape[dim]

    def numel(self):
        return self.data.size

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        rg = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{rg})"

    def __array__(self, dtype=None, copy=None):
        return self.data if dtype is None else self.data.astype(dtype)

    def to(self, dtype):
        return _ops.cast(self, dtype)

    def float(self):
        return self.to(np.float32)

    def double(self):
        return self.to(np.float64)

    # comparisons give bool tensors without a graph
    def __lt__(self, other):
        return Tensor(self.data < _to_array(other))

    def __le__(self, other):
        return Tensor(self.data <= _to_array(other))

    def __gt__(self, other):
        return Tensor(self.data > _to_array(other))

    def __ge__(self, other):
        return Tensor(self.data >= _to_array(other))

    __hash__ = object.__hash__

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _ops.reshape(self, shape)

    view = reshape

    @property
    def T(self):
        return _ops.permute(self, tuple(reversed(range(self.ndim))))


# -- operators and torch-style methods: the ops of lora_np.functional ------------------------------
# lora_np.functional imports this module, so this module does not import it back: functional
# calls attach_ops(itself) once when it loads, and the methods below look the ops up there.
_ops = None

_OPERATORS = {  # Tensor method: (op, whether the operands are swapped)
    "__add__": ("add", False), "__radd__": ("add", True), "__sub__": ("sub", False), "__rsub__": ("sub", True),
    "__mul__": ("mul", False), "__rmul__": ("mul", True), "__truediv__": ("div", False),
    "__rtruediv__": ("div", True), "__pow__": ("pow", False), "__rpow__": ("pow", True),
    "__matmul__": ("matmul", False), "__rmatmul__": ("matmul", True), "__neg__": ("neg", False),
    "__getitem__": ("getitem", False),
}
_METHODS = ("exp", "log", "sqrt", "tanh", "sigmoid", "relu", "sum", "mean", "max", "pow", "matmul", "transpose",
            "permute", "softmax", "log_softmax", "split", "masked_fill", "unsqueeze", "squeeze")


def _method(name, swapped=False):
    """The Tensor method that calls op `name` with the tensor first (or, swapped, second)."""
    if swapped:
        def method(self, other):
            return getattr(_ops, name)(other, self)
    else:
        def method(self, *args, **kwargs):
            return getattr(_ops, name)(self, *args, **kwargs)
    method.__name__ = name
    return method


def attach_ops(functional):
    """Give Tensor its operators and torch-style methods, calling the ops of `functional`."""
    global _ops
    _ops = functional
    for attr, (name, swapped) in _OPERATORS.items():
        setattr(Tensor, attr, _method(name, swapped))
    for name in _METHODS:
        setattr(Tensor, name, _method(name))


def tensor(data, requires_grad=False, dtype=None):
    """Make a Tensor, as `torch.tensor`."""
    return Tensor(np.array(_to_array(data, dtype), copy=True), requires_grad=requires_grad)
