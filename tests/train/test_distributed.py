"""Data-parallel training over MPI, with 2 ranks on this machine (`mpiexec -n 2`): 2 ranks x
batch b train exactly as 1 process x batch 2b; resume with the same K; a stalled or killed
rank stops the job within the timeout with the last checkpoint intact; ranks that disagree
are named at start. The sharding arithmetic is checked in-process with hypothesis."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from hypothesis import given, strategies as st

import lora_np
from lora_np.distributed import shard
from conftest import IN_CI, ROOT, assert_close, crosscheck

ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

# Rank 1 of a fault test: sends itself a signal (argv[1]) when it reaches the allreduce of step 3.
FAULTY_RANK = """
import os, signal, sys
from lora_np import distributed
from lora_np.cli import main
real = distributed.Communicator.allreduce_step
def allreduce_step(self, *args):
    if self.step == 3:
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return real(self, *args)
distributed.Communicator.allreduce_step = allreduce_step
sys.exit(main(sys.argv[2:]))
"""

SLOW_WRITER = """
import sys, time
from lora_np import train
from lora_np.cli import main
real = train.save_checkpoint
def save_checkpoint(*args, **kw):
    time.sleep(1.5)  # a checkpoint that takes a while to write (a big adapter, a slow disk)
    return real(*args, **kw)
train.save_checkpoint = save_checkpoint
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def mpiexec():
    """The mpiexec of the MPI that mpi4py runs on (the `mpich` wheel puts it beside python)."""
    crosscheck("mpi4py")
    exe = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        message = "mpiexec not found: pip install 'lora_np[distributed]' (mpi4py and mpich)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    return exe


def _train_argv(tiny, out, **kw):
    model, tok, data = tiny
    opts = dict(data=data, model=model, tokenizer=tok, r=4, alpha=8, dropout=0.0, lr=5e-3, steps=6, seq_len=16,
                val_fraction=0.1, seed=3, threads=1, out=out)
    opts.update(kw)
    argv = ["train"]
    for key, value in opts.items():
        if value is True:
            argv.append(f"--{key.replace('_', '-')}")
        elif value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def _run(argv_per_rank, mpiexec=None, timeout=120):
    """Run `python ARGV` on each rank (one process without mpiexec); (returncode, stderr + stdout, seconds)."""
    if mpiexec is None:
        (argv,) = argv_per_rank
        cmd = [sys.executable, *argv]
    else:
        cmd = [mpiexec]
        for k, argv in enumerate(argv_per_rank):
            cmd += ([":"] if k else []) + ["-n", "1", sys.executable, *argv]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr + proc.stdout, time.monotonic() - t0


def _module(argv):
    return ["-m", "lora_np", *argv]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _adapter(out):
    return lora_np.safetensors.load_file(os.path.join(out, "adapter_model.safetensors"))


# -- the arithmetic ---------------------------------------------------------------------------
@given(st.integers(1, 9), st.integers(1, 4), st.integers(2, 6), st.integers(0, 2 ** 31))
def test_shards_partition_the_batch_and_weights_give_the_global_mean(batch, ranks, seq_len, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 100, (batch, seq_len))
    labels = np.where(rng.random((batch, seq_len)) < 0.5, ids, -100)
    labels[0, 1] = ids[0, 1]  # at least one labelled token
    token_loss = rng.random((batch, seq_len))  # any per-token loss
    mask = labels[:, 1:] != -100
    parts = [shard(ids, labels, r, ranks) for r in range(ranks)]
    assert np.array_equal(np.concatenate([p[0] for p in parts]), ids)
    assert np.array_equal(np.concatenate([p[1] for p in parts]), labels)
    global_mean = token_loss[:, 1:][mask].sum() / mask.sum()
    rows = np.array_split(np.arange(batch), ranks)
    weighted = 0.0
    for (_, local, weight), r in zip(parts, rows):
        local_mask = local[:, 1:] != -100
        if weight:
            weighted += weight * token_loss[r][:, 1:][local_mask].sum() / local_mask.sum()
    assert abs(weighted - global_mean) <= 1e-12 * global_mean


def test_the_library_imports_without_mpi4py():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "import lora_np, lora_np.train, lora_np.distributed\n"
            "try:\n    lora_np.distributed.Communicator()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True).stdout
    assert "pip install 'lora_np[distributed]'" in out


# -- 2 ranks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, grad_accum, rtol", [("float64", 1, 1e-10), ("float64", 2, 1e-10),
                                                     ("float32", 2, 1e-4)])
def test_two_ranks_train_as_one_process_with_twice_the_batch(tiny, tmp_path, mpiexec, dtype, grad_accum, rtol):
    """float32 tolerance: ~8 ulp on the loss (seen: 1.8e-7 relative) and 1e-4 of each tensor's
    largest entry on the adapter (seen: 1.7e-5). The two runs add the same terms in another
    order, and Adam divides each gradient by its own running magnitude, so a near-zero
    gradient's rounding noise moves its element by a sizeable part of a step."""
    common = dict(dtype=dtype, grad_accum=grad_accum)
    rc, err, _ = _run([_module(_train_argv(tiny, tmp_path / "one", batch_size=4, **common))])
    assert rc == 0, err
    rank0 = _module(_train_argv(tiny, tmp_path / "two", batch_size=2, **common))
    rank1 = _module(_train_argv(tiny, tmp_path / "rank1", batch_size=2, **common))  # --out is rank 0's alone
    rc, err, _ = _run([rank0, rank1], mpiexec)
    assert rc == 0, err
    assert "on each of 2 ranks" in err and "on all 2 ranks" in err  # adapter checksums compared at the end
    assert not os.path.exists(tmp_path / "rank1"), "only rank 0 writes"

    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 7))
    assert all(r["allreduce_s"] >= 0 for r in two) and not any("allreduce_s" in r for r in one)
    loss_rtol = 1e-10 if dtype == "float64" else 1e-6
    assert_close([r["loss"] for r in two], [r["loss"] for r in one], rtol=loss_rtol, name="losses")
    assert_close(two[-1]["val_loss"], one[-1]["val_loss"], rtol=loss_rtol, name="validation loss")
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:
        assert np.abs(a[key]).max() > 0, f"{key}: the adapter must have trained"
        assert_close(b[key], a[key], rtol=0, atol=rtol * np.abs(a[key]).max(), name=key)


def test_two_ranks_resume_exactly_with_the_same_count(tiny, tmp_path, mpiexec):
    opts = dict(batch_size=2, grad_accum=2, dropout=0.1)  # dropout on: each rank's RNG is checkpointed
    rc, err, _ = _run([_module(_train_argv(tiny, tmp_path / "a", **opts))] * 2, mpiexec)
    assert rc == 0, err
    rc, err, _ = _run([_module(_train_argv(tiny, tmp_path / "b", stop_at=3, **opts))] * 2, mpiexec)
    assert rc == 0 and "resume with --resume" in err, err
    rc, err, _ = _run([_module(_train_argv(tiny, tmp_path / "b", resume=True, **opts))])
    assert rc == 2 and "written by 2 ranks, now 1" in err, err
    rc, err, _ = _run([_module(_train_argv(tiny, tmp_path / "b", resume=True, **opts))] * 2, mpiexec)
    assert rc == 0, err
    assert [r["loss"] for r in _metrics(tmp_path / "b")] == [r["loss"] for r in _metrics(tmp_path / "a")]
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _assert_checkpoint_intact(out, step):
    assert json.load(open(out / "checkpoints" / "latest.json")) == {"checkpoint": f"step-{step:06d}", "step": step}
    adapter = lora_np.safetensors.load_file(out / "checkpoints" / f"step-{step:06d}" / "adapter" /
                                            "adapter_model.safetensors")
    assert adapter and all(np.isfinite(v).all() for v in adapter.values())
    assert not os.path.exists(out / "adapter_model.safetensors")  # no final adapter from a failed run


def test_a_stalled_rank_stops_all_within_the_timeout(tiny, tmp_path, mpiexec):
    argv = _train_argv(tiny, tmp_path, batch_size=2, save_every=2, allreduce_timeout=3)
    rc, err, seconds = _run([_module(argv), ["-c", FAULTY_RANK, "SIGSTOP", *argv]], mpiexec, timeout=60)
    assert rc != 0
    assert "rank 0/2, step 3: the gradient allreduce got no answer within 3 s" in err, err
    assert seconds < 40
    _assert_checkpoint_intact(tmp_path, 2)


def test_a_killed_rank_stops_all(tiny, tmp_path, mpiexec):
    """Rank 1 dies at step 3 while rank 0 is still writing the step-2 checkpoint, unless every rank
    waits for that write: the checkpoint must be complete."""
    argv = _train_argv(tiny, tmp_path, batch_size=2, save_every=2, allreduce_timeout=3)
    rc, err, seconds = _run([["-c", SLOW_WRITER, *argv], ["-c", FAULTY_RANK, "SIGKILL", *argv]], mpiexec, timeout=60)
    assert rc != 0, err
    assert "signal 9" in err, err  # mpiexec sees the death and ends the job (here before our timeout)
    assert seconds < 40
    _assert_checkpoint_intact(tmp_path, 2)


def test_ranks_with_different_data_are_named_at_start(tiny, tmp_path, mpiexec):
    model, tok, data = tiny
    other = tmp_path / "other.jsonl"
    other.write_text("".join(open(data).readlines()[:-1]))  # one example fewer
    argv = _train_argv(tiny, tmp_path / "run", batch_size=2)
    rc, err, _ = _run([_module(argv), _module(_train_argv(tiny, tmp_path / "run", batch_size=2, data=other))],
                      mpiexec)
    assert rc == 2, err
    assert "the 2 ranks disagree at start: train data (examples, crc32): rank 0 has [43, " in err
    assert "rank 1 has [42, " in err
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl"), "no step may run"


def test_an_error_on_one_rank_stops_all_with_its_message(tiny, tmp_path, mpiexec):
    argv = _train_argv(tiny, tmp_path / "run", batch_size=2)
    missing = _train_argv(tiny, tmp_path / "run", batch_size=2, data=tmp_path / "missing.jsonl")
    rc, err, seconds = _run([_module(argv), _module(missing)], mpiexec, timeout=60)
    assert rc != 0
    assert "rank 1/2, step 0: FileNotFoundError" in err and "missing.jsonl" in err, err
    assert seconds < 40  # rank 0, waiting in the start check, is ended by rank 1's abort
