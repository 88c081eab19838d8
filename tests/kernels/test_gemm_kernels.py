"""The C core's GEMM and the LoRA Linear with its low-rank branch fused in (lora_np.kernels.gemm,
csrc/gemm_kernels.c).

Properties:
- matmul_nt / matmul_nn equal a @ bᵀ / a @ b, and lora_linear_forward / lora_linear_backward equal the
  NumPy composition x Wᵀ + s (x Aᵀ) Bᵀ, dy W + s (dy B) A in float64 within the bound of summation-order
  rounding: |error| ≤ tol · (the same expression on absolute values), element by element, tol 1e-5 in
  float32 and 1e-12 in float64, for shapes hypothesis picks (M around the 6-row tile, N around the
  16-column sliver, K over several 288-element panels, r from 0 past a sliver), and for a weight packed
  in several chunks of columns and for N or K = 0;
- the fused backward's d_lora_A and d_lora_B are lora_backward's, bit for bit;
- results do not depend on the number of threads, nor t on whether it came from the fused forward
  (within the tolerance);
- the baseline SIMD build (LORA_NP_SIMD=baseline) computes the same within the tolerance;
- the NumPy backend's composition agrees.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import IN_CI, ROOT, assert_close
from lora_np import kernels
from lora_np.kernels import gemm

HAS_C = "c" in kernels.available_backends()
needs_c = pytest.mark.skipif(not HAS_C and not IN_CI, reason="C core not built")
TOL = {np.float32: 1e-5, np.float64: 1e-12}

sizes = st.tuples(
    st.integers(1, 40),     # M: tokens, around the 6-row tile
    st.integers(1, 70),     # out: around the 16-column sliver
    st.integers(1, 700),    # in: one to three panels of K
    st.integers(0, 40),     # r: none, within and past a sliver
)


def make_case(seed, M, n_in, out, r, dtype):
    rng = np.random.default_rng(seed)
    a = {name: rng.standard_normal(shape).astype(dtype) for name, shape in {
        "x": (M, n_in), "dy": (M, out), "weight": (out, n_in), "lora_A": (r, n_in), "lora_B": (out, r),
        "d_lora_A": (r, n_in), "d_lora_B": (out, r)}.items()}
    a["scaling"] = float(rng.uniform(-4, 4))
    a["t"] = a["x"] @ a["lora_A"].T
    return a


def expected(a, absolute=False):
    """(y, t, dx) of the composition in float64; absolute=True: on |arguments|, the size of the terms."""
    w = {k: (np.abs(v) if absolute else v).astype(np.float64) if isinstance(v, np.ndarray) else
         (abs(v) if absolute else v) for k, v in a.items()}
    x, W, A, B, dy, s = w["x"], w["weight"], w["lora_A"], w["lora_B"], w["dy"], w["scaling"]
    t = x @ A.T                                                  # (M, r)
    return x @ W.T + s * t @ B.T, t, dy @ W + s * (dy @ B) @ A


def check(actual, a, which, name):
    """|actual - expected| / (size of the terms) <= tol, element by element (the message shows that ratio)."""
    want, size = expected(a)[which], expected(a, absolute=True)[which]
    assert actual.dtype == a["x"].dtype, name
    error = np.abs(actual.astype(np.float64) - want) / np.maximum(size, 1e-300)
    assert_close(error, np.zeros_like(error), rtol=0, atol=TOL[a["x"].dtype.type], name=f"{name}: error / size")


def run_all(a):
    y, t = gemm.lora_linear_forward(a["x"], a["weight"], a["lora_A"], a["lora_B"], a["scaling"])
    d_lora_A, d_lora_B = a["d_lora_A"].copy(), a["d_lora_B"].copy()
    dx = gemm.lora_linear_backward(a["dy"], a["x"], a["t"], a["weight"], a["lora_A"], a["lora_B"], a["scaling"],
                                   d_lora_A, d_lora_B)
    return {"y": y, "t": t, "dx": dx, "d_lora_A": d_lora_A, "d_lora_B": d_lora_B,
            "matmul_nt": gemm.matmul_nt(a["x"], a["weight"]), "matmul_nn": gemm.matmul_nn(a["dy"], a["weight"])}


@needs_c
@settings(max_examples=60, deadline=None)
@given(sizes, st.sampled_from([np.float32, np.float64]), st.integers(0, 2**31))
def test_fused_layer_equals_the_composition(shape, dtype, seed):
    M, out, n_in, r = shape
    kernels.set_backend("c")
    a = make_case(seed, M, n_in, out, r, dtype)
    got = run_all(a)
    check(got["y"], a, 0, f"y at M={M} out={out} in={n_in} r={r}")
    check(got["t"], a, 1, f"t at M={M} in={n_in} r={r}")
    check(got["dx"], a, 2, f"dx at M={M} out={out} in={n_in} r={r}")
    plain = {k: (a[k] if k != "lora_B" else np.zeros_like(a[k])) for k in a}
    check(got["matmul_nt"], plain, 0, f"x Wᵀ at M={M} out={out} in={n_in}")
    check(got["matmul_nn"], dict(plain, lora_A=np.zeros_like(a["lora_A"])), 2, f"dy W at M={M} out={out} in={n_in}")
    d_lora_A, d_lora_B = a["d_lora_A"].copy(), a["d_lora_B"].copy()
    kernels.lora_backward(None, d_lora_A, d_lora_B, a["dy"], a["x"], a["t"], a["lora_A"], a["lora_B"], a["scaling"])
    assert np.array_equal(got["d_lora_A"], d_lora_A) and np.array_equal(got["d_lora_B"], d_lora_B)


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(13, 2100, 1024, 9), (3, 2100, 2900, 2), (5, 0, 7, 3), (4, 6, 0, 2)])
def test_wide_weights_and_empty_sizes(shape, dtype):
    """A weight over 8 MB packed is done in chunks of columns (t from the first one), of 1024 columns at
    least (2900 inputs: three chunks); N or K may be 0."""
    M, out, n_in, r = shape
    kernels.set_backend("c")
    a = make_case(3, M, n_in, out, r, dtype)
    got = run_all(a)
    check(got["y"], a, 0, "y"), check(got["t"], a, 1, "t"), check(got["dx"], a, 2, "dx")


@needs_c
@pytest.mark.parametrize("shape", [(1024, 96, 600, 8), (100, 577, 290, 17), (7, 5, 3, 1), (13, 2100, 1024, 9)])
def test_threads_do_not_change_results(shape):
    M, out, n_in, r = shape
    kernels.set_backend("c")
    a = make_case(1, M, n_in, out, r, np.float32)
    results = []
    for threads in (1, 2, 3):
        kernels.set_num_threads(threads)
        results.append(run_all(a))
    for other in results[1:]:
        for k, v in results[0].items():
            assert np.array_equal(v, other[k]), f"{k} differs between 1 thread and more"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_backend_is_the_composition(dtype):
    kernels.set_backend("numpy")
    a = make_case(2, 13, 40, 35, 5, dtype)
    y, t = gemm.lora_linear_forward(a["x"], a["weight"], a["lora_A"], a["lora_B"], a["scaling"])
    dx = gemm.lora_linear_backward(a["dy"], a["x"], a["t"], a["weight"], a["lora_A"], a["lora_B"], a["scaling"])
    check(y, a, 0, "y"), check(t, a, 1, "t"), check(dx, a, 2, "dx")
    assert gemm.lora_linear_backward(a["dy"], a["x"], a["t"], a["weight"], a["lora_A"], a["lora_B"], 1.0,
                                     need_dx=False) is None


@needs_c
def test_baseline_simd_build_agrees():
    """The SSE2 build (16-byte vectors, 8-column slivers) over a few awkward shapes, in a fresh process."""
    script = (
        "import sys; sys.path.insert(0, 'tests'); sys.path.insert(0, 'tests/kernels')\n"
        "import numpy as np, test_gemm_kernels as T\n"
        "T.kernels.set_backend('c')\n"
        "for i, shape in enumerate([(13, 9, 300, 3), (6, 16, 8, 9), (25, 31, 577, 0)]):\n"
        "    for dtype in (np.float32, np.float64):\n"
        "        a = T.make_case(i, shape[0], shape[2], shape[1], shape[3], dtype)\n"
        "        got = T.run_all(a)\n"
        "        T.check(got['y'], a, 0, 'y'); T.check(got['t'], a, 1, 't'); T.check(got['dx'], a, 2, 'dx')\n"
        "print('ok')\n")
    env = dict(os.environ, LORA_NP_SIMD="baseline")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "ok" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


@needs_c
def test_bad_shapes_are_refused():
    kernels.set_backend("c")
    x, W = np.zeros((4, 5), np.float32), np.zeros((3, 6), np.float32)
    with pytest.raises(ValueError):
        gemm.matmul_nt(x, W)
    with pytest.raises(ValueError):
        gemm.lora_linear_forward(x, W, np.zeros((2, 5), np.float32), np.zeros((3, 2), np.float32), 1.0)
    with pytest.raises(TypeError):
        gemm.lora_linear_forward(x, np.zeros((3, 5), np.float64), np.zeros((2, 5), np.float32),
                                 np.zeros((3, 2), np.float32), 1.0)
