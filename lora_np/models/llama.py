"""The Llama family (Llama 3.x, SmolLM2, TinyLlama; Mistral's sliding window; Qwen2's q/k/v biases and sliding
windows), and the blocks Qwen3 and SmolLM3 reuse: config, attention, gated MLP, decoder layer and the causal LM,
with transformers' module names (`model.layers.0.self_attn.q_proj.weight`, ...)."""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .. import functional as F
from ..nn import Embedding, Linear, Module, ModuleList, RMSNorm, activation, attend, check_dropout_p
from ..options import Int
from ..tensor import DEFAULT_DTYPE
from ..gguf import GGUFError, reverse_llama_permute
from .base import (BOOL, DROPOUT, EPS, LAYERS, POSITIONS, SIZE, THETA, CausalLM, Config, check_fields, padding_idx,
                   refuse)
from .rope import RopeTables, check_rope_scaling, llama3_freq_factors

__all__ = ["LlamaConfig", "Attention", "GatedMLP", "DecoderBlock", "LlamaModel", "LlamaForCausalLM"]


LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class LlamaConfig(Config):
    """Llama and the families that compute it with other defaults: model_type "llama"; "mistral" (every layer
    attends within sliding_window, when set); "qwen2" (q/k/v biases; with use_sliding_window, the layers from
    max_window_layers on, or those layer_types names "sliding_attention", attend within sliding_window)."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # rope_parameters besides rope_theta (rope.check_rope_scaling's form)
    rope_freq_factors: Optional[list] = None  # llama.cpp's rope_freqs tensor (Llama 3 GGUF): divides frequencies
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
    layer_types: Optional[list] = None  # per layer "full_attention" or "sliding_attention" (Qwen2, Qwen3, SmolLM3)
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = None  # embed_tokens' padding_idx (no gradient to that row)
    model_type: str = "llama"
    architectures: list = field(default_factory=lambda: ["LlamaForCausalLM"])

    qk_norm = False  # RMSNorm over head_dim on q and k before RoPE (Qwen3)
    gguf_config_tensors = ("rope_freqs.weight",)  # GGUF tensors that are config, not parameters (from_gguf's)
    WINDOWED = ("mistral", "qwen2", "qwen3", "smollm3")  # the model types with sliding-window attention
    # config.json's model_type -> transformers' causal-LM class, for the model types this class computes
    ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    GGUF_MODEL_TYPES = {"qwen2": "qwen2"}  # llama.cpp architecture -> model_type, where it is not the class default
    # llama.cpp's rope.scaling.type -> transformers' rope_type, and the GGUF keys each reads: (config key, GGUF key)
    GGUF_ROPE_SCALING = {
        "linear": ("linear", (("factor", "rope.scaling.factor"),)),
        "yarn": ("yarn", (("factor", "rope.scaling.factor"),
                          ("original_max_position_embeddings", "rope.scaling.original_context_length"),
                          ("attention_factor", "rope.scaling.yarn_attn_factor"),
                          ("beta_fast", "rope.scaling.yarn_beta_fast"), ("beta_slow", "rope.scaling.yarn_beta_slow"))),
    }

    def __post_init__(self):
        """Check every field that shapes the computation: ValueError naming a field of the wrong type or value,
        NotImplementedError naming one that asks for something this model does not compute."""
        where = type(self).__name__
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_fields(self, {"vocab_size": SIZE, "hidden_size": SIZE, "intermediate_size": SIZE,
                            "num_hidden_layers": LAYERS, "num_attention_heads": SIZE, "num_key_value_heads": SIZE,
                            "rms_norm_eps": EPS, "rope_theta": THETA, "max_position_embeddings": POSITIONS,
                            "tie_word_embeddings": BOOL, "attention_bias": BOOL, "qkv_bias": BOOL, "mlp_bias": BOOL,
                            "use_sliding_window": BOOL})
        derived = ""
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                                 f"{self.num_attention_heads} (and no head_dim is given)")
            self.head_dim = self.hidden_size // self.num_attention_heads
            derived = f" (hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads})"
        self.head_dim = SIZE.check("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim}{derived} must be even (RoPE rotates pairs)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        self.rope_scaling = check_rope_scaling(self.rope_scaling, self.head_dim, self.max_position_embeddings, where)
        if self.rope_scaling and "partial_rotary_factor" in self.rope_scaling:
            # transformers' Llama-family RoPE rotates every dim whatever this says (default), or fails (others)
            refuse(where, "partial_rotary_factor", self.rope_scaling["partial_rotary_factor"],
                   " (this family rotates all of head_dim)")
        if self.rope_freq_factors is not None and (not isinstance(self.rope_freq_factors, list) or
                                                   len(self.rope_freq_factors) != self.head_dim // 2):
            raise ValueError(f"rope_freq_factors must be a list of head_dim / 2 = {self.head_dim // 2} numbers")
        activation(self.hidden_act, f"{where}: hidden_act")
        self.attention_dropout = DROPOUT.check("attention_dropout", self.attention_dropout or 0.0)
        if self.pretraining_tp is not None:
            Int(min=1).check("pretraining_tp", self.pretraining_tp)
        self._check_layer_types(where)

    def _default_layer_types(self):
        """transformers' layer types of this model_type when config.json names none (None: all full attention)."""
        if self.model_type in ("qwen2", "qwen3"):  # Qwen2Config / Qwen3Config.__post_init__
            return ["sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                    else "full_attention" for i in range(self.num_hidden_layers)]
        return None

    def _check_layer_types(self, where):
        if self.model_type in ("qwen2", "qwen3"):
            if not self.use_sliding_window:
                self.sliding_window = None  # as transformers: the window exists only with use_sliding_window
            if self.max_window_layers is None:
                self.max_window_layers = 28  # Qwen2Config's and Qwen3Config's default
        if self.model_type not in ("qwen2", "qwen3", "smollm3"):
            for name in ("use_sliding_window", "max_window_layers", "layer_types"):
                if getattr(self, name) not in (None, False):
                    refuse(where, name, getattr(self, name), f" (model_type {self.model_type!r} has no such field)")
        if self.model_type not in self.WINDOWED and self.sliding_window is not None:
            refuse(where, "sliding_window", self.sliding_window, f" (model_type {self.model_type!r} has no sliding "
                   "window)")
        if self.sliding_window is not None:
            self.sliding_window = SIZE.check("sliding_window", self.sliding_window)
        if self.max_window_layers is not None:
            self.max_window_layers = Int(min=0).check("max_window_layers", self.max_window_layers)
        if self.layer_types is None:
            self.layer_types = self._default_layer_types()
        if self.layer_types is None:
            return
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers or \
                any(t not in LAYER_TYPES for t in self.layer_types):
            raise ValueError(f"layer_types must list {self.num_hidden_layers} of {LAYER_TYPES}, got "
                             f"{self.layer_types!r:.120}")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError(f"layer_types has sliding_attention layers but sliding_window is null"
                             f"{' (use_sliding_window is false)' if self.model_type != 'smollm3' else ''}")

    def sliding_windows(self):
        """The attention window of each layer (None: full causal attention); Mistral's applies to every layer."""
        types = self.layer_types or ["sliding_attention" if self.model_type == "mistral" else "full_attention"
                                     ] * self.num_hidden_layers
        return [self.sliding_window if t == "sliding_attention" else None for t in types]

    def rope_layers(self):
        """Whether each layer applies RoPE."""
        return [True] * self.num_hidden_layers

    @classmethod
    def from_config_json(cls, d):
        """model_type llama, mistral or qwen2 (Llama with q/k/v biases and transformers' sliding-window defaults);
        RoPE from transformers 5's rope_parameters or the older rope_theta / rope_scaling keys."""
        d = dict(d)
        # transformers' convert_rope_params_to_dict: rope_scaling wins over rope_parameters, whose rope_theta wins
        # over the top-level one (default: the family's), a top-level partial_rotary_factor goes in
        rope = d.pop("rope_scaling", None) or d.pop("rope_parameters", None) or {}
        d.pop("rope_parameters", None)
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be an object, got {rope!r}")
        rope = dict(rope)
        if "partial_rotary_factor" in d:
            rope.setdefault("partial_rotary_factor", d.pop("partial_rotary_factor"))
        d["rope_theta"] = rope.pop("rope_theta", d.get("rope_theta", cls.rope_theta))
        d["rope_scaling"] = rope or None
        model_type = d.get("model_type", "llama")
        if model_type in cls.ARCHITECTURES:
            d.setdefault("architectures", [cls.ARCHITECTURES[model_type]])
        if model_type == "qwen2":  # Qwen2Config's defaults; its attention has q/k/v biases and no other
            d.update(qkv_bias=True, attention_bias=False, mlp_bias=False)
            d.setdefault("sliding_window", 4096)
        elif model_type == "mistral":  # MistralConfig's defaults; no biases, layer_types ignored
            d.setdefault("sliding_window", 4096)
            for key in ("attention_bias", "mlp_bias", "use_sliding_window", "max_window_layers", "layer_types"):
                d.pop(key, None)
        elif model_type not in cls.WINDOWED:  # no sliding window: these keys, if a file has them, mean nothing
            for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
                d.pop(key, None)
        return cls.from_dict(d)

    @classmethod
    def from_gguf(cls, gguf):
        """The config of a GGUF file of llama.cpp's 'llama' architecture, or one that a subclass names (a
        base.GGUFConfigReader); Llama 3's rope_freqs tensor (head_dim/2,) divides the RoPE frequencies."""
        fields = {f: gguf.number(f, key) for f, key in (
            ("hidden_size", "embedding_length"), ("intermediate_size", "feed_forward_length"),
            ("num_hidden_layers", "block_count"), ("num_attention_heads", "attention.head_count"))}
        fields.update((f, gguf.number(f, key, None)) for f, key in (
            ("num_key_value_heads", "attention.head_count_kv"), ("head_dim", "attention.key_length")))
        fields.update(vocab_size=gguf.vocab_size(),
                      rms_norm_eps=gguf.number("rms_norm_eps", "attention.layer_norm_rms_epsilon", 1e-5),
                      rope_theta=gguf.number("rope_theta", "rope.freq_base", 10000.0),
                      max_position_embeddings=gguf.number("max_position_embeddings", "context_length", 2048))
        scaling = gguf.metadata.get(gguf.key("rope.scaling.type"))
        gguf.refuse_unless("rope.scaling.type", (None, "none", *cls.GGUF_ROPE_SCALING))
        if scaling in cls.GGUF_ROPE_SCALING:
            rope_type, keys = cls.GGUF_ROPE_SCALING[scaling]
            rope = {"rope_type": rope_type}
            rope.update((k, v) for k, v in ((k, gguf.number(k, key, None)) for k, key in keys) if v is not None)
            fields["rope_scaling"] = rope
        else:
            gguf.refuse_unless("rope.scaling.factor", (None, 0.0, 1.0))
        config = gguf.build(cls, **fields, **cls._gguf_fields(gguf),
                            tie_word_embeddings="output.weight" not in gguf.tensors,
                            **gguf.token_ids())
        # keys that ask for another computation than this model's (llama.cpp's names)
        for name, ok in (("rope.dimension_count", (None, config.head_dim)),
                         ("attention.value_length", (None, config.head_dim)),
                         ("rope.scaling.yarn_ext_factor", (None, 1.0)),
                         ("rope.scaling.yarn_log_multiplier", (None, 0.0)), ("rope.scaling.attn_factor", (None, 1.0)),
                         ("expert_count", (None, 0)), ("attention.sliding_window", (None, 0))):
            gguf.refuse_unless(name, ok)
        if "rope_freqs.weight" in gguf.tensors:
            factors = gguf.config_tensor("rope_freqs.weight")
            if factors.shape != (config.head_dim // 2,) or not np.all(np.isfinite(factors) & (factors > 0)):
                raise GGUFError(f"{gguf.source}: tensor 'rope_freqs.weight' must hold head_dim / 2 = "
                                f"{config.head_dim // 2} positive numbers, got shape {factors.shape}")
            config = dataclasses.replace(config, rope_freq_factors=factors.tolist())
        return config

    def to_gguf(self):
        """(this config as its GGUF file holds it, {`{arch}.`-less key: value}, {config tensor: float32 array}):
        what convert_hf_to_gguf.py writes for the RoPE scaling, which from_gguf reads back: llama3 as the
        rope_freqs tensor (rope.llama3_freq_factors; the config then holds them as rope_freq_factors, with no
        rope_scaling), linear and yarn as the rope.scaling.* keys of GGUF_ROPE_SCALING; any other rope_type as it is
        (the export refuses it, naming rope_scaling)."""
        config, keys, factors = self, {}, self.rope_freq_factors
        rope = self.rope_scaling or {}
        scaling = next((g for g, (t, _) in self.GGUF_ROPE_SCALING.items() if t == rope.get("rope_type")), None)
        if rope.get("rope_type") == "llama3" and factors is None:
            factors = llama3_freq_factors(self.rope_theta, rope, self.head_dim)
            config = dataclasses.replace(self, rope_scaling=None, rope_freq_factors=factors.tolist())
        elif scaling is not None and rope.get("factor") is not None:
            keys["rope.scaling.type"] = scaling
            keys.update((key, rope[k]) for k, key in self.GGUF_ROPE_SCALING[scaling][1] if k in rope)
        tensors = {} if factors is None else {"rope_freqs.weight": np.asarray(factors, np.float32)}  # (head_dim/2,)
        return config, keys, tensors

    @classmethod
    def _gguf_fields(cls, gguf):
        """The fields a GGUF architecture implies beyond the shared keys (llama: q/k/v biases if present)."""
        model_type = cls.GGUF_MODEL_TYPES.get(gguf.arch, cls.model_type)
        return {"qkv_bias": "blk.0.attn_q.bias" in gguf.tensors,
                "attention_bias": "blk.0.attn_output.bias" in gguf.tensors, "model_type": model_type,
                **({"architectures": [cls.ARCHITECTURES[model_type]]} if model_type in cls.ARCHITECTURES else {})}

    def to_config_json(self):
        """transformers' config.json of this model_type (model_type llama with q/k/v biases and no o_proj bias is
        written as qwen2); RoPE in rope_parameters."""
        if self.rope_freq_factors is not None:
            refuse(type(self).__name__, "rope_freq_factors", "...",
                   " in a config.json (llama.cpp's rope_freqs tensor has no transformers form)")
        d = super().to_config_json()
        model_type = self.model_type
        if model_type == "llama" and self.qkv_bias and not self.attention_bias:
            model_type = "qwen2"
        d.update(architectures=[self.ARCHITECTURES.get(model_type, self.architectures[0])], model_type=model_type)
        d.pop("qkv_bias")
        d.pop("rope_scaling", None)
        d.pop("rope_theta")
        d["rope_parameters"] = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        if model_type not in ("qwen2", "qwen3", "smollm3"):
            for key in ("use_sliding_window", "max_window_layers", "layer_types"):
                d.pop(key, None)
        if model_type == "mistral":
            d["sliding_window"] = self.sliding_window  # null is meaningful: MistralConfig's default is 4096
        return d


class Attention(Module):
    """Causal self-attention with separate q/k/v projections (Llama names), grouped-query
    heads and optional RoPE; `bias` adds q/k/v biases (Qwen2), `o_bias` an o_proj bias; `qk_norm_eps` (None:
    none) RMS-normalises q and k before RoPE (q_norm / k_norm): each head (`qk_norm_per_head`, Qwen3) or the whole
    projected width Hq·D and Hkv·D (OLMo 2), with `norm_class` (Gemma's (1 + w) norm); `scale` replaces
    1/√head_dim on the scores (Granite's attention_multiplier, Gemma's query_pre_attn_scalar⁻½); `sliding_window`
    W lets a query see the last W positions only; `softcap` c caps the scores at c·tanh(s/c) (Gemma 2's
    attn_logit_softcapping); `use_rope` False skips RoPE (SmolLM3's NoPE layers)."""

    def __init__(self, hidden_size, num_heads, num_kv_heads=None, head_dim=None, bias=False, o_bias=False,
                 layer_idx=0, dropout=0.0, qk_norm_eps=None, qk_norm_per_head=True, norm_class=RMSNorm, scale=None,
                 sliding_window=None, softcap=None, use_rope=True, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.attention_dropout = check_dropout_p("Attention", dropout)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"Attention: {num_heads} heads is not a multiple of {self.num_kv_heads} kv heads")
        self.layer_idx, self.sliding_window, self.use_rope, self.scale = layer_idx, sliding_window, use_rope, scale
        self.softcap = softcap
        self.q_proj = Linear(hidden_size, self.num_heads * self.head_dim, bias=bias, dtype=dtype)
        self.k_proj = Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias, dtype=dtype)
        self.v_proj = Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias, dtype=dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden_size, bias=o_bias, dtype=dtype)
        self.qk_norm = qk_norm_eps is not None
        self.qk_norm_per_head = qk_norm_per_head
        if self.qk_norm:
            q_width, k_width = (self.head_dim, self.head_dim) if qk_norm_per_head else \
                (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim)
            self.q_norm = norm_class(q_width, qk_norm_eps, dtype=dtype)
            self.k_norm = norm_class(k_width, qk_norm_eps, dtype=dtype)

    def forward(self, x, cos=None, sin=None, cache=None, attn_mask=None):
        B, T, _ = x.shape
        hd = self.head_dim
        q, k = self.q_proj(x), self.k_proj(x)                                            # (B, T, Hq·D), (B, T, Hkv·D)
        if self.qk_norm and not self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q = F.reshape(q, (B, T, self.num_heads, hd))                                     # (B, T, Hq, D)
        k = F.reshape(k, (B, T, self.num_kv_heads, hd))                                  # (B, T, Hkv, D)
        if self.qk_norm and self.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = F.transpose(q, 1, 2), F.transpose(k, 1, 2)                                 # (B, H, T, D)
        v = F.transpose(F.reshape(self.v_proj(x), (B, T, self.num_kv_heads, hd)), 1, 2)  # (B, Hkv, T, D)
        if not self.use_rope:
            cos = sin = None
        p = self.attention_dropout if self.training else 0.0
        y = attend(q, k, v, cache, self.layer_idx, cos, sin, attn_mask, scale=self.scale, dropout=p,
                   sliding_window=self.sliding_window, softcap=self.softcap)              # (B, Hq, T, D)
        return self.o_proj(F.reshape(F.transpose(y, 1, 2), (B, T, self.num_heads * hd)))


class GatedMLP(Module):
    """Llama's gated MLP: down_proj(act(gate_proj(x)) * up_proj(x)); act silu (SwiGLU) unless told otherwise."""

    def __init__(self, hidden_size, intermediate_size, bias=False, act="silu", dtype=DEFAULT_DTYPE):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias, dtype=dtype)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias, dtype=dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias, dtype=dtype)
        self.act, self.act_fn = act, activation(act)

    def forward(self, x):
        if self.act_fn is F.silu:  # the fused op
            return self.down_proj(F.silu_mul(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.mul(self.act_fn(self.gate_proj(x)), self.up_proj(x)))


class DecoderBlock(Module):
    """Pre-norm Llama decoder layer: x + attn(norm(x)), then x + mlp(norm(x)); `scale` is the attention's (None:
    1/√head_dim) and `residual_multiplier` r scales each sublayer's output as it joins the residual (Granite's):
    x + r·attn(norm(x)), then x + r·mlp(norm(x))."""

    def __init__(self, hidden_size, num_heads, num_kv_heads, intermediate_size, head_dim=None, eps=1e-6,
                 attention_bias=False, o_bias=False, mlp_bias=False, act="silu", layer_idx=0, attention_dropout=0.0,
                 qk_norm=False, sliding_window=None, use_rope=True, scale=None, residual_multiplier=1.0,
                 dtype=DEFAULT_DTYPE):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps, dtype=dtype)
        self.self_attn = Attention(hidden_size, num_heads, num_kv_heads, head_dim, bias=attention_bias,
                                   o_bias=o_bias, layer_idx=layer_idx, dropout=attention_dropout,
                                   qk_norm_eps=eps if qk_norm else None, scale=scale, sliding_window=sliding_window,
                                   use_rope=use_rope, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps, dtype=dtype)
        self.mlp = GatedMLP(hidden_size, intermediate_size, bias=mlp_bias, act=act, dtype=dtype)
        self.residual_multiplier = residual_multiplier

    @classmethod
    def from_config(cls, config, layer_idx=0, dtype=DEFAULT_DTYPE, **options):
        """Layer `layer_idx` of a LlamaConfig (its window and whether it applies RoPE); `options` (scale,
        residual_multiplier) as a subclass's config says."""
        c = config
        return cls(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size,
                   head_dim=c.head_dim, eps=c.rms_norm_eps, attention_bias=c.qkv_bias, o_bias=c.attention_bias,
                   mlp_bias=c.mlp_bias, act=c.hidden_act, layer_idx=layer_idx, attention_dropout=c.attention_dropout,
                   qk_norm=c.qk_norm, sliding_window=c.sliding_windows()[layer_idx],
                   use_rope=c.rope_layers()[layer_idx], dtype=dtype, **options)

    def forward(self, x, cos=None, sin=None, cache=None, attn_mask=None):
        x = x + self._residual(self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask))
        return x + self._residual(self.mlp(self.post_attention_layernorm(x)))

    def _residual(self, y):
        """A sublayer's output y as it joins the residual: r·y (y itself when r is 1, an op saved)."""
        return y if self.residual_multiplier == 1.0 else y * self.residual_multiplier


class LlamaModel(Module):
    """The embedding, the decoder layers (`block_class(config, layer_idx, dtype)` builds each; by default Llama's)
    and the final norm."""

    def __init__(self, config, dtype=DEFAULT_DTYPE, block_class=DecoderBlock.from_config):
        super().__init__()
        c = config
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, padding_idx(c), dtype=dtype)
        self.layers = ModuleList(block_class(c, i, dtype) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)


class LlamaForCausalLM(CausalLM):
    """Llama's embedding, RoPE tables, final norm and head around the decoder layers that `block_class` builds
    (called as block_class(config, layer_idx, dtype)): a family with Llama's skeleton and other layers (OLMo 2,
    Granite, Phi-3) names its layer class there."""
    block_class = DecoderBlock.from_config
    gguf_names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
    gguf_block_names = {
        "attn_norm.weight": "input_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias", "attn_output.bias": "self_attn.o_proj.bias",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }

    @classmethod
    def from_gguf_tensor(cls, gname, array, config):
        """llama.cpp's converter permutes the rows of q and k for its LlamaModel and subclasses (llama, smollm3,
        granite, ...), not for Qwen2Model and Qwen3Model: undone here."""
        if config.model_type in ("qwen2", "qwen3"):
            return array
        if gname.endswith(("attn_q.weight", "attn_q.bias")):
            return reverse_llama_permute(array, config.num_attention_heads)
        if gname.endswith(("attn_k.weight", "attn_k.bias")):
            return reverse_llama_permute(array, config.num_key_value_heads)
        return array

    def __init__(self, config, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype, self.block_class)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope = RopeTables(config.head_dim, config.rope_theta, config.rope_scaling,
                                config.max_position_embeddings, config.rope_freq_factors)

    def _blocks(self):
        return self.model.layers

    def _embed(self, ids, past):
        h = self.model.embed_tokens(ids)
        cos, sin = self._rope.get(past, ids.shape[1], h.dtype)
        return h, cos, sin

    def _final_norm(self, h):
        return self.model.norm(h)
