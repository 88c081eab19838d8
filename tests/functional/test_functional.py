"""Properties of every op in lora_np.functional, over shapes, axes and broadcasting drawn
by hypothesis:

- the gradient of a random scalar function of the output, L = Σ out·R with R random,
  equals central finite differences in float64 (bound below, `check_grad`);
- the forward equals a direct NumPy formula;
- float32 agrees with float64 within float32 tolerance, values and gradients;
- under `no_grad` no graph is built.

Each op is a `Case`: a function of Tensors, its input arrays (drawn in float64), which of
them to differentiate, and the NumPy reference. The four properties run over every case.

Finite-difference bound. The derivative along a direction V (a unit vector per element, or
a random direction for module parameters) is estimated with the fourth-order central stencil
N = [8(L(x+eV) − L(x−eV)) − (L(x+2eV) − L(x−2eV))] / 12e with e = 1e-6. Its truncation
error is ≤ e⁴/30·|L⁽⁵⁾| ≈ 3e-26·|L⁽⁵⁾|, negligible even where a normalisation over two
elements makes each derivative ~1/√eps_norm ≈ 300 times the last (there the two-point
stencil's e²/6·|L⁽³⁾| is not negligible). Its rounding error is ≤ (18/12)·k·u·S/e with
u = 1.1e-16, S = Σ|out·R| the magnitude of the summed terms and k ≤ 100 rounding steps
per element for our ops: 1.7e-8·S. The check is therefore
|analytic − numeric| ≤ 1e-6·|numeric| + 2e-8·(1 + S): a wrong factor, a missing broadcast
reduction or a transposed gradient is off by O(1) and always fails.
"""
import math
from dataclasses import dataclass
import operator
from typing import Callable, Optional

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import assert_close, check_grad, f32_tolerance, np_attention, np_softmax as _np_softmax, spread_rows
from lora_np import Tensor, no_grad
from lora_np import functional as F



@dataclass
class Case:
    fn: Callable                 # Tensors (and fixed extras) -> Tensor
    inputs: list                 # float64 arrays (and integer arrays / fixed extras)
    grad_of: tuple               # indices of the float inputs to differentiate
    ref: Callable                # same inputs as ndarrays -> expected ndarray
    torch: Optional[Callable] = None  # (torch module, *torch tensors) -> tensor, for the cross-check

    def __post_init__(self):  # NumPy scalars (0-d draws) become 0-d arrays
        self.inputs = [np.asarray(a) if isinstance(a, np.generic) else a for a in self.inputs]


def _rng(data):
    return np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))


def _normal(rng, shape):
    return rng.standard_normal(shape)


def _away_from_zero(rng, shape, lo=0.5, hi=2.0):
    return rng.uniform(lo, hi, shape) * rng.choice([-1.0, 1.0], shape)


def _shape(data, min_dims=0, max_dims=3, min_side=1, max_side=4):
    return data.draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side),
                     label="shape")


def _dim(data, ndim):
    return data.draw(st.integers(-ndim, ndim - 1), label="dim")



def _np_rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x)


# -- the cases ----------------------------------------------------------------------------------
def _binary(op, npop, positive_b=False, positive_a=False):
    name = op.__name__

    def draw(data):
        rng = _rng(data)
        sa, sb = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3), label="shapes").input_shapes
        a = rng.uniform(0.5, 2.0, sa) if positive_a else _normal(rng, sa)
        b = (rng.uniform(0.5, 2.0, sb) if positive_a else _away_from_zero(rng, sb)) if positive_b else _normal(rng, sb)
        return Case(op, [a, b], (0, 1), npop, lambda T, a, b: getattr(T, name)(a, b))
    return draw


def _with_scalar(op, npop, pyop):
    """The op with a Python scalar on either side (scalars take the tensor's dtype)."""
    def draw(data):
        rng = _rng(data)
        a = _away_from_zero(rng, _shape(data))
        c = data.draw(st.sampled_from([-1.5, 0.5, 2.0, 3]), label="scalar")
        if data.draw(st.booleans(), label="scalar_first"):
            return Case(lambda x: op(c, x), [a], (0,), lambda x: npop(c, x), lambda T, x: pyop(c, x))
        return Case(lambda x: op(x, c), [a], (0,), lambda x: npop(x, c), lambda T, x: pyop(x, c))
    return draw


def _unary(op, npop, domain="real", torch=None):
    def draw(data):
        rng = _rng(data)
        shape = _shape(data)
        x = {"real": _normal, "positive": lambda r, s: r.uniform(0.3, 3.0, s),
             "nonzero": _away_from_zero}[domain](rng, shape)
        return Case(op, [x], (0,), npop, torch)
    return draw


def _matmul(data):
    rng = _rng(data)
    kind = data.draw(st.sampled_from(["2d", "batched", "vec-mat", "mat-vec", "vec-vec"]), label="kind")
    n, k, m = (data.draw(st.integers(1, 4)) for _ in range(3))
    if kind == "2d":
        sa, sb = (n, k), (k, m)
    elif kind == "batched":
        ba, bb = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=1, max_dims=2, max_side=3),
                           label="batch").input_shapes
        sa, sb = ba + (n, k), bb + (k, m)
    elif kind == "vec-mat":
        sa, sb = (k,), data.draw(st.sampled_from([(k, m), (2, k, m)]))
    elif kind == "mat-vec":
        sa, sb = data.draw(st.sampled_from([(n, k), (2, n, k)])), (k,)
    else:
        sa, sb = (k,), (k,)
    return Case(F.matmul, [_normal(rng, sa), _normal(rng, sb)], (0, 1), np.matmul, lambda T, a, b: T.matmul(a, b))


def _linear(data):
    rng = _rng(data)
    lead = _shape(data, 0, 2)
    i, o = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    x, w = _normal(rng, lead + (i,)), _normal(rng, (o, i))
    if data.draw(st.booleans(), label="bias"):
        return Case(F.linear, [x, w, _normal(rng, (o,))], (0, 1, 2), lambda x, w, b: x @ w.T + b,
                    lambda T, x, w, b: T.nn.functional.linear(x, w, b))
    return Case(F.linear, [x, w], (0, 1), lambda x, w: x @ w.T, lambda T, x, w: T.nn.functional.linear(x, w))


def _reduction(op, npop, torch_name):
    def draw(data):
        rng = _rng(data)
        shape = _shape(data, 1)
        dim = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1),
                                  hnp.valid_tuple_axes(len(shape), min_size=1)), label="dim")
        keepdim = data.draw(st.booleans(), label="keepdim")
        axis = dim if dim is None or isinstance(dim, int) else tuple(dim)
        tdim = tuple(range(len(shape))) if dim is None else dim
        return Case(lambda x: op(x, dim, keepdim), [_normal(rng, shape)], (0,),
                    lambda x: np.asarray(npop(x, axis=axis, keepdims=keepdim)),
                    lambda T, x: getattr(T, torch_name)(x, dim=tdim, keepdim=keepdim))
    return draw


def _reshape(data):
    rng = _rng(data)
    shape = _shape(data, 1)
    new = list(data.draw(st.permutations(shape), label="perm_shape"))
    if data.draw(st.booleans(), label="minus_one"):
        new[data.draw(st.integers(0, len(new) - 1))] = -1
    return Case(lambda x: F.reshape(x, new), [_normal(rng, shape)], (0,), lambda x: x.reshape(new),
                lambda T, x: T.reshape(x, new))


def _transpose(data):
    rng = _rng(data)
    shape = _shape(data, 1)
    d0, d1 = _dim(data, len(shape)), _dim(data, len(shape))
    return Case(lambda x: F.transpose(x, d0, d1), [_normal(rng, shape)], (0,), lambda x: np.swapaxes(x, d0, d1),
                lambda T, x: T.transpose(x, d0, d1))


def _permute(data):
    rng = _rng(data)
    shape = _shape(data, 1)
    perm = data.draw(st.permutations(range(len(shape))), label="perm")
    return Case(lambda x: F.permute(x, perm), [_normal(rng, shape)], (0,), lambda x: np.transpose(x, perm),
                lambda T, x: T.permute(x, perm))


def _unsqueeze(data):
    rng = _rng(data)
    shape = _shape(data)
    d = data.draw(st.integers(-len(shape) - 1, len(shape)), label="dim")
    return Case(lambda x: F.unsqueeze(x, d), [_normal(rng, shape)], (0,), lambda x: np.expand_dims(x, d),
                lambda T, x: T.unsqueeze(x, d))


def _squeeze(data):
    rng = _rng(data)
    shape = _shape(data, 1, max_side=2)
    d = data.draw(st.one_of(st.none(), st.integers(-len(shape), len(shape) - 1)), label="dim")

    def ref(x):
        if d is None:
            return np.squeeze(x)
        return np.squeeze(x, d) if x.shape[d] == 1 else x
    return Case(lambda x: F.squeeze(x, d), [_normal(rng, shape)], (0,), ref,
                lambda T, x: T.squeeze(x) if d is None else T.squeeze(x, d))


def _getitem_basic(data):
    rng = _rng(data)
    shape = _shape(data, 1)
    index = data.draw(hnp.basic_indices(shape, allow_newaxis=True), label="index")
    items = index if isinstance(index, tuple) else (index,)
    reverses = any(isinstance(i, slice) and (i.step or 1) < 0 for i in items)  # torch has no negative steps
    return Case(lambda x: x[index], [_normal(rng, shape)], (0,), lambda x: np.asarray(x[index]),
                None if reverses else (lambda T, x: x[index]))


def _getitem_advanced(data):
    rng = _rng(data)
    shape = _shape(data, 1)
    idx = data.draw(hnp.arrays(np.int64, data.draw(st.integers(1, 5)), elements=st.integers(-shape[0], shape[0] - 1)),
                    label="indices")  # repeats allowed: their gradients must add up
    return Case(lambda x: x[Tensor(idx)], [_normal(rng, shape)], (0,), lambda x: x[idx],
                lambda T, x: x[T.from_numpy(idx)])


def _cat(data):
    rng = _rng(data)
    shape = _shape(data, 1)
    dim = _dim(data, len(shape))
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3), label="sizes")
    arrays = []
    for s in sizes:
        sh = list(shape)
        sh[dim] = s
        arrays.append(_normal(rng, tuple(sh)))
    n = len(arrays)
    return Case(lambda *xs: F.cat(list(xs), dim), arrays, tuple(range(n)), lambda *xs: np.concatenate(xs, dim),
                lambda T, *xs: T.cat(xs, dim))


def _stack(data):
    rng = _rng(data)
    shape = _shape(data)
    n = data.draw(st.integers(1, 3), label="n")
    dim = data.draw(st.integers(-len(shape) - 1, len(shape)), label="dim")
    arrays = [_normal(rng, shape) for _ in range(n)]
    return Case(lambda *xs: F.stack(list(xs), dim), arrays, tuple(range(n)), lambda *xs: np.stack(xs, dim),
                lambda T, *xs: T.stack(xs, dim))


def _split(data):
    rng = _rng(data)
    shape = _shape(data, 1, max_side=5)
    dim = _dim(data, len(shape))
    n = shape[dim]
    if data.draw(st.booleans(), label="by_size"):
        arg = data.draw(st.integers(1, n), label="size")
        bounds = list(range(arg, n, arg))
    else:
        cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=3), label="cuts"))
        arg = list(np.diff([0] + cuts + [n]))
        bounds = list(np.cumsum(arg)[:-1])
    # a random weighting of the pieces makes every piece reach L
    ws = [1.0 + i for i in range(len(bounds) + 1)]
    fn = lambda x: F.cat([p * w for p, w in zip(F.split(x, arg, dim), ws)], dim)  # noqa: E731
    ref = lambda x: np.concatenate([p * w for p, w in zip(np.split(x, bounds, dim), ws)], dim)  # noqa: E731
    tfn = lambda T, x: T.cat([p * w for p, w in zip(T.split(x, arg, dim), ws)], dim)  # noqa: E731
    return Case(fn, [_normal(rng, shape)], (0,), ref, tfn)


def _where(data):
    rng = _rng(data)
    sc, sa, sb = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=3, max_dims=3, max_side=3),
                           label="shapes").input_shapes
    cond = np.asarray(rng.random(sc) < 0.5)
    return Case(lambda a, b: F.where(cond, a, b), [_normal(rng, sa), _normal(rng, sb)], (0, 1),
                lambda a, b: np.where(cond, a, b), lambda T, a, b: T.where(T.from_numpy(cond), a, b))


def _masked_fill(data):
    rng = _rng(data)
    sx, sm = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3),
                       label="shapes").input_shapes
    shape = np.broadcast_shapes(sx, sm)
    x = _normal(rng, shape)
    mask = np.asarray(rng.random(sm) < 0.5)
    value = data.draw(st.sampled_from([0.0, -1e9, 2.5]), label="value")
    return Case(lambda x: F.masked_fill(x, Tensor(mask), value), [x], (0,), lambda x: np.where(mask, value, x),
                lambda T, x: x.masked_fill(T.from_numpy(mask), value))


def _embedding(data):
    rng = _rng(data)
    num, dim = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 3))
    ids = rng.integers(0, num, _shape(data, 0, 2))  # repeated ids: scatter-add must accumulate
    return Case(lambda w: F.embedding(ids, w), [_normal(rng, (num, dim))], (0,), lambda w: w[ids],
                lambda T, w: T.nn.functional.embedding(T.from_numpy(ids), w))


def _softmax_like(op, npop, torch_name):
    def draw(data):
        rng = _rng(data)
        shape = _shape(data, 1)
        dim = _dim(data, len(shape))
        return Case(lambda x: op(x, dim), [2 * _normal(rng, shape)], (0,), lambda x: npop(x, dim),
                    lambda T, x: getattr(T, torch_name)(x, dim))
    return draw


def _cross_entropy(data):
    rng = _rng(data)
    n, c = data.draw(st.integers(1, 5), label="N"), data.draw(st.integers(1, 5), label="C")
    extra = tuple(data.draw(st.lists(st.integers(1, 3), max_size=1), label="d"))
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    target = rng.integers(0, c, (n,) + extra)
    ignored = rng.random(target.shape) < 0.3
    if reduction == "mean":
        ignored.flat[0] = False  # at least one counted target, else the mean is NaN (as in torch)
    target[ignored] = -100
    logits = 2 * _normal(rng, (n, c) + extra)

    def ref(x):
        logp = x - x.max(1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
        safe = np.where(target == -100, 0, target)
        nll = -np.take_along_axis(logp, safe[:, None], 1)[:, 0] * (target != -100)
        return {"none": nll, "sum": nll.sum(), "mean": nll.sum() / (target != -100).sum()}[reduction]
    return Case(lambda x: F.cross_entropy(x, target, reduction=reduction), [logits], (0,), ref,
                lambda T, x: T.nn.functional.cross_entropy(x, T.from_numpy(target), reduction=reduction))


def _layer_norm(data):
    rng = _rng(data)
    shape = _shape(data, 1)
    k = data.draw(st.integers(1, min(2, len(shape))), label="norm_dims")
    ns = shape[-k:]
    eps = data.draw(st.sampled_from([1e-5, 1e-2]), label="eps")
    affine = data.draw(st.sampled_from(["none", "weight", "both"]), label="affine")
    x = spread_rows(rng, shape, k)
    axes = tuple(range(len(shape) - k, len(shape)))

    def norm(x):
        mu = x.mean(axes, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(axes, keepdims=True) + eps)
    tfn = lambda T, x, w=None, b=None: T.nn.functional.layer_norm(x, ns, w, b, eps)  # noqa: E731
    if affine == "none":
        return Case(lambda x: F.layer_norm(x, ns, eps=eps), [x], (0,), norm, tfn)
    w = _normal(rng, ns)
    if affine == "weight":
        return Case(lambda x, w: F.layer_norm(x, ns, w, eps=eps), [x, w], (0, 1), lambda x, w: norm(x) * w, tfn)
    return Case(lambda x, w, b: F.layer_norm(x, ns, w, b, eps=eps), [x, w, _normal(rng, ns)], (0, 1, 2),
                lambda x, w, b: norm(x) * w + b, tfn)


def _rms_norm(data):
    rng = _rng(data)
    shape = _shape(data, 1)
    eps = data.draw(st.sampled_from([1e-5, 1e-2]), label="eps")
    x = spread_rows(rng, shape)
    norm = lambda x: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)  # noqa: E731
    tfn = lambda T, x, w=None: T.nn.functional.rms_norm(x, shape[-1:], w, eps)  # noqa: E731
    if data.draw(st.booleans(), label="weight"):
        return Case(lambda x, w: F.rms_norm(x, (shape[-1],), w, eps), [x, _normal(rng, shape[-1:])], (0, 1),
                    lambda x, w: norm(x) * w, tfn)
    return Case(lambda x: F.rms_norm(x, shape[-1], eps=eps), [x], (0,), norm, tfn)


def _dropout(data):
    rng = _rng(data)
    shape = _shape(data)
    p = data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]), label="p")
    seed = data.draw(st.integers(0, 1000), label="dropout_seed")

    def fn(x):  # a fresh generator with the same seed gives the same mask every call
        return F.dropout(x, p, training=True, generator=np.random.default_rng(seed))

    def ref(x):  # documented rule: keep where U >= p (U uniform float32 from the generator), scale 1/(1-p)
        if p == 0:
            return x
        keep = np.random.default_rng(seed).random(x.shape, dtype=np.float32) >= p
        return x * keep * (1 / (1 - p))
    return Case(fn, [_normal(rng, shape)], (0,), ref)


def _rotary(data):
    rng = _rng(data)
    B, H, T = (data.draw(st.integers(1, 3)) for _ in range(3))
    D = 2 * data.draw(st.integers(1, 3), label="half")
    x = _normal(rng, (B, H, T, D))
    if data.draw(st.booleans(), label="rope_tables"):
        cos, sin = F.rope_cos_sin(np.arange(T), D, 10000.0, np.float64)
    else:  # general tables: the two halves of cos/sin differ, so the transpose must pair them right
        cos, sin = _normal(rng, (T, D)), _normal(rng, (T, D))
    return Case(lambda x: F.rotary_embedding(x, cos, sin), [x], (0,),
                lambda x: x * cos + _np_rotate_half(x) * sin)


def _rotate_half(data):
    rng = _rng(data)
    shape = _shape(data, 0, 2) + (2 * data.draw(st.integers(1, 3)),)
    return Case(F.rotate_half, [_normal(rng, shape)], (0,), _np_rotate_half)


def _sdpa(data):
    rng = _rng(data)
    B, Hkv, g = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    L = data.draw(st.integers(1, 4), label="L")
    S = data.draw(st.integers(L, 5), label="S")  # S >= L: no query row is fully masked
    D = data.draw(st.integers(1, 3), label="D")
    is_causal = data.draw(st.booleans(), label="is_causal")
    kind = data.draw(st.sampled_from(["none", "bool", "float"]), label="mask")
    scale = data.draw(st.sampled_from([None, 0.3]), label="scale")
    mshape = data.draw(st.sampled_from([(L, S), (B, 1, L, S), (1, Hkv * g, L, S), (B, Hkv * g, 1, S)]), label="mshape")
    mask = None
    if kind == "bool":
        mask = rng.random(mshape) < 0.7
        mask[..., 0] = True  # each row keeps key 0 (visible under the causal mask too)
    elif kind == "float":
        mask = _normal(rng, mshape)
    q, k, v = _normal(rng, (B, Hkv * g, L, D)), _normal(rng, (B, Hkv, S, D)), _normal(rng, (B, Hkv, S, D))
    fn = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, None if mask is None else (Tensor(mask) if mask.dtype == bool else Tensor(mask.astype(q.dtype))),
        is_causal=is_causal, scale=scale)

    def tfn(T, q, k, v):  # torch aligns a causal mask top-left and refuses it with attn_mask: pass one mask
        sdpa = T.nn.functional.scaled_dot_product_attention
        if mask is None and (not is_causal or L == S):
            return sdpa(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=True)
        m = None if mask is None else T.from_numpy(mask)
        if is_causal:
            tri = T.from_numpy(np.tri(L, S, S - L, dtype=bool))
            m = tri if m is None else (m & tri if m.dtype == T.bool else m.masked_fill(~tri, -math.inf))
        return sdpa(q, k, v, attn_mask=m, scale=scale, enable_gqa=True)
    return Case(fn, [q, k, v], (0, 1, 2), lambda q, k, v: np_attention(q, k, v, mask, is_causal, scale), tfn)


def _rotary_partial(data):
    """Partial rotary (transformers' Phi-3 / GPT-NeoX): tables of rd < D dims rotate x[..., :rd] (rotate-half
    within them) and pass x[..., rd:] through."""
    rng = _rng(data)
    B, H, T = (data.draw(st.integers(1, 3)) for _ in range(3))
    rd = 2 * data.draw(st.integers(0, 3), label="rd / 2")
    D = rd + data.draw(st.integers(1, 4), label="D - rd")
    x = _normal(rng, (B, H, T, D))
    cos, sin = _normal(rng, (T, rd)), _normal(rng, (T, rd))

    def ref(x):
        return np.concatenate([x[..., :rd] * cos + _np_rotate_half(x[..., :rd]) * sin, x[..., rd:]], -1)

    def tfn(T_, x):  # transformers' phi3 apply_rotary_pos_emb, written out
        c, s_ = T_.from_numpy(cos), T_.from_numpy(sin)
        rot, keep = x[..., :rd], x[..., rd:]
        half = rd // 2
        return T_.cat([rot * c + T_.cat([-rot[..., half:], rot[..., :half]], -1) * s_, keep], -1)
    return Case(lambda x: F.rotary_embedding(x, cos, sin), [x], (0,), ref, tfn)


def _np_attention_window_softcap(q, k, v, mask, is_causal, scale, window, softcap):
    """Dense reference: scaled scores, capped c·tanh(s/c), then the mask, the causal limit (s <= p) and the
    window (s > p - W), query t at position p = t + S - T."""
    B, Hq, T, D = q.shape
    S, g = k.shape[2], Hq // k.shape[1]
    s = q @ np.swapaxes(np.repeat(k, g, 1), -1, -2) * (scale if scale is not None else 1 / math.sqrt(D))
    if softcap is not None:
        s = softcap * np.tanh(s / softcap)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    p = np.arange(T)[:, None] + S - T
    seen = (np.arange(S)[None, :] <= p) | (not is_causal)
    if window is not None:
        seen = seen & (np.arange(S)[None, :] > p - window)
    return _np_softmax(np.where(seen, s, -np.inf), -1) @ np.repeat(v, g, 1)


def _sdpa_window_softcap(data):
    """SDPA with a sliding window and / or a soft cap, with and without a mask (the NumPy path then)."""
    rng = _rng(data)
    B, Hkv, g = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 2))
    L = data.draw(st.integers(1, 5), label="L")
    S = data.draw(st.integers(L, 7), label="S")  # S >= L; each row sees itself (kept by the mask too)
    D = data.draw(st.integers(1, 3), label="D")
    is_causal = data.draw(st.booleans(), label="is_causal")
    window = data.draw(st.one_of(st.none(), st.integers(1, 6)), label="sliding_window")
    softcap = data.draw(st.one_of(st.none(), st.sampled_from([0.5, 2.0, 30.0])), label="softcap")
    kind = data.draw(st.sampled_from(["none", "bool", "float"]), label="mask")
    scale = data.draw(st.sampled_from([None, 0.7]), label="scale")
    mshape = data.draw(st.sampled_from([(L, S), (B, 1, L, S), (1, Hkv * g, L, S)]), label="mshape")
    mask = None
    if kind == "bool":
        mask = rng.random(mshape) < 0.7
        mask[..., np.arange(L), np.arange(L) + S - L] = True  # the row's own position: inside any window
    elif kind == "float":
        mask = _normal(rng, mshape)
    q, k, v = 2 * _normal(rng, (B, Hkv * g, L, D)), 2 * _normal(rng, (B, Hkv, S, D)), _normal(rng, (B, Hkv, S, D))
    fn = lambda q, k, v: F.scaled_dot_product_attention(  # noqa: E731
        q, k, v, None if mask is None else (Tensor(mask) if mask.dtype == bool else Tensor(mask.astype(q.dtype))),
        is_causal=is_causal, scale=scale, sliding_window=window, softcap=softcap)

    def tfn(T_, q, k, v):  # transformers' eager attention: scores, cap, mask, softmax
        s = q @ k.repeat_interleave(g, 1).transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(D))
        if softcap is not None:
            s = T_.tanh(s / softcap) * softcap
        if mask is not None:
            m = T_.from_numpy(mask)
            s = s.masked_fill(~m, -math.inf) if m.dtype == T_.bool else s + m
        p = np.arange(L)[:, None] + S - L
        seen = (np.arange(S)[None, :] <= p) | (not is_causal)
        if window is not None:
            seen = seen & (np.arange(S)[None, :] > p - window)
        s = s.masked_fill(~T_.from_numpy(seen), -math.inf)
        return T_.softmax(s, -1) @ v.repeat_interleave(g, 1)
    return Case(fn, [q, k, v], (0, 1, 2),
                lambda q, k, v: _np_attention_window_softcap(q, k, v, mask, is_causal, scale, window, softcap), tfn)


def _lm_head_loss_softcap(data):
    """The chunked LM-head loss with final-logit soft-capping: mean cross-entropy of c·tanh(h Wᵀ / c)."""
    rng = _rng(data)
    B, T, C, V = data.draw(st.integers(1, 2)), data.draw(st.integers(2, 5)), data.draw(st.integers(1, 4)), \
        data.draw(st.integers(2, 6))
    softcap = data.draw(st.sampled_from([0.5, 3.0, 30.0]), label="softcap")
    labels = rng.integers(0, V, (B, T))
    labels[rng.random((B, T)) < 0.3] = -100
    labels[0, 1] = rng.integers(0, V)  # at least one target
    h, w = 2 * _normal(rng, (B, T, C)), _normal(rng, (V, C))

    def ref(h, w):
        z = softcap * np.tanh(h @ w.T / softcap)[:, :-1].reshape(-1, V)
        t = labels[:, 1:].reshape(-1)
        keep = t != -100
        z, t = z[keep], t[keep]
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        return np.asarray((lse - z[np.arange(len(t)), t]).mean())

    def tfn(T_, h, w):  # transformers' Gemma 2: logits / cap, tanh, * cap, then the shifted loss
        z = T_.tanh((h @ w.T) / softcap) * softcap
        return T_.nn.functional.cross_entropy(z[:, :-1].reshape(-1, V), T_.from_numpy(labels[:, 1:].reshape(-1)),
                                              ignore_index=-100)
    return Case(lambda h, w: F.causal_lm_head_loss(h, w, labels, softcap=softcap), [h, w], (0, 1), ref, tfn)


def _silu_mul(data):
    rng = _rng(data)
    shape = _shape(data)
    silu = lambda a: a / (1 + np.exp(-a))  # noqa: E731
    return Case(F.silu_mul, [2 * _normal(rng, shape), _normal(rng, shape)], (0, 1), lambda a, b: silu(a) * b,
                lambda T, a, b: T.nn.functional.silu(a) * b)


def _pow_scalar(data):
    rng = _rng(data)
    e = data.draw(st.sampled_from([2.0, 3, 0.5, -1.5]), label="exponent")
    return Case(lambda x: F.pow(x, e), [rng.uniform(0.5, 2.0, _shape(data))], (0,), lambda x: x ** e,
                lambda T, x: T.pow(x, e))


CASES = {
    "add": _binary(F.add, np.add),
    "sub": _binary(F.sub, np.subtract),
    "mul": _binary(F.mul, np.multiply),
    "div": _binary(F.div, np.divide, positive_b=True),
    "pow": _binary(F.pow, np.power, positive_a=True, positive_b=True),
    "pow_scalar": _pow_scalar,
    "add_scalar": _with_scalar(F.add, np.add, operator.add),
    "sub_scalar": _with_scalar(F.sub, np.subtract, operator.sub),
    "mul_scalar": _with_scalar(F.mul, np.multiply, operator.mul),
    "div_scalar": _with_scalar(F.div, np.divide, operator.truediv),
    "neg": _unary(F.neg, np.negative, torch=lambda T, x: T.neg(x)),
    "matmul": _matmul,
    "linear": _linear,
    "exp": _unary(F.exp, np.exp, torch=lambda T, x: T.exp(x)),
    "log": _unary(F.log, np.log, "positive", torch=lambda T, x: T.log(x)),
    "sqrt": _unary(F.sqrt, np.sqrt, "positive", torch=lambda T, x: T.sqrt(x)),
    "tanh": _unary(F.tanh, np.tanh, torch=lambda T, x: T.tanh(x)),
    "sigmoid": _unary(F.sigmoid, lambda x: 1 / (1 + np.exp(-x)), torch=lambda T, x: T.sigmoid(x)),
    "relu": _unary(F.relu, lambda x: np.maximum(x, 0), "nonzero", torch=lambda T, x: T.relu(x)),
    "silu": _unary(F.silu, lambda x: x / (1 + np.exp(-x)), torch=lambda T, x: T.nn.functional.silu(x)),
    "silu_mul": _silu_mul,
    "gelu": _unary(F.gelu, lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2))),
                   torch=lambda T, x: T.nn.functional.gelu(x)),
    "gelu_tanh": _unary(lambda x: F.gelu(x, approximate="tanh"),
                        lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
                        torch=lambda T, x: T.nn.functional.gelu(x, approximate="tanh")),
    "sum": _reduction(F.sum, np.sum, "sum"),
    "mean": _reduction(F.mean, np.mean, "mean"),
    "max": _reduction(F.max, np.max, "amax"),
    "reshape": _reshape,
    "transpose": _transpose,
    "permute": _permute,
    "unsqueeze": _unsqueeze,
    "squeeze": _squeeze,
    "getitem_basic": _getitem_basic,
    "getitem_advanced": _getitem_advanced,
    "cat": _cat,
    "stack": _stack,
    "split": _split,
    "where": _where,
    "masked_fill": _masked_fill,
    "embedding": _embedding,
    "softmax": _softmax_like(F.softmax, _np_softmax, "softmax"),
    "log_softmax": _softmax_like(F.log_softmax, lambda x, d: np.log(_np_softmax(x, d)), "log_softmax"),
    "cross_entropy": _cross_entropy,
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "dropout": _dropout,
    "rotary_embedding": _rotary,
    "rotary_embedding_partial": _rotary_partial,
    "rotate_half": _rotate_half,
    "scaled_dot_product_attention": _sdpa,
    "scaled_dot_product_attention_window_softcap": _sdpa_window_softcap,
    "causal_lm_head_loss_softcap": _lm_head_loss_softcap,
}


def _as(arrays, dtype):
    return [a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a for a in arrays]


# -- the properties -----------------------------------------------------------------------------
@pytest.mark.parametrize("op", sorted(CASES))
@given(data=st.data())
def test_gradient_equals_central_differences(op, data):
    case = CASES[op](data)
    check_grad(case.fn, case.inputs, case.grad_of, np.random.default_rng(0), name=op)


@pytest.mark.parametrize("op", sorted(CASES))
@given(data=st.data())
def test_forward_equals_numpy_formula(op, data):
    case = CASES[op](data)
    out = case.fn(*[Tensor(a) if isinstance(a, np.ndarray) else a for a in case.inputs])
    expected = np.asarray(case.ref(*case.inputs))
    assert out.dtype == np.float64, f"{op}: float64 in, {out.dtype} out"
    assert_close(out.data, expected, 1e-12, 1e-12, name=op)


@pytest.mark.parametrize("op", sorted(CASES))
@given(data=st.data())
def test_float32_agrees_with_float64(op, data):
    case = CASES[op](data)
    results = {}
    for dtype in (np.float32, np.float64):
        arrays = _as(case.inputs, dtype)
        tensors = [Tensor(a, requires_grad=(i in case.grad_of)) for i, a in enumerate(arrays)]
        out = case.fn(*tensors)
        assert out.dtype == dtype, f"{op}: {np.dtype(dtype)} in, {out.dtype} out"
        out.backward(np.ones(out.shape, dtype))
        results[dtype] = out.data, [tensors[i].grad for i in case.grad_of]
    out32, grads32 = results[np.float32]
    out64, grads64 = results[np.float64]
    assert_close(out32, out64, *f32_tolerance(out64), name=f"{op} float32 output")
    for i, g32, g64 in zip(case.grad_of, grads32, grads64):
        assert g32.dtype == np.float32, f"{op}: float32 input {i} got a {g32.dtype} gradient"
        assert_close(g32, g64, *f32_tolerance(g64), name=f"{op} float32 gradient of input {i}")


@pytest.mark.parametrize("op", sorted(CASES))
@given(data=st.data())
def test_no_grad_builds_no_graph(op, data):
    case = CASES[op](data)
    tensors = [Tensor(a, requires_grad=(i in case.grad_of)) for i, a in enumerate(case.inputs)]
    with no_grad():
        out = case.fn(*tensors)
    if any(out is t for t in tensors):  # an identity (dropout with p=0) returns its input: no node at all
        return
    assert out._ctx is None and not out.requires_grad, f"{op} recorded a graph under no_grad"
    out = case.fn(*tensors)
    assert out._ctx is not None and out.requires_grad, f"{op} recorded no graph with grad enabled"


# -- op-specific properties -------------------------------------------------------------------
@given(data=st.data())
def test_sigmoid_silu_stable_at_extreme_inputs(data):
    x = np.array(data.draw(st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=8)), np.float32)
    with np.errstate(all="raise", under="ignore"):  # no overflow / invalid warnings; underflow is exact here
        s = F.sigmoid(Tensor(x)).data
        y = F.silu(Tensor(x)).data
    exact = 1 / (1 + np.exp(-x.astype(np.float64).clip(-700, 700)))
    assert np.all((s >= 0) & (s <= 1))
    assert_close(s, exact, 1e-6, 1e-30, name="sigmoid")
    assert_close(y, x.astype(np.float64) * exact, 1e-6, 1e-30, name="silu")


def test_softmax_and_cross_entropy_stable_for_huge_logits():
    x = Tensor(np.array([[1e4, 0.0, -1e4], [3e38, 3e38, 0.0]], np.float32), requires_grad=True)
    p = F.softmax(x, -1).data
    assert_close(p, np.array([[1, 0, 0], [0.5, 0.5, 0]]), 1e-6, 1e-30, name="softmax")
    loss = F.cross_entropy(x, np.array([0, 2]))
    assert np.isfinite(loss.item())
    loss.backward()
    assert np.isfinite(x.grad).all()


def test_cross_entropy_all_ignored_mean_is_nan_like_torch():
    loss = F.cross_entropy(Tensor(np.zeros((2, 3))), np.array([-100, -100]))
    assert np.isnan(loss.item())


def test_attention_fully_masked_row_gives_zero():
    rng = np.random.default_rng(0)
    q, k, v = (Tensor(rng.standard_normal((1, 2, 3, 4)), requires_grad=True) for _ in range(3))
    mask = np.ones((3, 3), bool)
    mask[1] = False
    out = F.scaled_dot_product_attention(q, k, v, Tensor(mask))
    assert np.all(out.data[:, :, 1] == 0) and np.isfinite(out.data).all()
    out.backward(np.ones(out.shape))
    assert all(np.isfinite(t.grad).all() for t in (q, k, v))


def test_attention_causal_with_cache_is_bottom_right_aligned():
    """A query block of T rows after S - T cached keys sees keys up to its own position."""
    rng = np.random.default_rng(1)
    q, k, v = rng.standard_normal((1, 2, 5, 3)), rng.standard_normal((1, 2, 5, 3)), rng.standard_normal((1, 2, 5, 3))
    full = F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), is_causal=True).data
    tail = F.scaled_dot_product_attention(Tensor(q[:, :, 3:]), Tensor(k), Tensor(v), is_causal=True).data
    assert_close(tail, full[:, :, 3:], 1e-12, 1e-12, name="cached causal attention")


def test_dropout_identity_in_eval_and_scaled_in_training():
    x = Tensor(np.ones(10000, np.float32), requires_grad=True)
    assert F.dropout(x, 0.3, training=False) is x
    y = F.dropout(x, 0.3, generator=np.random.default_rng(0)).data
    kept = y != 0
    assert_close(y[kept], np.full(kept.sum(), 1 / 0.7), 1e-6, name="kept elements")
    assert abs(kept.mean() - 0.7) < 0.02  # 4.4 standard deviations of a Binomial(10000, 0.7) mean
    with pytest.raises(ValueError, match="dropout"):
        F.dropout(x, 1.0)


def test_manual_seed_makes_dropout_reproducible():
    x = Tensor(np.ones(50))
    F.manual_seed(123)
    a = F.dropout(x, 0.5).data
    F.manual_seed(123)
    b = F.dropout(x, 0.5).data
    assert np.array_equal(a, b)


def test_rope_cos_sin_matches_definition():
    pos, D, base = np.arange(7), 8, 500.0
    cos, sin = F.rope_cos_sin(pos, D, base, np.float64)
    inv = base ** (-np.arange(0, D, 2) / D)
    ang = np.concatenate([np.outer(pos, inv)] * 2, axis=1)
    assert_close(cos, np.cos(ang), 1e-15, 1e-15, name="cos")
    assert_close(sin, np.sin(ang), 1e-15, 1e-15, name="sin")


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("op", [F.add, F.sub, F.mul, F.div])
def test_shape_mismatch_names_both_shapes(op):
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(4,\)"):
        op(Tensor(np.ones((2, 3))), Tensor(np.ones(4)))


@pytest.mark.parametrize("call, shapes", [
    (lambda: F.matmul(Tensor(np.ones((2, 3))), Tensor(np.ones((4, 5)))), r"\(2, 3\).*\(4, 5\)"),
    (lambda: F.linear(Tensor(np.ones((2, 3))), Tensor(np.ones((4, 5)))), r"\(2, 3\).*\(4, 5\)"),
    (lambda: F.cat([Tensor(np.ones((2, 3))), Tensor(np.ones((4, 5)))], 0), r"\(2, 3\).*\(4, 5\)"),
    (lambda: F.stack([Tensor(np.ones((2, 3))), Tensor(np.ones((2, 4)))]), r"\(2, 3\).*\(2, 4\)"),
    (lambda: F.reshape(Tensor(np.ones((2, 3))), (4, 2)), r"\(2, 3\).*\(4, 2\)"),
    (lambda: F.silu_mul(Tensor(np.ones((2, 3))), Tensor(np.ones(3))), r"\(2, 3\).*\(3,\)"),
    (lambda: F.where(np.ones((2, 3), bool), Tensor(np.ones((4,))), 0.0), r"\(2, 3\).*\(4,\)"),
    (lambda: F.layer_norm(Tensor(np.ones((2, 3))), (4,)), r"\(2, 3\).*\(4,\)"),
    (lambda: F.rms_norm(Tensor(np.ones((2, 3))), (4,)), r"\(2, 3\).*\(4,\)"),
    (lambda: F.cross_entropy(Tensor(np.ones((2, 3))), np.zeros(3, np.int64)), r"\(2, 3\).*\(3,\)"),
    (lambda: F.scaled_dot_product_attention(Tensor(np.ones((1, 2, 3, 4))), Tensor(np.ones((1, 2, 3, 5))),
                                            Tensor(np.ones((1, 2, 3, 5)))), r"\(1, 2, 3, 4\).*\(1, 2, 3, 5\)"),
])
def test_shape_errors_name_the_shapes(call, shapes):
    with pytest.raises(ValueError, match=shapes):
        call()


@pytest.mark.parametrize("name, call", [
    ("exp", lambda x: F.exp(x)),
    ("softmax", lambda x: F.softmax(x, -1)),
    ("layer_norm", lambda x: F.layer_norm(x, 3)),
    ("rms_norm", lambda x: F.rms_norm(x, 3)),
    ("gelu", lambda x: F.gelu(x)),
    ("silu_mul", lambda x: F.silu_mul(x, x)),
])
def test_wrong_dtype_names_op_and_dtype(name, call):
    with pytest.raises(TypeError, match=rf"{name}.*int64"):
        call(Tensor(np.ones((2, 3), np.int64)))


@pytest.mark.parametrize("op", [F.add, F.mul, F.matmul, F.linear, lambda a, b: F.cat([a, b])])
def test_float32_and_float64_do_not_mix(op):
    with pytest.raises(TypeError, match="float32.*float64|float64.*float32"):
        op(Tensor(np.ones((3, 3), np.float32)), Tensor(np.ones((3, 3), np.float64)))


def test_integer_indices_required():
    with pytest.raises(TypeError, match="embedding.*float"):
        F.embedding(np.array([0.5]), Tensor(np.ones((3, 2))))
    with pytest.raises(TypeError, match="cross_entropy.*float"):
        F.cross_entropy(Tensor(np.ones((2, 3))), np.array([0.0, 1.0]))
    with pytest.raises(IndexError, match="embedding"):
        F.embedding(np.array([3]), Tensor(np.ones((3, 2))))
