"""quantize="bf16" / "f16": a float checkpoint's weights kept as 2-byte floats (GGUF's BF16 / F16 blocks).

Properties:
- quantize(w, "bf16" / "f16") equals gguf-py's gguf.quants.quantize bit for bit, for any float32 bit
  pattern (NaNs of every payload, infinities, subnormals, values that round up to infinity), and bf16
  equals lora_np.safetensors.float32_to_bf16;
- a weight that is bf16 (f16) values round-trips exactly: the blocks dequantize to the same float32;
- a tiny model whose weights are bf16 values, quantized to bf16, keeps them bit for bit and computes the
  float model's logits, loss and LoRA gradients: np.array_equal on the NumPy backend, within float32
  summation order on the C backend (its GEMMs may add in another order than the float model's);
- load_model(quantize="bf16") of a bf16 safetensors checkpoint, --quantize bf16|f16 on the commands and
  TrainArgs(quantize=) take the new types.
"""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import assert_close, crosscheck
from lora_np import kernels
from lora_np.kernels import quant as kq
from lora_np.quant import QuantizedEmbedding, QuantizedLinear, quantize, quantize_model

BACKENDS = ["numpy", "c"] if "c" in kernels.available_backends() else ["numpy"]
SPECIALS = np.array([0x7F800000, 0xFF800000, 0x7F800001, 0x7FC00000, 0xFFFFFFFF, 0x7FBFFFFF, 0xFF80FFFF,
                     0x00000001, 0x807FFFFF, 0x00008000, 0x00018000, 0x7F7FFFFF, 0x7F7F8000, 0x477FF000,
                     0x477FEFFF, 0x33000000, 0x33000001, 0x80000000, 0x3F808000, 0x3F818000], np.uint32)


def gguf_quantize(w, ggml_type):
    gguf = crosscheck("gguf")
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(gguf.quants.quantize(w, gguf.GGMLQuantizationType[ggml_type])).view(np.uint8)


@given(bits=hnp.arrays(np.uint32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12)),
       ggml_type=st.sampled_from(["BF16", "F16"]))
def test_quantize_equals_gguf_py_bit_for_bit(bits, ggml_type):
    w = bits.view(np.float32)                                                   # any bit pattern: NaN, inf, subnormal
    got, want = quantize(w, ggml_type.lower()), gguf_quantize(w, ggml_type).reshape(w.shape[0], -1)
    assert got.shape == (w.shape[0], 2 * w.shape[1])
    assert np.array_equal(got, want), f"{ggml_type}: {int((got != want).sum())} bytes differ"


def test_specials_and_the_safetensors_rounding():
    from lora_np.safetensors import float32_to_bf16

    w = SPECIALS.view(np.float32).reshape(1, -1)
    for ggml_type in ("BF16", "F16"):
        assert np.array_equal(quantize(w, ggml_type), gguf_quantize(w, ggml_type).reshape(1, -1)), ggml_type
    assert np.array_equal(quantize(w, "bf16").view(np.uint16), float32_to_bf16(w))


@pytest.mark.parametrize("ggml_type,dtype", [("BF16", None), ("F16", np.float16)])
def test_two_byte_values_round_trip_exactly(ggml_type, dtype):
    w = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    w = bf16_values(w) if dtype is None else w.astype(dtype).astype(np.float32)
    blocks = quantize(w, ggml_type)
    assert np.array_equal(kq.dequantize_rows(blocks, ggml_type).view(np.uint32), w.view(np.uint32))


def bf16_values(w):
    """w rounded to bfloat16 values (kept in float32)."""
    bits = quantize(w.reshape(-1, w.shape[-1]), "bf16").view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(w.shape)


def tiny_bf16_model(tie):
    """A small Llama whose weights are all bfloat16 values, as a bf16 checkpoint loads in float32."""
    from lora_np import manual_seed
    from lora_np.models import LlamaConfig, LlamaForCausalLM

    manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=tie, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    for p in model.parameters():
        p.data[...] = bf16_values(p.data * 0.2)
    return model


def lora_step(model, ids):
    """Loss and LoRA gradients (q, v, down; lora_B nonzero) of one forward + backward with labels."""
    from lora_np import LoraConfig, get_peft_model, manual_seed

    manual_seed(1)  # the same lora_A for both models
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    rng = np.random.default_rng(1)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data[...] = 0.1 * rng.standard_normal(p.shape)
    out = peft(ids, labels=ids)
    out.loss.backward()
    return out.loss.data, {n: p.grad for n, p in peft.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tie", [True, False])
def test_bf16_model_computes_the_float_model(backend, tie):
    """Quantized to bf16, a model of bf16 values keeps its weights bit for bit and computes the float model's
    logits (decode-sized and training-sized batches: both GEMM paths), loss and LoRA gradients: on the NumPy
    backend exactly (np.array_equal: the same matmuls of the same floats); on the C backend within float32
    summation order, |error| ≤ 1e-5 of the largest magnitude (its GEMMs may add in another order than the
    float model's)."""
    kernels.set_backend(backend)
    model, reference = quantize_model(tiny_bf16_model(tie), "bf16"), tiny_bf16_model(tie)
    quantized = dict(model.named_modules())
    for name, module in reference.named_modules():
        if isinstance(quantized[name], (QuantizedLinear, QuantizedEmbedding)):
            assert quantized[name].ggml_type == "BF16", name
            assert np.array_equal(quantized[name].weight.data, module.weight.data), name
    assert type(model.lm_head) is QuantizedLinear and type(model.model.embed_tokens) is QuantizedEmbedding

    def check(got, want, name):
        if backend == "numpy":
            assert np.array_equal(got, want), f"{name}: max abs diff {np.abs(got - want).max():.3e}"
        else:
            assert_close(got, want, 0, 1e-5 * np.abs(want).max(), name=name)

    rng = np.random.default_rng(2)
    for ids in (np.array([[3, 17, 96, 42]]), rng.integers(0, 97, (3, 20))):  # 4 rows; 60 rows
        check(model(ids).logits.data, reference(ids).logits.data, f"logits {ids.shape}")
    ids = rng.integers(0, 97, (2, 12))
    (loss_q, grads_q), (loss_f, grads_f) = lora_step(model, ids), lora_step(reference, ids)
    check(loss_q, loss_f, "loss")
    assert grads_q.keys() == grads_f.keys() and len(grads_q) == 12
    for name in grads_f:
        check(grads_q[name], grads_f[name], name)


def test_bf16_checkpoint_loads_into_bf16_blocks(tmp_path, capsys):
    """A checkpoint whose safetensors are bf16: load_model(quantize="bf16") keeps every weight's bits and computes
    the float32 model's logits; f16 keeps F16 blocks; the commands and TrainArgs take both types."""
    from lora_np import safetensors as sft
    from lora_np.cli import build_parser, main, train_args_from_namespace
    from lora_np.export import save_merged
    from lora_np.loaders import load_model
    from lora_np.train import TrainArgs

    folder = tmp_path / "hf"
    save_merged(tiny_bf16_model(tie=False), str(folder))
    path = str(folder / "model.safetensors")
    sft.save_file(sft.load_file(path), path, dtype="BF16")
    floats, kept = load_model(folder), load_model(folder, quantize="bf16")
    q_proj = kept.model.layers[0].self_attn.q_proj
    assert q_proj.ggml_type == "BF16" and q_proj.weight_blocks.nbytes == q_proj.weight.data.nbytes // 2
    assert np.array_equal(q_proj.weight.data, floats.model.layers[0].self_attn.q_proj.weight.data)
    ids = np.array([[3, 17, 96, 42, 5, 5, 61, 0, 1, 2]])
    want = floats(ids).logits.data
    assert_close(kept(ids).logits.data, want, 0, 1e-5 * np.abs(want).max(), name="logits")
    assert load_model(folder, quantize="F16").lm_head.ggml_type == "F16"
    for ggml_type in ("bf16", "f16"):
        assert main(["info", "--model", str(folder), "--quantize", ggml_type]) == 0
        ns = build_parser().parse_args(["train", "--data", "d.txt", "--out", "o", "--quantize", ggml_type])
        assert train_args_from_namespace(ns).quantize == ggml_type
        assert TrainArgs(data="d", out="o", quantize=ggml_type).quantize == ggml_type
    assert "parameters:" in capsys.readouterr().out
    assert main(["info", "--model", str(folder), "--quantize", "bf8"]) == 2
    assert "invalid choice: 'bf8' (choose from 'q8_0', 'q4_0', 'q4_k', 'bf16', 'f16')" in capsys.readouterr().err
    with pytest.raises(ValueError, match="quantize='q3_k' is not supported; supported: q8_0, q4_0, q4_k, bf16, f16"):
        load_model(folder, quantize="q3_k")
