"""Differentiable rotary position embedding and scaled dot-product attention, named as in
transformers and `torch.nn.functional`; the computation is lora_np.kernels' (norm_rotary,
attention), which picks the backend.
"""
import math

import numpy as np

from .. import kernels
from ..tensor import Function, Tensor, _check_float_dtypes, _to_array
from .primitives import _check_float, _tensors, cat, neg


# -- rotary position embedding ---------------------------------------------------------
def rope_cos_sin(positions, head_dim, base=10000.0, dtype=np.float32):
    """cos, sin tables (T, head_dim), rotate-half layout: angles computed in float64, then cast.

    (transformers computes these angles in float32 even for a float64 model; lora_np's
    float64 mode keeps them exact.)"""
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))   # (D/2,)
    freqs = np.outer(np.asarray(positions, np.float64), inv_freq)                         # (T, D/2)
    emb = np.concatenate([freqs, freqs], axis=-1)                                          # (T, D)
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)


class Rotary(Function):
    """x·cos + rotate_half(x)·sin over x's first rd dims, the others passed through; x (B, H, T, D),
    cos/sin (T, rd) or broadcastable to x[..., :rd], rd even and <= D (kernels.rotary)."""

    def forward(self, x, cos, sin):
        rd = cos.shape[-1] if cos.ndim else 0
        rotated = x.shape[:-1] + (rd,)
        if (rd % 2 or rd > x.shape[-1] or cos.shape != sin.shape
                or (cos.shape != rotated[-cos.ndim:] and np.broadcast_shapes(rotated, cos.shape) != rotated)):
            raise ValueError(f"rotary_embedding: cos/sin shapes {cos.shape}, {sin.shape} must be equal, with an even "
                             f"last dim rd <= D, and broadcastable to x[..., :rd] for x of shape {x.shape}")
        self.cos, self.sin = cos, sin
        return kernels.rotary(x, cos, sin)

    def backward(self, g):
        return kernels.rotary(g, self.cos, self.sin, transpose=True), None, None


def rotary_embedding(x, cos, sin):
    """Apply rotary position embedding, rotate-half convention of transformers' Llama. cos/sin with a last
    dim rd < D (partial rotary, transformers' Phi-3 / GPT-NeoX) rotate the first rd dims of x
    (rotate-half within them) and pass x[..., rd:] through unchanged."""
    (x,) = _tensors("rotary_embedding", x)
    _check_float("rotary_embedding", x)
    return Rotary.apply(x, _to_array(cos, x.dtype), _to_array(sin, x.dtype))  # the tables get no gradient


def rotate_half(x):
    h = x.shape[-1] // 2
    return cat([neg(x[..., h:]), x[..., :h]], dim=-1)


# -- attention -------------------------------------------------------------------------
class SDPA(Function):
    """softmax(cap(q kᵀ · scale) + bias) v with grouped-query heads: q (B, Hq, T, D), k and v
    (B, Hkv, S, D), Hq = Hkv·g. Blocked as flash attention keeps memory (kernels.attention_forward
    / _backward): nothing of size T × S is kept, only the output and each row's log-sum-exp. The
    output is laid out in memory as (B, T, Hq, D), so the caller's transpose to (B, T, Hq·D) is free.
    """

    def forward(self, q, k, v, bias, is_causal=False, scale=None, sliding_window=None, softcap=None):
        B, Hq, T, D = q.shape
        self.scale = q.dtype.type(scale if scale is not None else 1.0 / math.sqrt(D))
        self.options = dict(sliding_window=sliding_window, softcap=softcap)
        k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)           # strided batched GEMMs are slower
        out, lse = kernels.attention_forward(q, k, v, self.scale, is_causal, bias, **self.options)  # (B, T, Hkv, g, D)
        if any(self.needs_input_grad[:3]):
            self.q, self.k, self.v, self.out, self.lse = q, k, v, out, lse
            self.bias, self.causal = bias, is_causal
        return out.transpose(0, 2, 3, 1, 4).reshape(B, Hq, T, D)          # a view

    def backward(self, g_out):
        gq, gk, gv = kernels.attention_backward(g_out, self.q, self.k, self.v, self.out, self.lse, self.scale,
                                                self.causal, *self.needs_input_grad[:3], bias=self.bias,
                                                **self.options)
        return gq, gk, gv, None


def _attention_bias(mask, B, Hq, Hkv, T, S, dtype):
    """The additive bias (B or 1, Hkv or 1, g or 1, T, S) of a bool (True = attend) or float mask."""
    m = mask.data if isinstance(mask, Tensor) else np.asarray(mask)
    try:
        m = np.broadcast_to(m, np.broadcast_shapes(m.shape, (1, 1, T, S)))
    except ValueError:
        raise ValueError(f"scaled_dot_product_attention: attn_mask shape {m.shape} does not broadcast "
                         f"to {(B, Hq, T, S)}") from None
    if m.ndim != 4 or m.shape[0] not in (1, B) or m.shape[1] not in (1, Hq):
        raise ValueError(f"scaled_dot_product_attention: attn_mask shape {m.shape} does not broadcast "
                         f"to {(B, Hq, T, S)}")
    if m.dtype == np.bool_:
        m = np.where(m, dtype.type(0), dtype.type(-np.inf))
    elif m.dtype.kind == "f":
        _check_float_dtypes("scaled_dot_product_attention", [np.empty(0, dtype), m])
    else:
        raise TypeError(f"scaled_dot_product_attention: attn_mask must be bool or float, got dtype {m.dtype}")
    return np.ascontiguousarray(m).reshape(
        (m.shape[0], 1, 1, T, S) if m.shape[1] == 1 else (m.shape[0], Hkv, Hq // Hkv, T, S))


def check_sliding_window_softcap(where, sliding_window, softcap):
    """(sliding_window, softcap) after checking them: None, or an integer >= 1 and a finite number > 0;
    ValueError naming `where` and the argument if not."""
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, (int, np.integer)) or sliding_window < 1:
            raise ValueError(f"{where}: sliding_window must be an integer >= 1 or None, got {sliding_window!r}")
        sliding_window = int(sliding_window)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.integer, np.floating)) \
                or not (math.isfinite(softcap) and softcap > 0):
            raise ValueError(f"{where}: softcap must be a finite number > 0 or None, got {softcap!r}")
        softcap = float(softcap)
    return sliding_window, softcap


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, sliding_window=None, softcap=None):
    """torch's scaled_dot_product_attention. `attn_mask`: bool (True = attend) or additive float,
    broadcastable to (B, Hq, T, S). Key/value heads may be fewer than query heads
    (grouped-query attention; always allowed). `is_causal` aligns the causal mask to the bottom
    right (query t sees keys up to t + S - T), the same as torch when T == S.

    Two options of the newer families (not torch's):
    `sliding_window` W: query t, at absolute position p = t + S − T (aligned as the causal mask), sees
    key s only when s > p − W (and s <= p when causal): W keys counting itself. This is transformers 5's
    `sliding_window_causal_mask_function` (masking_utils.py: `sliding_window_overlay`, kv_idx > q_idx −
    sliding_window, and-ed with the causal mask) used by Mistral, Qwen2 and Gemma 2/3's sliding layers.
    `softcap` c: the scores become c·tanh(s/c) after the scaling and before the mask and bias (Gemma 2's
    attn_logit_softcapping, transformers' gemma2 `eager_attention_forward`)."""
    if dropout_p:
        raise NotImplementedError("scaled_dot_product_attention: attention dropout is not supported")
    sliding_window, softcap = check_sliding_window_softcap("scaled_dot_product_attention", sliding_window, softcap)
    q, k, v = _tensors("scaled_dot_product_attention", query, key, value)
    _check_float("scaled_dot_product_attention", q)
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"scaled_dot_product_attention: query {q.shape}, key {k.shape}, value {v.shape} "
                         "must be (B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D)")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"scaled_dot_product_attention: {q.shape[1]} query heads are not a multiple of "
                         f"{k.shape[1]} key/value heads")
    B, Hq, T, _ = q.shape
    bias = None if attn_mask is None else _attention_bias(attn_mask, B, Hq, k.shape[1], T, k.shape[2], q.dtype)
    return SDPA.apply(q, k, v, bias, is_causal=is_causal, scale=scale, sliding_window=sliding_window,
                      softcap=softcap)
