"""The GEMMs over GGUF blocks (lora_np.kernels.quant, csrc/quant_kernels.c) and the quantized modules (lora_np.quant).

Properties:
- dequantization, in C and in NumPy, equals gguf-py's bit for bit, for every type;
- y = x Wᵀ + b and dx = dy W equal "dequantize (gguf-py), then matmul in float64" within the bound
  of summation-order rounding: |error| ≤ tol · (|x| |W|ᵀ + |b|), tol 1e-5 in float32 and 1e-12 in
  float64, for shapes hypothesis picks (ragged M around the decode path's 8 rows and the 6-row register
  tile, N not a multiple of the 64-feature tile, K of one block to several 256-element panels);
- results do not depend on the number of threads;
- the quantizers equal llama.cpp's reference ones bit for bit (gguf-py; ggml's quantize_row_q4_K_ref
  through llama_cpp's libggml-base);
- a quantized model computes what the float model with the dequantized weights computes, and generates;
- the C driver passes under AddressSanitizer + UBSan.
"""
import ctypes
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import IN_CI, assert_close, crosscheck, run_c_driver_under_sanitizers
from lora_np import Tensor, kernels
from lora_np.kernels import quant as kq
from lora_np.quant import QuantizedEmbedding, QuantizedLinear, quantize, quantize_model

HAS_C = "c" in kernels.available_backends()
needs_c = pytest.mark.skipif(not HAS_C and not IN_CI, reason="C core not built")
BACKENDS = ["numpy", "c"] if HAS_C or IN_CI else ["numpy"]
TYPES = kq.QUANT_TYPES
# offsets of the float16 scale fields (d, m, dmin) in each block type: the rest of a block is any bits
_HALVES = {"Q4_0": (0,), "Q5_0": (0,), "Q8_0": (0,), "Q4_1": (0, 2), "Q5_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2),
           "Q6_K": (208,)}


def random_blocks(rng, ggml_type, N, K):
    """blocks [N, row bytes] of random quantized values with scales of moderate size (any sign)."""
    if ggml_type in ("F32", "F16", "BF16"):
        w = rng.standard_normal((N, K)).astype(np.float32)
        if ggml_type == "F32":
            return w.view(np.uint8).reshape(N, -1)
        if ggml_type == "F16":
            return w.astype(np.float16).view(np.uint8).reshape(N, -1)
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(N, -1)
    block, size = kq._SIZES[ggml_type]
    raw = rng.integers(0, 256, (N, K // block, size), dtype=np.uint8)
    for at in _HALVES[ggml_type]:
        scale = rng.uniform(2.0**-10, 2.0**-5, (N, K // block)) * rng.choice([-1, 1], (N, K // block))
        raw[:, :, at:at + 2] = scale.astype(np.float16).view(np.uint8).reshape(N, K // block, 2)
    return raw.reshape(N, -1)


def gguf_dequantize(blocks, ggml_type):
    gguf = crosscheck("gguf")
    K = kq.in_features(blocks, ggml_type)
    if ggml_type == "F32":
        return blocks.view(np.float32).reshape(blocks.shape[0], K)
    qtype = gguf.GGMLQuantizationType[ggml_type]
    return np.asarray(gguf.quants.dequantize(blocks, qtype), np.float32).reshape(blocks.shape[0], K)


def k_for(ggml_type, n_blocks):
    return n_blocks * kq.block_size(ggml_type) if kq.block_size(ggml_type) > 1 else 32 * n_blocks + 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_equals_gguf_py_bit_for_bit(backend, ggml_type):
    rng = np.random.default_rng(0)
    blocks = random_blocks(rng, ggml_type, 7, k_for(ggml_type, 3))
    kernels.set_backend(backend)
    got = kq.dequantize_rows(blocks, ggml_type)
    want = gguf_dequantize(blocks, ggml_type)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), \
        f"{ggml_type}: {int((got != want).sum())} elements differ, max {np.abs(got - want).max():.3e}"
    assert np.array_equal(kq.dequantize_rows(blocks, ggml_type, np.float64), want.astype(np.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_half_dequantizes_exactly(backend):
    """All 65536 F16 bit patterns (subnormals, infinities, NaNs) widen as NumPy widens them, bit for bit."""
    kernels.set_backend(backend)
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    got = kq.dequantize_rows(halves.view(np.uint8).reshape(2048, 64), "F16").reshape(-1)
    assert np.array_equal(got.view(np.uint32), halves.view(np.float16).astype(np.float32).view(np.uint32))


def check_gemms(ggml_type, M, N, n_blocks, dtype, with_bias, seed):
    """forward and backward against gguf-py's dequantization then a float64 matmul."""
    rng = np.random.default_rng(seed)
    K = k_for(ggml_type, n_blocks)
    blocks = random_blocks(rng, ggml_type, N, K)
    W = gguf_dequantize(blocks, ggml_type).astype(np.float64)                  # [N, K]
    x, dy = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((M, N)).astype(dtype)
    bias = rng.standard_normal(N).astype(dtype) if with_bias else None
    tol = 1e-5 if dtype == np.float32 else 1e-12
    y = kq.quant_linear_forward(x, blocks, ggml_type, bias)
    y_ref = x.astype(np.float64) @ W.T + (0 if bias is None else bias)
    scale = np.abs(x.astype(np.float64)) @ np.abs(W).T + (0 if bias is None else np.abs(bias))
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close(y, y_ref, 0, tol * scale, name=f"{ggml_type} y {M}x{N}x{K} {np.dtype(dtype)}")
    dx = kq.quant_linear_backward(dy, blocks, ggml_type)
    dx_ref = dy.astype(np.float64) @ W
    assert dx.dtype == dtype and dx.shape == (M, K)
    assert_close(dx, dx_ref, 0, tol * (np.abs(dy.astype(np.float64)) @ np.abs(W)),
                 name=f"{ggml_type} dx {M}x{N}x{K} {np.dtype(dtype)}")


@needs_c
@settings(max_examples=60, deadline=None)
@given(ggml_type=st.sampled_from(TYPES), M=st.one_of(st.integers(1, 13), st.integers(250, 270)),
       N=st.integers(1, 140), n_blocks=st.integers(1, 3), dtype=st.sampled_from([np.float32, np.float64]),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_c_gemms_equal_dequantize_then_matmul(ggml_type, M, N, n_blocks, dtype, with_bias, seed):
    kernels.set_backend("c")
    check_gemms(ggml_type, M, N, n_blocks, dtype, with_bias, seed)


@pytest.mark.parametrize("ggml_type", ["Q4_1", "Q6_K", "BF16"])
def test_numpy_gemms_equal_dequantize_then_matmul(ggml_type):
    kernels.set_backend("numpy")
    check_gemms(ggml_type, 9, 300, 2, np.float32, True, 1)  # 300 rows: more than one slice of the reference


@needs_c
@pytest.mark.parametrize("M", [1, 8, 9, 300])
def test_threads_do_not_change_results(M):
    kernels.set_backend("c")
    rng = np.random.default_rng(M)
    blocks = random_blocks(rng, "Q4_K", 200, 512)
    x, dy = rng.standard_normal((M, 512)).astype(np.float32), rng.standard_normal((M, 200)).astype(np.float32)
    results = []
    for threads in (1, 2):
        kernels.set_num_threads(threads)
        results.append((kq.quant_linear_forward(x, blocks, "Q4_K"), kq.quant_linear_backward(dy, blocks, "Q4_K")))
    assert all(np.array_equal(a, b) for a, b in zip(*results))


@needs_c
@pytest.mark.parametrize("ggml_type", TYPES)
def test_decode_path_every_row_count(ggml_type):
    """M = 1 .. 8 rows (the decode path), odd N, with and without bias, float32 and float64: dequantize-then-matmul
    within summation-order rounding, and bit-identical on 1 and 2 threads (1 x N x K past the one-thread
    threshold; K 768, or 773 for F32 / F16 / BF16: a tail of K % 32)."""
    kernels.set_backend("c")
    rng = np.random.default_rng(11)
    N, K = 301, k_for(ggml_type, 3 if kq.block_size(ggml_type) == 256 else 24)
    blocks = random_blocks(rng, ggml_type, N, K)
    W = gguf_dequantize(blocks, ggml_type).astype(np.float64)                  # [N, K]
    for M in range(1, 9):
        for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
            x = rng.standard_normal((M, K)).astype(dtype)
            for bias in (None, rng.standard_normal(N).astype(dtype)):
                ys = []
                for threads in (1, 2):
                    kernels.set_num_threads(threads)
                    ys.append(kq.quant_linear_forward(x, blocks, ggml_type, bias))
                y_ref = x.astype(np.float64) @ W.T + (0 if bias is None else bias)
                scale = np.abs(x.astype(np.float64)) @ np.abs(W).T + (0 if bias is None else np.abs(bias))
                name = f"{ggml_type} y {M}x{N}x{K} {np.dtype(dtype)} bias {bias is not None}"
                assert ys[0].dtype == dtype and ys[0].shape == (M, N)
                assert_close(ys[0], y_ref, 0, tol * scale, name=name)
                assert np.array_equal(ys[0], ys[1]), f"{name}: 1 and 2 threads differ"


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_are_named(backend):
    kernels.set_backend(backend)
    blocks = np.zeros((4, 34), np.uint8)
    x = np.zeros((2, 32), np.float32)
    with pytest.raises(ValueError, match="type 'Q2_K' is not supported"):
        kq.quant_linear_forward(x, np.zeros((4, 84), np.uint8), "Q2_K")
    with pytest.raises(ValueError, match="not whole Q8_0 blocks of 34 bytes"):
        kq.quant_linear_forward(x, np.zeros((4, 35), np.uint8), "Q8_0")
    with pytest.raises(TypeError, match="blocks must be a 2-D numpy.ndarray of uint8"):
        kq.quant_linear_forward(x, blocks.view(np.int8), "Q8_0")
    with pytest.raises(ValueError, match=r"x has shape \(2, 64\), expected \(2, 32\)"):
        kq.quant_linear_forward(np.zeros((2, 64), np.float32), blocks, "Q8_0")
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(4,\)"):
        kq.quant_linear_forward(x, blocks, "Q8_0", np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="bias has dtype float64"):
        kq.quant_linear_forward(x, blocks, "Q8_0", np.zeros(4))
    with pytest.raises(ValueError, match=r"dy has shape \(2, 5\), expected \(2, 4\)"):
        kq.quant_linear_backward(np.zeros((2, 5), np.float32), blocks, "Q8_0")
    assert kq.quant_linear_forward(np.zeros((0, 32), np.float32), blocks, "Q8_0").shape == (0, 4)


# ---- quantizers --------------------------------------------------------------------------


def weights(rng, rows, cols, zero_block):
    """Rows of different scales; optionally a block of zeros and a block of one repeated value."""
    w = (rng.standard_normal((rows, cols)) * rng.uniform(1e-3, 3, (rows, 1))).astype(np.float32)
    if zero_block:
        w[0, :32] = 0
        w[-1, -32:] = 0.75
    return w


@settings(max_examples=15, deadline=None)
@given(ggml_type=st.sampled_from(["Q8_0", "Q4_0", "Q5_0"]), rows=st.integers(1, 9), n_blocks=st.integers(1, 4),
       zero_block=st.booleans(), seed=st.integers(0, 2**16))
def test_quantize_equals_gguf_py(ggml_type, rows, n_blocks, zero_block, seed):
    gguf = crosscheck("gguf")
    w = weights(np.random.default_rng(seed), rows, 32 * n_blocks, zero_block)
    want = np.ascontiguousarray(gguf.quants.quantize(w, gguf.GGMLQuantizationType[ggml_type])).view(np.uint8)
    got = quantize(w, ggml_type.lower())
    assert np.array_equal(got, want), f"{ggml_type}: {int((got != want).sum())} bytes differ"


def ggml_quantize_row_q4_k_ref():
    """ggml's reference Q4_K quantizer from the libggml-base that llama_cpp ships."""
    llama_cpp = crosscheck("llama_cpp")
    path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
    if not os.path.exists(path):
        pytest.fail(f"llama_cpp has no {path}")
    fn = ctypes.CDLL(path).quantize_row_q4_K_ref
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    return fn


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 6), n_blocks=st.integers(1, 2), zero_block=st.booleans(), seed=st.integers(0, 2**16))
def test_quantize_q4_k_equals_ggml_reference(rows, n_blocks, zero_block, seed):
    ref = ggml_quantize_row_q4_k_ref()
    w = weights(np.random.default_rng(seed), rows, 256 * n_blocks, zero_block)
    want = np.zeros(rows * n_blocks * 144, np.uint8)
    ref(w.ctypes.data, want.ctypes.data, w.size)
    got = quantize(w, "q4_k")
    assert np.array_equal(got.reshape(-1), want), f"{int((got.reshape(-1) != want).sum())} bytes differ"


def test_quantize_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="type 'q2_k' is not supported"):
        quantize(np.zeros((2, 256), np.float32), "q2_k")
    with pytest.raises(ValueError, match=r"Q4_K needs a 2-D weight whose rows are whole blocks of 256, got shape "
                                         r"\(2, 64\)"):
        quantize(np.zeros((2, 64), np.float32), "q4_k")


# ---- modules and models ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_linear_gradient_is_dy_w(backend):
    kernels.set_backend(backend)
    rng = np.random.default_rng(3)
    blocks, bias = random_blocks(rng, "Q5_1", 40, 64), rng.standard_normal(40)
    layer = QuantizedLinear(blocks, "Q5_1", bias, dtype=np.float64)
    W = gguf_dequantize(blocks, "Q5_1").astype(np.float64)
    x = Tensor(rng.standard_normal((2, 3, 64)), requires_grad=True)
    y = layer(x)
    g = rng.standard_normal((2, 3, 40))
    (y * Tensor(g)).sum().backward()
    assert_close(y.data, x.data @ W.T + bias, 1e-12, name="y")
    assert_close(x.grad, g @ W, 1e-12, name="dx")
    assert not any(p.requires_grad for p in layer.parameters())


def tiny_float_model(tie, seed=0):
    from lora_np import manual_seed
    from lora_np.models import LlamaConfig, LlamaForCausalLM

    manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=tie, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    for p in model.parameters():
        p.data *= 0.2
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ggml_type,tie", [("q8_0", True), ("q4_0", False), ("q4_k", True)])
def test_quantized_model_equals_the_dequantized_float_model(backend, ggml_type, tie):
    """Every Linear and the embedding quantized (q4_k falls back to q5_0 for the 64- and 96-wide rows);
    logits equal those of the float model holding the dequantized weights, within float32 rounding."""
    kernels.set_backend(backend)
    model = quantize_model(tiny_float_model(tie), ggml_type)
    reference = tiny_float_model(tie)
    quantized = dict(model.named_modules())
    for name, module in reference.named_modules():
        q = quantized[name]
        if isinstance(q, (QuantizedLinear, QuantizedEmbedding)):
            assert q.ggml_type == ("Q5_0" if ggml_type == "q4_k" else ggml_type.upper()), name
            module.weight.data[...] = kq.dequantize_rows(q.weight_blocks, q.ggml_type)
    assert type(model.lm_head) is QuantizedLinear and type(model.model.embed_tokens) is QuantizedEmbedding
    if tie:
        assert model.lm_head.weight_blocks is model.model.embed_tokens.weight_blocks
    ids = np.array([[3, 17, 96, 42, 5, 5, 61, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    got, want = model(ids).logits.data, reference(ids).logits.data
    assert_close(got, want, 0, 2e-5 * np.abs(want).max(), name="logits")
    assert np.array_equal(model.generate(ids[:1], max_new_tokens=5), reference.generate(ids[:1], max_new_tokens=5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_head_loss_over_blocks_equals_the_dequantized_head(backend, softcap, monkeypatch):
    """LinearCrossEntropy over a Q4_1 head's blocks (the vocabulary streamed in panels of 100 rows, some rows
    ignored) gives the loss and h's gradient of the float64 head holding the dequantized weight (rows in
    chunks of 5), and never holds all the logits."""
    import tracemalloc

    from lora_np.functional import LinearCrossEntropy, fused

    kernels.set_backend(backend)
    monkeypatch.setattr(fused, "_HEAD_PANEL", 397 * 100)  # 397 rows with a target: panels of 100 of W's rows
    rng = np.random.default_rng(7)
    V, C, N = 2048, 64, 400
    blocks = random_blocks(rng, "Q4_1", V, C)
    W = gguf_dequantize(blocks, "Q4_1").astype(np.float64)                                             # (V, C)
    h = rng.standard_normal((N, C))
    target = rng.integers(0, V, N)
    target[[0, 11, 30]] = -100
    results = []
    for weight, quant in ((Tensor(W), {}), (None, {"blocks": blocks, "ggml_type": "Q4_1"})):
        x = Tensor(h.copy(), requires_grad=True)
        tracemalloc.start()
        loss = LinearCrossEntropy.apply(x, weight, Tensor(target), chunk=5, softcap=softcap, **quant)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        (loss * 2.5).backward()
        results.append((loss.data, x.grad, peak))
    (loss_q, gh_q, peak_q), (loss_f, gh_f, _) = results[1], results[0]
    assert_close(loss_q, loss_f, 1e-12, name="loss")
    assert_close(gh_q, gh_f, 1e-10, 1e-14, name="dh")
    assert np.abs(gh_q).max() > 0 and not gh_q[[0, 11, 30]].any()
    # what the streamed head holds: a few (N, C) arrays (h's rows, the gradient, its accumulators) and a panel's
    # logits (397, 100) with their temporaries; not the (N, V) logits
    assert peak_q < 6 * N * C * 8 + 3 * 397 * 100 * 8, peak_q
    assert peak_q < N * V * 8 / 2, peak_q


@pytest.mark.parametrize("backend", BACKENDS)
def test_streamed_head_with_few_rows_dequantizes_a_panel_of_w_at_a_time(backend, monkeypatch):
    """With few rows the logits bound alone would take the whole head as one panel (the demo: a 113 MB float32
    copy of SmolLM2's head); a panel of W also stays within the GEMMs' panel bytes (here 64 rows)."""
    import tracemalloc

    from lora_np.functional import LinearCrossEntropy

    kernels.set_backend(backend)
    rng = np.random.default_rng(3)
    V, C, N = 4096, 64, 6
    monkeypatch.setattr(kq, "_PANEL_BYTES", 64 * C * 8)
    blocks = random_blocks(rng, "Q8_0", V, C)
    W = gguf_dequantize(blocks, "Q8_0").astype(np.float64)                                             # (V, C)
    h, target = rng.standard_normal((N, C)), rng.integers(0, V, N)
    x = Tensor(h.copy(), requires_grad=True)
    tracemalloc.start()
    loss = LinearCrossEntropy.apply(x, None, Tensor(target), blocks=blocks, ggml_type="Q8_0")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    loss.backward()
    z = h @ W.T                                                                                        # (N, V)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    assert_close(loss.data, (lse - z[np.arange(N), target]).mean(), 1e-12, name="loss (the rows' mean)")
    p = np.exp(z - lse[:, None])
    p[np.arange(N), target] -= 1
    assert_close(x.grad, p @ W / N, 1e-10, 1e-14, name="dh")
    assert peak < 4 * 64 * C * 8 + 8 * N * C * 8, peak  # a W panel and its logits, not V * C * 8 = 2 MiB
    assert peak < V * C * 8 / 4, peak


@pytest.mark.parametrize("ggml_type,tie", [("q8_0", True), ("q4_0", False)])
def test_quantized_head_takes_the_chunked_loss(ggml_type, tie):
    """A model whose head is a QuantizedLinear computes its training loss chunk by chunk (no logits returned),
    equal to the loss from the whole logits, with the same gradients of the final norm."""
    model = quantize_model(tiny_float_model(tie), ggml_type)
    ids = np.array([[3, 17, 96, 42, 5, 5, 61, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    results = []
    for return_logits in (False, True):
        model.zero_grad()
        out = model(ids, labels=ids, return_logits=return_logits)
        out.loss.backward()
        results.append((out.logits, out.loss.data, model.model.norm.weight.grad.copy()))
    (logits_c, loss_c, g_c), (logits_w, loss_w, g_w) = results
    assert logits_c is None and logits_w is not None
    assert_close(loss_c, loss_w, 1e-6, name="loss")
    assert_close(g_c, g_w, 1e-4, 1e-5 * np.abs(g_w).max(), name="norm weight gradient")


@needs_c
def test_quant_kernels_under_address_sanitizer(tmp_path):
    run_c_driver_under_sanitizers(tmp_path, "test_quant_kernels", ["quant_kernels.c", "lora_kernels.c"],
                                  "all quantized GEMM checks passed")


# ---- loading: GGUF blocks kept resident, float checkpoints quantized at load -------------------


def lora_gradients(model, ids):
    """The loss and the LoRA gradients of one step with an adapter on q, v and down (seeded: the same A)."""
    from lora_np import LoraConfig, get_peft_model, manual_seed

    manual_seed(5)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            lora_dropout=0.0))
    rng = np.random.default_rng(6)
    for name, p in peft.named_parameters():  # B nonzero, so that A's gradients (and dx through the base) count
        if "lora_B" in name:
            p.data[...] = 0.1 * rng.standard_normal(p.shape)
    peft.train()
    out = peft(ids, labels=ids)
    out.loss.backward()
    return out.loss.data, {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_gguf_blocks_stay_resident_and_compute_the_dequantized_model(tmp_path, backend, outtype):
    """By default a GGUF file's quantized Linear and Embedding weights (the tied head with them) stay in the file's
    blocks;
    logits, greedy generation and a LoRA step's gradients equal the dequantized (float32) model's within float32
    rounding."""
    from lora_np.export import save_merged_gguf
    from lora_np.loaders import load_model

    kernels.set_backend(backend)
    path = save_merged_gguf(tiny_float_model(tie=True), tmp_path / "m.gguf", outtype=outtype)
    resident, floats = load_model(path), load_model(path, dequantize=True)
    mlp = resident.model.layers[1].mlp
    assert type(mlp.down_proj) is QuantizedLinear and mlp.down_proj.ggml_type == outtype.upper()
    assert resident.lm_head.weight_blocks is resident.model.embed_tokens.weight_blocks
    assert_close(kq.dequantize_rows(mlp.gate_proj.weight_blocks, outtype.upper()),
                 floats.model.layers[1].mlp.gate_proj.weight.data, 0, name="gate_proj blocks")
    ids = np.array([[3, 17, 96, 42, 5, 5, 61, 0], [1, 2, 3, 4, 5, 6, 7, 8]])
    got, want = resident(ids).logits.data, floats(ids).logits.data
    assert_close(got, want, 0, 2e-5 * np.abs(want).max(), name="logits")
    assert np.array_equal(resident.generate(ids[:1], max_new_tokens=6), floats.generate(ids[:1], max_new_tokens=6))
    (loss_q, grads_q), (loss_f, grads_f) = lora_gradients(resident, ids), lora_gradients(floats, ids)
    assert_close(loss_q, loss_f, 1e-5, name="loss")
    assert grads_q.keys() == grads_f.keys() and len(grads_q) == 12
    for name in grads_f:
        assert_close(grads_q[name], grads_f[name], 0, 1e-4 * np.abs(grads_f[name]).max(), name=name)


def test_float_checkpoint_quantized_at_load(tmp_path):
    from lora_np.export import save_merged, save_merged_gguf
    from lora_np.loaders import load_model

    save_merged(tiny_float_model(tie=False), str(tmp_path / "hf"))
    model = load_model(tmp_path / "hf", quantize="q8_0")
    assert type(model.lm_head) is QuantizedLinear and type(model.model.embed_tokens) is QuantizedEmbedding
    assert model.model.layers[0].self_attn.q_proj.ggml_type == "Q8_0"
    with pytest.raises(ValueError, match="quantize='q3_k' is not supported; supported: q8_0, q4_0, q4_k"):
        load_model(tmp_path / "hf", quantize="q3_k")
    save_merged_gguf(tiny_float_model(tie=False), tmp_path / "m.gguf", outtype="q8_0")
    with pytest.raises(ValueError, match="quantize='q4_0' is for float checkpoints; .*m.gguf has its own blocks"):
        load_model(tmp_path / "m.gguf", quantize="q4_0")


def test_commands_take_quantize_and_dequantize(tmp_path, capsys):
    """--quantize / --dequantize reach load_model from the model commands and train's TrainArgs; merged exports
    of a resident model are refused naming dequantize, and `lora-np merge` of a GGUF base loads it as floats."""
    from lora_np.cli import build_parser, main, train_args_from_namespace
    from lora_np.export import save_merged, save_merged_gguf
    from lora_np.loaders import load_model
    from lora_np.options import OptionError
    from lora_np.safetensors import load_file
    from lora_np.train import TrainArgs

    model = tiny_float_model(tie=False)
    save_merged(model, str(tmp_path / "hf"))
    assert main(["info", "--model", str(tmp_path / "hf"), "--quantize", "q8_0"]) == 0
    assert f"parameters: {model.num_parameters():,}\n" in capsys.readouterr().out
    path = save_merged_gguf(model, tmp_path / "m.gguf", outtype="q8_0")
    resident = load_model(path)
    assert type(resident.lm_head) is QuantizedLinear and resident.num_parameters() == model.num_parameters()
    for save in (save_merged, save_merged_gguf):
        with pytest.raises(NotImplementedError, match=f"{save.__name__} needs float weights, but "
                                                      "model.layers.0.self_attn.q_proj keeps its Q8_0 weight in "
                                                      "blocks; load the model with dequantize=True"):
            save(resident, tmp_path / "out")
    assert main(["merge", "--model", str(path), "--out", str(tmp_path / "merged")]) == 0
    for command in (["merge", "--out", str(tmp_path / "m2")], ["export", "--format", "gguf", "--out",
                                                                 str(tmp_path / "m2.gguf")]):
        capsys.readouterr()
        assert main([*command, "--model", str(tmp_path / "hf"), "--quantize", "q8_0"]) == 2
        assert "--quantize q8_0 keeps the base's weights in blocks, but this command writes float weights" \
            in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "m2") and not os.path.exists(tmp_path / "m2.gguf")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    assert np.array_equal(merged, resident.model.layers[1].mlp.down_proj.weight.data)
    ns = build_parser().parse_args(["train", "--data", "d.txt", "--out", "o", "--quantize", "q4_k", "--dequantize"])
    args = train_args_from_namespace(ns)
    assert (args.quantize, args.dequantize) == ("q4_k", True)
    assert (TrainArgs(data="d", out="o").quantize, TrainArgs(data="d", out="o").dequantize) == (None, False)
    with pytest.raises(OptionError, match="quantize must be one of q8_0, q4_0, q4_k, bf16, f16, got 'q3_k'"):
        TrainArgs(data="d", out="o", quantize="q3_k")


def test_lora_on_a_quantized_base_refuses_what_needs_its_float_weight(tmp_path):
    from lora_np import LoraConfig, get_peft_model

    model = quantize_model(tiny_float_model(tie=False), "q8_0")
    with pytest.raises(NotImplementedError, match="init_lora_weights='pissa' needs the float weight"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    peft = get_peft_model(quantize_model(tiny_float_model(tie=False), "q8_0"),
                          LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="merging into a quantized base"):
        peft.merge_and_unload()


def test_smollm2_q4_1_stays_resident():
    """SmolLM2-135M's Q4_1 GGUF (Q8_0 embedding, tied head): about 90 MB of weights instead of 513 MB, the
    logits of the dequantized model within float32 rounding, and a LoRA step (q, v, down) on it: its loss, and
    gradients finite and nonzero everywhere."""
    from lora_np.loaders import default_model_path, load_model

    try:
        path = default_model_path()
    except FileNotFoundError as e:
        if IN_CI:
            pytest.fail(str(e))
        pytest.skip(str(e))
    resident = load_model(path)
    blocks = {id(m.weight_blocks): m.weight_blocks.nbytes for m in resident.modules()
              if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}
    floats = sum(p.data.nbytes for p in resident.parameters())
    assert 80e6 < sum(blocks.values()) + floats < 100e6, (sum(blocks.values()), floats)
    ids = np.array([[1, 9690, 314, 253, 1345, 282]])
    floats = load_model(path, dequantize=True)
    got, want = resident(ids).logits.data, floats(ids).logits.data
    assert_close(got, want, 0, 1e-4 * np.abs(want).max(), name="SmolLM2 logits")
    (loss_q, grads_q), (loss_f, _) = lora_gradients(resident, ids), lora_gradients(floats, ids)
    assert_close(loss_q, loss_f, 1e-4, name="SmolLM2 LoRA loss")
    assert len(grads_q) == 180 and all(np.isfinite(g).all() and np.abs(g).max() > 0 for g in grads_q.values())
