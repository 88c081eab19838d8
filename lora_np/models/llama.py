"""The Llama family (SmolLM2, TinyLlama; Qwen2's q/k/v biases): config, attention, gated MLP, decoder layer
and the causal LM, with transformers' module names (`model.layers.0.self_attn.q_proj.weight`, ...)."""
from dataclasses import dataclass, field
from typing import Optional

from .. import functional as F
from ..nn import Embedding, Linear, Module, ModuleList, RMSNorm, activation, attend, check_dropout_p
from ..options import Int
from ..tensor import DEFAULT_DTYPE
from ..gguf import reverse_llama_permute
from .base import (BOOL, DROPOUT, EPS, LAYERS, POSITIONS, SIZE, THETA, CausalLM, Config, RopeTables, check_fields,
                   refuse)

__all__ = ["LlamaConfig", "Attention", "GatedMLP", "DecoderBlock", "LlamaModel", "LlamaForCausalLM"]


@dataclass
class LlamaConfig(Config):
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
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"rope_scaling must be an object or null, got {self.rope_scaling!r}")
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) not in (None, "default"):
            refuse(where, "rope_scaling", self.rope_scaling, " (only the default RoPE)")
        if self.rope_scaling and self.rope_scaling.get("partial_rotary_factor", 1.0) != 1.0:
            refuse(where, "partial_rotary_factor", self.rope_scaling["partial_rotary_factor"], " (RoPE on all dims only)")
        activation(self.hidden_act, f"{where}: hidden_act")
        self.attention_dropout = DROPOUT.check("attention_dropout", self.attention_dropout or 0.0)
        if self.pretraining_tp is not None:
            Int(min=1).check("pretraining_tp", self.pretraining_tp)
        if self.use_sliding_window and self.sliding_window is not None and \
                (self.max_window_layers is None or self.max_window_layers < self.num_hidden_layers):
            refuse(where, "use_sliding_window", True, f" (sliding_window {self.sliding_window}, max_window_layers "
                   f"{self.max_window_layers}: only full attention)")
        if self.layer_types is not None and any(t != "full_attention" for t in self.layer_types):
            refuse(where, "layer_types", self.layer_types, " (only 'full_attention')")

    @classmethod
    def from_config_json(cls, d):
        """model_type llama or qwen2 (Llama with q/k/v biases and transformers' sliding-window defaults)."""
        d = dict(d)
        rope = d.get("rope_parameters") or {}  # transformers 5 keeps rope_theta here
        if not isinstance(rope, dict):
            raise ValueError(f"rope_parameters must be an object, got {rope!r}")
        if "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if rope:
            d["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" or \
                rope.get("partial_rotary_factor", 1.0) != 1.0 else None
        if d.get("model_type") == "qwen2":
            d.update(qkv_bias=True, attention_bias=False)
            d.setdefault("use_sliding_window", False)
            d.setdefault("sliding_window", 4096)
            d.setdefault("max_window_layers", 28)
        else:  # llama has no sliding window: these keys, if a file has them, mean nothing to transformers
            for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
                d.pop(key, None)
        return cls.from_dict(d)

    @classmethod
    def from_gguf(cls, gguf):
        """The config of a GGUF file of llama.cpp's 'llama' architecture (a base.GGUFConfigReader)."""
        fields = {f: gguf.number(f, key) for f, key in (
            ("hidden_size", "embedding_length"), ("intermediate_size", "feed_forward_length"),
            ("num_hidden_layers", "block_count"), ("num_attention_heads", "attention.head_count"))}
        fields.update((f, gguf.number(f, key, None)) for f, key in (
            ("num_key_value_heads", "attention.head_count_kv"), ("head_dim", "attention.key_length")))
        fields.update(vocab_size=gguf.vocab_size(),
                      rms_norm_eps=gguf.number("rms_norm_eps", "attention.layer_norm_rms_epsilon", 1e-5),
                      rope_theta=gguf.number("rope_theta", "rope.freq_base", 10000.0),
                      max_position_embeddings=gguf.number("max_position_embeddings", "context_length", 2048))
        config = gguf.build(cls, **fields, tie_word_embeddings="output.weight" not in gguf.tensors,
                            qkv_bias="blk.0.attn_q.bias" in gguf.tensors,
                            bos_token_id=gguf.metadata.get("tokenizer.ggml.bos_token_id"),
                            eos_token_id=gguf.metadata.get("tokenizer.ggml.eos_token_id"))
        # keys that ask for another computation than this model's (llama.cpp's names)
        for name, ok in (("rope.dimension_count", (None, config.head_dim)),
                         ("attention.value_length", (None, config.head_dim)),
                         ("rope.scaling.type", (None, "none")), ("rope.scaling.factor", (None, 0.0, 1.0)),
                         ("expert_count", (None, 0)), ("attention.sliding_window", (None, 0))):
            gguf.refuse_unless(name, ok)
        return config

    def to_config_json(self):
        """model_type qwen2 for q/k/v biases without an o_proj bias, else llama; RoPE in rope_parameters."""
        qwen2 = self.qkv_bias and not self.attention_bias
        d = super().to_config_json()
        d.update(architectures=["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
                 model_type="qwen2" if qwen2 else "llama", hidden_act="silu")
        d.pop("qkv_bias")
        d.pop("rope_scaling", None)
        d["rope_parameters"] = {"rope_theta": self.rope_theta, "rope_type": "default"}
        return d


class Attention(Module):
    """Causal self-attention with separate q/k/v projections (Llama names), grouped-query
    heads and optional RoPE; `bias` adds q/k/v biases (Qwen2), `o_bias` an o_proj bias."""

    def __init__(self, hidden_size, num_heads, num_kv_heads=None, head_dim=None, bias=False, o_bias=False,
                 layer_idx=0, dropout=0.0, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.attention_dropout = check_dropout_p("Attention", dropout)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or hidden_size // num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"Attention: {num_heads} heads is not a multiple of {self.num_kv_heads} kv heads")
        self.layer_idx = layer_idx
        self.q_proj = Linear(hidden_size, self.num_heads * self.head_dim, bias=bias, dtype=dtype)
        self.k_proj = Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias, dtype=dtype)
        self.v_proj = Linear(hidden_size, self.num_kv_heads * self.head_dim, bias=bias, dtype=dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden_size, bias=o_bias, dtype=dtype)

    def forward(self, x, cos=None, sin=None, cache=None, attn_mask=None):
        B, T, _ = x.shape
        hd = self.head_dim
        q = F.transpose(F.reshape(self.q_proj(x), (B, T, self.num_heads, hd)), 1, 2)     # (B, Hq, T, D)
        k = F.transpose(F.reshape(self.k_proj(x), (B, T, self.num_kv_heads, hd)), 1, 2)  # (B, Hkv, T, D)
        v = F.transpose(F.reshape(self.v_proj(x), (B, T, self.num_kv_heads, hd)), 1, 2)  # (B, Hkv, T, D)
        p = self.attention_dropout if self.training else 0.0
        y = attend(q, k, v, cache, self.layer_idx, cos, sin, attn_mask, dropout=p)       # (B, Hq, T, D)
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
    """Pre-norm Llama decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, hidden_size, num_heads, num_kv_heads, intermediate_size, head_dim=None, eps=1e-6,
                 attention_bias=False, o_bias=False, mlp_bias=False, act="silu", layer_idx=0, attention_dropout=0.0,
                 dtype=DEFAULT_DTYPE):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden_size, eps, dtype=dtype)
        self.self_attn = Attention(hidden_size, num_heads, num_kv_heads, head_dim, bias=attention_bias,
                                   o_bias=o_bias, layer_idx=layer_idx, dropout=attention_dropout, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps, dtype=dtype)
        self.mlp = GatedMLP(hidden_size, intermediate_size, bias=mlp_bias, act=act, dtype=dtype)

    def forward(self, x, cos=None, sin=None, cache=None, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


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


class LlamaForCausalLM(CausalLM):
    gguf_names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
    gguf_block_names = {
        "attn_norm.weight": "input_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }

    @classmethod
    def from_gguf_tensor(cls, gname, array, config):
        """llama.cpp's converter permutes the rows of the llama architecture's q and k: undone here."""
        if gname.endswith(("attn_q.weight", "attn_q.bias")):
            return reverse_llama_permute(array, config.num_attention_heads)
        if gname.endswith(("attn_k.weight", "attn_k.bias")):
            return reverse_llama_permute(array, config.num_key_value_heads)
        return array

    def __init__(self, config, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope = RopeTables(config.head_dim, config.rope_theta)

    def _blocks(self):
        return self.model.layers

    def _embed(self, ids, past):
        h = self.model.embed_tokens(ids)
        cos, sin = self._rope.get(past, ids.shape[1], h.dtype)
        return h, cos, sin

    def _final_norm(self, h):
        return self.model.norm(h)
