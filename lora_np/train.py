"""Fine-tuning: `train` (the loop) and `train_step` (one optimizer step).

    result = train(TrainArgs(data="train.jsonl", out="runs/a", steps=100))

A run directory holds `adapter_config.json` + `adapter_model.safetensors` (the final
adapter, PEFT format), `metrics.jsonl` (one JSON row per step), `loss.svg`, and
`checkpoints/` (`latest.json` naming the newest complete `step-NNNNNN/` folder: adapter,
optimizer moments, scheduler, data position and dropout RNG); `--resume` continues exactly
where the checkpoint left off. Writing and reading them is lora_np.checkpoints' (the run
folder) and lora_np.progress' (metrics.jsonl, loss.svg, the progress line); the
`lora-np train` command is lora_np.cli's.

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
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import functional as F
from . import safetensors
from .checkpoints import (RunFileError, RunFolderBusy, earlier_run, load_checkpoint, lock_run_folder,
                          remove_leftovers, remove_run, save_adapter, save_checkpoint)
from .kernels.backend import keep_freed_memory, set_threads
from .kernels.quantize import QUANTIZE_TYPES
from .optim import clip_grad_norm_
from .options import Float, Int, OptionError
from .progress import MetricsLog, Progress, read_metrics, try_write_loss_svg, write_loss_svg

__all__ = ["TrainArgs", "train", "train_step", "evaluate", "NonFiniteLoss", "RunExists", "OPTION_RULES", "CHOICES",
           "BOOL_OPTIONS",
           # where they were: lora_np.kernels.backend's, lora_np.checkpoints' and lora_np.progress'
           "set_threads", "keep_freed_memory", "RunFolderBusy", "RunFileError", "write_loss_svg"]


class NonFiniteLoss(RuntimeError):
    """The loss, a gradient or a parameter became non-finite; nothing of that step was written."""


class RunExists(OptionError):
    """--out already holds a run and neither --resume nor --overwrite was given (a usage error)."""


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
CHOICES = {"schedule": ("linear", "cosine"), "dtype": ("float32", "float64")}
BOOL_OPTIONS = ("rslora", "dora", "grad_checkpoint", "dequantize", "resume", "overwrite")


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
    grad_checkpoint: bool = False  # recompute each block's forward in backward: less memory, same gradients
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
    quantize: Optional[str] = None  # q8_0, q4_0, q4_k, bf16 or f16: a float checkpoint's Linear / Embedding weights
    dequantize: bool = False  # a GGUF base as float `dtype` weights instead of its resident blocks
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
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise OptionError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in BOOL_OPTIONS:
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE_TYPES:
            raise OptionError(f"quantize must be one of {', '.join(QUANTIZE_TYPES)}, got {self.quantize!r}")
        if self.steps is not None and self.epochs is not None:
            raise OptionError(f"give steps or epochs, not both (got steps={self.steps}, epochs={self.epochs})")
        if self.resume and self.overwrite:
            raise OptionError("resume and overwrite contradict each other: continue the run or replace it")
        if not isinstance(self.targets, str) or not any(t.strip() for t in self.targets.split(",")):
            raise OptionError(f"targets must name at least one module (or all-linear), got {self.targets!r}")
        for name in ("data", "out"):
            if not isinstance(getattr(self, name), (str, os.PathLike)) or not os.fspath(getattr(self, name)):
                raise OptionError(f"{name} must be a path, got {getattr(self, name)!r}")


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


# -- the loop ------------------------------------------------------------------------------
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
            lock = lock_run_folder(out)
        return _train(args, comm, lock is not None, stream)
    finally:
        if lock is not None:
            os.close(lock)


def _train(args, comm, writer, stream):
    from .data import Batches
    from .loaders import default_model_path
    from .optim import AdamW, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup
    from .tokenizer import load_tokenizer

    world = comm.size if comm else 1
    _use_threads(args, comm)
    stream = (stream or sys.stderr) if writer else open(os.devnull, "w")
    model_path = args.model or default_model_path()
    if writer:
        remove_leftovers(args.out)
    ckpt_folder, ckpt_state = _checkpoint_to_resume(args, world, writer)

    tokenizer = load_tokenizer(args.tokenizer or model_path)
    train_ex, val_ex = _examples(args, tokenizer)
    batches = Batches(train_ex, args.batch_size * world, seed=args.seed)  # the global batch
    steps_per_epoch = max(1, len(batches) // args.grad_accum)
    total = args.steps if args.steps else max(1, math.ceil((args.epochs or 1) * steps_per_epoch))
    peft = _adapted_model(args, model_path, ckpt_folder, comm)
    trainable_named = [(name, p) for name, p in peft.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable_named]
    optimizer = AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    make_schedule = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}
    scheduler = make_schedule[args.schedule](optimizer, args.warmup, total)
    start = _restore(ckpt_folder, ckpt_state, optimizer, scheduler, batches, comm) if ckpt_state else 0
    if comm:
        from .distributed import fingerprint

        comm.check_same(fingerprint(args, peft.model, peft, params, batches, val_ex, optimizer, scheduler, start),
                        "at start")

    progress = Progress(total, stream, args.log_every)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    rows = []
    if writer:
        if start:
            rows = read_metrics(metrics_path, start, progress.message)
        elif args.overwrite:  # every check has passed: now the earlier run goes
            remove_run(args.out)
    metrics = MetricsLog(metrics_path if writer else None, rows)
    trainable = sum(p.numel() for p in params)
    progress.message(f"lora_np: {len(train_ex)} train / {len(val_ex)} val examples of {args.seq_len} tokens; "
                     f"{total} steps of {args.batch_size}x{args.grad_accum}"
                     + (f" on each of {world} ranks" if comm else "") + f"; trainable params {trainable:,}"
                     + (f"; resuming at step {start}" if start else ""))

    def checkpoint():
        return _write_checkpoint(args, step, peft, optimizer, scheduler, batches, comm, writer)

    t_start = time.perf_counter()
    elapsed_before = rows[-1].get("elapsed", 0.0) if rows else 0.0
    last_ckpt, saved_step = ckpt_folder, (start if ckpt_folder else None)
    step = start
    with metrics, _CtrlC(progress) as ctrl_c:
        while step < total:
            t0 = time.perf_counter()
            try:
                loss, tokens, lr, stopping = train_step(peft, trainable_named, batches, optimizer, scheduler, step + 1,
                                                        args.grad_accum, args.max_grad_norm, comm, ctrl_c.requested)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(f"{e}. The last good checkpoint is {last_ckpt or '(none written yet)'}") from None
            step += 1
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens / dt,
                   "elapsed": elapsed_before + time.perf_counter() - t_start}
            if comm:
                row["allreduce_s"] = comm.last_allreduce_seconds
            if val_ex and ((args.eval_every and step % args.eval_every == 0) or step == total):
                row["val_loss"] = evaluate(peft, val_ex, args.batch_size, comm)
            metrics.append(row)
            eta = (time.perf_counter() - t_start) / (step - start) * (total - step)
            progress.update(step, loss, lr, tokens / dt, eta, row.get("val_loss"))
            if comm is None:
                stopping = ctrl_c.requested
            if args.stop_at is not None and step >= args.stop_at and step < total:
                stopping = True
            if (args.save_every and step % args.save_every == 0) or stopping:
                last_ckpt, saved_step = checkpoint(), step
                if writer:
                    try_write_loss_svg(metrics.rows, args.out, progress)
            if stopping:
                progress.message(f"stopped at step {step}; resume with --resume (checkpoint {last_ckpt})")
                return {"steps": step, "interrupted": True, "checkpoint": last_ckpt, "rows": metrics.rows}
    if saved_step != step:
        last_ckpt = checkpoint()
    done = f"done: {step} steps; adapter written to {args.out}"
    if comm:
        from .distributed import crc32_arrays

        adapter_crc = crc32_arrays((str(i), p.data) for i, p in enumerate(params))
        comm.check_same({"adapter weights (crc32)": adapter_crc}, "at the end (their optimizer steps diverged)")
        done += f"; adapter crc32 {adapter_crc} on all {world} ranks"
    if writer:
        save_adapter(peft, args.out)
        try_write_loss_svg(metrics.rows, args.out, progress)
    progress.message(done)
    rows = metrics.rows
    return {"steps": step, "interrupted": False, "checkpoint": last_ckpt, "rows": rows, "model": peft,
            "tokenizer": tokenizer, "final_loss": rows[-1]["loss"] if rows else None,
            "val_loss": rows[-1].get("val_loss") if rows else None}


def train_step(model, named_params, batches, optimizer, scheduler, step, grad_accum=1, max_grad_norm=1.0, comm=None,
               stop=False):
    """Optimizer step number `step` over one global batch: `grad_accum` micro-batches from
    `batches` (with a distributed Communicator, this rank's rows of each, its loss weighted by
    its share of the batch's labelled tokens), one allreduce of gradients, loss and stop flag,
    the finiteness checks, clipping to `max_grad_norm` (0: none), the update and the schedule's
    step. `named_params`: the trainable [(name, parameter)], a bad one named in NonFiniteLoss.
    Returns (loss, tokens, lr, stop): the batch's mean loss, its tokens (all ranks'), the
    learning rate of this update, and `stop` (with comm: true if any rank's was)."""
    params = [p for _, p in named_params]
    loss_sum, tokens = 0.0, 0
    for _ in range(grad_accum):
        ids, labels = batches.next_batch()
        tokens += ids.size
        weight = 1.0
        if comm:  # this rank's rows; weight = its share of the global batch's labelled tokens
            ids, labels, weight = comm.shard(ids, labels)
            if weight == 0:
                continue
        loss = model(ids, labels=labels, return_logits=False).loss
        (loss * (weight / grad_accum)).backward()
        loss_sum += float(loss.data) * weight / grad_accum
    if comm:  # sum gradients, loss and stop flag over the ranks: one allreduce
        comm.step = step
        loss_sum, stop = comm.allreduce_step(params, loss_sum, stop)
    if not math.isfinite(loss_sum):
        raise _non_finite(f"loss is {loss_sum}", step)
    if max_grad_norm:
        clip_grad_norm_(params, max_grad_norm)
    lr = optimizer.param_groups[0]["lr"]
    with np.errstate(over="ignore", invalid="ignore"):  # checked on the next line, named there
        optimizer.step()
    bad = _first_nonfinite(named_params)  # the same on every rank: their parameters are identical
    if bad:
        raise _non_finite(f"parameter {bad} is not finite after the update (lr {lr:g})", step)
    scheduler.step()
    optimizer.zero_grad()
    return loss_sum, tokens, lr, stop


def _non_finite(what, step):
    return NonFiniteLoss(f"{what} at step {step}; stopping, nothing of step {step} was written")


def _first_nonfinite(named_params):
    """The name of the first parameter with a NaN or infinite element, else None."""
    return next((name for name, p in named_params if not np.isfinite(p.data).all()), None)


# -- setting a run up ---------------------------------------------------------------------------
_RESUME_MUST_MATCH = ("data", "val_data", "model", "tokenizer", "r", "alpha", "dropout", "targets", "rslora", "dora",
                      "batch_size", "seq_len", "grad_accum", "val_fraction", "seed", "dtype", "schedule")


def _communicator(args):
    """A distributed.Communicator when this run is data-parallel, else None."""
    from .distributed import Communicator, launched_by_mpi

    use = launched_by_mpi() if args.distributed is None else args.distributed
    return Communicator(args.allreduce_timeout) if use else None


def _use_threads(args, comm):
    """Keep freed memory for the next step; --threads, or this machine's cores shared among its ranks."""
    keep_freed_memory()
    if args.threads:
        set_threads(args.threads)
    elif comm:
        set_threads(max(1, (os.cpu_count() or 1) // comm.local_size))


def _checkpoint_to_resume(args, world, writer):
    """(folder, trainer state) of the checkpoint --resume continues, else (None, None); OptionError
    when a setting differs from the checkpoint's, RunExists when --out holds a run to keep."""
    if not args.resume:
        if writer and not args.overwrite and earlier_run(args.out):
            raise RunExists(f"--out {args.out} already holds a run ({', '.join(earlier_run(args.out))}): continue "
                            f"it with --resume, or replace it with --overwrite")
        return None, None
    folder, state = load_checkpoint(args.out)
    saved = state["args"]
    for key in _RESUME_MUST_MATCH:
        if saved.get(key) != getattr(args, key):
            raise OptionError(f"--resume: {key} was {saved.get(key)!r} in the checkpoint, now {getattr(args, key)!r}")
    if state.get("world_size", 1) != world:
        raise OptionError(f"--resume: the checkpoint was written by {state.get('world_size', 1)} ranks, "
                          f"now {world}; resume with the same number (the global batch depends on it)")
    return folder, state


def _examples(args, tokenizer):
    """(train examples, validation examples): --val-data, else --val-fraction of --data."""
    from .data import load_examples, train_val_split

    examples = load_examples(args.data, tokenizer, args.seq_len)
    if args.val_data:
        return examples, load_examples(args.val_data, tokenizer, args.seq_len)
    if args.val_fraction > 0 and len(examples) > 1:
        return train_val_split(examples, args.val_fraction, args.seed)
    return examples, []


def _adapted_model(args, model_path, ckpt_folder, comm):
    """The base model with its LoRA adapter, in training mode: the checkpoint's, or a new one."""
    from .generation import context_length
    from .loaders import load_model
    from .lora import LoraModel, get_peft_model

    model = load_model(model_path, dtype=args.dtype, quantize=args.quantize, dequantize=args.dequantize)
    if args.grad_checkpoint:
        model.gradient_checkpointing_enable()
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
        if comm and comm.size > 1:
            F.manual_seed([args.seed, comm.rank])  # same LoRA init everywhere, each rank its own dropout masks
    return peft.train()


def _lora_config(args, model_path):
    from .lora import LoraConfig

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    return LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                      target_modules=targets if targets != ["all-linear"] else "all-linear",
                      use_rslora=args.rslora, use_dora=args.dora, task_type="CAUSAL_LM",
                      base_model_name_or_path=os.path.basename(model_path))


def _restore(folder, state, optimizer, scheduler, batches, comm):
    """Load a checkpoint's optimizer, scheduler, data position and dropout RNG; returns its step."""
    from .optim import unflatten_state_dict

    try:
        arrays = safetensors.load_file(os.path.join(folder, "optimizer.safetensors"), mmap=False)
        optimizer.load_state_dict(unflatten_state_dict(arrays, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(state["batches"])
        rng = state["rng_ranks"][comm.rank] if comm and comm.size > 1 else state["rng"]
        F.default_generator().bit_generator.state = rng
    except (ValueError, KeyError, TypeError, IndexError, OSError) as e:
        raise RunFileError(f"{folder}: the checkpoint's optimizer, scheduler, data or RNG state does not "
                           f"load: {e}") from e
    return state["step"]


def _write_checkpoint(args, step, peft, optimizer, scheduler, batches, comm, writer):
    """A checkpoint of `step`, written by rank 0 with every rank's dropout RNG state; every rank
    returns its folder, and only once it is on disk."""
    rng = F.default_generator().bit_generator.state
    world = comm.size if comm else 1
    extra = {"world_size": world}
    if world > 1:
        extra["rng_ranks"] = comm.allgather_json(rng, "the checkpoint's dropout RNG gather")
    folder = save_checkpoint(args.out, step, peft, optimizer, scheduler, batches.state_dict(), rng, args, extra) \
        if writer else None
    if world > 1:  # no rank moves on before the checkpoint is on disk: a rank dying later can't cut the write short
        folder = comm.allgather_json(folder, "the checkpoint write")[0]
    return folder


class _CtrlC:
    """While entered (in the main thread): the first Ctrl-C sets `requested` (the run finishes
    its step and writes a checkpoint), a second one raises KeyboardInterrupt."""

    def __init__(self, progress):
        self.progress, self.requested, self._old = progress, False, None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.progress.message("interrupt: finishing this step, then writing a checkpoint (Ctrl-C again to abort)")

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
