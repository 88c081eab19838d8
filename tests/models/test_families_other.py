"""OLMo 2, Granite and Phi-3 / Phi-4-mini against transformers + PEFT in float64.

Each family is a tiny random transformers model with every option of the family switched on so that it matters
(OLMo 2's full-width q/k norms and post-norms with non-trivial weights, Granite's four multipliers ≠ 1, Phi-3's
fused projections, partial rotary, longrope past original_max_position_embeddings and a sliding window shorter
than the sequence). Properties: the HF folder transformers saves loads here with the same logits; with the same
adapter, logits, loss and the gradient of every LoRA tensor agree with PEFT (≤ 1e-10 relative) whichever side
wrote the adapter; "all-linear" adapts the modules PEFT adapts; a GGUF written as llama.cpp's converter writes it
(gguf-py's keys and tensor names, its q/k permutation where it applies one) loads with the same logits.

transformers computes its RMSNorms and RoPE tables in float32 even in a float64 model; `_float64` gives it
float64 versions (the RoPE tables recomputed from transformers' formulas, checked against its own float32 tables
first) so that a float64 comparison tests the model, not that rounding."""
import numpy as np
import pytest

from conftest import assert_close, crosscheck
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
    "olmo2": dict(attention_bias=True, rope_parameters=ROPE),
    "granite": dict(attention_bias=True, mlp_bias=True, embedding_multiplier=3.0, residual_multiplier=0.37,
                    attention_multiplier=0.11, logits_scaling=2.5, rope_parameters=ROPE),
}
CONFIGS = {"olmo2": "Olmo2Config", "granite": "GraniteConfig"}


def _randomize(torch, ref, rng):
    """Every weight drawn afresh (norm weights and biases far from their 1 / 0 init)."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            scale = 0.3 if name.endswith("norm.weight") or name.endswith(".bias") else 0.15
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(torch.from_numpy(base + scale * rng.standard_normal(tuple(p.shape))))


def _float64(torch, ref):
    """Make transformers' float32 internals float64: every *RMSNorm, and the RoPE tables (default RoPE here)."""
    def rms_forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for mod in ref.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = rms_forward.__get__(mod)
    rot = ref.model.rotary_emb
    cfg = ref.config
    theta = cfg.rope_parameters["rope_theta"]
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    own = rot.forward

    def rope_forward(x, position_ids):
        f = position_ids[..., None].double() * inv                                  # (B, T, D/2)
        emb = torch.cat([f, f], -1)                                                 # (B, T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
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
    config = getattr(transformers, CONFIGS[kind])(**SMALL, **{**OPTIONS[kind], **options})
    ref = transformers.AutoModelForCausalLM.from_config(config)
    _randomize(torch, ref, np.random.default_rng(0))
    ref.save_pretrained(folder)
    ref = ref.double().eval()
    _float64(torch, ref)
    return torch, ref, load_model(folder, dtype="float64")


def _logits(torch, ref, ids):
    with torch.no_grad():
        return ref(torch.tensor(ids)).logits.numpy()


KINDS = ["olmo2", "granite"]


@pytest.mark.parametrize("kind", KINDS)
def test_hf_folder_matches_transformers(kind, tmp_path):
    torch, ref, model = _pair(kind, tmp_path)
    assert type(model).__name__ == type(ref).__name__
    assert sorted(model.state_dict()) == sorted(ref.state_dict())
    ids = _ids()
    assert_close(model(ids).logits.data, _logits(torch, ref, ids), name="logits", **TOL)


# -- LoRA against PEFT -------------------------------------------------------------------------
def _perturb(named_params, rng, add):
    """Move every trainable tensor off its init (B = 0 would hide a wrong gradient of A)."""
    for name, p in named_params:
        if p.requires_grad:
            add(name, rng.standard_normal(tuple(p.shape)) * 0.1)


def _run_torch(torch, pm, ids):
    pm.eval()
    pm.zero_grad()
    logits = pm(input_ids=torch.tensor(ids)).logits                                  # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), torch.tensor(ids[:, 1:]).reshape(-1))
    loss.backward()
    return logits.detach().numpy(), loss.item(), {n: p.grad.numpy().copy() for n, p in pm.named_parameters()
                                                  if p.requires_grad}


def _run_np(lm, ids):
    lm.eval()
    lm.zero_grad()
    out = lm(ids, labels=ids)
    out.loss.backward()
    return out.logits.data, out.loss.item(), {n: p.grad for n, p in lm.named_parameters() if p.requires_grad}


def _compare(mine, theirs):
    (logits, loss, grads), (t_logits, t_loss, t_grads) = mine, theirs
    assert_close(logits, t_logits, name="logits", **TOL)
    assert_close(loss, t_loss, name="loss", **TOL)
    assert sorted(grads) == sorted(t_grads), "trainable parameter names differ from PEFT's"
    for n in grads:
        assert_close(grads[n], t_grads[n], name=f"grad {n}", **TOL)


LORA = {"olmo2": dict(r=3, lora_alpha=5, target_modules=["q_proj", "k_proj", "o_proj", "up_proj"]),
        "granite": dict(r=3, lora_alpha=7, target_modules=["v_proj", "gate_proj", "down_proj"], use_rslora=True)}


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_loads_here_with_peft_gradients(kind, tmp_path):
    torch, ref, model = _pair(kind, tmp_path / "model")
    peft = crosscheck("peft")
    pm = peft.get_peft_model(ref, peft.LoraConfig(**LORA[kind]))
    params = dict(pm.named_parameters())
    with torch.no_grad():
        _perturb(params.items(), np.random.default_rng(2), lambda n, d: params[n].add_(torch.from_numpy(d)))
    pm.save_pretrained(tmp_path / "adapter")
    ids = _ids()
    theirs = _run_torch(torch, pm, ids)
    _compare(_run_np(LoraModel.from_pretrained(model, tmp_path / "adapter", is_trainable=True), ids), theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_all_linear_adapter_loads_in_peft_with_our_gradients(kind, tmp_path):
    torch, ref, model = _pair(kind, tmp_path / "model")
    peft = crosscheck("peft")
    kw = dict(r=2, lora_alpha=3, target_modules="all-linear")
    lm = get_peft_model(model, LoraConfig(**kw))
    params = dict(lm.named_parameters())
    _perturb(params.items(), np.random.default_rng(3), lambda n, d: setattr(params[n], "data", params[n].data + d))
    lm.save_pretrained(tmp_path / "adapter")
    ids = _ids()
    mine = _run_np(lm, ids)
    theirs_all_linear = peft.get_peft_model(ref, peft.LoraConfig(**kw))
    assert sorted(n for n, p in theirs_all_linear.named_parameters() if p.requires_grad) == sorted(mine[2])
    pm = peft.PeftModel.from_pretrained(theirs_all_linear.unload(), str(tmp_path / "adapter"), is_trainable=True)
    _compare(mine, _run_torch(torch, pm, ids))


# -- GGUF as llama.cpp's converter writes it ------------------------------------------------------
def _permute(w, n_head):
    """convert_hf_to_gguf.LlamaModel.permute (n_head: the query or the key/value heads)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, ref, arch):
    """`ref` as convert_hf_to_gguf.py converts it: TextModel's keys (+ LlamaModel's rope.dimension_count and
    q/k permutation for granite, GraniteModel's *_scale keys), tensor names from gguf-py's tensor map."""
    gguf = crosscheck("gguf")
    cfg = ref.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "granite":
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        w.add_attention_scale(cfg.attention_multiplier)
        w.add_embedding_scale(cfg.embedding_multiplier)
        w.add_residual_scale(cfg.residual_multiplier)
        w.add_logit_scale(cfg.logits_scaling)
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], cfg.num_hidden_layers)
    for name, t in ref.state_dict().items():
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


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_matches_transformers(kind, tmp_path):
    """llama.cpp's olmo2 and granite architectures have no bias tensors: a model without; GGUF keeps the
    multipliers as float32: ones that float32 holds exactly."""
    exact = dict(residual_multiplier=0.375, attention_multiplier=0.125) if kind == "granite" else {}
    torch, ref, _ = _pair(kind, tmp_path / "model", attention_bias=False, mlp_bias=False, **exact)
    _write_gguf(tmp_path / "m.gguf", ref, kind)
    model = load_model(tmp_path / "m.gguf", dtype="float64")
    for name, t in ref.state_dict().items():
        assert_close(model.state_dict()[name], t.numpy(), rtol=0, name=name)
    ids = _ids()
    assert_close(model(ids).logits.data, _logits(torch, ref, ids), name="logits", **TOL)
