"""load_model(folder, quantize=t) quantizes each weight as it is read from the checkpoint.

Properties:
- the model equals quantize_model(load_model(folder), t): the same blocks bit for bit in every quantized layer
  (ggml quantizes rows independently, so quantizing a slice of rows at a time changes nothing), the same float
  layers, the same logits — for Llama (tied and untied head, float32 and bf16 safetensors, sharded), GPT-2's
  Conv1D layers (stored [in, out]), a Q4_K request falling back to Q5_0 where rows are not 256-blocks;
- the float model is never held whole: the peak of NumPy's allocations while loading (tracemalloc) stays
  below half the float32 model's bytes, where loading it float takes all of them;
- a tied copy that differs from its embedding is still refused.
"""
import os
import tracemalloc

import numpy as np
import pytest

from conftest import crosscheck, tiny_llama
from lora_np.loaders import CheckpointError, load_model
from lora_np.quant import QuantizedEmbedding, QuantizedLinear, quantize_model
from lora_np.safetensors import load_file, save_file

IDS = np.array([[3, 17, 96, 42, 5, 5, 61, 0, 1, 2]])


def same_model(got, want):
    """Every module of `got` is of the class of `want`'s, quantized ones with the same type and blocks, float
    parameters equal; and the logits are equal."""
    want_modules = dict(want.named_modules())
    quantized = 0
    for name, m in got.named_modules():
        assert type(m) is type(want_modules[name]), name
        if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
            w = want_modules[name]
            assert m.ggml_type == w.ggml_type, name
            assert np.array_equal(m.weight_blocks, w.weight_blocks), f"{name}: the blocks differ"
            quantized += 1
    got_params, want_params = dict(got.named_parameters()), dict(want.named_parameters())
    assert got_params.keys() == want_params.keys()
    for name, p in got_params.items():
        assert np.array_equal(p.data, want_params[name].data), name
    assert np.array_equal(got(IDS).logits.data, want(IDS).logits.data)
    return quantized


@pytest.mark.parametrize("ggml_type", ["q8_0", "q4_0", "q4_k", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "llama-tied", "llama-bf16-sharded", "gpt2"])
def test_quantized_while_loading_equals_quantize_model(tmp_path, arch, ggml_type):
    transformers = crosscheck("transformers")
    if arch == "gpt2":
        import torch

        torch.manual_seed(0)
        cfg = transformers.GPT2Config(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                      eos_token_id=0)
        ref = transformers.GPT2LMHeadModel(cfg)
    else:
        ref = tiny_llama(transformers, tie=arch == "llama-tied")
    if arch == "llama-bf16-sharded":
        import torch

        ref = ref.to(torch.bfloat16)
    ref.save_pretrained(tmp_path, max_shard_size="20KB" if "sharded" in arch else "1GB")
    got = load_model(tmp_path, quantize=ggml_type)
    want = quantize_model(load_model(tmp_path), ggml_type)
    assert same_model(got, want) > 0
    kinds = {m.ggml_type for m in got.modules() if isinstance(m, QuantizedLinear)}
    if ggml_type == "q4_k":  # rows of 64 (or 32) are no 256-blocks: llama.cpp's fallback
        assert "Q5_0" in kinds


def test_the_float_model_is_never_held_whole(tmp_path):
    from lora_np import manual_seed
    from lora_np.export import save_merged
    from lora_np.models import LlamaConfig, LlamaForCausalLM

    manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=12,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    save_merged(LlamaForCausalLM(config), str(tmp_path))
    float_bytes = sum(a.nbytes for a in load_file(os.path.join(tmp_path, "model.safetensors")).values())

    def peak(**kw):
        tracemalloc.start()
        try:
            load_model(tmp_path, **kw)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak() >= float_bytes  # the measure sees a float load
    assert peak(quantize="q8_0") < 0.5 * float_bytes


def test_a_differing_tied_copy_is_refused(tmp_path):
    transformers = crosscheck("transformers")
    tiny_llama(transformers, tie=True).save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_model(tmp_path, quantize="q8_0")
