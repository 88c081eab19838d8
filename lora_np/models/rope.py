"""Rotary position embedding: the inverse frequencies of every RoPE type transformers 5 has for the Llama-like
families (default, linear, dynamic, yarn, longrope, llama3), computed as its modeling_rope_utils.py computes them
(`_compute_*_parameters`, and `dynamic_rope_update` for the types that depend on the sequence length), and the
cos/sin tables built from them, attention scaling included. Angles are computed in float64.

A config keeps RoPE as transformers 5's `rope_parameters` splits it: `rope_theta` and `rope_scaling`, the rest
of the dict ({"rope_type": ..., "factor": ..., ...}, None for the default RoPE); `check_rope_scaling` reads the
config.json forms (transformers 5's `rope_parameters`, the older `rope_scaling` with "type" or "rope_type").
"""
import math

import numpy as np

__all__ = ["ROPE_TYPES", "check_rope_scaling", "rotary_dim", "inv_freq", "llama3_freq_factors", "RopeTables"]

# rope_type -> the keys of rope_parameters it reads (besides rope_type, rope_theta and partial_rotary_factor)
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"),
    "longrope": ("short_factor", "long_factor", "factor", "attention_factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
             "longrope": ("short_factor", "long_factor"),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
_OPTIONAL_NUMBERS = ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def _number(where, key, value, positive=True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
            (positive and value <= 0):
        raise ValueError(f"{where}: rope_parameters {key} must be a {'positive ' if positive else ''}number, "
                         f"got {value!r}")
    return value


def check_rope_scaling(rope, head_dim, max_position_embeddings, where):
    """The checked rope_scaling dict (rope_type and what that type reads; None for the default RoPE with all dims
    rotated) of a config.json's rope_parameters / rope_scaling dict (None: default). As transformers'
    standardize_rope_params, the legacy key "type" names the type and original_max_position_embeddings defaults
    to max_position_embeddings for yarn, longrope and llama3. ValueError naming a bad value, NotImplementedError
    naming a rope_type this module does not compute."""
    if rope is None:
        return None
    if not isinstance(rope, dict):
        raise ValueError(f"{where}: rope_scaling must be an object or null, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise NotImplementedError(f"{where}: rope_parameters rope_type = {rope_type!r} is not supported "
                                  f"(supported: {', '.join(ROPE_TYPES)})")
    out = {"rope_type": rope_type}
    for key in ROPE_TYPES[rope_type]:
        if rope.get(key) is not None:
            out[key] = rope[key]
    for key in _REQUIRED.get(rope_type, ()):
        if key not in out and not (key == "factor" and rope_type == "yarn"):
            raise ValueError(f"{where}: rope_parameters of rope_type {rope_type!r} needs {key!r}")
    for key in _OPTIONAL_NUMBERS:
        if key in out:
            _number(where, key, out[key])
    for key in ("low_freq_factor", "high_freq_factor"):
        if key in out:
            _number(where, key, out[key], positive=False)
    if rope_type in ("yarn", "longrope", "llama3"):
        out["original_max_position_embeddings"] = int(_number(where, "original_max_position_embeddings", rope.get(
            "original_max_position_embeddings", max_position_embeddings)))
    if rope_type == "llama3" and out["high_freq_factor"] == out["low_freq_factor"]:
        raise ValueError(f"{where}: rope_parameters high_freq_factor and low_freq_factor must differ (llama3)")
    if "truncate" in out and not isinstance(out["truncate"], bool):
        raise ValueError(f"{where}: rope_parameters truncate must be true or false, got {out['truncate']!r}")
    partial = rope.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        _number(where, "partial_rotary_factor", partial)
        if partial > 1 or int(head_dim * partial) % 2 or int(head_dim * partial) == 0:
            raise ValueError(f"{where}: rope_parameters partial_rotary_factor {partial} of head_dim {head_dim} "
                             "must give an even number of rotated dims")
        out["partial_rotary_factor"] = partial
    rd = rotary_dim(out, head_dim)
    for key in ("short_factor", "long_factor"):
        if key in out:
            f = out[key]
            if not isinstance(f, list) or len(f) != rd // 2 or \
                    not all(_number(where, key, x) for x in f):
                raise ValueError(f"{where}: rope_parameters {key} must be a list of {rd // 2} positive numbers, "
                                 f"got {f!r:.80}")
    if rope_type == "default" and "partial_rotary_factor" not in out:
        return None
    return out


def rotary_dim(scaling, head_dim):
    """The number of leading dims of a head that RoPE rotates (transformers: int(head_dim * partial_rotary_factor))."""
    return int(head_dim * (scaling or {}).get("partial_rotary_factor", 1.0))


def inv_freq(rope_theta, scaling, head_dim, max_position_embeddings, seq_len=None):
    """(inv_freq (rd/2,), attention_scaling) as transformers' _compute_<rope_type>_parameters; seq_len is the
    sequence length that dynamic and longrope depend on (None: at initialisation)."""
    scaling = scaling or {"rope_type": "default"}
    rope_type, base = scaling["rope_type"], float(rope_theta)
    dim = rotary_dim(scaling, head_dim)
    exponent = np.arange(0, dim, 2, dtype=np.float64) / dim                                   # (rd/2,)
    factor = scaling.get("factor")
    if rope_type == "dynamic":
        seq_len = max(seq_len or max_position_embeddings, max_position_embeddings)
        base = base * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
    inv = 1.0 / (base ** exponent)
    attention_scaling = 1.0
    if rope_type == "linear":
        inv = inv / factor
    elif rope_type == "llama3":
        inv = _llama3(inv, scaling)
    elif rope_type == "yarn":
        inv, attention_scaling = _yarn(base, exponent, dim, scaling, max_position_embeddings)
    elif rope_type == "longrope":
        original = scaling["original_max_position_embeddings"]
        factors = scaling["long_factor" if seq_len and seq_len > original else "short_factor"]
        inv = 1.0 / (np.asarray(factors, np.float64) * base ** exponent)
        factor = factor if factor is not None else max_position_embeddings / original
        attention_scaling = scaling.get("attention_factor")
        if attention_scaling is None:
            attention_scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return inv, attention_scaling


def _llama3(inv, scaling):
    """Llama 3.1's frequency bands: long wavelengths divided by factor, short ones kept, a smooth ramp between."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv
    inv_llama = np.where(wavelen > low_freq_wavelen, inv / factor, inv)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, inv_llama)


def llama3_freq_factors(rope_theta, scaling, head_dim):
    """(head_dim/2,) float32: llama.cpp's rope_freqs tensor for a llama3 rope_scaling, the divisors of the default
    frequencies, computed in float32 as convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors computes them:
    1 for short wavelengths, factor for long ones, 1 / ((1 - smooth) / factor + smooth) between."""
    f32 = np.float32
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    freqs = f32(1) / f32(rope_theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim))   # (head_dim/2,)
    wavelen = f32(2 * math.pi) / freqs
    smooth = (f32(old_context_len) / wavelen - f32(low)) / f32(high - low)
    medium = f32(1) / ((f32(1) - smooth) / f32(factor) + smooth)
    return np.where(wavelen < high_freq_wavelen, f32(1),
                    np.where(wavelen > low_freq_wavelen, f32(factor), medium)).astype(f32)


def _yarn(base, exponent, dim, scaling, max_position_embeddings):
    """YaRN: interpolated (divided by factor) and extrapolated frequencies blended by a linear ramp over the dims
    between the correction range [low, high], and the attention factor (mscale)."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor")
    if factor is None:
        factor = max_position_embeddings / original

    def get_mscale(scale, mscale=1):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)) \
            if mscale and mscale_all_dim else get_mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(num_rotations):
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)     # (rd/2,)
    pos_freqs = base ** exponent
    extrapolation = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, attention_factor


class RopeTables:
    """cos/sin (T, rd) for positions [start, start + T), rotate-half layout, multiplied by the attention scaling,
    as transformers' rotary embedding computes them: one table per dtype, grown on demand. `rope_scaling` is a
    check_rope_scaling dict (None: default RoPE on all dims); `freq_factors` (rd/2,) divides the frequencies
    (llama.cpp's rope_freqs tensor). For dynamic and longrope the frequencies follow the sequence length of each
    call (start + T) as transformers' dynamic_rope_update does, state included: dynamic keeps the frequencies of
    the longest sequence seen until a call is shorter than max_position_embeddings again."""

    def __init__(self, head_dim, rope_theta, rope_scaling=None, max_position_embeddings=None, freq_factors=None):
        self.head_dim, self.rope_theta, self.scaling = head_dim, rope_theta, rope_scaling
        self.rope_type = (rope_scaling or {}).get("rope_type", "default")
        self.max_position_embeddings = max_position_embeddings
        if self.rope_type in ("dynamic", "yarn", "longrope") and max_position_embeddings is None:
            raise ValueError(f"RopeTables: rope_type {self.rope_type!r} needs max_position_embeddings")
        self.freq_factors = None if freq_factors is None else np.asarray(freq_factors, np.float64)
        # frequencies computed when first needed (a model is built before its size is checked against a file)
        self.inv_freq = self.original_inv_freq = self.long_inv_freq = None
        self.max_seq_len_cached = max_position_embeddings
        self.tables = {}

    def _inv_freq(self, seq_len):
        inv, scaling = inv_freq(self.rope_theta, self.scaling, self.head_dim, self.max_position_embeddings, seq_len)
        if self.freq_factors is not None:
            if self.freq_factors.shape != inv.shape:
                raise ValueError(f"RopeTables: freq_factors has shape {self.freq_factors.shape}, expected "
                                 f"{inv.shape} (rotary dim / 2)")
            inv = inv / self.freq_factors
        return inv, scaling

    def _set(self, inv):
        if inv is not self.inv_freq:
            self.inv_freq, self.tables = inv, {}

    def _update(self, seq_len):
        """transformers' dynamic_rope_update: the frequencies for a call whose positions end at seq_len."""
        if self.original_inv_freq is None:
            self.original_inv_freq, self.attention_scaling = self._inv_freq(None)
            self.inv_freq = self.original_inv_freq
        original = self.max_position_embeddings
        if self.rope_type == "dynamic":
            if seq_len > self.max_seq_len_cached:  # growth
                inv, self.attention_scaling = self._inv_freq(seq_len)
                self._set(inv)
                self.max_seq_len_cached = seq_len
            elif seq_len < original < self.max_seq_len_cached:  # back within the original length: reset
                self._set(self.original_inv_freq)
                self.max_seq_len_cached = original
        elif self.rope_type == "longrope":
            if seq_len > self.scaling["original_max_position_embeddings"]:
                if self.long_inv_freq is None:
                    self.long_inv_freq = self._inv_freq(self.scaling["original_max_position_embeddings"] + 1)[0]
                self._set(self.long_inv_freq)
            else:
                self._set(self.original_inv_freq)

    def get(self, start, length, dtype):
        self._update(start + length)
        dtype = np.dtype(dtype)
        cos, sin = self.tables.get(dtype, (None, None))
        if cos is None or cos.shape[0] < start + length:
            n = max(start + length, 2 * (cos.shape[0] if cos is not None else 0), 256)
            freqs = np.outer(np.arange(n, dtype=np.float64), self.inv_freq)                # (n, rd/2)
            emb = np.concatenate([freqs, freqs], axis=-1)                                   # (n, rd)
            cos = (np.cos(emb) * self.attention_scaling).astype(dtype)
            sin = (np.sin(emb) * self.attention_scaling).astype(dtype)
            self.tables[dtype] = cos, sin
        return cos[start:start + length], sin[start:start + length]                          # (T, rd)
