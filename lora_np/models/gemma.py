"""Gemma 2 and Gemma 3 (text), and Gemma 1: configs, the (1 + w) RMSNorm, attention with Gemma 3's per-head q/k
norms, sliding windows and soft-capping, the decoder layer (four norms; Gemma 1's two) and the causal LM, with
transformers' module names (`model.layers.0.self_attn.q_norm.weight`, `model.layers.0.pre_feedforward_layernorm`).

As transformers computes them (modeling_gemma2.py, modeling_gemma3.py): the embeddings are scaled by √hidden_size
cast to the model's dtype; every norm is x / sqrt(mean(x²) + eps) · (1 + w); each layer is
x + post_attention_norm(attn(input_norm(x))), then x + post_feedforward_norm(mlp(pre_feedforward_norm(x)));
attention scores are scaled by query_pre_attn_scalar⁻½; layer_types makes a layer 'sliding_attention' (keys of the
last sliding_window positions) or 'full_attention'. Gemma 2 caps attention scores (attn_logit_softcapping) and
logits (final_logit_softcapping) with c·tanh(x/c); Gemma 3 normalizes q and k per head before RoPE and rotates
its sliding layers with their own RoPE base (rope_local_base_freq), its full layers with rope_theta and, if any,
rope_scaling. Gemma 3's attention never applies attn_logit_softcapping (transformers passes it to no attention
function), so neither does this one. Gemma 1 is Gemma 2 without windows, soft-caps and the norms after each
sublayer, scaled by head_dim⁻½.
"""
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .. import functional as F
from ..gguf import GGUFError
from ..nn import Embedding, Linear, Module, ModuleList, Parameter, _full, activation
from ..options import Float, Int
from ..tensor import DEFAULT_DTYPE
from .base import (BOOL, DROPOUT, EPS, LAYERS, POSITIONS, SIZE, THETA, CausalLM, Config, check_fields, padding_idx,
                   refuse)
from .llama import Attention, GatedMLP, LlamaForCausalLM
from .rope import RopeTables, check_rope_scaling

__all__ = ["GemmaConfig", "Gemma2Config", "Gemma3TextConfig", "GemmaRMSNorm", "GemmaDecoderLayer",
           "GemmaModel", "GemmaForCausalLM", "Gemma2ForCausalLM"]

SLIDING, FULL = "sliding_attention", "full_attention"
SOFTCAP = Float(min=0, min_open=True, none_ok=True)
SCALAR = Float(min=0, min_open=True)
WINDOW = Int(min=1, max=2**26, none_ok=True)


def default_layer_types(n_layers, period):
    """transformers' default layer_types: layer i slides unless (i + 1) is a multiple of `period`."""
    return [SLIDING if (i + 1) % period else FULL for i in range(n_layers)]


def _object(d, key):
    """d[key] when it is an object or null (None): ValueError naming the key otherwise."""
    value = d.get(key)
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"{key} must be an object or null, got {value!r}")
    return value


@dataclass
class Gemma2Config(Config):
    """transformers' Gemma2Config. `rope_parameters` holds, once checked, one RoPE parameter dict per layer type
    ({'sliding_attention': {...}, 'full_attention': {...}}, rope_theta in each); Gemma 2 rotates every layer alike
    and its config.json has one dict."""
    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = 4
    head_dim: Optional[int] = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope_parameters: Optional[dict] = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    query_pre_attn_scalar: float = 256
    sliding_window: Optional[int] = 4096
    layer_types: Optional[list] = None
    final_logit_softcapping: Optional[float] = 30.0
    attn_logit_softcapping: Optional[float] = 50.0
    use_bidirectional_attention: Optional[bool] = None
    tie_word_embeddings: bool = True
    pad_token_id: Optional[int] = 0
    bos_token_id: Optional[int] = 2
    eos_token_id: Optional[int] = 1  # or a list of ids
    model_type: str = "gemma2"
    architectures: list = field(default_factory=lambda: ["Gemma2ForCausalLM"])

    post_norms = True  # Gemma 2's four norms per layer (Gemma 1: two)
    qk_norm = False  # Gemma 3's per-head q_norm / k_norm
    attention_softcap = True  # whether attention applies attn_logit_softcapping
    default_theta = {SLIDING: 10000.0, FULL: 10000.0}
    default_period = 2  # the default layer_types (transformers' and llama.cpp's): 1 full layer in every 2
    # llama.cpp's reading of its GGUF (llama-model.cpp): the window when the key is absent, the soft-caps'
    # defaults, and the layer count of the 27B model, which it scales by (hidden / heads)^-1/2
    gguf_window = 4096
    gguf_softcaps = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
    gguf_27b_layers = 46

    @property
    def rope_theta(self):
        """The full layers' RoPE base (Gemma 2: every layer's)."""
        return self.rope_parameters[FULL]["rope_theta"]

    @property
    def rope_local_base_freq(self):
        """The sliding layers' RoPE base."""
        return self.rope_parameters[SLIDING]["rope_theta"]

    def __post_init__(self):
        """Check every field that shapes the computation: ValueError naming a field of the wrong type or value,
        NotImplementedError naming one that asks for something this model does not compute."""
        where = type(self).__name__
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_fields(self, {"vocab_size": SIZE, "hidden_size": SIZE, "intermediate_size": SIZE,
                            "num_hidden_layers": LAYERS, "num_attention_heads": SIZE, "num_key_value_heads": SIZE,
                            "rms_norm_eps": EPS, "max_position_embeddings": POSITIONS, "tie_word_embeddings": BOOL,
                            "attention_bias": BOOL, "sliding_window": WINDOW,
                            "final_logit_softcapping": SOFTCAP, "attn_logit_softcapping": SOFTCAP})
        SCALAR.check("query_pre_attn_scalar", self.query_pre_attn_scalar)  # kept as given: transformers wants an int
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.head_dim = SIZE.check("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        activation(self.hidden_activation, f"{where}: hidden_activation")
        self.attention_dropout = DROPOUT.check("attention_dropout", self.attention_dropout or 0.0)
        if self.use_bidirectional_attention:
            refuse(where, "use_bidirectional_attention", self.use_bidirectional_attention, " (causal attention only)")
        if self.layer_types is None:
            self.layer_types = default_layer_types(self.num_hidden_layers, self.default_period)
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers or \
                any(t not in (SLIDING, FULL) for t in self.layer_types):
            raise ValueError(f"layer_types must list {self.num_hidden_layers} (num_hidden_layers) entries, each "
                             f"{SLIDING!r} or {FULL!r}, got {self.layer_types!r}")
        if SLIDING in self.layer_types and self.sliding_window is None:
            raise ValueError(f"layer_types has {SLIDING!r} layers but sliding_window is null")
        self.rope_parameters = self._rope_by_layer_type(self.rope_parameters)
        for layer_type in (SLIDING, FULL):
            self.rope(layer_type)

    def rope(self, layer_type):
        """(rope_theta, rope.check_rope_scaling dict) of a layer type's RoPE: ValueError / NotImplementedError
        naming the field."""
        params = self.rope_parameters[layer_type]
        where = f"{type(self).__name__}: rope_parameters[{layer_type!r}]"
        theta = THETA.check(f"{where} rope_theta", params.get("rope_theta"))
        return theta, check_rope_scaling(params, self.head_dim, self.max_position_embeddings, where)

    def _rope_by_layer_type(self, rope):
        """{layer type: RoPE parameters}: Gemma 2's one dict for both types (or the two equal dicts written)."""
        rope = {"rope_type": "default"} if rope is None else rope
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be an object, got {rope!r}")
        if SLIDING in rope or FULL in rope:
            if rope.get(SLIDING) != rope.get(FULL):
                raise NotImplementedError(f"{type(self).__name__}: rope_parameters per layer type {rope!r} is not "
                                          "supported (Gemma 2 rotates every layer alike)")
            rope = rope[FULL]
        rope = {"rope_theta": self.default_theta[FULL], **rope}
        return {SLIDING: rope, FULL: dict(rope)}

    @classmethod
    def from_config_json(cls, d):
        """transformers 5's rope_parameters, or the older rope_scaling and rope_theta keys (as transformers'
        convert_rope_params_to_dict: rope_scaling's legacy 'type' names the type)."""
        d = dict(d)
        rope = dict(_object(d, "rope_parameters") or _object(d, "rope_scaling") or {})
        if SLIDING not in rope and FULL not in rope:
            rope.setdefault("rope_theta", d.get("rope_theta", cls.default_theta[FULL]))
        d["rope_parameters"] = rope
        return cls.from_dict(d)

    def to_config_json(self):
        """transformers 5's config.json (rope_parameters; layer_types written out)."""
        d = super().to_config_json()
        d["rope_parameters"] = dict(self.rope_parameters[FULL])
        return d

    @classmethod
    def from_gguf(cls, gguf):
        """The config of a GGUF file of llama.cpp's gemma / gemma2 / gemma3 architecture (a GGUFConfigReader), read
        as llama.cpp reads it: sliding layers by its pattern, the RoPE bases (and Gemma 3's linear scaling of the
        full layers), the soft-caps, and query_pre_attn_scalar from the model size (llama.cpp has no key for it:
        (hidden / heads) for the 27B models, else head_dim)."""
        fields = {f: gguf.number(f, key) for f, key in (
            ("hidden_size", "embedding_length"), ("intermediate_size", "feed_forward_length"),
            ("num_hidden_layers", "block_count"), ("num_attention_heads", "attention.head_count"))}
        fields.update((f, gguf.number(f, key, None)) for f, key in (
            ("num_key_value_heads", "attention.head_count_kv"), ("head_dim", "attention.key_length")))
        fields.update((f, gguf.number(f, f, default)) for f, default in cls.gguf_softcaps.items())
        fields.update(vocab_size=gguf.vocab_size(),
                      rms_norm_eps=gguf.number("rms_norm_eps", "attention.layer_norm_rms_epsilon", 1e-6),
                      max_position_embeddings=gguf.number("max_position_embeddings", "context_length", 8192),
                      rope_parameters=cls._gguf_rope(gguf))
        n, hidden, heads = fields["num_hidden_layers"], fields["hidden_size"], fields["num_attention_heads"]
        if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:  # else build names the bad key
            fields["query_pre_attn_scalar"] = hidden // heads if n == cls.gguf_27b_layers or \
                fields["head_dim"] is None else fields["head_dim"]
        window = gguf.number("sliding_window", "attention.sliding_window", cls.gguf_window)
        fields["sliding_window"] = window or None
        if isinstance(n, int) and n > 0:
            fields["layer_types"] = cls._gguf_layer_types(gguf, n) if window else [FULL] * n
        config = gguf.build(cls, **fields, tie_word_embeddings="output.weight" not in gguf.tensors,
                            **gguf.token_ids())
        for name, ok in (("rope.dimension_count", (None, config.head_dim)),
                         ("attention.value_length", (None, config.head_dim)), ("expert_count", (None, 0))):
            gguf.refuse_unless(name, ok)
        return config

    @classmethod
    def _gguf_layer_types(cls, gguf, n_layers):
        """llama.cpp's set_swa_pattern(period): layer i slides iff period is 0 or i % period < period - 1;
        '{arch}.attention.sliding_window_pattern' holds the period or one flag per layer (true: sliding)."""
        key = gguf.key("attention.sliding_window_pattern")
        pattern = gguf.metadata.get(key, cls.default_period)
        if isinstance(pattern, list):
            if len(pattern) != n_layers or not all(isinstance(p, (bool, int)) for p in pattern):
                raise GGUFError(f"{gguf.source}: metadata key {key!r} must hold {n_layers} flags, got "
                                f"{pattern!r:.80}")
            return [SLIDING if p else FULL for p in pattern]
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 0:
            raise GGUFError(f"{gguf.source}: metadata key {key!r} is {pattern!r:.80}, expected a period >= 0 or "
                            "one flag per layer")
        return [SLIDING if pattern == 0 or i % pattern < pattern - 1 else FULL for i in range(n_layers)]

    @classmethod
    def _gguf_rope(cls, gguf):
        """Gemma 2: one RoPE base for every layer, unscaled."""
        gguf.refuse_unless("rope.scaling.type", (None, "none"))
        theta = gguf.number("rope_theta", "rope.freq_base", 10000.0)
        gguf.refuse_unless("rope.freq_base_swa", (None, theta))
        return {"rope_type": "default", "rope_theta": theta}


@dataclass
class Gemma3TextConfig(Gemma2Config):
    """transformers' Gemma3TextConfig: Gemma 2's fields with Gemma 3's defaults. Its older config.json form says
    rope_theta (full layers), rope_local_base_freq (sliding layers), rope_scaling (full layers) and
    sliding_window_pattern (the period of the default layer_types)."""
    vocab_size: int = 262208
    max_position_embeddings: int = 131072
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None  # read, never applied (as transformers' Gemma 3)
    use_bidirectional_attention: Optional[bool] = False
    model_type: str = "gemma3_text"
    architectures: list = field(default_factory=lambda: ["Gemma3ForCausalLM"])

    qk_norm = True
    attention_softcap = False
    default_theta = {SLIDING: 10000.0, FULL: 1000000.0}
    default_period = 6
    gguf_window = None  # absent: no sliding layers
    gguf_softcaps = {"final_logit_softcapping": None}
    gguf_27b_layers = 62

    def _rope_by_layer_type(self, rope):
        """transformers' convert_rope_params_to_dict: one dict per layer type, rope_theta defaulted per type."""
        rope = {} if rope is None else rope
        if not isinstance(rope, dict) or any(not isinstance(rope.get(t) or {}, dict) for t in (SLIDING, FULL)):
            raise ValueError(f"rope_parameters must map {SLIDING!r} and {FULL!r} to objects, got {rope!r}")
        return {t: {"rope_type": "default", "rope_theta": self.default_theta[t], **(rope.get(t) or {})}
                for t in (SLIDING, FULL)}

    @classmethod
    def from_config_json(cls, d):
        """As transformers' Gemma3TextConfig.convert_rope_params_to_dict: rope_scaling updates the full layers'
        parameters (its legacy 'type' key names no type there), rope_theta and rope_local_base_freq are the
        full and sliding layers' bases where the parameters give none."""
        d = dict(d)
        rope = _object(d, "rope_parameters") or {}
        if any(not isinstance(rope.get(t) or {}, dict) for t in (SLIDING, FULL)):
            raise ValueError(f"rope_parameters must map {SLIDING!r} and {FULL!r} to objects, got {rope!r}")
        rope = {t: dict(rope.get(t) or {"rope_type": "default"}) for t in (SLIDING, FULL)}
        rope[FULL].update(_object(d, "rope_scaling") or {})
        rope[FULL].setdefault("rope_theta", d.get("rope_theta", cls.default_theta[FULL]))
        rope[SLIDING].setdefault("rope_theta", d.get("rope_local_base_freq", cls.default_theta[SLIDING]))
        d["rope_parameters"] = rope
        if d.get("layer_types") is None and isinstance(d.get("num_hidden_layers"), int):
            period = Int(min=1).check("sliding_window_pattern", d.get("sliding_window_pattern", cls.default_period))
            d["layer_types"] = default_layer_types(d["num_hidden_layers"], period)
        return cls.from_dict(d)

    def to_config_json(self):
        d = Config.to_config_json(self)
        d["rope_parameters"] = {t: dict(p) for t, p in self.rope_parameters.items()}
        return d

    @classmethod
    def _gguf_rope(cls, gguf):
        """Sliding layers: rope.freq_base_swa (10000 if absent), unscaled; full layers: rope.freq_base, scaled
        when rope.scaling.type is linear."""
        gguf.refuse_unless("rope.scaling.type", (None, "none", "linear"))
        full = {"rope_type": "default", "rope_theta": gguf.number("rope_theta", "rope.freq_base", 10000.0)}
        if gguf.metadata.get(gguf.key("rope.scaling.type")) == "linear":
            full.update(rope_type="linear", factor=gguf.number("rope_parameters", "rope.scaling.factor"))
        return {SLIDING: {"rope_type": "default",
                          "rope_theta": gguf.number("rope_local_base_freq", "rope.freq_base_swa", 10000.0)},
                FULL: full}


@dataclass
class GemmaConfig(Gemma2Config):
    """transformers' GemmaConfig (Gemma 1): Gemma 2 without sliding windows, soft-caps and post-norms: two norms
    per layer, attention scaled by head_dim^-1/2 (query_pre_attn_scalar is head_dim). Its config.json names the
    activation hidden_act, 'gelu' meaning the tanh form (as transformers reads it)."""
    vocab_size: int = 256000
    hidden_size: int = 3072
    intermediate_size: int = 24576
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: Optional[int] = 16
    query_pre_attn_scalar: Optional[float] = None  # head_dim
    sliding_window: Optional[int] = None
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    model_type: str = "gemma"
    architectures: list = field(default_factory=lambda: ["GemmaForCausalLM"])

    post_norms = False
    default_period = 1  # every layer full attention
    gguf_window = None
    gguf_softcaps = {}
    gguf_27b_layers = None

    def __post_init__(self):
        """Gemma 2's checks, and none of Gemma 2's fields that Gemma 1 has not (ValueError naming one set)."""
        if self.query_pre_attn_scalar is None and isinstance(self.num_attention_heads, int) and \
                self.num_attention_heads > 0:  # else Gemma 2's checks name the field
            self.query_pre_attn_scalar = self.head_dim or self.hidden_size // self.num_attention_heads
        super().__post_init__()
        for name, ok in (("query_pre_attn_scalar", self.head_dim), ("sliding_window", None),
                         ("final_logit_softcapping", None), ("attn_logit_softcapping", None)):
            if getattr(self, name) != ok:
                raise ValueError(f"GemmaConfig: {name} is {getattr(self, name)!r}, but Gemma 1 has no such field "
                                 f"(it computes {name} = {ok!r})")

    @classmethod
    def from_config_json(cls, d):
        """Gemma 1's config.json: hidden_act; Gemma 2's keys, if a file has them, mean nothing to transformers."""
        d = {k: v for k, v in d.items() if k not in ("hidden_activation", "query_pre_attn_scalar", "sliding_window",
                                                     "layer_types", "final_logit_softcapping",
                                                     "attn_logit_softcapping")}
        act = d.pop("hidden_act", "gelu_pytorch_tanh")
        d["hidden_activation"] = "gelu_pytorch_tanh" if act == "gelu" else act
        return super().from_config_json(d)

    def to_config_json(self):
        d = super().to_config_json()
        for key in ("query_pre_attn_scalar", "sliding_window", "layer_types", "final_logit_softcapping",
                    "attn_logit_softcapping"):
            d.pop(key, None)
        d["hidden_act"] = d.pop("hidden_activation")
        return d


class GemmaRMSNorm(Module):
    """transformers' Gemma2RMSNorm / Gemma3RMSNorm: x / sqrt(mean(x²) + eps) · (1 + weight), weight starting at 0."""

    def __init__(self, dim, eps=1e-6, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(_full(dim, 0, dtype))

    def forward(self, x):
        return F.rms_norm(x, (self.weight.shape[0],), F.add(self.weight, 1.0), self.eps)


class GemmaDecoderLayer(Module):
    """Gemma 1's layer: x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)); Gemma 2 / 3's
    (post_norms) normalize each sublayer's output too: x + post_attention_layernorm(attn(input_layernorm(x))),
    then x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x))). RoPE tables of the layer's type."""

    def __init__(self, config, layer_idx, dtype=DEFAULT_DTYPE):
        super().__init__()
        c = config
        self.layer_type, self.post_norms = c.layer_types[layer_idx], c.post_norms
        # Llama's attention with Gemma 3's per-head q_norm / k_norm (Gemma's norm) before RoPE, scores scaled by
        # query_pre_attn_scalar⁻½ and soft-capped by Gemma 2's attn_logit_softcapping
        self.self_attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                   bias=c.attention_bias, o_bias=c.attention_bias, layer_idx=layer_idx,
                                   dropout=c.attention_dropout, qk_norm_eps=c.rms_norm_eps if c.qk_norm else None,
                                   norm_class=GemmaRMSNorm, scale=c.query_pre_attn_scalar ** -0.5,
                                   sliding_window=c.sliding_window if c.layer_types[layer_idx] == SLIDING else None,
                                   softcap=c.attn_logit_softcapping if c.attention_softcap else None, dtype=dtype)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, act=c.hidden_activation, dtype=dtype)
        self.input_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        if self.post_norms:
            self.pre_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
            self.post_feedforward_layernorm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)

    def forward(self, x, cos=None, sin=None, cache=None, attn_mask=None):
        cos, sin = cos[self.layer_type], sin[self.layer_type]
        if not self.post_norms:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(Module):
    def __init__(self, config, dtype=DEFAULT_DTYPE):
        super().__init__()
        c = config
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, padding_idx(c), dtype=dtype)
        self.layers = ModuleList(GemmaDecoderLayer(c, i, dtype=dtype) for i in range(c.num_hidden_layers))
        self.norm = GemmaRMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)


class Gemma2ForCausalLM(CausalLM):
    """transformers' Gemma2ForCausalLM and Gemma3ForCausalLM (the config says which); logits soft-capped by
    final_logit_softcapping. llama.cpp's converter stores every norm weight as 1 + w: undone in from_gguf_tensor."""
    gguf_names = LlamaForCausalLM.gguf_names
    gguf_block_names = {  # Llama's (no biases), q/k norms, and the four norms of a block
        **{g: name for g, name in LlamaForCausalLM.gguf_block_names.items() if not g.endswith(".bias")},
        "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
        "post_attention_norm.weight": "post_attention_layernorm.weight",
        "ffn_norm.weight": "pre_feedforward_layernorm.weight",
        "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    }

    @classmethod
    def from_gguf_tensor(cls, gname, array, config):
        """convert_hf_to_gguf's GemmaModel / Gemma2Model / Gemma3Model add 1 to every '*norm.weight': subtracted."""
        return array - np.asarray(1, array.dtype) if gname.endswith("norm.weight") else array

    def __init__(self, config, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.config = config
        self.model = GemmaModel(config, dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcapping = config.final_logit_softcapping
        self.embed_scale = math.sqrt(config.hidden_size)
        self._rope = {t: RopeTables(config.head_dim, *config.rope(t), config.max_position_embeddings)
                      for t in set(config.layer_types)}

    def _blocks(self):
        return self.model.layers

    def _embed(self, ids, past):
        h = self.model.embed_tokens(ids)                                                  # (B, T, C)
        h = F.mul(h, np.asarray(self.embed_scale, h.dtype))  # √C in the model's dtype, as transformers
        tables = {t: rope.get(past, ids.shape[1], h.dtype) for t, rope in self._rope.items()}
        return h, {t: cs[0] for t, cs in tables.items()}, {t: cs[1] for t, cs in tables.items()}

    def _final_norm(self, h):
        return self.model.norm(h)


class GemmaForCausalLM(Gemma2ForCausalLM):
    """transformers' GemmaForCausalLM (Gemma 1), whose pre-MLP norm is post_attention_layernorm (llama.cpp's
    ffn_norm)."""
    gguf_block_names = {**{k: v for k, v in Gemma2ForCausalLM.gguf_block_names.items()
                           if k not in ("post_attention_norm.weight", "post_ffw_norm.weight")},
                        "ffn_norm.weight": "post_attention_layernorm.weight"}
