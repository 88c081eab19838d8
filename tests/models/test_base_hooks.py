"""The hooks' defaults in models.base and what llama's block options refuse: a GGUFConfigReader given no values for a
config tensor names it, and a Granite config whose q/k/v biases differ from its o bias (transformers' Granite has
one attention_bias for all four) is refused by name rather than computed as something else."""
import pytest

from lora_np.gguf import GGUFError
from lora_np.models.base import GGUFConfigReader
from lora_np.models.granite import GraniteConfig

TINY = dict(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4)


def test_config_tensor_not_given_is_named():
    reader = GGUFConfigReader({"general.architecture": "llama"}, {}, "m.gguf")
    with pytest.raises(GGUFError, match=r"m\.gguf: .*'rope_freqs\.weight'"):
        reader.config_tensor("rope_freqs.weight")
    given = GGUFConfigReader({}, {}, "m.gguf", {"rope_freqs.weight": [1.0, 2.0]})
    assert given.config_tensor("rope_freqs.weight") == [1.0, 2.0]


@pytest.mark.parametrize("qkv_bias, attention_bias", [(True, False), (False, True)])
def test_granite_refuses_qkv_bias_apart_from_attention_bias(qkv_bias, attention_bias):
    with pytest.raises(NotImplementedError, match=r"GraniteConfig: qkv_bias = .* attention_bias"):
        GraniteConfig(**TINY, qkv_bias=qkv_bias, attention_bias=attention_bias)
    assert GraniteConfig(**TINY, attention_bias=attention_bias).qkv_bias is attention_bias
