"""The LoRA low-rank branch: forward, backward and merge, on three backends.

    y = x Wᵀ + b + scaling · (x lora_Aᵀ) lora_Bᵀ       lora_A: [r, in]   lora_B: [out, r]

Only the low-rank part lives here (the frozen x Wᵀ + b is the caller's):

- ``lora_forward(y, x, lora_A, lora_B, scaling) -> t``: ``y += scaling·(x Aᵀ) Bᵀ`` in place,
  returns ``t = x Aᵀ`` ([N, r]), which backward needs.
- ``lora_backward(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, scaling)``: accumulates
  ``d_lora_A += s·(dy B)ᵀ x``, ``d_lora_B += s·dyᵀ t``, ``dx += s·(dy B) A``; a None output is
  skipped entirely.
- ``lora_merge(weight, lora_A, lora_B, scaling, fan_in_fan_out=False)``: ``weight += s·B A``
  in place (``weight += s·(B A)ᵀ`` for a GPT-2 Conv1D weight stored [in, out]); unmerge is the
  same call with ``-scaling``.

Backends: "numpy" (the reference below, readable, always there), "c" (csrc/, built by
``pip install .`` through cffi, OpenMP) and "cuda" (csrc/cuda/, built only with
``LORA_NP_CUDA=1``; host arrays are uploaded, computed on and downloaded). The environment
variable ``LORA_NP_BACKEND`` picks one at import; the default is "c" when the compiled module
loads, else "numpy". Passing ``cuda.DeviceArray`` arguments runs an op on the GPU whatever the
backend, and then its results stay on the device. The C core uses AVX2 + FMA where the CPU has
them and its baseline SIMD build elsewhere (``LORA_NP_SIMD=baseline`` forces the latter).

Every argument is checked (type, dtype, shape, C-contiguity, outputs not overlapping any
other argument) before any compiled code runs: a wrong call raises TypeError or ValueError
naming the argument and never reaches C.
"""
import numbers
import os
import warnings

import numpy as np

from lora_np import _cuda as cuda

# OpenMP threads that spin after a parallel region take the cores from OpenBLAS's threads, and
# the other way round: measured on 2 cores, a base-layer GEMM followed by the LoRA kernels took
# 32 ms with spinning OpenMP threads against 16 ms with sleeping ones (bench/lora_kernels.py
# --after-gemm). So unless the user chose a policy, the OpenMP runtime this module loads starts
# with OMP_WAIT_POLICY=passive; the variable is set only while the module loads (the runtime
# reads it then), so that libraries loaded later keep their own default. It has no effect when
# the process already loaded the same OpenMP runtime.
_wait_policy = os.environ.get("OMP_WAIT_POLICY")
os.environ["OMP_WAIT_POLICY"] = _wait_policy or "passive"
try:
    from lora_np._lora_np_c import ffi as _ffi, lib as _lib

    _C_MISSING = None
except ImportError as e:  # no compiler at install time: NumPy only
    _ffi = _lib = None
    _C_MISSING = f"the compiled module lora_np._lora_np_c is not available ({e}); reinstall lora_np with a C compiler"
finally:
    if _wait_policy is None:
        del os.environ["OMP_WAIT_POLICY"]

BACKENDS = ("numpy", "c", "cuda")
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_backend = "numpy"
_num_threads = 0


# ---- backend selection -------------------------------------------------------------------


def available_backends():
    """The backends that can run here, e.g. ['numpy', 'c']."""
    return [name for name in BACKENDS if _why_unavailable(name) is None]


def _why_unavailable(name):
    if name == "c":
        return _C_MISSING
    if name == "cuda":
        return cuda.why_unavailable()
    return None


def backend():
    """The backend that runs host (NumPy) arrays: "numpy", "c" or "cuda"."""
    return _backend


def set_backend(name):
    """Pick the backend; ValueError for an unknown name, RuntimeError naming why one is unavailable."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown lora_np backend {name!r}; choose one of {', '.join(BACKENDS)}")
    why = _why_unavailable(name)
    if why is not None:
        raise RuntimeError(f"lora_np backend {name!r} is unavailable: {why}")
    _backend = name


def set_num_threads(n):
    """Threads for the C backend's OpenMP loops (n >= 1)."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"set_num_threads: n must be an integer >= 1, got {n!r}")
    _num_threads = int(n)
    if _lib is not None:
        _lib.lora_set_num_threads(_num_threads)


def get_num_threads():
    """Threads the C backend uses (1 without OpenMP)."""
    if _lib is not None:
        return _lib.lora_get_num_threads()
    return _num_threads or 1


def _select_initial_backend():
    global _backend
    _backend = "c" if _lib is not None else "numpy"
    asked = os.environ.get("LORA_NP_BACKEND", "").strip().lower()
    if not asked:
        return
    try:
        set_backend(asked)
    except (ValueError, RuntimeError) as e:
        warnings.warn(f"LORA_NP_BACKEND={asked}: {e}; running on {_backend!r}", RuntimeWarning, stacklevel=3)


# ---- argument checks ---------------------------------------------------------------------


def _check_matrix(name, a):
    """a is a 2-D float32/float64 array (NumPy, or a cuda.DeviceArray)."""
    if not isinstance(a, (np.ndarray, cuda.DeviceArray)):
        raise TypeError(f"{name} must be a numpy.ndarray or cuda.DeviceArray, got {type(a).__name__}")
    if a.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {a.dtype}; expected float32 or float64")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {a.shape}")


def _check_args(shapes, outputs, inputs, dtype):
    """Shapes, dtype, contiguity, writability and aliasing of every argument.

    shapes: {name: expected shape}; outputs / inputs: {name: array or None}."""
    args = {**outputs, **inputs}
    given = {name: a for name, a in args.items() if a is not None}
    on_device = [isinstance(a, cuda.DeviceArray) for a in given.values()]
    if any(on_device) and not all(on_device):
        host = [n for n, a in given.items() if not isinstance(a, cuda.DeviceArray)]
        raise TypeError(f"mixing cuda.DeviceArray and host arrays: {', '.join(host)} are on the host")
    for name, a in given.items():
        _check_matrix(name, a)
        if a.dtype != dtype:
            raise TypeError(f"{name} has dtype {a.dtype}, but the other arguments are {dtype}")
        if a.shape != shapes[name]:
            raise ValueError(f"{name} has shape {a.shape}, expected {shapes[name]}")
        if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
            raise ValueError(f"{name} (shape {a.shape}, strides {a.strides}) must be C-contiguous")
    for name, a in outputs.items():
        if a is None:
            continue
        if isinstance(a, np.ndarray) and not a.flags.writeable:
            raise ValueError(f"{name} is an output and must be writeable")
        for other, b in given.items():
            if other != name and _overlaps(a, b):
                raise ValueError(f"output {name} {a.shape} overlaps {other} {b.shape} in memory; outputs must not alias")
    return all(on_device)


def _overlaps(a, b):
    if isinstance(a, cuda.DeviceArray):
        return a.overlaps(b)
    return np.may_share_memory(a, b)


def _scalar(scaling):
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    return float(scaling)


def _lora_dims(x, lora_A, lora_B):
    """(N, in, out, r) from x [N, in], lora_A [r, in], lora_B [out, r]."""
    for name, a in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        _check_matrix(name, a)
    (N, n_in), r, out = x.shape, lora_A.shape[0], lora_B.shape[0]
    return N, n_in, out, r


# ---- the C backend's fast path ---------------------------------------------------------------
# The checks above cost ~40 µs a call in cache and ~200 µs when the interpreter's and NumPy's code
# are cold (after streaming a big tensor, as in merging a model's layers one after another), about
# as much as the merge of a 576 x 576 weight itself. For the common call (NumPy arrays of one float
# dtype, C-contiguous, a float scaling) the three ops below check the same things in fewer steps:
# cffi's from_buffer refuses non-C-contiguous and (for outputs) read-only arrays, and the overlap
# test compares the pointers' byte ranges, which is what np.may_share_memory does for contiguous
# arrays. Anything else, or any failed check, takes the full path, which names the problem.

_C_OPS = {}  # dtype -> (cffi array type, {op: C function})
if _lib is not None:
    for _dt, _ct, _sfx in ((np.dtype(np.float32), "float[]", "f32"), (np.dtype(np.float64), "double[]", "f64")):
        _C_OPS[_dt] = (_ct, {op: getattr(_lib, f"{op}_{_sfx}") for op in ("lora_forward", "lora_backward", "lora_merge")})


def _c_fast(op, outputs, inputs):
    """(C function, [cffi pointers of outputs + inputs, None -> NULL]) when every array passes the
    checks, else None. Shapes are the caller's to check."""
    dtype = inputs[0].dtype if type(inputs[0]) is np.ndarray else None
    kind = _C_OPS.get(dtype)
    if kind is None:
        return None
    ctype, fns = kind
    pointers = []
    try:
        for a in outputs:
            if a is None:
                pointers.append(None)
            elif type(a) is not np.ndarray or a.dtype is not dtype:
                return None
            else:
                pointers.append(_ffi.from_buffer(ctype, a, require_writable=True))
        for a in inputs:
            if type(a) is not np.ndarray or a.dtype is not dtype:
                return None
            pointers.append(_ffi.from_buffer(ctype, a))
    except ValueError:  # not C-contiguous, or an output is read-only
        return None
    for i in range(len(outputs)):
        o = pointers[i]
        if o is None:
            continue
        if not len(o):
            return None  # empty arrays: left to the full checks
        end = o + len(o)
        for j, p in enumerate(pointers):
            if j != i and p is not None and (not len(p) or (p < end and o < p + len(p))):
                return None
    return fns[op], [_ffi.NULL if p is None else p for p in pointers]


def _c_status(op, status):
    if status == _lib.LORA_ENOMEM:
        raise MemoryError(f"{op}: the C core could not allocate its small scratch buffers")
    if status != _lib.LORA_OK:
        raise RuntimeError(f"{op}: the C core returned error {status}")


def _fast_forward(y, x, lora_A, lora_B, scaling):
    fast = _c_fast("lora_forward", (y,), (x, lora_A, lora_B)) if y is not None else None
    if fast is None:
        return None
    sx, sa, sb = x.shape, lora_A.shape, lora_B.shape
    if len(sx) != 2 or len(sa) != 2 or sa[1] != sx[1] or len(sb) != 2 or sb[1] != sa[0] or y.shape != (sx[0], sb[0]):
        return None
    (N, n_in), r, out = sx, sa[0], sb[0]
    fn, (py, px, pa, pb) = fast
    t = np.empty((N, r), dtype=x.dtype)
    _c_status("lora_forward", fn(py, _ffi.from_buffer(_C_OPS[x.dtype][0], t), px, pa, pb, scaling, N, n_in, out, r))
    return t


def _fast_backward(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, scaling):
    if dx is None and d_lora_A is None and d_lora_B is None:
        return False
    fast = _c_fast("lora_backward", (dx, d_lora_A, d_lora_B), (dy, x, t, lora_A, lora_B))
    if fast is None:
        return False
    sx, sa, sb = x.shape, lora_A.shape, lora_B.shape
    if len(sx) != 2 or len(sa) != 2 or sa[1] != sx[1] or len(sb) != 2 or sb[1] != sa[0]:
        return False
    (N, n_in), r, out = sx, sa[0], sb[0]
    if (dy.shape != (N, out) or t.shape != (N, r) or (dx is not None and dx.shape != sx)
            or (d_lora_A is not None and d_lora_A.shape != sa) or (d_lora_B is not None and d_lora_B.shape != sb)):
        return False
    fn, pointers = fast
    _c_status("lora_backward", fn(*pointers, scaling, N, n_in, out, r))
    return True


def _fast_merge(weight, lora_A, lora_B, scaling, fan_in_fan_out):
    """_c_fast's checks written out for the merge, whose weight may be small (merging a model's
    layers one after another, each weight cold): every step counts there."""
    kind = _C_OPS.get(weight.dtype) if type(weight) is np.ndarray else None
    if (kind is None or type(lora_A) is not np.ndarray or type(lora_B) is not np.ndarray
            or lora_A.dtype is not weight.dtype or lora_B.dtype is not weight.dtype):
        return False
    sa, sb = lora_A.shape, lora_B.shape
    if len(sa) != 2 or len(sb) != 2 or sb[1] != sa[0] or weight.shape != ((sa[1], sb[0]) if fan_in_fan_out
                                                                            else (sb[0], sa[1])):
        return False
    ctype, fns = kind
    try:
        pw = _ffi.from_buffer(ctype, weight, require_writable=True)
        pa, pb = _ffi.from_buffer(ctype, lora_A), _ffi.from_buffer(ctype, lora_B)
    except ValueError:
        return False
    n = len(pw)
    if not (n and len(pa) and len(pb)) or (pa < pw + n and pw < pa + len(pa)) or (pb < pw + n and pw < pb + len(pb)):
        return False
    _c_status("lora_merge", fns["lora_merge"](pw, pa, pb, scaling, 1 if fan_in_fan_out else 0, sa[1], sb[0], sa[0]))
    return True


# ---- the three ops -------------------------------------------------------------------------


def lora_forward(y, x, lora_A, lora_B, scaling):
    """y [N, out] += scaling · (x [N, in] @ lora_Aᵀ) @ lora_Bᵀ in place; returns t = x @ lora_Aᵀ [N, r]."""
    if _backend == "c" and type(scaling) is float:
        t = _fast_forward(y, x, lora_A, lora_B, scaling)
        if t is not None:
            return t
    if y is None:
        raise TypeError("y is required, got None")
    N, n_in, out, r = _lora_dims(x, lora_A, lora_B)
    shapes = {"y": (N, out), "x": (N, n_in), "lora_A": (r, n_in), "lora_B": (out, r)}
    device = _check_args(shapes, {"y": y}, {"x": x, "lora_A": lora_A, "lora_B": lora_B}, x.dtype)
    s = _scalar(scaling)
    if device:
        return cuda.lora_forward(y, x, lora_A, lora_B, s)
    if _backend == "c":
        t = np.empty((N, r), dtype=x.dtype)
        _call_c("lora_forward", y, t, x, lora_A, lora_B, s, N, n_in, out, r)
        return t
    if _backend == "cuda":
        return cuda.on_host(cuda.lora_forward, [y], [x, lora_A, lora_B], s)
    return _forward_numpy(y, x, lora_A, lora_B, s)


def lora_backward(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, scaling):
    """Accumulate, with g = dy @ lora_B [N, r]:
    d_lora_A [r, in] += s·gᵀ x,  d_lora_B [out, r] += s·dyᵀ t,  dx [N, in] += s·g lora_A.
    Outputs given as None are skipped."""
    if _backend == "c" and type(scaling) is float and _fast_backward(dx, d_lora_A, d_lora_B, dy, x, t, lora_A,
                                                                      lora_B, scaling):
        return
    N, n_in, out, r = _lora_dims(x, lora_A, lora_B)
    shapes = {"dx": (N, n_in), "d_lora_A": (r, n_in), "d_lora_B": (out, r), "dy": (N, out),
              "x": (N, n_in), "t": (N, r), "lora_A": (r, n_in), "lora_B": (out, r)}
    outputs = {"dx": dx, "d_lora_A": d_lora_A, "d_lora_B": d_lora_B}
    inputs = {"dy": dy, "x": x, "t": t, "lora_A": lora_A, "lora_B": lora_B}
    for name, a in inputs.items():
        if a is None:
            raise TypeError(f"{name} is required, got None")
    device = _check_args(shapes, outputs, inputs, x.dtype)
    s = _scalar(scaling)
    if dx is None and d_lora_A is None and d_lora_B is None:
        return
    if device:
        cuda.lora_backward(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, s)
    elif _backend == "c":
        _call_c("lora_backward", dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, s, N, n_in, out, r)
    elif _backend == "cuda":
        cuda.on_host(cuda.lora_backward, [dx, d_lora_A, d_lora_B], [dy, x, t, lora_A, lora_B], s)
    else:
        _backward_numpy(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, s)


def lora_merge(weight, lora_A, lora_B, scaling, fan_in_fan_out=False):
    """weight [out, in] += scaling · lora_B @ lora_A in place, or for fan_in_fan_out
    weight [in, out] += scaling · (lora_B @ lora_A)ᵀ. Unmerge: the same call with -scaling.
    No temporary of weight's size on any backend."""
    if _backend == "c" and type(scaling) is float and _fast_merge(weight, lora_A, lora_B, scaling, fan_in_fan_out):
        return
    for name, a in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _check_matrix(name, a)
    (r, n_in), out = lora_A.shape, lora_B.shape[0]
    fan_in_fan_out = bool(fan_in_fan_out)
    shapes = {"weight": (n_in, out) if fan_in_fan_out else (out, n_in), "lora_A": (r, n_in), "lora_B": (out, r)}
    device = _check_args(shapes, {"weight": weight}, {"lora_A": lora_A, "lora_B": lora_B}, weight.dtype)
    s = _scalar(scaling)
    if device:
        cuda.lora_merge(weight, lora_A, lora_B, s, fan_in_fan_out)
    elif _backend == "c":
        _call_c("lora_merge", weight, lora_A, lora_B, s, int(fan_in_fan_out), n_in, out, r)
    elif _backend == "cuda":
        cuda.on_host(cuda.lora_merge, [weight], [lora_A, lora_B], s, fan_in_fan_out)
    else:
        _merge_numpy(weight, lora_A, lora_B, s, fan_in_fan_out)


# ---- NumPy reference ----------------------------------------------------------------------


def _forward_numpy(y, x, lora_A, lora_B, scaling):
    t = x @ lora_A.T                    # [N, r]
    y += (scaling * t) @ lora_B.T       # [N, out]
    return t


def _backward_numpy(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, scaling):
    if dx is not None or d_lora_A is not None:
        g = scaling * (dy @ lora_B)     # [N, r]
        if d_lora_A is not None:
            d_lora_A += g.T @ x         # [r, in]
        if dx is not None:
            dx += g @ lora_A            # [N, in]
    if d_lora_B is not None:
        d_lora_B += dy.T @ (scaling * t)  # [out, r]


_MERGE_ROWS = 256  # rows of weight per step: the temporary is [256, cols], not weight-sized


def _merge_numpy(weight, lora_A, lora_B, scaling, fan_in_fan_out):
    # delta = scaling · B A is [out, in]; fan_in_fan_out weights hold its transpose [in, out].
    left, right = (lora_A.T, lora_B.T) if fan_in_fan_out else (lora_B, lora_A)  # [rows, r], [r, cols]
    right = scaling * right
    for i in range(0, weight.shape[0], _MERGE_ROWS):
        weight[i:i + _MERGE_ROWS] += left[i:i + _MERGE_ROWS] @ right


# ---- C ------------------------------------------------------------------------------------


def _pointer(a, ctype):
    """A cffi pointer to a's first element; strided arrays (attention's q) are passed with their strides."""
    if a.flags.c_contiguous:
        return _ffi.from_buffer(ctype, a)
    return _ffi.cast(ctype[:-2] + "*", a.__array_interface__["data"][0])


def _call_c(op, *args, ref=False):
    """Call lib.<op>[_ref]_{f32,f64} with arrays passed as pointers (None -> NULL)."""
    dtype = next(a.dtype for a in args if isinstance(a, np.ndarray))
    ctype, suffix = ("float[]", "f32") if dtype == np.float32 else ("double[]", "f64")
    fn = getattr(_lib, f"{op}{'_ref' if ref else ''}_{suffix}")
    c_args = [_ffi.NULL if a is None else _pointer(a, ctype) if isinstance(a, np.ndarray) else a for a in args]
    _c_status(op, fn(*c_args))


# ---- fused ops of the training step (csrc/step_kernels.c) ---------------------------------
# The SwiGLU gate and the row softmaxes of attention and of the LM head's cross-entropy. They run
# in C when the backend is "c" and as the NumPy code below otherwise. float32 C uses a vector exp
# within 2 ulp of NumPy's (which runs at ~3 ns an element on AVX2 machines).


def _check_step_arrays(op, outputs, inputs):
    """Same dtype (float32/float64), C-contiguous, outputs writeable and not overlapping anything."""
    given = {name: a for name, a in {**outputs, **inputs}.items() if a is not None}
    for name, a in given.items():
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{op}: {name} must be a numpy.ndarray, got {type(a).__name__}")
    dtype = next(iter(given.values())).dtype
    for name, a in given.items():
        if a.dtype not in _FLOAT_DTYPES or a.dtype != dtype:
            raise TypeError(f"{op}: {name} has dtype {a.dtype}; expected float32 or float64, all alike")
        if not a.flags.c_contiguous:
            raise ValueError(f"{op}: {name} (shape {a.shape}, strides {a.strides}) must be C-contiguous")
    for name, a in outputs.items():
        if a is None:
            continue
        if not a.flags.writeable:
            raise ValueError(f"{op}: {name} is an output and must be writeable")
        for other, b in given.items():
            if other != name and np.may_share_memory(a, b):
                raise ValueError(f"{op}: output {name} overlaps {other} in memory; outputs must not alias")
    return dtype


def contiguous(a):
    """a itself when C-contiguous, else a C-contiguous copy (np.ascontiguousarray makes 0-d arrays 1-d)."""
    return a if a.flags.c_contiguous else np.array(a, order="C")


def _same_shape(op, **arrays):
    shapes = {name: a.shape for name, a in arrays.items() if a is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{op}: shapes differ: " + ", ".join(f"{n} {s}" for n, s in shapes.items()))


def _sigmoid_numpy(x):
    """1 / (1 + exp(-x)) in one new array; exp(-x) overflowing to inf gives exactly 0."""
    s = np.negative(x, out=np.empty(x.shape, x.dtype))
    with np.errstate(over="ignore"):
        np.exp(s, out=s)
    s += 1
    return np.reciprocal(s, out=s)


def silu_mul_forward(a, b):
    """silu(a)·b = a·sigmoid(a)·b in a new array (the SwiGLU gate)."""
    _check_step_arrays("silu_mul_forward", {}, {"a": a, "b": b})
    _same_shape("silu_mul_forward", a=a, b=b)
    out = np.empty(a.shape, a.dtype)
    if _backend == "c":
        _call_c("silu_mul_forward", out, a, b, a.size)
        return out
    s = _sigmoid_numpy(a)
    s *= a
    s *= b
    return s


def silu_mul_backward(g, a, b, need_a=True, need_b=True):
    """Gradients of silu(a)·b given g: (g·b·s·(1 + a·(1 − s)) or None, g·a·s or None), s = sigmoid(a).
    b is only read for the first (and may be None when need_a is False)."""
    if need_a and b is None:
        raise TypeError("silu_mul_backward: b is required for the gradient of a (need_a=True), got None")
    _check_step_arrays("silu_mul_backward", {}, {"g": g, "a": a, "b": b if need_a else None})
    _same_shape("silu_mul_backward", g=g, a=a, b=b if need_a else None)
    ga = np.empty(a.shape, a.dtype) if need_a else None
    gb = np.empty(a.shape, a.dtype) if need_b else None
    if not (need_a or need_b):
        return None, None
    if _backend == "c":
        _call_c("silu_mul_backward", ga, gb, g, a, b if need_a else None, a.size)
        return ga, gb
    s = _sigmoid_numpy(a)
    if need_a:
        np.subtract(1, s, out=ga)
        ga *= a
        ga += 1
        ga *= s
        ga *= b
        ga *= g
    if need_b:
        np.multiply(s, a, out=gb)
        gb *= g
    return ga, gb


def _visible(rows, n, period, count0, group):
    """vis [rows]: how many leading columns each row sees (see csrc/step_kernels.c)."""
    return np.clip(count0 + (np.arange(rows) % period) // group, 0, n)


def _rows_args(op, p, count0, group, period):
    if not isinstance(p, np.ndarray):
        raise TypeError(f"{op}: p must be a numpy.ndarray, got {type(p).__name__}")
    if p.ndim < 1:
        raise ValueError(f"{op}: p must have at least one dimension, got shape {p.shape}")
    n = p.shape[-1]
    rows = p.size // n if n else int(np.prod(p.shape[:-1]))
    count0 = n if count0 is None else int(count0)
    period = max(rows, 1) if period is None else int(period)
    group = int(group)
    if period < 1 or group < 1:
        raise ValueError(f"{op}: period ({period}) and group ({group}) must be >= 1")
    return rows, n, period, count0, group


def softmax_rows(p, scale=1.0, count0=None, group=1, period=None):
    """In place over the last axis of p: scale·softmax of each row's visible columns, 0 on the
    others; returns the log-sum-exp of each row's visible columns (shape p.shape[:-1]; +inf and a
    row of 0 when every visible column is -inf; NaN and NaN visible columns when one is NaN or +inf). Row i sees the first
    clip(count0 + (i % period) // group, 0, n) columns; by default all n."""
    rows, n, period, count0, group = _rows_args("softmax_rows", p, count0, group, period)
    dtype = _check_step_arrays("softmax_rows", {"p": p}, {})
    lse = np.empty(p.shape[:-1], dtype)
    if _backend == "c":
        _call_c("softmax_rows", p, lse, float(scale), rows, n, period, count0, group)
        return lse
    p2, lse2 = p.reshape(rows, n), lse.reshape(rows)
    hidden = np.arange(n) >= _visible(rows, n, period, count0, group)[:, None]      # (rows, n)
    p2[hidden] = -np.inf
    m = p2.max(-1, keepdims=True, initial=-np.inf)                                  # NaN stays NaN
    m[m == -np.inf] = 0  # no finite column: exp(-inf) = 0 everywhere
    with np.errstate(invalid="ignore"):
        p2 -= m
        np.exp(p2, out=p2)
        total = p2.sum(-1, keepdims=True)
        total[total == 0] = np.inf
        p2 *= dtype.type(scale) / total
    p2[hidden] = 0
    np.log(total, out=total)
    total += m
    lse2[:] = total[:, 0]
    return lse


def exp_rows(p, lse, count0=None, group=1, period=None):
    """In place over the last axis of p: exp(p − lse) on each row's visible columns, 0 on the others
    and on rows whose lse is +inf (the probabilities again, from softmax_rows' log-sum-exp)."""
    rows, n, period, count0, group = _rows_args("exp_rows", p, count0, group, period)
    if lse.shape != p.shape[:-1]:
        raise ValueError(f"exp_rows: lse has shape {lse.shape}, expected {p.shape[:-1]}")
    _check_step_arrays("exp_rows", {"p": p}, {"lse": lse})
    if _backend == "c":
        _call_c("exp_rows", p, lse, rows, n, period, count0, group)
        return
    p2, lse2 = p.reshape(rows, n), lse.reshape(rows)
    with np.errstate(invalid="ignore"):
        p2 -= lse2[:, None]
    p2[(np.arange(n) >= _visible(rows, n, period, count0, group)[:, None]) | (lse2[:, None] == np.inf)] = -np.inf
    np.exp(p2, out=p2)


def in_c():
    """True when the backend is "c": then attention_*, rms_norm_* and rotary below can run; otherwise
    their callers in lora_np.functional run their NumPy code, which is the reference."""
    return _backend == "c"


def _strides3(a):
    """Strides in elements of a 4-D array's first three axes; it needs a unit stride along the last."""
    if a.strides[-1] != a.itemsize or any(x % a.itemsize for x in a.strides):
        raise ValueError(f"an array of shape {a.shape} needs a unit stride along its last axis, got {a.strides}")
    return _ffi.new("int64_t[3]", [x // a.itemsize for x in a.strides[:3]])


def _rms_rows(op, x, weight):
    """rows, n of x (..., n) for the RMSNorm kernels, after the type, dtype and shape checks."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{op}: x must be a numpy.ndarray, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x needs a last axis of length >= 1, got shape {x.shape}")
    n = x.shape[-1]
    if weight is not None and getattr(weight, "shape", None) != (n,):
        raise ValueError(f"{op}: weight shape {getattr(weight, 'shape', None)} does not match the input's last "
                         f"axis ({n},)")
    return x.size // n, n


def rms_norm_forward(x, weight, eps):
    """(x / sqrt(mean(x², last axis) + eps)·weight, rstd of shape x.shape[:-1]) in the C core;
    x C-contiguous, weight (n,) or None."""
    rows, n = _rms_rows("rms_norm_forward", x, weight)
    _check_step_arrays("rms_norm_forward", {}, {"x": x, "weight": weight})
    y, rstd = np.empty(x.shape, x.dtype), np.empty(x.shape[:-1], x.dtype)
    _call_c("rms_norm_forward", y, rstd, x, weight, float(eps), rows, n)
    return y, rstd


def rms_norm_backward(g, x, weight, rstd, need_x=True, need_weight=False):
    """(gx, gweight) of rms_norm_forward given g (shape of x), None where not needed."""
    rows, n = _rms_rows("rms_norm_backward", x, weight)
    _check_step_arrays("rms_norm_backward", {}, {"g": g, "x": x, "weight": weight, "rstd": rstd})
    _same_shape("rms_norm_backward", g=g, x=x)
    if rstd.shape != x.shape[:-1]:
        raise ValueError(f"rms_norm_backward: rstd has shape {rstd.shape}, expected {x.shape[:-1]}")
    gx = np.empty(x.shape, x.dtype) if need_x else None
    gw = np.zeros(n, x.dtype) if need_weight else None
    if need_x or need_weight:
        _call_c("rms_norm_backward", gx, gw, g, x, weight, rstd, rows, n)
    return gx, gw


def rotary(x, cos, sin, transpose=False):
    """x·cos + rotate_half(x)·sin (or its transpose) in the C core, into a new array laid out as x;
    x (B, H, T, D) with a unit stride along D, cos and sin dense (T, D), all of one float dtype."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"rotary: x must be a numpy.ndarray, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"rotary: x must be 4-D (B, H, T, D), got shape {x.shape}")
    B, H, T, D = x.shape
    _check_step_arrays("rotary", {}, {"cos": cos, "sin": sin})
    if x.dtype != cos.dtype:
        raise TypeError(f"rotary: x has dtype {x.dtype}, cos and sin {cos.dtype}; they must be alike")
    for name, a in (("cos", cos), ("sin", sin)):
        if a.shape != (T, D):
            raise ValueError(f"rotary: {name} has shape {a.shape}, expected {(T, D)} for x of shape {x.shape}")
    if D % 2:
        raise ValueError(f"rotary: x's last axis must be even, got shape {x.shape}")
    out = np.empty_like(x)
    _call_c("rotary", out, x, cos, sin, int(bool(transpose)), B, H, T, D, _strides3(x), _strides3(out))
    return out


def _head_strides(a, g):
    """Strides in elements of a (B, Hkv·g, T, D)-like array, as (batch, kv head, position, query head in group)."""
    sb, sh, st, sd = (x // a.itemsize for x in a.strides)
    if (sd != 1 and a.shape[-1] > 1 and a.size) or any(x % a.itemsize for x in a.strides):
        raise ValueError(f"attention: an array of shape {a.shape} needs a unit stride along its last axis, "
                         f"got strides {a.strides}")
    return _ffi.new("int64_t[4]", [sb, g * sh, st, sh])


def _attention_dims(q, k, v):
    for name, a in (("q", q), ("k", k), ("v", v)):
        if not isinstance(a, np.ndarray):
            raise TypeError(f"attention: {name} must be a numpy.ndarray, got {type(a).__name__}")
        if a.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"attention: {name} ({dict(q='query', k='key', v='value')[name]}) has dtype {a.dtype}; "
                            "expected float32 or float64")
        if a.dtype != q.dtype:
            raise TypeError(f"attention: {name} ({dict(q='query', k='key', v='value')[name]}) has dtype {a.dtype}, "
                            f"but q (query) has {q.dtype}")
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] \
            or k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: query {q.shape}, key {k.shape}, value {v.shape} must be (B, Hq, T, D), "
                         "(B, Hkv, S, D), (B, Hkv, S, D) with Hq a multiple of Hkv >= 1")
    _check_step_arrays("attention", {}, {"k": k, "v": v})
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    return B, Hkv, Hq // Hkv, T, S, D


def attention_forward(q, k, v, scale, is_causal):
    """softmax(scale·q kᵀ [+ causal mask]) v in the C core, grouped-query heads (query head h·g + j
    uses key/value head h). q (B, Hq, T, D) with any strides but a unit one along D; k, v dense
    (B, Hkv, S, D). Returns out (B, T, Hkv, g, D), dense (= (B, T, Hq·D)), and lse (B, Hkv, T, g)."""
    B, Hkv, g, T, S, D = _attention_dims(q, k, v)
    out = np.empty((B, T, Hkv, g, D), q.dtype)
    lse = np.empty((B, Hkv, T, g), q.dtype)
    out_view = out.transpose(0, 2, 3, 1, 4).reshape(B, Hkv * g, T, D)
    _call_c("attention_forward", out, lse, q, k, v, float(scale), int(bool(is_causal)), B, Hkv, g, T, S, D,
            _head_strides(q, g), _head_strides(out_view, g))
    return out, lse


def attention_backward(g_out, q, k, v, out, lse, scale, is_causal, need_q=True, need_k=True, need_v=True):
    """Gradients (dq in q's memory layout, dk, dv dense), None where not needed, of attention_forward's
    output given g_out (B, Hq, T, D) (any strides but a unit one along D)."""
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
    dq_strides = _head_strides(dq, g) if need_q else _ffi.new("int64_t[4]")
    _call_c("attention_backward", dq, dk, dv, g_out, q, k, v, out, lse, float(scale), int(bool(is_causal)),
            B, Hkv, g, T, S, D, dq_strides, _head_strides(g_out, g), _head_strides(q, g), _head_strides(out_view, g))
    return dq, dk, dv


_select_initial_backend()
