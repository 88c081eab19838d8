"""Fused differentiable ops, named as `torch.nn.functional`: ops that would otherwise build many
graph nodes and big temporaries, with their backward written directly: softmax, log_softmax,
cross_entropy and the causal-LM losses (the chunked LM head), layer_norm, rms_norm, dropout,
gelu and silu_mul (the SwiGLU gate).

Memory: an op saves for backward only what the gradients it must compute use
(`needs_input_grad`): a norm keeps its input and one scalar per row (not the normalised copy),
the chunked LM-head loss keeps its gradient instead of the logits. Where a kernel exists
(lora_np.kernels) the op calls it, and the kernel picks the backend.

The generator that dropout (and LoRA's random initialisations) use when none is given lives here:
manual_seed / default_generator.
"""
import math

import numpy as np

from .. import kernels
from ..kernels import quant as kernels_quant
from ..kernels.quant import row_panels
from ..tensor import Function, Tensor
from .attention import check_sliding_window_softcap
from .primitives import _check_float, _tensors, permute, reshape


# -- activations -----------------------------------------------------------------------
class SiluMul(Function):
    """silu(a)·b in one op (the SwiGLU gate): saves a and b only, no silu(a) array; forward and
    backward are one pass each in the C core (kernels.silu_mul_forward / _backward)."""

    def forward(self, a, b):
        if a.shape != b.shape:
            raise ValueError(f"silu_mul: shapes {a.shape} and {b.shape} differ")
        a, b = kernels.contiguous(a), kernels.contiguous(b)
        self.a = a
        self.b = b if self.needs_input_grad[0] else None  # only a's gradient needs b
        return kernels.silu_mul_forward(a, b)

    def backward(self, g):
        return kernels.silu_mul_backward(kernels.contiguous(g), self.a, self.b, *self.needs_input_grad[:2])


def _erf(x):
    """erf elementwise to double precision (math.erf; NumPy has no erf). ~0.3 µs per element."""
    flat = np.fromiter(map(math.erf, x.ravel().tolist()), np.float64, count=x.size)
    return flat.reshape(x.shape).astype(x.dtype, copy=False)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class Gelu(Function):
    """GELU: exact 0.5·x·(1 + erf(x/√2)), or the tanh approximation (GPT-2's gelu_new)."""

    def forward(self, x, approximate="none"):
        self.x, self.approximate = x, approximate
        if approximate == "tanh":
            self.t = np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x ** 3))
            return 0.5 * x * (1 + self.t)
        self.cdf = 0.5 * (1 + _erf(x / x.dtype.type(math.sqrt(2.0))))
        return x * self.cdf

    def backward(self, g):
        x = self.x
        if self.approximate == "tanh":
            t = self.t
            dt = (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
            return g * (0.5 * (1 + t) + 0.5 * x * dt)
        pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return g * (self.cdf + x * pdf)


def silu_mul(input, other):
    """silu(input) * other as one op: the gate of a SwiGLU MLP, `silu(gate_proj(x)) * up_proj(x)`."""
    a, b = _tensors("silu_mul", input, other)
    _check_float("silu_mul", a)
    return SiluMul.apply(a, b)


def gelu(input, approximate="none"):
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    (x,) = _tensors("gelu", input)
    _check_float("gelu", x)
    return Gelu.apply(x, approximate=approximate)


# -- softmax family --------------------------------------------------------------------
def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _log_softmax(x, axis):
    shifted = x - x.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


class Softmax(Function):
    def forward(self, x, dim):
        self.dim = dim
        self.out = _softmax(x, dim)
        return self.out

    def backward(self, g):
        p = self.out
        return p * (g - (g * p).sum(axis=self.dim, keepdims=True))


class LogSoftmax(Function):
    def forward(self, x, dim):
        self.dim = dim
        self.out = _log_softmax(x, dim)
        return self.out

    def backward(self, g):
        return g - np.exp(self.out) * g.sum(axis=self.dim, keepdims=True)


def softmax(input, dim=-1):
    (x,) = _tensors("softmax", input)
    _check_float("softmax", x)
    return Softmax.apply(x, dim=dim)


def log_softmax(input, dim=-1):
    (x,) = _tensors("log_softmax", input)
    _check_float("log_softmax", x)
    return LogSoftmax.apply(x, dim=dim)


class CrossEntropy(Function):
    """Fused log_softmax + NLL over logits (N, C) and targets (N,)."""

    def forward(self, logits, target, ignore_index=-100, reduction="mean"):
        n, c = logits.shape
        valid = target != ignore_index
        safe = np.where(valid, target, 0)
        if valid.any() and (safe[valid].min() < 0 or safe[valid].max() >= c):
            raise IndexError(f"cross_entropy: target out of range [0, {c}) (ignore_index={ignore_index})")
        m = logits.max(1, keepdims=True)
        lse = m + np.log(np.exp(logits - m).sum(1, keepdims=True))      # (N, 1) log-sum-exp
        nll = (lse[:, 0] - logits[np.arange(n), safe]) * valid          # (N,)
        self.count = int(valid.sum())
        if self.needs_input_grad[0]:  # logits and lse give the probabilities again; no (N, C) copy kept
            self.logits, self.lse, self.safe, self.valid, self.reduction = logits, lse, safe, valid, reduction
        if reduction == "none":
            return nll.astype(logits.dtype)
        if reduction == "sum":
            return np.asarray(nll.sum(), logits.dtype)
        return np.asarray(nll.sum() / self.count if self.count else np.nan, logits.dtype)

    def backward(self, g):
        n = self.logits.shape[0]
        if self.reduction == "none":
            w = g * self.valid                                           # (N,)
        elif self.reduction == "sum":
            w = np.broadcast_to(g, (n,)) * self.valid
        else:
            w = np.broadcast_to(g / self.count, (n,)) * self.valid
        grad = self.logits - self.lse
        np.exp(grad, out=grad)                                           # softmax (N, C)
        grad[np.arange(n), self.safe] -= 1
        grad *= w[:, None].astype(grad.dtype)
        return grad, None


def cross_entropy(input, target, ignore_index=-100, reduction="mean"):
    """torch.nn.functional.cross_entropy for logits (N, C) or (N, C, d...) and integer targets."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    (x,) = _tensors("cross_entropy", input)
    _check_float("cross_entropy", x)
    t = target.data if isinstance(target, Tensor) else np.asarray(target)
    if t.dtype.kind not in "iu":
        raise TypeError(f"cross_entropy: target must be integer class indices, got dtype {t.dtype}")
    if x.ndim > 2:  # (N, C, d...) -> (N·d..., C)
        c = x.shape[1]
        x = reshape(permute(x, (0,) + tuple(range(2, x.ndim)) + (1,)), (-1, c))
        out_shape = t.shape
        t = t.reshape(-1)
    else:
        out_shape = t.shape
    if x.ndim != 2 or t.shape != (x.shape[0],):
        raise ValueError(f"cross_entropy: input shape {input.shape} does not match target shape {out_shape}")
    out = CrossEntropy.apply(x, Tensor(t), ignore_index=ignore_index, reduction=reduction)
    return reshape(out, out_shape) if reduction == "none" else out


# -- causal-LM losses (the chunked LM head: logits never held whole) ---------------------
def causal_lm_loss(logits, labels, ignore_index=-100):
    """Mean next-token cross-entropy as transformers computes it: predict labels[:, 1:]
    from logits[:, :-1]; positions labelled -100 are ignored. logits (B, T, V), labels (B, T)."""
    labels = np.asarray(labels.data if isinstance(labels, Tensor) else labels)
    B, T, V = logits.shape
    shift_logits = reshape(logits[:, :-1], (B * (T - 1), V))                   # (B·(T-1), V)
    return cross_entropy(shift_logits, labels[:, 1:].reshape(-1).astype(np.int64), ignore_index=ignore_index)


class LinearCrossEntropy(Function):
    """mean over rows with a target of cross_entropy(cap(h Wᵀ), target), never holding all the
    logits: rows go through the head in chunks. When a gradient is wanted, forward computes it
    too, chunk by chunk, while softmax − one-hot is at hand, and backward only scales it: two
    head matmuls per step instead of three, and what is kept is the gradient (N, C) (plus (V, C)
    when the head trains) instead of the rows of h. Rows whose target is ignore_index cost
    nothing. h (N, C), weight (V, C), target (N,). With `softcap` c the logits are c·tanh(z/c)
    (Gemma 2/3's final_logit_softcapping), and the gradient goes through the cap's 1 − tanh².
    A frozen quantized head comes as weight=None and its ggml `blocks` (V, row bytes) of `ggml_type`: then
    the vocabulary is streamed instead (_streamed_head_loss), each panel of W dequantized once a step."""

    def forward(self, h, weight, target, ignore_index=-100, chunk=None, softcap=None, blocks=None, ggml_type=None):
        V = weight.shape[0] if blocks is None else blocks.shape[0]
        if chunk is None:  # ≤ 512 rows, and a chunk's logits ≤ 2^25 elements (128 MiB in float32)
            chunk = max(32, min(512, (1 << 25) // max(V, 1)))
        rows = np.nonzero(target != ignore_index)[0]
        hr, t, count = h[rows], target[rows].astype(np.int64), len(rows)                 # (M, C), (M,)
        if t.size and (t.min() < 0 or t.max() >= V):
            raise IndexError(f"cross_entropy: target out of range [0, {V})")
        need_h, need_w = self.needs_input_grad[:2]
        self.gh = np.zeros(h.shape, h.dtype) if need_h else None
        self.gw = np.zeros_like(weight) if need_w else None
        inv = 1.0 / count if count else 0.0
        if blocks is not None:
            if not count:
                return np.asarray(np.nan, h.dtype)
            total, gh = _streamed_head_loss(hr, t, blocks, ggml_type, softcap, need_h)
            if need_h:
                gh *= h.dtype.type(inv)
                self.gh[rows] = gh
            return np.asarray(total / count, h.dtype)
        total = 0.0
        for s in range(0, count, chunk):
            hc, tc = hr[s:s + chunk], t[s:s + chunk]
            logits = hc @ weight.T                                                       # (c, V)
            if softcap is not None:                                                      # c·tanh(z/c)
                logits /= logits.dtype.type(softcap)
                np.tanh(logits, out=logits)
                th = logits.copy() if need_h or need_w else None                         # tanh, for 1 − tanh²
                logits *= logits.dtype.type(softcap)
            picked = logits[np.arange(len(tc)), tc]                                      # a copy
            lse = kernels.softmax_rows(logits, scale=inv)                                # logits -> softmax / M
            total += float((lse - picked).sum())
            if need_h or need_w:
                logits[np.arange(len(tc)), tc] -= h.dtype.type(inv)                      # d loss / d logits
                if softcap is not None:                                                  # through the cap
                    th *= th
                    np.subtract(1, th, out=th)
                    logits *= th
                if need_h:
                    self.gh[rows[s:s + chunk]] = logits @ weight                                 # (c, C)
                if need_w:
                    self.gw += logits.T @ hc                                             # (V, C)
        return np.asarray(total / count if count else np.nan, h.dtype)

    def backward(self, g):
        scale = self.gh.dtype.type(g) if self.gh is not None else self.gw.dtype.type(g)
        if scale != 1:
            for a in (self.gh, self.gw):
                if a is not None:
                    a *= scale
        return self.gh, self.gw, None


_HEAD_PANEL = 1 << 22  # logits per panel of the streamed quantized head (16 MiB in float32)


def _streamed_head_loss(h, target, blocks, ggml_type, softcap, need_h):
    """(Σ over rows of cross_entropy(cap(h Wᵀ), target), h's gradient of that sum or None), W a quantized
    head's blocks (V, row bytes), h (M, C), every target in [0, V).

    The vocabulary goes by panels of W's rows, each dequantized once and used at once for all M rows, as
    flash attention goes over keys: each panel's logits become their softmax within the panel
    (kernels.softmax_rows) and its log-sum-exp l; a running m = max of the panels' l and s = Σ exp(l − m)
    (float64) give the row's log-sum-exp m + log s, and the gradient's softmax part Σ_v exp(z_v − m) W_v
    accumulates in acc (M, C) as exp(l − m)·(softmax_panel @ W_panel), rescaled by exp(m_old − m_new) when m
    grows; at the end dh = acc / s − W[target] (through the cap's 1 − tanh² with a softcap). Never more than
    a panel's logits (M, ≤ _HEAD_PANEL / M) and a panel of W (≤ _PANEL_BYTES) at a time, and the GEMMs run on
    all M rows: the row chunks of the float head would dequantize W twice per chunk."""
    M, C = h.shape
    dt, rows = h.dtype.type, np.arange(M)
    m = np.full(M, -np.inf)                                                   # running max of panel lse
    s = np.zeros(M)                                                           # Σ exp(lse_panel − m)
    picked = np.zeros(M, h.dtype)                                             # each row's target logit
    acc = np.zeros((M, C), h.dtype) if need_h else None                       # Σ exp(z − m) W (· 1 − tanh²)
    w_target = np.zeros((M, C), h.dtype) if need_h else None                  # W[target] (· 1 − tanh²)
    part = np.empty((M, C), h.dtype) if need_h else None
    # P: a panel's logits (M, P) within _HEAD_PANEL, and its W (P, C) within the GEMMs' panel bytes (with few rows
    # M, a logits bound alone would dequantize the whole head at once)
    P = max(1, min(_HEAD_PANEL // max(M, 1), kernels_quant._PANEL_BYTES // (C * h.itemsize)))
    for v0, v1, w in row_panels(blocks, ggml_type, h.dtype, P):                      # w (P, C)
        z = h @ w.T                                                           # (M, P)
        if softcap is not None:                                               # c·tanh(z/c)
            z /= dt(softcap)
            np.tanh(z, out=z)
            if need_h:                                                        # 1 − tanh², one panel array
                dcap = np.multiply(z, z)
                np.subtract(1, dcap, out=dcap)
            z *= dt(softcap)
        here = (target >= v0) & (target < v1)
        i, j = rows[here], target[here] - v0
        picked[i] = z[i, j]
        if need_h:
            w_target[i] = w[j] if softcap is None else w[j] * dcap[i, j][:, None]
        lse = kernels.softmax_rows(z).astype(np.float64)                      # z -> softmax over the panel
        m_new = np.maximum(m, lse)
        alpha, c = np.exp(m - m_new), np.exp(lse - m_new)                     # alpha 0 on the first panel
        s = s * alpha + c
        m = m_new
        if need_h:
            if softcap is not None:
                z *= dcap
            if (alpha != 1).any():
                acc *= alpha.astype(h.dtype)[:, None]
            np.matmul(z, w, out=part)                                         # (M, C)
            part *= c.astype(h.dtype)[:, None]
            acc += part
    total = float((m + np.log(s) - picked).sum())
    if not need_h:
        return total, None
    acc /= s.astype(h.dtype)[:, None]
    acc -= w_target
    return total, acc


def causal_lm_head_loss(h, weight, labels, ignore_index=-100, softcap=None):
    """causal_lm_loss(cap(h Wᵀ), labels) without the (B, T, V) logits: h (B, T, C), weight (V, C), a
    Tensor or a quantized head's frozen weight (lora_np.quant.QuantizedWeight: its blocks, never
    dequantized whole); `softcap` c (None: none) caps the logits at c·tanh(z/c) (final_logit_softcapping)."""
    _, softcap = check_sliding_window_softcap("causal_lm_head_loss", None, softcap)
    labels = np.asarray(labels.data if isinstance(labels, Tensor) else labels)
    B, T, C = h.shape
    target = Tensor(np.concatenate([labels[:, 1:], np.full((B, 1), ignore_index, labels.dtype)], 1).reshape(-1))
    h = reshape(h, (B * T, C))                                                                     # (B·T, C)
    if hasattr(weight, "ggml_type"):  # a QuantizedWeight
        if weight.shape[1] != C or weight.dtype != h.dtype:
            raise ValueError(f"causal_lm_head_loss: quantized head {weight} does not take h of shape (B, T, {C}) "
                             f"and dtype {h.dtype}")
        return LinearCrossEntropy.apply(h, None, target, ignore_index=ignore_index, softcap=softcap,
                                        blocks=weight.blocks, ggml_type=weight.ggml_type)
    return LinearCrossEntropy.apply(h, weight, target, ignore_index=ignore_index, softcap=softcap)


# -- normalisation ---------------------------------------------------------------------
class LayerNorm(Function):
    """Normalise over the last dim: (x - mean) / sqrt(var + eps) · weight + bias."""

    def forward(self, x, weight=None, bias=None, eps=1e-5):
        mu = x.mean(-1, keepdims=True)                                   # (..., 1)
        xhat = x - mu
        var = np.einsum("...i,...i->...", xhat, xhat)[..., None] / xhat.shape[-1]
        rstd = 1 / np.sqrt(var + eps)                                    # (..., 1)
        xhat *= rstd
        self.x, self.mu, self.rstd = x, mu, rstd  # xhat is recomputed in backward
        self.weight, self.has_bias = weight, bias is not None
        if weight is not None:
            xhat *= weight
        if bias is not None:
            xhat += bias
        return xhat

    def backward(self, g):
        rstd, w = self.rstd, self.weight
        xhat = self.x - self.mu
        xhat *= rstd
        lead = tuple(range(g.ndim - 1))
        gw = (g * xhat).sum(lead) if w is not None and self.needs_input_grad[1] else None
        gb = g.sum(lead) if self.has_bias and self.needs_input_grad[2] else None
        gx = None
        if self.needs_input_grad[0]:
            gh = g * w if w is not None else g.copy()
            c = np.einsum("...i,...i->...", gh, xhat)[..., None] / g.shape[-1]
            gh -= gh.mean(-1, keepdims=True)
            xhat *= c
            gh -= xhat
            gh *= rstd
            gx = gh
        return gx, gw, gb


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(input.shape[-len(normalized_shape):]) != normalized_shape:
        raise ValueError(f"layer_norm: input shape {input.shape} does not end in {normalized_shape}")
    args = _tensors("layer_norm", input, *(t for t in (weight, bias) if t is not None))
    x = args[0]
    _check_float("layer_norm", x)
    k = int(np.prod(normalized_shape))
    lead = x.shape[:-len(normalized_shape)]
    x = reshape(x, lead + (k,))
    w = reshape(args[1], (k,)) if weight is not None else None
    b = reshape(args[-1], (k,)) if bias is not None else None
    out = LayerNorm.apply(x, w, b, eps=eps)
    return reshape(out, input.shape)


class RMSNorm(Function):
    """x / sqrt(mean(x²) + eps) · weight over the last dim (transformers' LlamaRMSNorm); one pass per
    row in the C core (kernels.rms_norm_forward / _backward)."""

    def forward(self, x, weight=None, eps=1e-6):
        out, self.rstd = kernels.rms_norm_forward(x, weight, eps)     # rstd (...,): one scalar per row
        self.x, self.weight = x, weight  # xhat is recomputed in backward
        return out

    def backward(self, g):
        w = self.weight
        return kernels.rms_norm_backward(g, self.x, w, self.rstd, self.needs_input_grad[0],
                                         w is not None and self.needs_input_grad[1])


def rms_norm(input, normalized_shape, weight=None, eps=None):
    normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(normalized_shape) != 1 or input.shape[-1] != normalized_shape[0]:
        raise ValueError(f"rms_norm: input shape {input.shape} does not end in {normalized_shape}")
    args = _tensors("rms_norm", input, *([weight] if weight is not None else []))
    _check_float("rms_norm", args[0])
    if weight is not None and args[1].shape != normalized_shape:
        raise ValueError(f"rms_norm: weight shape {args[1].shape} is not normalized_shape {normalized_shape}")
    if eps is None:
        eps = float(np.finfo(args[0].dtype).eps)
    return RMSNorm.apply(*args, eps=eps)


# -- dropout ---------------------------------------------------------------------------
_default_generator = [None]  # np.random.default_rng(0) on first use: numpy.random costs ~20 ms to import


def manual_seed(seed):
    """Seed the generator that dropout uses when no generator is given."""
    _default_generator[0] = np.random.default_rng(seed)
    return _default_generator[0]


def default_generator():
    if _default_generator[0] is None:
        _default_generator[0] = np.random.default_rng(0)
    return _default_generator[0]


class Dropout(Function):
    """Keep where U >= p for U uniform float32 from the generator (so float32 and float64 get the
    same mask from the same seed), scale kept elements by 1/(1-p). Saves the bool mask only."""

    def forward(self, x, p, generator):
        self.keep = generator.random(x.shape, dtype=np.float32) >= p
        self.scale = x.dtype.type(1 / (1 - p))
        out = x * self.keep
        out *= self.scale
        return out

    def backward(self, g):
        out = g * self.keep
        out *= self.scale
        return out


def dropout(input, p=0.5, training=True, generator=None):
    """Zero elements with probability p and scale the rest by 1/(1-p); identity in eval."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return input
    (x,) = _tensors("dropout", input)
    _check_float("dropout", x)
    return Dropout.apply(x, p=p, generator=generator or default_generator())
