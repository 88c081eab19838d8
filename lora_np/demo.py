"""The embedded demo: fine-tune SmolLM2-135M-Instruct with LoRA to rewrite dates as
YYYY-MM-DD, and score exact match on held-out dates before and after.

The data ships in `lora_np/demo_data/` (made by `make_date_examples`, checked by a test).
Scoring is greedy generation of the assistant reply; a reply counts when it equals the
target exactly (after stripping surrounding whitespace). The run ends by writing the adapter
for llama.cpp (`adapter.gguf`) and an Ollama `Modelfile` (FROM the base GGUF, ADAPTER it) beside
the PEFT adapter, and prints the commands that use them.
"""
import datetime
import json
import os
import sys
import time

import numpy as np

__all__ = ["make_date_examples", "exact_match", "run_demo", "DATA_DIR"]

DATA_DIR = os.path.join(os.path.dirname(__file__), "demo_data")
SYSTEM = "Rewrite the date the user gives as YYYY-MM-DD."
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]


def _ordinal(n):
    return f"{n}{'th' if 11 <= n % 100 <= 13 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _render(d, style):
    month = _MONTHS[d.month - 1]
    return [
        f"{month} {d.day}, {d.year}",
        f"{d.day} {month} {d.year}",
        f"{month[:3]} {d.day}, {d.year}",
        f"the {_ordinal(d.day)} of {month}, {d.year}",
        f"{d.strftime('%A')}, {month} {d.day}, {d.year}",
        f"{d.day} {month[:3]}. {d.year}",
    ][style]


def make_date_examples(n, seed):
    """n chat examples {"messages": [system, user (a date in words), assistant (YYYY-MM-DD)]}."""
    rng = np.random.default_rng(seed)
    start = datetime.date(1900, 1, 1).toordinal()
    days = rng.choice(datetime.date(2099, 12, 31).toordinal() - start, size=n, replace=False)
    styles = rng.integers(0, 6, size=n)
    out = []
    for day, style in zip(days, styles):
        d = datetime.date.fromordinal(start + int(day))
        out.append({"messages": [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": _render(d, int(style))},
                                 {"role": "assistant", "content": d.isoformat()}]})
    return out


def _read_jsonl(path):
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def exact_match(model, tokenizer, rows, max_new_tokens=12):
    """(score, replies): greedy replies to each row's conversation minus its last (assistant)
    turn, and the fraction equal to that turn. Prompts of equal token length run as one batch."""
    prompts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True) for r in rows]
    replies = [None] * len(rows)
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for length, idx in by_len.items():
        out = model.generate(np.array([prompts[i] for i in idx]), max_new_tokens=max_new_tokens,
                             eos_token_id=tokenizer.eos_token_id)
        for row, i in zip(out[:, length:], idx):
            replies[i] = tokenizer.decode([t for t in row.tolist() if t != tokenizer.eos_token_id],
                                          skip_special_tokens=True).strip()
    hits = [rep == r["messages"][-1]["content"] for rep, r in zip(replies, rows)]
    return float(np.mean(hits)), replies


def run_demo(out="runs/demo", steps=40, batch_size=8, lr=1e-3, n_test=60, threads=None, stream=None):
    from .loaders import default_model_path, load_model
    from .tokenizer import load_tokenizer
    from .train import TrainArgs, train

    stream = stream or sys.stdout
    t0 = time.perf_counter()
    path = default_model_path()
    test = _read_jsonl(os.path.join(DATA_DIR, "dates_test.jsonl"))[:n_test]
    tokenizer = load_tokenizer(path)
    base = load_model(path)
    print(f"lora_np demo: SmolLM2-135M-Instruct ({path}); task: rewrite a date as YYYY-MM-DD; "
          f"{len(test)} held-out dates", file=stream, flush=True)
    before, replies_before = exact_match(base, tokenizer, test)
    print(f"before fine-tuning: exact match {before:.1%} ({time.perf_counter() - t0:.0f} s so far)", file=stream,
          flush=True)
    del base
    result = train(TrainArgs(data=os.path.join(DATA_DIR, "dates_train.jsonl"), out=out, model=path, r=8, alpha=16,
                             dropout=0.0, targets="q_proj,v_proj", lr=lr, warmup=5, steps=steps,
                             batch_size=batch_size, seq_len=64, val_fraction=0.05, log_every=10, threads=threads,
                             seed=0, overwrite=True))  # the demo replaces its previous run
    model = result["model"].eval()
    after, replies_after = exact_match(model, tokenizer, test)
    elapsed = time.perf_counter() - t0
    print(f"\n{'':24}{'before':>10}{'after':>10}\nexact match ({len(test)} dates){before:>9.1%}{after:>10.1%}",
          file=stream)
    print(f"train loss {result['rows'][0]['loss']:.3f} -> {result['final_loss']:.3f}; "
          f"val loss {result['val_loss']:.3f}\n", file=stream)
    print(f"{'date':38}{'target':13}{'before':22}after", file=stream)
    for r, b, a in list(zip(test, replies_before, replies_after))[:8]:
        print(f"{r['messages'][1]['content'][:36]:38}{r['messages'][2]['content']:13}{b[:20]!s:22}{a}", file=stream)
    summary = {"exact_match_before": before, "exact_match_after": after, "n_test": len(test), "steps": steps,
               "batch_size": batch_size, "elapsed_s": elapsed, "final_train_loss": result["final_loss"],
               "val_loss": result["val_loss"]}
    with open(os.path.join(out, "demo_results.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(f"\nadapter (PEFT format) in {out}/; results in {out}/demo_results.json; total {elapsed:.0f} s",
          file=stream)
    print(serve_lines(model, path, out, test[0]["messages"][1]["content"]), file=stream)
    return summary


def serve_lines(model, base_path, out, prompt):
    """Write `out`/adapter.gguf (llama.cpp's LoRA format) and `out`/Modelfile (Ollama: FROM the base GGUF,
    ADAPTER the adapter); the lines that run them."""
    from .fileio import write_atomic
    from .lora.gguf_io import save_gguf_adapter

    adapter = save_gguf_adapter(model, os.path.join(out, "adapter.gguf"))
    modelfile = os.path.join(out, "Modelfile")
    write_atomic(modelfile, f"FROM {os.path.abspath(base_path)}\nADAPTER {os.path.abspath(adapter)}\n"
                            f'SYSTEM """{SYSTEM}"""\n')
    return (f"llama.cpp adapter: {adapter}\n"
            f"  llama-cli -m {base_path} --lora {adapter} -sys \"{SYSTEM}\" -p \"{prompt}\"\n"
            f"Ollama: {modelfile} (FROM the base GGUF, ADAPTER {adapter})\n"
            f"  ollama create lora-np-dates -f {modelfile} && ollama run lora-np-dates \"{prompt}\"")
