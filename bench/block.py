"""Forward + backward of one SmolLM2-shaped decoder block: lora_np against PyTorch CPU.

Shapes: hidden 576, 9 query / 3 key-value heads (head dim 64), SwiGLU width 1536,
RMSNorm eps 1e-5, RoPE base 100000; batch 4 x 256 tokens, float32. Every block weight
is frozen (requires_grad False, as under LoRA) but the input gradient is computed, so
each side does the forward, then the input-gradient half of the backward.

    python bench/block.py [--reps 10] [--threads 2] [--profile]

Time: both blocks get the same weights, input and output gradient; one step is
`out = block(x); out.backward(R)`. The two are interleaved (lora_np, torch, lora_np,
...) in one process so that machine noise hits both alike; the median of `--reps`
steps after one warm-up step is reported, with the ratio torch_time / lora_np_time
(>= 1 means lora_np is at least as fast).

Memory: each framework runs in its own fresh subprocess, with glibc's
MALLOC_MMAP_THRESHOLD_=65536 so that every large array is its own mmap and goes back
to the OS when freed (RSS then follows live memory instead of allocator caches).
After one warm-up step the peak-RSS counter is reset (/proc/self/clear_refs = 5);
"saved" is the RSS growth from before the forward to after it (what the block keeps
for backward, plus the output), "peak" is the peak RSS during forward + backward
minus the RSS before it. For lora_np, tracemalloc's peak of NumPy allocations in the
same step is printed as a cross-check of the RSS method.

Threads: torch.set_num_threads(n) and OPENBLAS_NUM_THREADS=OMP_NUM_THREADS=n, set
before NumPy is imported.

--profile: time every lora_np Function's forward and backward over the steps (each op's
smallest per-step total, in ms) instead of the comparison.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, EPS, THETA = 576, 9, 3, 64, 1536, 1e-5, 100000.0
BATCH, SEQ = 4, 256


def _set_threads(n):
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def make_inputs(seed=0):
    """Weights (HF names), input x (B, T, C) and output gradient R (B, T, C), float32."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def w(out, inp):
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    weights = {
        "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
        "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
        "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
        "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
        "mlp.gate_proj.weight": w(FFN, HIDDEN),
        "mlp.up_proj.weight": w(FFN, HIDDEN),
        "mlp.down_proj.weight": w(HIDDEN, FFN),
    }
    x = rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)
    r = rng.standard_normal((BATCH, SEQ, HIDDEN)).astype(np.float32)
    return weights, x, r


def lora_np_step_fn(weights, x, r):
    """A closure running one forward + backward of the lora_np block; returns (out, dx)."""
    import numpy as np

    import lora_np
    from lora_np import functional as F
    from lora_np.models.llama import DecoderBlock

    block = DecoderBlock(HIDDEN, HEADS, KV_HEADS, FFN, head_dim=HEAD_DIM, eps=EPS, dtype=np.float32)
    block.load_state_dict(weights)
    block.requires_grad_(False)
    cos, sin = F.rope_cos_sin(np.arange(SEQ), HEAD_DIM, THETA, np.float32)          # (T, D)

    def step():
        xt = lora_np.Tensor(x, requires_grad=True)
        out = block(xt, cos, sin)
        out.backward(r)
        return out.data, xt.grad

    def forward_only():
        xt = lora_np.Tensor(x, requires_grad=True)
        return xt, block(xt, cos, sin)

    return step, forward_only


def torch_step_fn(weights, x, r, threads):
    """The same block as transformers' LlamaDecoderLayer (sdpa attention), float32."""
    import torch
    import transformers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.set_num_threads(threads)
    cfg = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS,
                                   num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, rms_norm_eps=EPS,
                                   rope_theta=THETA, num_hidden_layers=1, attn_implementation="sdpa")
    layer = LlamaDecoderLayer(cfg, layer_idx=0).float().eval()
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    layer.requires_grad_(False)
    rope = LlamaRotaryEmbedding(cfg)
    pos = torch.arange(SEQ)[None]
    xt0 = torch.from_numpy(x)
    cos, sin = rope(xt0, pos)
    rt = torch.from_numpy(r)

    def step():
        xt = xt0.clone().requires_grad_(True)
        out = layer(xt, position_embeddings=(cos, sin))
        out.backward(rt)
        return out.detach().numpy(), xt.grad.numpy()

    def forward_only():
        xt = xt0.clone().requires_grad_(True)
        return xt, layer(xt, position_embeddings=(cos, sin))

    return step, forward_only


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(which, threads):
    """Run in a fresh subprocess: RSS growth (MiB) for the forward ('saved') and fwd+bwd ('peak')."""
    weights, x, r = make_inputs()
    if which == "lora_np":
        step, forward_only = lora_np_step_fn(weights, x, r)
    else:
        step, forward_only = torch_step_fn(weights, x, r, threads)
    step()  # warm-up: lazy imports, kernel selection, thread pools
    result = {}
    base = _rss_kb("VmRSS")
    xt, out = forward_only()
    result["saved_mib"] = (_rss_kb("VmRSS") - base) / 1024
    del xt, out
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _rss_kb("VmRSS")
    step()
    result["peak_mib"] = (_rss_kb("VmHWM") - base) / 1024
    if which == "lora_np":
        import tracemalloc

        tracemalloc.start()
        step()
        result["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return result


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def run_timing(reps, threads):
    import numpy as np

    weights, x, r = make_inputs()
    np_step, _ = lora_np_step_fn(weights, x, r)
    torch_step, _ = torch_step_fn(weights, x, r, threads)
    a_out, a_dx = np_step()
    b_out, b_dx = torch_step()
    err_out = float(np.abs(a_out - b_out).max() / np.abs(b_out).max())
    err_dx = float(np.abs(a_dx - b_dx).max() / np.abs(b_dx).max())
    times = {"lora_np": [], "torch": []}
    for _ in range(reps):
        for name, step in (("lora_np", np_step), ("torch", torch_step)):
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {"median_s": {k: _median(v) for k, v in times.items()},
            "min_s": {k: min(v) for k, v in times.items()},
            "max_rel_diff": {"out": err_out, "dx": err_dx}}


def run_profile(reps):
    """Per-op times of the lora_np step: each Function's forward/backward, smallest per-step total."""
    from lora_np.tensor import Function

    times = {}

    def timed(cls, name):
        method = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            t0 = time.perf_counter()
            result = method(self, *args, **kwargs)
            times.setdefault((cls.__name__, name), []).append(time.perf_counter() - t0)
            return result
        setattr(cls, name, wrapper)

    for cls in Function.__subclasses__():
        for name in ("forward", "backward"):
            if name in cls.__dict__:
                timed(cls, name)
    step, _ = lora_np_step_fn(*make_inputs())
    step()
    times.clear()
    totals = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        totals.append(time.perf_counter() - t0)
    rows = []
    for (op, name), ts in times.items():
        per = len(ts) // reps
        rows.append((min(sum(ts[i * per:(i + 1) * per]) for i in range(reps)), op, name, per))
    print(f"lora_np step: median {1e3 * _median(totals):.1f} ms, min {1e3 * min(totals):.1f} ms; per op (min over steps):")
    for t, op, name, per in sorted(rows, reverse=True):
        print(f"  {1e3 * t:8.2f} ms  {op:12s} {name:8s} x{per}")


def _blas_info():
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl not installed"
    return "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} threads={i.get('num_threads')}"
                     for i in threadpool_info() if i.get("user_api") == "blas")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory", choices=["lora_np", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--profile", action="store_true", help="per-op times of the lora_np step only")
    args = ap.parse_args()
    _set_threads(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if args.memory:
        print(json.dumps(measure_memory(args.memory, args.threads)))
        return
    if args.profile:
        run_profile(args.reps)
        return

    t = run_timing(args.reps, args.threads)
    m = {}
    if not args.no_memory:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        for which in ("lora_np", "torch"):
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory", which,
                                  "--threads", str(args.threads)], env=env, check=True,
                                 capture_output=True, text=True).stdout
            m[which] = json.loads(out.strip().splitlines()[-1])

    import numpy as np
    import torch

    print(f"SmolLM2 block fwd+bwd, batch {BATCH}x{SEQ}, float32, frozen weights, {args.threads} threads, "
          f"{args.reps} reps; numpy {np.__version__} ({_blas_info()}), torch {torch.__version__}")
    print(f"agreement (max abs diff / max abs): out {t['max_rel_diff']['out']:.1e}, dx {t['max_rel_diff']['dx']:.1e}")
    med, mn = t["median_s"], t["min_s"]
    print(f"{'':10s} {'median ms':>10s} {'min ms':>8s} {'saved MiB':>10s} {'peak MiB':>9s}")
    for k in ("lora_np", "torch"):
        mem = m.get(k, {})
        print(f"{k:10s} {1e3 * med[k]:10.1f} {1e3 * mn[k]:8.1f} {mem.get('saved_mib', float('nan')):10.1f} "
              f"{mem.get('peak_mib', float('nan')):9.1f}")
    print(f"speed ratio torch/lora_np (median): {med['torch'] / med['lora_np']:.2f}x")
    if m:
        print(f"memory ratio lora_np/torch: saved {m['lora_np']['saved_mib'] / m['torch']['saved_mib']:.2f}, "
              f"peak {m['lora_np']['peak_mib'] / m['torch']['peak_mib']:.2f}; "
              f"lora_np tracemalloc peak {m['lora_np']['tracemalloc_peak_mib']:.1f} MiB")


if __name__ == "__main__":
    main()
