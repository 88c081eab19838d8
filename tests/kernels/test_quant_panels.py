"""Many rows of x over GGUF blocks on the C backend: OpenBLAS on dequantized panels of W (lora_np.kernels.quant).

Properties:
- y = x Wᵀ + b and dx = dy W through panels (of W's rows forward; of its columns backward, or of its rows
  accumulated when N is large) equal "dequantize (gguf-py), then matmul in float64" within the bound of
  summation-order rounding, |error| ≤ tol · (|x| |W|ᵀ + |b|), tol 1e-5 in float32 and 1e-12 in float64, for
  panel sizes that hypothesis picks down to one row / one block of columns;
- no W-sized float copy: the traced peak stays below the dequantized weight's size;
- bad arguments are refused with messages naming the argument, on both paths (M ≤ 8: the C tile kernels;
  more rows: the panels).
"""
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import IN_CI
from lora_np import kernels
from lora_np.kernels import quant as kq
from test_quant_kernels import check_gemms, k_for, random_blocks

HAS_C = "c" in kernels.available_backends()
pytestmark = pytest.mark.skipif(not HAS_C and not IN_CI, reason="C core not built")


@pytest.fixture(autouse=True)
def c_backend():
    kernels.set_backend("c")
    yield


@settings(max_examples=60, deadline=None)
@given(ggml_type=st.sampled_from(kq.QUANT_TYPES), M=st.integers(9, 40), N=st.integers(1, 90),
       n_blocks=st.integers(1, 4), dtype=st.sampled_from([np.float32, np.float64]), with_bias=st.booleans(),
       panels=st.sampled_from(["columns", "rows", "default"]), per_panel=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_panels_equal_dequantize_then_matmul(ggml_type, M, N, n_blocks, dtype, with_bias, panels, per_panel, seed):
    """Backward by column panels of per_panel blocks, or by row panels of per_panel rows, accumulated (the
    forward's row panels then as many rows as those bytes hold); or the default panel size."""
    K, itemsize = k_for(ggml_type, n_blocks), np.dtype(dtype).itemsize
    with pytest.MonkeyPatch.context() as patch:
        if panels == "columns":
            patch.setattr(kq, "_PANEL_BYTES", N * per_panel * kq.block_size(ggml_type) * itemsize)
            patch.setattr(kq, "_MIN_PANEL_COLS", 1)
        elif panels == "rows":
            patch.setattr(kq, "_PANEL_BYTES", per_panel * K * itemsize)
            patch.setattr(kq, "_MIN_PANEL_COLS", 1 << 30)
        check_gemms(ggml_type, M, N, n_blocks, dtype, with_bias, seed)


@pytest.mark.parametrize("N,K,panel", [(2048, 512, 256 << 10), (8192, 64, 64 << 10)])  # column panels of 32;
def test_no_w_sized_float_copy(monkeypatch, N, K, panel):                                   # row panels accumulated
    monkeypatch.setattr(kq, "_PANEL_BYTES", panel)
    monkeypatch.setattr(kq, "_MIN_PANEL_COLS", 32)
    rng = np.random.default_rng(0)
    blocks = random_blocks(rng, "Q8_0", N, K)
    x, dy = rng.standard_normal((9, K)).astype(np.float32), rng.standard_normal((9, N)).astype(np.float32)
    w_bytes = N * K * 4
    for op, a in ((kq.quant_linear_forward, x), (kq.quant_linear_backward, dy)):
        tracemalloc.start()
        op(a, blocks, "Q8_0")
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < w_bytes / 4, f"{op.__name__}: traced peak {peak} bytes, W in float32 is {w_bytes}"


@pytest.mark.parametrize("panels", ["columns", "rows"])
def test_panels_do_not_depend_on_the_number_of_threads(monkeypatch, panels):
    """The C core's and OpenBLAS's threads: 1 and 2 give the same bits (row panels accumulated: whole 256s of
    rows, which OpenBLAS sums alike on any thread count)."""
    if panels == "rows":
        monkeypatch.setattr(kq, "_MIN_PANEL_COLS", 1 << 30)
    rng = np.random.default_rng(5)
    blocks = random_blocks(rng, "Q8_0", 8192, 576)
    x, dy = rng.standard_normal((64, 576)).astype(np.float32), rng.standard_normal((64, 8192)).astype(np.float32)
    threads, results = kernels.get_num_threads(), []
    try:
        for n in (1, 2):
            kernels.set_threads(n)
            results.append((kq.quant_linear_forward(x, blocks, "Q8_0"), kq.quant_linear_backward(dy, blocks, "Q8_0")))
    finally:
        kernels.set_threads(threads)
    assert all(np.array_equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("M", [2, 20])
def test_bad_arguments_are_refused_by_name_on_both_paths(M):
    blocks = np.zeros((4, 34), np.uint8)
    x, dy = np.zeros((M, 32), np.float32), np.zeros((M, 4), np.float32)
    cases = [
        (TypeError, "x must be a numpy.ndarray, got list", lambda: kq.quant_linear_forward(x.tolist(), blocks, "Q8_0")),
        (TypeError, "x has dtype float16", lambda: kq.quant_linear_forward(x.astype(np.float16), blocks, "Q8_0")),
        (ValueError, r"x must be 2-D, got shape \(1, %d, 32\)" % M,
         lambda: kq.quant_linear_forward(x[None], blocks, "Q8_0")),
        (ValueError, "x .* must be C-contiguous",
         lambda: kq.quant_linear_forward(np.zeros((M, 64), np.float32)[:, ::2], blocks, "Q8_0")),
        (ValueError, r"blocks \(shape \(4, 34\)\) must be C-contiguous",
         lambda: kq.quant_linear_forward(x, np.zeros((4, 68), np.uint8)[:, ::2], "Q8_0")),
        (TypeError, "blocks must be a 2-D numpy.ndarray of uint8",
         lambda: kq.quant_linear_forward(x, blocks.reshape(-1), "Q8_0")),
        (ValueError, "type 'q8_0' is not supported", lambda: kq.quant_linear_forward(x, blocks, "q8_0")),
        (TypeError, "bias has dtype float64, but x has float32",
         lambda: kq.quant_linear_forward(x, blocks, "Q8_0", np.zeros(4))),
        (ValueError, r"bias has shape \(4, 1\), expected \(4,\)",
         lambda: kq.quant_linear_forward(x, blocks, "Q8_0", np.zeros((4, 1), np.float32))),
        (ValueError, "bias .* must be C-contiguous",
         lambda: kq.quant_linear_forward(x, blocks, "Q8_0", np.zeros(8, np.float32)[::2])),
        (TypeError, "dy has dtype int64", lambda: kq.quant_linear_backward(dy.astype(np.int64), blocks, "Q8_0")),
        (ValueError, r"dy has shape \(%d, 32\), expected \(%d, 4\)" % (M, M),
         lambda: kq.quant_linear_backward(x, blocks, "Q8_0")),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
