"""The GPT-2 family: config, attention (fused c_attn), MLP, block and the LM-head model, with transformers'
module names (`transformer.h.0.attn.c_attn.weight`, ...)."""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .. import functional as F
from ..nn import Conv1D, Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, activation, attend, check_dropout_p
from ..tensor import DEFAULT_DTYPE
from .base import BOOL, DROPOUT, EPS, LAYERS, POSITIONS, SIZE, CausalLM, Config, check_fields, refuse

__all__ = ["GPT2Config", "GPT2Attention", "GELUMLP", "GPT2Block", "GPT2Model", "GPT2LMHeadModel"]


@dataclass
class GPT2Config(Config):
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: Optional[int] = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False  # the same function, computed in float32 (for float16 training)
    resid_pdrop: float = 0.0  # dropout in training, as transformers: residual branches, embeddings, attention
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    add_cross_attention: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: Optional[int] = 50256
    eos_token_id: Optional[int] = 50256
    model_type: str = "gpt2"
    architectures: list = field(default_factory=lambda: ["GPT2LMHeadModel"])

    layers_field = "n_layer"

    def __post_init__(self):
        """As LlamaConfig's: ValueError for a field of the wrong type or value, NotImplementedError for one
        asking for something else."""
        check_fields(self, {"vocab_size": SIZE, "n_positions": POSITIONS, "n_embd": SIZE, "n_layer": LAYERS,
                            "n_head": SIZE, "layer_norm_epsilon": EPS, "scale_attn_weights": BOOL,
                            "scale_attn_by_inverse_layer_idx": BOOL, "reorder_and_upcast_attn": BOOL,
                            "add_cross_attention": BOOL, "tie_word_embeddings": BOOL, "resid_pdrop": DROPOUT,
                            "embd_pdrop": DROPOUT, "attn_pdrop": DROPOUT})
        if self.n_inner is not None:
            self.n_inner = SIZE.check("n_inner", self.n_inner)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        activation(self.activation_function, "GPT2Config: activation_function")
        if self.add_cross_attention:
            refuse("GPT2Config", "add_cross_attention", True, " (decoder-only models)")

    @classmethod
    def from_config_json(cls, d):
        """transformers' dropout defaults, for a config.json that leaves them out."""
        return cls.from_dict({"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, **d})

    def to_config_json(self):
        return {**super().to_config_json(), "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_ctx": self.n_positions, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


class GPT2Attention(Module):
    """GPT-2's attention: fused c_attn (Conv1D, [in, 3·hidden]) then c_proj. Scores are scaled by
    1/sqrt(head_dim) (1 without scale_weights), then by 1/(layer_idx + 1) with scale_by_inverse_layer_idx."""

    def __init__(self, hidden_size, num_heads, layer_idx=0, dropout=0.0, scale_weights=True,
                 scale_by_inverse_layer_idx=False, attn_dropout=0.0, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.attn_dropout = check_dropout_p("GPT2Attention", attn_dropout)
        self.num_heads, self.head_dim, self.layer_idx = num_heads, hidden_size // num_heads, layer_idx
        self.scale = (self.head_dim ** -0.5 if scale_weights else 1.0) / (layer_idx + 1 if scale_by_inverse_layer_idx else 1)
        self.c_attn = Conv1D(3 * hidden_size, hidden_size, dtype=dtype)
        self.c_proj = Conv1D(hidden_size, hidden_size, dtype=dtype)
        self.resid_dropout = Dropout(dropout)

    def forward(self, x, cos=None, sin=None, cache=None, attn_mask=None):
        B, T, C = x.shape
        qkv = F.reshape(self.c_attn(x), (B, T, 3, self.num_heads, self.head_dim))
        qkv = F.permute(qkv, (2, 0, 3, 1, 4))                                            # (3, B, H, T, D)
        q, k, v = qkv[0], qkv[1], qkv[2]
        p = self.attn_dropout if self.training else 0.0
        y = attend(q, k, v, cache, self.layer_idx, cos, sin, attn_mask, self.scale, p)   # (B, H, T, D)
        return self.resid_dropout(self.c_proj(F.reshape(F.transpose(y, 1, 2), (B, T, C))))


class GELUMLP(Module):
    """GPT-2's MLP: c_proj(act(c_fc(x))), act gelu_new unless told otherwise."""

    def __init__(self, hidden_size, intermediate_size, act="gelu_new", dropout=0.0, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.c_fc = Conv1D(intermediate_size, hidden_size, dtype=dtype)
        self.c_proj = Conv1D(hidden_size, intermediate_size, dtype=dtype)
        self.dropout = Dropout(dropout)
        self.act, self.act_fn = act, activation(act)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act_fn(self.c_fc(x))))


class GPT2Block(Module):
    """Pre-norm GPT-2 block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, hidden_size, num_heads, intermediate_size=None, eps=1e-5, act="gelu_new",
                 layer_idx=0, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, resid_dropout=0.0,
                 attn_dropout=0.0, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.ln_1 = LayerNorm(hidden_size, eps, dtype=dtype)
        self.attn = GPT2Attention(hidden_size, num_heads, layer_idx=layer_idx, dropout=resid_dropout,
                                  scale_weights=scale_attn_weights, attn_dropout=attn_dropout,
                                  scale_by_inverse_layer_idx=scale_attn_by_inverse_layer_idx, dtype=dtype)
        self.ln_2 = LayerNorm(hidden_size, eps, dtype=dtype)
        self.mlp = GELUMLP(hidden_size, intermediate_size or 4 * hidden_size, act, dropout=resid_dropout, dtype=dtype)

    def forward(self, x, cos=None, sin=None, cache=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(Module):
    def __init__(self, config, dtype=DEFAULT_DTYPE):
        super().__init__()
        c = config
        self.wte = Embedding(c.vocab_size, c.n_embd, dtype=dtype)
        self.wpe = Embedding(c.n_positions, c.n_embd, dtype=dtype)
        self.h = ModuleList(GPT2Block(c.n_embd, c.n_head, c.n_inner or 4 * c.n_embd, c.layer_norm_epsilon,
                                      c.activation_function, layer_idx=i, scale_attn_weights=c.scale_attn_weights,
                                      scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
                                      resid_dropout=c.resid_pdrop, attn_dropout=c.attn_pdrop, dtype=dtype)
                            for i in range(c.n_layer))
        self.drop = Dropout(c.embd_pdrop)
        self.ln_f = LayerNorm(c.n_embd, c.layer_norm_epsilon, dtype=dtype)


class GPT2LMHeadModel(CausalLM):
    def __init__(self, config, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config, dtype)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    @classmethod
    def checkpoint_name(cls, key):
        name = super().checkpoint_name(key)
        if name is not None and not name.startswith(("transformer.", "lm_head.")):
            return "transformer." + name  # GPT2Model checkpoints (e.g. "gpt2") omit the prefix
        return name

    def _blocks(self):
        return self.transformer.h

    def _embed(self, ids, past):
        T = ids.shape[1]
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence of {past + T} tokens is longer than n_positions={self.config.n_positions}")
        pos = np.arange(past, past + T)
        return self.transformer.drop(self.transformer.wte(ids) + self.transformer.wpe(pos)), None, None

    def _final_norm(self, h):
        return self.transformer.ln_f(h)
