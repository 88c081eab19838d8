"""The optional CUDA build: the same properties as the C core, on device arrays.

Runs where lora_np/_lora_np_cuda.so is built (LORA_NP_CUDA=1) and a GPU is present; elsewhere
the GPU tests skip (a missing GPU is not a missing cross-check package). The check that the
cffi declarations read from csrc/cuda/lora_cuda.h cover the library's calls runs everywhere.
"""
import os
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lora_np import _cuda, kernels
from conftest import ROOT
from test_kernels import check, make_case, reference, run_backward, run_forward, run_merge

needs_gpu = pytest.mark.skipif(_cuda.why_unavailable() is not None, reason=f"CUDA: {_cuda.why_unavailable()}")


def declarations(text):
    """C declarations with comments, preprocessor lines and extern "C" braces removed, one per line."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)
    lines = [ln for ln in text.splitlines() if not ln.strip().startswith("#")
             and ln.strip() not in ('extern "C" {', "}")]
    return [" ".join(d.split()) + ";" for d in " ".join(lines).split(";") if d.strip()]


def test_cffi_declarations_are_the_header():
    """_cuda declares the library with csrc/cuda/lora_cuda.h itself (the copy the build installs beside
    it): cffi parses the header as _cuda reads it, and it declares every function _cuda calls."""
    from cffi import FFI

    from lora_np._ffi_build import cdef_from_header

    cdef = cdef_from_header(os.path.join(ROOT, "csrc", "cuda", "lora_cuda.h"))
    FFI().cdef(cdef)
    declared = {re.search(r"(lora_cuda_\w+)\(", d).group(1) for d in declarations(cdef)}
    with open(_cuda.__file__) as f:
        called = set(re.findall(r"lora_cuda_\w+(?=\()", f.read()))
    called |= {f"lora_cuda_{op}_{sfx}" for op in ("forward", "backward", "merge") for sfx in ("f32", "f64")}
    assert called <= declared, f"called but not declared: {sorted(called - declared)}"


def test_cuda_unavailable_is_explained():
    if _cuda.why_unavailable() is None:
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="CUDA is unavailable: .+"):
        _cuda.to_device(np.zeros((2, 2), np.float32))


sizes = st.tuples(st.integers(1, 70), st.integers(1, 80), st.integers(1, 80), st.integers(1, 64))


def on_device(a):
    return {k: _cuda.to_device(v) if isinstance(v, np.ndarray) else v for k, v in a.items()}


@needs_gpu
@given(sizes=sizes, seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]),
       which=st.sets(st.sampled_from(["dx", "d_lora_A", "d_lora_B"])), fan_in_fan_out=st.booleans())
def test_device_ops_match_numpy(sizes, seed, dtype, which, fan_in_fan_out):
    a = make_case(seed, *sizes, dtype)
    d = on_device(a)
    t = kernels.lora_forward(d["y"], d["x"], d["lora_A"], d["lora_B"], a["scaling"])
    assert isinstance(t, _cuda.DeviceArray)
    got = {"y": d["y"].to_numpy(), "t": t.to_numpy()}
    kernels.lora_backward(*(d[k] if k in which else None for k in ("dx", "d_lora_A", "d_lora_B")),
                          d["dy"], d["x"], d["t"], d["lora_A"], d["lora_B"], a["scaling"])
    got.update({k: d[k].to_numpy() for k in which})
    w = d["weight_t" if fan_in_fan_out else "weight"]
    kernels.lora_merge(w, d["lora_A"], d["lora_B"], a["scaling"], fan_in_fan_out)
    got["merge"] = w.to_numpy()

    def all_ops(v):
        return {**run_forward(v, "numpy"), **run_backward(v, which, "numpy"), "merge": run_merge(v, fan_in_fan_out, "numpy")}

    want, _ = reference(all_ops, a)
    mag, _ = reference(all_ops, a, absolute=True)
    for k, v in got.items():
        assert v.dtype == dtype
        check(v, want[k], mag[k], dtype, f"cuda {k} {sizes}")
    for v in [t, *d.values()]:
        if isinstance(v, _cuda.DeviceArray):
            v.free()


@needs_gpu
def test_cuda_backend_on_host_arrays_and_repeatability():
    a = make_case(3, 3000, 576, 1536, 16, np.float32)
    kernels.set_backend("cuda")
    try:
        first = {**run_forward(a), **run_backward(a, {"dx", "d_lora_A", "d_lora_B"}), "merge": run_merge(a, True)}
        second = {**run_forward(a), **run_backward(a, {"dx", "d_lora_A", "d_lora_B"}), "merge": run_merge(a, True)}
    finally:
        kernels.set_backend("numpy")

    def all_ops(v):
        return {**run_forward(v, "numpy"), **run_backward(v, {"dx", "d_lora_A", "d_lora_B"}, "numpy"),
                "merge": run_merge(v, True, "numpy")}

    want, _ = reference(all_ops, a)
    mag, _ = reference(all_ops, a, absolute=True)
    for k, v in first.items():
        check(v, want[k], mag[k], np.float32, f"cuda backend {k}")
        assert np.array_equal(v, second[k]), f"{k} differs between two identical runs"


@needs_gpu
def test_device_arrays_are_checked():
    a = make_case(0, 6, 4, 4, 3, np.float32)
    d = on_device(a)
    with pytest.raises(TypeError, match="mixing cuda.DeviceArray and host arrays: x"):
        kernels.lora_forward(d["y"], a["x"], d["lora_A"], d["lora_B"], 1.0)
    with pytest.raises(ValueError, match="output dx .* overlaps x"):
        kernels.lora_backward(d["x"], None, None, d["dy"], d["x"], d["t"], d["lora_A"], d["lora_B"], 1.0)
    with pytest.raises(ValueError, match=r"lora_B has shape \(4, 3\), expected \(4, 2\)|lora_A has shape"):
        kernels.lora_forward(d["y"], d["x"], _cuda.to_device(a["lora_A"][:2].copy()), d["lora_B"], 1.0)
    x64 = _cuda.to_device(a["x"].astype(np.float64))
    with pytest.raises(TypeError, match="float64"):
        kernels.lora_forward(d["y"], x64, d["lora_A"], d["lora_B"], 1.0)
    d["x"].free()
    with pytest.raises(ValueError, match="was freed"):
        d["x"].to_numpy()
    assert np.array_equal(d["y"].to_numpy(), a["y"]), "refused calls changed y"


@needs_gpu
@pytest.mark.parametrize("N, n_in, out, r", [(0, 3, 4, 2), (3, 0, 4, 2), (3, 3, 0, 2), (3, 3, 4, 0), (0, 0, 0, 0)])
def test_cuda_backend_empty_sizes(N, n_in, out, r):
    a = make_case(0, N, n_in, out, r, np.float64)
    for fifo in (False, True):
        got = {**run_forward(a, "cuda"), **run_backward(a, {"dx", "d_lora_A", "d_lora_B"}, "cuda"),
               "merge": run_merge(a, fifo, "cuda")}
        want = {**run_forward(a, "numpy"), **run_backward(a, {"dx", "d_lora_A", "d_lora_B"}, "numpy"),
                "merge": run_merge(a, fifo, "numpy")}
        for k in want:
            assert np.allclose(got[k], want[k], rtol=1e-12, atol=0), f"{k} at N={N} in={n_in} out={out} r={r}"
