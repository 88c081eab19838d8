"""Causal language models with Hugging Face's module names: Llama (SmolLM2, TinyLlama,
Qwen2-style q/k/v biases) and GPT-2.

`LlamaForCausalLM(config)` has parameters named exactly as transformers' checkpoint
keys (`model.layers.0.self_attn.q_proj.weight`, ...), and GPT-2 likewise
(`transformer.h.0.attn.c_attn.weight`), so state dicts and PEFT adapter keys line up.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import functional as F
from .nn import DecoderBlock, Dropout, Embedding, GPT2Block, LayerNorm, Linear, Module, ModuleList, RMSNorm, activation
from .options import Float, Int
from .tensor import DEFAULT_DTYPE, Tensor

__all__ = ["LlamaConfig", "GPT2Config", "LlamaForCausalLM", "GPT2LMHeadModel", "CausalLMOutput", "config_from_dict"]


def _from_dict(cls, d):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# Sane bounds for what a config may say; the loaders also check every size against the tensors present.
_SIZE = Int(min=1, max=2**24)
_LAYERS = Int(min=1, max=2**14)
_POSITIONS = Int(min=1, max=2**26)
_EPS = Float(min=0, min_open=True, max=1)
_THETA = Float(min=0, min_open=True)
_DROPOUT = Float(min=0, max=1, max_open=True)
_BOOL = (True, False)


def _check(config, rules):
    """Check and convert the fields named in `rules` {field: Int/Float rule or _BOOL}: ValueError naming one."""
    for name, rule in rules.items():
        value = getattr(config, name)
        if rule is _BOOL:
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        else:
            setattr(config, name, rule.check(name, value))


def _refuse(where, field, value, why=""):
    raise NotImplementedError(f"{where}: {field} = {value!r} is not supported{why}")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and o (llama's meaning)
    qkv_bias: Optional[bool] = None  # biases on q, k, v only (Qwen2); None: as attention_bias
    mlp_bias: bool = False
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    pretraining_tp: Optional[int] = 1  # transformers' tensor-parallel split of matmuls: the same function
    use_sliding_window: bool = False  # Qwen2: sliding-window attention on layers >= max_window_layers
    sliding_window: Optional[int] = None
    max_window_layers: Optional[int] = None
    layer_types: Optional[list] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    model_type: str = "llama"
    architectures: list = field(default_factory=lambda: ["LlamaForCausalLM"])

    def __post_init__(self):
        """Check every field that shapes the computation: ValueError naming a field of the wrong type or value,
        NotImplementedError naming one that asks for something this model does not compute."""
        where = "LlamaConfig"
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _check(self, {"vocab_size": _SIZE, "hidden_size": _SIZE, "intermediate_size": _SIZE,
                      "num_hidden_layers": _LAYERS, "num_attention_heads": _SIZE, "num_key_value_heads": _SIZE,
                      "rms_norm_eps": _EPS, "rope_theta": _THETA, "max_position_embeddings": _POSITIONS,
                      "tie_word_embeddings": _BOOL, "attention_bias": _BOOL, "qkv_bias": _BOOL, "mlp_bias": _BOOL,
                      "use_sliding_window": _BOOL})
        derived = ""
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                                 f"{self.num_attention_heads} (and no head_dim is given)")
            self.head_dim = self.hidden_size // self.num_attention_heads
            derived = f" (hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads})"
        self.head_dim = _SIZE.check("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim}{derived} must be even (RoPE rotates pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be an object or null, got {self.rope_scaling!r}")
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) not in (None, "default"):
            _refuse(where, "rope_scaling", self.rope_scaling, " (only the default RoPE)")
        if self.rope_scaling and self.rope_scaling.get("partial_rotary_factor", 1.0) != 1.0:
            _refuse(where, "partial_rotary_factor", self.rope_scaling["partial_rotary_factor"], " (RoPE on all dims only)")
        activation(self.hidden_act, f"{where}: hidden_act")
        self.attention_dropout = _DROPOUT.check("attention_dropout", self.attention_dropout or 0.0)
        if self.pretraining_tp is not None:
            Int(min=1).check("pretraining_tp", self.pretraining_tp)
        if self.use_sliding_window and self.sliding_window is not None and \
                (self.max_window_layers is None or self.max_window_layers < self.num_hidden_layers):
            _refuse(where, "use_sliding_window", True, f" (sliding_window {self.sliding_window}, max_window_layers "
                    f"{self.max_window_layers}: only full attention)")
        if self.layer_types is not None and any(t != "full_attention" for t in self.layer_types):
            _refuse(where, "layer_types", self.layer_types, " (only 'full_attention')")

    @classmethod
    def from_dict(cls, d):
        return _from_dict(cls, d)

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclass
class GPT2Config:
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

    def __post_init__(self):
        """As LlamaConfig's: ValueError for a field of the wrong type or value, NotImplementedError for one
        asking for something else."""
        _check(self, {"vocab_size": _SIZE, "n_positions": _POSITIONS, "n_embd": _SIZE, "n_layer": _LAYERS,
                      "n_head": _SIZE, "layer_norm_epsilon": _EPS, "scale_attn_weights": _BOOL,
                      "scale_attn_by_inverse_layer_idx": _BOOL, "reorder_and_upcast_attn": _BOOL,
                      "add_cross_attention": _BOOL, "tie_word_embeddings": _BOOL, "resid_pdrop": _DROPOUT,
                      "embd_pdrop": _DROPOUT, "attn_pdrop": _DROPOUT})
        if self.n_inner is not None:
            self.n_inner = _SIZE.check("n_inner", self.n_inner)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        activation(self.activation_function, "GPT2Config: activation_function")
        if self.add_cross_attention:
            _refuse("GPT2Config", "add_cross_attention", True, " (decoder-only models)")

    @classmethod
    def from_dict(cls, d):
        return _from_dict(cls, d)

    def to_dict(self):
        return dataclasses.asdict(self)


def config_from_dict(d):
    """A config object from a Hugging Face config.json dict (llama, mistral-free llama-likes, qwen2, gpt2)."""
    model_type = d.get("model_type")
    if model_type == "gpt2":  # transformers' dropout defaults, for a config.json that leaves them out
        return GPT2Config.from_dict({"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, **d})
    if model_type in ("llama", "qwen2"):
        d = dict(d)
        rope = d.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be an object, got {rope!r}")
        if "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if rope:
            d["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" or \
                rope.get("partial_rotary_factor", 1.0) != 1.0 else None
        if model_type == "qwen2":
            d.update(qkv_bias=True, attention_bias=False)
            d.setdefault("use_sliding_window", False)
            d.setdefault("sliding_window", 4096)
            d.setdefault("max_window_layers", 28)
        else:  # llama has no sliding window: these keys, if a file has them, mean nothing to transformers
            for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
                d.pop(key, None)
        return LlamaConfig.from_dict(d)
    raise ValueError(f"unknown architecture model_type={model_type!r} (supported: llama, qwen2, gpt2)")


@dataclass
class CausalLMOutput:
    logits: Tensor
    loss: Optional[Tensor] = None


class _RopeTables:
    """cos/sin for positions [0, n), grown on demand, one copy per dtype."""

    def __init__(self, head_dim, base):
        self.head_dim, self.base, self.tables = head_dim, base, {}

    def get(self, start, length, dtype):
        cos, sin = self.tables.get(np.dtype(dtype), (None, None))
        if cos is None or cos.shape[0] < start + length:
            n = max(start + length, 2 * (cos.shape[0] if cos is not None else 0), 256)
            cos, sin = F.rope_cos_sin(np.arange(n), self.head_dim, self.base, dtype)
            self.tables[np.dtype(dtype)] = cos, sin
        return cos[start:start + length], sin[start:start + length]                  # (T, D)


class _CausalLM(Module):
    """What both families share: input ids -> logits (and the loss when labels are given)."""

    def _blocks(self):
        raise NotImplementedError  # pragma: no cover

    def _embed(self, ids, past):
        raise NotImplementedError  # pragma: no cover

    def forward(self, input_ids, labels=None, cache=None, attn_mask=None, logits_to_keep=0, return_logits=True):
        """logits (B, T, V) for input_ids (B, T), and the causal-LM loss when labels (B, T)
        are given. With labels and return_logits=False the loss is computed chunk by chunk
        without the (B, T, V) logits (training). `cache` (nn.KVCache) holds earlier positions; `logits_to_keep` > 0
        computes logits for the last that many positions only (generation)."""
        ids = np.asarray(input_ids.data if isinstance(input_ids, Tensor) else input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {ids.shape}")
        past = cache.seq_len() if cache is not None else 0
        h, cos, sin = self._embed(ids, past)                                          # (B, T, C)
        for block in self._blocks():
            h = block(h, cos, sin, cache, attn_mask)
        if labels is not None and not return_logits and type(self.lm_head) is Linear:  # a plain (un-adapted) head
            h = self._final_norm(h)
            return CausalLMOutput(None, F.causal_lm_head_loss(h, self.lm_head.weight, labels))
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(self._final_norm(h))                                   # (B, T', V)
        loss = F.causal_lm_loss(logits, labels) if labels is not None else None
        return CausalLMOutput(logits, loss)

    @property
    def dtype(self):
        return next(iter(self.parameters())).dtype

    def generate(self, *args, **kwargs):
        from .generation import generate

        return generate(self, *args, **kwargs)


class LlamaModel(Module):
    def __init__(self, config, dtype=DEFAULT_DTYPE):
        super().__init__()
        c = config
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, dtype=dtype)
        self.layers = ModuleList(
            DecoderBlock(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
                         head_dim=c.head_dim, eps=c.rms_norm_eps, attention_bias=c.qkv_bias,
                         o_bias=c.attention_bias, mlp_bias=c.mlp_bias, act=c.hidden_act, layer_idx=i,
                         attention_dropout=c.attention_dropout, dtype=dtype)
            for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(_CausalLM):
    def __init__(self, config, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope = _RopeTables(config.head_dim, config.rope_theta)

    def _blocks(self):
        return self.model.layers

    def _embed(self, ids, past):
        h = self.model.embed_tokens(ids)
        cos, sin = self._rope.get(past, ids.shape[1], h.dtype)
        return h, cos, sin

    def _final_norm(self, h):
        return self.model.norm(h)


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


class GPT2LMHeadModel(_CausalLM):
    def __init__(self, config, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config, dtype)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

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
