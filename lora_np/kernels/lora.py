"""The LoRA low-rank branch: forward, backward and merge, on three backends.

    y = x Wᵀ + b + scaling · (x lora_Aᵀ) lora_Bᵀ       lora_A: [r, in]   lora_B: [out, r]

Only the low-rank part lives here (the frozen x Wᵀ + b is the caller's):

- ``lora_forward(y, x, lora_A, lora_B, scaling) -> t``: ``y += scaling·(x Aᵀ) Bᵀ`` in place,
  returns ``t = x Aᵀ`` ([N, r]), which backward needs.
- ``lora_backward(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, scaling)``: accumulates
  ``d_lora_A += s·(dy B)ᵀ x``, ``d_lora_B += s·dyᵀ t``, ``dx += s·(dy B) A``; a None output is
  skipped entirely.
- ``lora_merge(weight, lora_A, lora_B, scaling, fan_in_fan_out=False)``: ``weight += s·B A``
  in place (``weight += s·(B A)ᵀ`` for a GPT-2 Conv1D weight stored [in, out]); unmerge is the
  same call with ``-scaling``.

On the "cuda" backend host arrays are uploaded, computed on and downloaded; passing
``cuda.DeviceArray`` arguments runs an op on the GPU whatever the backend, and then its results
stay on the device. The C core uses AVX2 + FMA where the CPU has them and its baseline SIMD
build elsewhere (``LORA_NP_SIMD=baseline`` forces the latter).
"""
import numpy as np

from lora_np import _cuda as cuda

from .backend import backend, c_function, c_status, call_c, ffi
from .checks import CTYPES, c_fast, check_array, check_arrays, scalar


def _lora_dims(op, x, lora_A, lora_B):
    """(N, in, out, r) from x [N, in], lora_A [r, in], lora_B [out, r]."""
    for name, a in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        check_array(op, name, a, device=True, matrix=True)
    (N, n_in), r, out = x.shape, lora_A.shape[0], lora_B.shape[0]
    return N, n_in, out, r


# ---- the C backend's fast path (checks.c_fast) -------------------------------------------------------


def _fast_forward(y, x, lora_A, lora_B, scaling):
    fast = c_fast("lora_forward", (y,), (x, lora_A, lora_B)) if y is not None else None
    if fast is None:
        return None
    sx, sa, sb = x.shape, lora_A.shape, lora_B.shape
    if len(sx) != 2 or len(sa) != 2 or sa[1] != sx[1] or len(sb) != 2 or sb[1] != sa[0] or y.shape != (sx[0], sb[0]):
        return None
    (N, n_in), r, out = sx, sa[0], sb[0]
    fn, (py, px, pa, pb) = fast
    t = np.empty((N, r), dtype=x.dtype)
    c_status("lora_forward", fn(py, ffi.from_buffer(CTYPES[x.dtype], t), px, pa, pb, scaling, N, n_in, out, r))
    return t


def _fast_backward(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, scaling):
    if dx is None and d_lora_A is None and d_lora_B is None:
        return False
    fast = c_fast("lora_backward", (dx, d_lora_A, d_lora_B), (dy, x, t, lora_A, lora_B))
    if fast is None:
        return False
    sx, sa, sb = x.shape, lora_A.shape, lora_B.shape
    if len(sx) != 2 or len(sa) != 2 or sa[1] != sx[1] or len(sb) != 2 or sb[1] != sa[0]:
        return False
    (N, n_in), r, out = sx, sa[0], sb[0]
    if (dy.shape != (N, out) or t.shape != (N, r) or (dx is not None and dx.shape != sx)
            or (d_lora_A is not None and d_lora_A.shape != sa) or (d_lora_B is not None and d_lora_B.shape != sb)):
        return False
    fn, pointers = fast
    c_status("lora_backward", fn(*pointers, scaling, N, n_in, out, r))
    return True


def _fast_merge(weight, lora_A, lora_B, scaling, fan_in_fan_out):
    """c_fast's checks written out for the merge, whose weight may be small (merging a model's
    layers one after another, each weight cold): every step counts there."""
    ctype = CTYPES.get(weight.dtype) if type(weight) is np.ndarray else None
    if (ctype is None or type(lora_A) is not np.ndarray or type(lora_B) is not np.ndarray
            or lora_A.dtype is not weight.dtype or lora_B.dtype is not weight.dtype):
        return False
    sa, sb = lora_A.shape, lora_B.shape
    if len(sa) != 2 or len(sb) != 2 or sb[1] != sa[0] or weight.shape != ((sa[1], sb[0]) if fan_in_fan_out
                                                                            else (sb[0], sa[1])):
        return False
    try:
        pw = ffi.from_buffer(ctype, weight, require_writable=True)
        pa, pb = ffi.from_buffer(ctype, lora_A), ffi.from_buffer(ctype, lora_B)
    except ValueError:
        return False
    n = len(pw)
    if not (n and len(pa) and len(pb)) or (pa < pw + n and pw < pa + len(pa)) or (pb < pw + n and pw < pb + len(pb)):
        return False
    merge = c_function("lora_merge", weight.dtype)
    c_status("lora_merge", merge(pw, pa, pb, scaling, 1 if fan_in_fan_out else 0, sa[1], sb[0], sa[0]))
    return True


# ---- the three ops -------------------------------------------------------------------------


def lora_forward(y, x, lora_A, lora_B, scaling):
    """y [N, out] += scaling · (x [N, in] @ lora_Aᵀ) @ lora_Bᵀ in place; returns t = x @ lora_Aᵀ [N, r]."""
    if backend() == "c" and type(scaling) is float:
        t = _fast_forward(y, x, lora_A, lora_B, scaling)
        if t is not None:
            return t
    if y is None:
        raise TypeError("lora_forward: y is required, got None")
    N, n_in, out, r = _lora_dims("lora_forward", x, lora_A, lora_B)
    shapes = {"y": (N, out), "x": (N, n_in), "lora_A": (r, n_in), "lora_B": (out, r)}
    _, device = check_arrays("lora_forward", {"y": y}, {"x": x, "lora_A": lora_A, "lora_B": lora_B}, shapes,
                             device=True)
    s = scalar(scaling)
    if device:
        return cuda.lora_forward(y, x, lora_A, lora_B, s)
    if backend() == "c":
        t = np.empty((N, r), dtype=x.dtype)
        call_c("lora_forward", y, t, x, lora_A, lora_B, s, N, n_in, out, r)
        return t
    if backend() == "cuda":
        return cuda.on_host(cuda.lora_forward, [y], [x, lora_A, lora_B], s)
    return _forward_numpy(y, x, lora_A, lora_B, s)


def lora_backward(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, scaling):
    """Accumulate, with g = dy @ lora_B [N, r]:
    d_lora_A [r, in] += s·gᵀ x,  d_lora_B [out, r] += s·dyᵀ t,  dx [N, in] += s·g lora_A.
    Outputs given as None are skipped."""
    if backend() == "c" and type(scaling) is float and _fast_backward(dx, d_lora_A, d_lora_B, dy, x, t, lora_A,
                                                                      lora_B, scaling):
        return
    N, n_in, out, r = _lora_dims("lora_backward", x, lora_A, lora_B)
    shapes = {"dx": (N, n_in), "d_lora_A": (r, n_in), "d_lora_B": (out, r), "dy": (N, out),
              "x": (N, n_in), "t": (N, r), "lora_A": (r, n_in), "lora_B": (out, r)}
    outputs = {"dx": dx, "d_lora_A": d_lora_A, "d_lora_B": d_lora_B}
    inputs = {"dy": dy, "x": x, "t": t, "lora_A": lora_A, "lora_B": lora_B}
    for name, a in inputs.items():
        if a is None:
            raise TypeError(f"lora_backward: {name} is required, got None")
    _, device = check_arrays("lora_backward", outputs, inputs, shapes, device=True)
    s = scalar(scaling)
    if dx is None and d_lora_A is None and d_lora_B is None:
        return
    if device:
        cuda.lora_backward(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, s)
    elif backend() == "c":
        call_c("lora_backward", dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, s, N, n_in, out, r)
    elif backend() == "cuda":
        cuda.on_host(cuda.lora_backward, [dx, d_lora_A, d_lora_B], [dy, x, t, lora_A, lora_B], s)
    else:
        _backward_numpy(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, s)


def lora_merge(weight, lora_A, lora_B, scaling, fan_in_fan_out=False):
    """weight [out, in] += scaling · lora_B @ lora_A in place, or for fan_in_fan_out
    weight [in, out] += scaling · (lora_B @ lora_A)ᵀ. Unmerge: the same call with -scaling.
    No temporary of weight's size on any backend."""
    if backend() == "c" and type(scaling) is float and _fast_merge(weight, lora_A, lora_B, scaling, fan_in_fan_out):
        return
    for name, a in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        check_array("lora_merge", name, a, device=True, matrix=True)
    (r, n_in), out = lora_A.shape, lora_B.shape[0]
    fan_in_fan_out = bool(fan_in_fan_out)
    shapes = {"weight": (n_in, out) if fan_in_fan_out else (out, n_in), "lora_A": (r, n_in), "lora_B": (out, r)}
    _, device = check_arrays("lora_merge", {"weight": weight}, {"lora_A": lora_A, "lora_B": lora_B}, shapes,
                             device=True)
    s = scalar(scaling)
    if device:
        cuda.lora_merge(weight, lora_A, lora_B, s, fan_in_fan_out)
    elif backend() == "c":
        call_c("lora_merge", weight, lora_A, lora_B, s, int(fan_in_fan_out), n_in, out, r)
    elif backend() == "cuda":
        cuda.on_host(cuda.lora_merge, [weight], [lora_A, lora_B], s, fan_in_fan_out)
    else:
        _merge_numpy(weight, lora_A, lora_B, s, fan_in_fan_out)


# ---- NumPy reference ----------------------------------------------------------------------


def _forward_numpy(y, x, lora_A, lora_B, scaling):
    t = x @ lora_A.T                    # [N, r]
    y += (scaling * t) @ lora_B.T       # [N, out]
    return t


def _backward_numpy(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, scaling):
    if dx is not None or d_lora_A is not None:
        g = scaling * (dy @ lora_B)     # [N, r]
        if d_lora_A is not None:
            d_lora_A += g.T @ x         # [r, in]
        if dx is not None:
            dx += g @ lora_A            # [N, in]
    if d_lora_B is not None:
        d_lora_B += dy.T @ (scaling * t)  # [out, r]


_MERGE_ROWS = 256  # rows of weight per step: the temporary is [256, cols], not weight-sized


def _merge_numpy(weight, lora_A, lora_B, scaling, fan_in_fan_out):
    # delta = scaling · B A is [out, in]; fan_in_fan_out weights hold its transpose [in, out].
    left, right = (lora_A.T, lora_B.T) if fan_in_fan_out else (lora_B, lora_A)  # [rows, r], [r, cols]
    right = scaling * right
    for i in range(0, weight.shape[0], _MERGE_ROWS):
        weight[i:i + _MERGE_ROWS] += left[i:i + _MERGE_ROWS] @ right


