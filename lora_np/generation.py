"""Text generation with a KV cache: the prompt is run once, then one token per step.

The option rules below are the ones `lora-np generate` checks at parse time: a value outside
them raises OptionError naming the parameter, in the API as on the command line."""
import numpy as np

from .nn import KVCache
from .options import Float, Int, OptionError
from .tensor import Tensor, no_grad

__all__ = ["generate", "sample_next", "context_length",
           "MAX_NEW_TOKENS", "TEMPERATURE", "TOP_K", "TOP_P", "SEED"]

MAX_NEW_TOKENS = Int(min=1)                               # transformers refuses max_new_tokens <= 0
TEMPERATURE = Float(min=0, none_ok=True)                  # 0 or None: greedy
TOP_K = Int(min=0, none_ok=True)                          # 0 or None: no top-k filter (transformers' 0)
TOP_P = Float(min=0, min_open=True, max=1, none_ok=True)  # None or 1: no top-p filter
SEED = Int(min=0, none_ok=True)                           # numpy.random.default_rng refuses negative seeds


def context_length(config):
    """(positions, config field) the model was built for: GPT-2's n_positions (a learned
    table: positions past it do not exist) or Llama's max_position_embeddings."""
    for name in ("n_positions", "max_position_embeddings"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name)), name
    return None, None


def sample_next(logits, rng, temperature=0.0, top_k=None, top_p=None):
    """Next token ids (B,) from last-position logits (B, V): greedy when temperature is 0
    or None, else softmax(logits / temperature) restricted to the top_k most likely
    tokens and to the smallest set whose probability reaches top_p (transformers' order:
    temperature, then top-k, then top-p). Option values outside TEMPERATURE, TOP_K and
    TOP_P raise OptionError; logits with NaN or +inf, or a row with no finite value, raise
    ValueError (they would pick an arbitrary token)."""
    temperature = TEMPERATURE.check("temperature", temperature)
    top_k = TOP_K.check("top_k", top_k)
    top_p = TOP_P.check("top_p", top_p)
    logits = np.asarray(logits)
    if logits.dtype.kind != "f":
        logits = logits.astype(np.float64)
    if logits.ndim != 2 or logits.shape[-1] == 0:
        raise ValueError(f"sample_next: logits must be (B, V) with V >= 1, got shape {logits.shape}")
    top = logits.max(-1, keepdims=True)                                   # (B, 1)
    if np.isnan(logits).any() or not np.isfinite(top).all():
        raise ValueError("sample_next: the logits contain NaN or +inf, or a row has no finite value "
                         "(are the model's weights finite?)")
    if not temperature:
        return logits.argmax(-1)  # the float64 copy below would pick the same (exact conversion, same ties)
    logits, top = logits.astype(np.float64), top.astype(np.float64)
    with np.errstate(over="ignore"):
        logits = (logits - top) / temperature  # <= 0 with the top at 0: no inf - inf for tiny temperatures
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
    every row has produced `eos_token_id` (rows that finished are padded with it).
    Options outside MAX_NEW_TOKENS, TEMPERATURE, TOP_K, TOP_P, SEED raise OptionError, as
    does a prompt + max_new_tokens longer than the model's context; ids that are not
    integers within the model's vocabulary raise ValueError. The cache is dropped and every position recomputed
    when the model's `cache_invalid(past, total)` says that a cache of `past` positions cannot serve a sequence of
    `total` (Phi-3's longrope)."""
    max_new_tokens = MAX_NEW_TOKENS.check("max_new_tokens", max_new_tokens)
    for name, rule, value in (("temperature", TEMPERATURE, temperature), ("top_k", TOP_K, top_k),
                              ("top_p", TOP_P, top_p)):
        rule.check(name, value)
    seed = SEED.check("seed", seed)
    ids = np.asarray(input_ids.data if isinstance(input_ids, Tensor) else input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must be a non-empty (T,) or (B, T) array, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"generate: input_ids must be integers, got dtype {ids.dtype}")
    vocab = model.config.vocab_size
    bad = np.argwhere((ids < 0) | (ids >= vocab))
    if len(bad):
        where = tuple(int(i) for i in bad[0])
        raise ValueError(f"generate: input_ids{list(where)} = {ids[where]} is outside the vocabulary [0, {vocab})")
    ids = ids.astype(np.int64)
    n_ctx, field = context_length(model.config)
    if n_ctx is not None and ids.shape[1] + max_new_tokens > n_ctx:
        raise OptionError(f"max_new_tokens {max_new_tokens} after a prompt of {ids.shape[1]} tokens exceeds "
                          f"the model's context of {n_ctx} positions ({field})")
    eos = set() if eos_token_id is None else set(np.atleast_1d(eos_token_id).tolist())
    rng = np.random.default_rng(seed)
    cache = KVCache()
    done = np.zeros(ids.shape[0], dtype=bool)
    out = [ids]
    step_input = ids
    for _ in range(max_new_tokens):
        if model.cache_invalid(cache.seq_len(), cache.seq_len() + step_input.shape[1]):
            cache, step_input = KVCache(), np.concatenate(out, axis=1)  # every position recomputed
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
