"""The training loop and commands on a tiny Llama with SmolLM2's tokenizer: exact resume,
Ctrl-C, NaN stop, metrics and SVG, eval, merge, and the final adapter in PEFT."""
import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import lora_np
from lora_np.cli import main as cli_main
from lora_np.train import NonFiniteLoss, train
from conftest import ROOT, assert_close, crosscheck, tiny_train_args

def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line)["loss"] for line in fh]


def test_resume_continues_exactly(tiny, tmp_path):
    train(tiny_train_args(tiny, tmp_path / "a", grad_accum=2), stream=open(os.devnull, "w"))
    first = train(tiny_train_args(tiny, tmp_path / "b", grad_accum=2, stop_at=3), stream=open(os.devnull, "w"))
    assert first["interrupted"] and first["steps"] == 3
    second = train(tiny_train_args(tiny, tmp_path / "b", grad_accum=2, resume=True), stream=open(os.devnull, "w"))
    assert second["steps"] == 6
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")  # dropout on: RNG, data position, moments restored
    a = lora_np.safetensors.load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = lora_np.safetensors.load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_changed_settings(tiny, tmp_path):
    train(tiny_train_args(tiny, tmp_path, stop_at=2), stream=open(os.devnull, "w"))
    with pytest.raises(ValueError, match="r was 4 in the checkpoint, now 8"):
        train(tiny_train_args(tiny, tmp_path, r=8, resume=True), stream=open(os.devnull, "w"))


def test_metrics_svg_and_plain_log_lines(tiny, tmp_path, capsys):
    assert cli_main(["train", "--data", tiny[2], "--out", str(tmp_path), "--model", tiny[0], "--tokenizer", tiny[1],
                     "--steps", "4", "--batch-size", "4", "--seq-len", "16", "--eval-every", "2", "--r", "4"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert len(lines) == 4 and "\r" not in err  # not a terminal: one plain line per step
    assert all(k in lines[0] for k in ("loss", "lr", "tok/s", "ETA"))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"loss", "lr", "tokens_per_s", "elapsed"} <= r.keys() for r in rows)
    assert "val_loss" in rows[1] and "val_loss" in rows[3] and "val_loss" not in rows[0]
    svg = ET.parse(tmp_path / "loss.svg").getroot()
    assert svg.tag.endswith("svg") and svg.find("{http://www.w3.org/2000/svg}polyline") is not None
    assert os.path.exists(tmp_path / "adapter_config.json") and os.path.exists(tmp_path / "adapter_model.safetensors")


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny, tmp_path, monkeypatch):
    from lora_np.lora import LoraModel

    calls = {"n": 0}
    real_forward = LoraModel.forward

    def forward(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            out.loss.data = np.array(np.nan, dtype=out.loss.data.dtype)
        return out

    monkeypatch.setattr(LoraModel, "forward", forward)
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step 3.*step-000002"):
        train(tiny_train_args(tiny, tmp_path, save_every=2, val_fraction=0), stream=open(os.devnull, "w"))
    latest = json.load(open(tmp_path / "checkpoints" / "latest.json"))
    assert latest == {"checkpoint": "step-000002", "step": 2}
    assert os.path.exists(tmp_path / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors")
    assert not os.path.exists(tmp_path / "adapter_model.safetensors")  # no final adapter from a failed run


def test_ctrl_c_writes_checkpoint_and_resume_matches(tiny, tmp_path):
    model, tok, data = tiny
    common = ["--data", data, "--model", model, "--tokenizer", tok, "--steps", "40", "--batch-size", "4",
              "--seq-len", "16", "--r", "4", "--seed", "1", "--val-fraction", "0"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "lora_np", "train", "--out", str(tmp_path / "b"), *common],
                            stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:  # interrupt once training is under way
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, rest
    assert "resume with --resume" in rest
    latest = json.load(open(tmp_path / "b" / "checkpoints" / "latest.json"))
    assert 2 <= latest["step"] < 40
    assert cli_main(["train", "--out", str(tmp_path / "b"), "--resume", *common]) == 0
    assert cli_main(["train", "--out", str(tmp_path / "a"), *common]) == 0
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")


def test_eval_command_reports_token_weighted_loss(tiny, tmp_path, capsys):
    model, tok, data = tiny
    assert cli_main(["eval", "--model", model, "--tokenizer", tok, "--data", data, "--seq-len", "16",
                     "--batch-size", "5"]) == 0
    report = json.loads(capsys.readouterr().out)
    base = lora_np.load_model(model)
    from lora_np.data import load_examples

    examples = load_examples(data, lora_np.load_tokenizer(tok), 16)
    ids = np.stack([e[0] for e in examples])
    labels = np.stack([e[1] for e in examples])
    with lora_np.no_grad():
        expected = float(base(ids, labels=labels).loss.data)  # one batch: the mean over all labelled tokens
    assert abs(report["loss"] - expected) < 1e-5 * expected  # float32 batches summed in float64
    assert report["perplexity"] == pytest.approx(np.exp(report["loss"]), rel=1e-12)


def test_final_adapter_and_merged_model_match_in_peft_and_transformers(tiny, tmp_path):
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    peft = crosscheck("peft")
    model, tok, data = tiny
    train(tiny_train_args(tiny, tmp_path / "run", steps=3, lr=0.05), stream=open(os.devnull, "w"))
    ours = lora_np.LoraModel.from_pretrained(lora_np.load_model(model), str(tmp_path / "run")).eval()
    ids = np.array([[5, 900, 17, 42, 3000, 7, 7, 1]])
    with lora_np.no_grad():
        expected = ours(ids).logits.data
    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = hf(torch.tensor(ids)).logits.numpy()
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "run")).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(ids)).logits.numpy()
    assert np.abs(expected - base_logits).max() > 1e-4, "the trained adapter must change the output"
    assert_close(theirs, expected, rtol=1e-4, atol=1e-5, name="PEFT logits of the trained adapter")

    assert cli_main(["merge", "--model", model, "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "m")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged(torch.tensor(ids)).logits.numpy()
    assert_close(merged_logits, expected, rtol=1e-4, atol=1e-5, name="merged model logits in transformers")


def test_demo_data_is_what_the_generator_makes():
    from lora_np.demo import DATA_DIR, make_date_examples

    rows = make_date_examples(700, seed=2026)
    shipped = [json.loads(line) for name in ("dates_train.jsonl", "dates_test.jsonl")
               for line in open(os.path.join(DATA_DIR, name))]
    assert shipped == rows
    train_dates = {r["messages"][2]["content"] for r in rows[:600]}
    assert not train_dates & {r["messages"][2]["content"] for r in rows[600:]}, "held-out dates must be unseen"
    import datetime

    for r in rows[:50]:
        datetime.date.fromisoformat(r["messages"][2]["content"])


_FREED_PROBE = """
import sys
import numpy as np
from lora_np.train import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096
a = np.ones(40 << 20, np.uint8)   # 40 MiB: above glibc's largest mmap threshold (32 MiB)
b = np.ones(8 << 20, np.uint8)    # then the heap's top: freed, it would be trimmed by default
before = rss()
del b  # first: freeing a mapped block raises glibc's default trim threshold
del a
print(applied, before - rss())
"""


def test_keep_freed_memory_keeps_large_blocks_and_the_heap_top():
    """train() and evaluate() ask glibc to keep freed memory (no page faults per step): a freed 40 MiB array
    (glibc's mmap ceiling is 32 MiB) and the heap's top stay mapped; by default both go back to the OS.
    Elsewhere than glibc a no-op that says so."""
    import platform

    def probe(mode):
        out = subprocess.run([sys.executable, "-c", _FREED_PROBE, mode], capture_output=True, text=True,
                             check=True, cwd=ROOT).stdout.split()
        return out[0], int(out[1])

    applied, released = probe("keep")
    if platform.libc_ver()[0] != "glibc":
        assert applied == "False"
        return
    assert applied == "True"
    assert released < 1 << 20, f"{released} bytes went back to the OS"
    assert probe("default")[1] >= 47 << 20  # the probe measures something: glibc's defaults hand both back
