"""Benchmark of the C core's GEMM (csrc/gemm_kernels.c) and of a LoRA Linear with the low-rank
branch fused into it, against OpenBLAS (NumPy's @) and OpenBLAS + the separate LoRA kernels.

    python bench/lora_fused.py                        # float32, M=1024 tokens, r=8, the step's shapes
    python bench/lora_fused.py --dtype float64 --rounds 31
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python bench/lora_fused.py --clock cpu   # one thread each

One run, every implementation timed in turn round after round (interleaved), medians (and minima).
--clock cpu times each call by the calling thread's CPU time instead of the wall clock: with one
thread each (as above) it leaves out the time other processes take the core, which on a shared
machine is most of the noise. Columns, per shape (out x in) of the weight, time ratios:
  gemm fwd / bwd     OpenBLAS's time over the C GEMM's: x Wᵀ (gemm_nt), dy W (gemm_nn); > 1: C faster
  fwd sep / fused    x Wᵀ + s(x Aᵀ)Bᵀ over OpenBLAS's x Wᵀ alone: OpenBLAS + lora_forward, then fused
  dx sep / fused     dy W + s(dy B)A over OpenBLAS's dy W alone: OpenBLAS + lora_backward(dx only), fused
  bwd sep / fused    the same with d_lora_A and d_lora_B too (the layer's whole backward)
"""
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before NumPy loads OpenBLAS (see bench/lora_kernels.py)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from lora_np import kernels  # noqa: E402
from lora_np.kernels import gemm  # noqa: E402

SHAPES = [(576, 576), (1536, 576), (576, 1536)]


def interleaved_times(fns, rounds, clock):
    """{name: [seconds per round]}, calling each fn once per round, in turn, each round starting one
    implementation further on (bench/lora_kernels.py's median_times, with a choice of clock)."""
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    order = list(fns.items())
    for i in range(rounds):
        for name, fn in order[i % len(order):] + order[:i % len(order)]:
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def case(M, out, n_in, r, dtype, rng, rounds, clock, stat):
    x, dy = rng.standard_normal((M, n_in)).astype(dtype), rng.standard_normal((M, out)).astype(dtype)
    W = rng.standard_normal((out, n_in)).astype(dtype)
    A = (rng.standard_normal((r, n_in)) / np.sqrt(n_in)).astype(dtype)
    B = (rng.standard_normal((out, r)) / np.sqrt(r)).astype(dtype)
    dA, dB, s = np.zeros_like(A), np.zeros_like(B), 2.0
    t = x @ A.T

    def fwd_sep():
        y = x @ W.T
        kernels.lora_forward(y, x, A, B, s)

    def dx_sep():
        dx = dy @ W
        kernels.lora_backward(dx, None, None, dy, x, t, A, B, s)

    def bwd_sep():
        dx = dy @ W
        kernels.lora_backward(dx, dA, dB, dy, x, t, A, B, s)

    fns = {
        "blas_fwd": lambda: x @ W.T, "gemm_fwd": lambda: gemm.matmul_nt(x, W),
        "blas_bwd": lambda: dy @ W, "gemm_bwd": lambda: gemm.matmul_nn(dy, W),
        "fwd_sep": fwd_sep, "fwd_fused": lambda: gemm.lora_linear_forward(x, W, A, B, s),
        "dx_sep": dx_sep, "dx_fused": lambda: gemm.lora_linear_backward(dy, x, t, W, A, B, s),
        "bwd_sep": bwd_sep, "bwd_fused": lambda: gemm.lora_linear_backward(dy, x, t, W, A, B, s, dA, dB),
    }
    m = {name: stat(ts) for name, ts in interleaved_times(fns, rounds, clock).items()}
    return {
        "gemm fwd": m["blas_fwd"] / m["gemm_fwd"], "gemm bwd": m["blas_bwd"] / m["gemm_bwd"],
        "fwd sep": m["fwd_sep"] / m["blas_fwd"], "fwd fused": m["fwd_fused"] / m["blas_fwd"],
        "dx sep": m["dx_sep"] / m["blas_bwd"], "dx fused": m["dx_fused"] / m["blas_bwd"],
        "bwd sep": m["bwd_sep"] / m["blas_bwd"], "bwd fused": m["bwd_fused"] / m["blas_bwd"],
    }, m["blas_fwd"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu: the thread's CPU time")
    ap.add_argument("--min", action="store_true", help="minima instead of medians")
    ap.add_argument("--shapes", nargs="*", default=[f"{o}x{i}" for o, i in SHAPES], help="out x in, e.g. 576x1536")
    args = ap.parse_args()
    kernels.set_backend("c")
    rng = np.random.default_rng(0)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    stat = min if args.min else statistics.median
    print(f"M={args.tokens} r={args.rank} {args.dtype}, C threads {kernels.get_num_threads()}, {args.rounds} rounds, "
          f"{'minima' if args.min else 'medians'} of {args.clock} time")
    header = None
    for shape in args.shapes:
        out, n_in = (int(v) for v in shape.split("x"))
        ratios, base = case(args.tokens, out, n_in, args.rank, np.dtype(args.dtype), rng, args.rounds, clock, stat)
        if header is None:
            header = "  ".join(f"{k:>9}" for k in ratios)
            print(f"{'out x in':>11}  {'x Wᵀ GF/s':>9}  {header}")
        gflops = 2 * args.tokens * out * n_in / base / 1e9
        print(f"{shape:>11}  {gflops:9.0f}  " + "  ".join(f"{v:9.3f}" for v in ratios.values()), flush=True)


if __name__ == "__main__":
    main()
