"""llama.cpp's reference quantizers in NumPy, bit for bit: a float matrix [rows, cols] -> its ggml blocks
uint8 [rows, row bytes].

- q8_0, q4_0, q5_0: as gguf-py's ``gguf.quants.quantize`` (itself ggml's quantize_row_*_ref);
- q4_k: as ggml's ``quantize_row_q4_K_ref`` (gguf-py has none); q5_0 is what llama.cpp falls back to
  for a q4_k tensor whose rows are not whole 256-element superblocks;
- bf16, f16: the float32 values rounded to nearest even (bf16 as ggml_compute_fp32_to_bf16, NaN made
  quiet; f16 as NumPy's and gguf-py's float16 cast), two bytes each: lossless for a checkpoint whose
  weights are bf16 (Llama 3.2, Qwen3, Gemma ship so) or f16.

A leaf module (NumPy only, no lora_np import): lora_np.gguf's writer, lora_np.quant and lora_np.safetensors's
float32_to_bf16 use it.
"""
import numpy as np

QUANTIZE_TYPES = ("q8_0", "q4_0", "q4_k", "bf16", "f16")  # what quantize_model / load_model(quantize=) offer
BLOCK_SIZES = {"Q8_0": 32, "Q4_0": 32, "Q5_0": 32, "Q4_K": 256, "BF16": 1, "F16": 1}  # elements per block

_ROWS = 4096  # rows quantized per step: the quantizers' temporaries (about twice their input) stay a slice's


def quantize(weight, ggml_type):
    """blocks uint8 [rows, row bytes] of a float matrix [rows, cols] in ggml_type ("q8_0", "q4_0",
    "q4_k", "q5_0", "bf16", "f16"; any case), bit for bit as llama.cpp's reference quantizers. cols must
    be whole blocks."""
    t = ggml_type.upper()
    if t not in _QUANTIZERS:
        raise ValueError(f"quantize: type {ggml_type!r} is not supported; supported: {', '.join(QUANTIZE_TYPES)}")
    w = np.asarray(weight)
    block = BLOCK_SIZES[t]
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"quantize: {t} needs a 2-D weight whose rows are whole blocks of {block}, "
                         f"got shape {w.shape}")
    out = None
    for i in range(0, w.shape[0], _ROWS):  # ggml quantizes rows independently: the same bytes, a slice's temporaries
        x = np.ascontiguousarray(w[i:i + _ROWS], dtype=np.float32).reshape(-1, block)  # (n_blocks, block)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            blocks = _QUANTIZERS[t](x).reshape(min(_ROWS, w.shape[0] - i), -1)            # (rows, row bytes)
        out = np.empty((w.shape[0], blocks.shape[1]), np.uint8) if out is None else out
        out[i:i + _ROWS] = blocks
    if out is None:  # no rows: the row bytes are the quantizer's for one block
        with np.errstate(divide="ignore", invalid="ignore"):
            block_bytes = _QUANTIZERS[t](np.zeros((1, block), np.float32)).size
        out = np.zeros((0, w.shape[1] // block * block_bytes), np.uint8)
    return out


def _f16_bytes(d):
    """(n,) float32 -> (n, 2) uint8: IEEE half, round to nearest even (GGML_FP32_TO_FP16)."""
    return d.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _quantize_bf16(x):  # ggml_compute_fp32_to_bf16: a NaN keeps its top bits and is made quiet; round half to even
    """float32 (n, 1) -> (n, 2) uint8 bf16; also lora_np.safetensors.float32_to_bf16's rounding."""
    n = x.view(np.uint32)                                                               # (n, 1)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & 0xFFFF0000) | 0x00400000, n)
    n = (n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.astype(np.uint16).view(np.uint8)                                           # (n, 2)


def _signed_absmax(x):
    """(n, 32) -> (n,): the element of largest magnitude (the first of equals), with its sign."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0]


def _quantize_q8_0(x):  # d = absmax / 127, q = round(x / d) half away from zero
    d = np.abs(x).max(axis=1) / np.float32(127)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / d)[:, None]
    v = x * inv
    a = np.abs(v)
    q = np.sign(v) * (np.floor(a) + np.floor(2 * (a - np.floor(a))))  # roundf
    return np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)


def _quantize_q4_0(x):  # d = max / -8, q = min(15, trunc(x / d + 8.5))
    d = _signed_absmax(x) / np.float32(-8)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / d)[:, None]
    q = np.trunc(x * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([_f16_bytes(d), q[:, :16] | (q[:, 16:] << np.uint8(4))], axis=1)


def _quantize_q5_0(x):  # d = max / -16, q = min(31, trunc(x / d + 16.5)), the fifth bits in qh
    d = _signed_absmax(x) / np.float32(-16)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / d)[:, None]
    q = np.trunc(x * inv + np.float32(16.5)).astype(np.uint8).clip(0, 31)
    qh = np.packbits(q >> np.uint8(4), axis=1, bitorder="little")                        # (n, 4)
    return np.concatenate([_f16_bytes(d), qh, (q[:, :16] & np.uint8(0x0F)) | (q[:, 16:] << np.uint8(4))], axis=1)


def _nearest_int(f):
    """ggml's nearest_int: round half to even through the float32 bits of f + 1.5·2^23."""
    return ((f.astype(np.float32) + np.float32(12582912.0)).view(np.int32) & 0x7FFFFF) - 0x400000


def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    """ggml's make_qkx2_quants on each row of x (n, 32) with weights w: (scale, -min, L), float32
    operations in ggml's order (each sum over a row is sequential)."""
    f32 = np.float32
    lo, hi, sum_w = x[:, 0].copy(), x[:, 0].copy(), w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, x.shape[1]):
        lo = np.where(x[:, i] < lo, x[:, i], lo)
        hi = np.where(x[:, i] > hi, x[:, i], hi)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    lo = np.where(lo > 0, f32(0), lo)
    flat = hi == lo

    def levels(iscale, mn):
        return np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)     # (n, 32)

    def error(scale, mn, L):
        total = np.zeros(len(x), f32)
        for i in range(x.shape[1]):
            diff = scale * L[:, i].astype(f32) + mn - x[:, i]
            total = total + w[:, i] * (diff * diff)
        return total

    iscale = f32(nmax) / (hi - lo)
    scale, mn = f32(1) / iscale, lo
    L = levels(iscale, mn)
    best = error(scale, mn, L)
    for step in range(nstep + 1):  # each step starts from the best (scale, min) so far, as ggml's loop
        Laux = levels((f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (hi - mn), mn)
        sum_l, sum_l2, sum_xl = (np.zeros(len(x), f32) for _ in range(3))
        for i in range(x.shape[1]):
            wl = w[:, i] * Laux[:, i].astype(f32)
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * Laux[:, i].astype(f32)
            sum_xl = sum_xl + wl * x[:, i]
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
        this_min = np.where(positive, f32(0), this_min)
        cur = error(this_scale, this_min, Laux)
        better = (D > 0) & (cur < best)
        L = np.where(better[:, None], Laux, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    return np.where(flat, f32(0), scale), np.where(flat, -lo, -mn), np.where(flat[:, None], 0, L)


def _quantize_q4_k(x):  # ggml's quantize_row_q4_K_ref: 8 sub-blocks of 32, 6-bit scales and mins
    n = len(x)
    sub = x.reshape(n * 8, 32)
    sum_x2 = np.zeros(n * 8, np.float32)
    for i in range(32):
        sum_x2 = sum_x2 + sub[:, i] * sub[:, i]
    weights = np.sqrt(sum_x2 / np.float32(32))[:, None] + np.abs(sub)
    scales, mins, L = _make_qkx2_quants(sub, weights, 15, -1.0, 0.1, 20)
    scales, mins, L = scales.reshape(n, 8), mins.reshape(n, 8), L.reshape(n, 8, 32)
    max_scale = np.maximum(scales.max(axis=1), 0)
    max_min = np.maximum(mins.max(axis=1), 0)
    inv_scale = np.where(max_scale > 0, np.float32(63) / max_scale, np.float32(0))
    inv_min = np.where(max_min > 0, np.float32(63) / max_min, np.float32(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)  # (n, 8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    packed = np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                             (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], axis=1)       # (n, 12)
    d, dmin = (max_scale / np.float32(63)).astype(np.float16), (max_min / np.float32(63)).astype(np.float16)
    dd = d.astype(np.float32)[:, None] * ls.astype(np.float32)                            # (n, 8)
    dm = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    requant = np.clip(_nearest_int((x.reshape(n, 8, 32) + dm[:, :, None]) / dd[:, :, None]), 0, 15)
    L = np.where((dd != 0)[:, :, None], requant, L).astype(np.uint8).reshape(n, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << np.uint8(4))).reshape(n, 128)
    return np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), packed, qs], axis=1)


_QUANTIZERS = {"Q8_0": _quantize_q8_0, "Q4_0": _quantize_q4_0, "Q5_0": _quantize_q5_0, "Q4_K": _quantize_q4_k,
               "BF16": _quantize_bf16, "F16": _f16_bytes}
