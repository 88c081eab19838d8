"""Causal attention, forward and backward, at the shapes of the models the step benches train: the C core's
fused attention (lora_np.kernels.attention_forward / attention_backward) against PyTorch's
scaled_dot_product_attention (is_causal, enable_gqa) on the CPU.

    python bench/attention.py [--rounds 9] [--threads 2]

Shapes, batch 4 x 256 positions, float32: SmolLM2-135M (9 query / 3 key-value heads of 64), Qwen3-0.6B
(16 / 8 of 128), Llama-3.2-1B (32 / 8 of 64). Each side runs the forward, then every input gradient
(dq, dk, dv), on the same arrays; the two alternate round by round (bench/lora_kernels.median_times) and
the medians are printed with GFLOP/s counted as causal attention's 2 products forward and 5 backward
(QK^T recomputed, dV, dP, dQ, dK) over the T (T + 1) / 2 visible pairs.
"""
import argparse
import os
import sys

SHAPES = {"smollm2-135m": (4, 9, 3, 256, 64), "qwen3-0.6b": (4, 16, 8, 256, 128), "llama-3.2-1b": (4, 32, 8, 256, 64)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # as the lora-np command sets it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import numpy as np
    import torch

    from lora_kernels import median_times
    from lora_np.kernels import attention_backward, attention_forward

    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, torch {torch.__version__}, median of {args.rounds} rounds")
    print("| shape (B, heads, kv heads, T, D) | lora_np fwd + bwd | torch fwd + bwd | torch / lora_np | "
          "lora_np GFLOP/s |")
    print("|---|---|---|---|---|")
    for name, (B, H, KV, T, D) in SHAPES.items():
        rng = np.random.default_rng(0)
        q = rng.standard_normal((B, H, T, D), np.float32)
        k, v = (rng.standard_normal((B, KV, T, D), np.float32) for _ in range(2))
        g = rng.standard_normal((B, H, T, D), np.float32)
        scale = D ** -0.5

        def ours():
            out, lse = attention_forward(q, k, v, scale, True)
            attention_backward(g, q, k, v, out, lse, scale, True)

        tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
        tg = torch.tensor(g)

        def theirs():
            out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
            out.backward(tg)
            tq.grad = tk.grad = tv.grad = None

        t = median_times({"lora_np": ours, "torch": theirs}, args.rounds)
        flops = 7 * 2 * B * H * (T * (T + 1) // 2) * D
        print(f"| {name} ({B}, {H}, {KV}, {T}, {D}) | {t['lora_np'] * 1e3:.1f} ms | {t['torch'] * 1e3:.1f} ms | "
              f"{t['torch'] / t['lora_np']:.2f}× | {flops / t['lora_np'] / 1e9:.0f} |")


if __name__ == "__main__":
    main()
