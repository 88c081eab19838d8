"""SmolLM3: Llama's blocks where the layers that no_rope_layers marks 0 apply no RoPE (NoPE), every
no_rope_layer_interval-th layer by default, and sliding windows on the NoPE layers with use_sliding_window (or
where layer_types says)."""
from dataclasses import dataclass, field
from typing import Optional

from ..options import Int
from .base import LAYERS
from .llama import LlamaConfig, LlamaForCausalLM

__all__ = ["SmolLM3Config", "SmolLM3ForCausalLM"]


@dataclass
class SmolLM3Config(LlamaConfig):
    """transformers' SmolLM3Config (its defaults): LlamaConfig's fields and checks, no_rope_layers."""
    vocab_size: int = 128256
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: Optional[int] = 4
    rope_theta: float = 2000000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    no_rope_layers: Optional[list] = None  # per layer 1 (RoPE) or 0 (none)
    no_rope_layer_interval: int = 4
    bos_token_id: Optional[int] = 128000
    eos_token_id: Optional[int] = 128001
    pad_token_id: Optional[int] = 128004
    model_type: str = "smollm3"
    architectures: list = field(default_factory=lambda: ["SmolLM3ForCausalLM"])

    ARCHITECTURES = {"smollm3": "SmolLM3ForCausalLM"}

    def __post_init__(self):
        self.num_hidden_layers = LAYERS.check("num_hidden_layers", self.num_hidden_layers)
        self.no_rope_layer_interval = Int(min=1).check("no_rope_layer_interval", self.no_rope_layer_interval)
        if self.no_rope_layers is None:  # SmolLM3Config.__post_init__
            self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0)
                                   for i in range(self.num_hidden_layers)]
        if not isinstance(self.no_rope_layers, list) or len(self.no_rope_layers) != self.num_hidden_layers or \
                any(x not in (0, 1) or isinstance(x, bool) for x in self.no_rope_layers):
            raise ValueError(f"no_rope_layers must list {self.num_hidden_layers} of 0 or 1, got "
                             f"{self.no_rope_layers!r:.120}")
        super().__post_init__()

    def _default_layer_types(self):
        """SmolLM3Config's: sliding attention on the NoPE layers when use_sliding_window and sliding_window."""
        return ["sliding_attention" if self.use_sliding_window and self.sliding_window is not None and not rope
                else "full_attention" for rope in self.no_rope_layers]

    def rope_layers(self):
        return [bool(x) for x in self.no_rope_layers]

    @classmethod
    def from_config_json(cls, d):
        """config.json of model_type smollm3 (attention_bias covers q, k, v and o)."""
        return super().from_config_json({k: v for k, v in d.items() if k not in ("qkv_bias", "pretraining_tp",
                                                                                  "max_window_layers")})

    @classmethod
    def _gguf_fields(cls, gguf):
        """llama.cpp's smollm3 architecture: RoPE skipped on every 4th layer (n_no_rope_layer_step = 4, no key)."""
        return {**super()._gguf_fields(gguf), "no_rope_layer_interval": 4}

    def to_config_json(self):
        d = super().to_config_json()
        for key in ("qkv_bias", "pretraining_tp", "max_window_layers"):
            d.pop(key, None)
        return d


class SmolLM3ForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with SmolLM3's per-layer RoPE; llama.cpp's smollm3 architecture (q/k permuted as llama)."""
