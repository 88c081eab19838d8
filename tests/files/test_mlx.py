"""mlx-lm adapter folders both ways, checked against mlx-lm's documented format (mlx itself is not needed):
mlx_lm/tuner/utils.py linear_to_lora_layers adapts `lora_parameters.keys` in each of the last `num_layers`
layers (and keys naming modules outside the layers), mlx_lm/tuner/lora.py's LoRALinear computes
y = linear(x) + scale · (x @ lora_a) @ lora_b with lora_a (in, r), lora_b (r, out), and fuses it as
W + (scale · lora_bᵀ) @ lora_aᵀ; LoRAEmbedding adds scale · lora_a[ids] @ lora_b, lora_a (vocab, r)."""
import json

import numpy as np
import pytest

import lora_np
from conftest import crosscheck, patch_float64, tiny_llama
from lora_np import safetensors
from lora_np.cli import main as cli_main
from lora_np.lora import LoraConfig, LoraModel, get_peft_model
from lora_np.mlx import MLXAdapterError, mlx_to_peft, read_mlx_adapter, save_mlx_adapter
from lora_np.models import LlamaConfig, LlamaForCausalLM

IDS = np.array([[3, 17, 9, 42, 5, 5, 61, 0, 8]])


def tiny_model(seed=0):
    lora_np.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return model.eval()


def adapted(config, seed=1):
    model = get_peft_model(tiny_model(), config)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = (rng.standard_normal(p.shape) * 0.2).astype(np.float32)
    return model.eval()


def mlx_fused(base, folder):
    """The base model's weights with an mlx-lm adapter fused in as mlx-lm fuses it (independent of lora_np's
    LoRA code): Linear W + (scale · lora_bᵀ) @ lora_aᵀ, Embedding W + scale · lora_a @ lora_b."""
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_parameters"]["scale"]
    n_layers = base.config.num_hidden_layers
    adapted_layers = range(n_layers - config["num_layers"], n_layers)
    keys = config["lora_parameters"]["keys"]
    modules = dict(base.named_modules())
    expected_paths = {f"model.layers.{i}.{k}" for i in adapted_layers for k in keys
                      if f"model.layers.{i}.{k}" in modules} | {k for k in keys if k in modules}
    tensors = safetensors.load_file(folder / "adapters.safetensors")
    assert {k.rpartition(".")[0] for k in tensors} == expected_paths  # what mlx-lm would adapt, and only that
    for path in expected_paths:
        a, b = tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"]
        w = base.get_submodule(path).weight
        w.data = w.data + (scale * a @ b if path.endswith("embed_tokens") else (scale * b.T) @ a.T)
    return base


def test_export_writes_mlx_lms_layout(tmp_path):
    model = adapted(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                               layers_to_transform=[1, 2]))
    save_mlx_adapter(model, tmp_path / "mlx")
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert config == {"fine_tune_type": "lora", "num_layers": 2,
                      "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.05,
                                          "keys": ["self_attn.q_proj", "self_attn.v_proj"]}}
    tensors = safetensors.load_file(tmp_path / "mlx" / "adapters.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == {
        f"model.layers.{i}.self_attn.{m}.{h}": shape for i in (1, 2) for m, out in (("q_proj", 64), ("v_proj", 32))
        for h, shape in (("lora_a", (64, 4)), ("lora_b", (4, out)))}
    a = model.model.model.layers[2].self_attn.v_proj.lora_A["default"].weight.data
    assert np.array_equal(tensors["model.layers.2.self_attn.v_proj.lora_a"], a.T)


@pytest.mark.parametrize("config", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 2}, use_rslora=True,
         alpha_pattern={"q_proj": 3.0})])
def test_mlx_lms_fused_model_computes_what_lora_np_does(tmp_path, config):
    """Padding lower ranks (rank_pattern) and folding other scalings (rsLoRA, alpha_pattern) into lora_b keep
    the function: mlx-lm's fuse of the exported folder gives lora_np's adapted logits."""
    model = adapted(LoraConfig(**config))
    expected = model(IDS).logits.data
    save_mlx_adapter(model, tmp_path / "mlx")
    fused = mlx_fused(tiny_model(), tmp_path / "mlx")
    np.testing.assert_allclose(fused(IDS).logits.data, expected, rtol=0, atol=2e-5 * np.abs(expected).max())


def test_peft_to_mlx_to_peft_is_exact(tmp_path):
    model = adapted(LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"]))
    model.save_pretrained(tmp_path / "peft")
    save_mlx_adapter(model, tmp_path / "mlx")
    mlx_to_peft(tmp_path / "mlx", tmp_path / "back")
    before = {k: v for k, v in safetensors.load_file(tmp_path / "peft" / "adapter_model.safetensors").items()
              if "lora_" in k}  # PEFT also saves a targeted embedding's base weight
    after = safetensors.load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and np.array_equal(before[key], after[key]), key
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    back = LoraModel.from_pretrained(tiny_model(), tmp_path / "back")
    assert np.array_equal(back(IDS).logits.data, model(IDS).logits.data)


def test_import_of_a_folder_as_mlx_lm_writes_it(tmp_path):
    """A folder laid out as mlx-lm's trainer leaves it (its training arguments beside the LoRA ones, raw scale
    20, the last 2 of 3 layers): imported, lora_np computes what mlx-lm's fuse gives."""
    folder = tmp_path / "mlx"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tensors = {}
    for i in (1, 2):
        for key, out in (("self_attn.q_proj", 64), ("self_attn.v_proj", 32)):
            tensors[f"model.layers.{i}.{key}.lora_a"] = (rng.standard_normal((64, 8)) * 0.05).astype(np.float32)
            tensors[f"model.layers.{i}.{key}.lora_b"] = (rng.standard_normal((8, out)) * 0.05).astype(np.float32)
    safetensors.save_file(tensors, folder / "adapters.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "train": True, "fine_tune_type": "lora", "data": "data",
        "num_layers": 2, "batch_size": 4, "iters": 100, "learning_rate": 1e-5, "adapter_path": "adapters",
        "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0,
                            "keys": ["self_attn.q_proj", "self_attn.v_proj"]}}))
    assert cli_main(["import", "--from", "mlx", str(folder), "--out", str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 160 and config["lora_dropout"] == 0.0
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    ours = LoraModel.from_pretrained(tiny_model(), tmp_path / "peft")(IDS).logits.data
    theirs = mlx_fused(tiny_model(), folder)(IDS).logits.data
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5 * np.abs(theirs).max())


def test_alpha_from_scale_is_kept_exact_when_it_is_not_an_integer(tmp_path):
    model = adapted(LoraConfig(r=3, lora_alpha=0.7, target_modules=["q_proj"]))
    save_mlx_adapter(model, tmp_path / "mlx")
    config, _ = read_mlx_adapter(tmp_path / "mlx")
    assert config.lora_alpha / config.r == json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())[
        "lora_parameters"]["scale"] == 0.7 / 3


def test_export_refuses_what_mlx_lm_cannot_express(tmp_path):
    uneven = adapted(LoraConfig(r=2, target_modules=["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj",
                                                     "model.layers.2.self_attn.q_proj"]))
    with pytest.raises(NotImplementedError, match=r"adapts \['self_attn.q_proj'\] in layer 0 and "
                                                  r"\['mlp.up_proj'\] in layer 1"):
        save_mlx_adapter(uneven, tmp_path / "a")
    with pytest.raises(NotImplementedError, match="uses DoRA"):
        save_mlx_adapter(adapted(LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_import_names_the_problem(tmp_path):
    folder = tmp_path / "mlx"
    save_mlx_adapter(adapted(LoraConfig(r=2, target_modules=["q_proj"])), folder)
    good = json.loads((folder / "adapter_config.json").read_text())
    for change, error, message in (
            ({"fine_tune_type": "dora"}, NotImplementedError, "fine_tune_type 'dora' is not supported"),
            ({"lora_parameters": {**good["lora_parameters"], "scale": "big"}}, MLXAdapterError,
             "lora_parameters.scale is 'big', expected a number"),
            ({"lora_parameters": {**good["lora_parameters"], "rank": 3}}, MLXAdapterError,
             r"do not have rank 3 \(lora_parameters.rank\)")):
        (folder / "adapter_config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(error, match=message):
            read_mlx_adapter(folder)
    (folder / "adapter_config.json").write_text(json.dumps(good))
    (folder / "adapters.safetensors").unlink()
    assert cli_main(["import", "--from", "mlx", str(folder), "--out", str(tmp_path / "peft")]) == 1


def test_cli_export_mlx(tmp_path):
    model = adapted(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    base = tmp_path / "base"
    lora_np.export.save_merged(tiny_model(), base)
    model.save_pretrained(tmp_path / "peft")
    assert cli_main(["export", "--model", str(base), "--adapter", str(tmp_path / "peft"), "--format", "mlx",
                     "--out", str(tmp_path / "mlx")]) == 0
    assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["num_layers"] == 3
    assert cli_main(["export", "--model", str(base), "--adapter", str(tmp_path / "peft"), "--format", "mlx",
                     "--out", str(tmp_path / "mlx")]) == 2  # not an empty folder


def test_peft_loads_an_imported_mlx_adapter_and_computes_what_lora_np_does(tmp_path):
    """The PEFT folder `lora-np import --from mlx` writes is PEFT's own: peft.PeftModel.from_pretrained loads it
    onto the transformers model, and its logits equal lora_np's (float64, to 1e-10)."""
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    peft = crosscheck("peft")
    ref = tiny_llama(transformers)
    ref.save_pretrained(tmp_path / "model")
    model = get_peft_model(lora_np.load_model(tmp_path / "model"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]))
    rng = np.random.default_rng(0)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = (rng.standard_normal(p.shape) * 0.2).astype(np.float32)
    save_mlx_adapter(model, tmp_path / "mlx")
    assert cli_main(["import", "--from", "mlx", str(tmp_path / "mlx"), "--out", str(tmp_path / "peft")]) == 0
    theirs_model = peft.PeftModel.from_pretrained(ref.double(), tmp_path / "peft").eval()
    patch_float64(torch, theirs_model.base_model.model)
    with torch.no_grad():
        theirs = theirs_model(torch.tensor(IDS)).logits.numpy()
    ours = LoraModel.from_pretrained(lora_np.load_model(tmp_path / "model", dtype="float64"), tmp_path / "peft")
    np.testing.assert_allclose(ours(IDS).logits.data, theirs, rtol=1e-10, atol=1e-10 * np.abs(theirs).max())
