"""lora_np.kernels, fused ops of the training step: the C core (csrc/step_kernels.c) vs NumPy.

silu_mul_forward / silu_mul_backward (the SwiGLU gate), softmax_rows (in place, returns the
log-sum-exp) and exp_rows, over awkward sizes (rows 1..70, n 1..300), visible-column limits
count0 / group / period of every kind (count0 <= 0 and >= n included), magnitudes up to 100 (so
that exp overflows and underflows), -inf entries and rows that are all -inf. Also: the float32
vector exp at its edges (+-inf, NaN, -87.3, 88.4), bit-identical results on 1 and 2 threads,
malformed calls refused with the argument named and the output untouched, attention and the
SwiGLU gate of lora_np.functional equal under both backends, and the C driver
csrc/test_step_kernels.c under AddressSanitizer. A visible NaN or +inf score makes the row's lse
and visible columns NaN in both backends.

Tolerances are relative to the magnitude of the terms, RTOL = 1e-12 for float64 and 1e-5 for
float32. float64 C calls libm's exp with NumPy's order of operations, so the two agree to a few
ulp. float32 C uses its own vector exp (a Cephes polynomial: measured within 1.01 ulp of exp over
[-87.33, 88.72], 2 ulp documented) where NumPy uses its own (measured up to 2.3 ulp), and sums a
row in double where NumPy sums pairwise in float32; both round the argument p - max (or p - lse)
to float32 the same way before exp. So the two differ by a few 1e-7 relative, well inside 1e-5.
The magnitudes: softmax_rows' and exp_rows' outputs are each one positive term (times scale),
so the tolerance is RTOL·|expected| element by element; lse = max + log(sum) is checked against
RTOL·(|max| + |log sum|). silu_mul: the sigmoid s may differ by ds = RTOL·s + FLOOR, carried
through each formula (forward s·a·b: RTOL·|s·a·b| + |a·b|·ds; ga = g·b·s·(1 + a·(1 - s)), whose
second factor can cancel: RTOL·|g·b|·s·(1 + |a·(1 - s)|) + |g·b|·(1 + |a|)·ds; gb likewise).
FLOOR = 4·tiny (float32: 4.7e-38) because the float32 vector exp returns 0 below
FLT_MIN = e^-87.34, where NumPy gives a denormal (in a sigmoid that is s = 0 instead of
s < 1e-38). Non-finite results must
match exactly: NaN where NaN, inf of the same sign.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import IN_CI, assert_close, run_c_driver_under_sanitizers
from lora_np import Tensor, kernels
from lora_np import functional as F
from lora_np.kernels.backend import lib

HAS_C = "c" in kernels.available_backends()
needs_c = pytest.mark.skipif(not HAS_C and not IN_CI, reason="C core not built")
DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
FLOOR = {np.float32: 4 * float(np.finfo(np.float32).tiny), np.float64: 4 * float(np.finfo(np.float64).tiny)}
EXP_F32_HI = float(np.nextafter(np.float32(88.7228391), np.float32(0)))  # the largest float32 below ln FLT_MAX


# ---- helpers --------------------------------------------------------------------------------------


def run(backend, fn, *args, **kwargs):
    """fn(*args, **kwargs) on one backend with copies of the arrays: (the copied arrays after the call,
    its result)."""
    kernels.set_backend(backend)
    args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    with np.errstate(all="ignore"):
        result = fn(*args, **kwargs)
    return [a for a in args if isinstance(a, np.ndarray)], result


def check(got, want, tol, name):
    """Non-finite values equal (NaN where NaN, inf of the same sign); finite ones within tol (an array)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    got, want = got.astype(np.float64), want.astype(np.float64)
    odd = np.isnan(got) != np.isnan(want)
    odd |= (np.isinf(got) | np.isinf(want)) & ~np.isnan(got) & ~np.isnan(want) & (got != want)
    if odd.any():
        i = tuple(np.argwhere(odd)[0])
        raise AssertionError(f"{name}: non-finite values differ at {int(odd.sum())} elements; first at {i}: "
                             f"got {got[i]!r}, want {want[i]!r}")
    finite = np.isfinite(want)
    tol = np.broadcast_to(np.asarray(tol, np.float64), want.shape)
    with np.errstate(invalid="ignore"):
        diff = np.where(finite, np.abs(got - want), 0.0)
    bad = diff > np.where(finite, tol, np.inf)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, diff / np.maximum(tol, 1e-300), 0)), want.shape)
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} elements out of tolerance; worst at {i}: "
                             f"got {got[i]!r}, want {want[i]!r}, tol {tol[i]:.3e}")


def visible(rows, n, count0, group, period):
    """Columns each row sees, written out from the definition in csrc/lora_np.h."""
    count0 = n if count0 is None else count0
    period = rows if period is None else period
    return np.array([min(max(count0 + (i % period) // group, 0), n) for i in range(rows)], dtype=np.int64)


def silu_tolerance(a, b, g, dtype):
    """Allowed differences of (forward, ga, gb): the sigmoid's ds carried through each formula."""
    a, b, g = (np.asarray(x, np.float64) for x in (a, b, g))
    rtol = RTOL[dtype]
    with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN inputs: compared exactly
        s = 1 / (1 + np.exp(-a))
        ds = rtol * s + FLOOR[dtype]
        fwd = rtol * np.abs(s * a * b) + np.abs(a * b) * ds
        ga = rtol * np.abs(g * b) * s * (1 + np.abs((1 - s) * a)) + np.abs(g * b) * (1 + np.abs(a)) * ds
        gb = rtol * np.abs(s * a * g) + np.abs(a * g) * ds
    return fwd, ga, gb


# ---- data -----------------------------------------------------------------------------------------

awkward_n = st.one_of(st.integers(1, 300), st.sampled_from([1, 2, 3, 7, 9, 15, 17, 31, 33, 63, 65, 255, 257, 300]))


@st.composite
def row_layouts(draw):
    """rows, n, count0, group, period, and whether p has two leading axes (rows are then flattened)."""
    rows, n = draw(st.integers(1, 70), label="rows"), draw(awkward_n, label="n")
    count0 = draw(st.one_of(st.none(), st.integers(-5, 3), st.integers(-5, n + 5), st.integers(n - 1, n + 20)),
                  label="count0")
    group = draw(st.integers(1, 6), label="group")
    period = draw(st.one_of(st.none(), st.integers(1, rows + 3)), label="period")
    split = rows % 2 == 0 and draw(st.booleans(), label="split")
    return rows, n, count0, group, period, split


values = st.fixed_dictionaries({
    "seed": st.integers(0, 2**32 - 1),
    "magnitude": st.sampled_from([1.0, 10.0, 100.0]),   # 100: exp(p - max) underflows, e^100 overflows float32
    "hidden": st.sampled_from([0.0, 0.05, 0.5]),        # the fraction of -inf entries
    "dead": st.sampled_from([0.0, 0.2, 1.0]),            # the fraction of rows that are all -inf
})


def make_scores(layout, v, dtype):
    rows, n, _, _, _, split = layout
    rng = np.random.default_rng(v["seed"])
    p = rng.uniform(-v["magnitude"], v["magnitude"], (rows, n))
    p[rng.random((rows, n)) < v["hidden"]] = -np.inf
    p[rng.random(rows) < v["dead"]] = -np.inf
    return p.astype(dtype).reshape((2, rows // 2, n) if split else (rows, n))


def row_kwargs(layout):
    _, _, count0, group, period, _ = layout
    return {"count0": count0, "group": group, "period": period}


# ---- the C core equals the NumPy reference ------------------------------------------------------


@needs_c
@settings(max_examples=200, deadline=None)
@given(layout=row_layouts(), v=values, dtype=st.sampled_from(DTYPES),
       scale=st.one_of(st.sampled_from([1.0, -1.0, 0.0, 0.125]), st.floats(-4, 4)))
def test_softmax_rows_matches_numpy(layout, v, dtype, scale):
    rows, n = layout[:2]
    p = make_scores(layout, v, dtype)
    (pc,), lse_c = run("c", kernels.softmax_rows, p, scale, **row_kwargs(layout))
    (pn,), lse_n = run("numpy", kernels.softmax_rows, p, scale, **row_kwargs(layout))
    name = f"softmax_rows {dtype.__name__} {p.shape} {row_kwargs(layout)} scale={scale}"
    assert lse_c.shape == p.shape[:-1]
    check(pc, pn, RTOL[dtype] * np.abs(pn.astype(np.float64)) + FLOOR[dtype] * (1 + abs(scale)), name)

    vis = visible(rows, n, **row_kwargs(layout))
    shown = np.arange(n) < vis[:, None]
    p2 = p.reshape(rows, n).astype(np.float64)
    m = np.where(shown, p2, -np.inf).max(-1)                     # each row's largest visible score
    lse_n2 = lse_n.reshape(rows).astype(np.float64)
    with np.errstate(invalid="ignore"):
        tol = RTOL[dtype] * (np.abs(m) + np.abs(lse_n2 - m)) + FLOOR[dtype]
    check(lse_c.reshape(rows), lse_n.reshape(rows), tol, name + " lse")

    # The definition, independently of the reference: hidden columns are 0, and a row with nothing
    # visible (or only -inf) has lse = +inf and is all 0; the others sum to scale.
    pc2 = pc.reshape(rows, n).astype(np.float64)
    assert np.all(pc2[~shown] == 0), f"{name}: a hidden column is not 0"
    empty = m == -np.inf
    assert np.all(lse_c.reshape(rows)[empty] == np.inf) and np.all(pc2[empty] == 0), f"{name}: empty rows"
    assert_close(pc2[~empty].sum(-1), np.full((~empty).sum(), float(dtype(scale))), rtol=0,
                 atol=10 * RTOL[dtype] * abs(scale) + n * FLOOR[dtype], name=name + " row sums")


@needs_c
@settings(max_examples=150, deadline=None)
@given(layout=row_layouts(), v=values, dtype=st.sampled_from(DTYPES),
       shift=st.sampled_from([0.0, 3.0]), special=st.sampled_from([0.0, 0.2]))
def test_exp_rows_matches_numpy(layout, v, dtype, shift, special):
    """exp_rows with the log-sum-exps of softmax_rows, moved by up to +-shift, and some rows'
    lse replaced by +inf (the row becomes 0), -inf or NaN."""
    rows, n = layout[:2]
    p = make_scores(layout, v, dtype)
    rng = np.random.default_rng(v["seed"] + 1)
    _, lse = run("numpy", kernels.softmax_rows, p, **row_kwargs(layout))
    lse = lse + rng.uniform(-shift, shift, lse.shape).astype(dtype)
    lse[rng.random(lse.shape) < special] = rng.choice([np.inf, -np.inf, np.nan])
    (pc, _), _ = run("c", kernels.exp_rows, p, lse, **row_kwargs(layout))
    (pn, _), _ = run("numpy", kernels.exp_rows, p, lse, **row_kwargs(layout))
    name = f"exp_rows {dtype.__name__} {p.shape} {row_kwargs(layout)}"
    check(pc, pn, RTOL[dtype] * np.abs(pn.astype(np.float64)) + FLOOR[dtype], name)
    vis = visible(rows, n, **row_kwargs(layout))
    vis[lse.reshape(rows) == np.inf] = 0
    assert np.all(pc.reshape(rows, n)[np.arange(n) >= vis[:, None]] == 0), f"{name}: a hidden column is not 0"


@needs_c
@settings(max_examples=150, deadline=None)
@given(shape=st.tuples(st.integers(1, 70), awkward_n), seed=st.integers(0, 2**32 - 1),
       magnitude=st.sampled_from([1.0, 10.0, 100.0]), dtype=st.sampled_from(DTYPES),
       need=st.sampled_from([(True, True), (True, False), (False, True), (False, False)]), b_none=st.booleans())
def test_silu_mul_matches_numpy(shape, seed, magnitude, dtype, need, b_none):
    rng = np.random.default_rng(seed)
    a = rng.uniform(-magnitude, magnitude, shape).astype(dtype)
    b, g = (3 * rng.standard_normal(shape)).astype(dtype), (3 * rng.standard_normal(shape)).astype(dtype)
    tol = silu_tolerance(a, b, g, dtype)
    name = f"silu_mul {dtype.__name__} {shape} magnitude={magnitude}"
    _, fc = run("c", kernels.silu_mul_forward, a, b)
    _, fn = run("numpy", kernels.silu_mul_forward, a, b)
    check(fc, fn, tol[0], name + " forward")

    need_a, need_b = need
    b_arg = None if b_none and not need_a else b          # b is only read for a's gradient
    _, gc = run("c", kernels.silu_mul_backward, g, a, b_arg, need_a, need_b)
    _, gn = run("numpy", kernels.silu_mul_backward, g, a, b_arg, need_a, need_b)
    for k, (want_it, c, ref, t) in enumerate(zip(need, gc, gn, tol[1:])):
        if not want_it:
            assert c is None and ref is None, f"{name}: gradient {k} not asked for but returned"
        else:
            check(c, ref, t, f"{name} backward {'ga' if k == 0 else 'gb'} need={need}")


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
def test_numpy_reference_is_the_formula(backend):
    """Both backends against the formulas written out in float64, once, small."""
    rng = np.random.default_rng(3)
    a, b, g = rng.standard_normal((3, 2, 5))
    s = 1 / (1 + np.exp(-a))
    _, out = run(backend, kernels.silu_mul_forward, a, b)
    assert_close(out, a * s * b, rtol=1e-12, name="silu_mul forward")
    _, (ga, gb) = run(backend, kernels.silu_mul_backward, g, a, b)
    assert_close(ga, g * b * s * (1 + a * (1 - s)), rtol=1e-12, name="ga")
    assert_close(gb, g * a * s, rtol=1e-12, name="gb")
    p = rng.standard_normal((4, 6))
    (q,), lse = run(backend, kernels.softmax_rows, p, 2.0, count0=2, group=2, period=4)   # vis = 2, 2, 3, 3
    for i, vis in enumerate([2, 2, 3, 3]):
        e = np.exp(p[i, :vis])
        assert_close(q[i], np.r_[2 * e / e.sum(), np.zeros(6 - vis)], rtol=1e-12, name=f"softmax row {i}")
        assert_close(lse[i], np.log(e.sum()), rtol=1e-12, name=f"lse {i}")
    (r, _), _ = run(backend, kernels.exp_rows, p, lse, count0=2, group=2, period=4)
    assert_close(r, q / 2, rtol=1e-12, atol=1e-15, name="exp_rows gives the probabilities again")


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_arrays(dtype):
    for shape in [(0,), (3, 0), (0, 4)]:
        a = np.ones(shape, dtype)
        for backend in ("numpy", "c"):
            _, out = run(backend, kernels.silu_mul_forward, a, a)
            _, (ga, gb) = run(backend, kernels.silu_mul_backward, a, a, a)
            assert out.shape == ga.shape == gb.shape == shape
    for backend in ("numpy", "c"):
        (p,), lse = run(backend, kernels.softmax_rows, np.ones((3, 0), dtype))
        assert p.shape == (3, 0) and lse.tolist() == [np.inf] * 3
        (p,), lse = run(backend, kernels.softmax_rows, np.ones((0, 4), dtype), period=1)
        assert p.shape == (0, 4) and lse.shape == (0,)
        (p, _), _ = run(backend, kernels.exp_rows, np.ones((3, 0), dtype), np.zeros(3, dtype))
        assert p.shape == (3, 0)


def test_softmax_rows_of_no_rows_with_the_default_period():
    lse = kernels.softmax_rows(np.ones((0, 4)))
    assert lse.shape == (0,)


def test_contiguous():
    a = np.arange(12.0).reshape(3, 4)
    assert kernels.contiguous(a) is a
    t = kernels.contiguous(a.T)
    assert t.flags.c_contiguous and np.array_equal(t, a.T) and not np.shares_memory(t, a)
    z = np.ones(())
    assert kernels.contiguous(z) is z and z.shape == ()
    s = a[:, ::2]
    assert kernels.contiguous(s).shape == (3, 2) and kernels.contiguous(s).flags.c_contiguous


# ---- float32 vector exp at its edges ------------------------------------------------------------


@needs_c
def test_f32_exp_within_two_ulp_and_its_limits():
    """exp_rows with lse = 0 is exp itself: within 2 ulp of the exact value over [-87.33, 88.72];
    0 for -inf and where exp(x) < FLT_MIN (NumPy: a denormal); +inf for +inf; NaN kept."""
    rng = np.random.default_rng(5)
    x = np.concatenate([np.linspace(-87.33, EXP_F32_HI, 100_003), rng.uniform(-87.33, EXP_F32_HI, 100_000),
                        np.linspace(-87.33, -87.2, 1001), np.linspace(88.2, EXP_F32_HI, 1001),
                        [0.0, -0.0, 1e-30, -1e-30, EXP_F32_HI]]).astype(np.float32)
    (got, _), _ = run("c", kernels.exp_rows, x[None], np.zeros(1, np.float32))
    exact = np.exp(x.astype(np.float64))
    ulps = np.abs(got[0] - exact) / np.spacing(exact.astype(np.float32)).astype(np.float64)
    assert ulps.max() <= 2, f"{ulps.max():.2f} ulp at x = {x[ulps.argmax()]!r}"

    special = np.array([-np.inf, np.inf, np.nan, -87.34, -87.4, -88.0, -103.0, -150.0, -1e30, 1e30, 88.8],
                       np.float32)
    want = np.array([0, np.inf, np.nan, 0, 0, 0, 0, 0, 0, np.inf, np.inf], np.float32)
    (got, _), _ = run("c", kernels.exp_rows, special[None], np.zeros(1, np.float32))
    check(got[0], want, 0.0, "C float32 exp of special values")
    (ref, _), _ = run("numpy", kernels.exp_rows, special[None], np.zeros(1, np.float32))
    check(got[0], ref[0], FLOOR[np.float32], "C vs NumPy float32 exp of special values")


@needs_c
def test_f32_exp_between_88_38_and_88_72_is_finite():
    """Up to ln FLT_MAX the float32 exp is finite (2^n is applied in two factors, so n = 128 works)."""
    x = np.array([[88.3763, 88.4, 88.6, 88.72]], np.float32)
    (got, _), _ = run("c", kernels.exp_rows, x, np.zeros(1, np.float32))
    (ref, _), _ = run("numpy", kernels.exp_rows, x, np.zeros(1, np.float32))
    check(got, ref, RTOL[np.float32] * np.abs(ref), "exp between 88.38 and 88.72")


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_rows_special_values(dtype):
    """-inf entries are weight 0; a row of -inf only has lse = +inf and is all 0; a NaN in a
    visible column (next to a finite one) makes the row's visible columns and its lse NaN in both
    backends; a NaN in a hidden column changes nothing. Values around the float32 exp limits:
    -87.3 and 88.4 apart. Every row sees its first 4 columns; the hidden fifth is compared apart
    (0 in both backends)."""
    inf, nan = np.inf, np.nan
    p = np.array([
        [-inf, 3.0, -inf, 1.0, 2.0],
        [-inf, -inf, -inf, -inf, -inf],
        [nan, 1.0, 2.0, 3.0, 4.0],
        [1.0, 2.0, -inf, nan, 0.5],
        [1.0, 2.0, 0.5, 0.25, nan],            # NaN hidden: every row sees 4 columns below
        [0.0, -87.3, -87.4, -88.4, -90.0],
        [88.4, 1.0, -87.3, 0.0, 88.3],
        [-88.4, -88.5, -87.3, -100.0, -inf],
    ], dtype)
    for scale in (1.0, -0.5):
        (pc,), lse_c = run("c", kernels.softmax_rows, p, scale, count0=4, period=1)
        (pn,), lse_n = run("numpy", kernels.softmax_rows, p, scale, count0=4, period=1)
        tol = RTOL[dtype] * np.abs(pn[:, :4].astype(np.float64)) + FLOOR[dtype] * (1 + abs(scale))
        check(pc[:, :4], pn[:, :4], tol, f"softmax_rows special values scale={scale}")
        assert np.all(pc[:, 4] == 0), "C: a hidden column is not 0"
        assert np.all(pn[:, 4] == 0), "NumPy: a hidden column is not 0"
        m = np.array([3, -inf, nan, nan, 2, 0, 88.4, -87.3])
        check(lse_c, lse_n, RTOL[dtype] * (np.abs(m) + 5) + FLOOR[dtype], "lse of special values")
        assert lse_c[1] == inf and np.all(pc[1] == 0)
        assert np.isnan(lse_c[2]) and np.isnan(lse_c[3]) and np.isnan(pc[2, :4]).all()
        assert np.isfinite(lse_c[4]) and np.all(pc[4, 4] == 0)


@needs_c
@pytest.mark.parametrize("row", [[np.nan, -np.inf, 1.0], [np.nan, np.nan, 1.0], [1.0, np.inf, 2.0],
                                 [1.0, np.nan, 2.0]])
def test_softmax_rows_nan_or_inf_backends_agree(row):
    """A visible NaN or +inf makes lse and the visible columns NaN in both backends; hidden columns stay 0."""
    p = np.array([row], np.float64)
    (pc,), lse_c = run("c", kernels.softmax_rows, p, count0=2)
    (pn,), lse_n = run("numpy", kernels.softmax_rows, p, count0=2)
    check(lse_c, lse_n, 0.0, "lse")
    check(pc, pn, 0.0, "p")


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_special_values(dtype):
    """+-inf, NaN, the sigmoid's exp at its float32 limits (exp(-a) overflows for a < -88.38 and
    underflows for a > 87.34) and beyond: C and NumPy give the same values, NaN and inf alike."""
    a = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 87.3, 87.4, 88.3, 88.4, 88.8, -87.3, -87.4, -88.3, -88.4,
                  -88.5, -88.8, -100.0, 100.0, 1e30, -1e30, 16.0, 17.0, -1.2785], dtype)
    rng = np.random.default_rng(0)
    b = np.where(rng.random(a.size) < 0.5, 1.0, rng.standard_normal(a.size)).astype(dtype)
    g = rng.standard_normal(a.size).astype(dtype)
    tol = silu_tolerance(a, b, g, dtype)
    _, fc = run("c", kernels.silu_mul_forward, a, b)
    _, fn = run("numpy", kernels.silu_mul_forward, a, b)
    check(fc, fn, tol[0], "silu_mul forward of special values")
    assert fc[0] == np.inf * np.sign(b[0]) and np.isnan(fc[1]) and np.isnan(fc[2])
    _, (ga_c, gb_c) = run("c", kernels.silu_mul_backward, g, a, b)
    _, (ga_n, gb_n) = run("numpy", kernels.silu_mul_backward, g, a, b)
    check(ga_c, ga_n, tol[1], "silu_mul ga of special values")
    check(gb_c, gb_n, tol[2], "silu_mul gb of special values")


# ---- threads ----------------------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_and_two_threads_give_identical_bits(dtype):
    """Sizes above the kernels' parallel threshold (1e5 elements): rows 401 x 257, and 150001 elements
    (nine element chunks of 16384 and a tail)."""
    rng = np.random.default_rng(11)
    p = rng.uniform(-30, 30, (401, 257)).astype(dtype)
    p[rng.random(p.shape) < 0.1] = -np.inf
    a, b, g = (rng.uniform(-20, 20, 150_001).astype(dtype) for _ in range(3))
    kw = {"count0": 100, "group": 3, "period": 200}
    results = []
    for threads in (1, 2):
        kernels.set_num_threads(threads)
        (sm,), lse = run("c", kernels.softmax_rows, p, 0.7, **kw)
        (ex, _), _ = run("c", kernels.exp_rows, p, lse, **kw)
        _, fwd = run("c", kernels.silu_mul_forward, a, b)
        _, (ga, gb) = run("c", kernels.silu_mul_backward, g, a, b)
        _, (_, gb_only) = run("c", kernels.silu_mul_backward, g, a, None, False, True)
        results.append({"softmax_rows": sm, "lse": lse, "exp_rows": ex, "silu_mul_forward": fwd, "ga": ga, "gb": gb,
                        "gb alone": gb_only})
    if lib.lora_has_openmp():
        assert kernels.get_num_threads() == 2
    for k in results[0]:
        assert np.array_equal(results[0][k], results[1][k], equal_nan=True), f"{k} differs between 1 and 2 threads"
    assert np.array_equal(results[0]["gb"], results[0]["gb alone"]), "gb alone differs from gb beside ga"


# ---- wrong calls are refused, and the output is untouched -------------------------------------------


def _p(dtype=np.float32):
    return np.arange(12, dtype=dtype).reshape(3, 4) / 7


def _readonly(a):
    a.flags.writeable = False
    return a


def _noncontiguous(shape, dtype=np.float32):
    return np.ones(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]


SILU_REFUSALS = [
    # (description, call, error, words in the message)
    ("int a", lambda: kernels.silu_mul_forward(np.ones(3, np.int64), np.ones(3, np.float32)), TypeError,
     ["a", "int64"]),
    ("mixed dtypes", lambda: kernels.silu_mul_forward(np.ones(3, np.float32), np.ones(3)), TypeError,
     ["b", "float64"]),
    ("strided a", lambda: kernels.silu_mul_forward(_noncontiguous((3, 4)), np.ones((3, 4), np.float32)), ValueError,
     ["a", "C-contiguous"]),
    ("shapes", lambda: kernels.silu_mul_forward(np.ones((3, 4)), np.ones((4, 3))), ValueError,
     ["shapes differ", "a (3, 4)", "b (4, 3)"]),
    ("float16 g", lambda: kernels.silu_mul_backward(np.ones(3, np.float16), np.ones(3), np.ones(3)), TypeError,
     ["g", "float16"]),
    ("mixed b", lambda: kernels.silu_mul_backward(np.ones(3), np.ones(3), np.ones(3, np.float32)), TypeError,
     ["b", "float32"]),
    ("Fortran a", lambda: kernels.silu_mul_backward(np.ones((3, 4)), np.asfortranarray(np.ones((3, 4))),
                                                    np.ones((3, 4))), ValueError, ["a", "C-contiguous"]),
    ("g shape", lambda: kernels.silu_mul_backward(np.ones(4), np.ones(3), np.ones(3)), ValueError, ["g (4,)"]),
]


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
@pytest.mark.parametrize("what, call, error, words", SILU_REFUSALS, ids=[r[0] for r in SILU_REFUSALS])
def test_silu_mul_rejects(backend, what, call, error, words):
    kernels.set_backend(backend)
    with pytest.raises(error) as e:
        call()
    for w in words:
        assert w in str(e.value), f"{what}: {w!r} not in {str(e.value)!r}"


ROWS_REFUSALS = [
    # (description, make (p, lse or None, kwargs), error, words); op is softmax_rows without lse, else exp_rows
    ("int p", lambda: (np.arange(12).reshape(3, 4), None, {}), TypeError, ["p", "int64"]),
    ("float16 p", lambda: (_p(np.float16), np.zeros(3, np.float16), {}), TypeError, ["p", "float16"]),
    ("strided p", lambda: (_noncontiguous((3, 4)), None, {}), ValueError, ["p", "C-contiguous"]),
    ("Fortran p", lambda: (np.asfortranarray(_p()), np.zeros(3, np.float32), {}), ValueError, ["p", "C-contiguous"]),
    ("read-only p", lambda: (_readonly(_p()), None, {}), ValueError, ["p", "writeable"]),
    ("read-only p", lambda: (_readonly(_p()), np.zeros(3, np.float32), {}), ValueError, ["p", "writeable"]),
    ("group 0", lambda: (_p(), None, {"group": 0}), ValueError, ["group (0)", ">= 1"]),
    ("period 0", lambda: (_p(), None, {"period": 0}), ValueError, ["period (0)", ">= 1"]),
    ("period -2", lambda: (_p(), np.zeros(3, np.float32), {"period": -2}), ValueError, ["period (-2)", ">= 1"]),
    ("group -1", lambda: (_p(), np.zeros(3, np.float32), {"group": -1}), ValueError, ["group (-1)", ">= 1"]),
    ("0-d p", lambda: (np.ones((), np.float32), None, {}), ValueError, ["p", "dimension"]),
    ("lse shape", lambda: (_p(), np.zeros(4, np.float32), {}), ValueError, ["lse", "(4,)", "(3,)"]),
    ("lse 2-D", lambda: (_p(), np.zeros((3, 1), np.float32), {}), ValueError, ["lse", "(3, 1)", "(3,)"]),
    ("lse dtype", lambda: (_p(), np.zeros(3), {}), TypeError, ["lse", "float64"]),
    ("strided lse", lambda: (_p(), _noncontiguous((3,)), {}), ValueError, ["lse", "C-contiguous"]),
    ("lse inside p", lambda: (lambda p: (p, p.reshape(-1)[4:7], {}))(_p()), ValueError, ["p", "overlaps", "lse"]),
]


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
@pytest.mark.parametrize("what, make, error, words", ROWS_REFUSALS, ids=[r[0] for r in ROWS_REFUSALS])
def test_rows_reject(backend, what, make, error, words):
    kernels.set_backend(backend)
    p, lse, kwargs = make()
    before_p, before_lse = np.array(p, copy=True), None if lse is None else np.array(lse, copy=True)
    with pytest.raises(error) as e:
        if lse is None:
            kernels.softmax_rows(p, **kwargs)
        else:
            kernels.exp_rows(p, lse, **kwargs)
    for w in words:
        assert w in str(e.value), f"{what}: {w!r} not in {str(e.value)!r}"
    assert np.array_equal(p, before_p, equal_nan=True), f"{what}: a refused call changed p"
    if lse is not None:
        assert np.array_equal(lse, before_lse), f"{what}: a refused call changed lse"


# ---- lora_np.functional under both backends ------------------------------------------------------


def _both_backends(fn):
    """fn() under backend "numpy" and "c": {backend: its result}."""
    results = {}
    for backend in ("numpy", "c"):
        kernels.set_backend(backend)
        results[backend] = fn()
    return results


def _same(results, names, what):
    """float64: each tensor within 1e-12 of the NumPy backend's, relative to the tensor's largest value
    (attention's gradients subtract rowsum(dP·P): element-wise relative error is not meaningful)."""
    for name, c, ref in zip(names, results["c"], results["numpy"]):
        if ref is None:
            assert c is None, f"{what} {name}: C gave a value where NumPy gave None"
            continue
        assert c.dtype == ref.dtype == np.float64
        assert np.isfinite(ref).all()
        assert_close(c, ref, rtol=1e-12, atol=1e-12 * float(np.abs(ref).max(initial=0)), name=f"{what} {name}")


@needs_c
@pytest.mark.parametrize("T, S, causal, mask", [
    (5, 5, False, None), (5, 5, True, None), (3, 7, True, None), (7, 3, True, None), (4, 9, False, None),
    (6, 6, False, "bool"), (6, 9, True, "bool"), (9, 6, True, "float"), (5, 8, False, "float"),
    (70, 70, True, None), (67, 80, False, "bool"),
])
def test_attention_is_the_same_under_c_and_numpy(T, S, causal, mask):
    """GQA with Hq = 6 query heads over Hkv = 2 key/value heads; T > 64 spans two query blocks; causal
    with T > S leaves the first rows with no key (output 0); the bool masks hide whole rows too."""
    B, Hq, Hkv, D = 2, 6, 2, 5
    rng = np.random.default_rng(T * 100 + S)
    q, k, v = (rng.standard_normal(shape) for shape in ((B, Hq, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    r = rng.standard_normal((B, Hq, T, D))
    attn_mask = None
    if mask == "bool":
        attn_mask = rng.random((B, 1, T, S)) < 0.7
        attn_mask[:, :, 1] = False                      # a row that sees nothing
    elif mask == "float":
        attn_mask = rng.standard_normal((1, Hq, T, S))
        attn_mask[0, 2, :, :2] = -np.inf

    def attention():
        tq, tk, tv = (Tensor(x, requires_grad=True) for x in (q, k, v))
        out = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=None if attn_mask is None else Tensor(attn_mask),
                                             is_causal=causal)
        out.backward(r)
        return out.data.copy(), tq.grad, tk.grad, tv.grad

    results = _both_backends(attention)
    _same(results, ["out", "dq", "dk", "dv"], f"attention T={T} S={S} causal={causal} mask={mask}")


@needs_c
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True)])
def test_silu_mul_function_is_the_same_under_c_and_numpy(grads):
    """functional.silu_mul: forward and the gradients asked for (b alone saves no b: NULL in C)."""
    rng = np.random.default_rng(2)
    a, b, r = 4 * rng.standard_normal((37, 29)), rng.standard_normal((37, 29)), rng.standard_normal((37, 29))

    def gate():
        ta, tb = Tensor(a, requires_grad=grads[0]), Tensor(b, requires_grad=grads[1])
        out = F.silu_mul(ta, tb)
        out.backward(r)
        return out.data.copy(), ta.grad, tb.grad

    results = _both_backends(gate)
    _same(results, ["out", "da", "db"], f"silu_mul grads={grads}")


@needs_c
def test_silu_mul_function_takes_strided_inputs():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((6, 10)), rng.standard_normal((10, 6))
    results = _both_backends(lambda: (F.silu_mul(Tensor(a[:, ::2]), Tensor(b.T[:, 1::2])).data,))
    _same(results, ["out"], "silu_mul of strided views")


# ---- the C driver under AddressSanitizer -------------------------------------------------------------


@needs_c
def test_step_kernels_under_address_sanitizer(tmp_path):
    run_c_driver_under_sanitizers(tmp_path, "test_step_kernels", ["step_kernels.c", "lora_kernels.c"], "all step kernel checks passed")
