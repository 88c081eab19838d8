"""lora_np.kernels.attention: the fused C attention (_attention_forward_c / _attention_backward_c of csrc/step_kernels.c)
against the NumPy blocks of lora_np.kernels.attention (kernels.set_backend("numpy")), the reference.

Grouped-query heads (query head h·g + j uses key/value head h) over awkward sizes: B 1..3, Hkv 1..3,
g 1..5, T and S 1..70 either way round (block edges of the C kernel at 48 // g positions), D not a
multiple of the 16-wide register tiles, causal masks aligned to the bottom right (query t sees keys up
to t + S - T, so with T > S the first rows see no key at all: output 0, lse +inf, gradient 0), random
scales (0 and negative included), q and g_out strided the ways a model passes them (a transpose of
(B, T, Hq, D), a slice of a wider last axis, negative strides). Also: need_q / need_k / need_v, 1 and 2
threads bit for bit, scores in the thousands, malformed calls refused with the argument named, and
SDPA under the C backend running exactly these kernels (bit for bit).

D = 1 and empty arrays (B = 0 or T = 0) are computed; attention_backward refuses a g_out of another
dtype and an out or lse that is not attention_forward's own (dtype, shape, dense layout).

Tolerances are relative to the magnitude of the terms, RTOL = 1e-12 for float64 and 1e-5 for float32,
carried through each step to first order (see `formula`): a score q·k may differ by RTOL times
scale·|q|·|k|, so a probability P = exp(s - lse) by P·RTOL·(3 + that + the row's largest such + |lse|);
the output by RTOL·P|v| plus that through |v|; dP = g_out·v and delta = rowsum(g_out * out) likewise,
dS = P·(dP - delta), dq = scale·dS k, dk = scale·dSᵀ q, dv = Pᵀ g_out. The gradients subtract
(dP - delta), so an element-wise relative error would mean nothing where they cancel (S = 1 gives
dq = dk = 0 up to rounding). FLOOR (4·tiny) covers the float32 vector exp that returns 0 where NumPy
returns a denormal. The NumPy reference is itself checked against the same formulas in float64.
"""
import re
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import IN_CI
from lora_np import Tensor, kernels
from lora_np.kernels import attention as kattention
from lora_np.kernels.backend import lib
from lora_np import functional as F

HAS_C = "c" in kernels.available_backends()
needs_c = pytest.mark.skipif(not HAS_C and not IN_CI, reason="C core not built")
DTYPES = [np.float32, np.float64]
RTOL = {np.float32: 1e-5, np.float64: 1e-12}
FLOOR = {np.float32: 4 * float(np.finfo(np.float32).tiny), np.float64: 4 * float(np.finfo(np.float64).tiny)}
LAYOUTS = ["dense", "bthd", "padded", "reversed"]
NEEDS = [(a, b, c) for a in (True, False) for b in (True, False) for c in (True, False)]


# ---- data ---------------------------------------------------------------------------------------------


def strided(rng, shape, layout, dtype, magnitude=1.0):
    """A (B, H, T, D) array of normal values laid out in memory as `layout`:
    dense; bthd: the transpose of a dense (B, T, H, D) array, as the model passes q; padded: a slice of
    a wider last axis (rows of D + 3, starting at 1); reversed: heads and positions with negative strides."""
    B, H, T, D = shape
    views = {"dense": lambda: np.empty(shape, dtype),
             "bthd": lambda: np.empty((B, T, H, D), dtype).transpose(0, 2, 1, 3),
             "padded": lambda: np.full((B, H, T, D + 3), np.nan, dtype)[..., 1:D + 1],   # NaN where not read
             "reversed": lambda: np.empty(shape, dtype)[:, ::-1, ::-1]}
    a = views[layout]()
    a[...] = magnitude * rng.standard_normal(shape)
    return a


def visible_keys(T, S, causal, window=None):
    """(T, S) bool: query t, at position p = t + S - T, sees key s: s <= p when causal (bottom-right aligned),
    s > p - window with a sliding window (transformers' sliding_window_overlay: kv_idx > q_idx - window)."""
    p = np.arange(T)[:, None] + S - T
    seen = np.arange(S)[None, :] <= p if causal else np.ones((T, S), bool)
    return seen & (np.arange(S)[None, :] > p - window) if window else seen


# ---- the two backends -----------------------------------------------------------------------------------


def _not_in_c(*args):
    raise AssertionError("the C attention ran on the NumPy backend")


def numpy_reference(q, k, v, g_out, scale, causal, need=(True, True, True), window=None, softcap=None):
    """The NumPy blocks of lora_np.kernels.attention (through functional.SDPA): out (B, Hq, T, D), lse (B, Hkv, T, g), dq, dk, dv."""
    kernels.set_backend("numpy")
    tq, tk, tv = (Tensor(x, requires_grad=n) for x, n in zip((q, k, v), need))
    with np.errstate(all="ignore"), pytest.MonkeyPatch.context() as m:
        for name in ("_attention_forward_c", "_attention_backward_c"):
            m.setattr(kattention, name, _not_in_c)
        out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, scale=scale, sliding_window=window,
                                             softcap=softcap)
        ctx = out._ctx
        lse = ctx.lse.copy()
        dq, dk, dv, _ = ctx.backward(g_out)
    return out.data.copy(), lse, dq, dk, dv


def in_c(q, k, v, g_out, scale, causal, need=(True, True, True), window=None, softcap=None):
    """kernels.attention_forward + attention_backward: out (B, Hq, T, D) (a view of the (B, T, Hkv, g, D)
    array), lse, dq, dk, dv, and the raw (B, T, Hkv, g, D) out."""
    kernels.set_backend("c")
    out, lse = kattention._attention_forward_c(q, k, v, scale, causal, window, softcap)
    B, T, Hkv, g, D = out.shape
    dq, dk, dv = kattention._attention_backward_c(g_out, q, k, v, out, lse, scale, causal, *need, window, softcap)
    return out.transpose(0, 2, 3, 1, 4).reshape(B, Hkv * g, T, D), lse, dq, dk, dv, out


def formula(q, k, v, g_out, scale, causal, dtype, window=None, softcap=None):
    """The exact values in float64 (dense, from the definition) and the allowed differences, as dicts.
    A soft cap c makes the scores c·t, t = tanh(s/c): a score's error becomes (1 − t²)(A + |s|) + 2|c·t| times
    RTOL (the raw score's through tanh, the division's and tanh's own), and dS = P·(dP − delta)·(1 − t²),
    whose factor is off by 2|t|·RTOL·A/|c| + 2·RTOL (kept beside P·(dP − delta)'s own error: where the cap
    saturates, 1 − t² is about its error)."""
    rtol, floor = RTOL[dtype], FLOOR[dtype]
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    g = Hq // Hkv
    scale = float(dtype(scale))
    Q = q.astype(np.float64).reshape(B, Hkv, g, T, D)
    K = k.astype(np.float64)[:, :, None]                                     # (B, Hkv, 1, S, D)
    V = v.astype(np.float64)[:, :, None]
    G = g_out.astype(np.float64).reshape(B, Hkv, g, T, D)
    aQ, aK, aV, aG = np.abs(Q), np.abs(K), np.abs(V), np.abs(G)
    kT = lambda x: np.swapaxes(x, -1, -2)                                    # noqa: E731
    vis = visible_keys(T, S, causal, window)
    raw = scale * (Q @ kT(K))                                                # (B, Hkv, g, T, S)
    A = abs(scale) * (aQ @ kT(aK))                                           # magnitude of the score terms
    dcap, dcap_tol = 1.0, 0.0
    if softcap:
        t = np.tanh(raw / softcap)
        A = (1 - t * t) * (A + np.abs(raw)) + 2 * np.abs(softcap * t)
        raw, dcap = softcap * t, 1 - t * t
        dcap_tol = 2 * np.abs(t) * rtol * A / softcap + 2 * rtol
    s = np.where(vis, raw, -np.inf)
    A = np.where(vis, A, 0.0)
    seen = vis.any(-1)[:, None]                                              # (T, 1): rows with a key
    m = np.where(seen, s.max(-1, keepdims=True, initial=-np.inf), 0.0)
    e = np.exp(s - m)
    lse = np.where(seen, m + np.log(np.where(seen, e.sum(-1, keepdims=True), 1.0)), np.inf)
    P = np.where(vis, e / np.where(seen, e.sum(-1, keepdims=True), 1.0), 0.0)
    out = P @ V
    dP = G @ kT(V)
    delta = (G * out).sum(-1, keepdims=True)
    dS0 = P * (dP - delta)
    dS = dS0 * dcap
    want = {"out": out, "lse": lse[..., 0], "dq": scale * dS @ K,
            "dk": (scale * kT(dS) @ Q).sum(2), "dv": (kT(P) @ G).sum(2)}

    finite_lse = np.where(seen, np.abs(lse), 0.0)
    rP = rtol * (3 + A + A.max(-1, keepdims=True) + finite_lse)               # relative error of P
    Pt = P * (rtol + rP) + floor * vis                                       # absolute error of P
    out_tol = Pt @ aV
    delta_tol = rtol * (aG * np.abs(out)).sum(-1, keepdims=True) + (aG * out_tol).sum(-1, keepdims=True)
    dS_tol = (Pt * np.abs(dP - delta) + P * (rtol * (aG @ kT(aV)) + delta_tol)) * (dcap + dcap_tol) \
        + np.abs(dS0) * dcap_tol                                             # a cap near ±1: 1 − t² ~ its error
    aS = np.abs(dS)
    tol = {"out": out_tol,
           "lse": np.where(seen, rtol * (np.abs(m) + np.abs(lse - m) + A.max(-1, keepdims=True)) + floor,
                           0.0)[..., 0],
           "dq": abs(scale) * (rtol * aS + dS_tol) @ aK + floor,
           "dk": (abs(scale) * kT(rtol * aS + dS_tol) @ aQ).sum(2) + floor,
           "dv": (kT(Pt) @ aG).sum(2) + floor}
    shapes = {"out": (B, Hq, T, D), "lse": (B, Hkv, T, g), "dq": (B, Hq, T, D), "dk": k.shape, "dv": v.shape}
    for name in want:
        if name == "lse":   # (B, Hkv, g, T) -> the kernels' (B, Hkv, T, g)
            want[name], tol[name] = (np.swapaxes(x, -1, -2) for x in (want[name], tol[name]))
        want[name], tol[name] = (x.reshape(shapes[name]) for x in (want[name], tol[name]))
    return want, tol


def check(got, want, tol, name):
    """Non-finite values equal (NaN where NaN, inf of the same sign); finite ones within tol (an array)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    got, want = got.astype(np.float64), want.astype(np.float64)
    odd = (np.isnan(got) != np.isnan(want)) | ((np.isinf(got) | np.isinf(want)) & (got != want)
                                               & ~np.isnan(got) & ~np.isnan(want))
    if odd.any():
        i = tuple(np.argwhere(odd)[0])
        raise AssertionError(f"{name}: non-finite values differ at {int(odd.sum())} elements; first at {i}: "
                             f"got {got[i]!r}, want {want[i]!r}")
    finite = np.isfinite(want)
    with np.errstate(invalid="ignore"):
        diff = np.where(finite, np.abs(got - want), 0.0)
    tol = np.broadcast_to(tol, want.shape)
    bad = diff > np.where(finite, tol, np.inf)
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, diff / np.maximum(tol, 1e-300), 0)), want.shape)
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} elements out of tolerance; worst at {i}: "
                             f"got {got[i]!r}, want {want[i]!r}, tol {tol[i]:.3e}")


def compare(c, ref, want, tol, dtype, what):
    """C (out, lse, dq, dk, dv) vs the NumPy reference, and the reference vs the float64 formulas."""
    for name, got, r in zip(["out", "lse", "dq", "dk", "dv"], c, ref):
        assert got.dtype == dtype, f"{what} {name}: dtype {got.dtype}"
        check(got, r, tol[name], f"{what} {name}: C vs NumPy")
        check(r, want[name], tol[name], f"{what} {name}: NumPy vs the formula")


# ---- the C kernels equal the NumPy blocks ------------------------------------------------------------------

sizes = st.one_of(st.integers(1, 70), st.sampled_from([1, 2, 9, 16, 17, 24, 47, 48, 49, 70]))


@st.composite
def attention_cases(draw):
    B, Hkv, g = draw(st.integers(1, 3), label="B"), draw(st.integers(1, 3), label="Hkv"), draw(st.integers(1, 5),
                                                                                                   label="g")
    T, S = draw(sizes, label="T"), draw(sizes, label="S")
    D = draw(st.sampled_from([1, 3, 8, 15, 16, 17, 64, 65]), label="D")
    causal = draw(st.booleans(), label="causal")
    scale = draw(st.one_of(st.none(), st.sampled_from([0.0, -0.5, 1.0]), st.floats(-1.5, 1.5)), label="scale")
    q_layout, go_layout = draw(st.sampled_from(LAYOUTS), label="q layout"), draw(st.sampled_from(LAYOUTS),
                                                                               label="g_out layout")
    window = draw(st.one_of(st.none(), st.integers(1, 80)), label="sliding_window")
    softcap = draw(st.one_of(st.none(), st.sampled_from([0.05, 1.0]), st.floats(0.1, 50.0)), label="softcap")
    return (B, Hkv, g, T, S, D), causal, scale, q_layout, go_layout, window, softcap


def options(case):
    """The sliding window and soft cap of a case (None, None when it has none)."""
    return dict(window=case[5], softcap=case[6]) if len(case) > 5 else dict(window=None, softcap=None)


def make(case, dtype, seed, magnitude=1.0):
    (B, Hkv, g, T, S, D), causal, scale, q_layout, go_layout = case[:5]
    rng = np.random.default_rng(seed)
    q = strided(rng, (B, Hkv * g, T, D), q_layout, dtype, magnitude)
    k, v = ((magnitude if i == 0 else 1.0) * rng.standard_normal((B, Hkv, S, D)) for i in range(2))
    g_out = strided(rng, (B, Hkv * g, T, D), go_layout, dtype)
    if scale is None:
        scale = 1 / np.sqrt(D)
    return q, k.astype(dtype), v.astype(dtype), g_out, float(scale), causal


@needs_c
@settings(max_examples=400, deadline=None)
@given(case=attention_cases(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**32 - 1))
def test_attention_matches_numpy(case, dtype, seed):
    q, k, v, g_out, scale, causal = make(case, dtype, seed)
    (B, Hkv, g, T, S, D), _, _, q_layout, go_layout, window, softcap = case
    what = (f"attention {dtype.__name__} B={B} Hkv={Hkv} g={g} T={T} S={S} D={D} causal={causal} "
            f"scale={scale} window={window} softcap={softcap} q {q_layout} g_out {go_layout}")
    q0, k0, v0, go0 = (x.copy() for x in (q, k, v, g_out))
    c = in_c(q, k, v, g_out, scale, causal, **options(case))
    ref = numpy_reference(q, k, v, g_out, scale, causal, **options(case))
    want, tol = formula(q, k, v, g_out, scale, causal, dtype, **options(case))
    compare(c[:5], ref, want, tol, dtype, what)
    for x, x0 in zip((q, k, v, g_out), (q0, k0, v0, go0)):
        assert np.array_equal(x, x0), f"{what}: an input changed"

    out, lse, dq, dk, dv, raw = c
    assert raw.shape == (B, T, Hkv, g, D) and raw.flags.c_contiguous, f"{what}: out {raw.shape} {raw.strides}"
    assert lse.shape == (B, Hkv, T, g) and lse.flags.c_contiguous
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    if q_layout == "bthd":  # q's own layout, so that the model's transpose back to (B, T, Hq·D) is free
        assert dq.transpose(0, 2, 1, 3).flags.c_contiguous, f"{what}: dq strides {dq.strides}, q {q.strides}"
    blind = ~visible_keys(T, S, causal, window).any(-1)                      # query rows that see no key
    assert np.all(out[:, :, blind] == 0) and np.all(dq[:, :, blind] == 0), f"{what}: a blind row is not 0"
    assert np.all(lse[:, :, blind] == np.inf), f"{what}: a blind row's lse is not +inf"

    # SDPA under the C backend runs exactly these kernels (no mask: fused), with q and g_out as given.
    kernels.set_backend("c")
    tq, tk, tv = (Tensor(x, requires_grad=True) for x in (q, k, v))
    ran = []
    with pytest.MonkeyPatch.context() as m:
        for name in ("_attention_forward_c", "_attention_backward_c"):
            m.setattr(kattention, name, lambda *args, _c=getattr(kattention, name): ran.append(_c) or _c(*args))
        sd = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, scale=scale, sliding_window=window,
                                            softcap=softcap)
        grads = sd._ctx.backward(g_out)[:3]
    assert len(ran) == 2, f"{what}: SDPA did not take the C kernels"
    for name, a, b in zip(["out", "dq", "dk", "dv"], (sd.data, *grads), (out, dq, dk, dv)):
        assert np.array_equal(a, b), f"{what}: SDPA under C differs from the kernels in {name}"


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("need", NEEDS, ids=lambda n: "".join("qkv"[i] if x else "-" for i, x in enumerate(n)))
def test_only_the_gradients_asked_for(need, dtype):
    """None where not needed; the others bit for bit those of a call that asks for all three, and within
    the tolerance of the NumPy reference asked the same way (T > S causal: blind rows; g = 3, D = 17)."""
    case = ((2, 2, 3, 13, 9, 17), True, 0.4, "bthd", "padded")
    q, k, v, g_out, scale, causal = make(case, dtype, 7)
    _, _, *full = in_c(q, k, v, g_out, scale, causal)[:5]
    _, _, *part = in_c(q, k, v, g_out, scale, causal, need)[:5]
    want, tol = formula(q, k, v, g_out, scale, causal, dtype)
    ref = numpy_reference(q, k, v, g_out, scale, causal, need)[2:] if any(need) else (None,) * 3
    for name, asked, got, all_, r in zip(["dq", "dk", "dv"], need, part, full, ref):
        if not asked:
            assert got is None and r is None, f"need={need}: {name} returned though not asked for"
            continue
        assert np.array_equal(got, all_), f"need={need}: {name} differs from the call that asks for all"
        check(got, r, tol[name], f"need={need} {name} C vs NumPy")


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal, window, softcap", [(False, None, None), (True, None, None), (True, 37, 5.0),
                                                     (False, 50, None)])
def test_one_and_two_threads_give_identical_bits(dtype, causal, window, softcap):
    """B · Hkv = 6 tasks of 200 x 200 x 64: far above the parallel threshold (1e5)."""
    case = ((2, 3, 3, 200, 200, 64), causal, None, "bthd", "bthd", window, softcap)
    q, k, v, g_out, scale, causal = make(case, dtype, 11)
    results = []
    for threads in (1, 2):
        kernels.set_num_threads(threads)
        results.append(in_c(q, k, v, g_out, scale, causal, **options(case)))
    if lib.lora_has_openmp():
        assert kernels.get_num_threads() == 2
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], results[0], results[1]):
        assert np.array_equal(a, b), f"{name} differs between 1 and 2 threads"


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal, T, S", [(False, 24, 31), (True, 31, 24), (True, 50, 50)])
def test_large_scores_stay_finite(dtype, causal, T, S):
    """q and k entries ~30 (scores in the thousands: every row's softmax is almost one-hot, e^(s - max)
    underflows for most keys): finite everywhere but the blind rows' lse, and equal between backends."""
    case = ((2, 2, 2, T, S, 16), causal, 0.25, "bthd", "dense")
    q, k, v, g_out, scale, causal = make(case, dtype, 5, magnitude=30.0)
    c = in_c(q, k, v, g_out, scale, causal)[:5]
    ref = numpy_reference(q, k, v, g_out, scale, causal)
    for name, x in zip(["out", "dq", "dk", "dv"], (c[0], *c[2:])):
        assert np.isfinite(x).all(), f"{name} is not finite"
    blind = ~visible_keys(T, S, causal).any(-1)
    assert np.isfinite(c[1][:, :, ~blind]).all() and np.all(c[1][:, :, blind] == np.inf)
    want, tol = formula(q, k, v, g_out, scale, causal, dtype)
    compare(c, ref, want, tol, dtype, f"scores ~1e3 {dtype.__name__} causal={causal} T={T} S={S}")


@needs_c
@pytest.mark.parametrize("B, Hkv, g, T, S, D", [(1, 1, 2, 2, 1, 1), (2, 2, 3, 9, 5, 1), (1, 2, 1, 4, 4, 1),
                                                (0, 2, 2, 3, 3, 4), (2, 1, 2, 0, 3, 4)],
                         ids=["D=1 g=2", "D=1 g=3 T>S", "D=1 g=1", "B=0", "T=0"])
def test_head_dim_1_and_empty_arrays(B, Hkv, g, T, S, D):
    """D = 1 with several heads and positions, and empty batches or sequences."""
    case = ((B, Hkv, g, T, S, D), True, 0.7, "bthd", "dense")
    q, k, v, g_out, scale, causal = make(case, np.float64, 3)
    want, tol = formula(q, k, v, g_out, scale, causal, np.float64)
    ref = numpy_reference(q, k, v, g_out, scale, causal)
    compare(in_c(q, k, v, g_out, scale, causal)[:5], ref, want, tol, np.float64, f"B={B} T={T} D={D}")


# ---- the sliding window skips the keys outside it -----------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_numpy_blocks_compute_only_the_keys_in_the_window(causal):
    """Each block [t0, t1) of the NumPy reference starts at the window's lower edge for its first row,
    k0 = t0 + S - T - W + 1 (the keys below are never computed); causal, it computes at most W + block - 1
    keys (not S). The result equals the dense definition (formula)."""
    T, S, W = 300, 340, 20
    case = ((1, 1, 2, T, S, 8), causal, 0.4, "dense", "dense", W, None)
    q, k, v, g_out, scale, causal = make(case, np.float64, 2)
    spans = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(kattention, "_scores", lambda qs, k_, bias, t0, t1, k0, n, *rest, _f=kattention._scores, **kw:
                  spans.append((t0, k0, n)) or _f(qs, k_, bias, t0, t1, k0, n, *rest, **kw))
        ref = numpy_reference(q, k, v, g_out, scale, causal, **options(case))
    assert spans and all(k0 == t0 + S - T - W + 1 for t0, k0, n in spans), f"(t0, k0, n) per block: {spans}"
    if causal:
        assert max(n - k0 for _, k0, n in spans) <= W + kattention._BLOCK - 1, f"(t0, k0, n) per block: {spans}"
    want, tol = formula(q, k, v, g_out, scale, causal, np.float64, **options(case))
    for name, got in zip(["out", "lse", "dq", "dk", "dv"], ref):
        check(got, want[name], tol[name], f"window {W} causal={causal} {name}: NumPy vs the formula")


@needs_c
def test_c_window_makes_long_sequences_cheaper():
    """T = S = 2048, a window of 128: forward + backward in the C core take well under the time of the full
    causal attention (the keys outside the window are never computed; ~3x faster measured, 6.5x ideal)."""
    case = ((1, 1, 2, 2048, 2048, 64), True, None, "bthd", "bthd")
    q, k, v, g_out, scale, causal = make(case, np.float32, 4)
    kernels.set_num_threads(1)
    times = {}
    for window in (None, 128):
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            in_c(q, k, v, g_out, scale, causal, window=window)
            runs.append(time.perf_counter() - start)
        times[window] = min(runs)
    assert times[128] < 0.6 * times[None], f"window 128: {times[128]:.3f} s, full causal: {times[None]:.3f} s"


# ---- wrong calls are refused --------------------------------------------------------------------------------


def _arrays(B=2, Hq=4, Hkv=2, T=5, S=6, D=3, dtype=np.float64):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((B, Hq, T, D)).astype(dtype), rng.standard_normal((B, Hkv, S, D)).astype(dtype),
            rng.standard_normal((B, Hkv, S, D)).astype(dtype))


def _every_other(a, axis=-1):
    """a's values in a view with stride 2 along axis."""
    shape = list(a.shape)
    shape[axis] *= 2
    wide = np.zeros(shape, a.dtype)
    view = wide[(slice(None),) * (axis % a.ndim) + (slice(None, None, 2),)]
    view[...] = a
    return view


def _forward(q=None, k=None, v=None):
    """attention_forward with the arrays of _arrays() but those given."""
    q0, k0, v0 = _arrays()
    return kattention._attention_forward_c(q0 if q is None else q, k0 if k is None else k, v0 if v is None else v, 0.5,
                                     True)


def _backward(g_out=None, **kwargs):
    """attention_backward of a good forward call, with g_out (ones by default) and any of q, k, v, out, lse
    replaced."""
    q, k, v = _arrays()
    out, lse = kattention._attention_forward_c(q, k, v, 0.5, True)
    args = {"g_out": np.ones_like(q) if g_out is None else g_out, "q": q, "k": k, "v": v, "out": out, "lse": lse}
    args.update(kwargs)
    return kattention._attention_backward_c(args["g_out"], args["q"], args["k"], args["v"], args["out"], args["lse"],
                                      0.5, True)


REFUSALS = [
    # (description, call, error, words in the message)
    ("k strided", lambda: _forward(k=_every_other(_arrays()[1])), ValueError, ["k", "C-contiguous"]),
    ("v strided", lambda: _forward(v=_every_other(_arrays()[2], axis=2)), ValueError, ["v", "C-contiguous"]),
    ("k transposed", lambda: _forward(k=np.ascontiguousarray(_arrays()[1].transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)),
     ValueError, ["k", "C-contiguous"]),
    ("v float32", lambda: _forward(v=_arrays()[2].astype(np.float32)), TypeError, ["v", "float32"]),
    ("k and v float32", lambda: _forward(k=_arrays()[1].astype(np.float32), v=_arrays()[2].astype(np.float32)),
     TypeError, ["query", "float64", "key", "float32"]),
    ("int k, v", lambda: _forward(k=np.ones((2, 2, 6, 3), np.int64), v=np.ones((2, 2, 6, 3), np.int64)), TypeError,
     ["k", "int64"]),
    ("float16", lambda: _forward(*(a.astype(np.float16) for a in _arrays())), TypeError, ["q", "float16"]),
    ("int q", lambda: _forward(q=np.ones((2, 4, 5, 3), np.int64)), TypeError, ["query", "int64"]),
    ("q stride 2 along D", lambda: _forward(q=_every_other(_arrays()[0])), ValueError, ["unit stride", "last axis"]),
    ("q 3-D", lambda: _forward(q=_arrays()[0][0]), ValueError, ["(B, Hq, T, D)", "(4, 5, 3)"]),
    ("k 3-D", lambda: _forward(k=_arrays()[1][0], v=_arrays()[2][0]), ValueError, ["(B, Hkv, S, D)"]),
    ("v shape", lambda: _forward(v=_arrays()[2][:, :, :5].copy()), ValueError, ["value (2, 2, 5, 3)"]),
    ("B differs", lambda: _forward(q=_arrays()[0][:1]), ValueError, ["query (1, 4, 5, 3)", "key (2, 2, 6, 3)"]),
    ("D differs", lambda: _forward(q=np.ones((2, 4, 5, 4))), ValueError, ["query (2, 4, 5, 4)"]),
    ("Hq not a multiple of Hkv", lambda: _forward(q=np.ones((2, 3, 5, 3))), ValueError, ["multiple of Hkv"]),
    ("g_out shape", lambda: _backward(g_out=np.ones((2, 4, 5, 4))), ValueError, ["g_out", "(2, 4, 5, 4)",
                                                                                  "(2, 4, 5, 3)"]),
    ("g_out transposed shape", lambda: _backward(g_out=np.ones((2, 5, 4, 3))), ValueError, ["g_out", "(2, 5, 4, 3)"]),
    ("g_out stride 2 along D", lambda: _backward(g_out=_every_other(np.ones((2, 4, 5, 3)))), ValueError,
     ["unit stride"]),
    ("backward k strided", lambda: _backward(k=_every_other(_arrays()[1], axis=2)), ValueError, ["k", "C-contiguous"]),
    ("backward v float32", lambda: _backward(v=_arrays()[2].astype(np.float32)), TypeError, ["v", "float32"]),
    ("backward q stride 2", lambda: _backward(q=_every_other(_arrays()[0])), ValueError, ["unit stride"]),
]


BAD_OPTIONS = [({"sliding_window": 0}, "sliding_window"), ({"sliding_window": -3}, "sliding_window"),
               ({"sliding_window": 2.5}, "sliding_window"), ({"sliding_window": True}, "sliding_window"),
               ({"softcap": 0.0}, "softcap"), ({"softcap": -1.0}, "softcap"), ({"softcap": float("nan")}, "softcap"),
               ({"softcap": float("inf")}, "softcap"), ({"softcap": "30"}, "softcap")]


@pytest.mark.parametrize("backend", ["numpy", pytest.param("c", marks=needs_c)])
@pytest.mark.parametrize("bad, name", BAD_OPTIONS, ids=[f"{k}={v}" for (d, _) in BAD_OPTIONS for k, v in d.items()])
def test_sdpa_refuses_a_bad_window_or_cap(backend, bad, name):
    kernels.set_backend(backend)
    q, k, v = (Tensor(a) for a in _arrays())
    with pytest.raises(ValueError, match=name):
        F.scaled_dot_product_attention(q, k, v, is_causal=True, **bad)


@needs_c
@pytest.mark.parametrize("bad, name", BAD_OPTIONS[:3] + BAD_OPTIONS[4:8],
                         ids=[f"{k}={v}" for (d, _) in BAD_OPTIONS[:3] + BAD_OPTIONS[4:8] for k, v in d.items()])
def test_c_kernels_refuse_a_bad_window_or_cap(bad, name):
    q, k, v = _arrays()
    with pytest.raises(ValueError, match=name):
        kattention._attention_forward_c(q, k, v, 0.5, True, bad.get("sliding_window"), bad.get("softcap"))


@needs_c
@pytest.mark.parametrize("what, call, error, words", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_attention_rejects(what, call, error, words):
    with pytest.raises(error) as e:
        call()
    for w in words:  # as a word: "k" is not the k of "alike"
        assert re.search(rf"(?<!\w){re.escape(w)}(?!\w)", str(e.value)), f"{what}: {w!r} not in {str(e.value)!r}"


@needs_c
def test_k_of_another_dtype_is_named():
    with pytest.raises(TypeError) as e:
        _forward(k=_arrays()[1].astype(np.float32))
    assert re.search(r"\b(k|key)\b.*float32", str(e.value)), str(e.value)


def _reinterpretable(a, dtype):
    """An array of dtype holding a's values, the first a.size elements of a buffer twice as large (so that a
    kernel that reads it as float64 stays in bounds): the reproducers below must not read past an end."""
    buf = np.zeros(2 * a.size + 16, dtype)
    view = buf[:a.size].reshape(a.shape)
    view[...] = a
    return view


@needs_c
def test_backward_rejects_g_out_of_another_dtype():
    q, k, v = _arrays()
    g_out = _reinterpretable(np.ones_like(q), np.float32)
    out, lse = kattention._attention_forward_c(q, k, v, 0.5, True)
    try:
        dq, dk, dv = kattention._attention_backward_c(g_out, q, k, v, out, lse, 0.5, True)
    except TypeError as e:
        assert "g_out" in str(e) and "float32" in str(e)
        return
    raise AssertionError(f"no TypeError; dv[0, 0, :2] = {dv[0, 0, :2]} (float64 g_out of ones would give "
                         f"{kattention._attention_backward_c(np.ones_like(q), q, k, v, out, lse, 0.5, True)[2][0, 0, :2]})")


@needs_c
@pytest.mark.parametrize("bad", ["lse float32", "lse shape", "lse strided", "out strided"])
def test_backward_takes_or_refuses_unusual_out_and_lse(bad):
    """Refused with the argument named, or (a strided view holding the right values) the same gradients as
    with attention_forward's own arrays. The reproducers stay inside their buffers."""
    q, k, v = _arrays()
    out, lse = kattention._attention_forward_c(q, k, v, 0.5, False)
    g_out = np.ones_like(q)
    want = kattention._attention_backward_c(g_out, q, k, v, out, lse, 0.5, False)
    B, T, Hkv, g, D = out.shape
    if bad == "lse float32":
        lse = _reinterpretable(lse, np.float32)
    elif bad == "lse shape":      # (B, Hkv, T - 1, g): the first elements of the right lse
        lse = lse.reshape(-1)[:B * Hkv * (T - 1) * g].reshape(B, Hkv, T - 1, g)
    elif bad == "lse strided":
        lse = _every_other(lse)
    else:                         # (B, T, Hkv, g, D) as a view of (B, T, Hkv, g + 1, D): heads not mergeable
        wide = np.full((B, T, Hkv, g + 1, D), np.nan)
        wide[:, :, :, :g] = out
        out = wide[:, :, :, :g]
    try:
        got = kattention._attention_backward_c(g_out, q, k, v, out, lse, 0.5, False)
    except (TypeError, ValueError) as e:
        assert bad.split()[0] in str(e), f"{bad}: refused without naming it: {e}"
        return
    assert bad not in ("lse float32", "lse shape"), f"{bad}: accepted"
    for name, a, b in zip(["dq", "dk", "dv"], got, want):
        assert np.array_equal(a, b), f"{bad}: accepted, and {name} differs"
