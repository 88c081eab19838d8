"""Phi-3 and Phi-4-mini (Microsoft): Llama's layer with q, k and v fused in one `qkv_proj` and the MLP's gate and
up in one `gate_up_proj` (kept whole, so that PEFT's adapter keys line up: a LoRA on qkv_proj has (Hq + 2·Hkv)·D
rows of lora_B), partial rotary (Phi-4-mini: partial_rotary_factor 0.75), longrope (short / long factors chosen by
the sequence length against original_max_position_embeddings), an optional sliding window on every layer
(Phi-3-mini), and residual dropout (resid_pdrop) in training. transformers' Phi3ForCausalLM, module names
included. transformers 5 applies no embedding dropout: embd_pdrop is read and checked, and changes nothing."""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .. import functional as F
from ..gguf import GGUFError
from ..nn import Dropout, Linear, Module, RMSNorm, activation, attend, check_dropout_p
from ..tensor import DEFAULT_DTYPE
from .base import BOOL, DROPOUT, EPS, LAYERS, POSITIONS, SIZE, THETA, Config, check_fields
from .llama import LlamaForCausalLM
from .rope import check_rope_scaling, inv_freq, rotary_dim

__all__ = ["Phi3Config", "Phi3Attention", "Phi3MLP", "Phi3DecoderBlock", "Phi3ForCausalLM"]


@dataclass
class Phi3Config(Config):
    """transformers' Phi3Config (its defaults); RoPE as rope.check_rope_scaling keeps it (rope_theta apart)."""
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0  # unused by transformers 5's Phi3Model
    attention_dropout: float = 0.0
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    original_max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # rope_parameters besides rope_theta (None: default RoPE on all dims)
    sliding_window: Optional[int] = None  # every layer attends to the last sliding_window positions
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 32000
    pad_token_id: Optional[int] = 32000
    model_type: str = "phi3"
    architectures: list = field(default_factory=lambda: ["Phi3ForCausalLM"])

    rope_freq_factors = None  # no Llama 3 frequency factors (LlamaForCausalLM's RoPE tables read this)
    gguf_config_tensors = ("rope_factors_long.weight", "rope_factors_short.weight")  # config, not parameters

    def __post_init__(self):
        """Check every field that shapes the computation: ValueError naming a field of the wrong type or value."""
        where = "Phi3Config"
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_fields(self, {"vocab_size": SIZE, "hidden_size": SIZE, "intermediate_size": SIZE,
                            "num_hidden_layers": LAYERS, "num_attention_heads": SIZE, "num_key_value_heads": SIZE,
                            "rms_norm_eps": EPS, "rope_theta": THETA, "max_position_embeddings": POSITIONS,
                            "original_max_position_embeddings": POSITIONS, "tie_word_embeddings": BOOL,
                            "resid_pdrop": DROPOUT, "embd_pdrop": DROPOUT, "attention_dropout": DROPOUT})
        if self.head_dim is None:  # transformers: getattr(config, "head_dim", hidden_size // num_attention_heads)
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                                 f"{self.num_attention_heads} (and no head_dim is given)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        self.head_dim = SIZE.check("head_dim", self.head_dim)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        rope = self.rope_scaling
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "longrope":
            # transformers' standardize_rope_params: Phi-3's top-level original_max_position_embeddings wins
            rope = {**rope, "original_max_position_embeddings": self.original_max_position_embeddings}
        self.rope_scaling = check_rope_scaling(rope, self.head_dim, self.max_position_embeddings, where)
        if self.rope_scaling and self.rope_scaling["rope_type"] not in ("default", "longrope"):
            raise ValueError(f"{where}: rope_parameters rope_type must be 'default' or 'longrope' (Phi-3), got "
                             f"{self.rope_scaling['rope_type']!r}")
        if self.rotary_dims % 2:
            raise ValueError(f"{where}: RoPE rotates {self.rotary_dims} dims of head_dim {self.head_dim}, an odd "
                             "number")
        activation(self.hidden_act, f"{where}: hidden_act")
        if self.sliding_window is not None:
            self.sliding_window = SIZE.check("sliding_window", self.sliding_window)

    @property
    def rotary_dims(self):
        """How many leading dims of each head RoPE rotates (llama.cpp's rope.dimension_count)."""
        return rotary_dim(self.rope_scaling, self.head_dim)

    @property
    def rope_attention_factor(self):
        """longrope's attention factor when the config gives one (llama.cpp's rope.scaling.attn_factor)."""
        return (self.rope_scaling or {}).get("attention_factor")

    @classmethod
    def from_config_json(cls, d):
        """config.json of model_type phi3: transformers 5's rope_parameters or the older rope_scaling (which wins,
        as in Phi3Config) with rope_theta / partial_rotary_factor beside it; the legacy types "su" and "yarn" are
        longrope."""
        d = dict(d)
        scaling, parameters = d.pop("rope_scaling", None), d.pop("rope_parameters", None)
        rope = scaling or parameters or {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be an object, got {rope!r}")
        rope = dict(rope)
        rope.setdefault("rope_theta", d.pop("rope_theta", 10000.0))
        rope.setdefault("partial_rotary_factor", d.pop("partial_rotary_factor", 1.0))
        rope_type = rope.pop("type", None)
        rope.setdefault("rope_type", rope_type or "default")
        if rope["rope_type"] in ("su", "yarn"):
            rope["rope_type"] = "longrope"
        d["rope_theta"] = rope.pop("rope_theta")
        d["rope_scaling"] = rope
        return cls.from_dict(d)

    def to_config_json(self):
        d = super().to_config_json()
        d["rope_parameters"] = {"rope_type": "default", **(d.pop("rope_scaling", None) or {}),
                                "rope_theta": d.pop("rope_theta")}
        return d

    def to_gguf(self):
        """(this config as its GGUF file holds it, {`phi3.`-less key: value}, {config tensor: float32 array}): what
        convert_hf_to_gguf.py's Phi3MiniModel writes for longrope, which from_gguf reads back: the factors as the
        rope_factors_long / rope_factors_short tensors (float32) and the attention factor as rope.scaling.attn_factor
        (the config's attention_factor, else transformers' and the converter's sqrt(1 + ln s / ln original) for
        s = max_position_embeddings / original_max_position_embeddings > 1, else 1; a given `factor` is the s of
        that formula, so the file holds its result). The config then holds the factors as float32 values and the
        attention factor it computes with, without `factor`."""
        rope = self.rope_scaling or {}
        if rope.get("rope_type") != "longrope":
            return self, {}, {}
        attention = inv_freq(self.rope_theta, rope, self.head_dim, self.max_position_embeddings)[1]
        tensors = {f"rope_factors_{k}.weight": np.asarray(rope[f"{k}_factor"], np.float32)  # (rotary_dims/2,)
                   for k in ("long", "short")}
        file_rope = {k: v for k, v in rope.items() if k != "factor"}
        file_rope.update(long_factor=tensors["rope_factors_long.weight"].tolist(), attention_factor=attention,
                         short_factor=tensors["rope_factors_short.weight"].tolist())
        return dataclasses.replace(self, rope_scaling=file_rope), {"rope.scaling.attn_factor": attention}, tensors

    @classmethod
    def from_gguf(cls, gguf):
        """llama.cpp's phi3 architecture (a base.GGUFConfigReader): the rotated dims as rope.dimension_count, the
        window as attention.sliding_window (0: none), longrope as the rope_factors_long / rope_factors_short
        tensors (gguf_config_tensors) with rope.scaling.attn_factor and rope.scaling.original_context_length."""
        fields = {f: gguf.number(f, key) for f, key in (
            ("hidden_size", "embedding_length"), ("intermediate_size", "feed_forward_length"),
            ("num_hidden_layers", "block_count"), ("num_attention_heads", "attention.head_count"),
            ("max_position_embeddings", "context_length"))}
        fields.update((f, gguf.number(f, key, None)) for f, key in (
            ("num_key_value_heads", "attention.head_count_kv"), ("head_dim", "attention.key_length")))
        heads = fields["num_attention_heads"]
        head_dim = fields["head_dim"] or (fields["hidden_size"] // heads if heads else 0)  # 0: build says why
        rope_dims = gguf.number("rotary_dims", "rope.dimension_count", head_dim)
        rope = {"rope_type": "default", "partial_rotary_factor": rope_dims / head_dim if head_dim else 1.0}
        if "rope_factors_long.weight" in gguf.tensors or "rope_factors_short.weight" in gguf.tensors:
            rope.update(rope_type="longrope", long_factor=_longrope_factors(gguf, "rope_factors_long.weight"),
                        short_factor=_longrope_factors(gguf, "rope_factors_short.weight"),
                        attention_factor=gguf.number("rope_attention_factor", "rope.scaling.attn_factor", None))
        if "rope_freqs.weight" in gguf.tensors:
            raise NotImplementedError(f"{gguf.source}: tensor 'rope_freqs.weight' is not supported in llama.cpp's phi3 "
                                      "architecture (its longrope factors are rope_factors_long / rope_factors_short)")
        window = gguf.number("sliding_window", "attention.sliding_window", 0)
        fields.update(vocab_size=gguf.vocab_size(), rope_scaling=rope, sliding_window=window or None,
                      rms_norm_eps=gguf.number("rms_norm_eps", "attention.layer_norm_rms_epsilon", 1e-5),
                      rope_theta=gguf.number("rope_theta", "rope.freq_base", 10000.0),
                      original_max_position_embeddings=gguf.number(
                          "original_max_position_embeddings", "rope.scaling.original_context_length",
                          fields["max_position_embeddings"]))
        if rope.get("attention_factor", 0) is None:
            del rope["attention_factor"]
        for name, ok in (("attention.value_length", (None, head_dim)), ("rope.scaling.type", (None, "none")),
                         ("expert_count", (None, 0))):
            gguf.refuse_unless(name, ok)
        config = gguf.build(cls, **fields, tie_word_embeddings="output.weight" not in gguf.tensors,
                            **gguf.token_ids())
        if config.rotary_dims != rope_dims:
            raise GGUFError(f"{gguf.source}: {gguf.key('rope.dimension_count')} = {rope_dims} is not an even number "
                            f"of dims of head_dim {config.head_dim}")
        return config


def _longrope_factors(gguf, name):
    """The values of one of longrope's factor tensors: GGUFError naming a missing one."""
    if name not in gguf.tensors:
        raise GGUFError(f"{gguf.source}: longrope needs both rope_factors_long.weight and rope_factors_short.weight; "
                        f"{name!r} is missing")
    return gguf.config_tensor(name).ravel().tolist()


class Phi3Attention(Module):
    """Causal self-attention with q, k and v from one qkv_proj (rows: Hq·D of q, Hkv·D of k, Hkv·D of v), RoPE on
    the first rotary dims of each head and an optional sliding window."""

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, layer_idx=0, dropout=0.0,
                 sliding_window=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.attention_dropout = check_dropout_p("Phi3Attention", dropout)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx, self.sliding_window = layer_idx, sliding_window
        self.qkv_proj = Linear(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias=False, dtype=dtype)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=False, dtype=dtype)

    def forward(self, x, cos=None, sin=None, cache=None, attn_mask=None):
        B, T, _ = x.shape
        hd, Hq, Hkv = self.head_dim, self.num_heads, self.num_kv_heads
        q, k, v = F.split(self.qkv_proj(x), [Hq * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = F.transpose(F.reshape(q, (B, T, Hq, hd)), 1, 2)                               # (B, Hq, T, D)
        k = F.transpose(F.reshape(k, (B, T, Hkv, hd)), 1, 2)                              # (B, Hkv, T, D)
        v = F.transpose(F.reshape(v, (B, T, Hkv, hd)), 1, 2)                              # (B, Hkv, T, D)
        p = self.attention_dropout if self.training else 0.0
        y = attend(q, k, v, cache, self.layer_idx, cos, sin, attn_mask, dropout=p,
                   sliding_window=self.sliding_window)                                    # (B, Hq, T, D)
        return self.o_proj(F.reshape(F.transpose(y, 1, 2), (B, T, Hq * hd)))


class Phi3MLP(Module):
    """down_proj(act(gate) * up) with gate and up the two halves of one gate_up_proj."""

    def __init__(self, hidden_size, intermediate_size, act="silu", dtype=DEFAULT_DTYPE):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False, dtype=dtype)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False, dtype=dtype)
        self.act, self.act_fn = act, activation(act)

    def forward(self, x):
        gate, up = F.split(self.gate_up_proj(x), [self.intermediate_size] * 2, dim=-1)    # (B, T, I) each
        if self.act_fn is F.silu:  # the fused op
            return self.down_proj(F.silu_mul(gate, up))
        return self.down_proj(F.mul(self.act_fn(gate), up))


class Phi3DecoderBlock(Module):
    """Pre-norm layer with residual dropout: x + dropout(attn(norm(x))), then x + dropout(mlp(norm(x)))."""

    def __init__(self, config, layer_idx=0, dtype=DEFAULT_DTYPE):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.self_attn = Phi3Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                       layer_idx, c.attention_dropout, c.sliding_window, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype)
        self.mlp = Phi3MLP(c.hidden_size, c.intermediate_size, c.hidden_act, dtype=dtype)
        self.resid_attn_dropout = Dropout(c.resid_pdrop)
        self.resid_mlp_dropout = Dropout(c.resid_pdrop)

    def forward(self, x, cos=None, sin=None, cache=None, attn_mask=None):
        x = x + self.resid_attn_dropout(self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask))
        return x + self.resid_mlp_dropout(self.mlp(self.post_attention_layernorm(x)))


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama's embedding, RoPE tables (of Phi-3's RoPE parameters), final norm and head around Phi-3's blocks.
    GGUF: llama.cpp's phi3 architecture (fused attn_qkv and ffn_up kept as they are, no q/k permutation)."""
    block_class = Phi3DecoderBlock
    gguf_block_names = {
        "attn_norm.weight": "input_layernorm.weight", "attn_qkv.weight": "self_attn.qkv_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
        "ffn_up.weight": "mlp.gate_up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
    }

    @classmethod
    def from_gguf_tensor(cls, gname, array, config):
        """llama.cpp's phi3 converter writes every tensor as transformers has it: nothing to undo."""
        return array

    def cache_invalid(self, past, total):
        """Whether generation must drop its KV cache of `past` positions and recompute every position when the
        sequence grows to `total`: as transformers' Phi-3 generation (prepare_inputs_for_generation), once, when
        the sequence first passes original_max_position_embeddings under longrope (the cached keys were rotated
        with the short factors, every position from then on takes the long ones)."""
        return self._rope.rope_type == "longrope" and \
            0 < past <= self.config.rope_scaling["original_max_position_embeddings"] < total
