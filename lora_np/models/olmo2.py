"""OLMo 2 (AllenAI): Llama's projections and gated MLP, with q_norm / k_norm (RMSNorm over the full projected
width, before the heads split and RoPE) and post-norms: each sublayer's output is normalized before it is added
to the residual, and no norm precedes a sublayer. transformers' Olmo2ForCausalLM, module names included."""
from dataclasses import dataclass, field
from typing import Optional

from ..nn import Module, RMSNorm
from ..tensor import DEFAULT_DTYPE
from .llama import Attention, GatedMLP, LlamaConfig, LlamaForCausalLM

__all__ = ["Olmo2Config", "Olmo2DecoderBlock", "Olmo2ForCausalLM"]


@dataclass
class Olmo2Config(LlamaConfig):
    """transformers' Olmo2Config (its defaults): LlamaConfig's fields and checks; attention_bias puts a bias on
    q, k, v and o."""
    vocab_size: int = 50304
    rms_norm_eps: float = 1e-5
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = 50279
    pad_token_id: Optional[int] = 1
    model_type: str = "olmo2"
    architectures: list = field(default_factory=lambda: ["Olmo2ForCausalLM"])

    @classmethod
    def from_config_json(cls, d):
        """config.json of model_type olmo2 (keys Olmo2 has no use for, such as mlp_bias, mean nothing to it)."""
        d = {k: v for k, v in d.items() if k not in ("mlp_bias", "qkv_bias", "pretraining_tp")}
        return super().from_config_json(d)

    def to_config_json(self):
        d = super().to_config_json()
        for key in ("qkv_bias", "mlp_bias", "pretraining_tp", "use_sliding_window", "sliding_window",
                    "max_window_layers", "layer_types"):
            d.pop(key, None)
        d.update(model_type="olmo2", architectures=["Olmo2ForCausalLM"])
        return d


class Olmo2DecoderBlock(Module):
    """Post-norm layer: x + post_attention_layernorm(attn(x)), then x + post_feedforward_layernorm(mlp(x))."""

    def __init__(self, config, layer_idx=0, dtype=DEFAULT_DTYPE):
        super().__init__()
        c = config
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                   bias=c.attention_bias, o_bias=c.attention_bias, layer_idx=layer_idx,
                                   dropout=c.attention_dropout, qk_norm_eps=c.rms_norm_eps, qk_norm_per_head=False,
                                   dtype=dtype)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_act, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)

    def forward(self, x, cos=None, sin=None, cache=None, attn_mask=None):
        x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, cache, attn_mask))
        return x + self.post_feedforward_layernorm(self.mlp(x))


class Olmo2ForCausalLM(LlamaForCausalLM):
    """Llama's embedding, RoPE, final norm and head around OLMo 2's blocks. GGUF: llama.cpp's olmo2 architecture
    (its converter does not permute q/k)."""
    block_class = Olmo2DecoderBlock
    gguf_block_names = {
        "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight", "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    }

    @classmethod
    def from_gguf_tensor(cls, gname, array, config):
        """llama.cpp's olmo2 converter writes q and k as transformers has them: nothing to undo."""
        return array
