"""GEMMs over a frozen weight kept in GGUF's quantized blocks (csrc/quant_kernels.c).

A weight W [N, K] (out_features x in_features) is ``blocks``, a C-contiguous uint8 array
[N, row_bytes(ggml_type, K)]: each row is the K / block_size blocks of its ggml type, exactly as a
GGUF file stores the tensor. Types: QUANT_TYPES.

- ``quant_linear_forward(x, blocks, ggml_type, bias=None) -> y``: y [M, N] = x [M, K] Wᵀ + bias;
- ``quant_linear_backward(dy, blocks, ggml_type) -> dx``: dx [M, K] = dy [M, N] W (the frozen
  weight gets no gradient);
- ``dequantize_rows(blocks, ggml_type, dtype=float32) -> W`` [N, K];
- ``row_panels(blocks, ggml_type, dtype, rows)``: W's rows a panel at a time (a quantized LM head's loss).

x, dy and bias are float32 or float64 (all alike); float64 accumulates in float64 against the
same (float32) dequantized weights. The NumPy reference dequantizes as gguf-py does
(lora_np.gguf.dequantize), a slice of rows at a time, then multiplies. On the C backend a few rows of x
(M ≤ 8: decoding) go through the C tile kernels, which dequantize tiles of W bit-identically; more rows
(training, prefill) go through NumPy's OpenBLAS on float panels of W of at most _PANEL_BYTES that the C
dequantization fills: forward by panels of W's rows (y[:, n0:n1] = x W[n0:n1]ᵀ), backward by panels of
W's columns (dx[:, k0:k1] = dy W[:, k0:k1], the byte columns of whole blocks being themselves blocks),
or of its rows with accumulation when N is so large (an LM head) that a column panel would be too
narrow. All differ from the reference by the order of summation only.
"""
import numpy as np

from lora_np.gguf import GGML_TYPES, dequantize

from .backend import backend, c_function, c_status, ffi
from .checks import CTYPES, check_arrays

QUANT_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
TYPE_IDS = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items() if name in QUANT_TYPES}
_SIZES = {name: (block, size) for name, block, size in GGML_TYPES.values() if name in QUANT_TYPES}
_NUMPY_ROWS = 256  # rows of W the NumPy reference dequantizes at a time: no W-sized float copy
_DECODE_ROWS = 8  # M up to this: the C tile kernels; more rows: OpenBLAS on dequantized panels of W
_PANEL_BYTES = 16 << 20  # one dequantized panel of W (C backend, M > _DECODE_ROWS); measured in bench/quant_gemm.py
_MIN_PANEL_COLS = 64  # backward: column panels at least this wide (or all of K), else row panels


def block_size(ggml_type):
    """Elements per block of ggml_type; ValueError naming the supported types for any other."""
    if ggml_type not in _SIZES:
        raise ValueError(f"quantized weights: type {ggml_type!r} is not supported; supported: "
                         f"{', '.join(QUANT_TYPES)}")
    return _SIZES[ggml_type][0]


def row_bytes(ggml_type, K):
    """Bytes of one row of K elements of ggml_type; ValueError when K is not whole blocks."""
    block = block_size(ggml_type)
    if K % block:
        raise ValueError(f"quantized weights: {K} columns is not a whole number of {ggml_type} blocks of {block}")
    return K // block * _SIZES[ggml_type][1]


def in_features(blocks, ggml_type):
    """K of a weight stored as blocks [N, row_bytes]."""
    block, size = block_size(ggml_type), _SIZES[ggml_type][1]
    if blocks.shape[-1] % size:
        raise ValueError(f"quantized weights: rows of {blocks.shape[-1]} bytes are not whole {ggml_type} blocks "
                         f"of {size} bytes")
    return blocks.shape[-1] // size * block


def check_blocks(op, blocks, ggml_type):
    """blocks is a 2-D C-contiguous uint8 ndarray of whole ggml_type blocks; returns (N, K)."""
    if not isinstance(blocks, np.ndarray) or blocks.dtype != np.uint8 or blocks.ndim != 2:
        raise TypeError(f"{op}: blocks must be a 2-D numpy.ndarray of uint8 [out_features, row bytes], got "
                        f"{type(blocks).__name__} {getattr(blocks, 'dtype', '')} {getattr(blocks, 'shape', '')}")
    if not blocks.flags.c_contiguous:
        raise ValueError(f"{op}: blocks (shape {blocks.shape}) must be C-contiguous")
    return blocks.shape[0], in_features(blocks, ggml_type)


# ---- the three ops -------------------------------------------------------------------------


def dequantize_rows(blocks, ggml_type, dtype=np.float32):
    """W [N, K] as a new dtype array (float32 or float64) from blocks [N, row_bytes]."""
    N, K = check_blocks("dequantize_rows", blocks, ggml_type)
    dtype = np.dtype(dtype)
    if dtype not in CTYPES:
        raise TypeError(f"dequantize_rows: dtype {dtype}; expected float32 or float64")
    if backend() == "c":
        return _dequantize_into(np.empty((N, K), dtype), blocks, ggml_type)
    return _dequantize_numpy(blocks, ggml_type).astype(dtype, copy=False)


def row_panels(blocks, ggml_type, dtype, rows):
    """(n0, n1, W[n0:n1] as dtype [n1 - n0, K]) for W's rows `rows` at a time, each panel dequantized as
    dequantize_rows does; on the C backend every panel reuses one buffer (read a panel before the next)."""
    check_blocks("row_panels", blocks, ggml_type)
    dtype = np.dtype(dtype)
    if dtype not in CTYPES:
        raise TypeError(f"row_panels: dtype {dtype}; expected float32 or float64")
    rows = max(1, int(rows))
    if backend() == "c":
        return _row_panels(blocks, ggml_type, in_features(blocks, ggml_type), dtype, rows)
    return ((n0, min(blocks.shape[0], n0 + rows),
             _dequantize_numpy(blocks[n0:n0 + rows], ggml_type).astype(dtype, copy=False))
            for n0 in range(0, blocks.shape[0], rows))


def quant_linear_forward(x, blocks, ggml_type, bias=None):
    """y [M, N] = x [M, K] @ Wᵀ + bias [N] (bias may be None), W given as blocks [N, row_bytes]."""
    M, N, K = _check("quant_linear_forward", "x", x, blocks, ggml_type, bias)
    y = np.empty((M, N), x.dtype)
    if backend() == "c":
        if M <= _DECODE_ROWS:
            _call("quant_linear_forward", y, x, blocks, bias, ggml_type, M, N, K)
            return y
        _forward_panels(y, x, blocks, ggml_type)
    else:
        for n0 in range(0, N, _NUMPY_ROWS):
            w = _dequantize_numpy(blocks[n0:n0 + _NUMPY_ROWS], ggml_type).astype(x.dtype, copy=False)  # [rows, K]
            np.matmul(x, w.T, out=y[:, n0:n0 + _NUMPY_ROWS])
    if bias is not None:
        y += bias
    return y


def quant_linear_backward(dy, blocks, ggml_type):
    """dx [M, K] = dy [M, N] @ W, W given as blocks [N, row_bytes]."""
    M, N, K = _check("quant_linear_backward", "dy", dy, blocks, ggml_type, None)
    if backend() == "c" and M > _DECODE_ROWS:
        return _backward_panels(np.empty((M, K), dy.dtype), dy, blocks, ggml_type)
    dx = np.zeros((M, K), dy.dtype)
    if backend() == "c":
        _call("quant_linear_backward", dx, dy, blocks, None, ggml_type, M, N, K)
        return dx
    for n0 in range(0, N, _NUMPY_ROWS):
        w = _dequantize_numpy(blocks[n0:n0 + _NUMPY_ROWS], ggml_type).astype(dy.dtype, copy=False)  # [rows, K]
        dx += dy[:, n0:n0 + _NUMPY_ROWS] @ w
    return dx


def _check(op, name, a, blocks, ggml_type, bias):
    """(M, N, K) after checking x (forward) or dy (backward), blocks and bias, raising the error that names the
    problem (check_arrays takes its one-pass path for the common call)."""
    N, K = check_blocks(op, blocks, ggml_type)
    M = a.shape[0] if getattr(a, "ndim", 0) == 2 else 0
    check_arrays(op, {}, {name: a}, {name: (M, K if name == "x" else N)})
    if bias is not None:
        check_arrays(op, {}, {name: a, "bias": bias})
        if bias.shape != (N,):
            raise ValueError(f"{op}: bias has shape {bias.shape}, expected {(N,)}")
    return M, N, K


def _call(op, out, a, blocks, bias, ggml_type, M, N, K):
    """lib.<op>_{f32,f64}: out and a (x or dy) and bias as the dtype's pointers, blocks as bytes."""
    ctype = CTYPES[a.dtype]
    pointers = [ffi.from_buffer(ctype, out, require_writable=True), ffi.from_buffer(ctype, a),
                ffi.from_buffer("uint8_t[]", blocks)]
    if op == "quant_linear_forward":
        pointers.append(ffi.NULL if bias is None else ffi.from_buffer(ctype, bias))
    c_status(op, c_function(op, a.dtype)(*pointers, TYPE_IDS[ggml_type], M, N, K))


def _dequantize_into(out, blocks, ggml_type, K=None, k0=0):
    """out [rows, n] (float32 or float64, C-contiguous) = columns k0 .. k0 + n of W's rows, dequantized from
    blocks [rows, row_bytes] (C-contiguous, rows of K elements; K defaults to n: whole rows)."""
    c_status("quant_dequantize_cols", c_function("quant_dequantize_cols", out.dtype)(
        ffi.from_buffer(CTYPES[out.dtype], out, require_writable=True), ffi.from_buffer("uint8_t[]", blocks),
        TYPE_IDS[ggml_type], out.shape[0], out.shape[1] if K is None else K, k0, out.shape[1]))
    return out


# ---- many rows on the C backend: OpenBLAS on dequantized panels of W --------------------------


def _row_panels(blocks, ggml_type, K, dtype, rows):
    """(n0, n1, W[n0:n1] as floats [n1 - n0, K]) for W's rows `rows` at a time, each dequantized by the C core
    into one buffer that the next panel reuses."""
    N = blocks.shape[0]
    buffer = np.empty(min(rows, N) * K, dtype)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        yield n0, n1, _dequantize_into(buffer[:(n1 - n0) * K].reshape(n1 - n0, K), blocks[n0:n1], ggml_type)


def _forward_panels(y, x, blocks, ggml_type):
    """y [M, N] = x [M, K] Wᵀ, a panel of W's rows at a time (no bias)."""
    K = x.shape[1]
    for n0, n1, w in _row_panels(blocks, ggml_type, K, x.dtype, max(1, _PANEL_BYTES // x.itemsize // max(K, 1))):
        np.matmul(x, w.T, out=y[:, n0:n1])                                                         # w [rows, K]


def _backward_panels(dx, dy, blocks, ggml_type):
    """dx [M, K] = dy [M, N] W, returns dx: by panels of W's columns (each writes its own columns of dx), or,
    when N is so large that such a panel would be narrower than _MIN_PANEL_COLS, by panels of its rows,
    accumulated."""
    (M, N), K = dy.shape, dx.shape[1]
    block = _SIZES[ggml_type][0]
    elements = _PANEL_BYTES // dy.itemsize
    cols = min(K, elements // max(N, 1) // block * block)
    if cols >= min(K, _MIN_PANEL_COLS):
        panel = np.empty(N * cols, dy.dtype)
        for k0 in range(0, K, max(cols, 1)):
            k1 = min(K, k0 + cols)
            w = _dequantize_into(panel[:N * (k1 - k0)].reshape(N, k1 - k0), blocks, ggml_type, K, k0)  # [N, cols]
            np.matmul(dy, w, out=dx[:, k0:k1])
        return dx
    rows = max(1, elements // max(K, 1))
    rows = rows // 256 * 256 or rows  # whole 256s: OpenBLAS then sums each panel alike on any thread count
    partial = np.empty_like(dx)
    for n0, n1, w in _row_panels(blocks, ggml_type, K, dy.dtype, rows):                          # w [rows, K]
        if n0 == 0:
            np.matmul(dy[:, n0:n1], w, out=dx)
        else:
            np.matmul(dy[:, n0:n1], w, out=partial)
            dx += partial
    return dx


# ---- NumPy reference ----------------------------------------------------------------------


def _dequantize_numpy(blocks, ggml_type):
    """float32 [rows, K] from blocks [rows, row_bytes], as gguf-py dequantizes."""
    rows, K = blocks.shape[0], in_features(blocks, ggml_type)
    flat = blocks.reshape(-1)
    if ggml_type == "F32":
        return flat.view("<f4").reshape(rows, K).copy()
    if ggml_type == "F16":
        return flat.view("<f2").astype(np.float32).reshape(rows, K)
    return dequantize(flat, ggml_type).reshape(rows, K)
