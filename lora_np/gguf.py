"""A small, dependency-free reader and writer for llama.cpp's GGUF files (NumPy only).

    f = GGUFFile("model.gguf")
    f.metadata["llama.block_count"]          # 30
    f.value_types["llama.block_count"]       # ("UINT32", None): the key's GGUF type (and element type)
    f.tensors["blk.0.attn_q.weight"].shape   # (576, 576), NumPy (row-major) order
    w = f.load("blk.0.attn_q.weight")        # dequantized float32 ndarray

    write_gguf("out.gguf", {"general.architecture": "llama", ...},
               {"blk.0.attn_q.weight": (w, "Q8_0"), ...}, value_types={"llama.rope.freq_base": "FLOAT32"})

Layout (versions 2 and 3, little-endian): magic "GGUF", u32 version, u64 tensor
count, u64 key/value count, the key/value pairs, the tensor infos, padding to
`general.alignment` (default 32), then the data section. Strings are a u64 byte
length and UTF-8 bytes. A tensor info is its name, u32 n_dims, n_dims u64 dims
(fastest-varying first, so NumPy's shape is the reverse), u32 ggml type and a
u64 offset relative to the data section.

Metadata values become Python values: integers, floats, bools and strings as
such, arrays as lists (string arrays as lists of str), exactly what gguf-py's
`ReaderField.contents()` gives. Arrays of arrays are refused, as llama.cpp does.

Dequantization matches gguf-py's `gguf.quants.dequantize` bit for bit: the
same float32 operations in the same order, vectorised over many blocks at once.
Every offset and length read from the file is checked against the file size
before it is used; a bad file raises `GGUFError` naming the file and the problem.

The writer writes version 3 as gguf-py's GGUFWriter does (the same header, key/value and tensor-info
encoding, each tensor's data padded to the alignment), storing float arrays as F32 or F16 or quantized by
lora_np.quant (Q8_0, Q4_0, Q5_0 bit for bit as gguf-py's `gguf.quants.quantize`, Q4_K as ggml's reference).
A value's type is the one given in `value_types`, else the one llama.cpp's converter gives such a Python
value (int: UINT32, a negative one INT32, float: FLOAT32, list of int: ARRAY of INT32).
Tensor data must be laid out as llama.cpp's gguf.cpp requires: tensor i's offset is
exactly the sum of the sizes of tensors 0..i-1, each padded to `general.alignment`
(so no overlap, no misalignment, no gap beyond the padding, file order).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp refuses tensors with more dimensions
_MAX_BYTES = 2**63 - 1  # the largest array NumPy can describe

# GGUF metadata value types: id -> (name, struct format); STRING and ARRAY are special.
_VALUE_TYPES = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<?"),
    8: ("STRING", None), 9: ("ARRAY", None),
    10: ("UINT64", "<Q"), 11: ("INT64", "<q"), 12: ("FLOAT64", "<d"),
}
_STRING, _ARRAY, _UINT32 = 8, 9, 4

# ggml tensor types: id -> (name, elements per block, bytes per block), as in ggml.h.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}


class GGUFError(ValueError):
    """A GGUF file that is malformed, truncated or uses something this reader lacks."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple  # NumPy (row-major) order: GGUF's dims reversed
    ggml_type: str  # e.g. "Q4_1"
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buf, path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, problem):
        raise GGUFError(f"{self.path}: {problem}")

    def need(self, n, what):
        if n > self.size - self.pos:
            self.fail(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                      f"file has {self.size}")

    def unpack(self, fmt, what):
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, what):
        n = self.unpack("<Q", f"length of {what}")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} is not valid UTF-8 ({e})")

    def value(self, vtype, what):
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what)
        if vtype not in _VALUE_TYPES:
            self.fail(f"{what} has unknown value type {vtype}")
        return self.unpack(_VALUE_TYPES[vtype][1], what)

    def array(self, what):
        itype = self.unpack("<I", f"element type of {what}")
        count = self.unpack("<Q", f"length of {what}")
        if itype not in _VALUE_TYPES:
            self.fail(f"{what} has unknown element type {itype}")
        if itype == _ARRAY:
            self.fail(f"{what} is an array of arrays, which GGUF readers do not support")
        if itype == _STRING:
            self.need(count * 8, f"{count} strings of {what}")  # each is at least 8 bytes
            return [self.string(f"{what}[{i}]") for i in range(count)]
        fmt = _VALUE_TYPES[itype][1]
        size = struct.calcsize(fmt)
        self.need(count * size, f"{count} elements of {what}")
        values = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=self.pos)
        self.pos += count * size
        return values.tolist()


class GGUFFile:
    """A memory-mapped GGUF file: `.metadata`, `.tensors` and `.load(name)`."""

    def __init__(self, path):
        self.path = os.fspath(path)
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise GGUFError(f"{self.path}: truncated: {size} bytes is shorter than a GGUF header")
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(self._mm, self.path)
        magic = self._mm[:4]
        if magic != GGUF_MAGIC:
            cur.fail(f"bad magic {magic!r}, expected {GGUF_MAGIC!r}")
        cur.pos = 4
        self.version = cur.unpack("<I", "version")
        if self.version not in (2, 3):
            swapped = struct.unpack(">I", struct.pack("<I", self.version))[0]
            if swapped in (2, 3):
                cur.fail("big-endian GGUF files are not supported")
            cur.fail(f"unsupported GGUF version {self.version} (supported: 2, 3)")
        n_tensors = cur.unpack("<Q", "tensor count")
        n_kv = cur.unpack("<Q", "key/value count")
        self.metadata, self.value_types = _read_metadata(cur, n_kv)
        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if self.alignment == 0 or self.alignment & (self.alignment - 1):
            cur.fail(f"general.alignment {self.alignment} is not a power of two")
        infos = _read_tensor_infos(cur, n_tensors)
        self.data_offset = cur.pos + (-cur.pos % self.alignment)  # may be past the end if no tensors
        self.tensors = {}
        expected = 0  # as llama.cpp: each tensor starts where the previous one ends, padded to the alignment
        for name, dims, type_id, offset in infos:
            if name in self.tensors:
                cur.fail(f"duplicate tensor {name!r}")
            if offset != expected:
                cur.fail(f"tensor {name!r} has offset {offset}, expected {expected} (the end of the previous "
                         f"tensor's data padded to general.alignment {self.alignment}): overlapping, misaligned "
                         "or out-of-order data")
            info = _tensor_info(cur, name, dims, type_id, self.data_offset + offset)
            self.tensors[name] = info
            expected += info.nbytes + (-info.nbytes % self.alignment)

    def __repr__(self):
        return f"GGUFFile({self.path!r}, version={self.version}, {len(self.tensors)} tensors)"

    def raw(self, name) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the mapped file."""
        info = self._info(name)
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def load(self, name, dtype=np.float32) -> np.ndarray:
        """The tensor as a new array of `info.shape`, dequantized to `dtype`.

        dtype=None keeps the stored type for F16/F64/integer tensors and gives
        float32 for BF16 (NumPy has no bfloat16) and quantized types.
        """
        info = self._info(name)
        data = self.raw(name)
        native = _NATIVE.get(info.ggml_type)
        if native is not None:
            out = data.view(native).reshape(info.shape)
            return out.astype(native if dtype is None else dtype)  # astype copies
        dequant = _DEQUANTIZE.get(info.ggml_type)
        if dequant is None:
            raise GGUFError(f"{self.path}: tensor {name!r} has type {info.ggml_type}, which this "
                            f"reader cannot dequantize (supported: {', '.join(SUPPORTED_TYPES)})")
        out = dequantize(data, info.ggml_type).reshape(info.shape)
        return out if dtype is None or np.dtype(dtype) == np.float32 else out.astype(dtype)

    def _info(self, name):
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None


def _read_metadata(cur, n_kv):
    """({key: value}, {key: (type name, element type name or None)})."""
    metadata, types = {}, {}
    cur.need(n_kv * 12, f"{n_kv} key/value pairs")  # each is at least 12 bytes
    for i in range(n_kv):
        key = cur.string(f"key {i}")
        vtype = cur.unpack("<I", f"type of {key!r}")
        if key in metadata:
            cur.fail(f"duplicate key {key!r}")
        if vtype not in _VALUE_TYPES:
            cur.fail(f"key {key!r} has unknown value type {vtype}")
        if key == "general.alignment" and vtype != _UINT32:
            cur.fail(f"general.alignment has type {_VALUE_TYPES[vtype][0]}, expected UINT32")
        if vtype == _ARRAY:
            cur.need(4, f"element type of {key!r}")
            itype = struct.unpack_from("<I", cur.buf, cur.pos)[0]
            types[key] = ("ARRAY", _VALUE_TYPES[itype][0] if itype in _VALUE_TYPES else None)
        else:
            types[key] = (_VALUE_TYPES[vtype][0], None)
        metadata[key] = cur.value(vtype, repr(key))
    return metadata, types


def _read_tensor_infos(cur, n_tensors):
    """[(name, dims in GGUF order, ggml type id, offset in the data section)]."""
    infos = []
    cur.need(n_tensors * 24, f"{n_tensors} tensor infos")  # each is at least 24 bytes
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}")
        n_dims = cur.unpack("<I", f"n_dims of tensor {name!r}")
        if n_dims > MAX_DIMS:
            cur.fail(f"tensor {name!r} has {n_dims} dims, at most {MAX_DIMS} are allowed")
        dims = [cur.unpack("<Q", f"dims of tensor {name!r}") for _ in range(n_dims)]
        type_id = cur.unpack("<I", f"type of tensor {name!r}")
        offset = cur.unpack("<Q", f"offset of tensor {name!r}")
        infos.append((name, dims, type_id, offset))
    return infos


def _tensor_info(cur, name, dims, type_id, start):
    """Check one tensor's type, dims and data region against the file; make its TensorInfo."""
    if type_id not in GGML_TYPES:
        cur.fail(f"tensor {name!r} has unknown ggml type {type_id}")
    type_name, block_size, type_size = GGML_TYPES[type_id]
    n_elements = 1
    for d in dims:  # NumPy refuses a shape whose nonzero dims overflow, even beside a zero
        n_elements *= max(d, 1)
    if n_elements * type_size > _MAX_BYTES:
        cur.fail(f"tensor {name!r}: dims {dims} overflow")
    if 0 in dims:
        n_elements = 0
    row = dims[0] if dims else 1  # a 0-dim tensor is one element, as in ggml
    if row % block_size:
        cur.fail(f"tensor {name!r}: row length {row} is not a multiple of "
                 f"the {type_name} block size {block_size}")
    nbytes = n_elements // block_size * type_size
    if start + nbytes > cur.size:
        cur.fail(f"tensor {name!r} ({type_name}, dims {dims}): data at "
                 f"[{start}, {start + nbytes}) is out of bounds of the {cur.size}-byte file")
    return TensorInfo(name, tuple(reversed(dims)), type_name, start, nbytes)


def read_metadata(path) -> dict:
    """The key/value metadata of a GGUF file."""
    return GGUFFile(path).metadata


def reverse_llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's reordering of a llama q_proj / k_proj weight's rows.

    convert_hf_to_gguf.py interleaves the two rotary halves of each head's rows
    (HF's rotate-half layout -> GGML's pairwise RoPE); this restores HF's order,
    as transformers' GGUF loader does. `n_head` is the number of query heads for
    q_proj and of key/value heads for k_proj. `w` is [out, in] or a bias [out].
    """
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"cannot unpermute {w.shape[0]} rows into {n_head} heads of rotary pairs")
    head_dim_half = w.shape[0] // n_head // 2
    w_heads = w.reshape(n_head, head_dim_half, 2, *w.shape[1:])  # (n_head, hd/2, 2, ...)
    return w_heads.swapaxes(1, 2).reshape(w.shape)  # (n_head, 2, hd/2, ...) -> [out, ...]


# Tensor types stored as plain NumPy values.
_NATIVE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "F64": np.dtype("<f8"),
           "I8": np.dtype("i1"), "I16": np.dtype("<i2"), "I32": np.dtype("<i4"),
           "I64": np.dtype("<i8")}

_BLOCK_CHUNK = 1 << 15  # blocks dequantized per step: bounds the temporaries to a few MiB


def _block_dtype(*fields):
    return np.dtype([(name, fmt) for name, fmt in fields])


def dequantize(data: np.ndarray, ggml_type: str) -> np.ndarray:
    """Dequantize a flat uint8 buffer of `ggml_type` blocks to a flat float32 array."""
    block_size, type_size = _SIZES[ggml_type]
    if data.size % type_size:
        raise GGUFError(f"{ggml_type} data of {data.size} bytes is not a whole number of "
                        f"{type_size}-byte blocks")
    n_blocks = data.size // type_size
    blocks = np.frombuffer(data, dtype=_BLOCKS[ggml_type], count=n_blocks)
    out = np.empty((n_blocks, block_size), dtype=np.float32)
    fn = _DEQUANTIZE[ggml_type]
    for i in range(0, n_blocks, _BLOCK_CHUNK):
        fn(out[i:i + _BLOCK_CHUNK], blocks[i:i + _BLOCK_CHUNK])
    return out.reshape(-1)


def _f32(half):
    """(n,) float16 block field -> (n, 1) float32, to broadcast over a block."""
    return half.astype(np.float32)[:, None]


def _nibbles(qs):
    """(n, 16) packed bytes -> (n, 32) values 0..15: low nibbles are elements 0-15, high 16-31."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _fifth_bits(qh):
    """(n,) uint32 -> (n, 32) bit j of each, shifted to 16 (the fifth bit of element j)."""
    bits = (qh[:, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)
    return (bits << np.uint32(4)).astype(np.uint8)


def _deq_bf16(out, b):  # out (n, 1); bfloat16 is the top half of a float32
    out.view(np.uint32)[:, 0] = b["x"].astype(np.uint32) << np.uint32(16)


def _deq_q8_0(out, b):  # x = d * q, q int8
    np.multiply(b["qs"], _f32(b["d"]), out=out)


def _deq_q8_1(out, b):  # x = d * q; s (= d * sum(q)) is only used by dot products
    np.multiply(b["qs"], _f32(b["d"]), out=out)


def _deq_q4_0(out, b):  # x = d * (q - 8)
    q = _nibbles(b["qs"]).view(np.int8) - np.int8(8)
    np.multiply(_f32(b["d"]), q, out=out)


def _deq_q4_1(out, b):  # x = d * q + m
    np.multiply(_f32(b["d"]), _nibbles(b["qs"]), out=out)
    out += _f32(b["m"])


def _deq_q5_0(out, b):  # x = d * (q - 16), q = nibble | fifth bit from qh
    q = (_nibbles(b["qs"]) | _fifth_bits(b["qh"])).view(np.int8) - np.int8(16)
    np.multiply(_f32(b["d"]), q, out=out)


def _deq_q5_1(out, b):  # x = d * q + m
    np.multiply(_f32(b["d"]), _nibbles(b["qs"]) | _fifth_bits(b["qh"]), out=out)
    out += _f32(b["m"])


def _k_scale_min(scales):
    """(n, 12) packed 6-bit scales and mins of Q4_K/Q5_K -> two (n, 8) uint8 arrays."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _deq_k(out, b, q):  # Q4_K and Q5_K: 8 sub-blocks of 32, x = d*sc * q - dmin*mn, q (n, 8, 32)
    n = len(b)
    sc, mn = _k_scale_min(b["scales"])
    d = (_f32(b["d"]) * sc.astype(np.float32))[:, :, None]  # (n, 8, 1)
    dm = (_f32(b["dmin"]) * mn.astype(np.float32))[:, :, None]
    out.reshape(n, 8, 32)[:] = d * q.astype(np.float32) - dm


def _k_nibbles(qs):
    """(n, 128) bytes -> (n, 8, 32): sub-block 2i is the low nibbles of bytes 32i..32i+31, 2i+1 the high."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & np.uint8(0x0F)).reshape(-1, 8, 32)


def _deq_q4_k(out, b):
    _deq_k(out, b, _k_nibbles(b["qs"]))


def _deq_q5_k(out, b):  # as Q4_K, q's fifth bit for sub-block j is bit j of qh[l]
    qh = (b["qh"].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
    _deq_k(out, b, _k_nibbles(b["qs"]) | (qh << np.uint8(4)))


def _deq_q6_k(out, b):  # 16 sub-blocks of 16: x = d*scale * (q - 32), q 6 bits from ql, qh
    n = len(b)
    d = (_f32(b["d"]) * b["scales"].astype(np.float32))[:, :, None]  # (n, 16, 1)
    ql = b["ql"].reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    ql = (ql & np.uint8(0x0F)).reshape(n, 8, 32)
    qh = b["qh"].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = (qh & np.uint8(0x03)).reshape(n, 8, 32)
    q = ((ql | (qh << np.uint8(4))).view(np.int8) - np.int8(32)).reshape(n, 16, 16)
    out.reshape(n, 16, 16)[:] = d * q.astype(np.float32)


# Block layouts (ggml-common.h) and their dequantizers.
_BLOCKS = {
    "BF16": _block_dtype(("x", "<u2")),
    "Q4_0": _block_dtype(("d", "<f2"), ("qs", ("u1", 16))),
    "Q4_1": _block_dtype(("d", "<f2"), ("m", "<f2"), ("qs", ("u1", 16))),
    "Q5_0": _block_dtype(("d", "<f2"), ("qh", "<u4"), ("qs", ("u1", 16))),
    "Q5_1": _block_dtype(("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", ("u1", 16))),
    "Q8_0": _block_dtype(("d", "<f2"), ("qs", ("i1", 32))),
    "Q8_1": _block_dtype(("d", "<f2"), ("s", "<f2"), ("qs", ("i1", 32))),
    "Q4_K": _block_dtype(("d", "<f2"), ("dmin", "<f2"), ("scales", ("u1", 12)), ("qs", ("u1", 128))),
    "Q5_K": _block_dtype(("d", "<f2"), ("dmin", "<f2"), ("scales", ("u1", 12)), ("qh", ("u1", 32)),
                         ("qs", ("u1", 128))),
    "Q6_K": _block_dtype(("ql", ("u1", 128)), ("qh", ("u1", 64)), ("scales", ("i1", 16)), ("d", "<f2")),
}
_DEQUANTIZE = {
    "BF16": _deq_bf16, "Q4_0": _deq_q4_0, "Q4_1": _deq_q4_1, "Q5_0": _deq_q5_0,
    "Q5_1": _deq_q5_1, "Q8_0": _deq_q8_0, "Q8_1": _deq_q8_1, "Q4_K": _deq_q4_k, "Q5_K": _deq_q5_k,
    "Q6_K": _deq_q6_k,
}
_SIZES = {name: (block, size) for name, block, size in GGML_TYPES.values()}
assert all(_BLOCKS[t].itemsize == _SIZES[t][1] for t in _BLOCKS)
SUPPORTED_TYPES = tuple(sorted(_NATIVE)) + tuple(sorted(_DEQUANTIZE))


# -- writing ---------------------------------------------------------------------------------
GGUF_VERSION = 3
_TYPE_IDS = {name: i for i, (name, _) in _VALUE_TYPES.items()}
_GGML_TYPE_IDS = {name: i for i, (name, _, _) in GGML_TYPES.items()}
WRITABLE_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q5_0", "Q4_K")


def quantize(array, ggml_type) -> np.ndarray:
    """A float array as the bytes (flat uint8) of `ggml_type`: F32 and F16 here, the quantized types by
    lora_np.quant.quantize (bit for bit as gguf-py's gguf.quants.quantize / ggml's reference quantizers);
    a quantized type needs rows that are whole blocks."""
    if ggml_type in ("F32", "F16"):
        return np.ascontiguousarray(array, dtype=_NATIVE[ggml_type]).reshape(-1).view(np.uint8)
    if ggml_type not in WRITABLE_TYPES:
        raise GGUFError(f"cannot write tensors of type {ggml_type!r} (writable: {', '.join(WRITABLE_TYPES)})")
    from .kernels.quantize import quantize as quantize_rows

    array = np.asarray(array, dtype=np.float32)
    block_size = _SIZES[ggml_type][0]
    if not array.ndim or array.shape[-1] % block_size:
        raise GGUFError(f"cannot quantize shape {array.shape} to {ggml_type}: the row length is not a multiple "
                        f"of the block size {block_size}")
    return quantize_rows(array.reshape(-1, array.shape[-1]), ggml_type).reshape(-1)


def value_type(value):
    """(type name, element type name or None) that llama.cpp's converter gives a Python value."""
    def scalar(v, int_type):
        if isinstance(v, bool):
            return "BOOL"
        if isinstance(v, (int, np.integer)):
            if int_type == "UINT32" and 0 <= v < 2**32:
                return "UINT32"
            return "INT32" if -2**31 <= v < 2**31 else "INT64"
        if isinstance(v, (float, np.floating)):
            return "FLOAT32"
        if isinstance(v, str):
            return "STRING"
        raise GGUFError(f"no GGUF type for a {type(v).__name__} value {v!r:.60}")

    if isinstance(value, (list, tuple)):
        kinds = {scalar(v, "INT32") for v in value} or {"INT32"}
        if len(kinds) != 1:
            raise GGUFError(f"a GGUF array holds one type, got {sorted(kinds)}")
        return "ARRAY", kinds.pop()
    return scalar(value, "UINT32"), None


def _encode_value(type_name, value, where):
    if type_name == "STRING":
        raw = value.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw
    fmt = _VALUE_TYPES[_TYPE_IDS[type_name]][1]
    try:
        return struct.pack(fmt, value)
    except struct.error as e:
        raise GGUFError(f"{where}: {value!r:.60} does not fit GGUF type {type_name} ({e})") from None


def _encode_kv(key, value, types):
    type_name, item_type = types if isinstance(types, tuple) else (types, None)
    if type_name not in _TYPE_IDS:
        raise GGUFError(f"{key!r}: unknown GGUF value type {type_name!r}")
    out = _encode_value("STRING", key, key) + struct.pack("<I", _TYPE_IDS[type_name])
    if type_name != "ARRAY":
        return out + _encode_value(type_name, value, repr(key))
    if item_type not in _TYPE_IDS or item_type == "ARRAY":
        raise GGUFError(f"{key!r}: unknown GGUF array element type {item_type!r}")
    out += struct.pack("<IQ", _TYPE_IDS[item_type], len(value))
    if item_type == "STRING":
        return out + b"".join(_encode_value("STRING", v, repr(key)) for v in value)
    return out + np.asarray(value, dtype=np.dtype(_VALUE_TYPES[_TYPE_IDS[item_type]][1])).tobytes()


def write_gguf(path, metadata, tensors, value_types=None, alignment=DEFAULT_ALIGNMENT):
    """Write a GGUF v3 file atomically: `metadata` {key: Python value} (types from `value_types` {key: type
    name or (\"ARRAY\", element type)}, else value_type's), `tensors` {name: (float array in NumPy order,
    ggml type)} quantized while written, in order, each padded to `alignment`."""
    from .fileio import atomic_file

    value_types = value_types or {}
    if alignment != DEFAULT_ALIGNMENT:
        metadata = {**metadata, "general.alignment": alignment}
        value_types = {**value_types, "general.alignment": "UINT32"}
    header = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    header += [_encode_kv(k, v, value_types.get(k) or value_type(v)) for k, v in metadata.items()]
    offset = 0
    for name, (array, ggml_type) in tensors.items():
        if ggml_type not in WRITABLE_TYPES:
            raise GGUFError(f"tensor {name!r}: cannot write type {ggml_type!r} (writable: {', '.join(WRITABLE_TYPES)})")
        shape = np.shape(array)
        if not 1 <= len(shape) <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r}: {len(shape)} dims, GGUF takes 1 to {MAX_DIMS}")
        block_size, type_size = _SIZES[ggml_type]
        header.append(_encode_value("STRING", name, name) + struct.pack(f"<I{len(shape)}QIQ", len(shape),
                      *reversed(shape), _GGML_TYPE_IDS[ggml_type], offset))
        nbytes = int(np.prod(shape)) // block_size * type_size
        offset += nbytes + (-nbytes % alignment)
    with atomic_file(path) as fh:
        head = b"".join(header)
        fh.write(head + bytes(-len(head) % alignment))
        for name, (array, ggml_type) in tensors.items():
            try:
                data = quantize(array, ggml_type)
            except GGUFError as e:
                raise GGUFError(f"tensor {name!r}: {e}") from None
            fh.write(data.tobytes() + bytes(-data.nbytes % alignment))
    return path
