"""A training run under bad options, faults and damaged files: every option checked alike by
argparse and TrainArgs; a non-finite update never reaches a checkpoint or the adapter; a
checkpoint save killed at any point leaves latest.json naming a whole checkpoint; a full disk
names the path and keeps what was written; a torn metrics row is dropped on resume and any
other damage names the file; one run at a time holds a run folder."""
import argparse
import builtins
import contextlib
import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Optional

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import lora_np
from lora_np import checkpoints, cli, progress
from lora_np.checkpoints import RunFileError, RunFolderBusy, load_checkpoint, save_checkpoint
from lora_np.cli import main as cli_main
from lora_np.options import OptionError
from lora_np.train import NonFiniteLoss, OPTION_RULES, RunExists, TrainArgs, train
from conftest import ROOT, tiny_train_args

QUIET = io.StringIO()
N_EXAMPLES = 48  # rows of the tiny fixture's train.jsonl


def _rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _checkpoint_is_whole(out):
    """latest.json names a checkpoint whose adapter, optimizer state and trainer state all load,
    with finite weights; returns its step."""
    folder, state = load_checkpoint(out)
    adapter = lora_np.safetensors.load_file(os.path.join(folder, "adapter", "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter", "adapter_config.json")) as fh:
        config = json.load(fh)
    assert adapter and config["r"] == 4
    assert all(np.isfinite(v).all() for v in adapter.values())
    lora_np.safetensors.load_file(os.path.join(folder, "optimizer.safetensors"))
    return state["step"]


# -- 5. numeric options: one rule for argparse and the API ---------------------------------------
# What each option accepts, written out here independently of lora_np.train.OPTION_RULES.
def _int(lo, hi=None):
    return lambda v: isinstance(v, int) and v >= lo and (hi is None or v <= hi)


def _real(lo=-np.inf, hi=np.inf, lo_open=False, hi_open=False):
    return lambda v: np.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


ACCEPTS = {"r": _int(1), "alpha": lambda v: _real()(v) and v != 0, "dropout": _real(0, 1, hi_open=True), "lr": _real(0),
           "weight_decay": _real(0), "warmup": _int(0), "max_grad_norm": _real(0), "steps": _int(1),
           "epochs": _real(0, lo_open=True), "batch_size": _int(1), "seq_len": _int(2), "grad_accum": _int(1),
           "val_fraction": _real(0, 1, hi_open=True), "eval_every": _int(0), "save_every": _int(0),
           "log_every": _int(1), "seed": _int(0), "threads": _int(1, 4096), "stop_at": _int(1),
           "allreduce_timeout": _real(0, lo_open=True)}
INTEGER = {"r", "warmup", "steps", "batch_size", "seq_len", "grad_accum", "eval_every", "save_every", "log_every",
           "seed", "threads", "stop_at"}


def test_every_numeric_field_has_a_rule():
    numeric = {f.name for f in dataclasses.fields(TrainArgs) if f.type in (int, float, Optional[int], Optional[float])}
    assert numeric == set(OPTION_RULES) == set(ACCEPTS)


def _train_parser():
    parser = argparse.ArgumentParser(prog="lora-np train", exit_on_error=True)
    cli._train_args(parser)
    return parser


@given(name=st.sampled_from(sorted(ACCEPTS)),
       value=st.one_of(st.integers(-10 ** 12, 10 ** 12), st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([0, 1, -1, 2, 4096, 4097, 0.5, 1.0, -0.0, "x", "1e3", ""])))
def test_argparse_and_trainargs_accept_the_same_values(name, value):
    """Either both refuse the value naming the option (argparse: exit 2 at parse time), or both
    take it and the run's settings hold exactly that number."""
    option = "--" + name.replace("_", "-")
    text = str(value)
    try:
        number = int(text) if name in INTEGER else float(text)
    except ValueError:
        number = None
    ok = number is not None and ACCEPTS[name](number)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            ns = _train_parser().parse_args(["--data", "d", "--out", "o", f"{option}={text}"])  # "-1e+16" alone looks like an option
        parsed = True
    except SystemExit as e:
        assert e.code == 2
        parsed = False
    err = stderr.getvalue()
    assert parsed == ok, (option, text, err)
    if not ok:
        assert f"argument {option}: " in err.strip().splitlines()[-1], err
        if number is not None:
            with pytest.raises(OptionError, match=rf"^{name} must be "):
                TrainArgs(data="d", out="o", **{name: number})
        return
    args = cli.train_args_from_namespace(ns)
    assert getattr(args, name) == number and type(getattr(args, name)) is type(number)
    assert getattr(TrainArgs(data="d", out="o", **{name: number}), name) == number


@pytest.mark.parametrize("kw, match", [
    (dict(steps=2, epochs=1.0), "steps or epochs, not both"),
    (dict(resume=True, overwrite=True), "resume and overwrite"),
    (dict(schedule="step"), "schedule must be one of linear, cosine"),
    (dict(dtype="float16"), "dtype must be one of"),
    (dict(targets=" , "), "targets must name at least one module"),
    (dict(steps=np.int64(3), lr=True), "lr must be a finite number"),
    (dict(out=""), "out must be a path"),
])
def test_trainargs_refuses_other_nonsense(kw, match):
    with pytest.raises(OptionError, match=match):
        TrainArgs(**{"data": "d", "out": "o", **kw})


def _linear_lr(lr, warmup, total, t):  # transformers.get_linear_schedule_with_warmup at scheduler step t
    return lr * (t / max(1, warmup) if t < warmup else max(0.0, (total - t) / max(1, total - warmup)))


@settings(max_examples=6)
@given(steps=st.one_of(st.none(), st.integers(1, 5)), epochs=st.sampled_from([0.01, 0.2, 0.5]),
       batch_size=st.integers(1, 12), grad_accum=st.integers(1, 3), save_every=st.integers(0, 3),
       eval_every=st.integers(0, 3), log_every=st.integers(1, 3), warmup=st.integers(0, 3))
def test_a_run_does_what_its_numbers_say(tiny, tmp_path_factory, steps, epochs, batch_size, grad_accum, save_every,
                                         eval_every, log_every, warmup):
    out = tmp_path_factory.mktemp("run")
    log = out / "log.txt"
    with open(log, "w") as stream:
        train(tiny_train_args(tiny, out, steps=steps, epochs=None if steps else epochs, batch_size=batch_size,
                    grad_accum=grad_accum, save_every=save_every, eval_every=eval_every, log_every=log_every,
                    warmup=warmup, val_fraction=0.25, lr=1e-3), stream=stream)
    n_train = N_EXAMPLES - N_EXAMPLES // 4
    total = steps or max(1, int(np.ceil(epochs * max(1, -(-n_train // batch_size) // grad_accum))))
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert [r["lr"] for r in rows] == pytest.approx([_linear_lr(1e-3, warmup, total, s - 1) for s in range(1, total + 1)],
                                                    rel=1e-12, abs=1e-18)
    assert [s for s in range(1, total + 1) if "val_loss" in rows[s - 1]] == \
        [s for s in range(1, total + 1) if (eval_every and s % eval_every == 0) or s == total]
    logged = [int(line.split()[1].split("/")[0]) for line in log.read_text().splitlines() if line.startswith("step ")]
    assert logged == [s for s in range(1, total + 1) if s % log_every == 0 or s == total or "val_loss" in rows[s - 1]]
    assert f"{n_train} train / {N_EXAMPLES // 4} val examples" in log.read_text()
    assert _checkpoint_is_whole(out) == total
    assert sorted(os.listdir(out / "checkpoints")) == ["latest.json", f"step-{total:06d}"]


def test_seq_len_beyond_the_models_context_is_refused_before_any_write(tiny, tmp_path):
    with pytest.raises(OptionError, match=r"--seq-len 129 is longer than the model's context "
                                          r"\(max_position_embeddings = 128"):
        train(tiny_train_args(tiny, tmp_path, seq_len=129), stream=QUIET)
    assert not os.path.exists(tmp_path / "metrics.jsonl")


# -- 1. non-finite updates ---------------------------------------------------------------------
def test_a_nonfinite_parameter_after_the_update_reaches_no_file(tiny, tmp_path, monkeypatch):
    from lora_np.optim import AdamW

    real_step, calls = AdamW.step, {"n": 0}

    def step(self):
        real_step(self)
        calls["n"] += 1
        if calls["n"] == 3:  # the loss of step 3 was finite; its update is not
            self.param_groups[0]["params"][1].data[0, 0] = np.inf

    monkeypatch.setattr(AdamW, "step", step)
    with pytest.raises(NonFiniteLoss, match=r"parameter base_model\.model\.model\.layers\.0\.self_attn\.q_proj\."
                                            r"lora_B\.default\.weight is not finite after the update .* at step 3; "
                                            r".*The last good checkpoint is .*step-000002"):
        train(tiny_train_args(tiny, tmp_path, save_every=2, steps=4), stream=QUIET)
    assert _checkpoint_is_whole(tmp_path) == 2
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]
    assert not os.path.exists(tmp_path / "adapter_model.safetensors")
    monkeypatch.setattr(AdamW, "step", real_step)  # the named checkpoint really is good: the run continues from it
    assert train(tiny_train_args(tiny, tmp_path, save_every=2, steps=4, resume=True), stream=QUIET)["steps"] == 4


@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # the update that is stopped
def test_an_infinite_learning_rate_is_refused_and_a_huge_one_stops_at_step_1(tiny, tmp_path, capsys):
    model, tok, data = tiny
    common = ["train", "--data", data, "--model", model, "--tokenizer", tok, "--seq-len", "16", "--r", "4",
              "--steps", "1", "--val-fraction", "0"]
    assert cli_main(common + ["--out", str(tmp_path / "a"), "--lr", "inf"]) == 2
    assert "argument --lr: must be a finite number >= 0, got inf" in capsys.readouterr().err
    assert cli_main(common + ["--out", str(tmp_path / "b"), "--lr", "1e39"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("lora-np train: error: parameter ") and "at step 1" in err
    assert "(none written yet)" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "b" / "adapter_model.safetensors")
    assert not os.path.exists(tmp_path / "b" / "checkpoints")


# -- 2. a checkpoint save killed at any point ------------------------------------------------------
class Died(BaseException):
    """The process died here: this call and every file-system call after it do nothing."""


def _dying_at(k, monkeypatch):
    """Make the k-th file-system change (create, write-open, rename, remove, fsync) the last one."""
    calls = {"n": 0}

    def wrap(fn, counts=lambda *a, **kw: True):
        def wrapped(*a, **kw):
            if counts(*a, **kw):
                calls["n"] += 1
                if calls["n"] >= k:
                    raise Died(f"call {calls['n']}: {fn.__name__}{a!r}")
            return fn(*a, **kw)
        return wrapped

    for name in ("replace", "rename", "mkdir", "unlink", "remove", "rmdir", "fsync"):
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    monkeypatch.setattr(os, "open", wrap(os.open, lambda path, flags, *a, **kw: flags & (os.O_WRONLY | os.O_RDWR)))
    monkeypatch.setattr(builtins, "open", wrap(builtins.open, lambda f, mode="r", *a, **kw: set(mode) & set("wax+")))
    return calls


@pytest.fixture(scope="module")
def saved_run(tiny, tmp_path_factory):
    """(run folder with a checkpoint at step 2, the live model / optimizer / scheduler of that run)."""
    from lora_np.optim import AdamW, get_linear_schedule_with_warmup

    out = tmp_path_factory.mktemp("saved")
    result = train(tiny_train_args(tiny, out, steps=2, save_every=2), stream=QUIET)
    peft = result["model"]
    optimizer = AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
    return out, (peft, optimizer, get_linear_schedule_with_warmup(optimizer, 0, 10))


@pytest.mark.parametrize("step", [2, 4])  # the step latest.json names (the end of a run, a resumed run), a new one
def test_a_checkpoint_save_killed_at_any_point_leaves_a_whole_one(saved_run, tmp_path, monkeypatch, step):
    src, (peft, optimizer, scheduler) = saved_run
    args = TrainArgs(data="d", out=str(tmp_path))
    for k in range(1, 200):
        out = tmp_path / f"k{k}"
        shutil.copytree(src, out)
        with monkeypatch.context() as m:
            calls = _dying_at(k, m)  # noqa: F841 (reported on failure)
            try:
                save_checkpoint(str(out), step, peft, optimizer, scheduler, {"at": step}, {}, args)
                finished = True
            except Died:
                finished = False
        assert _checkpoint_is_whole(out) in ({step} if finished else {2, step}), (k, calls)
        checkpoints.remove_leftovers(str(out))  # what the next run in this folder does first
        left = sorted(os.listdir(out / "checkpoints"))
        assert not [n for n in left if n.startswith(".")], (k, left)
        if finished:
            assert _checkpoint_is_whole(out) == step and len([n for n in left if n.startswith("step-")]) == 1
            break
    else:
        pytest.fail("the save never finished")
    assert k > 10, "the save makes more file-system changes than that: the fault injection missed them"


def test_the_next_run_removes_leftovers_of_killed_writes_and_nothing_else(tiny, tmp_path):
    train(tiny_train_args(tiny, tmp_path, steps=4, stop_at=2), stream=QUIET)
    leftovers = [tmp_path / ".metrics.jsonl.0123456789ab.tmp", tmp_path / "checkpoints" / ".tmp-step-000004-abc",
                 tmp_path / ".tmp-adapter-0123456789ab"]
    leftovers[0].write_text("{")
    for folder in leftovers[1:]:
        os.makedirs(folder / "adapter")
    (tmp_path / "notes.tmp").write_text("mine")  # not a name lora_np writes
    train(tiny_train_args(tiny, tmp_path, steps=4, resume=True), stream=QUIET)
    assert not any(os.path.exists(p) for p in leftovers)
    assert (tmp_path / "notes.tmp").read_text() == "mine"
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4]


def test_resuming_a_finished_run_keeps_its_checkpoint(tiny, tmp_path):
    train(tiny_train_args(tiny, tmp_path, steps=4, save_every=2), stream=QUIET)
    before = load_checkpoint(tmp_path)
    assert train(tiny_train_args(tiny, tmp_path, steps=4, save_every=2, resume=True), stream=QUIET)["steps"] == 4
    assert load_checkpoint(tmp_path) == before and _checkpoint_is_whole(tmp_path) == 4


# -- 7. a full disk, --out a file, loss.svg failing ---------------------------------------------------
class _Budget:
    """builtins.open whose files under `root` share `left` bytes of disk; beyond that a write raises ENOSPC."""

    def __init__(self, root, left):
        self.root, self.left, self.real = str(root), left, builtins.open

    def __call__(self, file, mode="r", *a, **kw):
        fh = self.real(file, mode, *a, **kw)
        if isinstance(file, int) or str(file).startswith(self.root) and set(mode) & set("wax+"):
            return _BudgetFile(fh, self)
        return fh


class _BudgetFile:
    def __init__(self, fh, budget):
        self._fh, self._budget = fh, budget

    def write(self, data):
        if len(data) > self._budget.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._budget.left -= len(data)
        return self._fh.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._fh.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._fh, name)


@pytest.mark.parametrize("budget", [0, 300, 2000, 20_000, 60_000, 90_000])
def test_a_full_disk_names_the_path_and_keeps_what_was_written(tiny, tmp_path, monkeypatch, budget):
    out = tmp_path / "run"
    monkeypatch.setattr(builtins, "open", _Budget(out, budget))
    try:
        train(tiny_train_args(tiny, out, steps=4, save_every=2, val_fraction=0), stream=QUIET)
        finished = True
    except OSError as e:
        assert e.errno == errno.ENOSPC and str(e.filename).startswith(str(out)), e
        finished = False
    monkeypatch.undo()
    if os.path.exists(out / "checkpoints" / "latest.json"):
        step = _checkpoint_is_whole(out)
        assert train(tiny_train_args(tiny, out, steps=4, save_every=2, val_fraction=0, resume=True), stream=QUIET)["steps"] == 4
        assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4] and step in (2, 4)
    if finished or os.path.exists(out / "adapter_config.json"):
        weights = lora_np.safetensors.load_file(out / "adapter_model.safetensors")
        assert weights and all(np.isfinite(v).all() for v in weights.values())
    assert not [n for n in os.listdir(out) if n.startswith(".") and n != ".lora-np.lock"] or not finished


def test_a_loss_svg_that_cannot_be_written_is_a_warning_after_the_adapter(tiny, tmp_path, monkeypatch):
    def no_space(rows, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(progress, "write_loss_svg", no_space)
    log = tmp_path / "log.txt"
    with open(log, "w") as stream:
        train(tiny_train_args(tiny, tmp_path / "run", steps=2), stream=stream)
    assert f"warning: could not write {tmp_path / 'run' / 'loss.svg'}: No space left on device" in log.read_text()
    assert lora_np.safetensors.load_file(tmp_path / "run" / "adapter_model.safetensors")


def test_out_that_is_a_file_is_an_oserror_naming_it(tiny, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError) as e:
        train(tiny_train_args(tiny, tmp_path / "f"), stream=QUIET)
    assert e.value.filename == str(tmp_path / "f") and "--out must be a folder" in str(e.value)


# -- 6. damaged run files -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(tiny_train_args(tiny, out, steps=5, stop_at=3), stream=QUIET)
    return out


def test_a_torn_last_metrics_row_is_dropped_with_a_warning(tiny, stopped_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "loss": 3.2')  # a kill while step 4's row was written
    log = tmp_path / "log.txt"
    with open(log, "w") as stream:
        train(tiny_train_args(tiny, out, steps=5, resume=True), stream=stream)
    assert f"warning: {out / 'metrics.jsonl'}:4: dropped a torn last line" in log.read_text()
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4, 5]


def _damage(path, text):
    def do(out):
        with open(out / path, "w") as fh:
            fh.write(text)
    return do


def _remove_file(path):
    return lambda out: os.remove(out / path)


STATE = "checkpoints/step-000003/trainer_state.json"
DAMAGE = [
    (_damage("metrics.jsonl", '{"step": 1}\nnot json\n{"step": 3}\n'), r"metrics.jsonl:2: not a JSON row"),
    (_damage("metrics.jsonl", '{"step": 1}\n{"step": 3}\n'), r"metrics.jsonl: expected one row for each of steps 1..3"),
    (_damage("metrics.jsonl", '{"step": 1}\n{"step": "2"}\n{"step": 3}\n'), r"metrics.jsonl:2: expected a JSON object"),
    (_damage("metrics.jsonl", "[" * 100_000 + "\n"), r"metrics.jsonl:1: not a JSON row"),
    (_remove_file("metrics.jsonl"), r"metrics.jsonl: missing"),
    (_damage("checkpoints/latest.json", "{"), r"latest.json: not valid JSON"),
    (_damage("checkpoints/latest.json", "[1]"), r"latest.json: expected a JSON object"),
    (_damage("checkpoints/latest.json", '{"checkpoint": "../../elsewhere"}'), r"latest.json: 'checkpoint' must name"),
    (_damage("checkpoints/latest.json", '{"checkpoint": "step-000009"}'), r"step-000009, which has no adapter"),
    (_damage(STATE, "[" * 100_000), r"trainer_state.json: not valid JSON"),
    (_damage(STATE, '{"step": 3}'), r"trainer_state.json: no optimizer, scheduler, batches, rng, args"),
    (_remove_file(STATE), r"step-000003, which has no trainer_state.json"),
    (_damage("checkpoints/step-000003/optimizer.safetensors", "garbage"), r"step-000003: the checkpoint's optimizer"),
]


@pytest.mark.parametrize("damage, match", DAMAGE)
def test_other_damage_to_run_files_names_the_file(tiny, stopped_run, tmp_path, damage, match):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    damage(out)
    with pytest.raises(RunFileError, match=match):
        train(tiny_train_args(tiny, out, steps=5, resume=True), stream=QUIET)


def test_a_checkpoint_with_nonfinite_weights_is_not_resumed(tiny, stopped_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped_run, out)
    path = out / "checkpoints" / "step-000003" / "adapter" / "adapter_model.safetensors"
    weights = {k: np.array(v) for k, v in lora_np.safetensors.load_file(path).items()}
    key = sorted(weights)[0]
    weights[key][0, 0] = np.nan
    lora_np.safetensors.save_file(weights, path)
    with pytest.raises(RunFileError, match=r"step-000003: the checkpoint's adapter does not load: .*holds non-finite values"):
        train(tiny_train_args(tiny, out, steps=5, resume=True), stream=QUIET)


# -- 9. one run per folder ----------------------------------------------------------------------
def test_a_folder_holding_a_run_needs_resume_or_overwrite(tiny, tmp_path):
    train(tiny_train_args(tiny, tmp_path, steps=2), stream=QUIET)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunExists, match=r"already holds a run \(adapter_config.json, adapter_model.safetensors, "
                                        r"metrics.jsonl, loss.svg, checkpoints\).*--resume.*--overwrite"):
        train(tiny_train_args(tiny, tmp_path, steps=3), stream=QUIET)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]
    train(tiny_train_args(tiny, tmp_path, steps=3, overwrite=True), stream=QUIET)
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3] and _checkpoint_is_whole(tmp_path) == 3
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_held_lock_refuses_a_second_run_naming_the_holder(tiny, tmp_path):
    fd = checkpoints.lock_run_folder(str(tmp_path))
    try:
        with pytest.raises(RunFolderBusy, match=rf"in use by another lora-np train \(pid {os.getpid()} on "):
            train(tiny_train_args(tiny, tmp_path), stream=QUIET)
    finally:
        os.close(fd)
    train(tiny_train_args(tiny, tmp_path, steps=1), stream=QUIET)  # released: the next run goes ahead


def test_two_concurrent_runs_in_one_folder(tiny, tmp_path, capsys):
    model, tok, data = tiny
    argv = ["train", "--data", data, "--model", model, "--tokenizer", tok, "--seq-len", "16", "--r", "4",
            "--val-fraction", "0", "--out", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first = subprocess.Popen([sys.executable, "-m", "lora_np", *argv, "--steps", "100000"], stderr=subprocess.PIPE,
                             text=True, env=env)
    try:
        for line in first.stderr:
            if line.startswith("step 1/"):
                break
        assert cli_main(argv + ["--steps", "2", "--overwrite"]) == 1
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"lora-np train: error: {tmp_path} is in use by another lora-np train "
                                            f"(pid {first.pid} on " + err.split(f"(pid {first.pid} on ", 1)[1].strip()]
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
        first.stderr.close()
    assert cli_main(argv + ["--steps", "2", "--overwrite"]) == 0  # the killed holder released the lock
    assert [r["step"] for r in _rows(tmp_path)] == [1, 2]


# -- the command line: one line, no traceback, the exit status of the convention ----------------------------
@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # --lr 1e39, stopped
def test_bad_command_lines_get_one_error_line_and_the_right_status(tiny, tmp_path, capsys):
    model, tok, data = tiny
    base = ["train", "--data", data, "--model", model, "--tokenizer", tok, "--seq-len", "16", "--r", "4",
            "--val-fraction", "0"]
    (tmp_path / "file").write_text("x")
    cases = [
        (["--out", str(tmp_path / "a"), "--steps", "0"], 2, "argument --steps: must be an integer >= 1, got 0"),
        (["--out", str(tmp_path / "a"), "--epochs", "0"], 2, "argument --epochs: must be a finite number > 0"),
        (["--out", str(tmp_path / "a"), "--grad-accum", "-1"], 2, "argument --grad-accum: must be an integer >= 1"),
        (["--out", str(tmp_path / "a"), "--log-every", "0"], 2, "argument --log-every: must be an integer >= 1"),
        (["--out", str(tmp_path / "a"), "--dropout", "1"], 2, "argument --dropout: must be a finite number >= 0 and < 1"),
        (["--out", str(tmp_path / "a"), "--lr", "nan"], 2, "argument --lr: must be a finite number >= 0, got nan"),
        (["--out", str(tmp_path / "a"), "--seed", "-1"], 2, "argument --seed: must be an integer >= 0"),
        (["--out", str(tmp_path / "a"), "--resume", "--overwrite"], 2, "argument --overwrite: not allowed with"),
        (["--out", str(tmp_path / "b"), "--seq-len", "1000", "--steps", "1"], 2, "--seq-len 1000 is longer than"),
        (["--out", str(tmp_path / "c"), "--steps", "1", "--lr", "1e39"], 1, "is not finite after the update"),
        (["--out", str(tmp_path / "d"), "--steps", "1", "--resume"], 1, "has no checkpoint"),
        (["--out", str(tmp_path / "file"), "--steps", "1"], 1, f"{tmp_path / 'file'}: --out must be a folder"),
    ]
    for extra, status, message in cases:
        rc = cli_main(base + extra)
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert rc == status and "Traceback" not in err, (extra, rc, err)
        assert last.startswith("lora-np train: error: ") and message in last, (extra, err)
        assert sum("error:" in line for line in err.splitlines()) == 1, err


@pytest.mark.parametrize("batch_size", [0, -2, 2.5, True])
def test_evaluate_checks_batch_size_like_the_option(tiny, batch_size):
    from lora_np.data import load_examples
    from lora_np.train import evaluate

    model, tok, data = tiny
    examples = load_examples(data, lora_np.load_tokenizer(tok), 16)
    with pytest.raises(OptionError, match=r"^batch_size must be an integer >= 1, got "):
        evaluate(lora_np.load_model(model), examples, batch_size)
