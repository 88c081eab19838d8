"""`lora-np dump / compare / info` on a tiny Llama with a PEFT-written adapter: the dump
equals what PyTorch + PEFT compute (the README snippet), in float64."""
import json

import numpy as np
import pytest

from lora_np.cli import compare_tensors, main as cli_main
from lora_np.safetensors import load_file, save_file
from conftest import crosscheck, patch_float64, tiny_llama

IDS = "5,17,99,42,3,3,61,0,8;1,2,3,4,5,6,7,8,9"


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    peft = crosscheck("peft")
    root = tmp_path_factory.mktemp("cli")
    ref = tiny_llama(transformers)
    ref.save_pretrained(root / "model")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                             rank_pattern={"down_proj": 2}, init_lora_weights=False)
    torch.manual_seed(1)
    pm = peft.get_peft_model(ref, config)
    pm.save_pretrained(root / "adapter")
    return root / "model", root / "adapter"


def test_dump_equals_pytorch_peft_in_float64(model_and_adapter, tmp_path, capsys):
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    peft = crosscheck("peft")
    model_dir, adapter_dir = model_and_adapter
    ours = tmp_path / "ours.safetensors"
    assert cli_main(["dump", "--model", str(model_dir), "--adapter", str(adapter_dir), "--ids", IDS,
                     "--dtype", "float64", "--out", str(ours)]) == 0
    dumped = load_file(ours)
    assert dumped["input_ids"].dtype == np.int64 and dumped["input_ids"].shape == (2, 9)
    assert dumped["logits"].shape == (2, 9, 101) and dumped["loss"].shape == (1,)
    adapter_keys = set(load_file(adapter_dir / "adapter_model.safetensors"))
    assert {k for k in dumped if k.startswith("grad.")} == {f"grad.{k}" for k in adapter_keys}

    # the README's PyTorch side, in float64 (transformers' float32 RMSNorm / RoPE patched)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    patch_float64(torch, base)
    model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    ids = torch.tensor(dumped["input_ids"])
    logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    tensors = {"input_ids": ids, "logits": logits.detach(), "loss": loss.detach().reshape(1)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            tensors["grad." + name.replace(".default", "")] = p.grad
    theirs = tmp_path / "theirs.safetensors"
    save_file({k: v.contiguous().numpy() for k, v in tensors.items()}, theirs)
    capsys.readouterr()
    assert cli_main(["compare", str(ours), str(theirs), "--rtol", "1e-9", "--atol", "1e-12"]) == 0, \
        capsys.readouterr().out


def test_compare_reports_missing_shape_and_out_of_tolerance(tmp_path, capsys):
    a = {"x": np.zeros(3), "y": np.ones((2, 2)), "only_a": np.zeros(1)}
    b = {"x": np.array([0.0, 0.0, 1e-3]), "y": np.ones((2, 3)), "only_b": np.zeros(1)}
    rows = {r[0]: r for r in compare_tensors(a, b, rtol=0, atol=1e-6)}
    assert rows["x"][1] == "FAIL" and rows["x"][2] == pytest.approx(1e-3)
    assert rows["y"][1].startswith("shape") and rows["only_a"][1] == "missing in B" and rows["only_b"][1] == "missing in A"
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    assert cli_main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]) == 1
    out = capsys.readouterr().out
    for name in ("x (FAIL)", "only_a (missing in B)", "only_b (missing in A)", "y (shape"):
        assert name in out
    assert cli_main(["compare", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors")]) == 0


def test_info_counts_trainable_parameters(model_and_adapter, capsys):
    model_dir, adapter_dir = model_and_adapter
    assert cli_main(["info", "--model", str(model_dir), "--adapter", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    cfg = json.loads((model_dir / "config.json").read_text())
    h, kv, layers = cfg["hidden_size"], cfg["num_key_value_heads"] * cfg["head_dim"], cfg["num_hidden_layers"]
    # rsLoRA adapter: q (r=4), v (r=4), down_proj (r=2 by rank_pattern), per layer
    lora = layers * (4 * (h + h) + 4 * (h + kv) + 2 * (cfg["intermediate_size"] + h))
    assert f"trainable params: {lora:,}" in out


def test_bad_arguments_give_one_line_errors(capsys):
    assert cli_main(["dump", "--ids", "1,2;3", "--out", "/tmp/never.safetensors"]) == 2
    assert "rows of one length" in capsys.readouterr().err
    assert cli_main(["info", "--model", "/nonexistent/model"]) == 1  # a missing file: a run-time failure
    assert "/nonexistent/model does not exist" in capsys.readouterr().err
