"""Every failure of `lora-np` is one line `lora-np CMD: error: ...` naming the option or file,
with no traceback: exit 2 for usage errors, 1 for run-time failures, 130 for Ctrl-C
(LORA_NP_DEBUG=1 adds the traceback). The generation options follow one rule in the CLI and
in the API; merge and dump never leave a half-written output."""
import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_np
from lora_np import cli
from lora_np.generation import generate, sample_next
from lora_np.export import save_merged
from lora_np.models import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from lora_np.options import OptionError
from lora_np.safetensors import load_file, save_file
from conftest import ROOT

CONTEXT = 32  # the tiny model's max_position_embeddings


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Placeholders of the table: a tiny Llama folder (SmolLM2's vocabulary size), its tokenizer, a data
    file, a safetensors file, a file that is not one, a missing path and an existing plain file."""
    root = tmp_path_factory.mktemp("cli-errors")
    lora_np.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, tie_word_embeddings=True, max_position_embeddings=CONTEXT)
    save_merged(LlamaForCausalLM(config), str(root / "model"))
    (root / "data.jsonl").write_text("".join(json.dumps({"text": f"hello {i} world"}) + "\n" for i in range(5)))
    save_file({"x": np.zeros(3, np.float32)}, root / "a.safetensors")
    (root / "notes.txt").write_text("not a safetensors file\n")
    return {"model": str(root / "model"), "tok": lora_np.default_model_path(), "data": str(root / "data.jsonl"),
            "st": str(root / "a.safetensors"), "txt": str(root / "notes.txt"), "missing": str(root / "missing"),
            "tmp": str(root)}


M = "--model {model} --tokenizer {tok}"
GEN = f"generate {M} --prompt hi"
EVAL = f"eval {M} --data {{data}}"
# (command line, exit status, words the one error line must contain)
CASES = [
    ("", 2, ["lora-np: error:", "command"]),
    ("frob", 2, ["invalid choice", "frob"]),
    ("info --bogus", 2, ["lora-np info: error:", "unrecognized arguments: --bogus"]),
    ("dump --model {model} --out {tmp}/o.safetensors", 2, ["--text", "--ids"]),
    ("dump --ids 1,2;3 --out {tmp}/o.safetensors", 2, ["--ids", "rows of one length"]),
    ("dump --ids 1,x --out {tmp}/o.safetensors", 2, ["--ids", "'1,x'"]),
    ("dump --model {model} --ids 1,49152 --out {tmp}/o.safetensors", 2, ["--ids", "49152", "vocabulary"]),
    ("dump --model {model} --ids=-1,2 --out {tmp}/o.safetensors", 2, ["--ids", "-1", "vocabulary"]),
    ("dump --model {model} --ids " + ",".join(["1"] * (CONTEXT + 1)) + " --out {tmp}/o.safetensors", 2,
     ["--ids", f"{CONTEXT + 1} tokens", "context"]),
    ("dump --model {model} --ids 1,2 --out {tmp}", 2, ["--out", "{tmp}", "folder"]),
    ("dump --model {model} --ids 1,2 --out {missing}/o.safetensors", 2, ["--out", "{missing}", "does not exist"]),
    ("compare {st} {st} --rtol -1", 2, ["--rtol", ">= 0", "-1"]),
    ("compare {st} {st} --atol nan", 2, ["--atol", "finite"]),
    (EVAL + " --batch-size -2", 2, ["--batch-size", ">= 1"]),
    (EVAL + " --batch-size 0", 2, ["--batch-size", ">= 1"]),
    (EVAL + " --seq-len 1", 2, ["--seq-len", ">= 2"]),
    (EVAL + f" --seq-len {CONTEXT + 1}", 2, ["--seq-len", f"{CONTEXT + 1}", f"context of {CONTEXT}"]),
    (GEN + " --temperature -1", 2, ["--temperature", ">= 0"]),
    (GEN + " --temperature inf", 2, ["--temperature", "finite"]),
    (GEN + " --top-p 2", 2, ["--top-p", "<= 1"]),
    (GEN + " --top-p 0", 2, ["--top-p", "> 0"]),
    (GEN + " --top-k -1", 2, ["--top-k", ">= 0"]),
    (GEN + " --top-k 1.5", 2, ["--top-k", "integer"]),
    (GEN + " --max-new-tokens 0", 2, ["--max-new-tokens", ">= 1"]),
    (GEN + " --seed -1", 2, ["--seed", ">= 0"]),
    (f"generate {M} --prompt=", 2, ["--prompt", "empty"]),
    (GEN + f" --max-new-tokens {CONTEXT}", 2, ["max_new_tokens", f"context of {CONTEXT}"]),
    ("merge --model {model} --out {model}", 2, ["--out", "{model}", "not an empty folder"]),
    ("merge --model {model} --out {txt}", 2, ["--out", "{txt}", "not an empty folder"]),
    ("train --out {tmp}/run", 2, ["lora-np train: error:", "--data"]),
    ("train --data {data} --out {tmp}/run --steps 1 --epochs 1", 2, ["--epochs", "--steps"]),
    ("train --data {data} --out {tmp}/run --steps 0", 2, ["--steps", ">= 1"]),
    ("train --data {data} --out {tmp}/run --grad-accum -1", 2, ["--grad-accum", ">= 1"]),
    ("train --data {data} --out {tmp}/run --lr inf", 2, ["--lr", "finite"]),
    ("info --model {missing}", 1, ["{missing}", "does not exist"]),
    ("compare {missing} {st}", 1, ["{missing}", "No such file"]),
    ("compare {txt} {st}", 1, ["{txt}"]),
    (EVAL.replace("{data}", "{missing}") + " --seq-len 16", 1, ["{missing}"]),
]


COMMANDS = ("info", "dump", "compare", "eval", "generate", "merge", "train")


def _fill(text, files):
    return text.format(**files)


def _one_error_line(err, out=""):
    assert "Traceback" not in err + out, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected one error line, got {err!r}"
    return lines[0]


@pytest.mark.parametrize("line, status, words", CASES, ids=[c[0][:60] or "(none)" for c in CASES])
def test_bad_input_is_one_line_naming_it(files, line, status, words, capsys, monkeypatch):
    monkeypatch.delenv("LORA_NP_DEBUG", raising=False)
    argv = _fill(line, files).split()
    assert cli.main(argv) == status, capsys.readouterr().err
    cap = capsys.readouterr()
    error = _one_error_line(cap.err, cap.out)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    assert error.startswith(f"lora-np {command}: error: " if command else "lora-np: error: "), error
    for word in words:
        assert _fill(word, files) in error, error


def _run(args, **env):
    environ = {k: v for k, v in os.environ.items() if k != "LORA_NP_DEBUG"}
    environ.update(env)
    return subprocess.run([sys.executable, "-m", "lora_np", *args], capture_output=True, text=True, cwd=ROOT,
                          env=environ, timeout=120)


def test_in_a_process_exit_status_and_no_traceback(files):
    """The real process: a usage error exits 2 (argparse does not print its usage), a missing file 1."""
    done = _run(["generate", "--prompt", "hi", "--top-p", "2"])
    assert done.returncode == 2 and done.stdout == ""
    assert _one_error_line(done.stderr) == "lora-np generate: error: argument --top-p: must be a finite number " \
                                           "> 0 and <= 1, got 2.0"
    done = _run(["compare", files["missing"], files["st"]])
    assert done.returncode == 1
    assert _one_error_line(done.stderr) == f"lora-np compare: error: {files['missing']}: No such file or directory"
    done = _run(["compare", "--help"])
    assert done.returncode == 0 and "--rtol" in done.stdout and done.stderr == ""


def test_debug_variable_adds_the_traceback(files):
    done = _run(["compare", files["missing"], files["st"]], LORA_NP_DEBUG="1")
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback (most recent call last):") and "FileNotFoundError" in done.stderr
    assert done.stderr.splitlines()[-1] == f"lora-np compare: error: {files['missing']}: No such file or directory"


@pytest.mark.parametrize("exc, status, expected", [
    (KeyboardInterrupt(), 130, "lora-np info: interrupted"),
    (MemoryError("Unable to allocate 8.00 EiB"), 1, "lora-np info: error: out of memory: Unable to allocate 8.00 EiB"),
    (NotImplementedError("GPT-2 scale_attn_weights=false is not supported"), 1,
     "lora-np info: error: GPT-2 scale_attn_weights=false is not supported"),
    (KeyError("model.safetensors: missing tensors ['lm_head.weight']"), 1,
     "lora-np info: error: model.safetensors: missing tensors ['lm_head.weight']"),
    (KeyError("n_head"), 1, "lora-np info: error: KeyError: 'n_head' (an internal error; LORA_NP_DEBUG=1 prints where)"),
    (RecursionError("maximum recursion depth exceeded"), 1,
     "lora-np info: error: RecursionError: maximum recursion depth exceeded (an internal error; LORA_NP_DEBUG=1 "
     "prints where)"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), 1, "lora-np info: error: /ro/out: Permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), 1, "lora-np info: error: No space left on device"),
    (ValueError("first line\n  second line"), 1, "lora-np info: error: first line second line"),
    (OptionError("top_p must be a finite number > 0 and <= 1, got 2"), 2,
     "lora-np info: error: top_p must be a finite number > 0 and <= 1, got 2"),
])
def test_every_exception_is_one_line_with_its_status(exc, status, expected, capsys, monkeypatch):
    def fail(args):
        raise exc

    monkeypatch.delenv("LORA_NP_DEBUG", raising=False)
    monkeypatch.setattr(cli, "cmd_info", fail)
    assert cli.main(["info"]) == status
    assert _one_error_line(capsys.readouterr().err) == expected


def _no_space(fd):
    raise OSError(errno.ENOSPC, "No space left on device")  # as fsync(2) reports a full disk, naming no file


def test_disk_full_names_the_output_and_leaves_the_old_file(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "dump.safetensors"
    out.write_bytes(b"previous")
    monkeypatch.setattr(os, "fsync", _no_space)
    assert cli.main(["dump", "--model", files["model"], "--ids", "1,2,3", "--out", str(out)]) == 1
    assert _one_error_line(capsys.readouterr().err) == f"lora-np dump: error: {out}: No space left on device"
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["dump.safetensors"]


def test_merge_is_atomic_and_removes_orphans(files, tmp_path, capsys, monkeypatch):
    orphan = tmp_path / ".m.merge-999999999-0123abcd"  # a pid above Linux's pid_max: its writer is gone
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"torn")
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", _no_space)
        assert cli.main(["merge", "--model", files["model"], "--out", str(tmp_path / "m")]) == 1
    assert _one_error_line(capsys.readouterr().err) == f"lora-np merge: error: {tmp_path / 'm' / 'model.safetensors'}: No space left on device"
    assert os.listdir(tmp_path) == []  # no output, no temporary folder, the orphan gone

    (tmp_path / "m").mkdir()  # an empty folder is filled
    assert cli.main(["merge", "--model", files["model"], "--out", str(tmp_path / "m")]) == 0
    assert os.listdir(tmp_path) == ["m"] and sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    source = load_file(os.path.join(files["model"], "model.safetensors"))
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert merged.keys() == source.keys() and all(np.array_equal(merged[k], source[k]) for k in source)
    with pytest.raises(FileExistsError, match="not an empty folder"):
        save_merged(lora_np.load_model(files["model"]), tmp_path / "m")


# (command line before the option, option, (type, lowest value, lowest allowed?, highest or None))
OPTIONS = [("compare a b", "--rtol", (float, 0, True, None)), ("compare a b", "--atol", (float, 0, True, None)),
           ("eval --data d", "--batch-size", (int, 1, True, None)), ("eval --data d", "--seq-len", (int, 2, True, None)),
           ("generate --prompt p", "--max-new-tokens", (int, 1, True, None)),
           ("generate --prompt p", "--temperature", (float, 0, True, None)),
           ("generate --prompt p", "--top-k", (int, 0, True, None)),
           ("generate --prompt p", "--top-p", (float, 0, False, 1)), ("generate --prompt p", "--seed", (int, 0, True, None))]


@settings(max_examples=100)
@given(case=st.sampled_from(OPTIONS), data=st.data())
def test_numeric_options_are_refused_naming_them_or_parsed_as_given(case, data):
    """At parse time, before any file is read: a value outside the option's rule is a usage error naming
    the option; any other is parsed to the number the text says."""
    command, option, (kind, low, low_ok, high) = case
    near = [low - 1, low, low + 1] + ([high, high + 1e-9] if high is not None else [])  # the bounds
    text = data.draw(st.one_of(
        st.sampled_from(near).map(lambda v: repr(float(v)) if kind is float else str(int(v))),
        st.integers(-5, 5).map(str), st.floats(-3, 3).map(repr),
        st.sampled_from(["nan", "inf", "-inf", "1e400", "0.0", "1.0", "2", "x", "", "1_0", " 3"])))
    try:
        value = kind(text)
        ok = np.isfinite(value) and (value > low or (low_ok and value == low)) and (high is None or value <= high)
    except ValueError:
        ok = False
    parser = cli.build_parser()
    if not ok:
        with pytest.raises(cli._UsageError, match=f"^argument {option}: must be "):
            parser.parse_args([*command.split(), f"{option}={text}"])
        return
    parsed = getattr(parser.parse_args([*command.split(), f"{option}={text}"]), option[2:].replace("-", "_"))
    assert parsed == value and type(parsed) is kind


# -- the generation options: one rule in the API and the CLI -------------------------------------
VOCAB, N_POSITIONS = 37, 12


@pytest.fixture(scope="module")
def gpt2():
    lora_np.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=N_POSITIONS))


def _bad(name, value):
    """Whether `value` is outside the rule of generate's option `name`, decided here independently."""
    if value is None:
        return name == "max_new_tokens"
    if name in ("max_new_tokens", "top_k", "seed"):
        if not isinstance(value, int) or isinstance(value, bool):
            return True
        return value < {"max_new_tokens": 1, "top_k": 0, "seed": 0}[name]
    if isinstance(value, (bool, str)) or not np.isfinite(value):
        return True
    return value < 0 if name == "temperature" else not 0 < value <= 1


numbers = st.one_of(st.none(), st.integers(-3, 8), st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from([0, 0.0, -0.0, 0.5, 1, 1.0, 1.5, 2, float("nan"), float("inf"), True, "1"]))


@settings(max_examples=150)  # cheap: a one-layer model, at most 9 new tokens
@given(max_new_tokens=st.one_of(st.integers(-2, 12), st.sampled_from([None, 2.0, "3"])),
       temperature=numbers, top_k=numbers, top_p=numbers, seed=numbers)
def test_generate_refuses_bad_options_or_does_what_they_say(gpt2, max_new_tokens, temperature, top_k, top_p, seed):
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    prompt = np.array([[3, 30, 7]])
    bad = [name for name, value in options.items() if _bad(name, value)]
    too_long = not bad and 3 + max_new_tokens > N_POSITIONS
    if bad or too_long:
        with pytest.raises(OptionError) as info:
            generate(gpt2, prompt, **options)
        assert str(info.value).split()[0] in (bad or ["max_new_tokens"]), str(info.value)
        return
    out = generate(gpt2, prompt, **options)
    assert out.shape == (1, 3 + max_new_tokens) and np.array_equal(out[:, :3], prompt)
    assert out.dtype == np.int64 and ((0 <= out) & (out < VOCAB)).all()
    greedy = generate(gpt2, prompt, max_new_tokens=max_new_tokens)
    if not temperature or top_k == 1:  # greedy, or sampling from the single most likely token
        assert np.array_equal(out, greedy)
    if seed is not None:
        assert np.array_equal(generate(gpt2, prompt, **options), out)  # a seed fixes the sample


@settings(max_examples=150)
@given(data=st.data(), temperature=st.floats(0, 1e3, exclude_min=True),  # subnormals too
       top_k=st.one_of(st.none(), st.integers(0, 12)),
       top_p=st.one_of(st.none(), st.floats(1e-6, 1.0)), rows=st.integers(1, 3), seed=st.integers(0, 2 ** 32))
def test_sample_next_picks_only_allowed_tokens(data, temperature, top_k, top_p, rows, seed):
    """The sampled token is among the top_k most likely and within the top_p nucleus (the tokens whose
    more likely tokens hold less than top_p of the probability), also for extreme temperatures."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, 10)) * data.draw(st.sampled_from([1.0, 30.0, 1e6]))
    logits[rng.random(logits.shape) < 0.2] = -np.inf  # masked tokens
    logits[:, rng.integers(10)] = rng.normal(size=rows)  # one finite value per row
    picked = sample_next(logits, rng, temperature, top_k, top_p)
    assert picked.shape == (rows,)
    for row, token in zip(logits, picked):
        allowed = np.isfinite(row)
        if top_k:
            allowed &= row >= np.sort(row)[-min(top_k, row.size)]
        with np.errstate(over="ignore"):  # a subnormal temperature: -inf for all but the top
            z = np.where(allowed, (row - row.max()) / temperature, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        above = p[p > p[token]].sum()
        assert allowed[token] and p[token] > 0, (row, token)
        if top_p is not None:
            assert above < top_p + 1e-9, (row, token, above)


@pytest.mark.parametrize("name, value", [("temperature", -0.5), ("temperature", float("nan")), ("top_k", -1),
                                         ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.5)])
def test_sample_next_names_a_bad_option(name, value):
    with pytest.raises(OptionError, match=f"^{name} must be"):
        sample_next(np.zeros((1, 4)), np.random.default_rng(0), **{"temperature": 1.0, name: value})


@pytest.mark.parametrize("ids, message", [
    (np.array([[1.0, 2.0]]), "must be integers"),
    (np.array([[1, VOCAB]]), rf"input_ids\[0, 1\] = {VOCAB} is outside the vocabulary \[0, {VOCAB}\)"),
    (np.array([-1, 2]), r"input_ids\[0, 0\] = -1 is outside"),
    (np.zeros((1, 0), np.int64), "non-empty"),
])
def test_generate_refuses_ids_outside_the_vocabulary(gpt2, ids, message):
    with pytest.raises(ValueError, match=message):
        generate(gpt2, ids, max_new_tokens=1)


def test_sample_next_refuses_non_finite_logits():
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            sample_next(np.array([[0.0, bad, 1.0]]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="no finite value"):
        sample_next(np.full((1, 3), -np.inf), np.random.default_rng(0), temperature=1.0)
