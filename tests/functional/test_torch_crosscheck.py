"""lora_np against torch autograd (the `crosscheck` extra), float64, within 1e-10 relative:
every op that torch has (values and input gradients, over the same hypothesis-drawn cases
as test_functional.py), and whole decoder blocks against transformers' LlamaDecoderLayer
and GPT2Block with the same weights (outputs, input gradients and every weight gradient).

Float64 caveat: transformers' LlamaRMSNorm computes in float32 whatever the input dtype,
and LlamaRotaryEmbedding computes its cos/sin in float32. The block test therefore patches
LlamaRMSNorm.forward to compute in the input dtype (the same formula otherwise) and passes
cos/sin computed in float64 as `position_embeddings`; LlamaRotaryEmbedding itself is checked
against lora_np's tables within float32 tolerance.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close, crosscheck
from lora_np import Tensor
from lora_np import functional as F
from lora_np.models import gpt2, llama
from test_functional import CASES

RTOL = 1e-10


def _close(actual, expected, name):
    expected = np.asarray(expected)
    assert_close(actual, expected, RTOL, RTOL * (1 + float(np.abs(expected).max(initial=0))), name=name)


TORCH_OPS = sorted(op for op, draw in CASES.items() if op not in ("dropout", "rotary_embedding", "rotate_half"))


@pytest.mark.parametrize("op", TORCH_OPS)
@given(data=st.data())
def test_op_matches_torch(op, data):
    torch = crosscheck("torch")
    case = CASES[op](data)
    if case.torch is None:  # e.g. a basic index with a negative step, which torch does not support
        return
    ours = [Tensor(a, requires_grad=(i in case.grad_of)) for i, a in enumerate(case.inputs)]
    theirs = [torch.from_numpy(a.copy()).requires_grad_(i in case.grad_of)
              for i, a in enumerate(case.inputs)]
    out, expected = case.fn(*ours), case.torch(torch, *theirs)
    _close(out.data, expected.detach().numpy(), f"{op} value")
    r = np.random.default_rng(0).standard_normal(out.shape)
    out.backward(r)
    expected.backward(torch.from_numpy(r))
    for i in case.grad_of:
        _close(ours[i].grad, theirs[i].grad.numpy(), f"{op} gradient of input {i}")


def test_every_op_with_a_torch_counterpart_is_cross_checked():
    """Only dropout (a different random stream) and rotary position embedding (no torch op;
    checked inside the Llama block below) are left out."""
    assert set(CASES) - set(TORCH_OPS) == {"dropout", "rotary_embedding", "rotate_half"}


# -- whole blocks ------------------------------------------------------------------------------------
def _copy_weights(ours, theirs, torch, rng, skip=()):
    """Random weights into the torch module, then the same into ours by name."""
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.from_numpy(rng.standard_normal(tuple(p.shape)) * 0.3 + (1.0 if "norm" in name or "ln_" in name else 0.0)))
    sd = {k: v.detach().numpy() for k, v in theirs.state_dict().items() if not any(k.endswith(s) for s in skip)}
    ours.load_state_dict(sd)


def _compare_block(ours, theirs, x, call_ours, call_theirs, torch, name):
    xo = Tensor(x, requires_grad=True)
    xt = torch.from_numpy(x).requires_grad_(True)
    out, expected = call_ours(ours, xo), call_theirs(theirs, xt)
    _close(out.data, expected.detach().numpy(), f"{name} output")
    r = np.random.default_rng(1).standard_normal(out.shape)
    out.backward(r)
    expected.backward(torch.from_numpy(r))
    _close(xo.grad, xt.grad.numpy(), f"{name} input gradient")
    theirs_grads = {k: p.grad.numpy() for k, p in theirs.named_parameters()}
    ours_grads = dict(ours.named_parameters())
    assert set(ours_grads) == set(theirs_grads), "parameter names differ from transformers'"
    for k, g in theirs_grads.items():
        _close(ours_grads[k].grad, g, f"{name} gradient of {k}")


def _causal_mask(torch, T):
    """The additive causal mask that transformers' model classes build for eager attention
    (sdpa attention without a mask is causal by itself)."""
    return torch.triu(torch.full((T, T), -torch.inf, dtype=torch.float64), 1)[None, None]


@given(data=st.data())
@settings(max_examples=8)
def test_llama_decoder_block_matches_transformers(data):
    transformers = crosscheck("transformers")
    torch = crosscheck("torch")
    from transformers.models.llama import modeling_llama

    def rms_forward(self, h):  # LlamaRMSNorm.forward without its float32 round trip
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    nkv = data.draw(st.integers(1, 2), label="kv_heads")
    nh = nkv * data.draw(st.integers(1, 3), label="group")
    hd = 2 * data.draw(st.integers(1, 4), label="half_head_dim")
    hidden = nh * data.draw(st.integers(1, 6), label="hidden_per_head")  # transformers wants a multiple of nh
    ffn = data.draw(st.integers(4, 40), label="ffn")
    T, theta = data.draw(st.integers(1, 7), label="T"), data.draw(st.sampled_from([10000.0, 100000.0]))
    mlp_bias = data.draw(st.booleans(), label="mlp_bias")
    impl = "sdpa"  # Llama's eager attention takes its softmax in float32 (dtype=torch.float32)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=nh,
                                   num_key_value_heads=nkv, head_dim=hd, rms_norm_eps=1e-5, rope_theta=theta,
                                   mlp_bias=mlp_bias, num_hidden_layers=1, attn_implementation=impl)
    theirs = modeling_llama.LlamaDecoderLayer(cfg, layer_idx=0).double().eval()
    ours = llama.DecoderBlock(hidden, nh, nkv, ffn, head_dim=hd, eps=1e-5, mlp_bias=mlp_bias, dtype=np.float64)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    _copy_weights(ours, theirs, torch, rng)
    cos, sin = F.rope_cos_sin(np.arange(T), hd, theta, np.float64)                  # (T, D)
    pe = (torch.from_numpy(cos)[None], torch.from_numpy(sin)[None])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_forward)
        _compare_block(ours, theirs, rng.standard_normal((2, T, hidden)), lambda m, x: m(x, cos, sin),
                       lambda m, x: m(x, position_embeddings=pe), torch, "Llama block")


def test_rope_tables_match_transformers_rotary_embedding():
    transformers = crosscheck("transformers")
    torch = crosscheck("torch")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=64, rope_theta=100000.0)
    pos = torch.arange(300)[None]
    cos_t, sin_t = LlamaRotaryEmbedding(cfg)(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = F.rope_cos_sin(np.arange(300), 64, 100000.0, np.float32)
    # transformers computes the angles in float32 (up to 300 rad: an error of ~300·6e-8 rad)
    assert_close(cos, cos_t[0].numpy(), 0, 3e-5, name="cos")
    assert_close(sin, sin_t[0].numpy(), 0, 3e-5, name="sin")


@given(data=st.data())
@settings(max_examples=8)
def test_gpt2_block_matches_transformers(data):
    transformers = crosscheck("transformers")
    torch = crosscheck("torch")
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    nh = data.draw(st.integers(1, 3), label="heads")
    hidden = nh * data.draw(st.integers(1, 6), label="head_dim")
    ffn = data.draw(st.integers(4, 40), label="ffn")
    T = data.draw(st.integers(1, 7), label="T")
    impl = data.draw(st.sampled_from(["sdpa", "eager"]), label="attn_implementation")
    cfg = transformers.GPT2Config(n_embd=hidden, n_head=nh, n_inner=ffn, n_positions=16, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, attn_implementation=impl)
    theirs = GPT2Block(cfg, layer_idx=0).double().eval()
    ours = gpt2.GPT2Block(hidden, nh, ffn, eps=1e-5, dtype=np.float64)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    _copy_weights(ours, theirs, torch, rng, skip=(".attn.bias", ".masked_bias"))
    mask = None if impl == "sdpa" else _causal_mask(torch, T)
    _compare_block(ours, theirs, rng.standard_normal((2, T, hidden)), lambda m, x: m(x),
                   lambda m, x: m(x, attention_mask=mask), torch, f"GPT-2 block ({impl})")


@given(data=st.data())
@settings(max_examples=40, deadline=None)
def test_embedding_padding_idx_matches_torch(data):
    """F.embedding's padding_idx as torch's: the plain lookup forward, no gradient to that row (a negative index
    counts from the end). Not a derivative (finite differences would see the row), so checked here alone."""
    torch = crosscheck("torch")
    num, dim = data.draw(st.integers(1, 6), label="num"), data.draw(st.integers(1, 3), label="dim")
    pad = data.draw(st.integers(-num, num - 1), label="padding_idx")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), label="seed"))
    ids = rng.integers(0, num, data.draw(st.sampled_from([(7,), (2, 5)]), label="shape"))
    ids[..., 0] = pad % num  # the padding row is read at least once
    w = rng.standard_normal((num, dim))
    ours, theirs = Tensor(w, requires_grad=True), torch.from_numpy(w.copy()).requires_grad_(True)
    out = F.embedding(ids, ours, padding_idx=pad)
    expected = torch.nn.functional.embedding(torch.from_numpy(ids), theirs, padding_idx=pad)
    _close(out.data, expected.detach().numpy(), "embedding value")
    g = rng.standard_normal(out.shape)
    out.backward(g)
    expected.backward(torch.from_numpy(g))
    _close(ours.grad, theirs.grad.numpy(), "embedding gradient with padding_idx")
    assert not ours.grad[pad % num].any()


def test_embedding_padding_idx_outside_the_rows_is_named():
    w = Tensor(np.ones((4, 2)))
    for pad in (4, -5, 1.0, True):
        with pytest.raises(ValueError, match=rf"padding_idx {pad!r} is not a row of the 4-row embedding"):
            F.embedding(np.array([0, 1]), w, padding_idx=pad)
