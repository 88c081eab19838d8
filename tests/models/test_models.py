"""Model-level pieces: the chunked LM-head loss equals the plain one (value and gradients)."""
import numpy as np
from hypothesis import given, strategies as st

import lora_np
from lora_np import functional as F
from lora_np.functional import LinearCrossEntropy, causal_lm_loss
from lora_np.models import LlamaConfig, LlamaForCausalLM
from lora_np.tensor import Tensor
from conftest import assert_close


@given(st.integers(1, 3), st.integers(2, 9), st.integers(1, 40), st.integers(0, 2**31 - 1),
       st.sampled_from([1, 3, 512]), st.floats(0, 1))
def test_chunked_head_loss_equals_full_logits_loss(B, T, V, seed, chunk, masked):
    rng = np.random.default_rng(seed)
    h0 = rng.standard_normal((B, T, 6))
    w0 = rng.standard_normal((V, 6))
    labels = rng.integers(0, V, (B, T))
    labels[rng.random((B, T)) < masked] = -100
    labels[0, 1] = 0  # at least one target
    results = []
    for fused in (True, False):
        h, w = Tensor(h0, requires_grad=True), Tensor(w0, requires_grad=True)
        if fused:
            target = np.concatenate([labels[:, 1:], np.full((B, 1), -100)], 1).reshape(-1)
            loss = LinearCrossEntropy.apply(F.reshape(h, (B * T, 6)), w, Tensor(target), chunk=chunk)
        else:
            loss = causal_lm_loss(F.linear(h, w), labels)
        loss.backward()
        results.append((loss.data, h.grad, w.grad))
    (l1, gh1, gw1), (l2, gh2, gw2) = results
    assert_close(l1, l2, rtol=1e-12, name="loss")
    assert_close(gh1, gh2, rtol=1e-10, atol=1e-14, name="d hidden")
    assert_close(gw1, gw2, rtol=1e-10, atol=1e-14, name="d head weight")


def test_model_loss_without_logits_equals_with_logits():
    lora_np.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2), dtype=np.float64)
    ids = np.random.default_rng(0).integers(0, 50, (2, 7))
    labels = ids.copy()
    labels[0, :3] = -100
    full = model(ids, labels=labels)
    fused = model(ids, labels=labels, return_logits=False)
    assert fused.logits is None
    assert_close(fused.loss.data, full.loss.data, rtol=1e-12, name="loss")
    grads = []
    for kw in ({}, {"return_logits": False}):
        model.zero_grad()
        model.model.norm.weight.requires_grad = True
        model(ids, labels=labels, **kw).loss.backward()
        grads.append(model.model.norm.weight.grad.copy())
    assert_close(grads[1], grads[0], rtol=1e-10, name="gradient through the fused head")
