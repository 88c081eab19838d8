"""Gemma 2, Gemma 3 (text) and Gemma 1 against transformers + PEFT in float64.

Each family is a tiny random transformers model with every option switched on so that it matters: norm weights
(the w of (1 + w), q/k norms included) far from 0, query_pre_attn_scalar ≠ head_dim, sequences longer than the
sliding window, attention and final-logit soft-caps small enough to bite (each checked to change transformers'
logits), Gemma 3's two RoPE bases with linear scaling on its full layers, biases, an untied head. Properties: the
HF folder transformers saves loads here with the same logits; with the same adapter, logits, loss and the
gradient of every LoRA tensor agree with PEFT (≤ 1e-10 relative) whichever side wrote it; greedy generation
with the KV cache continues past the window as transformers' does; a GGUF written as llama.cpp's converter
writes it (its keys, gguf-py's tensor names, 1 added to every norm weight) loads with the same logits, and
llama.cpp computes that file as transformers does; the older config.json forms read as transformers reads them
and the folder lora_np exports loads in transformers with the same config and logits; the float32 model (the C
kernels) agrees with float64; fields that change the computation are refused by name when not computed.

transformers computes its RMSNorms, RoPE tables and eager-attention softmax in float32 even in a float64 model;
`_float64` gives it float64 versions (the RoPE tables recomputed from transformers' formulas, checked against its
own float32 tables first) so that a float64 comparison tests the model, not that rounding."""
import json

import numpy as np
import pytest

from conftest import (assert_close, compare_runs, crosscheck, f32_tolerance, lora_np_run, peft_run,
                      perturb_trainable)
from lora_np.loaders import load_model
from lora_np.lora import LoraConfig, LoraModel, get_peft_model
from lora_np.models import config_from_dict

pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 61
TOL = dict(rtol=1e-10, atol=1e-12)
SMALL = dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, max_position_embeddings=64, rms_norm_eps=2.0**-17,
             attn_implementation="eager")
# √40 is not a float32 number: the embedding scale is cast to the model's dtype
ROPE3 = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0}}
OPTIONS = {
    "gemma": dict(attention_bias=True, hidden_act="gelu",  # 'gelu' is read as the tanh form
                  rope_parameters={"rope_type": "default", "rope_theta": 300.0}),
    "gemma2": dict(query_pre_attn_scalar=20, sliding_window=4, attn_logit_softcapping=0.5,
                   final_logit_softcapping=2.0, rope_parameters={"rope_type": "default", "rope_theta": 300.0}),
    "gemma3_text": dict(query_pre_attn_scalar=20, sliding_window=4, final_logit_softcapping=2.0,
                        attn_logit_softcapping=0.5,  # transformers' Gemma 3 never applies it
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                        rope_parameters=ROPE3, attention_bias=True, tie_word_embeddings=False),
}
CONFIGS = {"gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig"}
CLASSES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma2ForCausalLM"}
KINDS = list(OPTIONS)


def _ids(T=11, seed=1):
    return np.random.default_rng(seed).integers(0, VOCAB, (2, T))


def _randomize(torch, ref, rng):
    """Every weight drawn afresh: norm weights w (of 1 + w) in multiples of 2^-8, so that 1 + w is a float32
    number (GGUF stores 1 + w), biases nonzero; every number a float32 number."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            x = rng.standard_normal(tuple(p.shape))
            x = np.round(x * 0.4 * 2**8) / 2**8 if name.endswith("norm.weight") else \
                (x * (0.3 if name.endswith(".bias") else 0.2)).astype(np.float32)
            p.copy_(torch.from_numpy(x.astype(np.float64)))


def _float64(torch, ref, monkeypatch):
    """transformers' float32 internals in float64: Gemma's RMSNorm (x.float()), the RoPE tables (per layer type
    for Gemma 3, linear scaling included) and eager attention's softmax (dtype=torch.float32)."""
    def rms_forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)

    for mod in ref.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = rms_forward.__get__(mod)
    softmax = torch.nn.functional.softmax
    monkeypatch.setattr(torch.nn.functional, "softmax", lambda x, dim=None, dtype=None: softmax(x, dim=dim))
    cfg = ref.config
    rot = ref.model.rotary_emb
    own = rot.forward

    def tables(x, position_ids, params):
        inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
        if params["rope_type"] == "linear":
            inv = inv / params["factor"]
        f = position_ids[..., None].double() * inv                                     # (B, T, D/2)
        emb = torch.cat([f, f], -1)                                                    # (B, T, D)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    def checked(cos_sin, cos_sin32):
        for a, b in zip(cos_sin, cos_sin32):
            assert torch.allclose(a, b.double(), atol=1e-5)
        return cos_sin

    if cfg.model_type != "gemma3_text":
        rot.forward = lambda x, position_ids: checked(tables(x, position_ids, cfg.rope_parameters),
                                                      own(x.float(), position_ids))
    else:
        rot.forward = lambda x, position_ids, layer_type: checked(
            tables(x, position_ids, cfg.rope_parameters[layer_type]), own(x.float(), position_ids, layer_type))


def _reference(kind, monkeypatch, **options):
    """(torch, transformers model in float64 with float32-number weights, patched to compute in float64)."""
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    torch.manual_seed(0)
    config = getattr(transformers, CONFIGS[kind])(**{**SMALL, **OPTIONS[kind], **options})
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()
    _randomize(torch, ref, np.random.default_rng(0))
    _float64(torch, ref, monkeypatch)
    return torch, ref


def _pair(kind, folder, monkeypatch, **options):
    """(torch, transformers model, lora_np model loaded from the HF folder transformers saved)."""
    torch, ref = _reference(kind, monkeypatch, **options)
    ref.save_pretrained(folder)
    return torch, ref, load_model(folder, dtype="float64")


def _logits(torch, ref, ids):
    with torch.no_grad():
        return ref(torch.tensor(ids)).logits.numpy()


def _set(ref, **values):
    """Set config fields of transformers model `ref` and the attention attributes they were copied into."""
    cfg = ref.config
    for name, value in values.items():
        setattr(cfg, name, value)
    for layer in ref.model.layers:
        attn = layer.self_attn
        attn.scaling = cfg.query_pre_attn_scalar ** -0.5
        attn.attn_logit_softcapping = cfg.attn_logit_softcapping
        attn.sliding_window = cfg.sliding_window if attn.layer_type == "sliding_attention" else None


@pytest.mark.parametrize("kind", KINDS)
def test_hf_folder_matches_transformers(kind, tmp_path, monkeypatch):
    torch, ref, model = _pair(kind, tmp_path, monkeypatch)
    assert type(model).__name__ == CLASSES[kind]
    assert sorted(model.state_dict()) == sorted(ref.state_dict())
    ids = _ids()
    expected = _logits(torch, ref, ids)
    assert_close(model(ids).logits.data, expected, name="logits", **TOL)
    loss = torch.nn.functional.cross_entropy(torch.tensor(expected[:, :-1]).reshape(-1, VOCAB),
                                             torch.tensor(ids[:, 1:]).reshape(-1)).item()
    assert_close(model(ids, labels=ids, return_logits=False).loss.data, loss, name="chunked loss", **TOL)
    # every option bites: without it transformers' logits move (Gemma 3's attention soft-cap excepted)
    for name, off in () if kind == "gemma" else (("sliding_window", 64), ("final_logit_softcapping", None),
                                                 ("query_pre_attn_scalar", 12), ("attn_logit_softcapping", None)):
        before = getattr(ref.config, name)
        _set(ref, **{name: off})
        moved = np.abs(_logits(torch, ref, ids) - expected).max()
        _set(ref, **{name: before})
        if kind == "gemma3_text" and name == "attn_logit_softcapping":
            assert moved == 0, "transformers' Gemma 3 applies attn_logit_softcapping after all"
        else:
            assert moved > 1e-3, f"{name} does not change transformers' logits"


@pytest.mark.parametrize("kind", KINDS)
def test_exported_folder_computes_the_same_in_transformers(kind, tmp_path, monkeypatch):
    """to_config_json is the inverse of from_config_json: the merged folder lora_np writes loads in transformers
    with the config and the logits of the model it came from."""
    from lora_np.export import save_merged

    torch, ref, model = _pair(kind, tmp_path / "model", monkeypatch)
    save_merged(model, tmp_path / "out")
    transformers = crosscheck("transformers")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float64).eval()
    theirs, back_d = ref.config.to_dict(), back.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype"):
        theirs.pop(key, None), back_d.pop(key, None)
    assert back_d == theirs
    _float64(torch, back, monkeypatch)
    ids = _ids()
    assert_close(_logits(torch, back, ids), _logits(torch, ref, ids), name="logits", **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_float32_model_computes_the_float64_logits_to_float32_precision(kind, tmp_path, monkeypatch):
    """The float32 path (the C kernels: windowed soft-capped attention, per-head norms, the capped chunked loss)
    agrees with float64."""
    torch, ref, model = _pair(kind, tmp_path, monkeypatch)
    m32 = load_model(tmp_path, dtype="float32")
    ids = _ids()
    out, out32 = model(ids, labels=ids), m32(ids, labels=ids, return_logits=False)
    rtol, atol = f32_tolerance(out.logits.data)
    assert_close(m32(ids).logits.data, out.logits.data, rtol=rtol, atol=atol, name="float32 logits")
    assert_close(out32.loss.data, out.loss.data, rtol=rtol, atol=rtol, name="float32 chunked loss")


def test_gemma3_rope_bases_and_scaling_bite(tmp_path, monkeypatch):
    """Gemma 3's sliding layers rotate with their own base, its full layers with the linearly scaled one: a model
    that swaps them computes other logits (here and in transformers)."""
    torch, ref, model = _pair("gemma3_text", tmp_path, monkeypatch)
    ids = _ids()
    expected = _logits(torch, ref, ids)
    cfg = json.loads((tmp_path / "config.json").read_text())
    swapped = dict(cfg, rope_parameters={"sliding_attention": ROPE3["full_attention"],
                                         "full_attention": ROPE3["sliding_attention"]})
    other = type(model)(config_from_dict(swapped), dtype=np.float64)
    other.load_state_dict(model.state_dict())
    assert np.abs(other(ids).logits.data - expected).max() > 1e-3


# -- LoRA against PEFT -------------------------------------------------------------------------








LORA = {"gemma": dict(r=2, lora_alpha=4, target_modules=["k_proj", "v_proj", "o_proj", "down_proj"]),
        "gemma2": dict(r=3, lora_alpha=5, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
        "gemma3_text": dict(r=3, lora_alpha=7, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                            use_rslora=True)}


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_loads_here_with_peft_gradients(kind, tmp_path, monkeypatch):
    torch, ref, model = _pair(kind, tmp_path / "model", monkeypatch)
    peft = crosscheck("peft")
    pm = peft.get_peft_model(ref, peft.LoraConfig(**LORA[kind]))
    params = dict(pm.named_parameters())
    with torch.no_grad():
        perturb_trainable(params.items(), np.random.default_rng(2),
                          lambda n, d: params[n].add_(torch.from_numpy(d)), 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    ids = _ids()
    theirs = peft_run(torch, pm, ids)
    compare_runs(lora_np_run(LoraModel.from_pretrained(model, tmp_path / "adapter", is_trainable=True), ids), theirs,
                 TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_default_and_all_linear_adapters_load_in_peft_with_our_gradients(kind, tmp_path, monkeypatch):
    """PEFT's default target_modules for the model type (q_proj, v_proj; lora.targets knows gemma2 and
    gemma3_text) and "all-linear" adapt the modules PEFT adapts; our adapter file loads in PEFT with our
    gradients."""
    torch, ref, model = _pair(kind, tmp_path / "model", monkeypatch)
    peft = crosscheck("peft")
    ids = _ids()
    defaults = [] if kind == "gemma" else [dict(r=2, lora_alpha=3)]
    for i, kw in enumerate(defaults + [dict(r=2, lora_alpha=3, target_modules="all-linear")]):
        lm = get_peft_model(model, LoraConfig(**kw))
        params = dict(lm.named_parameters())
        perturb_trainable(params.items(), np.random.default_rng(3),
                          lambda n, d: setattr(params[n], "data", params[n].data + d), 0.1)
        lm.save_pretrained(tmp_path / f"adapter{i}")
        mine = lora_np_run(lm, ids)
        theirs = peft.get_peft_model(ref, peft.LoraConfig(**kw))
        assert sorted(n for n, p in theirs.named_parameters() if p.requires_grad) == sorted(mine[2])
        pm = peft.PeftModel.from_pretrained(theirs.unload(), str(tmp_path / f"adapter{i}"), is_trainable=True)
        compare_runs(mine, peft_run(torch, pm, ids), TOL)
        ref = pm.unload()
        model = lm.unload()


# -- generation across the window ----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_across_the_window_matches_transformers(kind, tmp_path, monkeypatch):
    """A 3-token prompt and 9 new tokens with a window of 4: the KV cache's sliding layers drop the keys that
    fall out of the window, in step with transformers' generate."""
    torch, ref, model = _pair(kind, tmp_path, monkeypatch)
    prompt = _ids(T=3, seed=4)
    with torch.no_grad():
        expected = ref.generate(torch.tensor(prompt), max_new_tokens=9, do_sample=False, min_new_tokens=9,
                                pad_token_id=0, eos_token_id=None).numpy()
    mine = model.generate(prompt, max_new_tokens=9)
    assert np.array_equal(mine, expected), f"{mine} != {expected}"
    full = model(mine[:, :-1]).logits.data                                            # (B, 11, V): no cache
    assert np.array_equal(full[:, 2:].argmax(-1), mine[:, 3:]), "cached and uncached greedy steps differ"


# -- GGUF as llama.cpp's converter writes it ------------------------------------------------------
def _write_gguf(path, ref, pattern=None, scaling="LINEAR"):
    """`ref` as convert_hf_to_gguf.py's Gemma2Model / Gemma3Model convert it: their keys (Gemma 2: no RoPE base,
    llama.cpp's 10000; Gemma 3: TextModel's RoPE keys, linear scaling of the full layers), 1 added to every
    '*norm.weight', Gemma 2's lm_head dropped (tied), names from gguf-py's tensor map; `pattern`: a
    sliding_window_pattern key (llama.cpp reads one; the converter writes none for Gemma)."""
    gguf = crosscheck("gguf")
    cfg = ref.config
    arch = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3"}[cfg.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("none")  # no tokenizer: llama.cpp's stand-in, the vocabulary size said instead
    w.add_vocab_size(cfg.vocab_size)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if arch != "gemma":
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2" or arch == "gemma3" and cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if pattern is not None:
        w.add_sliding_window_pattern(pattern)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    elif arch == "gemma3":
        full, sliding = cfg.rope_parameters["full_attention"], cfg.rope_parameters["sliding_attention"]
        w.add_rope_scaling_type(getattr(gguf.RopeScalingType, scaling))
        w.add_rope_scaling_factor(full["factor"])
        w.add_rope_freq_base(full["rope_theta"])
        w.add_rope_freq_base_swa(sliding["rope_theta"])
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], cfg.num_hidden_layers)
    for name, t in ref.state_dict().items():
        if name == "lm_head.weight" and (arch != "gemma3" or cfg.tie_word_embeddings):
            continue
        a = t.numpy()
        if name.endswith("norm.weight"):
            a = a + 1
        w.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


GGUF_CASES = {
    "gemma": ("gemma", dict(attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 1e4}), None),
    # llama.cpp: query_pre_attn_scalar is head_dim (but for the 27B models), the RoPE base 10000, no biases
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=12, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
               None),
    # six layers: llama.cpp's period 6 gives one full layer (the last), as transformers' default layer_types
    "gemma3_text": ("gemma3_text", dict(query_pre_attn_scalar=12, attention_bias=False, layer_types=None,
                                        num_hidden_layers=6, attn_logit_softcapping=None), None),
    # the layer types as one flag per layer, an untied head (output.weight), no final soft-cap (no key)
    "gemma3_text-flags": ("gemma3_text", dict(query_pre_attn_scalar=12, attention_bias=False,
                                              attn_logit_softcapping=None, final_logit_softcapping=None),
                          [True, False, True]),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_matches_transformers(case, tmp_path, monkeypatch):
    kind, options, pattern = GGUF_CASES[case]
    torch, ref = _reference(kind, monkeypatch, **options)
    _write_gguf(tmp_path / "m.gguf", ref, pattern)
    model = load_model(tmp_path / "m.gguf", dtype="float64")
    assert model.config.layer_types == _layer_types(ref.config)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == ref.config.tie_word_embeddings
    for name, t in ref.state_dict().items():
        assert_close(model.state_dict()[name], t.numpy(), rtol=0, name=name)
    ids = _ids()
    assert_close(model(ids).logits.data, _logits(torch, ref, ids), name="logits", **TOL)


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_llama_cpp_computes_the_gguf_as_transformers(case, tmp_path, monkeypatch):
    """The same file in llama.cpp (llama-cpp-python) gives transformers' logits: the GGUF side reads the keys as
    llama.cpp does. Tolerance 3e-3 of the largest logit: ggml's CPU GELU is an fp16 table (the match is ~7e-4,
    a window, soft-cap or attention scale read otherwise moves the logits by more than 6e-2)."""
    llama_cpp = crosscheck("llama_cpp")
    kind, options, pattern = GGUF_CASES[case]
    torch, ref = _reference(kind, monkeypatch, **options)
    _write_gguf(tmp_path / "m.gguf", ref, pattern)
    ids = _ids()[0]
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), logits_all=True, n_ctx=64, n_threads=2, verbose=False,
                          type_k=0, type_v=0)
    llm.eval(list(ids))
    expected = _logits(torch, ref, ids[None])[0]
    assert_close(np.array(llm.scores[:len(ids)]), expected, rtol=0, atol=3e-3 * np.abs(expected).max(),
                 name="llama.cpp logits")


def test_gguf_rope_scaling_other_than_linear_is_refused(tmp_path, monkeypatch):
    torch, ref = _reference("gemma3_text", monkeypatch, attention_bias=False, attn_logit_softcapping=None)
    _write_gguf(tmp_path / "m.gguf", ref, scaling="YARN")
    with pytest.raises(NotImplementedError, match=r"gemma3\.rope\.scaling\.type = 'yarn'"):
        load_model(tmp_path / "m.gguf")


# -- config.json forms ------------------------------------------------------------------------------
HUB_GEMMA3 = dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=40, intermediate_size=48,
                  num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                  rope_theta=5e5, rope_local_base_freq=777.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                  sliding_window_pattern=3, sliding_window=16, query_pre_attn_scalar=12)
HUB_GEMMA2 = dict(model_type="gemma2", vocab_size=VOCAB, hidden_size=40, intermediate_size=48, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=321.0,
                  rope_scaling={"type": "linear", "factor": 2.0}, hidden_act="gelu_pytorch_tanh",
                  hidden_activation="gelu_pytorch_tanh", sliding_window=16)
HUB_GEMMA = dict(model_type="gemma", vocab_size=VOCAB, hidden_size=40, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=12, rope_theta=321.0, hidden_act="gelu",
                 hidden_activation=None)
HUB = {"gemma": HUB_GEMMA, "gemma2": HUB_GEMMA2, "gemma3_text": HUB_GEMMA3,
       # transformers' Gemma 3 merges rope_scaling into {"rope_type": "default"}: a legacy "type" names no type
       "gemma3_text-type": dict(HUB_GEMMA3, rope_scaling={"type": "linear", "factor": 8.0})}


def _layer_types(cfg):
    """transformers' layer types (Gemma 1 has none: every layer full attention)."""
    return getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers


def _rope_tables(ref, n=32):
    """{layer type: (cos, sin) (n, head_dim)} from the inverse frequencies of transformers' rotary embedding."""
    rot = ref.model.rotary_emb
    out = {}
    for t in set(_layer_types(ref.config)):
        inv = getattr(rot, f"{t}_inv_freq") if hasattr(rot, f"{t}_inv_freq") else rot.inv_freq
        f = np.outer(np.arange(n), inv.double().numpy())                                  # (n, D/2)
        emb = np.concatenate([f, f], -1)                                                  # (n, D)
        out[t] = np.cos(emb), np.sin(emb)
    return out


@pytest.mark.parametrize("name", list(HUB))
def test_older_config_json_reads_as_transformers_reads_it(name):
    """rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern (the Hub's config.json of
    Gemma 2 and Gemma 3) give the layer types and per-type RoPE frequencies transformers 5 computes; the
    config.json we write reads back in transformers to the same, and here to the same config."""
    transformers = crosscheck("transformers")
    from lora_np.models.gemma import GemmaForCausalLM

    mine = config_from_dict(HUB[name])
    ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**HUB[name]))
    back = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**mine.to_config_json()))
    model = GemmaForCausalLM(mine)
    for theirs in (ref, back):
        assert mine.layer_types == _layer_types(theirs.config)
        expected = _rope_tables(theirs)
        assert sorted(expected) == sorted(model._rope)
        for t, (cos, sin) in expected.items():  # transformers' frequencies are float32 numbers
            got = model._rope[t].get(0, 32, np.float64)
            assert_close(got[0], cos, rtol=0, atol=1e-5, name=f"{t} cos")
            assert_close(got[1], sin, rtol=0, atol=1e-5, name=f"{t} sin")
    assert config_from_dict(mine.to_config_json()) == mine


@pytest.mark.parametrize("change,error,match", [
    (dict(use_bidirectional_attention=True), NotImplementedError, "use_bidirectional_attention"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "su", "rope_theta": 1.0}}), NotImplementedError,
     "rope_type"),
    (dict(layer_types=["sliding_attention", "global"]), ValueError, "layer_types"),
    (dict(sliding_window=None), ValueError, "sliding_window"),
    (dict(final_logit_softcapping=0.0), ValueError, "final_logit_softcapping"),
    (dict(query_pre_attn_scalar=-1), ValueError, "query_pre_attn_scalar"),
    (dict(hidden_activation="swiglu"), NotImplementedError, "hidden_activation"),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e4}}, rope_scaling=None),
     ValueError, "factor"),
])
def test_bad_config_is_refused_by_name(change, error, match):
    """Every field that changes the computation is computed or refused by name."""
    with pytest.raises(error, match=match):
        config_from_dict({**HUB_GEMMA3, "num_hidden_layers": 2, **change})


def test_gemma2_rope_per_layer_type_is_refused():
    rope = {"sliding_attention": {"rope_theta": 10.0}, "full_attention": {"rope_theta": 20.0}}
    with pytest.raises(NotImplementedError, match="rope_parameters"):
        config_from_dict({**HUB_GEMMA2, "rope_parameters": rope})


def test_float32_embedding_scale_is_transformers_float32(tmp_path, monkeypatch):
    """√hidden_size cast to the model's dtype, as transformers' scaled embedding: in float32, float32(√40)."""
    torch = crosscheck("torch")
    transformers = crosscheck("transformers")
    ref = transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(**SMALL)).eval()
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="float32")
    ids = _ids()
    h, _, _ = model._embed(ids, 0)
    with torch.no_grad():
        expected = ref.model.embed_tokens(torch.tensor(ids)).numpy()
    assert h.data.dtype == np.float32 and np.array_equal(h.data, expected)


def test_gemma1_has_none_of_gemma2s_fields():
    """Gemma 2's keys in a Gemma 1 config.json mean nothing to transformers (read past); set on the config
    itself they are refused by name."""
    from lora_np.models.gemma import GemmaConfig

    plain = config_from_dict(HUB_GEMMA)
    assert config_from_dict({**HUB_GEMMA, "sliding_window": 4, "final_logit_softcapping": 2.0}) == plain
    assert plain.layer_types == ["full_attention"] * 2 and plain.query_pre_attn_scalar == 12
    with pytest.raises(ValueError, match="sliding_window"):
        fields = {k: v for k, v in HUB_GEMMA.items() if k not in ("rope_theta", "hidden_act", "hidden_activation")}
        GemmaConfig(**fields, sliding_window=4)


@pytest.mark.parametrize("arch,layers,window,expected_scalar,expected_types", [
    ("gemma2", 46, 4096, 16, ["sliding_attention", "full_attention"] * 23),  # the 27B: (hidden / heads)
    ("gemma2", 4, 4096, 8, ["sliding_attention", "full_attention"] * 2),     # else head_dim
    ("gemma3", 62, 512, 16, (["sliding_attention"] * 5 + ["full_attention"]) * 10 + ["sliding_attention"] * 2),
    ("gemma3", 3, None, 8, ["full_attention"] * 3),                          # no window key: no sliding layers
])
def test_gguf_keys_read_as_llama_cpp_reads_them(arch, layers, window, expected_scalar, expected_types):
    """llama-model.cpp: no key for query_pre_attn_scalar (the 27B models' layer counts give hidden / heads, else
    head_dim), the sliding-window period 2 (Gemma 2) or 6 (Gemma 3), no sliding layers without a window, the
    soft-caps' defaults."""
    from lora_np.models.base import GGUFConfigReader
    from lora_np.models.gemma import Gemma2Config, Gemma3TextConfig

    metadata = {"general.architecture": arch, f"{arch}.embedding_length": 64, f"{arch}.feed_forward_length": 96,
                f"{arch}.block_count": layers, f"{arch}.attention.head_count": 4, f"{arch}.attention.key_length": 8,
                f"{arch}.vocab_size": VOCAB, **({f"{arch}.attention.sliding_window": window} if window else {})}
    config = (Gemma2Config if arch == "gemma2" else Gemma3TextConfig).from_gguf(
        GGUFConfigReader(metadata, {}, "test.gguf"))
    assert config.query_pre_attn_scalar == expected_scalar and config.layer_types == expected_types
    # absent soft-cap keys: llama.cpp's defaults for gemma2 (hparams 50 / 30), none for gemma3
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == \
        ((50.0, 30.0) if arch == "gemma2" else (None, None))
