"""Optimizers, schedules and clipping against torch.optim and transformers, step by step."""
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import assert_close, crosscheck
from lora_np import safetensors
from lora_np.optim import (SGD, AdamW, clip_grad_norm_, flatten_state_dict, get_constant_schedule_with_warmup,
                           get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup, unflatten_state_dict)
from lora_np.tensor import Tensor

SHAPES = [(3, 4), (5,), (2, 2, 3), (1,)]
# float64: torch's vectorised kernels fuse some multiply-adds, so a few ulps, never more.
# float32: the same few ulps, grown over 24 steps of a well-conditioned update.
RTOL = {np.float64: 1e-12, np.float32: 2e-5}
ATOL = {np.float64: 1e-15, np.float32: 1e-6}

adamw_settings = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 1e-1),
    # beta1 below 0.5 takes torch.lerp's other branch (weight 1 - beta1 >= 0.5).
    "betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.9999)),
    "eps": st.sampled_from([1e-8, 1e-6, 1e-3]),
    "weight_decay": st.sampled_from([0.0, 0.01, 0.3]),
})
sgd_settings = st.one_of(
    st.fixed_dictionaries({"lr": st.floats(1e-4, 1e-1), "momentum": st.floats(0.0, 0.99),
                           "dampening": st.sampled_from([0.0, 0.1, 0.5]),
                           "weight_decay": st.sampled_from([0.0, 0.01, 0.3])}),
    st.fixed_dictionaries({"lr": st.floats(1e-4, 1e-1), "momentum": st.floats(0.1, 0.99),
                           "weight_decay": st.sampled_from([0.0, 0.01, 0.3]), "nesterov": st.just(True)}),
)


def make_params(rng, dtype):
    """The same random parameters as lora_np Tensors and torch tensors."""
    torch = crosscheck("torch")
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    return ([Tensor(a.copy(), requires_grad=True) for a in init],
            [torch.tensor(a.copy(), requires_grad=True) for a in init])


def set_grads(rng, ours, theirs, step):
    """Random gradients; parameter 1 has none on every third step (both optimizers must skip it)."""
    torch = crosscheck("torch")
    for k, (a, b) in enumerate(zip(ours, theirs)):
        if k == 1 and step % 3 == 2:
            a.grad, b.grad = None, None
            continue
        g = rng.standard_normal(a.shape).astype(a.dtype)
        a.grad, b.grad = g.copy(), torch.tensor(g.copy())


def run_both(make_ours, make_theirs, dtype, seed, steps=24):
    rng = np.random.default_rng(seed)
    ours, theirs = make_params(rng, dtype)
    opt, topt = make_ours(ours), make_theirs(theirs)
    buffers = [a.data for a in ours]
    for step in range(steps):
        set_grads(rng, ours, theirs, step)
        opt.step()
        topt.step()
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a.data is buffers[k], "step() must update p.data in place"
        assert a.data.dtype == dtype
        assert_close(a.data, b.detach().numpy(), RTOL[dtype], ATOL[dtype], f"param {k}")
    return opt, topt


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(settings=adamw_settings, seed=st.integers(0, 2**32 - 1))
def test_adamw_matches_torch(dtype, settings, seed):
    torch = crosscheck("torch")
    opt, topt = run_both(lambda p: AdamW(p, **settings),
                         lambda p: torch.optim.AdamW(p, foreach=False, **settings), dtype, seed)
    for k, tp in enumerate(topt.param_groups[0]["params"]):
        tstate = topt.state[tp]
        assert opt.state[k]["step"] == int(tstate["step"].item())
        for name in ("exp_avg", "exp_avg_sq"):
            assert_close(opt.state[k][name], tstate[name].numpy(), RTOL[dtype], ATOL[dtype], f"state[{k}].{name}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(settings=sgd_settings, seed=st.integers(0, 2**32 - 1))
def test_sgd_matches_torch(dtype, settings, seed):
    torch = crosscheck("torch")
    opt, topt = run_both(lambda p: SGD(p, **settings),
                         lambda p: torch.optim.SGD(p, foreach=False, **settings), dtype, seed)
    if settings["momentum"] != 0:
        for k, tp in enumerate(topt.param_groups[0]["params"]):
            assert_close(opt.state[k]["momentum_buffer"], topt.state[tp]["momentum_buffer"].numpy(),
                         RTOL[dtype], ATOL[dtype], f"state[{k}].momentum_buffer")


def test_param_groups_match_torch():
    torch = crosscheck("torch")
    opt, _ = run_both(
        lambda p: AdamW([{"params": p[:2]}, {"params": p[2:], "lr": 0.05, "weight_decay": 0.0}], lr=0.01),
        lambda p: torch.optim.AdamW([{"params": p[:2]}, {"params": p[2:], "lr": 0.05, "weight_decay": 0.0}],
                                    lr=0.01, foreach=False),
        np.float64, seed=7)
    assert [g["params"] for g in opt.state_dict()["param_groups"]] == [[0, 1], [2, 3]]


def test_zero_grad():
    p = Tensor(np.ones(3), requires_grad=True)
    p.grad = np.full(3, 2.0)
    opt = SGD([p], lr=0.1)
    grad = p.grad
    opt.zero_grad(set_to_none=False)
    assert p.grad is grad and not p.grad.any()
    opt.zero_grad()
    assert p.grad is None
    opt.step()  # no gradient: nothing moves, no state is created
    assert (p.data == 1).all() and opt.state == {}


def test_bad_arguments_are_named():
    p = Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        AdamW([p], betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="item 0 has dtype int64"):
        AdamW([Tensor(np.ones(3, dtype=np.int64))])
    with pytest.raises(ValueError, match="more than one place"):
        AdamW([p, p])
    p.grad = np.ones(4)
    with pytest.raises(ValueError, match=r"parameter 0: grad \(4,\)"):
        AdamW([p]).step()


# -- state_dict round trip -------------------------------------------------------------------

def through_files(state_dict):
    """What a checkpoint does: arrays through a safetensors file, the rest through JSON."""
    arrays, meta = flatten_state_dict(state_dict)
    return unflatten_state_dict(safetensors.load(safetensors.save(arrays)), json.loads(json.dumps(meta)))


@pytest.mark.parametrize("make", [
    lambda p: AdamW(p, lr=0.02, weight_decay=0.1),
    lambda p: SGD(p, lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.01),
], ids=["adamw", "sgd"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_state_dict_round_trip_continues_identically(make, dtype):
    """N steps, save, load into a fresh optimizer and schedule, N more == 2N straight, bit for bit."""
    n = 7
    rng = np.random.default_rng(3)
    init = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    # Parameter 1 gets no gradient on every third step.
    grads = [[None if (k == 1 and step % 3 == 2) else rng.standard_normal(s).astype(dtype)
              for k, s in enumerate(SHAPES)] for step in range(2 * n)]

    def train(params, opt, sched, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = None if g is None else g.copy()
            opt.step()
            sched.step()

    straight = [Tensor(a.copy(), requires_grad=True) for a in init]
    opt = make(straight)
    sched = get_cosine_schedule_with_warmup(opt, 3, 2 * n)
    train(straight, opt, sched, grads)

    first = [Tensor(a.copy(), requires_grad=True) for a in init]
    opt1 = make(first)
    sched1 = get_cosine_schedule_with_warmup(opt1, 3, 2 * n)
    train(first, opt1, sched1, grads[:n])
    saved_opt, saved_sched = through_files(opt1.state_dict()), json.loads(json.dumps(sched1.state_dict()))

    resumed = [Tensor(p.data.copy(), requires_grad=True) for p in first]
    opt2 = make(resumed)
    sched2 = get_cosine_schedule_with_warmup(opt2, 3, 2 * n)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    train(resumed, opt2, sched2, grads[n:])

    assert sched2.get_last_lr() == sched.get_last_lr()
    for k, (a, b) in enumerate(zip(resumed, straight)):
        assert np.array_equal(a.data, b.data), f"param {k} differs after resume"
        assert a.data.dtype == dtype
    assert opt2.state.keys() == opt.state.keys()
    for i in opt.state:
        for name, value in opt.state[i].items():
            assert np.array_equal(opt2.state[i][name], value), f"state[{i}][{name!r}] differs after resume"


def test_load_state_dict_checks_shapes():
    p = Tensor(np.ones((2, 3)), requires_grad=True)
    p.grad = np.ones((2, 3))
    opt = AdamW([p])
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg'\] has shape \(3, 2\), parameter 0 has shape \(2, 3\)"):
        AdamW([Tensor(np.ones((2, 3)), requires_grad=True)]).load_state_dict(sd)
    with pytest.raises(ValueError, match="1 parameters saved, 2 here"):
        AdamW([p, Tensor(np.ones(2), requires_grad=True)]).load_state_dict(opt.state_dict())


# -- schedules ---------------------------------------------------------------------------------

SCHEDULES = {
    "constant": (get_constant_schedule_with_warmup, "get_constant_schedule_with_warmup", False),
    "linear": (get_linear_schedule_with_warmup, "get_linear_schedule_with_warmup", True),
    "cosine": (get_cosine_schedule_with_warmup, "get_cosine_schedule_with_warmup", True),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
@given(warmup=st.integers(0, 12), total=st.integers(0, 40), lrs=st.lists(st.floats(1e-5, 1.0), min_size=1, max_size=2),
       num_cycles=st.floats(0.25, 2.0))
def test_schedule_matches_transformers(kind, warmup, total, lrs, num_cycles):
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    ours_fn, name, has_total = SCHEDULES[kind]
    theirs_fn = getattr(transformers, name)
    args = (warmup, total) if has_total else (warmup,)
    kwargs = {"num_cycles": num_cycles} if kind == "cosine" else {}

    params = [Tensor(np.zeros(2), requires_grad=True) for _ in lrs]
    tparams = [torch.zeros(2, requires_grad=True) for _ in lrs]
    opt = SGD([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)])
    topt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(tparams, lrs)])
    sched, tsched = ours_fn(opt, *args, **kwargs), theirs_fn(topt, *args, **kwargs)
    for step in range(total + 8):
        assert sched.get_last_lr() == tsched.get_last_lr(), f"step {step}"
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in topt.param_groups], f"step {step}"
        topt.step()
        sched.step()
        tsched.step()


# -- clipping ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-3, 1.0, 1e3]),
       max_norm=st.sampled_from([0.1, 1.0, 10.0]))
def test_clip_grad_norm_matches_torch(dtype, seed, scale, max_norm):
    torch = crosscheck("torch")
    rng = np.random.default_rng(seed)
    ours, theirs = make_params(rng, dtype)
    set_grads(rng, ours, theirs, step=2)  # parameter 1 has no gradient
    for a, b in zip(ours, theirs):
        if a.grad is not None:
            a.grad *= dtype(scale)
            b.grad *= scale
    total = clip_grad_norm_(ours, max_norm)
    ttotal = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    rtol = {np.float64: 1e-12, np.float32: 1e-6}[dtype]
    assert_close(total, ttotal.item(), rtol, 0.0, "total norm")
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert a.grad.dtype == dtype
            assert_close(a.grad, b.grad.numpy(), rtol, 0.0, f"grad {k}")
    clipped = np.sqrt(sum(float(np.sum(a.grad.astype(np.float64) ** 2)) for a in ours if a.grad is not None))
    assert clipped <= max_norm * (1 + 1e-5)
