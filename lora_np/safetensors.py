"""Read and write safetensors files with NumPy only.

    save_file({"w": np.ones((2, 3), np.float32)}, "model.safetensors", metadata={"format": "pt"})
    tensors = load_file("model.safetensors")      # {"w": read-only memory-mapped array}

Format: 8-byte little-endian header length N, N bytes of JSON, then the raw
little-endian C-order tensor bytes. The JSON maps each tensor name to
`{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to the
end of the header) and may hold `"__metadata__": {str: str}`. The reference
writer (huggingface/safetensors) sorts tensors by dtype, widest first, then by
name, writes compact JSON and pads it with spaces to a multiple of 8 bytes, so
every tensor starts aligned; `save` does the same, byte for byte.

A reader must not trust the header: `read_header` checks that it is a JSON
object of well-formed entries whose data regions tile the data section exactly
(no gap, no overlap, nothing past the end) and that each region holds
prod(shape) * itemsize bytes. Any problem raises `SafetensorsError` naming the
file (or buffer), the tensor and the problem.

NumPy has no bfloat16: BF16 tensors load as float32 (exact, a new array rather
than a view of the file). The 8-, 6- and 4-bit float dtypes can be read in a
header but not loaded.
"""
from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np

from .fileio import atomic_file

MAX_HEADER_SIZE = 100_000_000  # as the reference reader: a larger header is refused
_ALIGN = 8
_U64_MAX = 2**64 - 1
_MAX_BYTES = 2**63 - 1  # the largest array NumPy can describe
_MAX_NDIM = 64  # NumPy's limit on dimensions (NPY_MAXDIMS)

# safetensors dtype -> bits per element, in the reference's order (its save sorts by it).
_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}
_DTYPE_RANK = {name: i for i, name in enumerate(_DTYPE_BITS)}

# safetensors dtype <-> NumPy dtype (BF16 is stored as uint16 and widened on load).
_TO_NUMPY = {
    "BOOL": np.dtype("?"), "U8": np.dtype("u1"), "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"), "U16": np.dtype("<u2"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"), "I32": np.dtype("<i4"), "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"), "C64": np.dtype("<c8"), "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"), "U64": np.dtype("<u8"),
}
_FROM_NUMPY = {(dt.kind, dt.itemsize): name for name, dt in _TO_NUMPY.items() if name != "BF16"}


class SafetensorsError(ValueError):
    """A safetensors file or buffer that is malformed, or tensors that cannot be saved."""


# ---------------------------------------------------------------- reading

def read_header(path) -> tuple[dict, int]:
    """(header, data_start): the validated JSON header and the file offset of the data.

    The header's tensor entries are ordered by data offset; `__metadata__`, when
    present, comes first.
    """
    with open(path, "rb") as f:
        head = f.read(_ALIGN)
        size = os.fstat(f.fileno()).st_size
        n = _header_length(head, size, path)
        return _parse_header(f.read(n), size - _ALIGN - n, path), _ALIGN + n


def load_metadata(path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file ({} when it has none)."""
    return read_header(path)[0].get("__metadata__") or {}


def load_file(path, mmap: bool = True) -> dict[str, np.ndarray]:
    """All tensors of a file, by name.

    With mmap=True the arrays are read-only views of the memory-mapped file
    (BF16 excepted: it is widened to a new float32 array); with mmap=False
    they are writable copies.
    """
    return dict(_iter_tensors(_map(path), path, copy=not mmap))


def iter_file(path, widen_bf16=True, release=False):
    """(name, array) for each tensor of a file, one at a time, as read-only views of the memory-mapped file (a
    BF16 tensor widened to a new float32 array when it is reached). widen_bf16=False: a BF16 tensor comes as its
    uint16 bits (bf16_to_float32 widens them), for a caller that widens a slice at a time. release=True: when
    the next tensor is asked for, the pages of the one before are dropped from memory (madvise DONTNEED: they
    are read from the file again if touched), so a loader that copies or converts each tensor holds the file's
    pages one tensor at a time instead of all of them."""
    yield from _iter_tensors(_map(path), path, copy=False, widen_bf16=widen_bf16, release=release)


def load(data: bytes) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file held in memory (read-only views of `data`)."""
    return dict(_iter_tensors(data, "<bytes>", copy=False))


def _map(path):
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return b""  # mmap cannot map an empty file; _iter_tensors reports it as truncated
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _iter_tensors(buf, source, copy, widen_bf16=True, release=False):
    n = _header_length(bytes(buf[:_ALIGN]), len(buf), source)
    header = _parse_header(bytes(buf[_ALIGN:_ALIGN + n]), len(buf) - _ALIGN - n, source)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = info["dtype"], tuple(info["shape"])
        if dtype not in _TO_NUMPY:
            raise SafetensorsError(f"{source}: tensor {name!r} has dtype {dtype}, which NumPy cannot represent")
        if len(shape) > _MAX_NDIM:
            raise SafetensorsError(f"{source}: tensor {name!r} has {len(shape)} dimensions, NumPy arrays have "
                                   f"at most {_MAX_NDIM}")
        np_dtype = _TO_NUMPY[dtype]
        begin, end = info["data_offsets"]
        arr = np.frombuffer(buf, dtype=np_dtype, count=(end - begin) // np_dtype.itemsize,
                            offset=_ALIGN + n + begin).reshape(shape)
        if dtype == "BF16" and widen_bf16:
            arr = bf16_to_float32(arr)
        elif copy:
            arr = arr.copy()
        yield name, arr
        if release and isinstance(buf, mmap.mmap) and end > begin:
            start = (_ALIGN + n + begin) // mmap.PAGESIZE * mmap.PAGESIZE
            buf.madvise(mmap.MADV_DONTNEED, start, _ALIGN + n + end - start)


def _header_length(head, size, source):
    if len(head) < _ALIGN:
        raise SafetensorsError(f"{source}: truncated: {size} bytes, shorter than the 8-byte header length")
    n = struct.unpack("<Q", head[:_ALIGN])[0]
    if n > MAX_HEADER_SIZE:
        raise SafetensorsError(f"{source}: header length {n} exceeds the {MAX_HEADER_SIZE}-byte limit")
    if n > size - _ALIGN:
        raise SafetensorsError(f"{source}: header length {n} is larger than the file "
                               f"({size - _ALIGN} bytes after the length)")
    return n


def _parse_header(raw: bytes, data_size: int, source) -> dict:
    """Validate the JSON header against a data section of `data_size` bytes."""
    def fail(problem):
        raise SafetensorsError(f"{source}: {problem}")

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        fail(f"header is not valid UTF-8 ({e})")
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        fail(f"header is not valid JSON ({e})")
    if not isinstance(header, dict):
        fail(f"header is a JSON {type(header).__name__}, expected an object")

    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        fail("__metadata__ must be an object of strings")

    entries = []
    for name, info in header.items():
        entries.append((_check_entry(name, info, fail), name, info))
    entries.sort(key=lambda e: e[0])

    end_of_previous = 0
    for (begin, end), name, info in entries:
        if begin != end_of_previous:
            what = "overlaps the previous tensor" if begin < end_of_previous else "leaves a gap"
            fail(f"tensor {name!r}: data_offsets {[begin, end]} {what} (expected to start at {end_of_previous})")
        end_of_previous = end
    if end_of_previous != data_size:
        fail(f"tensors cover {end_of_previous} bytes of data, the data section has {data_size}")

    ordered = {} if metadata is None else {"__metadata__": metadata}
    ordered.update((name, info) for _, name, info in entries)
    return ordered


def _check_entry(name, info, fail):
    """Check one tensor entry; return its (begin, end) data offsets."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        fail(f"tensor {name!r}: entry must be an object with dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
        fail(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        fail(f"tensor {name!r}: shape {shape!r} must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_u64(o) for o in offsets)):
        fail(f"tensor {name!r}: data_offsets {offsets!r} must be two non-negative integers")
    begin, end = offsets
    if end < begin:
        fail(f"tensor {name!r}: data_offsets {offsets} end before they begin")
    n_bits = _DTYPE_BITS[dtype]
    for d in shape:  # NumPy refuses a shape whose nonzero dims overflow, even beside a zero
        n_bits *= max(d, 1)
        if n_bits > 8 * _MAX_BYTES:
            fail(f"tensor {name!r}: shape {shape} overflows")
    if 0 in shape:
        n_bits = 0
    if n_bits % 8 or n_bits // 8 != end - begin:
        fail(f"tensor {name!r}: shape {shape} of {dtype} needs {n_bits / 8:g} bytes, "
             f"data_offsets {offsets} hold {end - begin}")
    return begin, end


def _is_u64(x):
    return type(x) is int and 0 <= x <= _U64_MAX


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact: bfloat16 is a float32's top half)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, rounding to nearest even as PyTorch does.

    A NaN keeps its sign and top payload bits and gets the quiet bit, as ggml and
    the AVX512-BF16 instruction do, so rounding cannot turn it into infinity.
    (PyTorch itself writes 0x7FC0 or 0xFFFF for NaN, depending on the code path.)
    """
    from .kernels.quantize import _quantize_bf16  # the GGUF quantizer's rounding: one implementation

    x = np.asarray(x, dtype=np.float32, order="C")
    return _quantize_bf16(x.reshape(-1, 1)).view(np.uint16).reshape(x.shape)


# ---------------------------------------------------------------- writing

def save(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
         dtype: str | None = None) -> bytes:
    """The safetensors bytes of `tensors` (see `save_file`)."""
    header, arrays = _prepare(tensors, metadata, dtype)
    return b"".join([header] + [a.tobytes() for a in arrays])


def save_file(tensors: dict[str, np.ndarray], path, metadata: dict[str, str] | None = None,
              dtype: str | None = None) -> None:
    """Write `tensors` to `path` as the reference safetensors writer does.

    `dtype` ("F32", "F16" or "BF16") stores every floating-point tensor in that
    type; None keeps each array's own dtype. The write is atomic: the bytes go
    to a temporary file in the same folder, which is fsynced and then renamed
    over `path`; on any error `path` is untouched and the temporary file removed.
    """
    header, arrays = _prepare(tensors, metadata, dtype)
    with atomic_file(path) as f:  # a failed write names `path`
        f.write(header)
        for a in arrays:
            f.write(a.data)


def _prepare(tensors, metadata, dtype):
    """(header bytes with its length prefix, C-contiguous little-endian arrays in file order)."""
    if dtype not in (None, "F32", "F16", "BF16"):
        raise SafetensorsError(f"dtype must be None, 'F32', 'F16' or 'BF16', not {dtype!r}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in metadata.items()):
        raise SafetensorsError("metadata must map str to str")
    entries = []
    for name, array in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise SafetensorsError(f"invalid tensor name {name!r}")
        st_dtype, data = _encode(name, np.asarray(array), dtype)
        entries.append((st_dtype, name, data))
    entries.sort(key=lambda e: (-_DTYPE_RANK[e[0]], e[1]))

    header = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for st_dtype, name, data in entries:
        header[name] = {"dtype": st_dtype, "shape": list(data.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text, [data for _, _, data in entries]


def _encode(name, array, dtype):
    """(safetensors dtype, C-contiguous little-endian array) for one tensor."""
    if array.dtype.kind == "f" and dtype is not None:
        if dtype == "BF16":
            return "BF16", np.asarray(float32_to_bf16(array), "<u2", order="C")
        array = array.astype(_TO_NUMPY[dtype])
    st_dtype = _FROM_NUMPY.get((array.dtype.kind, array.dtype.itemsize))
    if st_dtype is None:
        raise SafetensorsError(f"tensor {name!r}: NumPy dtype {array.dtype} has no safetensors equivalent")
    return st_dtype, np.asarray(array, dtype=_TO_NUMPY[st_dtype], order="C")
