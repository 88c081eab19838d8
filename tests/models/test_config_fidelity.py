"""Every config field that changes what a model computes is either implemented, and then the loaded model's
logits equal transformers' in float64 (relative 1e-10), or refused with a NotImplementedError naming the field.
Tiny random models are built with transformers, saved as users get them, and loaded here."""
import json

import numpy as np
import pytest

from lora_np.loaders import CheckpointError, load_model
from lora_np.models import GPT2Config, LlamaConfig, config_from_dict
from lora_np.safetensors import load_file, save_file
from conftest import IDS, assert_close, crosscheck, patch_float64, saved_transformers_model

LLAMA = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
GPT2 = dict(vocab_size=101, n_embd=32, n_layer=3, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def _saved(tmp_path, cls_name, **kw):
    """A random transformers model of config class `cls_name` saved in tmp_path (biases drawn nonzero)."""
    return saved_transformers_model(tmp_path, getattr(crosscheck("transformers"), cls_name)(**kw))


def _expect_same_logits(tmp_path, ref, llama):
    torch = crosscheck("torch")
    model = load_model(tmp_path, dtype="float64")
    ref = ref.double()
    if llama:
        patch_float64(torch, ref)
    with torch.no_grad():
        expected = ref(torch.tensor(IDS)).logits.numpy()
    assert_close(model(IDS).logits.data, expected, rtol=1e-10, atol=1e-12, name="logits")
    return model


@pytest.mark.parametrize("kw", [
    dict(hidden_act="gelu"), dict(hidden_act="gelu_pytorch_tanh"), dict(hidden_act="gelu_new"),
    dict(hidden_act="relu"), dict(hidden_act="tanh"), dict(hidden_act="sigmoid"), dict(hidden_act="swish"),
    dict(head_dim=12), dict(mlp_bias=True), dict(attention_bias=True), dict(pretraining_tp=2),
    dict(tie_word_embeddings=True), dict(rms_norm_eps=0.25), dict(attention_dropout=0.3),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_llama_fields_match_transformers(tmp_path, kw):
    ref = _saved(tmp_path, "LlamaConfig", **LLAMA, **kw)
    _expect_same_logits(tmp_path, ref, llama=True)


@pytest.mark.parametrize("kw", [
    dict(scale_attn_weights=False), dict(scale_attn_by_inverse_layer_idx=True),
    dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True), dict(reorder_and_upcast_attn=True),
    dict(tie_word_embeddings=False), dict(activation_function="relu"), dict(activation_function="gelu"),
    dict(activation_function="gelu_pytorch_tanh"), dict(activation_function="silu"), dict(n_inner=40),
    dict(layer_norm_epsilon=0.5), dict(resid_pdrop=0.1, embd_pdrop=0.2, attn_pdrop=0.3),
], ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_gpt2_fields_match_transformers(tmp_path, kw):
    ref = _saved(tmp_path, "GPT2Config", **{**GPT2, **kw})
    model = _expect_same_logits(tmp_path, ref, llama=False)
    tied = model.lm_head.weight is model.transformer.wte.weight
    assert tied == kw.get("tie_word_embeddings", True)


def test_untied_gpt2_head_is_the_files_lm_head(tmp_path):
    """The regression: an untied GPT-2 used its embedding as the head (lm_head.weight dropped as an alias)."""
    ref = _saved(tmp_path, "GPT2Config", **GPT2, tie_word_embeddings=False)
    model = load_model(tmp_path, dtype="float64")
    head = ref.state_dict()["lm_head.weight"].double().numpy()
    assert np.array_equal(model.lm_head.weight.data, head)
    assert not np.array_equal(model.lm_head.weight.data, model.transformer.wte.weight.data)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_tied_alias_that_differs_is_refused(tmp_path, arch):
    """A file may hold the tied head as its own tensor; it must equal what it aliases, or it is not tied."""
    if arch == "llama":
        _saved(tmp_path, "LlamaConfig", **LLAMA, tie_word_embeddings=True)
        embed, head = "model.embed_tokens.weight", "lm_head.weight"
    else:
        _saved(tmp_path, "GPT2Config", **GPT2)
        embed, head = "transformer.wte.weight", "lm_head.weight"
    tensors = dict(load_file(tmp_path / "model.safetensors", mmap=False))
    tensors[head] = tensors[embed].copy()
    save_file(tensors, tmp_path / "model.safetensors")
    load_model(tmp_path)  # an identical copy is fine
    tensors[head][3, 5] += 1
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{head}' differs from '{embed}'"):
        load_model(tmp_path)


@pytest.mark.parametrize("cls_name, kw, field", [
    ("LlamaConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    ("LlamaConfig", dict(hidden_act="gelu_fast"), "hidden_act"),
    ("LlamaConfig", dict(hidden_act="quick_gelu"), "hidden_act"),
    ("Qwen2Config", dict(rope_parameters={"rope_type": "proportional", "rope_theta": 10000.0}), "rope_type"),
    ("GPT2Config", dict(activation_function="gelu_fast"), "activation_function"),
    ("GPT2Config", dict(add_cross_attention=True), "add_cross_attention"),
])
def test_fields_computing_something_else_are_refused_by_name(tmp_path, cls_name, kw, field):
    _saved(tmp_path, cls_name, **(GPT2 if cls_name == "GPT2Config" else LLAMA), **kw)
    with pytest.raises(NotImplementedError, match=rf"config\.json: .*{field}"):
        load_model(tmp_path)


def test_qwen2_sliding_window_that_covers_no_layer_loads(tmp_path):
    """use_sliding_window with max_window_layers >= the layer count gives full attention everywhere."""
    _saved(tmp_path, "Qwen2Config", **LLAMA, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    load_model(tmp_path)


@pytest.mark.parametrize("field, value, problem", [
    ("num_attention_heads", 0, "num_attention_heads must be an integer >= 1"),
    ("num_attention_heads", 5, "hidden_size 32 is not a multiple of num_attention_heads 5"),
    ("num_key_value_heads", 3, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ("hidden_size", -32, "hidden_size must be an integer"),
    ("hidden_size", "32", "hidden_size must be an integer"),
    ("intermediate_size", 4.5, "intermediate_size must be an integer"),
    ("vocab_size", True, "vocab_size must be an integer"),
    ("rms_norm_eps", 0, "rms_norm_eps must be a finite number > 0"),
    ("rope_theta", "big", "rope_theta must be a finite number"),
    ("head_dim", 7, "head_dim 7 must be even"),
    ("num_attention_heads", 32, r"head_dim 1 \(hidden_size 32 / num_attention_heads 32\) must be even"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false"),
    ("attention_dropout", 1.0, "attention_dropout must be a finite number >= 0 and < 1"),
])
def test_config_fields_of_the_wrong_type_or_value_are_named(field, value, problem):
    with pytest.raises(ValueError, match=problem):
        config_from_dict({"model_type": "llama", **LLAMA, field: value})


@pytest.mark.parametrize("field, value", [("n_head", 0), ("n_embd", 30), ("n_layer", -1), ("n_inner", 0),
                                          ("scale_attn_weights", 1), ("layer_norm_epsilon", float("nan"))])
def test_gpt2_fields_of_the_wrong_type_or_value_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        config_from_dict({"model_type": "gpt2", **{k: v for k, v in GPT2.items() if "pdrop" not in k}, field: value})


def test_configs_round_trip_through_to_dict():
    for cfg in (LlamaConfig(**LLAMA, hidden_act="relu", head_dim=12), GPT2Config(scale_attn_weights=False)):
        assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("cls_name, kw", [
    ("LlamaConfig", dict(attention_dropout=0.3)),
    ("GPT2Config", dict(resid_pdrop=0.1, embd_pdrop=0.2, attn_pdrop=0.3)),
])
def test_dropout_fields_act_in_training_only(tmp_path, monkeypatch, cls_name, kw):
    """Dropout (transformers applies it in training) is applied where transformers applies it: with dropout
    made the identity, training mode computes eval mode's logits, through the unfused attention path; with
    real dropout it computes something else, and gradients flow."""
    from lora_np import functional as F
    from lora_np import nn

    _saved(tmp_path, cls_name, **{**(GPT2 if cls_name == "GPT2Config" else LLAMA), **kw})
    model = load_model(tmp_path, dtype="float64")
    assert not model.training, "load_model gives a model in eval mode, as from_pretrained does"
    expected = model(IDS).logits.data
    model.train()
    unfused = []
    real_attention_dropout = nn._attention_with_dropout
    monkeypatch.setattr(nn, "_attention_with_dropout", lambda *a, **kw: unfused.append(a[5]) or real_attention_dropout(*a, **kw))
    monkeypatch.setattr(F, "dropout", lambda x, p=0.5, training=True, generator=None: x)
    assert_close(model(IDS).logits.data, expected, rtol=1e-12, atol=1e-13, name="logits, dropout as identity")
    assert unfused and set(unfused) == {kw.get("attention_dropout", kw.get("attn_pdrop"))}
    monkeypatch.undo()
    model.requires_grad_(True)
    out = model(IDS, labels=IDS)
    assert not np.allclose(out.logits.data, expected)
    out.loss.backward()
    assert all(p.grad is not None and np.isfinite(p.grad).all() for p in model.parameters())


def test_a_gpt2_config_without_dropout_keys_gets_transformers_defaults():
    cfg = config_from_dict({"model_type": "gpt2", "n_layer": 1})
    assert (cfg.resid_pdrop, cfg.embd_pdrop, cfg.attn_pdrop) == (0.1, 0.1, 0.1)


@pytest.mark.parametrize("cls_name,kw", [
    ("LlamaConfig", {}), ("LlamaConfig", dict(pad_token_id=7)), ("LlamaConfig", dict(pad_token_id=-1)),
    ("MistralConfig", dict(pad_token_id=3)), ("Qwen2Config", dict(pad_token_id=100)), ("Qwen3Config", {}),
    ("Gemma2Config", {}), ("Gemma3TextConfig", dict(pad_token_id=9)), ("Phi3Config", dict(vocab_size=32064)),
    ("Olmo2Config", {}), ("GraniteConfig", dict(pad_token_id=0)), ("SmolLM3Config", dict(vocab_size=128256)),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_embedding_padding_idx_is_transformers_pad_token_id(cls_name, kw):
    """embed_tokens' padding_idx (the row that takes no gradient, in the layer and in LoRA on it) is the one
    transformers gives it from pad_token_id, given or the family's default (Phi-3 32000, OLMo2 1, SmolLM3 128004,
    Gemma 0)."""
    transformers = crosscheck("transformers")
    from lora_np.models import model_class

    cfg = getattr(transformers, cls_name)(**{**LLAMA, "vocab_size": 101, **kw, "num_hidden_layers": 1})
    expected = transformers.AutoModelForCausalLM.from_config(cfg).model.embed_tokens.padding_idx
    config = config_from_dict(cfg.to_dict())
    assert model_class(config)(config).model.embed_tokens.padding_idx == expected


def test_a_default_pad_id_outside_a_small_vocabulary_leaves_no_padding_row():
    """Phi-3's default pad_token_id 32000 in a 101-token vocabulary: transformers cannot build that model (its
    Embedding asserts); here the embedding gets no padding row, so tiny test models of the family still load."""
    from lora_np.models import model_class

    config = config_from_dict({**LLAMA, "model_type": "phi3"})
    assert config.pad_token_id == 32000 and config.vocab_size == 101
    assert model_class(config)(config).model.embed_tokens.padding_idx is None
