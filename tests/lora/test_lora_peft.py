"""LoRA interop with Hugging Face PEFT 0.21 on tiny transformers models (float64).

Property: the same base weights and the same adapter give the same logits, loss and
gradient of every adapter tensor in lora_np and in PEFT, whichever side saved the
adapter folder. Runs in CI through crosscheck("torch" / "transformers" / "peft").
"""
import numpy as np
import pytest

from conftest import assert_close, compare_runs, crosscheck, lora_np_run, peft_run, perturb_trainable
from lora_np.lora import LoraConfig, LoraModel, get_peft_model
from lora_np.models import GPT2LMHeadModel, LlamaForCausalLM, config_from_dict

pytestmark = pytest.mark.filterwarnings("ignore")

VOCAB = 61
PAD = 5  # "llama-pad": config.pad_token_id, so embed_tokens has padding_idx 5 in transformers
TOL = dict(rtol=1e-10, atol=1e-11)


def _rms_forward_f64(self, h):
    var = h.pow(2).mean(-1, keepdim=True)
    return self.weight * (h * (var + self.variance_epsilon).rsqrt())


def _patch_rope_f64(torch, tm, head_dim, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))

    def forward(x, position_ids):
        freqs = position_ids[:, :, None].double() * inv_freq[None, None, :]          # (B, T, D/2)
        emb = torch.cat([freqs, freqs], -1)                                            # (B, T, D)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    tm.model.rotary_emb.forward = forward


def _pair(kind, monkeypatch):
    """(transformers model, lora_np model) with equal float64 weights."""
    torch, transformers = crosscheck("torch"), crosscheck("transformers")
    crosscheck("peft")
    torch.manual_seed(0)
    if kind in ("llama", "llama-pad"):
        from transformers.models.llama import modeling_llama

        # transformers computes LlamaRMSNorm and the RoPE cos/sin in float32 even in a float64
        # model; patch both to float64 so that the two sides agree to ~1e-15.
        monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", _rms_forward_f64)
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, rope_theta=1000.0,
                                       tie_word_embeddings=False, pad_token_id=PAD if kind == "llama-pad" else None)
        tm = transformers.LlamaForCausalLM(cfg).double().eval()
        _patch_rope_f64(torch, tm, 6, 1000.0)
        m = LlamaForCausalLM(config_from_dict(cfg.to_dict()), dtype=np.float64)
        m.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
    else:
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=4, n_positions=16,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
        tm = transformers.GPT2LMHeadModel(cfg).double().eval()
        m = GPT2LMHeadModel(config_from_dict(cfg.to_dict()), dtype=np.float64)
        m.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()
                           if not k.endswith((".attn.bias", ".attn.masked_bias"))})
    return torch, tm, m.eval()


CASES = [
    ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)),
    ("llama", dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"],
                   rank_pattern={"layers.1.self_attn.k_proj": 2, "down_proj": 3}, alpha_pattern={"o_proj": 5})),
    ("llama", dict(r=3, lora_alpha=5, target_modules="all-linear", use_dora=True)),
    ("llama", dict(r=4, target_modules=["embed_tokens", "gate_proj"], modules_to_save=["lm_head"])),
    ("llama", dict(r=2, target_modules=r".*\.layers\.1\.mlp\.(up|down)_proj", lora_dropout=0.1)),
    ("llama", dict(r=2, target_modules=["q_proj", "up_proj"], layers_to_transform=[1], use_dora=True)),
    ("gpt2", dict(r=4, target_modules=["c_attn", "c_proj"], bias="lora_only", init_lora_weights=False)),
    ("gpt2", dict(r=3, lora_alpha=7, target_modules=["c_attn", "c_fc"], use_dora=True, bias="all")),
    ("gpt2", dict(r=4, target_modules=["wte", "c_fc"], use_rslora=True)),
    ("gpt2", dict(r=2, lora_alpha=3, target_modules=["wte", "c_proj"], use_dora=True, init_lora_weights=False)),
    ("llama", dict(r=3, target_modules=["embed_tokens", "v_proj"], use_dora=True)),
    # the padding row of embed_tokens takes no gradient, in the LoRA factors on it and in a trained copy
    ("llama-pad", dict(r=4, target_modules=["embed_tokens", "v_proj"], modules_to_save=["lm_head"])),
    ("llama-pad", dict(r=3, target_modules=["embed_tokens"], use_dora=True)),
    ("llama-pad", dict(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
]










def _ids(kind, seed=1):
    ids = np.random.default_rng(seed).integers(0, VOCAB, (2, 9))
    if kind == "llama-pad":
        ids[:, ::3] = PAD  # 6 of the 18 positions read the padding row
    return ids


@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_peft_adapter_loads_in_lora_np(kind, kw, tmp_path, monkeypatch):
    torch, tm, m = _pair(kind, monkeypatch)
    peft = crosscheck("peft")
    pm = peft.get_peft_model(tm, peft.LoraConfig(**kw))
    params = dict(pm.named_parameters())
    with torch.no_grad():
        perturb_trainable(params.items(), np.random.default_rng(2),
                          lambda n, d: params[n].add_(torch.from_numpy(d)), 0.05)
    pm.save_pretrained(tmp_path)
    theirs = peft_run(torch, pm, _ids(kind))

    lm = LoraModel.from_pretrained(m, tmp_path, is_trainable=True)
    compare_runs(lora_np_run(lm, _ids(kind)), theirs, TOL, dict(rtol=1e-9, atol=1e-11))


def _perturbed_and_saved(m, kw, seed, folder):
    """get_peft_model(m, LoraConfig(**kw)) with every adapter tensor perturbed, saved to folder."""
    lm = get_peft_model(m, LoraConfig(**kw))
    params = dict(lm.named_parameters())

    def add(name, d):
        params[name].data = params[name].data + d

    perturb_trainable(params.items(), np.random.default_rng(seed), add, 0.05)
    lm.save_pretrained(folder)
    return lm


@pytest.mark.parametrize("kind,kw", CASES, ids=[f"{k}-{i}" for i, (k, _) in enumerate(CASES)])
def test_lora_np_adapter_loads_in_peft(kind, kw, tmp_path, monkeypatch):
    torch, tm, m = _pair(kind, monkeypatch)
    peft = crosscheck("peft")
    lm = _perturbed_and_saved(m, kw, 3, tmp_path)
    mine = lora_np_run(lm, _ids(kind))

    pm = peft.PeftModel.from_pretrained(tm, str(tmp_path), is_trainable=True)
    compare_runs(mine, peft_run(torch, pm, _ids(kind)), TOL, dict(rtol=1e-9, atol=1e-11))


def test_print_trainable_parameters_matches_peft(monkeypatch, capsys):
    torch, tm, m = _pair("llama", monkeypatch)
    peft = crosscheck("peft")
    kw = dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"])
    peft.get_peft_model(tm, peft.LoraConfig(**kw)).print_trainable_parameters()
    theirs = capsys.readouterr().out
    get_peft_model(m, LoraConfig(**kw)).print_trainable_parameters()
    assert capsys.readouterr().out == theirs


def test_named_parameters_match_peft(monkeypatch):
    torch, tm, m = _pair("gpt2", monkeypatch)
    peft = crosscheck("peft")
    kw = dict(r=2, target_modules=["c_attn", "wte"], use_dora=True)
    theirs = {n: tuple(p.shape) for n, p in peft.get_peft_model(tm, peft.LoraConfig(**kw)).named_parameters()}
    mine = {n: tuple(p.shape) for n, p in get_peft_model(m, LoraConfig(**kw)).named_parameters()}
    assert mine == theirs


@pytest.mark.parametrize("kind,kw", [CASES[2], CASES[7], CASES[10]], ids=["llama-dora", "gpt2-dora", "llama-emb-dora"])
def test_merged_weights_match_peft(kind, kw, tmp_path, monkeypatch):
    torch, tm, m = _pair(kind, monkeypatch)
    peft = crosscheck("peft")
    lm = _perturbed_and_saved(m, kw, 4, tmp_path)
    pm = peft.PeftModel.from_pretrained(tm, str(tmp_path))
    merged_t = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    merged = lm.merge_and_unload().state_dict()
    for k, v in merged.items():
        assert_close(v, merged_t[k], name=k, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("combination,svd_rank", [("linear", None), ("cat", None), ("svd", None), ("svd", 3)])
def test_add_weighted_adapter_matches_peft(combination, svd_rank, tmp_path, monkeypatch):
    torch, tm, m = _pair("gpt2", monkeypatch)
    peft = crosscheck("peft")
    pm = peft.get_peft_model(tm, peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "wte"]))
    params = dict(pm.named_parameters())
    with torch.no_grad():
        rng = np.random.default_rng(5)
        for n, p in params.items():
            if "lora_" in n:
                p.add_(torch.from_numpy(rng.standard_normal(tuple(p.shape)) * 0.05))
    pm.save_pretrained(tmp_path)
    lm = LoraModel.from_pretrained(m, tmp_path)
    lm.load_adapter(tmp_path / "b", "b")
    kw = dict(combination_type=combination, svd_rank=svd_rank)
    # PEFT holds the weights (and for "linear" √|w·s|) in float32 tensors: pick weights where
    # those are exact (s = 4 and 2, so √|w·s| = 1 and 2), so float64 agreement can be asked for
    weights = [0.25, -2.0]
    pm.add_weighted_adapter(["default", "b"], weights, "mix", **kw)
    lm.add_weighted_adapter(["default", "b"], weights, "mix", **kw)
    theirs = {n: mod for n, mod in pm.base_model.model.named_modules() if hasattr(mod, "get_delta_weight")}
    mine = {n: mod for n, mod in lm.model.named_modules() if hasattr(mod, "get_delta_weight")}
    assert sorted(mine) == sorted(theirs)
    for n in mine:
        assert mine[n].r["mix"] == theirs[n].r["mix"]
        assert_close(mine[n].get_delta_weight("mix"), theirs[n].get_delta_weight("mix").detach().numpy(),
                     name=f"{n} delta", rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_init_matches_peft_in_float32(init, monkeypatch):
    """Same residual base weight and same s·BA as PEFT (singular / QR vectors may differ in sign,
    their products do not). float32, as PEFT computes these inits."""
    torch, tm, m = _pair("llama", monkeypatch)
    peft = crosscheck("peft")
    tm.float()
    m.to(np.float32)
    kw = dict(r=3, lora_alpha=6, target_modules=["q_proj", "down_proj"], init_lora_weights=init)
    pm = peft.get_peft_model(tm, peft.LoraConfig(**kw))
    lm = get_peft_model(m, LoraConfig(**kw))
    theirs = {n: mod for n, mod in pm.base_model.model.named_modules() if hasattr(mod, "get_delta_weight")}
    mine = {n: mod for n, mod in lm.model.named_modules() if hasattr(mod, "get_delta_weight")}
    assert sorted(mine) == sorted(theirs) and len(mine) == 4
    for n in mine:
        w = theirs[n].base_layer.weight.detach().numpy()
        atol = 1e-5 * np.abs(w).max()  # two float32 LAPACK factorizations (numpy's, torch's) of one W
        assert_close(mine[n].base_layer.weight.data, w, name=f"{n} residual W", rtol=0, atol=atol)
        assert_close(mine[n].get_delta_weight("default"), theirs[n].get_delta_weight("default").detach().numpy(),
                     name=f"{n} s·BA", rtol=0, atol=atol)


def test_default_target_modules_are_peft_s_for_every_family():
    """target_modules=None means what PEFT's mapping says for each model_type lora_np computes, and families
    PEFT has no default for are refused there as in PEFT."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_defaults

    from lora_np.lora.targets import DEFAULT_TARGET_MODULES
    from lora_np.models import FAMILIES

    for model_type in FAMILIES:
        assert DEFAULT_TARGET_MODULES.get(model_type) == peft_defaults.get(model_type), model_type
