"""The hooks the families share: generation drops the KV cache and recomputes every position when the model's
cache_invalid(past, total) says so (Phi-3's longrope), and the GGUF tensors a family's config declares in
gguf_config_tensors (Llama 3's rope_freqs, Phi-3's longrope factors) reach its from_gguf as values, read by the
loader's `load`, and are asked for by name when no `load` is given."""
from types import SimpleNamespace

import numpy as np
import pytest

from lora_np.gguf import GGUFError
from lora_np.loaders import gguf_config
from lora_np.models import LlamaConfig, LlamaForCausalLM

TINY = dict(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


class _Recording(LlamaForCausalLM):
    """A Llama whose cache_invalid is true once, at `invalid_at` cached positions; it records (cached positions,
    new positions) of every forward."""

    def cache_invalid(self, past, total):
        return past == self.invalid_at

    def forward(self, input_ids, labels=None, cache=None, **kwargs):
        self.seen.append((cache.seq_len(), np.shape(input_ids)[-1]))
        return super().forward(input_ids, labels, cache, **kwargs)


def test_generation_recomputes_every_position_when_the_cache_is_invalid():
    """Dropping the cache and recomputing the whole sequence gives the tokens that cached decoding gives."""
    config = LlamaConfig(**TINY)
    plain = LlamaForCausalLM(config, dtype=np.float64)
    model = _Recording(config, dtype=np.float64)
    model.load_state_dict(plain.state_dict())
    model.invalid_at, model.seen = 7, []
    prompt = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 5))
    out = model.generate(prompt, max_new_tokens=6)
    np.testing.assert_array_equal(out, plain.generate(prompt, max_new_tokens=6))
    assert model.seen == [(0, 5), (5, 1), (6, 1), (0, 8), (8, 1), (9, 1)]


def _tensors(n_layers, **extra):
    """GGUF tensor infos: one per layer (the layer count check) and `extra` {name: shape}."""
    infos = {f"blk.{i}.attn_norm.weight": SimpleNamespace(shape=(16,)) for i in range(n_layers)}
    infos.update((name, SimpleNamespace(shape=shape)) for name, shape in extra.items())
    return infos


LLAMA = {"general.architecture": "llama", "llama.embedding_length": 16, "llama.feed_forward_length": 24,
         "llama.block_count": 2, "llama.attention.head_count": 4, "llama.vocab_size": 37}
PHI3 = {"general.architecture": "phi3", "phi3.embedding_length": 16, "phi3.feed_forward_length": 24,
        "phi3.block_count": 2, "phi3.attention.head_count": 4, "phi3.vocab_size": 37, "phi3.context_length": 64,
        "phi3.rope.scaling.original_context_length": 16}


def test_llama_rope_freqs_tensor_reaches_the_config():
    factors = np.array([1.0, 2.5])  # head_dim 4: two frequencies
    tensors = _tensors(2, **{"rope_freqs.weight": (2,)})
    loaded = []

    def load(name, dtype):
        loaded.append((name, np.dtype(dtype)))
        return factors.astype(dtype)

    config = gguf_config(LLAMA, tensors, "m.gguf", load)
    assert config.rope_freq_factors == factors.tolist()
    assert loaded == [("rope_freqs.weight", np.dtype(np.float64))]
    with pytest.raises(GGUFError, match=r"m\.gguf: .*'rope_freqs\.weight'"):
        gguf_config(LLAMA, tensors, "m.gguf")
    assert gguf_config(LLAMA, _tensors(2), "m.gguf").rope_freq_factors is None


def test_phi3_longrope_factor_tensors_reach_the_config():
    values = {"rope_factors_long.weight": np.array([1.0, 2.0]), "rope_factors_short.weight": np.array([1.0, 1.5])}
    tensors = _tensors(2, **{name: (2,) for name in values})
    config = gguf_config(PHI3, tensors, "m.gguf", lambda name, dtype: values[name].astype(dtype))
    assert config.rope_scaling["rope_type"] == "longrope"
    assert config.rope_scaling["long_factor"] == values["rope_factors_long.weight"].tolist()
    assert config.rope_scaling["short_factor"] == values["rope_factors_short.weight"].tolist()
    with pytest.raises(GGUFError, match=r"m\.gguf: .*'rope_factors_long\.weight'"):
        gguf_config(PHI3, tensors, "m.gguf")
