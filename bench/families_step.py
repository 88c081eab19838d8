"""One LoRA training step of a Qwen3-0.6B-shaped and a Llama-3.2-1B-shaped model (random weights): lora_np
against PyTorch + PEFT, interleaved (issue 15's target: ≥ 1.2× PyTorch's tokens/s, ≤ 0.5× its peak RSS).

Both sides build the same config (transformers' config.json of the real model, random float32 weights), put
LoRA r=8 (alpha 16, no dropout) on q_proj and v_proj, and time one AdamW step on a batch of 4 × 256 tokens:
forward with labels, backward, optimizer step, zero_grad. lora_np runs the step as `lora-np train` does (the
chunked LM-head loss, glibc told to keep freed memory). Steps alternate between the two worker processes
(bench/_workers.py); medians of --reps steps after one warm-up step. Peak RSS is each worker's ru_maxrss
(model build or load included).

--base float32 (default): each side builds its model with random float32 weights in its own process.
--base bf16: what a user does with the real checkpoints, which ship as bfloat16 safetensors. A helper process
writes one random bf16 checkpoint (transformers' init, save_pretrained) to --dir; PyTorch loads it as float32
(from_pretrained(dtype=torch.float32): CPU training computes in float32) and lora_np loads it with
load_model(quantize="bf16"), keeping the weights as BF16 blocks and computing in float32. bf16 -> float32 is
exact, so both compute the same float32 function of the same weights; lora_np holds them in half the memory.

    python bench/families_step.py [--model qwen3-0.6b|llama-3.2-1b] [--reps 3] [--threads 2] [--skip-torch]
                                  [--base float32|bf16] [--dir /tmp/families_step]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _workers as W  # noqa: E402

BATCH, SEQ, R, ALPHA = 4, 256, 8, 16

# config.json of the real models (the fields that shape the computation)
CONFIGS = {
    "qwen3-0.6b": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936,
                   "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6,
                   "rope_theta": 1000000.0, "max_position_embeddings": 40960, "tie_word_embeddings": True,
                   "attention_bias": False, "hidden_act": "silu", "use_sliding_window": False,
                   "bos_token_id": 151643, "eos_token_id": 151645},
    "llama-3.2-1b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
                     "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
                     "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": True,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
                     "bos_token_id": 128000, "eos_token_id": 128001},
}


def _batch(vocab):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab, (BATCH, SEQ))


def write_bf16_checkpoint(name, folder):
    """A random bf16 checkpoint of model `name` in `folder` (config.json + model.safetensors), as the Hub ships
    them; written once (kept when its config matches)."""
    import torch
    import transformers

    made_from = os.path.join(folder, "bench_config.json")  # the CONFIGS entry it was written from
    if os.path.exists(os.path.join(folder, "model.safetensors")) and os.path.exists(made_from):
        with open(made_from) as f:
            if json.load(f) == CONFIGS[name]:
                return
    d = dict(CONFIGS[name])
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="20GB")
    with open(made_from, "w") as f:
        json.dump(CONFIGS[name], f)


def lora_np_worker(name, folder=None):
    import lora_np
    from lora_np.models import config_from_dict, model_class
    from lora_np.optim import AdamW

    state = {}

    def setup():
        from lora_np.kernels import keep_freed_memory

        keep_freed_memory()  # as `lora-np train` does
        if folder is None:
            config = config_from_dict(CONFIGS[name])
            model = model_class(config)(config).requires_grad_(False)
        else:
            model = lora_np.load_model(folder, quantize="bf16")
            config = model.config
        peft = lora_np.get_peft_model(model, lora_np.LoraConfig(r=R, lora_alpha=ALPHA,
                                                                target_modules=["q_proj", "v_proj"]))
        peft.train()
        params = [p for p in peft.parameters() if p.requires_grad]
        state.update(model=peft, opt=AdamW(params, lr=1e-4), ids=_batch(config.vocab_size))
        return {"trainable": sum(p.numel() for p in params), "backend": lora_np.backend()}

    def step():
        out = state["model"](state["ids"], labels=state["ids"], return_logits=False)  # as `lora-np train` does
        out.loss.backward()
        state["opt"].step()
        state["opt"].zero_grad()

    return setup, step


def torch_worker(name, threads, folder=None):
    import torch

    torch.set_num_threads(threads)
    state = {}

    def setup():
        import peft
        import transformers

        if folder is None:
            d = dict(CONFIGS[name])
            config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            config = model.config
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        state.update(model=model, opt=torch.optim.AdamW(params, lr=1e-4),
                     ids=torch.tensor(_batch(config.vocab_size)))
        return {"trainable": sum(p.numel() for p in params), "torch": torch.__version__}

    def step():
        out = state["model"](input_ids=state["ids"], labels=state["ids"])
        out.loss.backward()
        state["opt"].step()
        state["opt"].zero_grad()

    return setup, step


def run(name, reps, threads, skip_torch, folder=None):
    extra = ["--model", name] + (["--checkpoint", folder] if folder else [])
    workers = [W.Worker(__file__, "lora_np", extra, threads)]
    if not skip_torch:
        workers.append(W.Worker(__file__, "torch", extra, threads))
    times = W.interleave(workers, reps)
    rss = {w.name: w.ask("rss")["peak_rss_mb"] for w in workers}
    facts = {w.name: w.facts for w in workers}
    for w in workers:
        w.close()
    rows = {}
    for worker in times:
        med = W.median(times[worker])
        rows[worker] = {"step_s": med, "tokens_per_s": BATCH * SEQ / med, "peak_rss_mb": rss[worker],
                        "steps": times[worker], **facts[worker]}
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(CONFIGS), action="append")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--base", choices=["float32", "bf16"], default="float32")
    ap.add_argument("--dir", default="/tmp/families_step", help="where --base bf16 writes its checkpoints")
    ap.add_argument("--checkpoint", help=argparse.SUPPRESS)  # a worker's bf16 folder
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        (name,) = args.model
        W.serve(*(lora_np_worker(name, args.checkpoint) if args.worker == "lora_np"
                  else torch_worker(name, args.threads, args.checkpoint)))
        return
    print(W.machine())
    print(f"base: {args.base}")
    names = args.model or sorted(CONFIGS)
    folders = {name: None for name in names}
    if args.base == "bf16":
        import subprocess

        for name in names:  # in a process of its own: its memory is not any worker's
            folders[name] = os.path.join(args.dir, name)
            subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                            f"import families_step as f; f.write_bf16_checkpoint({name!r}, {folders[name]!r})"],
                           check=True)
    results = {name: run(name, args.reps, args.threads, args.skip_torch, folders[name]) for name in names}
    print(json.dumps(results, indent=1))
    print(f"\n| model | | step (median of {args.reps}) | tokens/s | peak RSS |\n|---|---|---|---|---|")
    for name, rows in results.items():
        for worker, r in rows.items():
            print(f"| {name} | {worker} | {r['step_s']:.2f} s | {r['tokens_per_s']:.0f} | {r['peak_rss_mb']:.0f} MB |")
    for name, rows in results.items():
        if "torch" in rows:
            a, b = rows["lora_np"], rows["torch"]
            print(f"{name}: speed lora_np / torch+peft {a['tokens_per_s'] / b['tokens_per_s']:.2f}x; "
                  f"peak RSS lora_np / torch {a['peak_rss_mb'] / b['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
