"""Scaled dot-product attention with grouped-query heads, the way flash attention keeps memory:
its NumPy reference, its C call (csrc/step_kernels.c) and its one dispatch point.

q (B, Hq, T, D), k and v (B, Hkv, S, D), Hq = Hkv·g. The g query heads that share a key/value
head are stacked as rows, (B, Hkv, T·g, D) position-major, so K and V are never repeated. Scores
are built for one block of query positions at a time (all batch elements and heads together); a
causal block only sees its first n = t1 + S − T keys, so the hidden upper triangle is (mostly)
never computed, and inside the block the causal limit of each row is applied by the row softmax
(rows.softmax_rows), not by a mask array. Nothing of size T × S is kept: forward returns the
output and each row's log-sum-exp, and backward recomputes the probabilities block by block
(rows.exp_rows). A row whose keys are all masked gives 0 (torch's safe softmax), not NaN.

Two options of the newer families: a sliding window W (Mistral, Qwen2, Gemma 2/3's local layers): query
row t, at absolute position p = t + S − T, sees key s only when s > p − W (transformers 5's
`sliding_window_overlay`, kv_idx > q_idx − W: W keys counting itself when causal), so a block of query
positions computes only the keys from its first row's lower edge to its last row's upper one (those
outside are never computed) and hides the rest of its edge inside the block; and a soft cap c (Gemma 2's
attn_logit_softcapping): scores c·tanh(s/c) of the scaled scores s, before the mask and the bias, whose
backward multiplies dS by 1 − tanh², recomputed from the block's scores.

The output is laid out in memory as (B, T, Hq, D), so the caller's transpose to (B, T, Hq·D) is
free, and the query gradient is returned in the query's own layout.

With the C backend and no bias (attention mask), forward and backward run whole in the C core
(the same blocks, register-tiled products, one (batch, key/value head) per thread, no NumPy calls
per block), window and soft cap included; the NumPy blocks are the reference and the path for masks.
"""
import numpy as np

from .backend import backend, c_int64s, call_c
from .checks import FLOAT_DTYPES, check_arrays
from .rows import exp_rows, softmax_rows

_BLOCK = 64  # query positions per block: bounds the scores' memory, and causal blocks skip hidden keys


def _in_c(q, bias):
    """The C core runs the op: the C backend, no bias, and q with a unit stride along D."""
    return bias is None and backend() == "c" and q.strides[-1] == q.itemsize


def attention_forward(q, k, v, scale, is_causal, bias=None, sliding_window=None, softcap=None):
    """softmax(cap(scale·q kᵀ) + bias [+ causal mask] [+ window]) v: out (B, T, Hkv, g, D), dense
    (= (B, T, Hq·D)), and lse (B, Hkv, T, g). q (B, Hq, T, D) with any strides, k, v dense (B, Hkv, S, D);
    bias None or (B or 1, Hkv or 1, g or 1, T, S). `is_causal` aligns the causal mask to the bottom right
    (query t sees keys up to t + S − T); `sliding_window` W (None: none) hides keys s <= t + S − T − W;
    `softcap` c (None: none) makes the scores c·tanh(s/c)."""
    if _in_c(q, bias):
        return _attention_forward_c(q, k, v, scale, is_causal, sliding_window, softcap)
    return _attention_forward_numpy(q, k, v, scale, is_causal, bias, sliding_window, softcap)


def attention_backward(g_out, q, k, v, out, lse, scale, is_causal, need_q=True, need_k=True, need_v=True,
                       bias=None, sliding_window=None, softcap=None):
    """Gradients (dq in q's memory layout, dk, dv dense), None where not needed, of attention_forward's
    output given g_out (B, Hq, T, D); out and lse are attention_forward's (same options)."""
    if _in_c(q, bias):
        if g_out.strides[-1] != g_out.itemsize:
            g_out = np.ascontiguousarray(g_out)
        return _attention_backward_c(g_out, q, k, v, out, lse, scale, is_causal, need_q, need_k, need_v,
                                     sliding_window, softcap)
    return _attention_backward_numpy(g_out, q, k, v, out, lse, scale, is_causal, need_q, need_k, need_v, bias,
                                     sliding_window, softcap)


# ---- NumPy reference -----------------------------------------------------------------------------


def _blocks(T, S, is_causal, window):
    """(t0, t1, k0, n, count0) of each block of query positions [t0, t1) that sees a key (the others'
    output is 0): it computes keys [k0, n) (k0 the window's lower edge for its first row, n the causal
    limit of its last), and its first row sees the first count0 of them before the window."""
    blocks = []
    for t0 in range(0, T, _BLOCK):
        t1 = min(t0 + _BLOCK, T)
        n = min(S, t1 + S - T) if is_causal else S
        k0 = max(0, t0 + S - T - window + 1) if window else 0
        if n > k0:
            blocks.append((t0, t1, k0, n, (t0 + 1 + S - T if is_causal else S) - k0))
    return blocks


def _scaled_rows(q, Hkv, scale):
    """scale·q as (B, Hkv, T, g, D): the g query heads of each key/value head, position-major."""
    B, Hq, T, D = q.shape
    g = Hq // Hkv
    return np.multiply(q.reshape(B, Hkv, g, T, D).transpose(0, 1, 3, 2, 4), scale,
                       out=np.empty((B, Hkv, T, g, D), q.dtype))


def _scores(qs, k, bias, t0, t1, k0, n, S, window, softcap, keep_tanh=False):
    """The scores of query positions [t0, t1) and keys [k0, n), (B·Hkv, tc·g, n − k0): scaled, capped
    (c·tanh(s/c)), plus the bias, -inf where the window hides a key (the causal limit is the row
    softmax's). With keep_tanh, also tanh(s/c) (same shape; None without a cap) for the backward."""
    B, Hkv, T, g, D = qs.shape
    tc, nk = t1 - t0, n - k0
    s = qs[:, :, t0:t1].reshape(B * Hkv, tc * g, D) @ np.swapaxes(k[:, :, k0:n].reshape(B * Hkv, nk, D), -1, -2)
    th = None
    if softcap:
        s /= s.dtype.type(softcap)
        np.tanh(s, out=s)
        th = s.copy() if keep_tanh else None
        s *= s.dtype.type(softcap)
    if bias is not None:  # bias (B or 1, Hkv or 1, g or 1, T, S)
        s.reshape(B, Hkv, tc, g, nk)[...] += bias[:, :, :, t0:t1, k0:n].transpose(0, 1, 3, 2, 4)
    if window:  # row t sees keys k0 + j > t + S − T − W
        hidden = np.arange(k0, n)[None, :] <= np.arange(t0, t1)[:, None] + S - T - window       # (tc, nk)
        if hidden.any():
            s.reshape(B * Hkv, tc, g, nk).transpose(0, 2, 1, 3)[:, :, hidden] = -np.inf
    return s, th


def _attention_forward_numpy(q, k, v, scale, is_causal, bias, window=None, softcap=None):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    qs = _scaled_rows(q, Hkv, scale)                                  # (B, Hkv, T, g, D) scaled
    out = np.zeros((B, T, Hkv, g, D), q.dtype)                        # = (B, T, Hq·D) in memory
    lse = np.full((B, Hkv, T, g), np.inf, q.dtype)                    # log-sum-exp per row
    for t0, t1, k0, n, count0 in _blocks(T, S, is_causal, window):
        p, _ = _scores(qs, k, bias, t0, t1, k0, n, S, window, softcap)  # (B·Hkv, tc·g, n − k0)
        lse[:, :, t0:t1] = softmax_rows(p, count0=count0, group=g, period=p.shape[1]).reshape(B, Hkv, t1 - t0, g)
        o = p @ v[:, :, k0:n].reshape(B * Hkv, n - k0, D)             # (B·Hkv, tc·g, D)
        out[:, t0:t1] = o.reshape(B, Hkv, t1 - t0, g, D).transpose(0, 2, 1, 3, 4)
    return out, lse


def _attention_backward_numpy(g_out, q, k, v, out, lse, scale, is_causal, need_q, need_k, need_v, bias,
                              window=None, softcap=None):
    Hkv, S = k.shape[1], k.shape[2]
    qs = _scaled_rows(q, Hkv, scale)                                  # recomputed, not saved
    B, Hkv, T, g, D = qs.shape
    go = g_out.reshape(B, Hkv, g, T, D).transpose(0, 1, 3, 2, 4)     # (B, Hkv, T, g, D), qs' layout
    delta = np.einsum("bhtgd,bthgd->bhtg", go, out)                   # (B, Hkv, T, g) = rowsum(dP·P)
    gq = np.zeros((B, T, Hkv, g, D), qs.dtype) if need_q else None
    gk = np.zeros_like(k) if need_k else None
    gv = np.zeros_like(v) if need_v else None
    for t0, t1, k0, n, count0 in _blocks(T, S, is_causal, window):
        tc, nk = t1 - t0, n - k0
        p, th = _scores(qs, k, bias, t0, t1, k0, n, S, window, softcap, keep_tanh=True)   # (B·Hkv, tc·g, nk)
        exp_rows(p, np.ascontiguousarray(lse[:, :, t0:t1]).reshape(B * Hkv, tc * g),
                 count0=count0, group=g, period=tc * g)               # probabilities
        gor = go[:, :, t0:t1].reshape(B * Hkv, tc * g, D)             # a copy
        if need_v:
            gv[:, :, k0:n] += (np.swapaxes(p, -1, -2) @ gor).reshape(B, Hkv, nk, D)
        if need_q or need_k:
            ds = gor @ np.swapaxes(v[:, :, k0:n].reshape(B * Hkv, nk, D), -1, -2)   # (B·Hkv, tc·g, nk) = dP
            ds -= delta[:, :, t0:t1].reshape(B * Hkv, tc * g, 1)
            ds *= p                                                   # dS / scale (of the capped scores)
            if th is not None:                                        # through the cap: · (1 − tanh²)
                th *= th
                np.subtract(1, th, out=th)
                ds *= th
            if need_q:
                gqr = ds @ k[:, :, k0:n].reshape(B * Hkv, nk, D)      # (B·Hkv, tc·g, D)
                gqr *= scale
                gq[:, t0:t1] = gqr.reshape(B, Hkv, tc, g, D).transpose(0, 2, 1, 3, 4)
            if need_k:
                gk[:, :, k0:n] += (np.swapaxes(ds, -1, -2) @ qs[:, :, t0:t1].reshape(B * Hkv, tc * g, D)).reshape(
                    B, Hkv, nk, D)
    gq = gq.transpose(0, 2, 3, 1, 4).reshape(g_out.shape) if need_q else None
    return gq, gk, gv


# ---- the C calls ---------------------------------------------------------------------------------


def _head_strides(a, g):
    """Strides in elements of a (B, Hkv·g, T, D)-like array, as (batch, kv head, position, query head in group)."""
    (sb, sh, st, sd), size = a.strides, a.itemsize
    if (sd != size and a.shape[-1] > 1 and a.size) or sb % size or sh % size or st % size or sd % size:
        raise ValueError(f"attention: an array of shape {a.shape} needs a unit stride along its last axis, "
                         f"got strides {a.strides}")
    return c_int64s([sb // size, g * (sh // size), st // size, sh // size])


def _attention_dims(q, k, v):
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"attention: {name} must be a numpy.ndarray, got {type(a).__name__}")
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"attention: {name} ({dict(q='query', k='key', v='value')[name]}) has dtype {a.dtype}; "
                            "expected float32 or float64")
        if a.dtype != q.dtype:
            raise TypeError(f"attention: {name} ({dict(q='query', k='key', v='value')[name]}) has dtype {a.dtype}, "
                            f"but q (query) has {q.dtype}")
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] \
            or k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: query {q.shape}, key {k.shape}, value {v.shape} must be (B, Hq, T, D), "
                         "(B, Hkv, S, D), (B, Hkv, S, D) with Hq a multiple of Hkv >= 1")
    check_arrays("attention", {}, {"k": k, "v": v})
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    return B, Hkv, Hq // Hkv, T, S, D


def _window_softcap(sliding_window, softcap):
    """The C core's window and cap: 0 for none; ValueError for a window < 1 or a cap that is not > 0."""
    if sliding_window is not None and (isinstance(sliding_window, bool) or int(sliding_window) != sliding_window
                                       or sliding_window < 1):
        raise ValueError(f"attention: sliding_window must be an integer >= 1 or None, got {sliding_window!r}")
    if softcap is not None and not (np.isfinite(softcap) and softcap > 0):
        raise ValueError(f"attention: softcap must be a finite number > 0 or None, got {softcap!r}")
    return float(softcap or 0.0), int(sliding_window or 0)


def _attention_forward_c(q, k, v, scale, is_causal, sliding_window=None, softcap=None):
    """softmax(cap(scale·q kᵀ) [+ causal mask] [+ window]) v in the C core, grouped-query heads (query head
    h·g + j uses key/value head h). q (B, Hq, T, D) with any strides but a unit one along D; k, v dense
    (B, Hkv, S, D). Returns out (B, T, Hkv, g, D), dense (= (B, T, Hq·D)), and lse (B, Hkv, T, g)."""
    cap, window = _window_softcap(sliding_window, softcap)
    B, Hkv, g, T, S, D = _attention_dims(q, k, v)
    out = np.empty((B, T, Hkv, g, D), q.dtype)
    lse = np.empty((B, Hkv, T, g), q.dtype)
    out_view = out.transpose(0, 2, 3, 1, 4).reshape(B, Hkv * g, T, D)
    call_c("attention_forward", out, lse, q, k, v, float(scale), int(bool(is_causal)), cap, window, B, Hkv, g, T, S,
           D, _head_strides(q, g), _head_strides(out_view, g))
    return out, lse


def _attention_backward_c(g_out, q, k, v, out, lse, scale, is_causal, need_q=True, need_k=True, need_v=True,
                          sliding_window=None, softcap=None):
    """Gradients (dq in q's memory layout, dk, dv dense), None where not needed, of _attention_forward_c's
    output given g_out (B, Hq, T, D) (any strides but a unit one along D)."""
    cap, window = _window_softcap(sliding_window, softcap)
    B, Hkv, g, T, S, D = _attention_dims(q, k, v)
    if not isinstance(g_out, np.ndarray) or g_out.dtype != q.dtype:
        raise TypeError(f"attention_backward: g_out must be a {q.dtype} numpy.ndarray, got "
                        f"{getattr(g_out, 'dtype', type(g_out).__name__)}")
    if g_out.shape != q.shape:
        raise ValueError(f"attention_backward: g_out has shape {g_out.shape}, expected {q.shape}")
    for name, a, shape in (("out", out, (B, T, Hkv, g, D)), ("lse", lse, (B, Hkv, T, g))):
        if not isinstance(a, np.ndarray) or a.dtype != q.dtype:
            raise TypeError(f"attention_backward: {name} must be a {q.dtype} numpy.ndarray (attention_forward's), "
                            f"got {getattr(a, 'dtype', type(a).__name__)}")
        if a.shape != shape or not a.flags.c_contiguous:
            raise ValueError(f"attention_backward: {name} must be attention_forward's dense {shape} array, got "
                             f"shape {a.shape}, strides {a.strides}")
    dq = np.empty_like(q) if need_q else None                  # q's layout: its transposes stay free
    dk = np.empty_like(k) if need_k else None
    dv = np.empty_like(v) if need_v else None
    if not (need_q or need_k or need_v):
        return None, None, None
    out_view = out.transpose(0, 2, 3, 1, 4).reshape(B, Hkv * g, T, D)
    dq_strides = _head_strides(dq, g) if need_q else c_int64s([0, 0, 0, 0])
    call_c("attention_backward", dq, dk, dv, g_out, q, k, v, out, lse, float(scale), int(bool(is_causal)), cap,
           window, B, Hkv, g, T, S, D, dq_strides, _head_strides(g_out, g), _head_strides(q, g),
           _head_strides(out_view, g))
    return dq, dk, dv
