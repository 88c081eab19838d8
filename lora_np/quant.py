"""A frozen base kept in GGUF's quantized blocks: QuantizedLinear, QuantizedEmbedding, quantize_model.

    model = quantize_model(model, "q4_k")      # every Linear and Embedding of a float model, in place
    layer = QuantizedLinear(blocks, "Q4_1", bias)  # blocks: uint8 [out_features, row bytes], as in a GGUF file

QuantizedLinear computes y = x Wᵀ + b and, in backward, dx = dy W (lora_np.kernels.quant: the C GEMMs
over the blocks, or the NumPy reference); the weight gets no gradient and is never held as floats.
QuantizedEmbedding dequantizes the rows it looks up. A tied LM head shares the embedding's blocks.
Both answer `.weight` with a QuantizedWeight (shape, dtype; `.data` dequantizes, for inspection).

Quantizers (quantize) equal llama.cpp's reference quantizers bit for bit: q8_0 and q4_0 as gguf-py's
``gguf.quants.quantize``, q4_k as ggml's ``quantize_row_q4_K_ref`` (gguf-py has none), and q5_0 (the
type llama.cpp falls back to for a q4_k tensor whose rows are not whole 256-element superblocks).
"""
import numpy as np

from .kernels.quant import QUANT_TYPES, check_blocks, dequantize_rows, quant_linear_backward, quant_linear_forward
from .nn import Conv1D, Embedding, Linear, Module, Parameter
from .tensor import Function, Tensor

QUANTIZE_TYPES = ("q8_0", "q4_0", "q4_k")
# llama.cpp's fallback (llama-quant.cpp) for a tensor whose rows are not whole blocks of the asked type
_FALLBACK = {"Q4_K": "Q5_0"}


class QuantLinear(Function):
    """y = x Wᵀ + b with W in blocks; x (..., in), b (out,). The input's gradient only (and the bias's
    when it is trainable): the quantized weight is frozen."""

    def forward(self, x, bias, blocks=None, ggml_type=None):
        self.blocks, self.ggml_type, self.xshape = blocks, ggml_type, x.shape
        y = quant_linear_forward(np.ascontiguousarray(x.reshape(-1, x.shape[-1])), blocks, ggml_type, bias)  # (N, out)
        return y.reshape(x.shape[:-1] + (blocks.shape[0],))

    def backward(self, g):
        g2 = np.ascontiguousarray(g.reshape(-1, g.shape[-1]))                                            # (N, out)
        gx = quant_linear_backward(g2, self.blocks, self.ggml_type).reshape(self.xshape) if self.needs_input_grad[0] \
            else None
        gb = g2.sum(0) if self.needs_input_grad[1] else None
        return gx, gb


class QuantizedWeight:
    """What `.weight` of a quantized layer answers: shape, dtype (the layer's float type), ggml_type, the
    blocks, and `.data`, W dequantized into a new float array (for inspection and export; the layer itself
    never makes one). It is frozen: assigning `.data` raises, so nothing merges into it unnoticed."""

    requires_grad = False
    grad = None

    def __init__(self, blocks, ggml_type, shape, dtype):
        self.blocks, self.ggml_type, self.shape, self.dtype = blocks, ggml_type, tuple(shape), np.dtype(dtype)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def data(self):
        return dequantize_rows(self.blocks, self.ggml_type, self.dtype)

    @data.setter
    def data(self, value):
        raise NotImplementedError(f"a {self.ggml_type} weight {self.shape} kept in its blocks cannot be assigned; "
                                  "load the model with dequantize=True to change its weights")

    def __repr__(self):
        return f"QuantizedWeight({self.ggml_type}, shape={self.shape}, dtype={self.dtype})"


class QuantizedLinear(Module):
    """A frozen Linear whose weight [out_features, in_features] stays in ggml blocks (`weight_blocks`,
    uint8 [out_features, row bytes], type `ggml_type`); bias (float, frozen) optional; `dtype`: the
    float type of its inputs and outputs (the model's)."""

    def __init__(self, blocks, ggml_type, bias=None, dtype=np.float32):
        super().__init__()
        self.out_features, self.in_features = check_blocks("QuantizedLinear", blocks, ggml_type)
        self.ggml_type, self.weight_blocks, self.dtype = ggml_type, blocks, np.dtype(dtype)
        if bias is not None and np.shape(bias) != (self.out_features,):
            raise ValueError(f"QuantizedLinear: bias has shape {np.shape(bias)}, expected ({self.out_features},)")
        self.bias = None if bias is None else Parameter(np.asarray(bias, self.dtype), requires_grad=False)
        self.weight = QuantizedWeight(blocks, ggml_type, (self.out_features, self.in_features), self.dtype)

    def forward(self, x):
        x = x if isinstance(x, Tensor) else Tensor(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear: input shape {x.shape} does not match in_features {self.in_features}")
        if x.dtype != self.dtype:
            raise TypeError(f"QuantizedLinear: input dtype {x.dtype} differs from the layer's {self.dtype}")
        return QuantLinear.apply(x, self.bias, blocks=self.weight_blocks, ggml_type=self.ggml_type)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"type={self.ggml_type}")


class QuantizedEmbedding(Module):
    """A frozen Embedding whose weight [num_embeddings, embedding_dim] stays in ggml blocks; a lookup
    dequantizes the rows it reads to `dtype`."""

    def __init__(self, blocks, ggml_type, dtype=np.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = check_blocks("QuantizedEmbedding", blocks, ggml_type)
        self.ggml_type, self.weight_blocks, self.dtype = ggml_type, blocks, np.dtype(dtype)
        self.weight = QuantizedWeight(blocks, ggml_type, (self.num_embeddings, self.embedding_dim), self.dtype)

    def forward(self, input_ids):
        ids = np.asarray(input_ids.data if isinstance(input_ids, Tensor) else input_ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"QuantizedEmbedding: input ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            raise IndexError(f"QuantizedEmbedding: ids must lie in [0, {self.num_embeddings}), got "
                             f"[{ids.min()}, {ids.max()}]")
        rows = dequantize_rows(self.weight_blocks[ids.reshape(-1)], self.ggml_type, self.dtype)  # (n, C)
        return Tensor(rows.reshape(ids.shape + (self.embedding_dim,)))

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.ggml_type}"


# ---- quantizers ---------------------------------------------------------------------------


def quantize(weight, ggml_type):
    """blocks uint8 [rows, row bytes] of a float matrix [rows, cols] in ggml_type ("q8_0", "q4_0",
    "q4_k", "q5_0"; any case), bit for bit as llama.cpp's reference quantizers. cols must be whole blocks."""
    t = ggml_type.upper()
    if t not in _QUANTIZERS:
        raise ValueError(f"quantize: type {ggml_type!r} is not supported; supported: {', '.join(QUANTIZE_TYPES)}")
    w = np.asarray(weight)
    block = 256 if t == "Q4_K" else 32
    if w.ndim != 2 or w.shape[1] % block:
        raise ValueError(f"quantize: {t} needs a 2-D weight whose rows are whole blocks of {block}, "
                         f"got shape {w.shape}")
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, block)  # (n_blocks, block)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _QUANTIZERS[t](x).reshape(w.shape[0], -1)


def _f16_bytes(d):
    """(n,) float32 -> (n, 2) uint8: IEEE half, round to nearest even (GGML_FP32_TO_FP16)."""
    return d.astype(np.float16).reshape(-1, 1).view(np.uint8)


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


_QUANTIZERS = {"Q8_0": _quantize_q8_0, "Q4_0": _quantize_q4_0, "Q5_0": _quantize_q5_0, "Q4_K": _quantize_q4_k}


# ---- whole models -------------------------------------------------------------------------


def quantize_model(model, ggml_type):
    """Replace every Linear, GPT-2 Conv1D and Embedding of a float model by its quantized form, in place,
    and return the model. A tied LM head shares its embedding's blocks. A weight whose rows are not
    whole blocks of ggml_type takes llama.cpp's fallback (q4_k -> q5_0) or, without one, stays float.
    LoRA adapters go on afterwards (a model that has them is refused)."""
    t = ggml_type.upper()
    if ggml_type.lower() not in QUANTIZE_TYPES:
        raise ValueError(f"quantize_model: type {ggml_type!r} is not supported; supported: {', '.join(QUANTIZE_TYPES)}")
    adapted = [name for name, m in model.named_modules() if hasattr(m, "lora_A")]
    if adapted:
        raise ValueError(f"quantize_model: the model already has LoRA layers ({adapted[0]}, ...); quantize the base "
                         "first, then add the adapter")
    blocks_of = {}
    for module in model.modules():
        if type(module) in (Linear, Conv1D, Embedding) and id(module.weight) not in blocks_of:
            w = module.weight.data.T if type(module) is Conv1D else module.weight.data                # [out, in]
            chosen = t if w.shape[1] % (256 if t == "Q4_K" else 32) == 0 else _FALLBACK.get(t)
            if chosen is not None and w.shape[1] % 32 == 0:
                blocks_of[id(module.weight)] = (quantize(w, chosen), chosen)
    return use_blocks(model, blocks_of)


def use_blocks(model, blocks_of):
    """Replace each Linear, Conv1D and Embedding whose weight Parameter p has blocks_of[id(p)] =
    (blocks [out, row bytes], ggml type) by a QuantizedLinear / QuantizedEmbedding holding those blocks
    (so a tied head shares its embedding's), keeping the bias and the dtype; returns the model."""
    for name, module in list(model.named_modules()):
        if type(module) not in (Linear, Conv1D, Embedding) or id(module.weight) not in blocks_of:
            continue
        blocks, ggml_type = blocks_of[id(module.weight)]
        dtype = module.weight.dtype
        if type(module) is Embedding:
            replacement = QuantizedEmbedding(blocks, ggml_type, dtype)
        else:
            replacement = QuantizedLinear(blocks, ggml_type, None if module.bias is None else module.bias.data, dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    return model


__all__ = ["QuantizedLinear", "QuantizedEmbedding", "QuantizedWeight", "QuantLinear", "quantize", "quantize_model",
           "use_blocks",
           "QUANTIZE_TYPES", "QUANT_TYPES"]
