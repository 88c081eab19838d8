"""Benchmark of the GEMMs over GGUF blocks (csrc/quant_kernels.c) and of generation with a resident base.

    python bench/quant_gemm.py                    # GEMMs: SmolLM2's layer shapes x M = 1, 8, 1024 x types
    python bench/quant_gemm.py --generate         # and prefill + generation tokens/s: Q4_1 resident vs float32
                                                  # (vs llama.cpp)
    python bench/quant_gemm.py --types Q4_1 Q8_0  # only these types
    python bench/quant_gemm.py --shapes qwen3 --types BF16   # Qwen3-0.6B's shapes (or llama: Llama-3.2-1B's), M = 1024

GEMMs, per shape (N out x K in features of SmolLM2-135M's layers, or --shapes') and M rows of x, medians over
interleaved rounds (every implementation timed in turn, each round starting one further on):
  quant fwd    y = x Wᵀ with W in its blocks (lora_np's C kernel)
  f32 fwd      x @ Wᵀ with W already float32 (NumPy's OpenBLAS): what a dequantized model does
  deq+fwd      dequantize W (lora_np's C dequantization), then x @ Wᵀ: the naive resident path
  quant bwd    dx = dy W in blocks, against f32 bwd (dy @ W)
Generation, SmolLM2-135M-Instruct Q4_1 (lora_np's default model file) with its blocks resident against the
same file dequantized to float32 at load, and against llama-cpp-python on the same file when it is installed
(the resident weights' bytes are printed), each timed in turn round after round (interleaved), medians:
  prefill      a --prefill-tokens (256) prompt of random token ids processed once: lora_np one forward that
               fills a new KV cache and keeps the last position's logits (as generate() runs the prompt);
               llama.cpp Llama.eval(tokens) with n_batch 512 (one batch) after reset(), which drops the cache
  decode       greedy generation of --new-tokens (128) after a short prompt (generate(); llama.cpp generate())
Threads: --threads (default 2) for the C core, OpenBLAS and llama.cpp (n_threads and n_threads_batch).
"""
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before NumPy loads OpenBLAS (as the `lora-np` command)

import argparse  # noqa: E402

import numpy as np  # noqa: E402

from lora_kernels import median_times  # noqa: E402  (bench/lora_kernels.py: interleaved rounds, medians)
from lora_np import kernels  # noqa: E402
from lora_np.kernels import quant as kq  # noqa: E402

SHAPES = {  # (N out, K in) of each model's layers: q/o, k/v, gate/up, down (..., head)
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)],
    "qwen3": [(2048, 1024), (1024, 2048), (1024, 1024), (3072, 1024), (1024, 3072)],  # q, o, k/v, gate/up, down
    "llama": [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)],                  # Llama-3.2-1B
}
ROWS = [1, 8, 1024]
TYPES = ["Q4_1", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "F16", "BF16"]  # those with a quantizer (gguf-py's, lora_np's q4_k)


def blocks_of(w, ggml_type):
    """W [N, K] float32 in ggml_type blocks (lora_np's q4_k quantizer, else gguf-py's)."""
    import gguf

    from lora_np.quant import quantize

    if ggml_type == "Q4_K":
        return quantize(w, ggml_type)
    q = gguf.quants.quantize(w, gguf.GGMLQuantizationType[ggml_type])
    return np.ascontiguousarray(q).view(np.uint8).reshape(w.shape[0], -1)


def gemm_table(types, rounds, shapes):
    rng = np.random.default_rng(0)
    print(f"{'N x K':>11} {'M':>5} {'type':>5} | {'quant fwd':>9} {'f32 fwd':>8} {'deq+fwd':>8} | "
          f"{'quant bwd':>9} {'f32 bwd':>8} | fwd vs f32  bwd vs f32  (ms; > 1 = faster)")
    for N, K in SHAPES[shapes]:
        w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)
        for M in (ROWS if N < 10000 else ROWS[:2]) if shapes == "smollm2" else ROWS[-1:]:  # the head: decoding
            x, dy = rng.standard_normal((M, K), np.float32), rng.standard_normal((M, N), np.float32)
            for t in types:
                if K % kq.block_size(t):
                    continue
                b = blocks_of(w, t)
                wf = kq.dequantize_rows(b, t)
                fns = {"quant fwd": lambda: kq.quant_linear_forward(x, b, t),
                       "f32 fwd": lambda: x @ wf.T,
                       "deq+fwd": lambda: x @ kq.dequantize_rows(b, t).T,
                       "quant bwd": lambda: kq.quant_linear_backward(dy, b, t),
                       "f32 bwd": lambda: dy @ wf}
                m = median_times(fns, rounds if M < 1024 else max(5, rounds // 4))
                ms = {k: v * 1e3 for k, v in m.items()}
                print(f"{N:>5} x {K:<5} {M:>5} {t:>5} | {ms['quant fwd']:9.3f} {ms['f32 fwd']:8.3f} "
                      f"{ms['deq+fwd']:8.3f} | {ms['quant bwd']:9.3f} {ms['f32 bwd']:8.3f} | "
                      f"{m['f32 fwd'] / m['quant fwd']:10.2f}x {m['f32 bwd'] / m['quant bwd']:10.2f}x", flush=True)


def generation(threads, new_tokens, prefill_tokens, rounds):
    from lora_np import no_grad
    from lora_np.loaders import default_model_path, load_model
    from lora_np.nn import KVCache
    from lora_np.quant import QuantizedEmbedding, QuantizedLinear

    path = default_model_path()
    prompt = np.array([[1, 9690, 314, 253, 1345, 282, 4376, 30]])
    models = {"Q4_1 resident": load_model(path), "float32": load_model(path, dequantize=True)}
    for name, model in models.items():
        blocks = {id(m.weight_blocks): m.weight_blocks.nbytes for m in model.modules()
                  if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}  # the tied head shares the embedding's
        n_bytes = sum(blocks.values()) + sum(p.data.nbytes for p in model.parameters())
        print(f"{name:>14}: weights {n_bytes / 1e6:.1f} MB")
    long_prompt = np.random.default_rng(0).integers(0, models["float32"].config.vocab_size, (1, prefill_tokens))

    @no_grad()
    def prefill(model):  # what generate() runs first: the whole prompt into a new cache, the last logits kept
        return model(long_prompt, cache=KVCache(), logits_to_keep=1).logits.data[:, -1]   # (1, V)

    prefills = {name: (lambda m=model: prefill(m)) for name, model in models.items()}
    decodes = {name: (lambda m=model: m.generate(prompt, max_new_tokens=new_tokens)) for name, model in models.items()}
    outputs = {name: fn() for name, fn in decodes.items()}
    same = np.array_equal(*outputs.values())
    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None:
        llm = llama_cpp.Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512,
                              verbose=False)
        tokens, long_tokens = prompt[0].tolist(), long_prompt[0].tolist()

        def llama_prefill():
            llm.reset()  # n_tokens = 0: eval drops the cache from there
            llm.eval(long_tokens)

        def llama_generate():
            out = []
            for tok in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
                out.append(tok)
                if len(out) == new_tokens:
                    return out

        prefills["llama.cpp"], decodes["llama.cpp"] = llama_prefill, llama_generate
    for what, fns, n in (("prefill", prefills, prefill_tokens), ("decode", decodes, new_tokens)):
        m = median_times(fns, rounds)
        print(f"{what}: " + (f"a {n}-token prompt (random ids), one forward" if what == "prefill" else
                             f"greedy generation, {n} new tokens; resident and float32 outputs "
                             f"{'equal' if same else 'DIFFER'}") + f"; {threads} threads, median of {rounds}")
        for name, t in m.items():
            vs = f"   {m['llama.cpp'] / t:.2f}x llama.cpp's" if "llama.cpp" in m and name != "llama.cpp" else ""
            print(f"{name:>14}: {n / t:7.1f} tokens/s{vs}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=TYPES, choices=TYPES)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--shapes", default="smollm2", choices=sorted(SHAPES),
                    help="whose layer shapes (qwen3, llama: M = 1024 only, as a training step's B4 x T256)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--generate", action="store_true", help="also time generation (loads SmolLM2)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=256)
    args = ap.parse_args()
    kernels.set_threads(args.threads)
    print(f"backend {kernels.backend()}, {kernels.get_num_threads()} threads")
    gemm_table(args.types, args.rounds, args.shapes)
    if args.generate:
        generation(args.threads, args.new_tokens, args.prefill_tokens, max(3, args.rounds // 7))


if __name__ == "__main__":
    main()
