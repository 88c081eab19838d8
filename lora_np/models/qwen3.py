"""Qwen3: Llama's blocks with RMSNorm over head_dim on each head of q and k before RoPE (q_norm / k_norm),
an explicit head_dim, biases on q, k, v and o with attention_bias, and Qwen2's sliding windows (use_sliding_window,
max_window_layers, layer_types)."""
from dataclasses import dataclass, field
from typing import Optional

from .llama import LlamaConfig, LlamaForCausalLM

__all__ = ["Qwen3Config", "Qwen3ForCausalLM"]


@dataclass
class Qwen3Config(LlamaConfig):
    """transformers' Qwen3Config (its defaults): LlamaConfig's fields and checks, q_norm / k_norm."""
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 32
    head_dim: Optional[int] = 128
    max_position_embeddings: int = 32768
    sliding_window: Optional[int] = 4096
    max_window_layers: Optional[int] = 28
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    model_type: str = "qwen3"
    architectures: list = field(default_factory=lambda: ["Qwen3ForCausalLM"])

    qk_norm = True
    ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM"}

    @classmethod
    def from_config_json(cls, d):
        """config.json of model_type qwen3 (its MLP has no bias, its attention_bias covers q, k, v and o)."""
        return super().from_config_json({k: v for k, v in d.items() if k not in ("mlp_bias", "qkv_bias",
                                                                                  "pretraining_tp")})

    def to_config_json(self):
        d = super().to_config_json()
        for key in ("qkv_bias", "mlp_bias", "pretraining_tp"):
            d.pop(key, None)
        return d


class Qwen3ForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose attention has q_norm / k_norm; llama.cpp's qwen3 architecture (q/k not permuted)."""
    gguf_block_names = {**LlamaForCausalLM.gguf_block_names, "attn_q_norm.weight": "self_attn.q_norm.weight",
                        "attn_k_norm.weight": "self_attn.k_norm.weight"}
