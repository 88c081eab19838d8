"""The SwiGLU gate silu(a)·b and the row softmaxes of attention and of the LM head's cross-entropy
(csrc/step_kernels.c): each op's NumPy reference, its C call and its one dispatch point.

float32 C uses a vector exp within 2 ulp of NumPy's (which runs at ~3 ns an element on AVX2 machines).
"""
import numpy as np

from .backend import backend, call_c
from .checks import check_arrays, same_shape


def sigmoid(x):
    """1 / (1 + exp(-x)) in one new array; exp(-x) overflowing to inf gives exactly 0."""
    s = np.negative(x, out=np.empty(x.shape, x.dtype))
    with np.errstate(over="ignore"):
        np.exp(s, out=s)
    s += 1
    return np.reciprocal(s, out=s)


def silu_mul_forward(a, b):
    """silu(a)·b = a·sigmoid(a)·b in a new array (the SwiGLU gate)."""
    check_arrays("silu_mul_forward", {}, {"a": a, "b": b})
    same_shape("silu_mul_forward", a=a, b=b)
    out = np.empty(a.shape, a.dtype)
    if backend() == "c":
        call_c("silu_mul_forward", out, a, b, a.size)
        return out
    s = sigmoid(a)
    s *= a
    s *= b
    return s


def silu_mul_backward(g, a, b, need_a=True, need_b=True):
    """Gradients of silu(a)·b given g: (g·b·s·(1 + a·(1 − s)) or None, g·a·s or None), s = sigmoid(a).
    b is only read for the first (and may be None when need_a is False)."""
    if need_a and b is None:
        raise TypeError("silu_mul_backward: b is required for the gradient of a (need_a=True), got None")
    check_arrays("silu_mul_backward", {}, {"g": g, "a": a, "b": b if need_a else None})
    same_shape("silu_mul_backward", g=g, a=a, b=b if need_a else None)
    ga = np.empty(a.shape, a.dtype) if need_a else None
    gb = np.empty(a.shape, a.dtype) if need_b else None
    if not (need_a or need_b):
        return None, None
    if backend() == "c":
        call_c("silu_mul_backward", ga, gb, g, a, b if need_a else None, a.size)
        return ga, gb
    s = sigmoid(a)
    if need_a:
        np.subtract(1, s, out=ga)
        ga *= a
        ga += 1
        ga *= s
        ga *= b
        ga *= g
    if need_b:
        np.multiply(s, a, out=gb)
        gb *= g
    return ga, gb


def _visible(rows, n, period, count0, group):
    """vis [rows]: how many leading columns each row sees (see csrc/step_kernels.c)."""
    return np.clip(count0 + (np.arange(rows) % period) // group, 0, n)


def _rows_args(op, p, count0, group, period):
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{op}: p must be a numpy.ndarray, got {type(p).__name__}")
    if p.ndim < 1:
        raise ValueError(f"{op}: p must have at least one dimension, got shape {p.shape}")
    n = p.shape[-1]
    rows = p.size // n if n else int(np.prod(p.shape[:-1]))
    count0 = n if count0 is None else int(count0)
    period = max(rows, 1) if period is None else int(period)
    group = int(group)
    if period < 1 or group < 1:
        raise ValueError(f"{op}: period ({period}) and group ({group}) must be >= 1")
    return rows, n, period, count0, group


def softmax_rows(p, scale=1.0, count0=None, group=1, period=None):
    """In place over the last axis of p: scale·softmax of each row's visible columns, 0 on the
    others; returns the log-sum-exp of each row's visible columns (shape p.shape[:-1]; +inf and a
    row of 0 when every visible column is -inf; NaN and NaN visible columns when one is NaN or +inf). Row i sees the first
    clip(count0 + (i % period) // group, 0, n) columns; by default all n."""
    rows, n, period, count0, group = _rows_args("softmax_rows", p, count0, group, period)
    dtype, _ = check_arrays("softmax_rows", {"p": p}, {})
    lse = np.empty(p.shape[:-1], dtype)
    if backend() == "c":
        call_c("softmax_rows", p, lse, float(scale), rows, n, period, count0, group)
        return lse
    p2, lse2 = p.reshape(rows, n), lse.reshape(rows)
    hidden = np.arange(n) >= _visible(rows, n, period, count0, group)[:, None]      # (rows, n)
    p2[hidden] = -np.inf
    m = p2.max(-1, keepdims=True, initial=-np.inf)                                  # NaN stays NaN
    m[m == -np.inf] = 0  # no finite column: exp(-inf) = 0 everywhere
    with np.errstate(invalid="ignore"):
        p2 -= m
        np.exp(p2, out=p2)
        total = p2.sum(-1, keepdims=True)
        total[total == 0] = np.inf
        p2 *= dtype.type(scale) / total
    p2[hidden] = 0
    np.log(total, out=total)
    total += m
    lse2[:] = total[:, 0]
    return lse


def exp_rows(p, lse, count0=None, group=1, period=None):
    """In place over the last axis of p: exp(p − lse) on each row's visible columns, 0 on the others
    and on rows whose lse is +inf (the probabilities again, from softmax_rows' log-sum-exp)."""
    rows, n, period, count0, group = _rows_args("exp_rows", p, count0, group, period)
    if lse.shape != p.shape[:-1]:
        raise ValueError(f"exp_rows: lse has shape {lse.shape}, expected {p.shape[:-1]}")
    check_arrays("exp_rows", {"p": p}, {"lse": lse})
    if backend() == "c":
        call_c("exp_rows", p, lse, rows, n, period, count0, group)
        return
    p2, lse2 = p.reshape(rows, n), lse.reshape(rows)
    with np.errstate(invalid="ignore"):
        p2 -= lse2[:, None]
    p2[(np.arange(n) >= _visible(rows, n, period, count0, group)[:, None]) | (lse2[:, None] == np.inf)] = -np.inf
    np.exp(p2, out=p2)
