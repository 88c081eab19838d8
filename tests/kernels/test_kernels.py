"""lora_np.kernels: the C core equals the NumPy reference, and wrong calls never reach C.

Properties: forward / backward / merge of the C core (tiled and plain-loop) equal the NumPy
reference over awkward sizes; results are bit-identical for 1 and 2 threads; merge then
unmerge returns the weight; every malformed call raises TypeError / ValueError naming the
argument and leaves the outputs untouched. The C driver csrc/test_lora_kernels.c also runs
once under AddressSanitizer. The tolerance is relative to the size of the terms summed:
float64 1e-12, float32 1e-5, times the same op evaluated on absolute values.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from conftest import IN_CI, ROOT, assert_close, run_c_driver_under_sanitizers
import lora_np.kernels.lora as klora
from lora_np import kernels
from lora_np.kernels.backend import C_MISSING, call_c

HAS_C = "c" in kernels.available_backends()
needs_c = pytest.mark.skipif(not HAS_C and not IN_CI, reason="C core not built")
RTOL = {np.float32: 1e-5, np.float64: 1e-12}


def test_c_core_is_built_in_ci():
    """CI installs with a compiler: the C backend must be there and be the default."""
    if not IN_CI:
        pytest.skip("only CI promises a compiler")
    assert "c" in kernels.available_backends(), C_MISSING
    assert kernels.backend() == "c"


# ---- data ---------------------------------------------------------------------------------

sizes = st.tuples(
    st.integers(1, 70),                               # N: tokens, crosses the 32-row blocks
    st.integers(1, 80),                               # in: not a multiple of the SIMD width
    st.integers(1, 80),                               # out
    st.integers(1, 64),                               # r
)


def make_case(seed, N, n_in, out, r, dtype):
    rng = np.random.default_rng(seed)
    a = {name: rng.standard_normal(shape).astype(dtype) for name, shape in {
        "x": (N, n_in), "lora_A": (r, n_in), "lora_B": (out, r), "y": (N, out), "dy": (N, out),
        "dx": (N, n_in), "d_lora_A": (r, n_in), "d_lora_B": (out, r), "weight": (out, n_in),
        "weight_t": (n_in, out)}.items()}
    a["scaling"] = float(rng.uniform(-4, 4))
    a["t"] = a["x"] @ a["lora_A"].T
    return a


def reference(op, args, absolute=False):
    """The NumPy reference in float64; with absolute=True on |args|: the magnitude of the terms."""
    wide = {k: (np.abs(v) if absolute else v).astype(np.float64) if isinstance(v, np.ndarray) else
            (abs(v) if absolute else v) for k, v in args.items()}
    return op(wide), wide


def check(actual, expected, magnitude, dtype, name):
    assert_close(actual, expected, rtol=0, atol=RTOL[dtype] * max(float(np.max(magnitude, initial=0)), 1e-300),
                 name=name)


def run_forward(a, backend=None, ref_c=False):
    y = a["y"].copy()
    if ref_c:
        t = np.empty_like(a["t"])
        N, n_in = a["x"].shape
        call_c("lora_forward", y, t, a["x"], a["lora_A"], a["lora_B"], a["scaling"], N, n_in,
               a["lora_B"].shape[0], a["lora_A"].shape[0], ref=True)
    else:
        if backend:
            kernels.set_backend(backend)
        t = kernels.lora_forward(y, a["x"], a["lora_A"], a["lora_B"], a["scaling"])
    return {"y": y, "t": t}


def run_backward(a, which, backend=None, ref_c=False):
    grads = {k: (a[k].copy() if k in which else None) for k in ("dx", "d_lora_A", "d_lora_B")}
    args = (grads["dx"], grads["d_lora_A"], grads["d_lora_B"], a["dy"], a["x"], a["t"], a["lora_A"],
            a["lora_B"], a["scaling"])
    if ref_c:
        N, n_in = a["x"].shape
        call_c("lora_backward", *args, N, n_in, a["lora_B"].shape[0], a["lora_A"].shape[0], ref=True)
    else:
        if backend:
            kernels.set_backend(backend)
        kernels.lora_backward(*args)
    return {k: v for k, v in grads.items() if v is not None}


def run_merge(a, fan_in_fan_out, backend=None, ref_c=False):
    w = (a["weight_t"] if fan_in_fan_out else a["weight"]).copy()
    if ref_c:
        r, n_in = a["lora_A"].shape
        call_c("lora_merge", w, a["lora_A"], a["lora_B"], a["scaling"], int(fan_in_fan_out), n_in,
               a["lora_B"].shape[0], r, ref=True)
    else:
        if backend:
            kernels.set_backend(backend)
        kernels.lora_merge(w, a["lora_A"], a["lora_B"], a["scaling"], fan_in_fan_out=fan_in_fan_out)
    return w


# ---- the C core equals the NumPy reference --------------------------------------------------


@needs_c
@given(sizes=sizes, seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]),
       ref_c=st.booleans())
def test_forward_matches_numpy(sizes, seed, dtype, ref_c):
    a = make_case(seed, *sizes, dtype)
    got = run_forward(a, "c", ref_c)
    want, _ = reference(lambda w: run_forward(w, "numpy"), a)
    mag, _ = reference(lambda w: run_forward(w, "numpy"), a, absolute=True)
    for k in ("y", "t"):
        assert got[k].dtype == dtype
        check(got[k], want[k], mag[k], dtype, f"forward {k} {sizes}")


@needs_c
@given(sizes=sizes, seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]),
       which=st.sets(st.sampled_from(["dx", "d_lora_A", "d_lora_B"])), ref_c=st.booleans())
def test_backward_matches_numpy(sizes, seed, dtype, which, ref_c):
    a = make_case(seed, *sizes, dtype)
    got = run_backward(a, which, "c", ref_c)
    want, _ = reference(lambda w: run_backward(w, which, "numpy"), a)
    mag, _ = reference(lambda w: run_backward(w, which, "numpy"), a, absolute=True)
    assert set(got) == set(which)
    for k in which:
        check(got[k], want[k], mag[k], dtype, f"backward {k} {sizes}")


@needs_c
@given(sizes=sizes, seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]),
       fan_in_fan_out=st.booleans(), ref_c=st.booleans())
def test_merge_matches_numpy(sizes, seed, dtype, fan_in_fan_out, ref_c):
    a = make_case(seed, *sizes, dtype)
    got = run_merge(a, fan_in_fan_out, "c", ref_c)
    want, _ = reference(lambda w: run_merge(w, fan_in_fan_out, "numpy"), a)
    mag, _ = reference(lambda w: run_merge(w, fan_in_fan_out, "numpy"), a, absolute=True)
    check(got, want, mag, dtype, f"merge fan_in_fan_out={fan_in_fan_out} {sizes}")


def test_numpy_reference_is_the_formula():
    """The reference against the formula written out element by element, once."""
    a = make_case(1, 3, 5, 4, 2, np.float64)
    x, A, B, s = a["x"], a["lora_A"], a["lora_B"], a["scaling"]
    y = run_forward(a, "numpy")["y"]
    want = a["y"] + s * np.array([[sum(x[n] @ A[k] * B[o, k] for k in range(2)) for o in range(4)] for n in range(3)])
    assert_close(y, want, rtol=1e-12, name="y")
    g = run_backward(a, {"dx", "d_lora_A", "d_lora_B"}, "numpy")
    dyB = np.array([[sum(a["dy"][n, o] * B[o, k] for o in range(4)) for k in range(2)] for n in range(3)])
    assert_close(g["d_lora_A"], a["d_lora_A"] + s * np.einsum("nk,ni->ki", dyB, x), rtol=1e-12, name="d_lora_A")
    assert_close(g["d_lora_B"], a["d_lora_B"] + s * np.einsum("no,nk->ok", a["dy"], a["t"]), rtol=1e-12, name="d_lora_B")
    assert_close(g["dx"], a["dx"] + s * np.einsum("nk,ki->ni", dyB, A), rtol=1e-12, name="dx")
    assert_close(run_merge(a, True, "numpy"), a["weight_t"] + s * (B @ A).T, rtol=1e-12, name="merge fan_in_fan_out")


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
@given(sizes=sizes, seed=st.integers(0, 2**32 - 1), fan_in_fan_out=st.booleans())
def test_merge_then_unmerge_returns_weight(backend, sizes, seed, fan_in_fan_out):
    a = make_case(seed, *sizes, np.float64)
    w0 = (a["weight_t"] if fan_in_fan_out else a["weight"]).copy()
    kernels.set_backend(backend)
    w = w0.copy()
    kernels.lora_merge(w, a["lora_A"], a["lora_B"], a["scaling"], fan_in_fan_out)
    kernels.lora_merge(w, a["lora_A"], a["lora_B"], -a["scaling"], fan_in_fan_out)
    mag, _ = reference(lambda v: run_merge(v, fan_in_fan_out, "numpy"), a, absolute=True)
    check(w, w0, mag, np.float64, "merge then unmerge")


@needs_c
@pytest.mark.parametrize("N, n_in, out, r", [(0, 3, 4, 2), (3, 0, 4, 2), (3, 3, 0, 2), (3, 3, 4, 0), (0, 0, 0, 0)])
def test_empty_sizes_match_numpy(N, n_in, out, r):
    a = make_case(0, N, n_in, out, r, np.float64)
    for fifo in (False, True):
        got = {**run_forward(a, "c"), **run_backward(a, {"dx", "d_lora_A", "d_lora_B"}, "c"), "merge": run_merge(a, fifo, "c")}
        want = {**run_forward(a, "numpy"), **run_backward(a, {"dx", "d_lora_A", "d_lora_B"}, "numpy"),
                "merge": run_merge(a, fifo, "numpy")}
        for k in want:
            assert_close(got[k], want[k], rtol=1e-12, name=f"{k} at N={N} in={n_in} out={out} r={r}")


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
def test_merge_makes_no_weight_sized_temporary(backend):
    """Peak NumPy allocation during a merge stays far below the weight's size (the C core's
    own scratch is r x cols by construction, and malloc'ed outside NumPy's accounting)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((2048, 1024)).astype(np.float32)  # 8 MiB
    lora_A, lora_B = rng.standard_normal((8, 1024)).astype(np.float32), rng.standard_normal((2048, 8)).astype(np.float32)
    kernels.set_backend(backend)
    tracemalloc.start()
    try:
        kernels.lora_merge(weight, lora_A, lora_B, 0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < weight.nbytes / 4, f"merge allocated {peak} bytes at peak for a {weight.nbytes}-byte weight"


@needs_c
@given(N=st.integers(1, 700), n_in=st.integers(1, 50), out=st.integers(1, 50), r=st.integers(1, 20),
       seed=st.integers(0, 2**32 - 1), dtype=st.sampled_from([np.float32, np.float64]))
def test_one_and_two_threads_give_identical_bits(N, n_in, out, r, seed, dtype):
    a = make_case(seed, N, n_in, out, r, dtype)
    results = []
    for threads in (1, 2):
        kernels.set_num_threads(threads)
        results.append({**run_forward(a, "c"), **run_backward(a, {"dx", "d_lora_A", "d_lora_B"}, "c"),
                        "merge": run_merge(a, N % 2 == 1, "c")})
    for k in results[0]:
        assert np.array_equal(results[0][k], results[1][k]), f"{k} differs between 1 and 2 threads"


@needs_c
@pytest.mark.parametrize("N, n_in, out, r, dtype", [
    (1000, 576, 1536, 16, np.float32),  # several tiles, chunks and SIMD blocks in every dimension
    (777, 576, 1536, 8, np.float32),    # the unrolled rank-8 update; backward blocks of 9 rows
    (301, 576, 576, 4, np.float64),     # the unrolled rank-4 update; blocks of 15 rows
    (97, 3000, 5000, 8, np.float32),    # wide rows: backward blocks of 3 rows, groups of 6
    (300, 40, 70, 64, np.float32),      # rank 64: several column panels of the partial sums
    (60, 1100, 700, 48, np.float32),    # panels of lora_A / lora_B in the dot and the update
    (50, 600, 700, 64, np.float64),     # the same in float64 (narrower panels)
])
def test_large_case_matches_numpy(N, n_in, out, r, dtype):
    """Sizes that cross the backward's blocks and groups (sized from in, out and r) and the
    forward's 32-row blocks, with the next block prefetched."""
    a = make_case(7, N, n_in, out, r, dtype)
    for k, v in run_forward(a, "c").items():
        want, _ = reference(lambda w: run_forward(w, "numpy"), a)
        mag, _ = reference(lambda w: run_forward(w, "numpy"), a, absolute=True)
        check(v, want[k], mag[k], dtype, f"forward {k}")
    got = run_backward(a, {"dx", "d_lora_A", "d_lora_B"}, "c")
    want, _ = reference(lambda w: run_backward(w, {"dx", "d_lora_A", "d_lora_B"}, "numpy"), a)
    mag, _ = reference(lambda w: run_backward(w, {"dx", "d_lora_A", "d_lora_B"}, "numpy"), a, absolute=True)
    for k in got:
        check(got[k], want[k], mag[k], dtype, f"backward {k}")
    for fan_in_fan_out in (False, True):
        merged = run_merge(a, fan_in_fan_out, "c")
        want, _ = reference(lambda w: run_merge(w, fan_in_fan_out, "numpy"), a)
        mag, _ = reference(lambda w: run_merge(w, fan_in_fan_out, "numpy"), a, absolute=True)
        check(merged, want, mag, dtype, f"merge (fan_in_fan_out={fan_in_fan_out})")


# ---- wrong calls are refused before C ---------------------------------------------------------


def small(dtype=np.float32):
    return make_case(0, 6, 5, 4, 3, dtype)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
@pytest.mark.parametrize("arg, bad, error, words", [
    ("x", lambda a: a["x"].astype(np.int64), TypeError, ["x", "int64"]),
    ("x", lambda a: a["x"].astype(np.float16), TypeError, ["x", "float16"]),
    ("lora_A", lambda a: a["lora_A"].astype(np.float64), TypeError, ["lora_A", "float64"]),
    ("y", lambda a: a["y"].tolist(), TypeError, ["y", "list"]),
    ("lora_B", lambda a: np.zeros((4, 2), np.float32), ValueError, ["lora_B", "(4, 2)", "(4, 3)"]),
    ("y", lambda a: np.zeros((6, 5), np.float32), ValueError, ["y", "(6, 5)", "(6, 4)"]),
    ("x", lambda a: a["x"][None], ValueError, ["x", "2-D"]),
    ("x", lambda a: np.asfortranarray(a["x"]), ValueError, ["x", "C-contiguous"]),
    ("lora_A", lambda a: np.zeros((3, 10), np.float32)[:, ::2], ValueError, ["lora_A", "C-contiguous"]),
])
def test_forward_rejects(backend, arg, bad, error, words):
    kernels.set_backend(backend)
    a = small()
    args = {"y": a["y"].copy(), "x": a["x"], "lora_A": a["lora_A"], "lora_B": a["lora_B"]}
    before = args["y"].copy()
    args[arg] = bad(a)
    with pytest.raises(error) as e:
        kernels.lora_forward(args["y"], args["x"], args["lora_A"], args["lora_B"], a["scaling"])
    for w in words:
        assert w in str(e.value)
    if arg != "y":
        assert np.array_equal(args["y"], before), "a refused call changed y"


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
def test_aliasing_outputs_are_refused(backend):
    kernels.set_backend(backend)
    a = make_case(0, 6, 4, 4, 3, np.float32)  # in == out, so y and x can share a buffer
    buf = np.zeros((7, 4), np.float32)
    with pytest.raises(ValueError, match="output y .* overlaps x"):
        kernels.lora_forward(buf[:6], buf[1:], a["lora_A"], a["lora_B"], 1.0)
    with pytest.raises(ValueError, match="output dx .* overlaps x"):
        kernels.lora_backward(a["x"], None, None, a["dy"], a["x"], a["t"], a["lora_A"], a["lora_B"], 1.0)
    with pytest.raises(ValueError, match="output d_lora_A .* overlaps lora_A"):
        kernels.lora_backward(None, a["lora_A"], None, a["dy"], a["x"], a["t"], a["lora_A"], a["lora_B"], 1.0)
    grads = np.zeros((9, 4), np.float32)  # dx [6, 4] and d_lora_A [3, 4] overlapping by one row
    with pytest.raises(ValueError, match="overlaps"):
        kernels.lora_backward(grads[:6], grads[5:8], None, a["dy"], a["x"], a["t"], a["lora_A"], a["lora_B"], 1.0)
    w = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="output weight .* overlaps lora_A"):
        kernels.lora_merge(w, w[:3], a["lora_B"], 1.0)


KINDS = ["own"] * 9 + ["shared"] * 9 + ["fortran", "float64", "readonly", "strided", "list"]
OP_ARGS = {"forward": (["y"], ["x", "lora_A", "lora_B"]),
           "backward": (["dx", "d_lora_A", "d_lora_B"], ["dy", "x", "t", "lora_A", "lora_B"]),
           "merge": (["weight"], ["lora_A", "lora_B"])}


def build_call(op, N, n_in, out, r, kinds, offsets):
    """The arguments of one call, each made as kinds[name] says; 'shared' ones are views of one
    buffer at the given offsets, so they may overlap. Returns (args, that buffer)."""
    shapes = {"y": (N, out), "x": (N, n_in), "lora_A": (r, n_in), "lora_B": (out, r), "dx": (N, n_in),
              "d_lora_A": (r, n_in), "d_lora_B": (out, r), "dy": (N, out), "t": (N, r), "weight": (out, n_in)}
    shared = np.arange(400, dtype=np.float32) / 97
    args = {}
    for i, name in enumerate(OP_ARGS[op][0] + OP_ARGS[op][1]):
        shape, kind = shapes[name], kinds[i]
        size = shape[0] * shape[1]
        own = (np.arange(size, dtype=np.float32).reshape(shape) + i) / 31
        if kind == "none" and name in OP_ARGS[op][0]:
            args[name] = None
        elif kind == "shared":
            args[name] = shared[offsets[i]:offsets[i] + size].reshape(shape)
        elif kind == "fortran":
            args[name] = np.asfortranarray(own)
        elif kind == "float64":
            args[name] = own.astype(np.float64)
        elif kind == "readonly":
            own.flags.writeable = False
            args[name] = own
        elif kind == "strided":
            args[name] = np.repeat(own, 2, axis=1)[:, ::2]
        elif kind == "list":
            args[name] = own.tolist()
        else:
            args[name] = own
    return args, shared


def without_fast_path(m):
    """Make the ops take the full checks (m: a pytest.MonkeyPatch)."""
    m.setattr(klora, "_fast_forward", lambda *args: None)
    m.setattr(klora, "_fast_backward", lambda *args: False)
    m.setattr(klora, "_fast_merge", lambda *args: False)


@needs_c
@settings(max_examples=300)  # ~2 s: the accept / refuse decisions are the point, so many of them
@given(op=st.sampled_from(sorted(OP_ARGS)), N=st.integers(0, 4), n_in=st.integers(1, 6), out=st.integers(1, 6),
       r=st.integers(0, 3), kinds=st.lists(st.sampled_from(KINDS + ["none"]), min_size=8, max_size=8),
       offsets=st.lists(st.integers(0, 20), min_size=8, max_size=8),
       scaling=st.sampled_from([0.5] * 4 + [np.float32(0.5), 2, "2"]), fan_in_fan_out=st.booleans())
def test_fast_path_agrees_with_the_full_checks(op, N, n_in, out, r, kinds, offsets, scaling, fan_in_fan_out):
    """The C backend's fast path (lora_np.kernels.lora._fast_*) accepts exactly the calls the full checks
    accept, and computes the same bits; refused calls raise the full checks' error and write nothing."""
    kernels.set_backend("c")
    outcomes = []
    for fast in (True, False):
        with pytest.MonkeyPatch.context() as m:
            if not fast:
                without_fast_path(m)
            args, shared = build_call(op, N, n_in, out, r, kinds, offsets)
            if op == "merge" and fan_in_fan_out and isinstance(args["weight"], np.ndarray):
                args["weight"] = np.ascontiguousarray(args["weight"].reshape(n_in, out))
            before = [np.array(a, copy=True) for a in args.values() if a is not None]
            try:
                if op == "forward":
                    result = kernels.lora_forward(args["y"], args["x"], args["lora_A"], args["lora_B"], scaling)
                elif op == "backward":
                    result = kernels.lora_backward(*args.values(), scaling)
                else:
                    result = kernels.lora_merge(*args.values(), scaling, fan_in_fan_out=fan_in_fan_out)
                outcomes.append(("ok", [np.array(a) for a in args.values() if a is not None] + [shared, result]))
            except (TypeError, ValueError) as e:
                after = [np.array(a, copy=True) for a in args.values() if a is not None]
                assert all(np.array_equal(b, c) for b, c in zip(before, after)), "a refused call wrote"
                outcomes.append((type(e).__name__, str(e)))
    (kind_fast, fast_out), (kind_full, full_out) = outcomes
    event(kind_fast if kind_fast != "ValueError" else "overlap" if "overlaps" in fast_out else "ValueError")
    assert kind_fast == kind_full, (outcomes[0], outcomes[1])
    if kind_fast == "ok":
        for a, b in zip(fast_out, full_out):
            assert (a is None and b is None) or np.array_equal(a, b)
    else:
        assert fast_out == full_out


@needs_c
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_plain_calls_take_the_fast_path(dtype):
    """NumPy arrays of one dtype with a float scaling never reach the full checks (the property above
    would hold trivially if the fast path refused everything), and give the full path's bits."""
    kernels.set_backend("c")

    def no_full_checks(*args):
        raise AssertionError("the full checks ran")

    def run_all(a):
        return ([run_merge(a, f) for f in (False, True)] + list(run_forward(a).values())
                + [g for which in (("dx", "d_lora_A", "d_lora_B"), ("d_lora_B",)) for g in run_backward(a, which).values()])

    a = make_case(1, 37, 20, 30, 4, dtype)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(klora, "check_arrays", no_full_checks)
        fast = run_all(a)
    with pytest.MonkeyPatch.context() as m:
        without_fast_path(m)
        full = run_all(a)
    assert len(fast) == len(full) == 8
    for f, g in zip(fast, full):
        assert np.array_equal(f, g)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
def test_other_bad_arguments(backend):
    kernels.set_backend(backend)
    a = small()
    y = a["y"].copy()
    y.flags.writeable = False
    with pytest.raises(ValueError, match="y is an output and must be writeable"):
        kernels.lora_forward(y, a["x"], a["lora_A"], a["lora_B"], 1.0)
    with pytest.raises(TypeError, match="scaling must be a real number"):
        kernels.lora_forward(a["y"].copy(), a["x"], a["lora_A"], a["lora_B"], "2")
    with pytest.raises(TypeError, match="t is required"):
        kernels.lora_backward(None, a["d_lora_A"].copy(), None, a["dy"], a["x"], None, a["lora_A"], a["lora_B"], 1.0)
    with pytest.raises(ValueError, match=r"d_lora_B has shape \(3, 4\), expected \(4, 3\)"):
        kernels.lora_backward(None, None, np.zeros((3, 4), np.float32), a["dy"], a["x"], a["t"], a["lora_A"],
                              a["lora_B"], 1.0)
    with pytest.raises(ValueError, match=r"weight has shape \(4, 5\), expected \(5, 4\)"):
        kernels.lora_merge(a["weight"].copy(), a["lora_A"], a["lora_B"], 1.0, fan_in_fan_out=True)


# ---- backend selection and threads ---------------------------------------------------------------


def test_backend_selection():
    assert "numpy" in kernels.available_backends()
    with pytest.raises(ValueError, match="unknown lora_np backend 'fortran'"):
        kernels.set_backend("fortran")
    kernels.set_backend("numpy")
    assert kernels.backend() == "numpy"
    if "cuda" not in kernels.available_backends():
        with pytest.raises(RuntimeError, match="'cuda' is unavailable: .+"):
            kernels.set_backend("cuda")


def test_set_num_threads():
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="integer >= 1"):
            kernels.set_num_threads(bad)
    kernels.set_num_threads(1)
    assert kernels.get_num_threads() == 1


def import_backend(env_value):
    env = {**os.environ, "LORA_NP_BACKEND": env_value, "PYTHONWARNINGS": "always"}
    code = "import lora_np.kernels as k; print(k.backend())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip(), done.stderr


def test_environment_variable_picks_the_backend():
    default = "c" if HAS_C else "numpy"
    assert import_backend("numpy") == ("numpy", "")
    backend, warned = import_backend("bogus")
    assert backend == default and "LORA_NP_BACKEND=bogus" in warned and "unknown lora_np backend" in warned
    backend, warned = import_backend("c")
    assert backend == default and (HAS_C == (warned == ""))
    if "cuda" not in kernels.available_backends():
        backend, warned = import_backend("cuda")
        assert backend == default and "'cuda' is unavailable" in warned


# ---- the C driver under AddressSanitizer -----------------------------------------------------------


@needs_c
def test_c_kernels_under_address_sanitizer(tmp_path):
    run_c_driver_under_sanitizers(tmp_path, "test_lora_kernels", ["lora_kernels.c"], "all C kernel checks passed")


def _environment_after_import(argv0, env_extra):
    """OMP_WAIT_POLICY and OPENBLAS_THREAD_TIMEOUT as a process sees them after `import lora_np`."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")}
    env.update(env_extra)
    code = (f"import sys; sys.argv[0] = {argv0!r}; import lora_np, lora_np.kernels, os; "
            "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('OPENBLAS_THREAD_TIMEOUT'))")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_thread_settings_stay_out_of_a_library_import():
    """The OpenMP wait policy is set only while the C module loads (then the environment is as
    before); OpenBLAS's thread timeout only for the `lora-np` command, never over the user's value."""
    assert _environment_after_import("-c", {}) == ["None", "None"]
    assert _environment_after_import("/usr/local/bin/lora-np", {}) == ["None", "4"]
    assert _environment_after_import("/usr/local/bin/lora-np", {"OPENBLAS_THREAD_TIMEOUT": "20",
                                                                 "OMP_WAIT_POLICY": "active"}) == ["active", "20"]


# ---- a missing compiled module, or a function missing from it ----------------------------------------


def _every_op(dtype=np.float64):
    """One call of each kernel on small arrays: {op: its results as arrays}."""
    rng = np.random.default_rng(3)
    a = make_case(3, 6, 5, 4, 3, dtype)
    x = rng.standard_normal((2, 3, 4, 8)).astype(dtype)
    cos, sin = (rng.standard_normal((4, 8)).astype(dtype) for _ in range(2))
    k, v = (rng.standard_normal((2, 1, 5, 8)).astype(dtype) for _ in range(2))
    p = rng.standard_normal((6, 7)).astype(dtype)
    out, lse = kernels.attention_forward(x, k, v, 0.5, True)
    rms, rstd = kernels.rms_norm_forward(x, None, 1e-6)
    return {"lora_forward": list(run_forward(a).values()), "lora_backward": list(run_backward(a, ("dx",)).values()),
            "lora_merge": [run_merge(a, False)], "silu_mul_forward": [kernels.silu_mul_forward(p, p + 1)],
            "softmax_rows": [kernels.softmax_rows(p), p], "rms_norm_forward": [rms, rstd],
            "rms_norm_backward": list(kernels.rms_norm_backward(x, x, None, rstd)[:1]),
            "rotary": [kernels.rotary(x, cos, sin)], "attention_forward": [out, lse],
            "attention_backward": list(kernels.attention_backward(x, x, k, v, out, lse, 0.5, True))}


def test_without_the_compiled_module_every_op_runs_numpy(monkeypatch):
    """No lora_np._lora_np_c (installed without a compiler): "c" is unavailable, and every op, those
    once only called in C included, runs its NumPy reference instead of failing on a missing library."""
    kernels.set_backend("numpy")
    want = _every_op()
    monkeypatch.setattr(sys.modules["lora_np.kernels.backend"], "lib", None)
    monkeypatch.setattr(sys.modules["lora_np.kernels.backend"], "C_MISSING", "no compiler at install time")
    assert "c" not in kernels.available_backends()
    with pytest.raises(RuntimeError, match="'c' is unavailable: no compiler at install time"):
        kernels.set_backend("c")
    got = _every_op()
    for op in want:
        for w, g in zip(want[op], got[op]):
            assert np.array_equal(w, g, equal_nan=True), op


@needs_c
@pytest.mark.parametrize("op", ["lora_forward", "lora_backward", "lora_merge", "silu_mul_forward", "softmax_rows",
                                "rms_norm_forward", "rotary", "attention_forward"])
def test_a_function_missing_from_the_build_is_named(op, monkeypatch):
    """A compiled module older than the Python code (a function missing from it) on the C backend: a
    RuntimeError naming the function and what to do, not an AttributeError from deep inside."""
    kernels.set_backend("c")
    real = sys.modules["lora_np.kernels.backend"].lib

    class OlderBuild:
        def __getattr__(self, name):
            if name.startswith(op + "_"):
                raise AttributeError(name)
            return getattr(real, name)

    monkeypatch.setattr(sys.modules["lora_np.kernels.backend"], "lib", OlderBuild())
    with pytest.raises(RuntimeError, match=rf"{op}: .*has no function {op}_f64.*rebuild lora_np"):
        _every_op()
