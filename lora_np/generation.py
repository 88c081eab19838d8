"""Text generation with a KV cache: the prompt is run once, then one token per step."""
import numpy as np

from .nn import KVCache
from .tensor import Tensor, no_grad

__all__ = ["generate", "sample_next"]


def sample_next(logits, rng, temperature=0.0, top_k=None, top_p=None):
    """Next token ids (B,) from last-position logits (B, V): greedy when temperature is 0
    or None, else softmax(logits / temperature) restricted to the top_k most likely
    tokens and to the smallest set whose probability reaches top_p (transformers' order:
    temperature, then top-k, then top-p)."""
    logits = np.asarray(logits, dtype=np.float64)
    if not temperature:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = np.sort(logits, axis=-1)[:, -min(top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(logits, axis=-1)                               # ascending
        sorted_logits = np.take_along_axis(logits, order, -1)
        p = np.exp(sorted_logits - sorted_logits.max(-1, keepdims=True))
        cum = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
        drop_sorted = cum <= 1 - top_p                                    # keeps at least the top token
        drop_sorted[:, -1] = False
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        logits = np.where(drop, -np.inf, logits)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


@no_grad()
def generate(model, input_ids, max_new_tokens=32, temperature=0.0, top_k=None, top_p=None, seed=None,
             eos_token_id=None):
    """Continue `input_ids` ((T,) or (B, T), rows of equal length) by up to `max_new_tokens`
    tokens. Returns the ids with the continuation appended ((B, T + n)). Greedy by default;
    `temperature` > 0 samples with a generator seeded by `seed`. Generation stops when
    every row has produced `eos_token_id` (rows that finished are padded with it)."""
    ids = np.asarray(input_ids.data if isinstance(input_ids, Tensor) else input_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must be a non-empty (T,) or (B, T) array, got shape {ids.shape}")
    eos = set() if eos_token_id is None else set(np.atleast_1d(eos_token_id).tolist())
    rng = np.random.default_rng(seed)
    cache = KVCache()
    done = np.zeros(ids.shape[0], dtype=bool)
    out = [ids]
    step_input = ids
    for _ in range(max_new_tokens):
        logits = model(step_input, cache=cache, logits_to_keep=1).logits.data[:, -1]   # (B, V)
        nxt = sample_next(logits, rng, temperature, top_k, top_p)
        if eos:
            pad = next(iter(eos))
            nxt = np.where(done, pad, nxt)
            done |= np.isin(nxt, list(eos))
        out.append(nxt[:, None])
        step_input = nxt[:, None]
        if eos and done.all():
            break
    return np.concatenate(out, axis=1)
