"""OLMo 2, Granite and Phi-3 / Phi-4-mini against transformers + PEFT in float64.

Each family is a tiny random transformers model with every option of the family switched on so that it matters
(OLMo 2's full-width q/k norms and post-norms with non-trivial weights and a scaled RoPE, Granite's four
multipliers ≠ 1, Phi-3's fused projections, partial rotary, longrope past original_max_position_embeddings and a
sliding window shorter than the sequence). Properties: the HF folder transformers saves loads here with the same logits; with the same
adapter, logits, loss and the gradient of every LoRA tensor agree with PEFT (≤ 1e-10 relative) whichever side
wrote the adapter; "all-linear" adapts the modules PEFT adapts; a GGUF written as llama.cpp's converter writes it
(gguf-py's keys and tensor names, its q/k permutation where it applies one) loads with the same logits.

transformers computes its RMSNorms and RoPE tables in float32 even in a float64 model; `_float64` gives it
float64 versions (the RoPE tables recomputed from transformers' formulas, checked against its own float32 tables
first) so that a float64 comparison tests the model, not that rounding."""
import math

import numpy as np
import pytest

from conftest import assert_close, compare_runs, crosscheck, lora_np_run, peft_run, perturb_trainable
from lora_np.loaders import load_model
from lora_np.lora import LoraConfig, LoraModel, get_peft_model

pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 61
TOL = dict(rtol=1e-10, atol=1e-12)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=2.0**-17, tie_word_embeddings=False)


def _ids(T=11, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (2, T))


ROPE = {"rope_theta": 500.0, "rope_type": "default"}
OPTIONS = {
    "olmo2": dict(attention_bias=True, rope_parameters={**ROPE, "rope_type": "linear", "factor": 2.5}),
    "granite": dict(attention_bias=True, mlp_bias=True, embedding_multiplier=3.0, residual_multiplier=0.37,
                    attention_multiplier=0.11, logits_scaling=2.5, rope_parameters=ROPE),
}
LONGROPE = {"rope_type": "longrope", "rope_theta": 300.0, "short_factor": [1.0, 1.25, 2.125],
            "long_factor": [1.75, 3.0, 5.5]}
PHI_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # Phi3Config's default ids are past VOCAB
OPTIONS["phi3"] = dict(**PHI_IDS, sliding_window=6, original_max_position_embeddings=16,  # Phi-3-mini: window, longrope
                       rope_parameters={**LONGROPE, "short_factor": [1.0, 1.25, 2.125, 0.875],
                                        "long_factor": [1.75, 3.0, 5.5, 1.125]})
OPTIONS["phi4mini"] = dict(**PHI_IDS, tie_word_embeddings=True, original_max_position_embeddings=16,  # partial rotary
                           rope_parameters={**LONGROPE, "partial_rotary_factor": 0.75})
CONFIGS = {"olmo2": "Olmo2Config", "granite": "GraniteConfig", "phi3": "Phi3Config", "phi4mini": "Phi3Config"}


def _randomize(torch, ref, rng):
    """Every weight drawn afresh (norm weights and biases far from their 1 / 0 init)."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            scale = 0.3 if name.endswith("norm.weight") or name.endswith(".bias") else 0.15
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(torch.from_numpy(base + scale * rng.standard_normal(tuple(p.shape))))


def _inv_freq64(torch, cfg, seq_len):
    """transformers' inverse frequencies and attention scaling (_compute_default_rope_parameters,
    _compute_linear_scaling_rope_parameters, _compute_longrope_parameters with dynamic_rope_update's choice of
    factors) in float64."""
    rope = cfg.rope_parameters
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    powers = rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)          # (rd/2,)
    if rope["rope_type"] in ("default", "linear"):
        return 1.0 / (powers * rope.get("factor", 1.0)), 1.0
    original = rope["original_max_position_embeddings"]
    factors = torch.tensor(rope["long_factor" if seq_len > original else "short_factor"], dtype=torch.float64)
    factor = cfg.max_position_embeddings / original
    return 1.0 / (factors * powers), math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0


def _float64(torch, ref):
    """Make transformers' float32 internals float64: every *RMSNorm, and the RoPE tables (each call's tables
    first checked against transformers' own float32 ones)."""
    def rms_forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for mod in ref.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = rms_forward.__get__(mod)
    rot = ref.model.rotary_emb
    own = rot.forward

    def rope_forward(x, position_ids):
        inv, scaling = _inv_freq64(torch, ref.config, int(position_ids.max()) + 1)
        f = position_ids[..., None].double() * inv                                  # (B, T, rd/2)
        emb = torch.cat([f, f], -1)                                                 # (B, T, rd)
        cos, sin = (emb.cos() * scaling).to(x.dtype), (emb.sin() * scaling).to(x.dtype)
        cos32, sin32 = own(x.float(), position_ids)
        assert torch.allclose(cos32.double(), cos, atol=1e-5) and torch.allclose(sin32.double(), sin, atol=1e-5)
        return cos, sin

    rot.forward = rope_forward


def _pair(kind, folder, **options):
    """(torch, transformers model in float64, lora_np model loaded from the HF folder transformers saved); the
    weights are float32 numbers (as a GGUF holds them)."""
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    torch.manual_seed(0)
    config = getattr(transformers, CONFIGS[kind])(**{**SMALL, **OPTIONS[kind], **options})
    ref = transformers.AutoModelForCausalLM.from_config(config)
    _randomize(torch, ref, np.random.default_rng(0))
    ref.save_pretrained(folder)
    ref = ref.double().eval()
    _float64(torch, ref)
    return torch, ref, load_model(folder, dtype="float64")


def _logits(torch, ref, ids):
    with torch.no_grad():
        return ref(torch.tensor(ids)).logits.numpy()


KINDS = ["olmo2", "granite", "phi3", "phi4mini"]
LENGTHS = {"phi3": (12, 20), "phi4mini": (12, 20)}  # short and long factors (original_max_position_embeddings 16)


@pytest.mark.parametrize("kind", KINDS)
def test_hf_folder_matches_transformers(kind, tmp_path):
    torch, ref, model = _pair(kind, tmp_path)
    assert type(model).__name__ == type(ref).__name__
    assert sorted(model.state_dict(), key=str) == sorted(ref.state_dict(), key=str)
    for T in LENGTHS.get(kind, (11,)):
        ids = _ids(T)
        assert_close(model(ids).logits.data, _logits(torch, ref, ids), name=f"logits T={T}", **TOL)


@pytest.mark.parametrize("kind", ["granite", "phi4mini"])
def test_chunked_training_loss_matches_transformers(kind, tmp_path):
    """The training path (loss without the logits, chunk by chunk through the head) carries Granite's
    logits_scaling and Phi-4-mini's tied head: loss and gradients equal transformers'."""
    torch, ref, model = _pair(kind, tmp_path)
    ids = _ids(LENGTHS.get(kind, (11,))[-1])
    logits = ref(torch.tensor(ids)).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), torch.tensor(ids[:, 1:]).reshape(-1))
    loss.backward()
    model.requires_grad_(True)
    out = model(ids, labels=ids, return_logits=False)
    assert out.logits is None
    out.loss.backward()
    assert_close(out.loss.data, loss.item(), name="loss", **TOL)
    params = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert_close(params[name].grad, p.grad.numpy(), name=f"grad {name}", **TOL)


@pytest.mark.parametrize("kind", ["phi3", "phi4mini"])
def test_greedy_generation_matches_transformers(kind, tmp_path):
    """With the KV cache, across the sliding window and past original_max_position_embeddings (where transformers'
    Phi-3 drops the cache of short-factor keys once and recomputes every position with the long factors)."""
    torch, ref, model = _pair(kind, tmp_path)
    ids = _ids(10)
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(ids), max_new_tokens=12, do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(model.generate(ids, max_new_tokens=12), theirs)


# -- LoRA against PEFT -------------------------------------------------------------------------








LORA = {"olmo2": dict(r=3, lora_alpha=5, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
        "granite": dict(r=3, lora_alpha=7, target_modules=["v_proj", "gate_proj", "down_proj"], use_rslora=True),
        "phi3": dict(r=3, lora_alpha=5, target_modules=["qkv_proj", "gate_up_proj"]),
        "phi4mini": dict(r=2, lora_alpha=4, target_modules=["qkv_proj", "o_proj", "down_proj", "embed_tokens"])}


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_loads_here_with_peft_gradients(kind, tmp_path):
    torch, ref, model = _pair(kind, tmp_path / "model")
    peft = crosscheck("peft")
    pm = peft.get_peft_model(ref, peft.LoraConfig(**LORA[kind]))
    params = dict(pm.named_parameters())
    with torch.no_grad():
        perturb_trainable(params.items(), np.random.default_rng(2),
                          lambda n, d: params[n].add_(torch.from_numpy(d)), 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    ids = _ids(LENGTHS.get(kind, (11,))[-1])
    theirs = peft_run(torch, pm, ids)
    compare_runs(lora_np_run(LoraModel.from_pretrained(model, tmp_path / "adapter", is_trainable=True), ids), theirs,
                 TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_all_linear_adapter_loads_in_peft_with_our_gradients(kind, tmp_path):
    torch, ref, model = _pair(kind, tmp_path / "model")
    peft = crosscheck("peft")
    kw = dict(r=2, lora_alpha=3, target_modules="all-linear")
    lm = get_peft_model(model, LoraConfig(**kw))
    params = dict(lm.named_parameters())
    perturb_trainable(params.items(), np.random.default_rng(3),
                      lambda n, d: setattr(params[n], "data", params[n].data + d), 0.1)
    lm.save_pretrained(tmp_path / "adapter")
    ids = _ids(LENGTHS.get(kind, (11,))[-1])
    mine = lora_np_run(lm, ids)
    theirs_all_linear = peft.get_peft_model(ref, peft.LoraConfig(**kw))
    assert sorted(n for n, p in theirs_all_linear.named_parameters() if p.requires_grad) == sorted(mine[2])
    pm = peft.PeftModel.from_pretrained(theirs_all_linear.unload(), str(tmp_path / "adapter"), is_trainable=True)
    compare_runs(mine, peft_run(torch, pm, ids), TOL)


@pytest.mark.parametrize("kind", ["olmo2", "granite", "phi3"])
def test_no_default_target_modules_as_in_peft(kind, tmp_path):
    """PEFT has no default target_modules for these model types and asks for them; so do we."""
    torch, ref, model = _pair(kind, tmp_path)
    peft = crosscheck("peft")
    with pytest.raises(ValueError, match="target_modules"):
        peft.get_peft_model(ref, peft.LoraConfig(r=2))
    with pytest.raises(ValueError, match=f"target_modules is None and model type '{kind}' has no default"):
        get_peft_model(model, LoraConfig(r=2))


# -- GGUF as llama.cpp's converter writes it ------------------------------------------------------
def _permute(w, n_head):
    """convert_hf_to_gguf.LlamaModel.permute (n_head: the query or the key/value heads)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, ref, arch, granite_scales=True):
    """`ref` as convert_hf_to_gguf.py converts it: TextModel's keys (olmo2), LlamaModel's with its
    rope.dimension_count and q/k permutation and GraniteModel's *_scale keys (granite), Phi3MiniModel's keys and
    longrope factor tensors (phi3); tensor names from gguf-py's tensor map, tied heads written once. The
    converter writes a granite scale only when it is nonzero: granite_scales=False writes none."""
    gguf = crosscheck("gguf")
    cfg = ref.config
    rope = cfg.rope_parameters
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "granite":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim)
    if arch == "granite" and granite_scales:
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
    if arch == "phi3":
        original = rope.get("original_max_position_embeddings", cfg.original_max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(original)
        w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * cfg.hidden_size)
                                   // cfg.num_attention_heads)
        w.add_sliding_window(cfg.sliding_window or 0)
        if rope.get("long_factor"):
            scale = cfg.max_position_embeddings / original
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0)
            w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
            w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], np.float32))
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], cfg.num_hidden_layers)
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.numpy().astype(np.float32)
        if arch == "granite" and name.endswith("q_proj.weight"):
            a = _permute(a, cfg.num_attention_heads)
        elif arch == "granite" and name.endswith("k_proj.weight"):
            a = _permute(a, cfg.num_key_value_heads)
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# GGUF keeps numbers as float32: values float32 holds exactly; llama.cpp's olmo2 and granite have no biases; the
# converter writes longrope's attention factor √(1 + ln s / ln n) for s = max / original positions: s = n³ makes
# it 2, exactly
GGUF_OPTIONS = {"olmo2": dict(attention_bias=False, rope_parameters=ROPE),
                "granite": dict(attention_bias=False, mlp_bias=False, residual_multiplier=0.375,
                                attention_multiplier=0.125),
                "phi3": dict(original_max_position_embeddings=8, max_position_embeddings=4096),
                "phi4mini": dict(original_max_position_embeddings=8, max_position_embeddings=4096)}
GGUF_LENGTHS = {"phi3": (8, 20), "phi4mini": (8, 20)}


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_matches_transformers(kind, tmp_path):
    torch, ref, _ = _pair(kind, tmp_path / "model", **GGUF_OPTIONS[kind])
    _write_gguf(tmp_path / "m.gguf", ref, "phi3" if kind.startswith("phi") else kind)
    model = load_model(tmp_path / "m.gguf", dtype="float64")
    assert sorted(model.state_dict(), key=str) == sorted(ref.state_dict(), key=str)
    for name, t in ref.state_dict().items():
        assert_close(model.state_dict()[name], t.numpy(), rtol=0, name=name)
    for T in GGUF_LENGTHS.get(kind, (11,)):
        ids = _ids(T)
        assert_close(model(ids).logits.data, _logits(torch, ref, ids), name=f"logits T={T}", **TOL)


# -- config.json: our own, and the older forms found on the Hub ---------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_exported_folder_loads_in_transformers(kind, tmp_path):
    """to_config_json is the inverse of from_config_json: the folder export writes computes the same in
    transformers."""
    from lora_np.export import save_merged

    torch, ref, model = _pair(kind, tmp_path / "model")
    save_merged(model, tmp_path / "out")
    transformers = crosscheck("transformers")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    theirs, back_d = ref.config.to_dict(), back.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype"):
        theirs.pop(key), back_d.pop(key)
    assert back_d.pop("head_dim", 8) == 8 and back_d == theirs
    _float64(torch, back)
    ids = _ids(LENGTHS.get(kind, (11,))[-1])
    assert_close(_logits(torch, back, ids), _logits(torch, ref, ids), name="logits", **TOL)


def _hub_form(folder, edit):
    """Rewrite folder/config.json by `edit(dict)` (an older form of the same model)."""
    import json

    path = folder / "config.json"
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _phi4_mini_hub(d):
    """Phi-4-mini-instruct's config.json: rope_scaling with "type", rope_theta and partial_rotary_factor beside."""
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    rope["type"] = rope.pop("rope_type")
    rope.pop("original_max_position_embeddings", None)
    d["rope_scaling"] = rope


def _phi3_su_hub(d):
    """Phi-3-mini-128k's first config.json: rope_scaling type "su" (transformers reads it as longrope)."""
    _phi4_mini_hub(d)
    d["rope_scaling"]["type"] = "yarn"
    del d["partial_rotary_factor"]


def _phi3_mini_4k_hub(d):
    """Phi-3-mini-4k-instruct's config.json: rope_scaling null, rope_theta beside it."""
    d["rope_theta"] = d.pop("rope_parameters")["rope_theta"]
    d["rope_scaling"] = None


@pytest.mark.parametrize("kind,options,edit", [("phi4mini", {}, _phi4_mini_hub), ("phi3", {}, _phi3_su_hub),
                                               ("phi3", dict(rope_parameters=ROPE), _phi3_mini_4k_hub)])
def test_hub_config_forms_match_transformers(kind, options, edit, tmp_path):
    torch, _, _ = _pair(kind, tmp_path, **options)
    _hub_form(tmp_path, edit)
    transformers = crosscheck("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert ref.config.rope_parameters["rope_type"] == options.get("rope_parameters", LONGROPE)["rope_type"]
    _float64(torch, ref)
    model = load_model(tmp_path, dtype="float64")
    for T in LENGTHS[kind]:
        ids = _ids(T)
        assert_close(model(ids).logits.data, _logits(torch, ref, ids), name=f"logits T={T}", **TOL)


def test_phi3_residual_dropout_in_training_only(tmp_path):
    """resid_pdrop drops each sublayer's output in training; eval computes transformers' function."""
    torch, ref, _ = _pair("phi3", tmp_path, resid_pdrop=0.5)
    model = load_model(tmp_path, dtype="float64")
    assert model.model.layers[1].resid_mlp_dropout.p == 0.5
    ids = _ids()
    assert_close(model(ids).logits.data, _logits(torch, ref, ids), name="eval logits", **TOL)
    model.train()
    trained = model(ids).logits.data
    assert np.abs(trained - _logits(torch, ref, ids)).max() > 1e-3


# -- bad input is named --------------------------------------------------------------------------
def test_refusals_name_the_field():
    from lora_np.models import config_from_dict

    base = dict(SMALL, model_type="phi3")
    with pytest.raises(ValueError, match="rope_type must be 'default' or 'longrope'"):
        config_from_dict({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="short_factor"):
        config_from_dict({**base, "rope_parameters": {**LONGROPE, "short_factor": [1.0]}})
    with pytest.raises(ValueError, match="sliding_window"):
        config_from_dict({**base, "sliding_window": 0})
    with pytest.raises(ValueError, match="logits_scaling"):
        config_from_dict(dict(SMALL, model_type="granite", logits_scaling=0))
    with pytest.raises(ValueError, match="residual_multiplier"):
        config_from_dict(dict(SMALL, model_type="granite", residual_multiplier="x"))


def test_gguf_longrope_needs_both_factor_tensors(tmp_path):
    gguf = crosscheck("gguf")
    torch, ref, _ = _pair("phi4mini", tmp_path / "model", **GGUF_OPTIONS["phi4mini"])
    _write_gguf(tmp_path / "m.gguf", ref, "phi3")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "phi3")
    for field in reader.fields.values():
        if field.name.startswith("phi3."):
            w.add_key_value(field.name, field.contents(), field.types[0], field.types[-1] if
                            field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        if t.name != "rope_factors_short.weight":
            w.add_tensor(t.name, np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="rope_factors_short.weight"):
        load_model(tmp_path / "bad.gguf")


def test_gguf_granite_without_scales_is_llama_cpp_default(tmp_path):
    """llama.cpp reads absent granite scales as 1 and an absent attention.scale as 1/√head_dim."""
    torch, ref, _ = _pair("granite", tmp_path / "model", **{**GGUF_OPTIONS["granite"], "embedding_multiplier": 1.0,
                                                           "residual_multiplier": 1.0, "logits_scaling": 1.0,
                                                           "attention_multiplier": 8 ** -0.5})
    _write_gguf(tmp_path / "m.gguf", ref, "granite", granite_scales=False)
    model = load_model(tmp_path / "m.gguf", dtype="float64")
    assert model.config.attention_multiplier == 8 ** -0.5
    ids = _ids()
    assert_close(model(ids).logits.data, _logits(torch, ref, ids), name="logits", **TOL)
