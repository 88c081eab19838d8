"""The attention options of the newer families, through nn.attend, CausalLM.forward and generation:
sliding windows, attention soft caps, partial rotary and final-logit soft caps.

A small causal LM built here from lora_np.nn pieces (not a family, so that the properties hold whatever
the family files do) has a sliding window of 3 on its first layer and a global second layer with an
attention soft cap (Gemma's pattern), partial rotary (Phi-3's: 4 of 8 head dims) and, where a test sets
it, final_logit_softcapping. Properties:

- greedy generation with the KV cache (which keeps every position; the window is the mask's) equals the
  argmax of a full forward at every step, well past the window, and the cached logits equal the full
  forward's (float64, 1e-10); the window changes the logits (the test is not vacuous);
- final_logit_softcapping: logits c·tanh(z/c), and the chunked LM-head loss of training (forward and
  gradients) equals the loss on those logits;
- the training path with attention dropout (`_attention_with_dropout`, eager) computes what SDPA does
  when its dropout keeps everything, values and gradients, window and cap included;
- the conventions are transformers' own: the window is masking_utils' sliding_window_causal_mask_function
  (queries at absolute positions, as with a cache), the cap gemma2's eager_attention_forward, partial
  rotary phi3's apply_rotary_pos_emb.
"""
import math

import numpy as np
import pytest

from conftest import assert_close, crosscheck
from lora_np import Tensor, kernels, nn
from lora_np import functional as F
from lora_np.generation import generate
from lora_np.models.base import CausalLM

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, ROTARY_DIM = 40, 32, 4, 2, 8, 4


class _Config:
    vocab_size = VOCAB
    max_position_embeddings = 64


class _Block(nn.Module):
    """x + o_proj(attend(q, k, v)) + mlp: grouped-query heads, the layer's window and cap."""

    def __init__(self, layer_idx, sliding_window, softcap, dtype):
        super().__init__()
        self.layer_idx, self.sliding_window, self.softcap = layer_idx, sliding_window, softcap
        self.q_proj = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False, dtype=dtype)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False, dtype=dtype)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False, dtype=dtype)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False, dtype=dtype)
        self.up_proj = nn.Linear(HIDDEN, 2 * HIDDEN, bias=False, dtype=dtype)
        self.down_proj = nn.Linear(2 * HIDDEN, HIDDEN, bias=False, dtype=dtype)
        self.dropout = 0.0

    def forward(self, h, cos, sin, cache, attn_mask):
        B, T, _ = h.shape
        heads = lambda x, n: F.transpose(F.reshape(x, (B, T, n, HEAD_DIM)), 1, 2)  # noqa: E731  (B, n, T, D)
        y = nn.attend(heads(self.q_proj(h), HEADS), heads(self.k_proj(h), KV_HEADS), heads(self.v_proj(h), KV_HEADS),
                      cache, self.layer_idx, cos, sin, attn_mask, dropout=self.dropout,
                      sliding_window=self.sliding_window, softcap=self.softcap)                   # (B, Hq, T, D)
        h = h + self.o_proj(F.reshape(F.transpose(y, 1, 2), (B, T, HEADS * HEAD_DIM)))
        return h + self.down_proj(F.silu(self.up_proj(h)))


class _WindowLM(CausalLM):
    def __init__(self, windows=(3, None), softcaps=(None, 5.0), dtype=np.float64, seed=0):
        super().__init__()
        self.config = _Config()
        with np.errstate(all="ignore"):
            F.manual_seed(seed)
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN, dtype=dtype)
        self.layers = nn.ModuleList([_Block(i, w, c, dtype) for i, (w, c) in enumerate(zip(windows, softcaps))])
        self.norm = nn.RMSNorm(HIDDEN, dtype=dtype)
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False, dtype=dtype)
        rng = np.random.default_rng(seed)
        for p in self.parameters():  # sizeable weights: attention far from uniform, logits far apart
            p.data[...] = rng.standard_normal(p.shape) * (1.0 if p.ndim == 1 else 2.0 / math.sqrt(p.shape[-1]))

    def _blocks(self):
        return self.layers

    def _embed(self, ids, past):
        cos, sin = F.rope_cos_sin(np.arange(past, past + ids.shape[1]), ROTARY_DIM, 100.0, self.dtype)  # (T, rd)
        return self.embed_tokens(ids), cos, sin

    def _final_norm(self, h):
        return self.norm(h)


PROMPT = np.array([[7, 3], [11, 29]])


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_greedy_generation_across_the_window_equals_full_forward_argmax(backend):
    if backend not in kernels.available_backends():
        pytest.skip("C core not built")
    kernels.set_backend(backend)
    model = _WindowLM()
    ids = generate(model, PROMPT, max_new_tokens=10)                                   # (B, 2 + 10)
    assert ids.shape == (2, 12)
    for n in range(PROMPT.shape[1], ids.shape[1]):  # each new token is the full forward's argmax at its step
        full = model(ids[:, :n]).logits.data[:, -1]                                   # (B, V), no cache
        assert np.array_equal(ids[:, n], full.argmax(-1)), f"step {n}: {ids[:, n]} vs {full.argmax(-1)}"
    cache, logits = nn.KVCache(), []
    logits.append(model(ids[:, :2], cache=cache).logits.data)
    for n in range(2, ids.shape[1]):
        logits.append(model(ids[:, n:n + 1], cache=cache).logits.data)
    assert cache.keys[0].shape[2] == ids.shape[1], "the cache keeps every position"
    full = model(ids).logits.data
    assert_close(np.concatenate(logits, 1), full, 1e-10, 1e-10, name="cached vs full logits")
    unwindowed = _WindowLM(windows=(None, None)).forward(ids).logits.data
    assert np.allclose(unwindowed[:, :3], full[:, :3], rtol=1e-12, atol=1e-12), "positions < W see every key"
    assert not np.allclose(unwindowed[:, 3:], full[:, 3:], rtol=1e-3), "the window changed nothing"


def test_final_logit_softcapping_in_both_paths():
    """logits = c·tanh(z/c); the chunked LM-head loss (training, return_logits=False) and its gradients equal
    those of the loss on the capped logits."""
    cap = 0.7
    labels = np.array([[7, 3, 5, 9, 1, 12, 30, -100], [11, 29, 2, 2, 8, 4, 6, 0]])
    plain = _WindowLM().forward(labels.clip(0)).logits.data
    model = _WindowLM()
    model.final_logit_softcapping = cap
    assert np.abs(plain).max() > 3 * cap, "the cap would not bite"
    capped = model(labels.clip(0)).logits.data
    assert_close(capped, cap * np.tanh(plain / cap), 1e-12, 1e-12, name="capped logits")
    grads = []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(labels.clip(0), labels=labels, return_logits=return_logits)
        assert (out.logits is None) == (not return_logits)
        out.loss.backward()
        grads.append((out.loss.item(), {n: p.grad.copy() for n, p in model.named_parameters()}))
    (loss_plain, g_plain), (loss_fused, g_fused) = grads
    z = cap * np.tanh(plain / cap)
    shifted, target = z[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
    keep = target != -100
    lse = np.log(np.exp(shifted - shifted.max(-1, keepdims=True)).sum(-1)) + shifted.max(-1)
    assert_close(loss_plain, (lse - shifted[np.arange(len(target)), target.clip(0)])[keep].mean(), 1e-12,
                 name="loss on capped logits")
    assert_close(loss_fused, loss_plain, 1e-12, name="chunked LM-head loss")
    for name in g_plain:
        assert_close(g_fused[name], g_plain[name], 1e-10, 1e-12, name=f"gradient of {name}")


@pytest.mark.parametrize("window, softcap, T, S", [(3, None, 6, 6), (None, 2.0, 5, 5), (2, 0.5, 3, 7), (9, 4.0, 6, 6)])
def test_dropout_path_computes_what_sdpa_does(monkeypatch, window, softcap, T, S):
    """nn._attention_with_dropout (the training path) with a dropout that keeps everything equals SDPA with
    the same window and cap (grouped-query heads; T < S as with a cache), values and gradients."""
    monkeypatch.setattr(F, "dropout", lambda x, p, training=True, generator=None: x)
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(s) for s in ((2, 4, T, 5), (2, 2, S, 5), (2, 2, S, 5))]
    results = []
    for path in ("dropout", "sdpa"):
        q, k, v = (Tensor(a, requires_grad=True) for a in arrays)
        if path == "dropout":
            out = nn._attention_with_dropout(q, k, v, None, 0.6, 0.5, window, softcap)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.6, sliding_window=window,
                                                 softcap=softcap)
        out.backward(np.cos(np.arange(out.data.size)).reshape(out.shape))
        results.append([out.data, q.grad, k.grad, v.grad])
    for name, a, b in zip(["out", "dq", "dk", "dv"], *results):
        assert_close(a, b, 1e-12, 1e-12, name=f"dropout path vs SDPA {name}")


def test_attend_refuses_a_bad_window_or_cap():
    q = Tensor(np.ones((1, 2, 3, 4)))
    for kwargs, name in (({"sliding_window": 0}, "sliding_window"), ({"softcap": -2.0}, "softcap")):
        for dropout in (0.0, 0.5):
            with pytest.raises(ValueError, match=name):
                nn.attend(q, q, q, None, 0, None, None, None, dropout=dropout, **kwargs)


# ---- the conventions are transformers' ----------------------------------------------------------------------


@pytest.mark.parametrize("T, S, W", [(9, 9, 3), (1, 9, 3), (4, 11, 5), (6, 6, 1), (5, 8, 20)])
def test_window_is_transformers_sliding_window_causal_mask(T, S, W):
    """F.scaled_dot_product_attention(is_causal=True, sliding_window=W) equals attention with the mask of
    transformers' sliding_window_causal_mask_function (queries at their absolute positions S - T + t, as
    under a cache) as a bool mask, float64."""
    torch = crosscheck("torch")
    crosscheck("transformers")
    from transformers.masking_utils import sliding_window_causal_mask_function

    mask_fn = sliding_window_causal_mask_function(W)
    zero = torch.tensor(0)
    mask = mask_fn(zero, zero, torch.arange(S - T, S)[:, None], torch.arange(S)[None, :]).numpy()    # (T, S)
    assert mask.shape == (T, S) and mask.dtype == bool
    rng = np.random.default_rng(T * S + W)
    q, k, v = (Tensor(rng.standard_normal(s)) for s in ((1, 4, T, 8), (1, 2, S, 8), (1, 2, S, 8)))
    ours = F.scaled_dot_product_attention(q, k, v, is_causal=True, sliding_window=W).data
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).data
    assert_close(ours, masked, 1e-12, 1e-12, name=f"window {W} vs transformers' mask")


@pytest.mark.parametrize("softcap", [0.5, 20.0])
def test_softcap_is_gemma2_eager_attention(softcap):
    """The soft cap is transformers' gemma2 eager_attention_forward's (scale, cap, then the mask). That
    function upcasts the softmax to float32, so the comparison is in float32 (ours float32 vs float64 is
    the functional tests')."""
    torch = crosscheck("torch")
    crosscheck("transformers")
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    class Module:
        head_dim, num_key_value_groups, training = 8, 2, False

    rng = np.random.default_rng(0)
    q, k, v = (3 * rng.standard_normal(s).astype(np.float32) for s in ((2, 4, 6, 8), (2, 2, 6, 8), (2, 2, 6, 8)))
    causal = np.where(np.tri(6, 6, dtype=bool), 0.0, -np.inf).astype(np.float32)
    theirs, _ = eager_attention_forward(Module(), *(torch.from_numpy(a) for a in (q, k, v)),
                                        torch.from_numpy(causal)[None, None], scaling=0.4, softcap=softcap)
    ours = F.scaled_dot_product_attention(Tensor(q), Tensor(k), Tensor(v), is_causal=True, scale=0.4,
                                          softcap=softcap).data
    assert_close(ours.transpose(0, 2, 1, 3), theirs.numpy(), 2e-5, 2e-5, name=f"softcap {softcap}")


@pytest.mark.parametrize("backend", ["numpy", "c"])
def test_partial_rotary_is_phi3_apply_rotary_pos_emb(backend):
    """cos/sin of rd = 6 of D = 16 dims rotate q[..., :6] and pass q[..., 6:] through, as transformers'
    phi3 apply_rotary_pos_emb (float64, 1e-12); its gradient is the transpose (torch autograd)."""
    if backend not in kernels.available_backends():
        pytest.skip("C core not built")
    kernels.set_backend(backend)
    torch = crosscheck("torch")
    crosscheck("transformers")
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 3, 5, 16))
    cos, sin = F.rope_cos_sin(np.arange(5), 6, 10000.0, np.float64)                              # (T, 6)
    tq = torch.from_numpy(q.copy()).requires_grad_(True)
    theirs, _ = apply_rotary_pos_emb(tq, tq, torch.from_numpy(cos)[None], torch.from_numpy(sin)[None])
    ours_q = Tensor(q, requires_grad=True)
    ours = F.rotary_embedding(ours_q, cos, sin)
    assert_close(ours.data, theirs.detach().numpy(), 1e-12, 1e-12, name="partial rotary")
    r = rng.standard_normal(q.shape)
    ours.backward(r)
    theirs.backward(torch.from_numpy(r))
    assert_close(ours_q.grad, tq.grad.numpy(), 1e-12, 1e-12, name="partial rotary gradient")
