"""Modules: registration and state, and for every layer the same four properties as the ops
(gradient = finite differences in float64, forward = a NumPy formula, float32 ≈ float64,
no_grad builds no graph) plus frozen parameters getting no gradient.

Module gradients: the input gradient is checked element by element (`check_grad`, stencil
and bound in test_functional.py); each parameter's gradient G is checked along a random
direction V: ⟨G, V⟩ against the same central difference of L(p + tV), with the same bound
for one scalar. A wrong gradient fails this for all V outside a set of measure zero.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_np import Tensor, no_grad
from lora_np import functional as F
from lora_np import nn
from lora_np.models import gpt2, llama
from conftest import (FD_ATOL_PER_S, FD_RTOL, assert_close, central_difference, check_grad, f32_tolerance,
                      np_attention, spread_rows)

F64 = np.float64


# -- NumPy references -------------------------------------------------------------------------------
def np_rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def np_ln(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def np_rope(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + np.concatenate([-x[..., h:], x[..., :h]], -1) * sin


def np_llama_attention(p, x, nh, nkv, hd, cos=None, sin=None, prefix="", mask=None):
    B, T, _ = x.shape

    def proj(name, n):
        y = x @ p[f"{prefix}{name}.weight"].T
        if f"{prefix}{name}.bias" in p:
            y = y + p[f"{prefix}{name}.bias"]
        return y.reshape(B, T, n, hd).transpose(0, 2, 1, 3)
    q, k, v = proj("q_proj", nh), proj("k_proj", nkv), proj("v_proj", nkv)
    if cos is not None:
        q, k = np_rope(q, cos, sin), np_rope(k, cos, sin)
    y = np_attention(q, k, v, mask, is_causal=True).transpose(0, 2, 1, 3).reshape(B, T, nh * hd)
    y = y @ p[f"{prefix}o_proj.weight"].T
    return y + p[f"{prefix}o_proj.bias"] if f"{prefix}o_proj.bias" in p else y


def np_gated_mlp(p, x, prefix=""):
    def lin(name, h):
        y = h @ p[f"{prefix}{name}.weight"].T
        return y + p[f"{prefix}{name}.bias"] if f"{prefix}{name}.bias" in p else y
    g = lin("gate_proj", x)
    return lin("down_proj", g / (1 + np.exp(-g)) * lin("up_proj", x))


def np_decoder_block(p, x, nh, nkv, hd, eps, cos, sin):
    h = x + np_llama_attention(p, np_rms(x, p["input_layernorm.weight"], eps), nh, nkv, hd, cos, sin, "self_attn.")
    return h + np_gated_mlp(p, np_rms(h, p["post_attention_layernorm.weight"], eps), "mlp.")


def np_gpt2_attention(p, x, nh, prefix=""):
    B, T, C = x.shape
    qkv = x @ p[f"{prefix}c_attn.weight"] + p[f"{prefix}c_attn.bias"]
    q, k, v = (qkv[..., i * C:(i + 1) * C].reshape(B, T, nh, C // nh).transpose(0, 2, 1, 3) for i in range(3))
    y = np_attention(q, k, v, is_causal=True).transpose(0, 2, 1, 3).reshape(B, T, C)
    return y @ p[f"{prefix}c_proj.weight"] + p[f"{prefix}c_proj.bias"]


def np_gelu_mlp(p, x, prefix=""):
    h = np_gelu_tanh(x @ p[f"{prefix}c_fc.weight"] + p[f"{prefix}c_fc.bias"])
    return h @ p[f"{prefix}c_proj.weight"] + p[f"{prefix}c_proj.bias"]


def np_gpt2_block(p, x, nh, eps):
    h = x + np_gpt2_attention(p, np_ln(x, p["ln_1.weight"], p["ln_1.bias"], eps), nh, "attn.")
    return h + np_gelu_mlp(p, np_ln(h, p["ln_2.weight"], p["ln_2.bias"], eps), "mlp.")


# -- module cases ------------------------------------------------------------------------------------
def _randomize(module, rng):
    """Random O(1)-scale parameters (norm weights around 1), so that every path matters."""
    for name, p in module.named_parameters():
        scale = 1 / math.sqrt(p.shape[-1]) if p.ndim == 2 else 0.3
        p.data = (rng.standard_normal(p.shape) * scale + (1.0 if "norm" in name or "ln_" in name else 0.0)).astype(p.dtype)
    return module


def _module_case(data):
    """(module, input array, call(module, x) -> Tensor, reference(params, x) -> ndarray)."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    kind = data.draw(st.sampled_from(sorted(MODULES)), label="module")
    return kind, MODULES[kind](data, rng)


def _lin(data, rng):
    i, o = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    bias = data.draw(st.booleans(), label="bias")
    m = _randomize(nn.Linear(i, o, bias=bias, dtype=F64), rng)
    return m, rng.standard_normal((2, 3, i)), lambda m, x: m(x), lambda p, x: x @ p["weight"].T + p.get("bias", 0)


def _conv1d(data, rng):
    i, o = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    m = _randomize(nn.Conv1D(o, i, dtype=F64), rng)
    return m, rng.standard_normal((2, i)), lambda m, x: m(x), lambda p, x: x @ p["weight"] + p["bias"]


def _embedding(data, rng):
    n, d = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4))
    m = _randomize(nn.Embedding(n, d, dtype=F64), rng)
    ids = rng.integers(0, n, (2, 4))
    return m, None, lambda m, x: m(ids), lambda p, x: p["weight"][ids]


def _layernorm(data, rng):
    c = data.draw(st.integers(2, 6))
    m = _randomize(nn.LayerNorm(c, eps=1e-5, dtype=F64), rng)
    return m, spread_rows(rng, (2, 3, c)), lambda m, x: m(x), lambda p, x: np_ln(x, p["weight"], p["bias"], 1e-5)


def _rmsnorm(data, rng):
    c = data.draw(st.integers(2, 6))
    m = _randomize(nn.RMSNorm(c, eps=1e-5, dtype=F64), rng)
    return m, spread_rows(rng, (2, 3, c)), lambda m, x: m(x), lambda p, x: np_rms(x, p["weight"], 1e-5)


def _gelu_mlp(data, rng):
    c, f = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6))
    m = _randomize(gpt2.GELUMLP(c, f, dtype=F64), rng)
    return m, rng.standard_normal((2, 3, c)), lambda m, x: m(x), np_gelu_mlp


def _gated_mlp(data, rng):
    c, f = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 6))
    m = _randomize(llama.GatedMLP(c, f, bias=data.draw(st.booleans(), label="bias"), dtype=F64), rng)
    return m, rng.standard_normal((2, 3, c)), lambda m, x: m(x), np_gated_mlp


def _heads(data):
    nkv = data.draw(st.integers(1, 2), label="kv_heads")
    nh = nkv * data.draw(st.integers(1, 3), label="group")
    hd = 2 * data.draw(st.integers(1, 2), label="half_head_dim")
    return nh, nkv, hd


def _attention(data, rng):
    nh, nkv, hd = _heads(data)
    c = data.draw(st.integers(2, 6), label="hidden")
    T = data.draw(st.integers(1, 4), label="T")
    bias = data.draw(st.booleans(), label="qkv_bias")
    m = _randomize(llama.Attention(c, nh, nkv, hd, bias=bias, o_bias=bias, dtype=F64), rng)
    cos, sin = F.rope_cos_sin(np.arange(T), hd, 100.0, F64)
    if data.draw(st.booleans(), label="rope"):
        return (m, rng.standard_normal((2, T, c)), lambda m, x: m(x, cos, sin),
                lambda p, x: np_llama_attention(p, x, nh, nkv, hd, cos, sin))
    return m, rng.standard_normal((2, T, c)), lambda m, x: m(x), lambda p, x: np_llama_attention(p, x, nh, nkv, hd)


def _gpt2_attention(data, rng):
    nh = data.draw(st.integers(1, 3), label="heads")
    c = nh * data.draw(st.integers(1, 2), label="head_dim")
    m = _randomize(gpt2.GPT2Attention(c, nh, dtype=F64), rng)
    T = data.draw(st.integers(1, 4), label="T")
    return m, rng.standard_normal((2, T, c)), lambda m, x: m(x), lambda p, x: np_gpt2_attention(p, x, nh)


def _decoder_block(data, rng):
    nh, nkv, hd = _heads(data)
    c, f = data.draw(st.integers(2, 6), label="hidden"), data.draw(st.integers(1, 6), label="ffn")
    T = data.draw(st.integers(1, 4), label="T")
    m = _randomize(llama.DecoderBlock(c, nh, nkv, f, head_dim=hd, eps=1e-5, dtype=F64), rng)
    cos, sin = F.rope_cos_sin(np.arange(T), hd, 100.0, F64)
    return (m, rng.standard_normal((2, T, c)), lambda m, x: m(x, cos, sin),
            lambda p, x: np_decoder_block(p, x, nh, nkv, hd, 1e-5, cos, sin))


def _gpt2_block(data, rng):
    nh = data.draw(st.integers(1, 3), label="heads")
    # hidden >= 4: ln_2 normalises the attention output plus x, and a layer norm over 2 or 3
    # elements is often near-degenerate (condition ~1/sqrt(eps)), beyond float32's agreement
    c = nh * data.draw(st.integers(-(-4 // nh), -(-4 // nh) + 1), label="head_dim")
    f = data.draw(st.integers(1, 6), label="ffn")
    m = _randomize(gpt2.GPT2Block(c, nh, f, eps=1e-5, dtype=F64), rng)
    T = data.draw(st.integers(1, 4), label="T")
    return m, rng.standard_normal((2, T, c)), lambda m, x: m(x), lambda p, x: np_gpt2_block(p, x, nh, 1e-5)


MODULES = {
    "Linear": _lin, "Conv1D": _conv1d, "Embedding": _embedding, "LayerNorm": _layernorm, "RMSNorm": _rmsnorm,
    "GELUMLP": _gelu_mlp, "GatedMLP": _gated_mlp, "Attention": _attention, "GPT2Attention": _gpt2_attention,
    "DecoderBlock": _decoder_block, "GPT2Block": _gpt2_block,
}


def _params(m):
    return {k: v.copy() for k, v in m.state_dict().items()}


# -- the properties -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(MODULES))
@given(data=st.data())
@settings(max_examples=10)
def test_module_gradients_equal_central_differences(kind, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    m, x, call, _ = MODULES[kind](data, rng)
    if x is not None:
        m.requires_grad_(False)
        check_grad(lambda t: call(m, t), [x], (0,), rng, name=f"{kind} input")
    m.requires_grad_(True)
    m.zero_grad()
    xt = None if x is None else Tensor(x)
    out = call(m, xt)
    r = rng.standard_normal(out.shape)
    out.backward(r)
    scale = float(np.abs(out.data * r).sum())
    for name, p in m.named_parameters():
        v = rng.standard_normal(p.shape)
        base = p.data

        def at(step):
            p.data = base + step * v
            with no_grad():
                return float(np.sum(call(m, xt).data * r))
        numeric = central_difference(at)
        p.data = base
        assert p.grad is not None, f"{kind}.{name} got no gradient"
        assert_close(np.sum(p.grad * v), numeric, FD_RTOL, FD_ATOL_PER_S * (1 + scale), name=f"{kind}.{name} ⟨grad, v⟩")


@pytest.mark.parametrize("kind", sorted(MODULES))
@given(data=st.data())
def test_module_forward_equals_numpy_formula(kind, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    m, x, call, ref = MODULES[kind](data, rng)
    out = call(m, None if x is None else Tensor(x))
    assert out.dtype == F64
    assert_close(out.data, ref(_params(m), x), 1e-12, 1e-12, name=kind)


@pytest.mark.parametrize("kind", sorted(MODULES))
@given(data=st.data())
def test_module_float32_agrees_with_float64(kind, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    m, x, call, _ = MODULES[kind](data, rng)
    results = {}
    for dtype in (np.float32, np.float64):
        m.to(dtype)
        m.zero_grad()
        xt = None if x is None else Tensor(x.astype(dtype), requires_grad=True)
        out = call(m, xt)
        assert out.dtype == dtype
        out.backward(np.ones(out.shape, dtype))
        grads = {n: p.grad for n, p in m.named_parameters()}
        if xt is not None:
            grads["<input>"] = xt.grad
        results[dtype] = out.data, grads
    (o32, g32), (o64, g64) = results[np.float32], results[np.float64]
    assert_close(o32, o64, *f32_tolerance(o64), name=f"{kind} output")
    for n in g64:
        assert g32[n].dtype == np.float32
        assert_close(g32[n], g64[n], *f32_tolerance(g64[n]), name=f"{kind} grad {n}")


@pytest.mark.parametrize("kind", sorted(MODULES))
@given(data=st.data())
@settings(max_examples=5)
def test_module_no_grad_and_frozen_parameters(kind, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    m, x, call, _ = MODULES[kind](data, rng)
    xt = None if x is None else Tensor(x, requires_grad=True)
    with no_grad():
        out = call(m, xt)
    assert out._ctx is None and not out.requires_grad
    m.requires_grad_(False)
    if xt is None:  # embedding: nothing requires grad, so no graph at all
        assert call(m, xt)._ctx is None
        return
    call(m, xt).sum().backward()
    assert all(p.grad is None for p in m.parameters()), f"{kind}: a frozen parameter got a gradient"
    assert xt.grad is not None


# -- frozen weights cost no weight-gradient work ---------------------------------------------------------
def test_frozen_linear_keeps_no_activation_and_computes_no_weight_gradient():
    lin = nn.Linear(4, 3, dtype=F64).requires_grad_(False)
    x = Tensor(np.ones((2, 4)), requires_grad=True)
    y = lin(x)
    ctx = y._ctx
    assert ctx.needs_input_grad == (True, False, False)
    assert ctx.x is None, "a frozen weight's op must not keep its input alive"
    y.sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is None
    assert_close(x.grad, np.tile(lin.weight.data.sum(0), (2, 1)), 1e-15, name="x.grad")


def test_trainable_linear_with_frozen_input_keeps_no_weight_copy():
    lin = nn.Linear(4, 3, dtype=F64)
    y = lin(Tensor(np.ones((2, 4))))
    assert y._ctx.needs_input_grad == (False, True, True)
    assert y._ctx.weight is None, "the input gradient is not needed, so the weight is not saved"


# -- Module mechanics ----------------------------------------------------------------------------------
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2, dtype=F64)
        self.blocks = nn.ModuleList([nn.RMSNorm(2, dtype=F64), nn.RMSNorm(2, dtype=F64)])
        self.scale = nn.Parameter(np.ones(2))
        self.extra = nn.ModuleDict({"a": nn.Linear(2, 2, bias=False, dtype=F64)})
        self.table = nn.ParameterDict()
        self.table["emb"] = nn.Parameter(np.zeros((2, 2)))
        self.not_a_param = Tensor(np.ones(2))


def test_named_parameters_follow_registration_order_with_dotted_names():
    names = [n for n, _ in Tiny().named_parameters()]
    assert names == ["scale", "proj.weight", "proj.bias", "blocks.0.weight", "blocks.1.weight",
                     "extra.a.weight", "table.emb"]


def test_state_dict_round_trip_and_errors():
    a, b = Tiny(), Tiny()
    rng = np.random.default_rng(0)
    for p in a.parameters():
        p.data = rng.standard_normal(p.shape)
    missing, unexpected = b.load_state_dict(a.state_dict())
    assert missing == [] and unexpected == []
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert np.array_equal(pa.data, pb.data) and pa.data is not pb.data, n
    sd = a.state_dict()
    sd["proj.weight"] = np.ones((5, 5))
    with pytest.raises(ValueError, match=r"proj.weight.*\(5, 5\).*\(2, 3\)"):
        b.load_state_dict(sd)
    sd = a.state_dict()
    del sd["scale"]
    sd["bogus"] = np.ones(1)
    with pytest.raises(KeyError, match="scale.*bogus"):
        b.load_state_dict(sd)
    assert b.load_state_dict(sd, strict=False) == (["scale"], ["bogus"])


def test_train_eval_requires_grad_zero_grad_to_and_counts():
    m = Tiny()
    m.eval()
    assert all(not mod.training for mod in m.modules())
    m.train()
    assert all(mod.training for mod in m.modules())
    m.requires_grad_(False)
    assert m.num_parameters(only_trainable=True) == 0
    m.proj.requires_grad_(True)
    assert m.num_parameters(only_trainable=True) == 3 * 2 + 2
    assert m.num_parameters() == 6 + 2 + 2 + 2 + 2 + 4 + 4
    y = m.proj(Tensor(np.ones((1, 3))))
    y.sum().backward()
    assert m.proj.weight.grad is not None
    m.zero_grad()
    assert all(p.grad is None for p in m.parameters())
    m.to(np.float32)
    assert all(p.dtype == np.float32 for p in m.parameters())
    assert m.get_submodule("extra.a") is m.extra["a"]
    with pytest.raises(AttributeError, match="nope"):
        m.get_submodule("extra.nope")


def test_tied_parameters_are_counted_once_but_saved_under_each_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3, dtype=F64)
            self.head = nn.Linear(3, 5, bias=False, dtype=F64)
            self.head.weight = self.emb.weight

    t = Tied()
    assert [n for n, _ in t.named_parameters()] == ["emb.weight"]
    assert list(t.state_dict()) == ["emb.weight", "head.weight"]


def test_reassigning_an_attribute_replaces_its_registration():
    m = Tiny()
    m.proj = nn.Linear(3, 2, bias=False, dtype=F64)
    assert "proj.bias" not in dict(m.named_parameters())
    del m.scale
    assert "scale" not in dict(m.named_parameters())
    with pytest.raises(TypeError, match="emb2"):
        m.table["emb2"] = np.ones(2)


def test_module_without_super_init_is_reported():
    class Broken(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.ones(1))

    with pytest.raises(AttributeError, match="super"):
        Broken()


def test_dropout_module_follows_train_and_eval():
    d = nn.Dropout(0.5)
    x = Tensor(np.ones(1000))
    assert (d(x).data == 0).any()
    d.eval()
    assert d(x) is x
    with pytest.raises(ValueError, match="Dropout"):
        nn.Dropout(1.5)


def test_attention_rejects_heads_not_a_multiple_of_kv_heads():
    with pytest.raises(ValueError, match="4 heads.*3 kv heads"):
        llama.Attention(8, 4, 3)


# -- incremental decoding -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["DecoderBlock", "GPT2Block"])
def test_kv_cache_decoding_equals_the_full_forward(kind):
    rng = np.random.default_rng(0)
    T, c = 6, 8
    if kind == "DecoderBlock":
        block = _randomize(llama.DecoderBlock(c, 4, 2, 12, head_dim=4, eps=1e-5, dtype=F64), rng)
        cos, sin = F.rope_cos_sin(np.arange(T), 4, 100.0, F64)
    else:
        block = _randomize(gpt2.GPT2Block(c, 2, 12, dtype=F64), rng)
        cos = sin = None
    x = rng.standard_normal((2, T, c))
    full = block(Tensor(x), cos, sin).data
    cache = nn.KVCache()
    steps = []
    with no_grad():
        for start, stop in ((0, 3), (3, 4), (4, 6)):  # a prompt, then one token, then two
            cs = (cos[start:stop], sin[start:stop]) if cos is not None else (None, None)
            steps.append(block(Tensor(x[:, start:stop]), *cs, cache).data)
    assert cache.seq_len() == T
    assert_close(np.concatenate(steps, 1), full, 1e-12, 1e-12, name=f"{kind} cached decoding")


def test_attention_mask_hides_padding():
    """A key masked out for every query changes nothing when its value changes."""
    rng = np.random.default_rng(0)
    attn = _randomize(llama.Attention(8, 2, 1, 4, dtype=F64), rng)
    x = rng.standard_normal((1, 4, 8))
    mask = np.ones((1, 1, 4, 4), bool)
    mask[..., 1] = False
    mask[..., 0, 0] = True
    y1 = attn(Tensor(x), attn_mask=Tensor(mask)).data
    x2 = x.copy()
    x2[0, 1] += 5.0  # only position 1's key/value change ... and its own query
    y2 = attn(Tensor(x2), attn_mask=Tensor(mask)).data
    assert_close(np.delete(y2, 1, axis=1), np.delete(y1, 1, axis=1), 1e-12, 1e-12, name="masked key")
