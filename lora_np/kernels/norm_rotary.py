"""RMSNorm and rotary position embedding (csrc/step_kernels.c): each op's NumPy reference, its C
call and its one dispatch point.

The dispatch points take any layout the autograd ops give them: the C core runs what it was
written for (RMSNorm over a last axis of length >= 1, rotary on a (B, H, T, D) x with a unit
stride along D and dense (T, D) tables) when the backend is "c", and the NumPy reference runs
everything else. The C calls (_*_c) check their stricter contract and name what is wrong.
"""
import numpy as np

from .backend import backend, c_int64s, call_c
from .checks import check_arrays, contiguous, same_shape


# ---- RMSNorm -------------------------------------------------------------------------------------


def rms_norm_forward(x, weight, eps):
    """(x / sqrt(mean(x², last axis) + eps)·weight, rstd of shape x.shape[:-1]); weight (n,) or None."""
    if backend() == "c" and x.shape[-1] > 0 and (weight is None or weight.flags.c_contiguous):
        return _rms_norm_forward_c(contiguous(x), weight, eps)   # one pass per row
    return _rms_norm_forward_numpy(x, weight, eps)


def rms_norm_backward(g, x, weight, rstd, need_x=True, need_weight=False):
    """(gx, gweight) of rms_norm_forward given g (shape of x), None where not needed."""
    if backend() == "c" and x.shape[-1] > 0 and (weight is None or weight.flags.c_contiguous):
        return _rms_norm_backward_c(contiguous(g), contiguous(x), weight, rstd, need_x, need_weight)
    return _rms_norm_backward_numpy(g, x, weight, rstd, need_x, need_weight)


def _rms_norm_forward_numpy(x, weight, eps):
    ms = np.einsum("...i,...i->...", x, x)[..., None] / x.shape[-1]  # (..., 1) mean of squares
    rstd = 1 / np.sqrt(ms + eps)                                     # (..., 1)
    out = x * rstd
    if weight is not None:
        out *= weight
    return out, rstd[..., 0]


def _rms_norm_backward_numpy(g, x, weight, rstd, need_x, need_weight):
    rstd = rstd[..., None]                                           # (..., 1)
    xhat = x * rstd                                                  # recomputed, not saved
    gw = (g * xhat).sum(tuple(range(g.ndim - 1))) if need_weight else None
    gx = None
    if need_x:
        gh = g * weight if weight is not None else g.copy()
        c = np.einsum("...i,...i->...", gh, xhat)[..., None] / g.shape[-1]
        xhat *= c
        gh -= xhat
        gh *= rstd
        gx = gh
    return gx, gw


# ---- rotary position embedding -------------------------------------------------------------------


def rotary(x, cos, sin, transpose=False):
    """x·cos + rotate_half(x)·sin (or its transpose, the gradient) into a new array laid out as x;
    x (..., D), cos and sin (..., rd) broadcastable to x's first rd dims, rd even and <= D, all of x's
    dtype. With rd < D (partial rotary: transformers' Phi-3 / GPT-NeoX `q_rot, q_pass = q[..., :rd],
    q[..., rd:]`) the first rd dims are rotated, rotate-half within them, and the others pass through."""
    if (backend() == "c" and x.ndim == 4 and cos.shape == sin.shape == (x.shape[2], cos.shape[-1])
            and cos.flags.c_contiguous and sin.flags.c_contiguous and (x.strides[-1] == x.itemsize or x.shape[-1] < 2)):
        return _rotary_c(x, cos, sin, transpose)                     # one pass, in x's layout
    return (_rotary_transpose_numpy if transpose else _rotary_numpy)(x, cos, sin)


def _rotary_numpy(x, cos, sin):
    """x·cos + rotate_half(x)·sin over the first rd = cos.shape[-1] dims, the rest copied, into a new
    array laid out in memory as x is.

    With x = cat(x₁, x₂, x_pass) along the last dim (x₁, x₂ of rd/2 dims), rotate_half acts on
    cat(x₁, x₂) as cat(−x₂, x₁), so y₁ = x₁·cos₁ − x₂·sin₁, y₂ = x₂·cos₂ + x₁·sin₂, y_pass = x_pass."""
    rd = cos.shape[-1]
    h = rd // 2
    out = np.empty_like(x)                           # x's memory layout: (B, T, H, D) under a transpose
    np.multiply(x[..., :rd], cos, out=out[..., :rd])
    t = np.multiply(x[..., h:rd], sin[..., :h])
    out[..., :h] -= t
    np.multiply(x[..., :h], sin[..., h:], out=t)
    out[..., h:rd] += t
    out[..., rd:] = x[..., rd:]
    return out


def _rotary_transpose_numpy(g, cos, sin):
    """The transpose of `_rotary_numpy`: gx₁ = g₁·cos₁ + g₂·sin₂, gx₂ = g₂·cos₂ − g₁·sin₁, gx_pass = g_pass."""
    rd = cos.shape[-1]
    h = rd // 2
    out = np.empty_like(g)
    np.multiply(g[..., :rd], cos, out=out[..., :rd])
    t = np.multiply(g[..., h:rd], sin[..., h:])
    out[..., :h] += t
    np.multiply(g[..., :h], sin[..., :h], out=t)
    out[..., h:rd] -= t
    out[..., rd:] = g[..., rd:]
    return out


# ---- the C calls ---------------------------------------------------------------------------------


def _strides3(a):
    """Strides in elements of a 4-D array's first three axes; it needs a unit stride along the last (of length
    >= 2: along one element any stride is unit)."""
    (s0, s1, s2, s3), size = a.strides, a.itemsize
    if (s3 != size and a.shape[-1] > 1) or s0 % size or s1 % size or s2 % size:
        raise ValueError(f"an array of shape {a.shape} needs a unit stride along its last axis, got {a.strides}")
    return c_int64s([s0 // size, s1 // size, s2 // size])


def _rms_rows(op, x, weight):
    """rows, n of x (..., n) for the RMSNorm kernels, after the type, dtype and shape checks."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{op}: x must be a numpy.ndarray, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x needs a last axis of length >= 1, got shape {x.shape}")
    n = x.shape[-1]
    if weight is not None and getattr(weight, "shape", None) != (n,):
        raise ValueError(f"{op}: weight shape {getattr(weight, 'shape', None)} does not match the input's last "
                         f"axis ({n},)")
    return x.size // n, n


def _rms_norm_forward_c(x, weight, eps):
    """(x / sqrt(mean(x², last axis) + eps)·weight, rstd of shape x.shape[:-1]) in the C core;
    x C-contiguous, weight (n,) or None."""
    rows, n = _rms_rows("rms_norm_forward", x, weight)
    check_arrays("rms_norm_forward", {}, {"x": x, "weight": weight})
    y, rstd = np.empty(x.shape, x.dtype), np.empty(x.shape[:-1], x.dtype)
    call_c("rms_norm_forward", y, rstd, x, weight, float(eps), rows, n)
    return y, rstd


def _rms_norm_backward_c(g, x, weight, rstd, need_x=True, need_weight=False):
    """(gx, gweight) of _rms_norm_forward_c given g (shape of x), None where not needed."""
    rows, n = _rms_rows("rms_norm_backward", x, weight)
    check_arrays("rms_norm_backward", {}, {"g": g, "x": x, "weight": weight, "rstd": rstd})
    same_shape("rms_norm_backward", g=g, x=x)
    if rstd.shape != x.shape[:-1]:
        raise ValueError(f"rms_norm_backward: rstd has shape {rstd.shape}, expected {x.shape[:-1]}")
    gx = np.empty(x.shape, x.dtype) if need_x else None
    gw = np.zeros(n, x.dtype) if need_weight else None
    if need_x or need_weight:
        call_c("rms_norm_backward", gx, gw, g, x, weight, rstd, rows, n)
    return gx, gw


def _rotary_c(x, cos, sin, transpose=False):
    """x·cos + rotate_half(x)·sin (or its transpose) over the first rd dims, the rest copied, in the C core,
    into a new array laid out as x; x (B, H, T, D) with a unit stride along D, cos and sin dense (T, rd),
    rd even and <= D, all of one float dtype."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"rotary: x must be a numpy.ndarray, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"rotary: x must be 4-D (B, H, T, D), got shape {x.shape}")
    B, H, T, D = x.shape
    check_arrays("rotary", {}, {"cos": cos, "sin": sin})
    if x.dtype != cos.dtype:
        raise TypeError(f"rotary: x has dtype {x.dtype}, cos and sin {cos.dtype}; they must be alike")
    rd = cos.shape[-1] if cos.ndim == 2 else -1
    for name, a in (("cos", cos), ("sin", sin)):
        if a.shape != (T, rd) or rd > D:
            raise ValueError(f"rotary: {name} has shape {a.shape}, expected {(T, D)} (or ({T}, rd), rd < {D}, the "
                             f"shape of cos and sin both) for x of shape {x.shape}")
    if rd % 2:
        raise ValueError(f"rotary: the rotated dims must be even, got cos and sin of shape {cos.shape} for x of "
                         f"shape {x.shape}")
    out = np.empty_like(x)
    call_c("rotary", out, x, cos, sin, int(bool(transpose)), B, H, T, D, rd, _strides3(x), _strides3(out))
    return out
