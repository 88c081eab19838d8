"""Benchmark of the LoRA branch: lora_np's C core vs the NumPy composition vs PyTorch eager.

    python bench/lora_kernels.py            # CPU: the table of issue 4 (float32)
    python bench/lora_kernels.py --quick    # CPU: N=4096, 576x1536, r=8 only
    python bench/lora_kernels.py --cuda     # GPU: lora_np's CUDA build vs PyTorch eager CUDA
    python bench/lora_kernels.py --threads 1  # one thread for C and PyTorch (NumPy: set OPENBLAS_NUM_THREADS=1)

One run, every implementation timed in turn round after round (interleaved), medians.
The NumPy composition is lora_np's "numpy" backend (the best composition: scaling applied
to the [N, r] factor, one [N, out] temporary); PyTorch eager does the same math with
in-place addmm_ (its best eager form). Bandwidth is the traffic the op cannot avoid
(read x, read+write y; read dy and x, read+write dx; read+write the weight) over the time,
compared with a plain copy (np.copyto of 256 MB: bytes read + written) timed in the same rounds.

OPENBLAS_THREAD_TIMEOUT=4 (unless set): after each call OpenBLAS's idle threads otherwise spin for
about 0.1 s and take the cores from whatever is timed next (here: C after a NumPy call ran at half
speed). The `lora-np` command sets the same, and NumPy's own times do not change with it.
"""
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before NumPy loads OpenBLAS

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from lora_np import kernels  # noqa: E402

SHAPES = [(576, 576), (576, 1536), (4096, 4096)]
RANKS = [8, 16, 64]
TOKENS = [1024, 4096]


def median_times(fns, rounds):
    """{name: median seconds}, calling each fn once per round, in turn. Each round starts one
    implementation further on, so that none always runs first after the 256 MB copy (cold caches)
    or always right after another one (warm caches, or its idle threads still spinning)."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up
        fn()
    order = list(fns.items())
    for i in range(rounds):
        for name, fn in order[i % len(order):] + order[:i % len(order)]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def lora_case(N, n_in, out, r, rng, torch):
    """Closures for forward+backward of each implementation, sharing the same data."""
    f32 = np.float32
    x, dy = rng.standard_normal((N, n_in), f32), rng.standard_normal((N, out), f32)
    lora_A = (rng.standard_normal((r, n_in)) / np.sqrt(n_in)).astype(f32)
    lora_B = (rng.standard_normal((out, r)) / np.sqrt(r)).astype(f32)
    y, dx = np.zeros((N, out), f32), np.zeros((N, n_in), f32)
    dA, dB = np.zeros((r, n_in), f32), np.zeros((out, r), f32)
    s = 2.0
    t_box = [None]

    def on(backend, what):
        def forward():
            kernels.set_backend(backend)
            t_box[0] = kernels.lora_forward(y, x, lora_A, lora_B, s)

        def backward():
            kernels.set_backend(backend)
            kernels.lora_backward(dx, dA, dB, dy, x, t_box[0], lora_A, lora_B, s)

        return forward if what == "fwd" else backward

    fns = {f"{b} {w}": on(b, w) for b in ("c", "numpy") for w in ("fwd", "bwd")}
    if torch is not None:
        tx, tdy, ta, tb, ty, tdx, tda, tdb = (torch.from_numpy(a) for a in (x, dy, lora_A, lora_B, y, dx, dA, dB))
        tt = [None]

        def torch_fwd():
            tt[0] = tx @ ta.T
            ty.addmm_(tt[0], tb.T, alpha=s)

        def torch_bwd():
            g = tdy @ tb
            tda.addmm_(g.T, tx, alpha=s)
            tdb.addmm_(tdy.T, tt[0], alpha=s)
            tdx.addmm_(g, ta, alpha=s)

        fns["torch fwd"], fns["torch bwd"] = torch_fwd, torch_bwd
    fwd_bytes = 4 * (N * n_in + 2 * N * out)
    bwd_bytes = 4 * (N * out + 3 * N * n_in)
    return fns, fwd_bytes, bwd_bytes


def merge_case(n_in, out, r, rng, torch):
    f32 = np.float32
    weight = rng.standard_normal((out, n_in), f32)
    lora_A, lora_B = rng.standard_normal((r, n_in), f32), rng.standard_normal((out, r), f32)
    s = 0.5

    def c_merge():
        kernels.set_backend("c")
        kernels.lora_merge(weight, lora_A, lora_B, s)

    def numpy_merge():  # the plain composition, with its [out, in] temporary
        np.add(weight, s * (lora_B @ lora_A), out=weight)

    fns = {"c merge": c_merge, "numpy merge": numpy_merge}
    if torch is not None:
        tw, ta, tb = torch.from_numpy(weight), torch.from_numpy(lora_A), torch.from_numpy(lora_B)
        fns["torch merge"] = lambda: tw.addmm_(tb, ta, alpha=s)
    return fns, 8 * out * n_in


def cpu(args):
    try:
        import torch

        torch.set_num_threads(kernels.get_num_threads())
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    src, dst = np.ones(2**26, np.float32), np.empty(2**26, np.float32)  # 256 MB each
    copy = {"copy": lambda: np.copyto(dst, src)}
    copy_bytes = 2 * src.nbytes
    print(f"threads: {kernels.get_num_threads()}, torch: {torch.__version__ if torch else 'absent'}, float32, "
          f"medians of {args.rounds} interleaved rounds")
    cases = [(4096, 576, 1536, 8)] if args.quick else [(N, i, o, r) for N in TOKENS for i, o in SHAPES for r in RANKS]
    head = (f"{'N':>5} {'in x out':>10} {'r':>3} | {'C fwd+bwd ms':>12} {'numpy':>8} {'torch':>8} | "
            f"{'np/C':>5} {'th/C':>5} | {'C GB/s':>6} {'%copy':>5}")
    print(head)
    for N, n_in, out, r in cases:
        fns, fwd_bytes, bwd_bytes = lora_case(N, n_in, out, r, rng, torch)
        med = median_times({**fns, **copy}, args.rounds)
        total = {impl: med[f"{impl} fwd"] + med[f"{impl} bwd"] for impl in ("c", "numpy", "torch") if f"{impl} fwd" in med}
        copy_bw = copy_bytes / med["copy"] / 1e9
        c_bw = (fwd_bytes + bwd_bytes) / total["c"] / 1e9
        th = total.get("torch", float("nan"))
        print(f"{N:>5} {f'{n_in}x{out}':>10} {r:>3} | {total['c'] * 1e3:>12.2f} {total['numpy'] * 1e3:>8.2f} "
              f"{th * 1e3:>8.2f} | {total['numpy'] / total['c']:>5.2f} {th / total['c']:>5.2f} | "
              f"{c_bw:>6.1f} {100 * c_bw / copy_bw:>5.0f}   (fwd {med['c fwd'] * 1e3:.2f} / bwd {med['c bwd'] * 1e3:.2f}; "
              f"copy {copy_bw:.1f} GB/s)")
    print(f"\n{'merge in x out':>15} {'r':>3} | {'C ms':>6} {'numpy':>7} {'torch':>7} | {'np/C':>5} {'th/C':>5} | "
          f"{'C GB/s':>6} {'%copy':>5}")
    merges = [(576, 1536, 8)] if args.quick else [(i, o, r) for i, o in SHAPES for r in RANKS]
    for n_in, out, r in merges:
        fns, nbytes = merge_case(n_in, out, r, rng, torch)
        med = median_times({**fns, **copy}, args.rounds)
        copy_bw = copy_bytes / med["copy"] / 1e9
        c, npy, th = med["c merge"], med["numpy merge"], med.get("torch merge", float("nan"))
        print(f"{f'{n_in}x{out}':>15} {r:>3} | {c * 1e3:>6.2f} {npy * 1e3:>7.2f} {th * 1e3:>7.2f} | {npy / c:>5.2f} "
              f"{th / c:>5.2f} | {nbytes / c / 1e9:>6.1f} {100 * nbytes / c / 1e9 / copy_bw:>5.0f}")


def gpu(args):
    import torch

    from lora_np._cuda import synchronize, to_device

    def timed(fn, sync, reps=50):  # mean seconds per call
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - start) / reps

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, float32; "
          f"mean of 50 calls, median of {args.rounds} interleaved rounds")
    for N, n_in, out, r in [(8192, 4096, 4096, 16), (8192, 576, 1536, 8)]:
        rng = np.random.default_rng(0)
        host = {"x": rng.standard_normal((N, n_in), np.float32), "dy": rng.standard_normal((N, out), np.float32),
                "lora_A": (rng.standard_normal((r, n_in)) / np.sqrt(n_in)).astype(np.float32),
                "lora_B": (rng.standard_normal((out, r)) / np.sqrt(r)).astype(np.float32),
                "y": np.zeros((N, out), np.float32), "dx": np.zeros((N, n_in), np.float32),
                "dA": np.zeros((r, n_in), np.float32), "dB": np.zeros((out, r), np.float32)}
        d = {k: to_device(v) for k, v in host.items()}
        g = {k: torch.from_numpy(v).cuda() for k, v in host.items()}
        s = 2.0
        t = {"ours": kernels.lora_forward(d["y"], d["x"], d["lora_A"], d["lora_B"], s), "torch": g["x"] @ g["lora_A"].T}

        def ours_fwd():
            t["ours"].free()
            t["ours"] = kernels.lora_forward(d["y"], d["x"], d["lora_A"], d["lora_B"], s)

        def ours_bwd():
            kernels.lora_backward(d["dx"], d["dA"], d["dB"], d["dy"], d["x"], t["ours"], d["lora_A"], d["lora_B"], s)

        def torch_fwd():  # REFERENCE.md 5b's composition: x@A.T, @B.T, scale, add
            t["torch"] = g["x"] @ g["lora_A"].T
            g["y"] += (t["torch"] @ g["lora_B"].T) * s

        def torch_bwd():
            gg = g["dy"] @ g["lora_B"]
            g["dA"] += (gg.T @ g["x"]) * s
            g["dB"] += (g["dy"].T @ t["torch"]) * s
            g["dx"] += (gg @ g["lora_A"]) * s

        def torch_addmm_fwd():
            t["torch"] = g["x"] @ g["lora_A"].T
            g["y"].addmm_(t["torch"], g["lora_B"].T, alpha=s)

        def torch_addmm_bwd():
            gg = g["dy"] @ g["lora_B"]
            g["dA"].addmm_(gg.T, g["x"], alpha=s)
            g["dB"].addmm_(g["dy"].T, t["torch"], alpha=s)
            g["dx"].addmm_(gg, g["lora_A"], alpha=s)

        def ours_only(grad):
            def run():
                kernels.lora_backward(*(d[k] if k == grad else None for k in ("dx", "dA", "dB")), d["dy"], d["x"],
                                      t["ours"], d["lora_A"], d["lora_B"], s)
            return run

        fns = {"ours fwd": (ours_fwd, synchronize), "ours bwd": (ours_bwd, synchronize),
               "torch fwd": (torch_fwd, torch.cuda.synchronize), "torch bwd": (torch_bwd, torch.cuda.synchronize),
               "addmm fwd": (torch_addmm_fwd, torch.cuda.synchronize),
               "addmm bwd": (torch_addmm_bwd, torch.cuda.synchronize),
               "ours dx": (ours_only("dx"), synchronize), "ours dA": (ours_only("dA"), synchronize),
               "ours dB": (ours_only("dB"), synchronize)}
        times = {k: [] for k in fns}
        for _ in range(args.rounds):  # interleaved rounds; each entry is the mean of 50 calls
            for k, (f, sync) in fns.items():
                times[k].append(timed(f, sync))
        med = {k: statistics.median(v) for k, v in times.items()}
        ours = med["ours fwd"] + med["ours bwd"]
        floor = 4 * (N * n_in + 2 * N * out + N * out + 3 * N * n_in)
        print(f"N={N} {n_in}x{out} r={r}: lora_np fwd {med['ours fwd'] * 1e6:.0f} us, bwd {med['ours bwd'] * 1e6:.0f} us "
              f"(dx alone {med['ours dx'] * 1e6:.0f}, d_lora_A alone {med['ours dA'] * 1e6:.0f}, "
              f"d_lora_B alone {med['ours dB'] * 1e6:.0f}); torch eager fwd {med['torch fwd'] * 1e6:.0f} us, "
              f"bwd {med['torch bwd'] * 1e6:.0f} us; torch addmm_ fwd {med['addmm fwd'] * 1e6:.0f} us, "
              f"bwd {med['addmm bwd'] * 1e6:.0f} us")
        print(f"    fwd+bwd speed-up vs torch eager {(med['torch fwd'] + med['torch bwd']) / ours:.2f}x, "
              f"vs addmm_ {(med['addmm fwd'] + med['addmm bwd']) / ours:.2f}x; "
              f"lora_np moves the unavoidable bytes at {floor / ours / 1e12:.2f} TB/s")
        for a in d.values():
            a.free()
        t["ours"].free()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only N=4096, 576x1536, r=8")
    parser.add_argument("--cuda", action="store_true", help="the GPU benchmark")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, help="threads for the C core and PyTorch (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        kernels.set_num_threads(args.threads)
    gpu(args) if args.cuda else cpu(args)


if __name__ == "__main__":
    main()
