"""The backend registry, the compiled C module, and the thread and memory policy.

Backends: "numpy" (the references beside each op, always there), "c" (csrc/, built by
``pip install .`` through cffi into ``lora_np._lora_np_c``, OpenMP) and "cuda" (csrc/cuda/, built
only with ``LORA_NP_CUDA=1``, loaded by lora_np._cuda on first use). ``LORA_NP_BACKEND`` picks one
at import; the default is "c" when the compiled module loads, else "numpy".

This module imports no NumPy: the `lora-np` command's OpenBLAS setting below must be in the
environment before NumPy loads, and lora_np imports this module first.

(``lora_np.kernels.backend`` is the function backend(); this module is reached as
``from lora_np.kernels.backend import ...``.)
"""
import numbers
import os
import sys
import warnings

# The `lora-np` command only (not a library import): NumPy's OpenBLAS threads stop spinning
# right after each call, instead of for ~0.1 s, so that the C core's threads get the cores
# between GEMMs (a training step ~6% faster here). OpenBLAS reads the variable when NumPy
# loads, so it is set before NumPy is imported, and never over the user's own value.
if os.path.basename(sys.argv[0] if sys.argv else "") == "lora-np" and "numpy" not in sys.modules:
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

# OpenMP threads that spin after a parallel region take the cores from OpenBLAS's threads, and
# the other way round: measured on 2 cores, a base-layer GEMM followed by the LoRA kernels took
# 32 ms with spinning OpenMP threads against 16 ms with sleeping ones (bench/lora_kernels.py
# --after-gemm). So unless the user chose a policy, the OpenMP runtime the C module loads starts
# with OMP_WAIT_POLICY=passive; the variable is set only while the module loads (the runtime
# reads it then), so that libraries loaded later keep their own default. It has no effect when
# the process already loaded the same OpenMP runtime.
_wait_policy = os.environ.get("OMP_WAIT_POLICY")
os.environ["OMP_WAIT_POLICY"] = _wait_policy or "passive"
try:
    from lora_np._lora_np_c import ffi, lib

    C_MISSING = None
except ImportError as e:  # no compiler at install time: NumPy only
    ffi = lib = None
    C_MISSING = f"the compiled module lora_np._lora_np_c is not available ({e}); reinstall lora_np with a C compiler"
finally:
    if _wait_policy is None:
        del os.environ["OMP_WAIT_POLICY"]

BACKENDS = ("numpy", "c", "cuda")
_backend = "numpy"
_num_threads = 0


# ---- backend selection -------------------------------------------------------------------


def available_backends():
    """The backends that can run here, e.g. ['numpy', 'c']."""
    return [name for name in BACKENDS if _why_unavailable(name) is None]


def _why_unavailable(name):
    if name == "c":
        return C_MISSING
    if name == "cuda":
        from lora_np import _cuda

        return _cuda.why_unavailable()
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


def _select_initial_backend():
    global _backend
    _backend = "c" if lib is not None else "numpy"
    asked = os.environ.get("LORA_NP_BACKEND", "").strip().lower()
    if not asked:
        return
    try:
        set_backend(asked)
    except (ValueError, RuntimeError) as e:
        warnings.warn(f"LORA_NP_BACKEND={asked}: {e}; running on {_backend!r}", RuntimeWarning, stacklevel=3)


# ---- calling the C core ------------------------------------------------------------------


def c_function(op, dtype, ref=False):
    """lib.<op>[_ref]_{f32,f64} for a float32 / float64 dtype; RuntimeError, naming what to do,
    when the compiled module or the function is missing (a build older than this Python code)."""
    name = f"{op}{'_ref' if ref else ''}_{'f32' if dtype.itemsize == 4 else 'f64'}"
    fn = getattr(lib, name, None)
    if fn is None:
        why = C_MISSING or f"the compiled module lora_np._lora_np_c has no function {name} (an older build)"
        raise RuntimeError(f"{op}: the C backend cannot run it: {why}; rebuild lora_np (pip install .) "
                           "or choose the NumPy backend with lora_np.set_backend('numpy')")
    return fn


def c_status(op, status):
    """Turn the C core's error code into an exception."""
    if status == lib.LORA_OK:
        return
    if status == lib.LORA_ENOMEM:
        raise MemoryError(f"{op}: the C core could not allocate its small scratch buffers")
    raise RuntimeError(f"{op}: the C core returned error {status}")


def _pointer(a, ctype):
    """A cffi pointer to a's first element; strided arrays (attention's q) are passed with their strides."""
    try:
        return ffi.from_buffer(ctype, a)  # refuses an array that is not C-contiguous
    except ValueError:
        return ffi.cast(ctype[:-2] + "*", a.__array_interface__["data"][0])


_PLAIN = (int, float)  # the sizes and scalars among call_c's arguments, passed as they are
_ARRAY_TYPES = {}  # type -> whether its instances are arrays (asked once per type: hasattr on an ndarray
                  # builds its __array_interface__ dict each time, on an int it raises an AttributeError)


def _is_array(a):
    kind = _ARRAY_TYPES.get(type(a))
    if kind is None:
        kind = _ARRAY_TYPES[type(a)] = hasattr(type(a), "__array_interface__")
    return kind


def call_c(op, *args, ref=False):
    """Call lib.<op>[_ref]_{f32,f64} (the dtype of the first array) with arrays passed as pointers
    (None -> NULL) and the other arguments as they are; arguments are the caller's to check."""
    arrays = [type(a) not in _PLAIN and a is not None and _is_array(a) for a in args]
    dtype = args[arrays.index(True)].dtype
    fn = c_function(op, dtype, ref)
    ctype = "float[]" if dtype.itemsize == 4 else "double[]"
    c_args = [_pointer(a, ctype) if is_array else ffi.NULL if a is None else a for a, is_array in zip(args, arrays)]
    c_status(op, fn(*c_args))


def c_int64s(values):
    """A C int64_t array holding values (strides in elements), alive as long as the returned object."""
    return ffi.new(f"int64_t[{len(values)}]", list(values))


# ---- threads and memory --------------------------------------------------------------------


def set_num_threads(n):
    """Threads for the C backend's OpenMP loops (n >= 1)."""
    global _num_threads
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"set_num_threads: n must be an integer >= 1, got {n!r}")
    _num_threads = int(n)
    if lib is not None:
        lib.lora_set_num_threads(_num_threads)


def get_num_threads():
    """Threads the C backend uses (1 without OpenMP)."""
    if lib is not None:
        return lib.lora_get_num_threads()
    return _num_threads or 1


def set_threads(n):
    """Use n threads in the C core and in NumPy's OpenBLAS (found in the loaded libraries)."""
    set_num_threads(n)
    import ctypes

    with open("/proc/self/maps") as fh:
        libs = {path for path in (line.split()[-1] for line in fh) if "openblas" in path.lower() and ".so" in path}
    for lib_path in libs:
        try:
            handle = ctypes.CDLL(lib_path)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(handle, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                break


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees its activations and gradients (about 1 GB for SmolLM2 at
    4 x 256 tokens, 2-3 GB for Qwen3-0.6B or Llama-3.2-1B); with glibc's defaults most of it goes back
    to the OS and page-faults in again on the next step: 270,000 faults and 1.5 s of system time per
    SmolLM2 step, 190,000 faults and 2-3 s per Qwen3-0.6B step. With this setting a step after the
    first faults a few dozen times. Every block comes from the heap (no mmap: glibc's ceiling for the
    mmap threshold is 32 MiB, and a Llama-3.2-1B MLP activation of 1024 x 8192 floats is just above it)
    and the heap's top is never trimmed. Peak memory is unchanged (the same blocks are reused); the
    process keeps its peak heap until it exits. Called by `train` and `evaluate`; a no-op where the C
    library has no mallopt (not glibc). Returns True when the setting was applied."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))  # -1: never trim


_select_initial_backend()
