"""QLoRA on a Llama-3.2-1B-shaped Q4_0 model (random weights): tokens/s and peak RSS of a training step with
gradient checkpointing (issue target: B1 × T512 with --grad-checkpoint in ≤ 2 GB peak RSS).

Build, in a process of its own, once (the file is kept and reused; --rebuild makes it again): the config of
bench/families_step.py's llama-3.2-1b (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV heads,
head_dim 64, vocab 128256, tied embeddings, llama3 RoPE scaling) written to a GGUF file as llama.cpp lays out
a Q4_0 model: the `llama.*` keys and the rope_freqs tensor (lora_np.export.gguf_config_keys, the config's
to_gguf), 2-D weights Q4_0, norms F32. The skeleton is built with placeholder weights (nn.skip_init), and each
tensor is drawn when the writer (lora_np.gguf.write_gguf) comes to it, as lora_np's layers initialise it
(Linear uniform ±1/√in, Embedding N(0, 1), norms 1, from lora_np.manual_seed(0)), and quantized there: the
build holds one float tensor at a time (the largest, the 128256 × 2048 embedding, 1.05 GB), never the 5 GB
model; the writer quantizes 4096 rows at a time, so the build peaks near 1.25 GB (the embedding drawn whole).
Its peak RSS is reported on a line of its own.

Train, in a fresh worker process (bench/_workers.py), so that its peak RSS (ru_maxrss, load included) is the
training's alone, as a user's `lora-np train` on that file: load_model(file) keeps the Q4_0 blocks resident
(mapped from the file), gradient_checkpointing_enable(), LoRA r=8 (alpha 16, no dropout) on q_proj and v_proj
(PEFT's default for llama), AdamW; one step is forward with labels (the chunked LM-head loss, as `lora-np
train` does), backward, optimizer step, zero_grad on --batch × --seq random token ids. One warm-up step, then
the median of --steps timed steps.

    python bench/qlora_1b.py [--steps 3] [--batch 1] [--seq 512] [--threads 2] [--gguf PATH] [--rebuild]
    python bench/qlora_1b.py --seq 64 --steps 1   # a quick check (the same model, a short sequence)
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _workers as W  # noqa: E402
from families_step import CONFIGS  # noqa: E402

MODEL, R, ALPHA = "llama-3.2-1b", 8, 16
DEFAULT_GGUF = "/tmp/lora_np_bench/llama-3.2-1b-random-q4_0.gguf"
TARGET_BYTES = 2e9  # the 2 GB


class _Drawn:
    """A float32 tensor of `shape` that draws its values (draw(shape) -> ndarray) only when NumPy asks for the
    array: write_gguf reads the shape for the header first and the values when it writes (and quantizes) them."""

    def __init__(self, shape, draw):
        self.shape, self.draw = tuple(shape), draw

    def __array__(self, dtype=None, copy=None):
        return self.draw(self.shape)


def _draw_like(module):
    """How lora_np initialises `module`'s weight of a given shape (a new layer of that class: its init)."""
    from lora_np.nn import Embedding, Linear

    if type(module) is Embedding:
        return lambda shape: Embedding(*shape).weight.data                            # (V, C) ~ N(0, 1)
    if type(module) is Linear:
        return lambda shape: Linear(shape[1], shape[0], bias=False).weight.data       # (out, in) ~ U(±1/√in)
    import numpy as np

    return lambda shape: np.ones(shape, np.float32)                                   # RMSNorm weights


def build(path):
    """Write the Q4_0 GGUF of the random model to `path` (a tensor at a time) and print the build's facts."""
    import numpy as np

    import lora_np
    from lora_np.export import gguf_config_keys, gguf_tensor_names
    from lora_np.gguf import write_gguf
    from lora_np.models import config_from_dict, model_class
    from lora_np.nn import skip_init

    start = time.perf_counter()
    lora_np.manual_seed(0)
    config = config_from_dict(CONFIGS[MODEL])
    cls = model_class(config)
    with skip_init():  # placeholders that take no memory: the writer draws each tensor when it gets to it
        skeleton = cls(config)
    file_config, own_keys, config_tensors = config.to_gguf()  # llama3 RoPE -> the rope_freqs tensor
    names = gguf_tensor_names(cls, config)
    tensors = {name: (array, "F32") for name, array in config_tensors.items()}
    for pname, p in skeleton.named_parameters():  # the tied head once, under the embedding: no output.weight
        module = skeleton.get_submodule(pname.rpartition(".")[0])
        # random weights: llama.cpp's q/k row interleave (export.gguf_row_map) would only permute random rows
        tensors[names[pname]] = (_Drawn(p.shape, _draw_like(module)), "Q4_0" if len(p.shape) == 2 else "F32")
    shapes = {name: tuple(np.shape(array)) for name, (array, _) in tensors.items()}
    own_keys = {f"llama.{k}": v for k, v in own_keys.items()}
    keys, key_types = gguf_config_keys(file_config, "llama", shapes, own_keys, config_tensors)
    header = {"general.architecture": "llama", "general.name": "Llama-3.2-1B-shaped, random weights",
              "general.file_type": 2, "general.quantization_version": 2,  # llama_ftype MOSTLY_Q4_0, GGML_QNT_VERSION
              **keys, **own_keys, "tokenizer.ggml.model": "none"}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_gguf(path, header, tensors, value_types={**key_types, "general.file_type": "UINT32",
                                                   "general.quantization_version": "UINT32"})
    facts = {"build_s": time.perf_counter() - start, "build_peak_rss_mb": W.peak_rss_mb(),
             "file_mb": os.path.getsize(path) / 2**20}
    with open(path + ".json", "w") as fh:
        json.dump(facts, fh)
    print(json.dumps(facts), flush=True)


def lora_np_worker(path, batch, seq):
    state = {}

    def setup():
        import numpy as np

        import lora_np
        from lora_np.kernels import keep_freed_memory
        from lora_np.optim import AdamW

        keep_freed_memory()  # as `lora-np train` does
        start = time.perf_counter()
        model = lora_np.load_model(path)  # the Q4_0 blocks stay resident (mapped from the file)
        load_s = time.perf_counter() - start
        types = sorted({m.ggml_type for m in model.modules() if hasattr(m, "weight_blocks")})
        model.gradient_checkpointing_enable()
        peft = lora_np.get_peft_model(model, lora_np.LoraConfig(r=R, lora_alpha=ALPHA,
                                                                target_modules=["q_proj", "v_proj"]))
        peft.train()
        params = [p for p in peft.parameters() if p.requires_grad]
        ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq))
        state.update(model=peft, opt=AdamW(params, lr=1e-4), ids=ids)
        return {"trainable": sum(p.numel() for p in params), "backend": lora_np.backend(), "resident_types": types,
                "load_s": load_s, "rss_after_load_mb": W.peak_rss_mb()}

    def step():
        out = state["model"](state["ids"], labels=state["ids"], return_logits=False)  # as `lora-np train` does
        out.loss.backward()
        state["opt"].step()
        state["opt"].zero_grad()
        state["loss"] = float(out.loss.data)

    return setup, step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf", default=DEFAULT_GGUF, help="the model file (built if absent)")
    ap.add_argument("--rebuild", action="store_true", help="build the model file even if it exists")
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)  # the build process
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build:
        return build(args.gguf)
    if args.worker:
        return W.serve(*lora_np_worker(args.gguf, args.batch, args.seq))
    print(W.machine())
    if args.rebuild or not os.path.exists(args.gguf) or not os.path.exists(args.gguf + ".json"):
        W.set_thread_env(args.threads)
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))) +
                   os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, __file__, "--build", "--gguf", args.gguf], check=True, env=env)
        built = "built now"
    else:
        built = "built earlier (--rebuild to build it again)"
    with open(args.gguf + ".json") as fh:
        b = json.load(fh)
    print(f"build: {args.gguf}, {b['file_mb']:.0f} MiB, {built}: {b['build_s']:.0f} s, "
          f"peak RSS {b['build_peak_rss_mb']:.0f} MiB (its own process)")
    worker = W.Worker(__file__, "lora_np", ["--gguf", args.gguf, "--batch", str(args.batch), "--seq", str(args.seq)],
                      args.threads)
    times = W.interleave([worker], args.steps)["lora_np"]
    rss = worker.ask("rss")["peak_rss_mb"]
    worker.close()
    med = W.median(times)
    tokens = args.batch * args.seq
    row = {"step_s": med, "tokens_per_s": tokens / med, "peak_rss_mb": rss, "steps": times, **worker.facts}
    print(json.dumps(row, indent=1))
    target = TARGET_BYTES / 2**20
    print(f"\nQ4_0 Llama-3.2-1B shape, B{args.batch} x T{args.seq}, --grad-checkpoint, LoRA r={R} on q,v, "
          f"{args.threads} threads: step {med:.2f} s (median of {args.steps}), {tokens / med:.1f} tokens/s; "
          f"training peak RSS {rss:.0f} MiB = {rss / target:.2f}x the 2 GB target "
          f"({'within' if rss <= target else 'OVER'}; load alone {row['rss_after_load_mb']:.0f} MiB)")


if __name__ == "__main__":
    main()
