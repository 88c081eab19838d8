"""Data-parallel LoRA training speed on SmolLM2-135M: tokens/s at K=1 and K=2 ranks on this
machine, the time in the gradient allreduce per step, and on paper K machines on 10 Gbit/s.

    python bench/distributed.py [--steps 4] [--batch-size 4] [--seq-len 256] [--reps 1]

Each run is `lora-np train` (LoRA r=8, alpha 16, no dropout, q_proj,v_proj: 460,800
trainable floats) on packed text (the demo's date conversations as one .txt), one thread
per rank (--threads 1, OPENBLAS/OMP_NUM_THREADS=1): K=1 is `python -m lora_np train`, K=2
is `mpiexec -n 2` of the same with the same per-rank batch (so the global batch doubles).
tokens/s and the allreduce wait are medians over the steps after the first (warm-up), read
from metrics.jsonl (global tokens / step time; `allreduce_s` is rank 0's wait, transfer
plus waiting for the slower rank). A separate 2-rank loop times the allreduce alone (the
same flat float32 buffer, 200 times). A control runs two independent 1-rank trainings at the
same time (no MPI): what two processes get from this machine's cores and memory. --reps
repeats the K=1, K=2, control sequence.

The machine is shared (other jobs run on it): compare numbers from one invocation only.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = 8
TEN_GBIT = 10e9 / 8  # bytes/s
LATENCY = 50e-6  # s per message on TCP over 10 GbE (assumed)

# name: (hidden, layers, heads, kv_heads, intermediate, vocab, r); q_proj,v_proj targets
MODELS = {
    "SmolLM2-135M r=8": (576, 30, 9, 3, 1536, 49152, 8),
    "Llama-3.2-1B-like r=16": (2048, 16, 32, 8, 8192, 128256, 16),
}


def lora_qv_trainable(hidden, layers, heads, kv_heads, intermediate, vocab, r):
    """LoRA on q_proj (hidden -> hidden) and v_proj (hidden -> kv_heads·head_dim): r·(in + out) each."""
    head_dim = hidden // heads
    return layers * r * ((hidden + hidden) + (hidden + kv_heads * head_dim))


def bucket_floats(hidden, layers, heads, kv_heads, intermediate, vocab, r):
    """The step's allreduce buffer: the gradients, a has-gradient flag per tensor (A and B of
    q and v in each block), the loss and the stop flag."""
    return lora_qv_trainable(hidden, layers, heads, kv_heads, intermediate, vocab, r) + 4 * layers + 2


def matmul_params(hidden, layers, heads, kv_heads, intermediate, vocab, r):
    """Weights a token goes through (q, k, v, o, gate, up, down per block, and the LM head)."""
    kv = kv_heads * (hidden // heads)
    return layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate) + vocab * hidden


def allreduce_seconds(floats, k, bandwidth=TEN_GBIT, latency=LATENCY):
    """Ring allreduce of `floats` float32 values over k machines: 2(k-1) messages, each rank
    sending and receiving 2(k-1)/k of the buffer."""
    if k == 1:
        return 0.0
    return 2 * (k - 1) * latency + 2 * (k - 1) / k * floats * 4 / bandwidth


# -- measurements --------------------------------------------------------------------------------
def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _mpiexec():
    exe = shutil.which("mpiexec", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        sys.exit("bench/distributed.py: mpiexec not found; pip install 'lora_np[distributed]'")
    return exe


def make_data(folder):
    """The demo's conversations as one text file, packed by `lora-np train` into seq_len blocks."""
    from lora_np.demo import DATA_DIR

    path = os.path.join(folder, "dates.txt")
    with open(path, "w") as out:
        for name in ("dates_train.jsonl", "dates_test.jsonl"):
            with open(os.path.join(DATA_DIR, name)) as fh:
                out.write(fh.read())
    return path


def start_train(k, data, out, args):
    argv = [sys.executable, "-m", "lora_np", "train", "--data", data, "--out", out, "--r", str(R), "--alpha", "16",
            "--dropout", "0", "--targets", "q_proj,v_proj", "--steps", str(args.steps), "--batch-size",
            str(args.batch_size), "--seq-len", str(args.seq_len), "--val-fraction", "0", "--threads", "1"]
    cmd = [_mpiexec(), "-n", str(k), *argv] if k > 1 else argv
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out


def finish_train(started):
    """The metrics rows of a run from start_train, after its first (warm-up) step."""
    proc, out = started
    log = proc.communicate()[0]
    if proc.returncode:
        sys.exit(f"bench/distributed.py: run {out} failed:\n{log}")
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh][1:]


def allreduce_worker(floats, reps):
    """Under mpiexec: time Communicator.allreduce_sum_ of a float32 buffer; rank 0 prints the median."""
    import numpy as np

    from lora_np.distributed import Communicator

    comm = Communicator()
    buffer = np.ones(floats, np.float32)
    polled, blocking = [], []
    for _ in range(reps + 5):
        comm.comm.Barrier()
        t0 = time.perf_counter()
        comm.allreduce_sum_(buffer, "the benchmark allreduce")
        polled.append(time.perf_counter() - t0)
        comm.comm.Barrier()
        t0 = time.perf_counter()
        comm.comm.Allreduce(comm.MPI.IN_PLACE, buffer)
        blocking.append(time.perf_counter() - t0)
    if comm.rank == 0:
        print(json.dumps({"median_s": statistics.median(polled[5:]), "blocking_s": statistics.median(blocking[5:])}))


def measure_allreduce(floats, reps=200):
    cmd = [_mpiexec(), "-n", "2", sys.executable, os.path.abspath(__file__), "--allreduce-worker", str(floats),
           "--allreduce-reps", str(reps)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- report ----------------------------------------------------------------------------------
def paper(step_seconds_smol, tokens_per_rank):
    """K machines on 10 Gbit/s, one rank each, compute per step scaled by matmul weights from
    the measured single-rank SmolLM2 step (the same per-machine speed as here)."""
    print(f"\nOn paper: K machines, one rank each, 10 Gbit/s, ring allreduce ({LATENCY * 1e6:.0f} us per message "
          f"assumed), no overlap of allreduce and compute; per-machine compute = this machine's measured 1-thread "
          f"step ({step_seconds_smol:.2f} s for SmolLM2 at {tokens_per_rank} tokens), scaled by the weights each "
          f"token passes through (forward + input gradients, ~4 FLOP per weight per token; attention scores "
          f"ignored).")
    smol_weights = matmul_params(*MODELS["SmolLM2-135M r=8"])
    for name, dims in MODELS.items():
        floats = bucket_floats(*dims)
        compute = step_seconds_smol * matmul_params(*dims) / smol_weights
        print(f"\n{name}: {lora_qv_trainable(*dims):,} trainable floats ({floats * 4 / 1e6:.2f} MB per allreduce), "
              f"{matmul_params(*dims) / 1e6:.0f}M matmul weights, compute {compute:.1f} s per {tokens_per_rank}-token "
              f"rank step")
        print(f"  {'K':>4} {'allreduce ms':>13} {'tokens/s':>10} {'efficiency':>10} {'eff. if 20x faster compute':>27}")
        for k in (1, 2, 4, 8, 16, 32, 64):
            comm = allreduce_seconds(floats, k)
            print(f"  {k:>4} {comm * 1e3:>13.2f} {k * tokens_per_rank / (compute + comm):>10.0f} "
                  f"{compute / (compute + comm):>10.2%} {compute / 20 / (compute / 20 + comm):>27.2%}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="steps per run (the first is a warm-up)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per rank")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--reps", type=int, default=1, help="alternating K=1 / K=2 runs")
    p.add_argument("--allreduce-worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--allreduce-reps", type=int, default=200, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.allreduce_worker:
        return allreduce_worker(args.allreduce_worker, args.allreduce_reps)

    sys.path.insert(0, ROOT)
    rows = {1: [], 2: []}
    pair = []  # control: two independent 1-rank runs at the same time, no MPI
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(tmp)
        for rep in range(args.reps):
            for k in (1, 2):
                rows[k] += finish_train(start_train(k, data, os.path.join(tmp, f"k{k}-{rep}"), args))
            both = [start_train(1, data, os.path.join(tmp, f"pair{i}-{rep}"), args) for i in (0, 1)]
            pair += [r for run in both for r in finish_train(run)]
    floats = lora_qv_trainable(*MODELS["SmolLM2-135M r=8"])
    alone = measure_allreduce(bucket_floats(*MODELS["SmolLM2-135M r=8"]))

    tokens = args.batch_size * args.seq_len
    tok_s = {k: statistics.median(r["tokens_per_s"] for r in rows[k]) for k in rows}
    step_s = {k: args.batch_size * args.seq_len * k / tok_s[k] for k in rows}
    wait = statistics.median(r["allreduce_s"] for r in rows[2])
    print(f"SmolLM2-135M, LoRA r={R} on q_proj,v_proj ({floats:,} trainable), batch {args.batch_size}x{args.seq_len} "
          f"per rank, one thread per rank, {os.cpu_count()} cores; medians of {len(rows[1])} steps per K "
          f"(first step of each run dropped; shared machine, noisy)")
    print(f"  K=1: {tok_s[1]:8.1f} tokens/s   step {step_s[1]:.2f} s")
    print(f"  K=2: {tok_s[2]:8.1f} tokens/s   step {step_s[2]:.2f} s   "
          f"global batch {2 * args.batch_size}x{args.seq_len}")
    print(f"  scaling efficiency K=2: {tok_s[2] / (2 * tok_s[1]):.1%} (tokens/s at K=2 over twice K=1)")
    pair_tok_s = 2 * statistics.median(r["tokens_per_s"] for r in pair)
    print(f"  control, two independent 1-rank runs at once (no MPI): {pair_tok_s:.1f} tokens/s together, "
          f"{pair_tok_s / (2 * tok_s[1]):.1%} of twice K=1 (what two processes get from this machine)")
    print(f"  allreduce per step, rank 0's wait inside training: median {wait * 1e3:.2f} ms "
          f"({wait / step_s[2]:.2%} of the step; includes waiting for the slower rank)")
    print(f"  allreduce alone, 2 ranks, {bucket_floats(*MODELS['SmolLM2-135M r=8']) * 4 / 1e6:.2f} MB float32 "
          f"in shared memory: median {alone['median_s'] * 1e3:.3f} ms polled with the deadline "
          f"(blocking MPI_Allreduce: {alone['blocking_s'] * 1e3:.3f} ms)")
    paper(step_s[1], tokens)


if __name__ == "__main__":
    main()
