"""The Llama-like families against transformers + PEFT in float64: Llama 3.x (rope types llama3, linear, dynamic,
yarn; tied embeddings), Mistral (sliding window, head_dim), Qwen2 (use_sliding_window, max_window_layers), Qwen3
(q_norm / k_norm, head_dim, attention biases, layer_types), SmolLM3 (no_rope_layers, sliding NoPE layers); every
RoPE type of models/rope.py against transformers' own functions; the GGUF files llama.cpp's converter writes for
them (gguf package: its architecture names, tensor map and q/k permutation).

transformers computes norms, RoPE frequencies and cos/sin in float32 even in a float64 model; `float64_torch`
makes its `torch.float` / `torch.float32` mean float64 inside transformers' RoPE and family modules, so that a
float64 comparison tests the model, not that rounding (relative 1e-10)."""
import math

import numpy as np
import pytest

from conftest import assert_close, crosscheck, f32_tolerance
from lora_np.lora import LoraConfig, LoraModel, get_peft_model
from lora_np.loaders import load_model
from lora_np.models import LlamaConfig, config_from_dict, model_class
from lora_np.models.rope import RopeTables, check_rope_scaling, inv_freq

pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 61
TOL = dict(rtol=1e-10, atol=1e-12)
IDS = np.random.default_rng(1).integers(0, VOCAB, (2, 11))  # longer than every sliding window below (4)
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=1000.0)


class _Float64Torch:
    """The torch module as transformers' RoPE and family code sees it here: float / float32 mean float64."""

    def __init__(self, torch):
        self._torch = torch

    def __getattr__(self, name):
        return self._torch.float64 if name in ("float", "float32") else getattr(self._torch, name)


@pytest.fixture
def float64_torch(monkeypatch):
    """transformers' modeling_rope_utils and the families' modeling modules computing in float64."""
    torch = crosscheck("torch")
    crosscheck("transformers")
    import importlib

    proxy = _Float64Torch(torch)
    for module in ("modeling_rope_utils", "models.llama.modeling_llama", "models.mistral.modeling_mistral",
                   "models.qwen2.modeling_qwen2", "models.qwen3.modeling_qwen3", "models.smollm3.modeling_smollm3"):
        monkeypatch.setattr(importlib.import_module(f"transformers.{module}"), "torch", proxy)
    monkeypatch.setattr(torch.Tensor, "float", torch.Tensor.double)  # longrope's exponent: `.float()`
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # dynamic RoPE's base from a sequence-length tensor
    yield torch
    torch.set_default_dtype(default)


# -- RoPE types against transformers' _compute_*_parameters ---------------------------------------------------
ROPES = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.8,
                    "mscale_all_dim": 0.5, "beta_fast": 16, "beta_slow": 2},
    "yarn-attention_factor-untruncated": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16,
                                          "attention_factor": 0.7, "truncate": False},
    "yarn-no-factor": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5],
                 "long_factor": [2.0, 3.0, 5.0, 7.0, 11.0, 13.0, 17.0, 19.0], "original_max_position_embeddings": 16},
}


def _transformers_rope(transformers, rope, seq_len):
    """transformers' (inv_freq, attention_scaling) for a 16-wide head, max_position_embeddings 64."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                                   rope_parameters={**rope, "rope_theta": 500.0})
    inv, scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, None, seq_len=seq_len)
    return inv.numpy(), scaling


@pytest.mark.parametrize("name", sorted(ROPES))
@pytest.mark.parametrize("seq_len", [None, 40, 100])
def test_inv_freq_and_attention_scaling_match_transformers(float64_torch, name, seq_len):
    transformers = crosscheck("transformers")
    rope = ROPES[name]
    expected, expected_scaling = _transformers_rope(transformers, rope, seq_len)
    scaling = check_rope_scaling(rope, 16, 64, "test")
    actual, actual_scaling = inv_freq(500.0, scaling, 16, 64, seq_len)
    assert_close(actual, expected, rtol=1e-13, name=f"{name} inv_freq")
    assert math.isclose(actual_scaling, expected_scaling, rel_tol=1e-13), (actual_scaling, expected_scaling)


def test_dynamic_and_longrope_tables_follow_the_sequence_length_as_transformers(float64_torch):
    """The rotary embedding's state over calls (dynamic_rope_update): dynamic grows with the longest sequence
    seen and resets below max_position_embeddings; longrope switches factors past the original length."""
    torch, transformers = float64_torch, crosscheck("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    for name in ("dynamic", "longrope"):
        rope = ROPES[name]
        cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64,
                                       rope_parameters={**rope, "rope_theta": 500.0})
        theirs = LlamaRotaryEmbedding(cfg).double()
        ours = RopeTables(16, 500.0, check_rope_scaling(rope, 16, 64, "test"), 64)
        for start, length in ((0, 10), (0, 80), (80, 1), (0, 70), (0, 20), (5, 12), (0, 90)):
            x = torch.zeros(1, dtype=torch.float64)
            cos, sin = theirs(x, torch.arange(start, start + length)[None])
            mine = ours.get(start, length, np.float64)
            assert_close(mine[0], cos[0].numpy(), rtol=1e-12, atol=1e-14, name=f"{name} cos at {start}+{length}")
            assert_close(mine[1], sin[0].numpy(), rtol=1e-12, atol=1e-14, name=f"{name} sin at {start}+{length}")


@pytest.mark.parametrize("rope, problem", [
    ({"rope_type": "proportional", "factor": 2.0}, NotImplementedError),
    ({"rope_type": "linear"}, ValueError),
    ({"rope_type": "linear", "factor": -1.0}, ValueError),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0}, ValueError),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, ValueError),
    ({"rope_type": "yarn", "factor": 2.0, "truncate": "no"}, ValueError),
])
def test_bad_rope_parameters_are_named(rope, problem):
    with pytest.raises(problem, match=r"rope_(type|parameters)"):
        check_rope_scaling(rope, 16, 64, "test")


def test_partial_rotary_factor_is_refused_by_the_llama_family():
    """transformers' Llama-family RoPE ignores partial_rotary_factor (default) or fails on it: refused by name."""
    with pytest.raises(NotImplementedError, match="partial_rotary_factor"):
        config_from_dict({"model_type": "llama", **TINY, "rope_parameters": {"rope_type": "default",
                                                                               "partial_rotary_factor": 0.5}})


def test_partial_rotary_tables_cover_the_rotated_dims_only():
    """rd = int(head_dim · partial_rotary_factor) columns (the Phi-3 families use this)."""
    scaling = check_rope_scaling({"rope_type": "default", "partial_rotary_factor": 0.75}, 16, 64, "test")
    cos, sin = RopeTables(16, 500.0, scaling, 64).get(3, 5, np.float64)
    full_cos, _ = RopeTables(12, 500.0).get(3, 5, np.float64)
    assert cos.shape == sin.shape == (5, 12)
    assert_close(cos, full_cos, rtol=0, atol=0, name="partial cos")  # inv_freq = base^(-2i / rd) for i < rd/2


# -- the families against transformers + PEFT ------------------------------------------------------------------
FAMILIES = {
    "llama3-tied": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters={**ROPES["llama3"],
                                                                                  "rope_theta": 1000.0})),
    "llama-linear": ("LlamaConfig", dict(rope_parameters={**ROPES["linear"], "rope_theta": 1000.0})),
    "llama-dynamic": ("LlamaConfig", dict(max_position_embeddings=8,  # the 11 tokens grow the base
                                          rope_parameters={**ROPES["dynamic"], "rope_theta": 1000.0})),
    "llama-yarn": ("LlamaConfig", dict(rope_parameters={**ROPES["yarn-mscale"], "rope_theta": 1000.0})),
    "llama-longrope": ("LlamaConfig", dict(rope_parameters={  # 11 tokens > 8: long factors, attention scaling √2
        "rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [2.0, 3.0, 5.0, 7.0],
        "original_max_position_embeddings": 8, "rope_theta": 1000.0})),
    "mistral": ("MistralConfig", dict(sliding_window=4, head_dim=12)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(head_dim=12, attention_bias=True, use_sliding_window=True, sliding_window=4,
                                  layer_types=["sliding_attention", "full_attention"])),
    "smollm3": ("SmolLM3Config", dict(num_hidden_layers=3, no_rope_layers=[1, 0, 1], use_sliding_window=True,
                                      sliding_window=4, attention_bias=True, pad_token_id=0)),
}


def _pair(torch, transformers, family, **extra):
    """(transformers model, lora_np model) of `family` with equal float64 weights (biases drawn nonzero)."""
    cls_name, kw = FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls_name)(**{**TINY, **kw, **extra})
    tm = transformers.AutoModelForCausalLM.from_config(cfg).double().eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)
    config = config_from_dict(cfg.to_dict())
    m = model_class(config)(config, dtype=np.float64)
    m.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
    return tm, m.eval()


def _loss_and_grads(torch, pm):
    """PEFT model `pm`'s float64 logits and the gradient of each trainable tensor (transformers' own loss casts
    the logits to float32: the float64 cross-entropy is taken here)."""
    pm.zero_grad()
    logits = pm(input_ids=torch.tensor(IDS)).logits                                              # (B, T, V)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), torch.tensor(IDS[:, 1:]).reshape(-1)
                                      ).backward()
    return logits.detach().numpy(), {n: p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}


def _compare(family, lm, logits, grads):
    lm.zero_grad()
    out = lm(IDS, labels=IDS)
    out.loss.backward()
    assert_close(out.logits.data, logits, name=f"{family} LoRA logits", **TOL)
    mine = {n: p.grad for n, p in lm.named_parameters() if p.requires_grad}
    assert sorted(mine) == sorted(grads), "trainable parameter names differ from PEFT's"
    for n, g in mine.items():
        assert_close(g, grads[n], name=f"{family} grad {n}", rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_lora_gradients_match_transformers_and_peft(float64_torch, tmp_path, family):
    """Logits equal; an adapter PEFT saves loads here with equal logits and gradients, and one saved here
    (PEFT's default target_modules of the model_type) loads in PEFT likewise."""
    torch, transformers, peft = float64_torch, crosscheck("transformers"), crosscheck("peft")
    tm, m = _pair(torch, transformers, family)
    with torch.no_grad():
        expected = tm(torch.tensor(IDS)).logits.numpy()
    assert_close(m(IDS).logits.data, expected, name=f"{family} logits", **TOL)

    pm = peft.get_peft_model(tm, peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    rng = np.random.default_rng(2)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.from_numpy(rng.standard_normal(tuple(p.shape)) * 0.05))
    pm.save_pretrained(tmp_path / "peft")
    _compare(family, LoraModel.from_pretrained(m, tmp_path / "peft", is_trainable=True), *_loss_and_grads(torch, pm))

    tm, m = _pair(torch, transformers, family)
    # PEFT's default target_modules of the model_type (smollm3 has none in PEFT: both ask for them)
    lm = get_peft_model(m, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]
                                      if family == "smollm3" else None))
    for p in lm.parameters():
        if p.requires_grad:
            p.data = p.data + rng.standard_normal(p.shape) * 0.05
    lm.save_pretrained(tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(tm, str(tmp_path / "ours"), is_trainable=True)
    assert pm.peft_config["default"].target_modules == set(lm.peft_config["default"].target_modules)
    _compare(family, lm, *_loss_and_grads(torch, pm))


@pytest.mark.parametrize("family", ["mistral", "qwen3", "smollm3"])
def test_greedy_generation_across_the_window_boundary_matches_transformers(float64_torch, family):
    """The KV cache keeps every position; the window hides the old ones from the sliding layers."""
    torch, transformers = float64_torch, crosscheck("transformers")
    tm, m = _pair(torch, transformers, family)
    prompt = IDS[:1, :3]
    ours = m.generate(prompt, max_new_tokens=9)
    with torch.no_grad():
        theirs = tm.generate(torch.tensor(prompt), max_new_tokens=9, do_sample=False, min_new_tokens=9,
                             pad_token_id=0, eos_token_id=None).numpy()
    assert ours.shape == (1, 12) and np.array_equal(ours, theirs), (ours, theirs)


@pytest.mark.parametrize("family", ["qwen3", "smollm3"])
def test_float32_model_computes_the_float64_logits_to_float32_precision(family):
    """The float32 path (the C kernels: windowed attention, per-head norms, NoPE layers) agrees with float64."""
    torch, transformers = crosscheck("torch"), crosscheck("transformers")
    _, m = _pair(torch, transformers, family)
    m32 = model_class(m.config)(m.config, dtype=np.float32)
    m32.load_state_dict({k: np.asarray(v, np.float32) for k, v in m.state_dict().items()})
    expected = m(IDS).logits.data
    rtol, atol = f32_tolerance(expected)
    assert_close(m32.eval()(IDS).logits.data, expected, rtol=rtol, atol=atol, name=f"{family} float32 logits")


def test_sliding_window_changes_the_logits():
    """The window matters in these tests: without it the same weights give other logits past the window."""
    torch, transformers = crosscheck("torch"), crosscheck("transformers")
    _, m = _pair(torch, transformers, "mistral")
    _, full = _pair(torch, transformers, "mistral", sliding_window=None)
    a, b = m(IDS).logits.data, full(IDS).logits.data
    assert_close(a[:, :4], b[:, :4], name="inside the window", **TOL)
    assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-3


@pytest.mark.parametrize("config, windows, rope", [
    ({"model_type": "mistral", **TINY, "sliding_window": 4}, [4, 4], [True, True]),
    ({"model_type": "mistral", **TINY, "sliding_window": None}, [None, None], [True, True]),
    ({"model_type": "qwen2", **TINY, "use_sliding_window": False, "sliding_window": 4}, [None, None], [True] * 2),
    ({"model_type": "qwen2", **TINY, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
     [None, 4], [True, True]),
    ({"model_type": "qwen3", **TINY, "use_sliding_window": True, "sliding_window": 5,
      "layer_types": ["sliding_attention", "full_attention"]}, [5, None], [True, True]),
    ({"model_type": "smollm3", **TINY, "num_hidden_layers": 4}, [None] * 4, [True, True, True, False]),
    ({"model_type": "smollm3", **TINY, "num_hidden_layers": 4, "use_sliding_window": True, "sliding_window": 3},
     [None, None, None, 3], [True, True, True, False]),
])
def test_config_json_forms_give_transformers_layer_windows(config, windows, rope):
    """Each layer's window and RoPE as transformers' config __post_init__ derives them."""
    transformers = crosscheck("transformers")
    cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "smollm3": transformers.SmolLM3Config}[config["model_type"]]
    theirs = cls(**{k: v for k, v in config.items() if k != "model_type"})
    ours = config_from_dict(config)
    assert ours.sliding_windows() == windows and ours.rope_layers() == rope
    if config["model_type"] != "mistral":
        assert ours.layer_types == theirs.layer_types
    assert config_from_dict(ours.to_config_json()) == ours


@pytest.mark.parametrize("rope_scaling", [
    {"type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_older_rope_scaling_forms_read_as_transformers_does(rope_scaling):
    """rope_theta beside rope_scaling (with "type" or "rope_type"), as older Hub files have them."""
    transformers = crosscheck("transformers")
    d = {"model_type": "llama", **TINY, "rope_scaling": dict(rope_scaling)}
    theirs = transformers.LlamaConfig(**{k: v for k, v in d.items() if k != "model_type"}).rope_parameters
    ours = config_from_dict(d)
    assert ours.rope_theta == theirs["rope_theta"] == TINY["rope_theta"]
    assert ours.rope_scaling == check_rope_scaling(theirs, ours.head_dim, 64, "test")
    assert config_from_dict(ours.to_config_json()) == ours


def test_windows_where_transformers_has_none_are_refused_by_name():
    with pytest.raises(NotImplementedError, match="sliding_window"):
        LlamaConfig(**TINY, sliding_window=4)
    with pytest.raises(ValueError, match="layer_types"):
        config_from_dict({"model_type": "qwen3", **TINY, "layer_types": ["sliding_attention", "full_attention"]})
    with pytest.raises(ValueError, match="layer_types"):
        config_from_dict({"model_type": "qwen2", **TINY, "layer_types": ["full_attention"]})
    with pytest.raises(ValueError, match="no_rope_layers"):
        config_from_dict({"model_type": "smollm3", **TINY, "no_rope_layers": [1, 2]})


# -- GGUF ---------------------------------------------------------------------------------------------------------
def _converter_rope_freqs(rope, dim):
    """convert_hf_to_gguf.py's LlamaModel.generate_extra_tensors: Llama 3's frequency factors, float32."""
    torch = crosscheck("torch")
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    old, lo, hi, factor = (rope["original_max_position_embeddings"], rope["low_freq_factor"],
                           rope["high_freq_factor"], rope["factor"])
    factors = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        smooth = (old / wavelen - lo) / (hi - lo)
        factors.append(1 if wavelen < old / hi else factor if wavelen > old / lo else
                       1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def _write_gguf(path, tm, arch, extra=lambda w: None):
    """`tm` as llama.cpp's convert_hf_to_gguf.py writes it: its keys for `arch`, gguf's tensor names, q/k rows
    permuted for the LlamaModel subclasses (llama, smollm3), Llama 3's rope_freqs tensor."""
    gguf = crosscheck("gguf")
    cfg = tm.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    w.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key in ("attention_factor", "beta_fast", "beta_slow"):
            if rope.get(key) is not None:
                getattr(w, {"attention_factor": "add_rope_scaling_yarn_attn_factor",
                            "beta_fast": "add_rope_scaling_yarn_beta_fast",
                            "beta_slow": "add_rope_scaling_yarn_beta_slow"}[key])(rope[key])
    if "head_dim" in cfg.to_diff_dict():
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    permuted = arch in ("llama", "smollm3")
    if permuted:
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    tensor_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)

    def permute(x, n_head):  # convert_hf_to_gguf.LlamaModel.permute
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    for name, t in tm.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.numpy().astype(np.float32)
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            a = permute(a, cfg.num_attention_heads)
        if permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            a = permute(a, cfg.num_key_value_heads)
        w.add_tensor(tensor_map.get_name(name, try_suffixes=(".weight", ".bias")), a)
    if rope["rope_type"] == "llama3":
        w.add_tensor("rope_freqs.weight", _converter_rope_freqs(rope, cfg.head_dim))
    if cfg.pad_token_id is not None:  # gguf.SpecialVocab: config.json's pad_token_id when the tokenizer has none
        w.add_pad_token_id(cfg.pad_token_id)
    extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_CASES = {
    # llama3 bands chosen so that every frequency is high (factor 1) or low (factor 8): rope_freqs exact in float32
    "llama3": ("llama", "LlamaConfig", dict(head_dim=16, num_attention_heads=2, num_key_value_heads=1,
                                            rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                             "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                                                             "original_max_position_embeddings": 40,
                                                             "rope_theta": 10000.0})),
    "llama-linear": ("llama", "LlamaConfig", dict(rope_parameters={**ROPES["linear"], "rope_theta": 1000.0})),
    "llama-yarn": ("llama", "LlamaConfig", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                 "original_max_position_embeddings": 16,
                                                                 "beta_fast": 16.0, "beta_slow": 2.0,
                                                                 "attention_factor": 0.75, "rope_theta": 1000.0})),
    "mistral": ("llama", "MistralConfig", dict(sliding_window=None, head_dim=12)),  # llama.cpp: no window
    "qwen2": ("qwen2", "Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", "Qwen3Config", dict(head_dim=12)),
    "smollm3": ("smollm3", "SmolLM3Config", dict(num_hidden_layers=4, pad_token_id=0)),  # llama.cpp: no RoPE on layer 3
}


@pytest.mark.parametrize("case", sorted(GGUF_CASES))
def test_gguf_as_llama_cpp_converts_it_matches_transformers(float64_torch, tmp_path, case):
    torch, transformers = float64_torch, crosscheck("transformers")
    arch, cls_name, kw = GGUF_CASES[case]
    torch.manual_seed(0)
    cfg = getattr(transformers, cls_name)(**{**TINY, "rms_norm_eps": 2.0 ** -17, **kw})  # eps exact in float32
    tm = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.5)
        for p in tm.parameters():  # float32 values: the GGUF's F32 tensors hold them exactly
            p.copy_(p.to(torch.float32))
    tm = tm.double()
    _write_gguf(tmp_path / "m.gguf", tm, arch)
    model = load_model(tmp_path / "m.gguf", dtype="float64")
    with torch.no_grad():
        expected = tm(torch.tensor(IDS)).logits.numpy()
    assert_close(model(IDS).logits.data, expected, name=f"{case} GGUF logits", **TOL)
    assert model.model.embed_tokens.padding_idx == tm.model.embed_tokens.padding_idx  # tokenizer.ggml.padding_token_id
    if case == "smollm3":
        assert model.config.rope_layers() == [True, True, True, False]


def test_llama3_rope_freqs_reproduce_transformers_llama3_within_float32(float64_torch):
    """With a medium band the converter's rope_freqs are rounded to float32: the frequencies agree to that."""
    transformers = crosscheck("transformers")
    rope = {**ROPES["llama3"], "rope_theta": 500.0}
    factors = _converter_rope_freqs(rope, 16)
    assert ((factors != 1) & (factors != rope["factor"])).any(), "the case needs a medium band"
    expected, _ = _transformers_rope(transformers, ROPES["llama3"], None)
    tables = RopeTables(16, 500.0, freq_factors=factors)
    tables.get(0, 1, np.float64)
    assert_close(tables.inv_freq, expected, rtol=1e-6, name="inv_freq")


@pytest.mark.parametrize("config", [
    {"model_type": "qwen2", **TINY, "tie_word_embeddings": True},
    {"model_type": "qwen3", **TINY, "head_dim": 12, "attention_bias": True},
    {"model_type": "smollm3", **TINY, "num_hidden_layers": 4, "rope_theta": 1000.0},
], ids=lambda c: c["model_type"])
def test_merged_gguf_export_reads_back_as_the_same_model(tmp_path, config):
    """save_merged_gguf inverts these families' GGUF reading (config keys, names, permutation)."""
    from lora_np.export import save_merged_gguf

    config = config_from_dict({**config, "rms_norm_eps": 2.0 ** -17})
    model = model_class(config)(config, dtype=np.float64)
    rng = np.random.default_rng(0)
    for p in model.parameters():  # float32 values: F32 tensors hold them exactly
        p.data = (rng.standard_normal(p.shape) * 0.2).astype(np.float32).astype(np.float64)
    save_merged_gguf(model, tmp_path / "m.gguf")
    back = load_model(tmp_path / "m.gguf", dtype="float64")
    assert type(back.config) is type(config) and back.config.model_type == config.model_type
    assert_close(back(IDS).logits.data, model(IDS).logits.data, rtol=1e-13, atol=1e-14, name="logits")


@pytest.mark.parametrize("extra, error, named", [
    (lambda w: w.add_string("llama.rope.scaling.type", "longrope"), NotImplementedError, "llama.rope.scaling.type"),
    (lambda w: w.add_float32("llama.rope.scaling.yarn_log_multiplier", 0.1), NotImplementedError,
     "llama.rope.scaling.yarn_log_multiplier"),
    (lambda w: w.add_float32("llama.rope.scaling.factor", 2.0), NotImplementedError, "llama.rope.scaling.factor"),
    (lambda w: w.add_uint32("llama.attention.sliding_window", 4), NotImplementedError,
     "llama.attention.sliding_window"),
    (lambda w: w.add_tensor("rope_freqs.weight", np.ones(3, np.float32)), ValueError, "rope_freqs.weight"),
], ids=["longrope", "yarn_log_multiplier", "factor-without-type", "sliding_window", "rope_freqs-shape"])
def test_gguf_rope_keys_computing_something_else_are_refused_by_name(tmp_path, extra, error, named):
    torch, transformers = crosscheck("torch"), crosscheck("transformers")
    torch.manual_seed(0)
    tm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    _write_gguf(tmp_path / "m.gguf", tm, "llama", extra)
    with pytest.raises(error, match=rf"m\.gguf: .*{named}"):
        load_model(tmp_path / "m.gguf")
