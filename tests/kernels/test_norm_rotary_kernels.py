"""RMSNorm and rotary embedding in the C core (kernels.rms_norm_forward / rms_norm_backward / rotary,
csrc/step_kernels_simd.h) against their NumPy references (lora_np.kernels.norm_rotary) (kernels.set_backend("numpy")),
the reference.

functional.rms_norm (with and without weight, the weight trainable or frozen, the input requiring
grad or not) over rows 1..70 in 1..3 leading axes, n 1..300 (the SIMD widths and their tails), eps
0, tiny, the dtype's epsilon (the default) and large, inputs of magnitude 1e-12..1e12 (float32) and
1e-140..1e140 (float64) with elements spread over up to 4 decades either way, dense or laid out
backwards (the transpose of an array of the reversed shape; the C path copies it). functional.
rotary_embedding on x (B, H, T, D), D even 2..130, dense, as the transpose of a (B, T, H, D) array
(how the model passes q and k), with padded rows or with reversed heads and positions, and a
gradient in either of the first two layouts; cos/sin from functional.rope_cos_sin. cos/sin of
another broadcastable shape, not C-contiguous, or x of another rank, fall back to the NumPy code and
give the same values. A spy on the kernels' wrappers makes sure each comparison runs the C path where
it should (and not where it should not).

Directly on the kernels: rms_norm_backward's need_x / need_weight (each output bit for bit that of
the full call, None when not asked), gweight the sum over rows, the same for any leading axes;
rotary with random cos/sin tables whose halves differ (rope tables repeat one half, which would hide
a swapped index) against the NumPy functions, also over the first rd < D dims only (partial rotary: the
rest passed through bit for bit), its transpose the adjoint (<R x, y> = <x, Rᵀ y>) and
the inverse for a rope table, its output laid out as x. 1 and 2 threads give identical bits above
the parallel threshold (1e5 elements). Malformed calls raise TypeError / ValueError naming the
argument (the checks at the end of the file were strict xfails until the wrappers were fixed).

Tolerances are relative to the magnitude of the terms, RTOL = 1e-12 for float64 and 1e-5 for
float32, computed in float64 from the inputs with the exact r = 1/sqrt(mean(x²) + eps) (eps rounded
to the dtype, as both backends do). RMSNorm: y = x·r·w against RTOL·|x·r·w|; gx = r·(g·w − x̂·c),
c = mean(g·w·x̂), x̂ = x·r, against RTOL·r·(|g·w| + |x̂|·mean|g·w·x̂|) (the two terms may cancel,
so an element-wise relative error would mean nothing); gweight = Σ_rows g·x̂ against RTOL·Σ|g·x̂|.
The sums of squares and of g·w·x̂ are in the element type in both backends, in the SIMD lanes in C
and NumPy's own order: at most ~n/8 + 8 float32 roundings of a sum of positive terms (rstd) or of
|terms| (c), ~3e-6 for n = 300, under 1e-5 even carried through r³ in gx (measured over 1500 random
cases: at most 8% of the tolerance in float32, 0.2% in float64). Rotary: each output is two products,
y₁ = x₁c₁ − x₂s₁, y₂ = x₂c₂ + x₁s₂ (transpose: x₁c₁ + x₂s₂, x₂c₂ − x₁s₁), against
RTOL·(|x₁c₁| + |x₂s₁|) and so on (C may fuse a multiply-add). The magnitudes stay where no square
overflows or is denormal (a denormal square would be a rounding error far above RTOL).
"""
import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import IN_CI, assert_close
from lora_np import Tensor, kernels
from lora_np.kernels import norm_rotary as nr
from lora_np.kernels.backend import lib
from lora_np import functional as F

HAS_C = "c" in kernels.available_backends()
needs_c = pytest.mark.skipif(not HAS_C and not IN_CI, reason="C core not built")
DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
MAGNITUDES = {np.float32: [1e-12, 1e-3, 1.0, 1e3, 1e12], np.float64: [1e-140, 1e-3, 1.0, 1e3, 1e140]}
EPS = [None, 0.0, 1e-30, 1e-12, 1e-6, 0.25]          # None: the dtype's epsilon (functional's default)
LAYOUTS = ["dense", "bthd", "padded", "reversed"]
SPIED = {"rms_norm_forward": "_rms_norm_forward_c", "rms_norm_backward": "_rms_norm_backward_c", "rotary": "_rotary_c"}


# ---- helpers ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def spy():
    """Counts the calls of the C core's rms_norm_forward / rms_norm_backward / rotary made inside (the
    kernels' dispatch looks them up on lora_np.kernels.norm_rotary at each call); {name: count}."""
    calls = {name: 0 for name in SPIED}
    originals = {name: getattr(nr, c_name) for name, c_name in SPIED.items()}

    def counting(name):
        def call(*args, **kwargs):
            calls[name] += 1
            return originals[name](*args, **kwargs)
        return call

    try:
        for name, c_name in SPIED.items():
            setattr(nr, c_name, counting(name))
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(nr, SPIED[name], fn)


def check(got, want, tol, name):
    """Same shape and dtype, everything finite, |got - want| <= tol element by element."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    assert np.isfinite(want).all(), f"{name}: the reference is not finite"
    assert np.isfinite(got).all(), f"{name}: {int((~np.isfinite(got)).sum())} non-finite values"
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    tol = np.broadcast_to(np.asarray(tol, np.float64), want.shape)
    bad = diff > tol
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, diff / np.maximum(tol, 1e-300), 0)), want.shape)
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} elements out of tolerance; worst at {i}: "
                             f"got {got[i]!r}, want {want[i]!r}, tol {tol[i]:.3e}")


def laid_out(values, layout):
    """values (an array) copied into an array of the same shape laid out in memory as `layout`:
    dense; reversed_axes: the transpose of an array of the reversed shape (every axis backwards in
    memory); for (B, H, T, D): bthd, the transpose of a dense (B, T, H, D) array; padded, a slice of a
    wider last axis (rows of D + 3, NaN where not read); reversed, heads and positions with negative
    strides."""
    shape, dtype = values.shape, values.dtype
    if layout == "dense":
        a = np.empty(shape, dtype)
    elif layout == "reversed_axes":
        a = np.empty(shape[::-1], dtype).T
    elif layout == "bthd":
        B, H, T, D = shape
        a = np.empty((B, T, H, D), dtype).transpose(0, 2, 1, 3)
    elif layout == "padded":
        a = np.full(shape[:-1] + (shape[-1] + 3,), np.nan, dtype)[..., 1:shape[-1] + 1]
    else:
        assert layout == "reversed"
        a = np.empty(shape, dtype)[:, ::-1, ::-1]
    a[...] = values
    return a


def swap_halves(a):
    h = a.shape[-1] // 2
    return np.concatenate([a[..., h:], a[..., :h]], axis=-1)


def rotary_tolerances(x, g, cos, sin, dtype):
    """RTOL times the two products behind each element of the forward (of x) and of its transpose (of g)."""
    X, G, C, S = (np.abs(np.asarray(a, np.float64)) for a in (x, g, cos, sin))
    return RTOL[dtype] * (X * C + swap_halves(X) * S), RTOL[dtype] * (G * C + swap_halves(G) * swap_halves(S))


def rms_norm_tolerances(x, w, g, eps, dtype):
    """Allowed differences of (y, gx, gweight), from the exact rstd (module docstring)."""
    X, G = x.astype(np.float64), g.astype(np.float64)
    W = 1.0 if w is None else w.astype(np.float64)
    n = X.shape[-1]
    r = 1 / np.sqrt(np.einsum("...i,...i->...", X, X)[..., None] / n + float(dtype(eps)))
    xh = X * r
    gh = G * W
    rtol = RTOL[dtype]
    return (rtol * np.abs(xh * W), rtol * r * (np.abs(gh) + np.abs(xh) * np.abs(gh * xh).mean(-1, keepdims=True)),
            rtol * np.abs(G * xh).reshape(-1, n).sum(0))


def run_rms_norm(backend, x, w, eps, need_x, need_w, g):
    """functional.rms_norm on one backend, then backward(g) when something needs a gradient:
    (out, x.grad, weight.grad, calls of the kernels)."""
    kernels.set_backend(backend)
    tx = Tensor(x, requires_grad=need_x)
    tw = None if w is None else Tensor(w, requires_grad=need_w)
    with spy() as calls:
        out = F.rms_norm(tx, (x.shape[-1],), tw, eps)
        if need_x or (w is not None and need_w):
            out.backward(g)
    return out.data.copy(), tx.grad, None if tw is None else tw.grad, calls


def run_rotary(backend, x, cos, sin, g):
    """functional.rotary_embedding on one backend with backward(g): (out, x.grad, calls of the kernels)."""
    kernels.set_backend(backend)
    tx = Tensor(x, requires_grad=True)
    with spy() as calls:
        out = F.rotary_embedding(tx, cos, sin)
        out.backward(g)
    return out.data, tx.grad, calls


# ---- data ---------------------------------------------------------------------------------------------

awkward_n = st.one_of(st.integers(1, 300), st.sampled_from([1, 2, 3, 7, 8, 9, 15, 17, 31, 33, 63, 65, 257, 300]))
even_D = st.one_of(st.integers(1, 65).map(lambda h: 2 * h), st.sampled_from([2, 4, 6, 8, 10, 16, 18, 64, 66, 130]))


@st.composite
def leading_shapes(draw):
    """1 to 3 leading axes whose product (the rows) is 1..70."""
    rows = draw(st.integers(1, 70), label="rows")
    dims, rest = [], rows
    for _ in range(draw(st.integers(1, 3), label="leading axes") - 1):
        d = draw(st.sampled_from([d for d in range(1, rest + 1) if rest % d == 0]))
        dims.append(d)
        rest //= d
    return tuple(dims) + (rest,)


def spread_values(rng, shape, magnitude, spread, dtype):
    """Normal values times magnitude, each times 10^u with u uniform in [-spread, spread]."""
    v = rng.standard_normal(shape) * magnitude * 10.0 ** rng.uniform(-spread, spread, shape)
    return v.astype(dtype)


# ---- functional.rms_norm: the C path equals the NumPy code -------------------------------------------------


@needs_c
@settings(max_examples=200, deadline=None)
@given(lead=leading_shapes(), n=awkward_n, dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1),
       eps=st.sampled_from(EPS), magnitude_index=st.integers(0, 4), spread=st.sampled_from([0, 1, 4]),
       weight=st.sampled_from(["none", "frozen", "trainable"]), need_x=st.booleans(),
       layout=st.sampled_from(["dense", "reversed_axes"]), g_layout=st.sampled_from(["dense", "reversed_axes"]))
def test_rms_norm_is_the_same_under_c_and_numpy(lead, n, dtype, seed, eps, magnitude_index, spread, weight, need_x,
                                                layout, g_layout):
    rng = np.random.default_rng(seed)
    shape = lead + (n,)
    magnitude = MAGNITUDES[dtype][magnitude_index]
    x = laid_out(spread_values(rng, shape, magnitude, spread, dtype), layout)
    w = None if weight == "none" else (1 + 0.5 * rng.standard_normal(n)).astype(dtype)
    g = laid_out(rng.standard_normal(shape).astype(dtype), g_layout)
    need_w = weight == "trainable"
    name = (f"rms_norm {dtype.__name__} {shape} {layout} eps={eps} magnitude={magnitude:g} spread={spread} "
            f"weight={weight} need_x={need_x}")

    y_c, gx_c, gw_c, calls_c = run_rms_norm("c", x, w, eps, need_x, need_w, g)
    y_n, gx_n, gw_n, calls_n = run_rms_norm("numpy", x, w, eps, need_x, need_w, g)
    backward = need_x or need_w
    assert calls_c == {"rms_norm_forward": 1, "rms_norm_backward": int(backward), "rotary": 0}, name
    assert calls_n == {"rms_norm_forward": 0, "rms_norm_backward": 0, "rotary": 0}, name

    tol_y, tol_gx, tol_gw = rms_norm_tolerances(x, w, g, np.finfo(dtype).eps if eps is None else eps, dtype)
    check(y_c, y_n, tol_y, name + " forward")
    if need_x:
        check(gx_c, gx_n, tol_gx, name + " gx")
    else:
        assert gx_c is None and gx_n is None, name
    if need_w:
        check(gw_c, gw_n, tol_gw, name + " gweight")
    elif w is not None:
        assert gw_c is None and gw_n is None, name


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
def test_rms_norm_is_the_formula(backend):
    """Both backends against the definition written out in float64, once, small, with a row of zeros
    (rstd = 1/sqrt(eps): output 0, gradient rstd·g·w)."""
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal((2, 3, 11)), rng.standard_normal((2, 3, 11))
    x[1, 2] = 0
    w = rng.standard_normal(11)
    eps = 1e-3
    r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    xh = x * r
    y, gx, gw, _ = run_rms_norm(backend, x, w, eps, True, True, g)
    assert_close(y, xh * w, rtol=1e-12, name="y")
    assert_close(gx, r * (g * w - xh * (g * w * xh).mean(-1, keepdims=True)), rtol=1e-12, atol=1e-14, name="gx")
    assert_close(gw, (g * xh).sum((0, 1)), rtol=1e-12, atol=1e-14, name="gweight")
    assert np.all(y[1, 2] == 0)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 5, 300])
def test_rms_norm_of_a_vector(dtype, n):
    """A 1-D input: one row, its rstd a 0-d array in C."""
    x, w, g = _norm_inputs(dtype, (1, n), seed=n)
    x, g = x[0], g[0]
    results = {b: run_rms_norm(b, x, w, 1e-6, True, True, g) for b in ("numpy", "c")}
    assert results["c"][3]["rms_norm_forward"] == 1
    tol = rms_norm_tolerances(x, w, g, 1e-6, dtype)
    for name, c, ref, t in zip(["y", "gx", "gweight"], results["c"][:3], results["numpy"][:3], tol):
        check(c, ref, t, f"1-D rms_norm {dtype.__name__} n={n} {name}")


@needs_c
@pytest.mark.parametrize("shape", [(0, 5), (2, 0, 7), (3, 0)])
def test_rms_norm_of_empty_arrays(shape):
    """No rows: C and NumPy both give empty results and a zero weight gradient; n = 0: the NumPy code."""
    x = np.ones(shape)
    w = np.ones(shape[-1])
    with np.errstate(all="ignore"):  # n = 0: NumPy's mean of nothing
        results = {b: run_rms_norm(b, x, w, 1e-6, True, True, np.ones(shape)) for b in ("numpy", "c")}
    for name, c, ref in zip(["y", "gx", "gweight"], results["c"][:3], results["numpy"][:3]):
        assert c.shape == ref.shape and np.array_equal(c, ref), name
    assert results["c"][3]["rms_norm_forward"] == (1 if shape[-1] else 0)


# ---- functional.rotary_embedding: the C path equals the NumPy code -----------------------------------------


@needs_c
@settings(max_examples=200, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 20), D=even_D, dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), g_layout=st.sampled_from(["dense", "bthd"]), start=st.integers(0, 5000),
       magnitude=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 2**32 - 1))
def test_rotary_embedding_is_the_same_under_c_and_numpy(B, H, T, D, dtype, layout, g_layout, start, magnitude, seed):
    rng = np.random.default_rng(seed)
    shape = (B, H, T, D)
    cos, sin = F.rope_cos_sin(np.arange(start, start + T), D, dtype=dtype)
    x = laid_out((magnitude * rng.standard_normal(shape)).astype(dtype), layout)
    g = laid_out(rng.standard_normal(shape).astype(dtype), g_layout)
    name = f"rotary {dtype.__name__} {shape} x {layout} g {g_layout} positions {start}.."

    y_c, gx_c, calls_c = run_rotary("c", x, cos, sin, g)
    y_n, gx_n, calls_n = run_rotary("numpy", x, cos, sin, g)
    assert calls_c["rotary"] == 2 and calls_n["rotary"] == 0, name
    tol_y, tol_gx = rotary_tolerances(x, g, cos, sin, dtype)
    check(y_c, y_n, tol_y, name + " forward")
    check(gx_c, gx_n, tol_gx, name + " gradient")
    assert y_c.strides == y_n.strides, f"{name}: C output strides {y_c.strides}, NumPy {y_n.strides}"


def _fallbacks():
    """(name, x shape, cos/sin shape or maker, layout of x, rotary calls expected in C)."""
    return [
        ("cos (1, 1, T, D)", (2, 3, 5, 8), (1, 1, 5, 8), "dense", 0),
        ("cos (1, H, T, D)", (2, 3, 5, 8), (1, 3, 5, 8), "bthd", 0),
        ("cos (B, 1, T, D)", (2, 3, 5, 6), (2, 1, 5, 6), "dense", 0),
        ("x (H, T, D)", (3, 5, 8), (5, 8), "dense", 0),
        ("x (B, N, H, T, D)", (2, 2, 3, 5, 8), (5, 8), "dense", 0),
        ("Fortran-order cos", (2, 3, 5, 8), "fortran", "dense", 0),
        ("x strided along D", (2, 3, 5, 8), (5, 8), "every other", 1),  # backward: g is dense, so C
    ]


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("what, shape, cos_shape, layout, c_calls", _fallbacks(), ids=[f[0] for f in _fallbacks()])
def test_rotary_embedding_falls_back_to_numpy(dtype, what, shape, cos_shape, layout, c_calls):
    """cos/sin that are not dense (T, D), or x that is not 4-D: the NumPy code, under the C backend too, and
    the right values (against the formula in float64)."""
    rng = np.random.default_rng(7)
    T, D = shape[-2:]
    cos, sin = F.rope_cos_sin(np.arange(T), D, dtype=dtype)
    if cos_shape == "fortran":
        cos, sin = np.asfortranarray(cos), np.asfortranarray(sin)
    else:  # another broadcastable shape: the table times a random factor per leading index, so that it matters
        factor = 1 + rng.random(cos_shape[:-2] + (1, 1))
        cos, sin = (cos * factor).astype(dtype), (sin * factor).astype(dtype)
    values = rng.standard_normal(shape).astype(dtype)
    if layout == "every other":
        x = np.full(shape[:-1] + (2 * D,), np.nan, dtype)[..., ::2]
        x[...] = values
    else:
        x = laid_out(values, layout)
    g = rng.standard_normal(shape).astype(dtype)
    y_c, gx_c, calls = run_rotary("c", x, cos, sin, g)
    y_n, gx_n, _ = run_rotary("numpy", x, cos, sin, g)
    assert calls["rotary"] == c_calls, f"{what}: {calls['rotary']} calls of the C rotary"
    X, G, C, S = (np.asarray(a, np.float64) for a in (values, g, cos, sin))
    h = D // 2
    want_y = X * C + np.concatenate([-X[..., h:], X[..., :h]], -1) * S
    want_gx = G * C + swap_halves(np.concatenate([-G[..., :h], G[..., h:]], -1) * S)  # Rᵀ: s₂ on g₂, -s₁ on g₁
    tol_y, tol_gx = rotary_tolerances(values, g, np.broadcast_to(cos, shape), np.broadcast_to(sin, shape), dtype)
    for got in (y_c, y_n):
        check(got, want_y.astype(dtype), 2 * tol_y, f"{what} forward")
    for got in (gx_c, gx_n):
        check(got, want_gx.astype(dtype), 2 * tol_gx, f"{what} gradient")


@needs_c
@pytest.mark.parametrize("shape", [(0, 2, 3, 4), (1, 0, 3, 4), (2, 2, 0, 4), (1, 2, 3, 0)])
def test_rotary_embedding_of_empty_arrays(shape):
    cos, sin = F.rope_cos_sin(np.arange(shape[2]), shape[3], dtype=np.float64)
    g = np.ones(shape)
    for backend in ("numpy", "c"):
        y, gx, _ = run_rotary(backend, np.ones(shape), cos, sin, g)
        assert y.shape == gx.shape == shape


# ---- the kernels directly -------------------------------------------------------------------------------


def _norm_inputs(dtype, shape=(37, 33), seed=0):
    rng = np.random.default_rng(seed)
    x, g = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    w = (1 + rng.standard_normal(shape[-1])).astype(dtype)
    return x, w, g


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_backward_need_x_need_weight(dtype, weighted):
    """Each combination of need_x / need_weight: None where not asked, else bit for bit the full call's."""
    x, w, g = _norm_inputs(dtype)
    w = w if weighted else None
    y, rstd = kernels.rms_norm_forward(x, w, 1e-5)
    assert y.shape == x.shape and rstd.shape == x.shape[:-1] and rstd.dtype == dtype
    gx, gw = kernels.rms_norm_backward(g, x, w, rstd, True, True)
    assert gx.shape == x.shape and gw.shape == (x.shape[-1],) and gx.dtype == gw.dtype == dtype
    for need_x in (True, False):
        for need_w in (True, False):
            a, b = kernels.rms_norm_backward(g, x, w, rstd, need_x, need_w)
            assert (a is None) != need_x and (b is None) != need_w, (need_x, need_w)
            if need_x:
                assert np.array_equal(a, gx), f"gx with need_weight={need_w} differs from the full call's"
            if need_w:
                assert np.array_equal(b, gw), f"gweight with need_x={need_x} differs from the full call's"
    a, b = kernels.rms_norm_backward(g, x, w, rstd)  # the defaults: need_x=True, need_weight=False
    assert np.array_equal(a, gx) and b is None


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_gweight_is_the_sum_over_rows(dtype):
    """gweight = Σ_rows g·x·rstd: against float64, against the sum of one-row calls, and the same bits
    whatever the leading axes ((6, 7) or 42 rows)."""
    x, w, g = _norm_inputs(dtype, (6, 7, 19), seed=3)
    y, rstd = kernels.rms_norm_forward(x, w, 1e-6)
    _, gw = kernels.rms_norm_backward(g, x, w, rstd, False, True)
    terms = g.astype(np.float64) * x.astype(np.float64) * rstd.astype(np.float64)[..., None]
    check(gw, terms.sum((0, 1)).astype(dtype), RTOL[dtype] * np.abs(terms).sum((0, 1)), "gweight vs float64")
    rows = [kernels.rms_norm_backward(g[i, j][None], x[i, j][None], w, rstd[i, j][None], False, True)[1]
            for i in range(6) for j in range(7)]
    check(gw, np.sum(rows, 0, dtype=np.float64).astype(dtype), RTOL[dtype] * np.abs(terms).sum((0, 1)),
          "gweight vs the sum of one-row calls")
    _, gw2 = kernels.rms_norm_backward(g.reshape(42, 19), x.reshape(42, 19), w, rstd.reshape(42), False, True)
    assert np.array_equal(gw, gw2), "gweight depends on the leading axes"
    y2, rstd2 = kernels.rms_norm_forward(x.reshape(42, 19), w, 1e-6)
    assert np.array_equal(y2.reshape(y.shape), y) and np.array_equal(rstd2.reshape(rstd.shape), rstd)


@needs_c
@settings(max_examples=100, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 9), D=even_D, dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**32 - 1))
def test_rotary_kernel_with_arbitrary_tables(B, H, T, D, dtype, layout, seed):
    """Random cos/sin (the halves differ, unlike a rope table): kernels.rotary and its transpose equal
    functional's NumPy _rotary / _rotary_transpose."""
    rng = np.random.default_rng(seed)
    shape = (B, H, T, D)
    cos, sin = (rng.standard_normal((T, D)).astype(dtype) for _ in range(2))
    values = rng.standard_normal(shape).astype(dtype)
    x = laid_out(values, layout)
    tol_y, tol_t = rotary_tolerances(values, values, cos, sin, dtype)
    name = f"rotary kernel {dtype.__name__} {shape} {layout}"
    kernels.set_backend("c")
    check(kernels.rotary(x, cos, sin), nr._rotary_numpy(values, cos, sin), tol_y, name)
    check(kernels.rotary(x, cos, sin, transpose=True), nr._rotary_transpose_numpy(values, cos, sin), tol_t,
          name + " transpose")


@needs_c
@settings(max_examples=100, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 9), D=st.integers(1, 70), data=st.data(),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**32 - 1))
def test_partial_rotary_kernel(B, H, T, D, data, dtype, layout, seed):
    """Tables of rd < D dims (partial rotary, Phi-3 / GPT-NeoX): the C kernel and its transpose rotate the
    first rd dims as the NumPy functions do, pass the other D - rd through bit for bit, and equal the full
    rotary of those rd dims alone."""
    rd = 2 * data.draw(st.integers(0, (D - 1) // 2), label="rd / 2")
    rng = np.random.default_rng(seed)
    shape = (B, H, T, D)
    cos, sin = (rng.standard_normal((T, rd)).astype(dtype) for _ in range(2))
    values = rng.standard_normal(shape).astype(dtype)
    x = laid_out(values, layout)
    tol_y, tol_t = rotary_tolerances(values[..., :rd], values[..., :rd], cos, sin, dtype)
    name = f"partial rotary kernel {dtype.__name__} {shape} rd={rd} {layout}"
    kernels.set_backend("c")
    with spy() as calls:
        y, t = kernels.rotary(x, cos, sin), kernels.rotary(x, cos, sin, transpose=True)
    assert calls["rotary"] == 2, f"{name}: the C kernel did not run"
    for got, ref, tol, what in ((y, nr._rotary_numpy, tol_y, ""), (t, nr._rotary_transpose_numpy, tol_t, " transpose")):
        want = ref(values, cos, sin)
        assert np.array_equal(got[..., rd:], values[..., rd:]) and np.array_equal(want[..., rd:], values[..., rd:]), \
            f"{name}{what}: the dims after rd changed"
        check(got[..., :rd], want[..., :rd], tol, name + what)
        check(got[..., :rd], ref(np.ascontiguousarray(values[..., :rd]), cos, sin), tol, name + what + " vs rd alone")


@needs_c
@pytest.mark.parametrize("layout", LAYOUTS)
def test_rotary_transpose_is_the_adjoint(layout):
    """<R x, y> = <x, Rᵀ y> for random tables (float64, 1e-12 of Σ|terms|); for a rope table (cos² + sin² = 1
    on each pair) Rᵀ R x = x."""
    rng = np.random.default_rng(5)
    shape = (2, 3, 7, 18)
    cos, sin = rng.standard_normal((7, 18)), rng.standard_normal((7, 18))
    xv, yv = rng.standard_normal(shape), rng.standard_normal(shape)
    x, y = laid_out(xv, layout), laid_out(yv, layout)
    Rx, Rty = kernels.rotary(x, cos, sin), kernels.rotary(y, cos, sin, transpose=True)
    lhs, rhs = np.sum(Rx * yv), np.sum(xv * Rty)
    scale = np.sum((np.abs(xv) * np.abs(cos) + np.abs(swap_halves(xv)) * np.abs(sin)) * np.abs(yv))
    assert abs(lhs - rhs) <= 1e-12 * scale, f"<R x, y> = {lhs!r}, <x, R^T y> = {rhs!r}"
    # Against the 2x2 blocks written out: pair (j, j + h) at position t is [[c1, -s1], [s2, c2]].
    h = 9
    M = np.zeros((7, 18, 18))
    for j in range(h):
        M[:, j, j], M[:, j, j + h] = cos[:, j], -sin[:, j]
        M[:, j + h, j], M[:, j + h, j + h] = sin[:, j + h], cos[:, j + h]
    assert_close(Rx, np.einsum("tij,bhtj->bhti", M, xv), rtol=1e-12, atol=1e-12, name="R as a matrix")
    assert_close(Rty, np.einsum("tji,bhtj->bhti", M, yv), rtol=1e-12, atol=1e-12, name="R^T as a matrix")
    cos, sin = F.rope_cos_sin(np.arange(100, 107), 18, dtype=np.float64)
    back = kernels.rotary(kernels.rotary(x, cos, sin), cos, sin, transpose=True)
    assert_close(back, xv, rtol=0, atol=1e-14 * np.abs(xv).max(), name="R^T R x")


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_output_is_laid_out_as_x(dtype):
    """The output has x's memory layout (np.empty_like's): a (B, T, H, D) transpose gives a (B, T, H, D)
    transpose, and the pads of a padded x are not part of it."""
    rng = np.random.default_rng(2)
    shape = (2, 3, 5, 6)
    cos, sin = F.rope_cos_sin(np.arange(5), 6, dtype=dtype)
    values = rng.standard_normal(shape).astype(dtype)
    for layout in LAYOUTS:
        x = laid_out(values, layout)
        for transpose in (False, True):
            out = kernels.rotary(x, cos, sin, transpose)
            assert out.strides == np.empty_like(x).strides, f"{layout}: strides {out.strides}"
            assert not np.shares_memory(out, x)
        if layout == "bthd":
            assert out.transpose(0, 2, 1, 3).flags.c_contiguous
        else:
            assert out.flags.c_contiguous


# ---- threads ---------------------------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_and_two_threads_give_identical_bits(dtype):
    """rms_norm over 401 x 257 = 103057 elements and rotary over (2, 4, 100, 130) = 104000, both above
    the parallel threshold of 1e5; rotary on a (B, T, H, D) transpose."""
    x, w, g = _norm_inputs(dtype, (401, 257), seed=9)
    rng = np.random.default_rng(9)
    cos, sin = F.rope_cos_sin(np.arange(100), 130, dtype=dtype)
    q = laid_out(rng.standard_normal((2, 4, 100, 130)).astype(dtype), "bthd")
    results = []
    for threads in (1, 2):
        kernels.set_num_threads(threads)
        y, rstd = kernels.rms_norm_forward(x, w, 1e-6)
        gx, gw = kernels.rms_norm_backward(g, x, w, rstd, True, True)
        y0, rstd0 = kernels.rms_norm_forward(x, None, 1e-6)
        gx0, _ = kernels.rms_norm_backward(g, x, None, rstd0, True, False)
        results.append({"y": y, "rstd": rstd, "gx": gx, "gweight": gw, "y no weight": y0, "gx no weight": gx0,
                        "rotary": kernels.rotary(q, cos, sin), "rotary transpose": kernels.rotary(q, cos, sin, True)})
    if lib.lora_has_openmp():
        assert kernels.get_num_threads() == 2
    for k in results[0]:
        assert np.array_equal(results[0][k], results[1][k]), f"{k} differs between 1 and 2 threads"


# ---- wrong calls are refused -------------------------------------------------------------------------------


def _x(dtype=np.float32, shape=(3, 4)):
    return np.arange(np.prod(shape), dtype=dtype).reshape(shape) / 7 + 1


def _noncontiguous(shape, dtype=np.float32):
    a = np.ones(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]
    return a


def _backward(g=None, x=None, w=None, rstd=None, **kw):
    x = _x() if x is None else x
    return nr._rms_norm_backward_c(_x() if g is None else g, x, w, np.ones(x.shape[:-1], x.dtype) if rstd is None
                                     else rstd, **kw)


def _rotary(x=None, cos=None, sin=None):
    x = _x(shape=(1, 2, 3, 4)) if x is None else x
    T, D = x.shape[-2:]
    return nr._rotary_c(x, _x(x.dtype, (T, D)) if cos is None else cos, _x(x.dtype, (T, D)) if sin is None else sin)


REFUSALS = [
    # (description, call, error, words in the message)
    ("int x", lambda: nr._rms_norm_forward_c(np.ones((3, 4), np.int64), None, 1e-6), TypeError, ["x", "int64"]),
    ("float16 x", lambda: nr._rms_norm_forward_c(_x(np.float16), None, 1e-6), TypeError, ["x", "float16"]),
    ("mixed weight", lambda: nr._rms_norm_forward_c(_x(), np.ones(4), 1e-6), TypeError, ["weight", "float64"]),
    ("weight shape", lambda: nr._rms_norm_forward_c(_x(), np.ones(5, np.float32), 1e-6), ValueError,
     ["weight shape (5,)", "4"]),
    ("2-D weight", lambda: nr._rms_norm_forward_c(_x(), np.ones((1, 4), np.float32), 1e-6), ValueError,
     ["weight shape (1, 4)"]),
    ("strided x", lambda: nr._rms_norm_forward_c(_noncontiguous((3, 4)), None, 1e-6), ValueError,
     ["x", "C-contiguous"]),
    ("strided weight", lambda: nr._rms_norm_forward_c(_x(), _noncontiguous((4,)), 1e-6), ValueError,
     ["weight", "C-contiguous"]),
    ("backward mixed g", lambda: _backward(g=_x(np.float64)), TypeError, ["x", "float32", "all alike"]),
    ("backward int g", lambda: _backward(g=np.ones((3, 4), np.int32)), TypeError, ["g", "int32"]),
    ("backward rstd dtype", lambda: _backward(rstd=np.ones(3)), TypeError, ["rstd", "float64"]),
    ("backward weight dtype", lambda: _backward(w=np.ones(4)), TypeError, ["weight", "float64"]),
    ("backward g shape", lambda: _backward(g=_x(shape=(3, 5))), ValueError, ["shapes differ", "g (3, 5)", "x (3, 4)"]),
    ("backward strided g", lambda: _backward(g=_noncontiguous((3, 4))), ValueError, ["g", "C-contiguous"]),
    ("backward strided x", lambda: _backward(x=_noncontiguous((3, 4))), ValueError, ["x", "C-contiguous"]),
    ("odd D", lambda: _rotary(_x(shape=(1, 2, 3, 5))), ValueError, ["even", "(1, 2, 3, 5)"]),
    ("D = 1", lambda: _rotary(_x(shape=(1, 2, 3, 1))), ValueError, ["even"]),
    ("cos shape", lambda: _rotary(cos=_x(shape=(4, 4))), ValueError, ["(3, 4)", "(4, 4)"]),
    ("cos (1, 1, T, D)", lambda: _rotary(cos=_x(shape=(1, 1, 3, 4))), ValueError, ["(3, 4)", "(1, 1, 3, 4)"]),
    ("strided cos", lambda: _rotary(cos=_noncontiguous((3, 4))), ValueError, ["cos", "C-contiguous"]),
    ("Fortran cos", lambda: _rotary(cos=np.asfortranarray(_x(shape=(3, 4)))), ValueError, ["cos", "C-contiguous"]),
    ("strided sin", lambda: _rotary(sin=_noncontiguous((3, 4))), ValueError, ["sin", "C-contiguous"]),
    ("mixed cos, sin", lambda: _rotary(sin=_x(np.float64, (3, 4))), TypeError, ["sin", "float64"]),
    ("int cos", lambda: _rotary(cos=np.ones((3, 4), np.int64), sin=np.ones((3, 4), np.int64)), TypeError,
     ["cos", "int64"]),
    ("x strided along D", lambda: _rotary(_noncontiguous((1, 2, 3, 4))), ValueError, ["unit stride"]),
]


@needs_c
@pytest.mark.parametrize("what, call, error, words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_kernels_reject(what, call, error, words):
    kernels.set_backend("c")
    with pytest.raises(error) as e:
        call()
    for w in words:
        assert w in str(e.value), f"{what}: {w!r} not in {str(e.value)!r}"


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
def test_functional_rejects(backend):
    """functional.rms_norm / rotary_embedding refuse, whatever the backend: a weight of another float dtype,
    a normalized shape that is not the last axis, an odd D, cos/sin that do not broadcast to x."""
    kernels.set_backend(backend)
    x = Tensor(_x(np.float32, (2, 3, 4)))
    with pytest.raises(TypeError):
        F.rms_norm(x, (4,), Tensor(np.ones(4)))
    with pytest.raises(ValueError, match="does not end in"):
        F.rms_norm(x, (3,), Tensor(np.ones(3, np.float32)))
    q = Tensor(_x(np.float32, (1, 2, 3, 5)))
    cos, sin = F.rope_cos_sin(np.arange(3), 5)
    with pytest.raises(ValueError, match="even last dim"):
        F.rotary_embedding(q, cos, sin)
    q = Tensor(_x(np.float32, (1, 2, 3, 4)))
    cos, sin = F.rope_cos_sin(np.arange(4), 4)
    with pytest.raises(ValueError, match="broadcast"):  # NumPy's "cannot be broadcast" message
        F.rotary_embedding(q, cos, sin)
    cos, sin = F.rope_cos_sin(np.arange(3), 4)
    with pytest.raises(ValueError, match="broadcastable"):  # broadcasts, but to more than x
        F.rotary_embedding(q, np.stack([cos, cos])[:, None], np.stack([sin, sin])[:, None])


# ---- gaps found by these tests and fixed since: wrong dtypes, shapes and types refused, naming the argument ----
# Each call below stays inside its buffers (the variants that read past an end are in the report, not here).


@needs_c
def test_rotary_refuses_x_of_another_dtype_than_cos():
    x = _x(np.float32, (1, 2, 3, 4))
    cos, sin = F.rope_cos_sin(np.arange(3), 4, dtype=np.float64)
    with pytest.raises(TypeError, match="float64"):
        nr._rotary_c(x, cos, sin)


@needs_c
def test_rotary_refuses_an_int_x():
    cos, sin = F.rope_cos_sin(np.arange(3), 4, dtype=np.float64)
    with pytest.raises(TypeError, match="int64"):
        nr._rotary_c(np.ones((1, 2, 3, 4), np.int64), cos, sin)


@needs_c
def test_rotary_names_the_wrong_sin_shape():
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        _rotary(sin=_x(shape=(4, 4)))


@needs_c
def test_rotary_names_a_3d_x():
    with pytest.raises(ValueError, match=r"\bx\b"):
        nr._rotary_c(_x(shape=(2, 3, 4)), _x(shape=(3, 4)), _x(shape=(3, 4)))


@needs_c
def test_rms_norm_backward_checks_rstd_shape():
    with pytest.raises(ValueError, match="rstd"):
        _backward(rstd=np.ones(8, np.float32))


@needs_c
def test_rms_norm_backward_checks_weight_shape():
    with pytest.raises(ValueError, match="weight"):
        _backward(w=np.ones(7, np.float32))


@needs_c
def test_rms_norm_kernels_take_an_empty_last_axis():
    x = np.ones((3, 0), np.float32)
    try:
        y, rstd = nr._rms_norm_forward_c(x, None, 1e-6)
    except ValueError:
        return  # a refusal naming the problem would do too
    assert y.shape == (3, 0) and rstd.shape == (3,)


@needs_c
@pytest.mark.parametrize("op", ["rms_norm_forward", "rotary"])
def test_kernels_refuse_a_list_x(op):
    with pytest.raises(TypeError, match="x"):
        if op == "rms_norm_forward":
            nr._rms_norm_forward_c(_x().tolist(), None, 1e-6)
        else:
            nr._rotary_c(_x(shape=(1, 2, 3, 4)).tolist(), _x(shape=(3, 4)), _x(shape=(3, 4)))


@pytest.mark.parametrize("backend", [
    "numpy", pytest.param("c", marks=needs_c)])
def test_rms_norm_refuses_a_weight_not_of_normalized_shape(backend):
    kernels.set_backend(backend)
    with pytest.raises(ValueError, match="weight"):
        F.rms_norm(Tensor(np.ones((2, 4))), (4,), Tensor(np.ones((1, 4))))
