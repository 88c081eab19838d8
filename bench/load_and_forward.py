"""Load SmolLM2-135M from its GGUF and run a 256-token forward: lora_np against transformers.

Each side runs in its own worker process (bench/_workers.py): the load is timed once
(wall time of load_model / from_pretrained(gguf_file=...), dequantizing to float32),
with the peak RSS after loading; then the forwards of a (1, 256) batch (no grad)
alternate between the two workers, medians of --reps after one warm-up. The float32
weights are 134.5M x 4 B = 538 MB (the target is peak RSS while loading <= 1.5x that).

    python bench/load_and_forward.py [--reps 5] [--threads 2]
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _workers as W  # noqa: E402

SEQ = 256


def _ids():
    import numpy as np

    return np.random.default_rng(0).integers(0, 49152, (1, SEQ))


def lora_np_worker():
    import lora_np

    state = {}

    def setup():
        t = time.perf_counter()
        state["model"] = lora_np.load_model()
        load = time.perf_counter() - t
        state["ids"] = _ids()
        return {"load_s": load, "rss_after_load_mb": W.peak_rss_mb(),
                "weights_mb": sum(p.numel() for p in state["model"].parameters()) * 4 / 2**20}

    def step():
        with lora_np.no_grad():
            state["model"](state["ids"])

    return setup, step


def torch_worker(threads):
    import torch

    torch.set_num_threads(threads)
    state = {}

    def setup():
        t = time.perf_counter()
        state["model"] = W.load_torch_smollm2().eval()
        load = time.perf_counter() - t
        state["ids"] = torch.tensor(_ids())
        return {"load_s": load, "rss_after_load_mb": W.peak_rss_mb()}

    def step():
        with torch.no_grad():
            state["model"](state["ids"])

    return setup, step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        W.serve(*(lora_np_worker() if args.worker == "lora_np" else torch_worker(args.threads)))
        return
    print(W.machine())
    workers = [W.Worker(__file__, "lora_np", [], args.threads), W.Worker(__file__, "transformers", [], args.threads)]
    times = W.interleave(workers, args.reps)
    facts = {w.name: w.facts for w in workers}
    for w in workers:
        w.close()
    a, b = facts["lora_np"], facts["transformers"]
    fa, fb = W.median(times["lora_np"]), W.median(times["transformers"])
    print(json.dumps({"facts": facts, "forward_s": times}, indent=1))
    print(f"\n| | load | peak RSS after load | forward 256 tokens (median of {args.reps}) |\n|---|---|---|---|")
    print(f"| lora_np | {a['load_s']:.1f} s | {a['rss_after_load_mb']:.0f} MB | {fa * 1e3:.0f} ms |")
    print(f"| transformers | {b['load_s']:.1f} s | {b['rss_after_load_mb']:.0f} MB | {fb * 1e3:.0f} ms |")
    print(f"\nload: {b['load_s'] / a['load_s']:.1f}x faster; peak RSS while loading / float32 weights "
          f"({a['weights_mb']:.0f} MB): {a['rss_after_load_mb'] / a['weights_mb']:.2f}x; "
          f"forward speed lora_np / transformers: {fb / fa:.2f}x")


if __name__ == "__main__":
    main()
