"""Optional CUDA backend: device arrays and the three LoRA ops on them.

csrc/cuda/lora_cuda.cu is built by nvcc only when asked (``LORA_NP_CUDA=1 pip install .`` or
``python lora_np/_cuda_build.py``) into lora_np/_lora_np_cuda.so, which this module opens with
cffi in ABI mode (``ffi.dlopen``) the first time it is needed, declared by the header
csrc/cuda/lora_cuda.h that the build copies beside it; importing this module loads nothing.

    d = to_device(np_array)      # upload: a DeviceArray (2-D, float32 or float64, dense)
    d.to_numpy()                 # download
    d.free()                     # or let it be garbage-collected

The ops take DeviceArrays through ``lora_np.kernels`` (which checks them first), e.g.
``t = kernels.lora_forward(y_dev, x_dev, a_dev, b_dev, s)`` leaves y and t on the device.
"""
import os

import numpy as np

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lora_np_cuda.so")

# csrc/cuda/lora_cuda.h, installed beside the library by _cuda_build.py: the cffi declarations.
HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lora_np_cuda.h")

ffi = None  # made in _load: cffi's C parser costs ~50 ms, too much for `import lora_np`
_lib = None
_why = None  # why the library cannot be used, once known


def why_unavailable():
    """None when the CUDA library loads and sees a GPU, else the reason as a sentence."""
    _load()
    return _why


def _load():
    global _lib, _why, ffi
    if _lib is not None or _why is not None:
        return _lib
    missing = [path for path in (LIBRARY, HEADER) if not os.path.exists(path)]
    if missing:
        _why = f"{missing[0]} is not built (install with LORA_NP_CUDA=1, or run lora_np/_cuda_build.py)"
        return None
    from cffi import FFI

    from ._ffi_build import cdef_from_header

    ffi = FFI()
    ffi.cdef(cdef_from_header(HEADER))
    try:
        lib = ffi.dlopen(LIBRARY)
    except OSError as e:
        _why = f"{LIBRARY} does not load: {e}"
        return None
    count = ffi.new("int *")
    status = lib.lora_cuda_device_count(count)
    if status != 0 or count[0] < 1:
        _why = f"no CUDA device ({ffi.string(lib.lora_cuda_error_string(status)).decode()})"
        return None
    _lib = lib
    return _lib


def _require():
    lib = _load()
    if lib is None:
        raise RuntimeError(f"CUDA is unavailable: {_why}")
    return lib


def _check(status, what):
    if status != 0:
        raise RuntimeError(f"{what}: CUDA error {status}: {ffi.string(_lib.lora_cuda_error_string(status)).decode()}")


class DeviceArray:
    """A dense 2-D float32/float64 array in GPU memory, owned by this object."""

    def __init__(self, shape, dtype):
        lib = _require()
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize
        ptr = ffi.new("void **")
        _check(lib.lora_cuda_malloc(ptr, self.nbytes), f"allocating {self.nbytes} bytes")
        self._ptr = ptr[0]

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def address(self):
        return int(ffi.cast("uintptr_t", self._live()))

    def _live(self):
        if self._ptr is None:
            raise ValueError(f"DeviceArray {self.shape} was freed")
        return self._ptr

    def typed(self):
        """The device pointer as float * or double *, for the C calls."""
        return ffi.cast("float *" if self.dtype == np.float32 else "double *", self._live())

    def copy_from(self, host):
        host = np.ascontiguousarray(host, dtype=self.dtype)
        if host.shape != self.shape:
            raise ValueError(f"copy_from: host array has shape {host.shape}, DeviceArray has {self.shape}")
        _check(_lib.lora_cuda_upload(self._live(), ffi.from_buffer(host), self.nbytes), "upload")

    def to_numpy(self, out=None):
        """Download into a new array, or into `out` (C-contiguous, same shape and dtype)."""
        if out is None:
            out = np.empty(self.shape, self.dtype)
        if out.shape != self.shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"to_numpy: out must be C-contiguous {self.dtype} {self.shape}, got {out.dtype} {out.shape}")
        _check(_lib.lora_cuda_download(ffi.from_buffer(out, require_writable=True), self._live(), self.nbytes), "download")
        return out

    def overlaps(self, other):
        if not isinstance(other, DeviceArray) or self._ptr is None or other._ptr is None:
            return False
        a, b = self.address, other.address
        return a < b + other.nbytes and b < a + self.nbytes and self.nbytes > 0 and other.nbytes > 0

    def free(self):
        if getattr(self, "_ptr", None) is not None and _lib is not None:
            _lib.lora_cuda_free(self._ptr)
        self._ptr = None

    __del__ = free

    def __repr__(self):
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype})"


def to_device(host):
    """Upload a 2-D float32/float64 NumPy array."""
    host = np.asarray(host)
    if host.dtype not in (np.float32, np.float64) or host.ndim != 2:
        raise TypeError(f"to_device: expected a 2-D float32/float64 array, got {host.dtype} {host.shape}")
    dev = DeviceArray(host.shape, host.dtype)
    dev.copy_from(host)
    return dev


def synchronize():
    """Wait for all queued GPU work (for timing)."""
    _check(_require().lora_cuda_synchronize(), "synchronize")


def _fn(op, dtype):
    return getattr(_require(), f"lora_cuda_{op}_{'f32' if dtype == np.float32 else 'f64'}")


def _ptr(a):
    return ffi.NULL if a is None else a.typed()


# The ops below expect arguments already checked by lora_np.kernels.


def lora_forward(y, x, lora_A, lora_B, scaling):
    (N, n_in), r, out = x.shape, lora_A.shape[0], lora_B.shape[0]
    t = DeviceArray((N, r), x.dtype)
    _check(_fn("forward", x.dtype)(y.typed(), t.typed(), x.typed(), lora_A.typed(), lora_B.typed(),
                                   scaling, N, n_in, out, r), "lora_forward")
    return t


def lora_backward(dx, d_lora_A, d_lora_B, dy, x, t, lora_A, lora_B, scaling):
    (N, n_in), r, out = x.shape, lora_A.shape[0], lora_B.shape[0]
    _check(_fn("backward", x.dtype)(_ptr(dx), _ptr(d_lora_A), _ptr(d_lora_B), dy.typed(), x.typed(), t.typed(),
                                    lora_A.typed(), lora_B.typed(), scaling, N, n_in, out, r), "lora_backward")


def lora_merge(weight, lora_A, lora_B, scaling, fan_in_fan_out):
    (r, n_in), out = lora_A.shape, lora_B.shape[0]
    _check(_fn("merge", weight.dtype)(weight.typed(), lora_A.typed(), lora_B.typed(), scaling,
                                      int(fan_in_fan_out), n_in, out, r), "lora_merge")


def on_host(op, outputs, inputs, *scalars):
    """Run op on host arrays: upload, compute, download the outputs in place (and a returned array)."""
    dev_out = [None if a is None else to_device(a) for a in outputs]
    dev_in = [to_device(a) for a in inputs]
    try:
        result = op(*dev_out, *dev_in, *scalars)
        for host, dev in zip(outputs, dev_out):
            if dev is not None:
                dev.to_numpy(out=host)
        if isinstance(result, DeviceArray):
            host_result = result.to_numpy()
            result.free()
            return host_result
        return None
    finally:
        for dev in dev_out + dev_in:
            if dev is not None:
                dev.free()
