"""IBM Granite (3.x dense): Llama with four multipliers: embeddings times embedding_multiplier, each sublayer's
output times residual_multiplier before it joins the residual, attention_multiplier as the attention's scale
(instead of 1/√head_dim) and logits divided by logits_scaling. transformers' GraniteForCausalLM, module names
included."""
from dataclasses import dataclass, field

from ..nn import Module, RMSNorm
from ..options import Float
from ..tensor import DEFAULT_DTYPE
from .llama import Attention, GatedMLP, LlamaConfig, LlamaForCausalLM

__all__ = ["GraniteConfig", "GraniteDecoderBlock", "GraniteForCausalLM"]

MULTIPLIER = Float()
MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")


@dataclass
class GraniteConfig(LlamaConfig):
    """transformers' GraniteConfig: LlamaConfig's fields and checks (attention_bias on q, k, v and o; mlp_bias)
    and the four multipliers."""
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    logits_scaling: float = 1.0
    model_type: str = "granite"
    architectures: list = field(default_factory=lambda: ["GraniteForCausalLM"])

    def __post_init__(self):
        super().__post_init__()
        for name in MULTIPLIERS:
            setattr(self, name, MULTIPLIER.check(name, getattr(self, name)))
        if self.logits_scaling == 0:
            raise ValueError("logits_scaling must not be 0 (the logits are divided by it)")

    @classmethod
    def from_config_json(cls, d):
        """config.json of model_type granite (q/k/v biases follow attention_bias, as in transformers)."""
        return super().from_config_json({k: v for k, v in d.items() if k not in ("qkv_bias", "pretraining_tp")})

    @classmethod
    def from_gguf(cls, gguf):
        """llama.cpp's granite architecture: the llama keys (q/k permuted the same way) and the multipliers as
        granite.embedding_scale, residual_scale, attention.scale and logit_scale. llama.cpp's converter writes each
        only when nonzero, and llama.cpp reads an absent one as 1 (attention.scale: 1/√head_dim)."""
        config = super().from_gguf(gguf)
        return gguf.build(cls, **{**config.to_dict(), **{f: gguf.number(f, key, default) for f, key, default in (
            ("embedding_multiplier", "embedding_scale", 1.0), ("residual_multiplier", "residual_scale", 1.0),
            ("attention_multiplier", "attention.scale", config.head_dim ** -0.5),
            ("logits_scaling", "logit_scale", 1.0))}})

    def to_config_json(self):
        d = super().to_config_json()
        for key in ("qkv_bias", "pretraining_tp", "use_sliding_window", "sliding_window", "max_window_layers",
                    "layer_types"):
            d.pop(key, None)
        d.update(model_type="granite", architectures=["GraniteForCausalLM"])
        return d


class GraniteDecoderBlock(Module):
    """Pre-norm layer with scaled residual branches: x + r·attn(norm(x)), then x + r·mlp(norm(x))."""

    def __init__(self, config, layer_idx=0, dtype=DEFAULT_DTYPE):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                   bias=c.attention_bias, o_bias=c.attention_bias, layer_idx=layer_idx,
                                   dropout=c.attention_dropout, scale=c.attention_multiplier, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, act=c.hidden_act, dtype=dtype)
        self.residual_multiplier = c.residual_multiplier

    def forward(self, x, cos=None, sin=None, cache=None, attn_mask=None):
        r = self.residual_multiplier
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask) * r
        return x + self.mlp(self.post_attention_layernorm(x)) * r


class GraniteForCausalLM(LlamaForCausalLM):
    """Llama's RoPE and head around Granite's blocks; GGUF names and q/k permutation as llama's."""
    block_class = GraniteDecoderBlock

    def _embed(self, ids, past):
        h, cos, sin = super()._embed(ids, past)
        return h * self.config.embedding_multiplier, cos, sin

    def _final_norm(self, h):
        """norm(h) / logits_scaling: the head is linear without a bias (an adapter on it too), so
        lm_head(norm(h) / s) is transformers' lm_head(norm(h)) / s, and the chunked training loss gets it too."""
        return self.model.norm(h) / self.config.logits_scaling
