"""Dense GEMMs of the C core, and a LoRA Linear with its low-rank branch fused into the GEMM.

    matmul_nt(a, b) = a @ bᵀ            matmul_nn(a, b) = a @ b
    lora_linear_forward(x, weight, lora_A, lora_B, scaling) -> (y, t)
        y = x Wᵀ + scaling · (x lora_Aᵀ) lora_Bᵀ,  t = x lora_Aᵀ   (what lora_backward needs)
    lora_linear_backward(dy, x, t, weight, lora_A, lora_B, scaling, d_lora_A=None, d_lora_B=None) -> dx
        dx = dy W + scaling · (dy lora_B) lora_A; d_lora_A, d_lora_B += as lora_backward adds

W is [out, in], lora_A [r, in], lora_B [out, r], x [N, in], dy [N, out]. On the C backend the fused
functions read x (dy) once for both the GEMM and the low-rank branch (csrc/gemm_kernels.c); on the
others they are the composition: NumPy's GEMM, then lora_forward / lora_backward.
"""
import numpy as np

from .backend import backend, call_c
from .checks import check_arrays, scalar
from .lora import lora_backward, lora_forward


def _matmul(op, a, b, shape_b, out_cols):
    check_arrays(op, {}, {"a": a, "b": b}, {"a": a.shape, "b": shape_b} if a.ndim == 2 else None)
    if a.ndim != 2 or b.ndim != 2 or b.shape != shape_b:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} do not multiply")
    c = np.empty((a.shape[0], out_cols), a.dtype)
    call_c(op, c, a, b, a.shape[0], out_cols, a.shape[1])
    return c


def matmul_nt(a, b):
    """a [M, K] @ b [N, K]ᵀ -> [M, N] with the C core's GEMM (C backend only)."""
    return _matmul("gemm_nt", a, b, (b.shape[0], a.shape[1]) if b.ndim == 2 and a.ndim == 2 else b.shape, b.shape[0])


def matmul_nn(a, b):
    """a [M, K] @ b [K, N] -> [M, N] with the C core's GEMM (C backend only)."""
    return _matmul("gemm_nn", a, b, (a.shape[1], b.shape[-1]) if a.ndim == 2 else b.shape, b.shape[-1])


def _dims(x, weight, lora_A, lora_B):
    """(N, in, out, r) and the shapes every argument must have."""
    N, n_in, out, r = x.shape[0], x.shape[-1], weight.shape[0], lora_A.shape[0]
    return (N, n_in, out, r), {"x": (N, n_in), "weight": (out, n_in), "lora_A": (r, n_in), "lora_B": (out, r),
                               "dy": (N, out), "t": (N, r), "d_lora_A": (r, n_in), "d_lora_B": (out, r)}


def lora_linear_forward(x, weight, lora_A, lora_B, scaling):
    """(y [N, out], t [N, r]): y = x Wᵀ + scaling · t lora_Bᵀ, t = x lora_Aᵀ."""
    (N, n_in, out, r), shapes = _dims(x, weight, lora_A, lora_B)
    dtype, _ = check_arrays("lora_linear_forward", {}, {"x": x, "weight": weight, "lora_A": lora_A,
                                                         "lora_B": lora_B}, shapes)
    s = scalar(scaling)
    if backend() != "c":
        y = x @ weight.T                                                   # (N, out)
        return y, lora_forward(y, x, lora_A, lora_B, s)
    y, t = np.empty((N, out), dtype), np.empty((N, r), dtype)
    call_c("lora_linear_forward", y, t, x, weight, lora_A, lora_B, s, N, n_in, out, r)
    return y, t


def lora_linear_backward(dy, x, t, weight, lora_A, lora_B, scaling, d_lora_A=None, d_lora_B=None, need_dx=True):
    """dx = dy W + scaling · (dy lora_B) lora_A (None unless need_dx); d_lora_A, d_lora_B (when given)
    += exactly what lora_backward adds."""
    (N, n_in, out, r), shapes = _dims(x, weight, lora_A, lora_B)
    check_arrays("lora_linear_backward", {"d_lora_A": d_lora_A, "d_lora_B": d_lora_B},
                 {"dy": dy, "x": x, "t": t, "weight": weight, "lora_A": lora_A, "lora_B": lora_B}, shapes)
    s = scalar(scaling)
    if backend() != "c":
        dx = dy @ weight if need_dx else None                              # (N, in)
        if need_dx or d_lora_A is not None or d_lora_B is not None:
            lora_backward(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, s)
        return dx
    dx = np.empty((N, n_in), dy.dtype) if need_dx else None
    call_c("lora_linear_backward", dx, d_lora_A, d_lora_B, dy, x, t, weight, lora_A, lora_B, s, N, n_in, out, r)
    return dx
