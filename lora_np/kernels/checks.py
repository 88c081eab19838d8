"""The one argument checker of the kernels, and its fast path for the LoRA ops on the C backend.

Every op checks its arguments (type, dtype, shape, C-contiguity, outputs writeable and not
overlapping any other argument) before any compiled code runs, whatever the backend: a wrong
call raises TypeError or ValueError naming the op and the argument, and never reaches C.
"""
import numbers

import numpy as np

from lora_np import _cuda as cuda

from .backend import c_function, ffi

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_array(op, name, a, device=False, matrix=False):
    """a is a float32/float64 numpy.ndarray (or a cuda.DeviceArray when device), 2-D when matrix."""
    if not isinstance(a, (np.ndarray, cuda.DeviceArray) if device else np.ndarray):
        kinds = "a numpy.ndarray or cuda.DeviceArray" if device else "a numpy.ndarray"
        raise TypeError(f"{op}: {name} must be {kinds}, got {type(a).__name__}")
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {a.dtype}; expected float32 or float64")
    if matrix and a.ndim != 2:
        raise ValueError(f"{op}: {name} must be 2-D, got shape {a.shape}")


def check_arrays(op, outputs, inputs, shapes=None, device=False):
    """Type, one common float dtype, shape (where `shapes` {name: shape} gives one: then 2-D),
    C-contiguity, and outputs writeable and not overlapping any other argument.

    outputs / inputs: {name: array or None}; device: cuda.DeviceArrays are accepted, all or
    none. Returns (dtype, whether the arrays are on the device)."""
    if not outputs:  # the common call: inputs only, checked in one pass; any doubt goes to the full checks
        dtype = None
        for name, a in inputs.items():
            if a is None:
                continue
            if type(a) is not np.ndarray or a.dtype not in FLOAT_DTYPES or (dtype is not None and a.dtype != dtype) \
                    or not a.flags.c_contiguous or (shapes is not None and (a.ndim != 2 or a.shape != shapes[name])):
                break
            dtype = a.dtype
        else:
            if dtype is not None:
                return dtype, False
    given = {name: a for name, a in {**outputs, **inputs}.items() if a is not None}
    on_device = [isinstance(a, cuda.DeviceArray) for a in given.values()]
    if any(on_device) and not all(on_device):
        host = [n for n, a in given.items() if not isinstance(a, cuda.DeviceArray)]
        raise TypeError(f"{op}: mixing cuda.DeviceArray and host arrays: {', '.join(host)} are on the host")
    first = dtype = None
    for name, a in given.items():
        check_array(op, name, a, device, matrix=shapes is not None)
        if dtype is None:
            first, dtype = name, a.dtype
        if a.dtype != dtype:
            raise TypeError(f"{op}: {name} has dtype {a.dtype}, but {first} has {dtype}; "
                            "expected float32 or float64, all alike")
        if shapes is not None and a.shape != shapes[name]:
            raise ValueError(f"{op}: {name} has shape {a.shape}, expected {shapes[name]}")
        if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
            raise ValueError(f"{op}: {name} (shape {a.shape}, strides {a.strides}) must be C-contiguous")
    for name, a in outputs.items():
        if a is None:
            continue
        if isinstance(a, np.ndarray) and not a.flags.writeable:
            raise ValueError(f"{op}: {name} is an output and must be writeable")
        for other, b in given.items():
            if other != name and _overlaps(a, b):
                raise ValueError(f"{op}: output {name} {a.shape} overlaps {other} {b.shape} in memory; "
                                 "outputs must not alias")
    return dtype, bool(on_device) and all(on_device)


def _overlaps(a, b):
    if isinstance(a, cuda.DeviceArray):
        return a.overlaps(b)
    return np.may_share_memory(a, b)


def same_shape(op, **arrays):
    """ValueError naming every shape when the given (non-None) arrays' shapes differ."""
    shapes = {name: a.shape for name, a in arrays.items() if a is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{op}: shapes differ: " + ", ".join(f"{n} {s}" for n, s in shapes.items()))


def scalar(scaling):
    """scaling as a float; TypeError for anything but a real number."""
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"scaling must be a real number, got {type(scaling).__name__}")
    return float(scaling)


def contiguous(a):
    """a itself when C-contiguous, else a C-contiguous copy (np.ascontiguousarray makes 0-d arrays 1-d)."""
    return a if a.flags.c_contiguous else np.array(a, order="C")


# ---- the fast path -------------------------------------------------------------------------------
# The checks above cost ~40 µs a call in cache and ~200 µs when the interpreter's and NumPy's code
# are cold (after streaming a big tensor, as in merging a model's layers one after another), about
# as much as the merge of a 576 x 576 weight itself. For the common call of a LoRA op on the C
# backend (NumPy arrays of one float dtype, C-contiguous, a float scaling) c_fast checks the same
# things in fewer steps: cffi's from_buffer refuses non-C-contiguous and (for outputs) read-only
# arrays, and the overlap test compares the pointers' byte ranges, which is what np.may_share_memory
# does for contiguous arrays. Anything else, or any failed check, takes the full path, which names
# the problem. Shapes are the caller's to check.

CTYPES = {np.dtype(np.float32): "float[]", np.dtype(np.float64): "double[]"}


def c_fast(op, outputs, inputs):
    """(C function, [cffi pointers of outputs + inputs, None -> NULL]) when every array passes the
    checks, else None."""
    dtype = inputs[0].dtype if type(inputs[0]) is np.ndarray else None
    ctype = CTYPES.get(dtype)
    if ctype is None:
        return None
    pointers = []
    try:
        for a in outputs:
            if a is None:
                pointers.append(None)
            elif type(a) is not np.ndarray or a.dtype is not dtype:
                return None
            else:
                pointers.append(ffi.from_buffer(ctype, a, require_writable=True))
        for a in inputs:
            if type(a) is not np.ndarray or a.dtype is not dtype:
                return None
            pointers.append(ffi.from_buffer(ctype, a))
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
    return c_function(op, dtype), [ffi.NULL if p is None else p for p in pointers]
