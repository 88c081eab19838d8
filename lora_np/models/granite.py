"""IBM Granite (3.x dense): Llama with four multipliers: embeddings times embedding_multiplier, each sublayer's
output times residual_multiplier before it joins the residual, attention_multiplier as the attention's scale
(instead of 1/√head_dim) and logits divided by logits_scaling. transformers' GraniteForCausalLM, module names
included."""
from dataclasses import dataclass, field

from ..options import Float
from ..tensor import DEFAULT_DTYPE
from .base import refuse
from .llama import DecoderBlock, LlamaConfig, LlamaForCausalLM

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
        if self.qkv_bias != self.attention_bias:
            refuse(type(self).__name__, "qkv_bias", self.qkv_bias,
                   f" with attention_bias {self.attention_bias} (Granite's attention_bias biases q, k, v and o alike)")
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


class GraniteDecoderBlock(DecoderBlock):
    """Llama's layer with Granite's attention scale (attention_multiplier) and scaled residual branches
    (residual_multiplier r): x + r·attn(norm(x)), then x + r·mlp(norm(x))."""

    @classmethod
    def from_config(cls, config, layer_idx=0, dtype=DEFAULT_DTYPE):
        return super().from_config(config, layer_idx, dtype, scale=config.attention_multiplier,
                                   residual_multiplier=config.residual_multiplier)


class GraniteForCausalLM(LlamaForCausalLM):
    """Llama's RoPE and head around Granite's blocks; GGUF names and q/k permutation as llama's."""
    block_class = GraniteDecoderBlock.from_config

    def _embed(self, ids, past):
        h, cos, sin = super()._embed(ids, past)
        return h * self.config.embedding_multiplier, cos, sin

    def _final_norm(self, h):
        """norm(h) / logits_scaling: the head is linear without a bias (an adapter on it too), so
        lm_head(norm(h) / s) is transformers' lm_head(norm(h)) / s, and the chunked training loss gets it too."""
        return self.model.norm(h) / self.config.logits_scaling
