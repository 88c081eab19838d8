"""Data-parallel training over MPI (mpi4py): K processes ("ranks"), one model copy each.

    mpiexec -n 2 lora-np train --data train.jsonl --out runs/a --batch-size 4 --threads 1

`lora-np train` switches this on by itself when it runs under an MPI launcher with more
than one rank (or with `--distributed`). What the ranks agree on:

- The global batch is K · batch_size rows. Every rank draws the same global batch from
  the same seeded `Batches(examples, K · batch_size)` and keeps its own contiguous slice
  (`shard`), so the data position is global and a checkpoint resumes with the same K.
- Each rank scales its mean loss by n_rank / n_global (its share of the labelled tokens of
  the whole global batch, which every rank can count because it holds the whole batch).
  The SUM over ranks of the gradients is then exactly the gradient of the global mean
  loss, the one a single process with batch K · b computes; only the order of float
  additions differs. (With dropout each rank draws its own masks from its own generator,
  saved per rank in checkpoints; that run is statistically, not bitwise, the one-process run.)
- One allreduce per optimizer step: every trainable gradient, a has-gradient flag per
  parameter, the step's loss and a stop flag (Ctrl-C on any rank stops all after the same
  step) are concatenated into one flat buffer (`allreduce_step`).
- Every wait is a non-blocking request polled against a deadline (`timeout`, default
  120 s, `--allreduce-timeout` or LORA_NP_ALLREDUCE_TIMEOUT). A peer that died or stalled
  makes the waiting rank print which rank and step it was and call MPI_Abort, which
  ends every rank; a checkpoint is written atomically, and every rank waits at a
  checkpoint step until rank 0 has written it, so the last one stays whole.
- At start the ranks allgather a fingerprint (base weights, adapter config and weights,
  data, settings, resume state) and stop with a message naming what differs on which rank
  (`check_same`); at the end they compare a checksum of the trained adapter.

mpi4py is imported only when a `Communicator` is made: the library never needs it.
"""
import json
import os
import sys
import time
import zlib

import numpy as np

__all__ = ["Communicator", "DistributedMismatch", "launched_by_mpi", "current", "shard", "crc32_arrays", "fingerprint",
           "TIMEOUT_ENV", "DEFAULT_TIMEOUT"]

TIMEOUT_ENV = "LORA_NP_ALLREDUCE_TIMEOUT"
DEFAULT_TIMEOUT = 120.0
_SIZE_ENV = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")  # MPICH/Intel, Open MPI
_current = [None]
# TrainArgs fields that may differ between ranks: paths (each machine has its own; the
# contents are compared instead), threads, and what only rank 0 uses.
_PER_RANK_SETTINGS = ("data", "val_data", "model", "tokenizer", "out", "threads", "log_every", "distributed",
                      "allreduce_timeout")


class DistributedMismatch(ValueError):
    """The ranks disagree on something that must be identical (model, data, settings, ...)."""


def launched_by_mpi():
    """True when an MPI launcher started this process as one of several ranks."""
    for key in _SIZE_ENV:
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 1:
            return True
    return False


def current():
    """The Communicator of this process's distributed run, or None."""
    return _current[0]


def crc32_arrays(named):
    """CRC-32 over (name, dtype, shape, bytes) of each (name, array) pair, in the order given."""
    crc = 0
    for name, array in named:
        array = np.ascontiguousarray(array)
        crc = zlib.crc32(f"{name}:{array.dtype.str}:{array.shape}".encode(), crc)
        crc = zlib.crc32(memoryview(array).cast("B"), crc)
    return f"{crc:08x}"


def fingerprint(args, model, peft, params, batches, val_examples, optimizer, scheduler, start):
    """What must be identical on every rank before the first step, as a JSON-able dict."""
    import dataclasses

    from .optim import flatten_state_dict

    settings = {k: v for k, v in dataclasses.asdict(args).items() if k not in _PER_RANK_SETTINGS}
    frozen = [(name, p.data) for name, p in peft.named_parameters() if not p.requires_grad]
    val = [(str(i), np.stack(e)) for i, e in enumerate(val_examples)]
    position = batches.state_dict()
    return {**{f"--{k.replace('_', '-')}": v for k, v in settings.items()},
            "model config": model.config.to_dict(),
            "base model weights (crc32)": crc32_arrays(frozen),
            "adapter config": peft.peft_config["default"].to_dict(),
            "adapter weights (crc32)": crc32_arrays((str(i), p.data) for i, p in enumerate(params)),
            "train data (examples, crc32)": [position["num_examples"], f"{position['data_crc32']:08x}"],
            "validation data (crc32)": crc32_arrays(val),
            "data position (epoch, batch)": [position["epoch"], position["position"]],
            "optimizer state (crc32)": crc32_arrays(sorted(flatten_state_dict(optimizer.state_dict())[0].items())),
            "scheduler": scheduler.state_dict(),
            "start step": start}


def _differences(a, b, prefix=""):
    """(key, a's value, b's value) for each key whose values differ, looking inside nested dicts."""
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            yield from _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            yield f"{prefix}{key}", x, y


def _labelled(labels, ignore_index=-100):
    """Tokens with a loss in a batch: labels[:, 1:] (position 0 is never predicted)."""
    return int((labels[:, 1:] != ignore_index).sum())


def shard(ids, labels, rank, size):
    """(ids, labels, weight): rank's rows of a global batch [B, T] (a contiguous slice,
    B / size rows when it divides) and its loss weight n_rank / n_global, the rank's share
    of the labelled tokens (NaN when the global batch has none, as its mean loss is)."""
    rows = np.array_split(np.arange(len(ids)), size)[rank]
    n_global = _labelled(labels)
    weight = _labelled(labels[rows]) / n_global if n_global else float("nan")
    return ids[rows], labels[rows], weight


class Communicator:
    """This process's place in MPI_COMM_WORLD, with deadline-bounded collectives."""

    def __init__(self, timeout=None, comm=None):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise ImportError(f"distributed training needs mpi4py and an MPI library ({e}); "
                              "install them with: pip install 'lora_np[distributed]'") from None
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.local_size = self.comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()  # ranks on this machine
        if timeout is None:
            timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT))
        if not timeout > 0:
            raise ValueError(f"allreduce timeout must be > 0 seconds, got {timeout}")
        self.timeout = timeout
        self.step = 0  # the optimizer step being reduced, for messages
        self.last_allreduce_seconds = 0.0  # the last allreduce_step's wait (transfer + waiting for the slowest rank)
        _current[0] = self

    # -- sharding ---------------------------------------------------------------------------
    def shard(self, ids, labels):
        return shard(ids, labels, self.rank, self.size)

    # -- collectives ------------------------------------------------------------------------
    def abort(self, message, code=1):
        """Print `message` naming this rank and step, then end every rank (MPI_Abort)."""
        print(f"lora-np train: rank {self.rank}/{self.size}, step {self.step}: {message}", file=sys.stderr, flush=True)
        time.sleep(0.5)  # let the launcher forward the line before it tears the job down
        self.comm.Abort(code)

    def _wait(self, request, what):
        """Poll `request` until it completes; abort all ranks after `timeout` seconds."""
        start = time.monotonic()
        deadline, pause = start + self.timeout, 1e-5
        try:
            while not request.Test():  # each Test also moves the transfer on: spin for 5 ms, then back off
                now = time.monotonic()
                if now < start + 5e-3:
                    continue
                if now > deadline:
                    self.abort(f"{what} got no answer within {self.timeout:g} s: another rank died, stalled or "
                               f"is unreachable. Stopping all ranks; the last checkpoint is intact "
                               f"(set {TIMEOUT_ENV} or --allreduce-timeout for slower steps)")
                time.sleep(pause)
                pause = min(2 * pause, 1e-3)
        except self.MPI.Exception as e:
            self.abort(f"{what} failed: {e.Get_error_string()}")

    def allreduce_sum_(self, buffer, what):
        """Sum a float64/float32 ndarray over all ranks, in place."""
        self._wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM), what)
        return buffer

    def allreduce_step(self, params, loss, stop):
        """One allreduce for an optimizer step: sum the trainable gradients (in place, into
        `.grad`; None where no rank had one), the loss and the stop flag. Returns (loss, stop)."""
        dtype = np.result_type(*(p.data.dtype for p in params))
        sizes = [p.data.size for p in params]
        bucket = np.zeros(sum(sizes) + len(params) + 2, dtype)  # grads | has-grad flags | loss | stop
        offset = 0
        for i, (p, n) in enumerate(zip(params, sizes)):
            if p.grad is not None:
                bucket[offset:offset + n] = p.grad.ravel()
                bucket[sum(sizes) + i] = 1
            offset += n
        bucket[-2], bucket[-1] = loss, float(stop)
        t0 = time.perf_counter()
        self.allreduce_sum_(bucket, "the gradient allreduce")
        self.last_allreduce_seconds = time.perf_counter() - t0
        offset = 0
        for i, (p, n) in enumerate(zip(params, sizes)):
            p.grad = bucket[offset:offset + n].reshape(p.data.shape) if bucket[sum(sizes) + i] else None
            offset += n
        return float(bucket[-2]), bool(bucket[-1])

    def allgather_json(self, obj, what):
        """[obj of rank 0, obj of rank 1, ...] for a JSON-able obj."""
        data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
        lengths = np.zeros(self.size, np.int64)
        self._wait(self.comm.Iallgather(np.array([len(data)], np.int64), lengths), what)
        padded = np.zeros(int(lengths.max()), np.uint8)
        padded[:len(data)] = data
        gathered = np.zeros((self.size, len(padded)), np.uint8)
        self._wait(self.comm.Iallgather(padded, gathered), what)
        return [json.loads(bytes(row[:n])) for row, n in zip(gathered, lengths)]

    def check_same(self, fingerprint, when):
        """Raise DistributedMismatch on every rank, naming each key whose value differs from rank 0's."""
        everyone = self.allgather_json(fingerprint, f"the {when} consistency check")
        problems = [f"{key}: rank 0 has {ours!r}, rank {r} has {theirs!r}"
                    for r, other in enumerate(everyone[1:], 1)
                    for key, ours, theirs in _differences(everyone[0], other)]
        if problems:
            raise DistributedMismatch(f"the {self.size} ranks disagree {when}: " + "; ".join(problems))
