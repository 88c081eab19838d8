"""LoRA layers: gradients against central differences, merge / unmerge, initialisations."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import assert_close
from lora_np import functional as F
from lora_np import nn
from lora_np.lora import LoraConfig
from lora_np.lora.layer import Embedding, Linear
from lora_np.tensor import Tensor


def _layer(kind, in_f, out_f, r, alpha, rslora=False, dora=False, dtype=np.float64, init=False, seed=0, bias=True):
    F.manual_seed(seed)
    if kind == "linear":
        base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    elif kind == "conv1d":
        base = nn.Conv1D(out_f, in_f, dtype=dtype)
        base.bias.data = np.random.default_rng(seed).standard_normal(out_f).astype(dtype)
    else:
        base = nn.Embedding(in_f, out_f, dtype=dtype)
    base.weight.requires_grad = False  # LoraModel freezes it; DoRA's detached norm makes dW differ from FD
    config = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=dora, init_lora_weights=init)
    layer = (Embedding if kind == "embedding" else Linear)(base, "default", r, alpha, config)
    if dora:  # move m away from ‖W + s·BA‖, where m/n = 1 would hide a wrong factor
        m = layer.lora_magnitude_vector["default"].weight
        m.data = (m.data * (1 + 0.3 * np.random.default_rng(seed + 1).standard_normal(m.shape))).astype(dtype)
    return layer


def _input(kind, lead, in_f, rng, dtype=np.float64):
    if kind == "embedding":
        return rng.integers(0, in_f, lead)
    return Tensor(rng.standard_normal(lead + (in_f,)).astype(dtype), requires_grad=True)


def _central_differences(f, arr, eps=1e-6):
    num = np.zeros_like(arr)
    for i in np.ndindex(arr.shape):
        old = arr[i]
        arr[i] = old + eps
        up = f()
        arr[i] = old - eps
        down = f()
        arr[i] = old
        num[i] = (up - down) / (2 * eps)
    return num


layer_cases = st.fixed_dictionaries({
    "kind": st.sampled_from(["linear", "conv1d", "embedding"]),
    "in_f": st.integers(1, 6), "out_f": st.integers(1, 6), "r": st.integers(1, 4),
    "alpha": st.sampled_from([1, 3, 8, 16.5]), "rslora": st.booleans(), "dora": st.booleans(),
    "lead": st.sampled_from([(3,), (2, 3), (1, 2, 2)]), "seed": st.integers(0, 2**16),
})


@given(case=layer_cases)
def test_gradients_equal_central_differences(case):
    """d(sum(y ⊙ w))/dθ from backward equals central differences for x, A, B, m and the bias
    (DoRA: with the norm n = ‖W + s·BA‖ held constant, as its backward treats it)."""
    kind, dora = case["kind"], case["dora"]
    layer = _layer(kind, case["in_f"], case["out_f"], case["r"], case["alpha"], case["rslora"], dora, seed=case["seed"])
    if kind != "embedding":
        layer.base_layer.bias.requires_grad = True
    rng = np.random.default_rng(case["seed"])
    x = _input(kind, case["lead"], case["in_f"], rng)
    w = rng.standard_normal(case["lead"] + (case["out_f"],))

    def loss():
        return (layer(x) * Tensor(w)).sum()

    loss().backward()
    if dora:
        norm = layer._weight_norm(layer.base_layer.weight.data, *layer.lora_factors("default"), layer.scaling["default"])
        layer._weight_norm = lambda *args: norm
    checked = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    if kind != "embedding":
        checked.append(("x", x))
    assert any("lora" in n for n, _ in checked)
    for name, p in checked:
        num = _central_differences(lambda: loss().item(), p.data)
        assert_close(p.grad, num, rtol=1e-6, atol=1e-7, name=f"{kind} d/d{name}")


@given(case=layer_cases)
def test_frozen_base_gets_no_gradient(case):
    kind = case["kind"]
    layer = _layer(kind, case["in_f"], case["out_f"], case["r"], case["alpha"], seed=case["seed"])
    assert not layer.base_layer.weight.requires_grad
    x = _input(kind, case["lead"], case["in_f"], np.random.default_rng(case["seed"]))
    layer(x).sum().backward()
    assert layer.base_layer.weight.grad is None
    assert all(p.grad is not None for n, p in layer.named_parameters() if "lora" in n)


@given(case=layer_cases, dtype=st.sampled_from([np.float32, np.float64]))
def test_merge_then_unmerge_restores_weight_and_merged_forward_equals_unmerged(case, dtype):
    """Round trip: float32 within 1e-6, float64 within 1e-12 of the largest |W| or |W'| (the merged
    weight: W + ΔW − ΔW rounds at the size of ΔW); merged forward = unmerged forward."""
    kind, rtol = case["kind"], 1e-6 if dtype == np.float32 else 1e-12
    layer = _layer(kind, case["in_f"], case["out_f"], case["r"], case["alpha"], case["rslora"], case["dora"],
                   dtype=dtype, seed=case["seed"])
    x = _input(kind, case["lead"], case["in_f"], np.random.default_rng(case["seed"]), dtype)
    w0 = layer.base_layer.weight.data.copy()
    before = layer(x).data
    layer.merge()
    assert layer.merged
    size = max(np.abs(w0).max(), np.abs(layer.base_layer.weight.data).max())
    scale = max(np.abs(before).max(), 1.0)
    assert_close(layer(x).data, before, rtol=0, atol=50 * rtol * scale, name="merged forward")
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.base_layer.weight.data, w0, rtol=0, atol=rtol * size, name="W after round trip")


def test_merge_is_explicit_never_a_side_effect_of_eval():
    layer = _layer("linear", 6, 5, 2, 4)
    w0 = layer.base_layer.weight.data.copy()
    layer.eval()
    layer(Tensor(np.ones((1, 6))))
    layer.train()
    assert not layer.merged and np.array_equal(layer.base_layer.weight.data, w0)


@pytest.mark.parametrize("dora", [False, True])
def test_two_adapters_merged_in_turn_equal_their_unmerged_forward(dora):
    layer = _layer("conv1d", 7, 9, 3, 5, dora=dora, seed=5)
    F.manual_seed(9)
    config = LoraConfig(r=2, lora_alpha=3, use_dora=dora, init_lora_weights=False)
    layer.update_layer("other", 2, 3, config)
    layer.set_adapter(["default", "other"])
    x = _input("conv1d", (4,), 7, np.random.default_rng(1))
    w0 = layer.base_layer.weight.data.copy()
    before = layer(x).data
    layer.merge()
    assert layer.merged_adapters == ["default", "other"]
    assert_close(layer(x).data, before, rtol=1e-12, atol=1e-12, name="forward, two merged")
    layer.unmerge()
    assert_close(layer.base_layer.weight.data, w0, rtol=0, atol=1e-13, name="W")


def test_safe_merge_refuses_non_finite_and_leaves_weight():
    layer = _layer("linear", 6, 5, 2, 4)
    layer.lora_B["default"].weight.data[0, 0] = np.inf
    w0 = layer.base_layer.weight.data.copy()
    with pytest.raises(ValueError, match="'default'.*non-finite"):
        layer.merge(safe_merge=True)
    assert not layer.merged and np.array_equal(layer.base_layer.weight.data, w0)


def test_disabled_layer_computes_the_base_layer_and_unmerges():
    layer = _layer("linear", 6, 5, 2, 4)
    x = Tensor(np.random.default_rng(0).standard_normal((3, 6)))
    base = layer.base_layer(x).data
    layer.merge()
    layer.disable_adapters = True
    assert_close(layer(x).data, base, rtol=1e-13, atol=1e-13, name="disabled")
    assert not layer.merged


# -- initialisation -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_default_init_is_kaiming_uniform_A_and_zero_B(dtype):
    layer = _layer("linear", 400, 30, 16, 16, init=True, dtype=dtype)
    A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    assert A.dtype == dtype and B.dtype == dtype
    bound = 1 / np.sqrt(400)
    assert np.abs(A).max() <= bound and np.abs(A).max() > 0.95 * bound
    assert abs(A.std() - bound / np.sqrt(3)) < 0.05 * bound  # U(-b, b) has std b/√3
    assert not B.any()
    x = Tensor(np.random.default_rng(0).standard_normal((2, 400)).astype(dtype))
    assert np.array_equal(layer(x).data, layer.base_layer(x).data)


def test_gaussian_init_has_std_one_over_r():
    layer = _layer("linear", 500, 8, 4, 8, init="gaussian")
    A = layer.lora_A["default"].weight.data
    assert abs(A.std() - 1 / 4) < 0.02 and abs(A.mean()) < 0.02
    assert not layer.lora_B["default"].weight.data.any()


def test_embedding_init_zero_A_normal_B():
    layer = _layer("embedding", 300, 40, 8, 8, init=True)
    assert not layer.lora_embedding_A["default"].data.any()
    B = layer.lora_embedding_B["default"].data
    assert abs(B.std() - 1) < 0.1


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_keep_the_output_and_move_W(kind, init):
    F.manual_seed(0)
    base = nn.Linear(9, 7, dtype=np.float64) if kind == "linear" else nn.Conv1D(7, 9, dtype=np.float64)
    w0 = base.weight.data.copy()
    x = Tensor(np.random.default_rng(0).standard_normal((3, 9)))
    y0 = base(x).data
    layer = Linear(base, "default", 3, 6, LoraConfig(r=3, lora_alpha=6, init_lora_weights=init))
    assert_close(layer(x).data, y0, rtol=1e-12, atol=1e-12, name="output at step 0")
    A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    w_oi = w0.T if kind == "conv1d" else w0                                               # (out, in)
    s = 6 / 3
    if init == "pissa":
        U, S, Vh = np.linalg.svd(w_oi)
        assert_close(s * B @ A, (U[:, :3] * S[:3]) @ Vh[:3], rtol=1e-10, atol=1e-12, name="s·BA = top-3 SVD")
    else:
        assert_close(B.T @ B, np.eye(3), rtol=0, atol=1e-12, name="Q columns orthonormal")
        assert_close(A, np.triu(A), rtol=0, atol=0, name="R upper triangular")
    residual = layer.base_layer.weight.data
    assert_close(residual + (s * B @ A).T if kind == "conv1d" else residual + s * B @ A, w0,
                 rtol=1e-12, atol=1e-12, name="W_res + s·BA = W")


def test_dora_magnitude_starts_at_row_norms():
    F.manual_seed(0)
    base = nn.Conv1D(5, 8, dtype=np.float64)
    layer = Linear(base, "default", 2, 4, LoraConfig(r=2, lora_alpha=4, use_dora=True, init_lora_weights=False))
    A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    expected = np.linalg.norm(base.weight.data.T + 2 * B @ A, axis=1)
    assert_close(layer.lora_magnitude_vector["default"].weight.data, expected, rtol=1e-14, name="m")
    x = Tensor(np.random.default_rng(0).standard_normal((3, 8)))
    # m = n, so DoRA's output equals plain LoRA's at step 0
    assert_close(layer(x).data, base(x).data + 2 * (x.data @ A.T) @ B.T, rtol=1e-12, atol=1e-12, name="y")


def test_dropout_touches_only_the_lora_branch():
    F.manual_seed(0)
    base = nn.Linear(6, 4, dtype=np.float64)
    layer = Linear(base, "default", 2, 2, LoraConfig(r=2, lora_alpha=2, lora_dropout=0.5, init_lora_weights=False))
    x = Tensor(np.random.default_rng(0).standard_normal((50, 6)))
    A, B = layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data
    y = layer(x).data
    lora = y - base(x).data                                                             # s·(dropout(x) Aᵀ) Bᵀ
    # each row's dropped input solves lora = (x ⊙ keep / (1-p)) Aᵀ Bᵀ; dropped entries are 0 or 2x
    assert not np.allclose(lora, (x.data @ A.T) @ B.T)
    layer.eval()
    assert_close(layer(x).data - base(x).data, (x.data @ A.T) @ B.T, rtol=1e-12, atol=1e-12, name="eval: no dropout")


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dora_with_dropout_in_training_follows_peft(kind):
    """PEFT, training with dropout: y = base(x) + (m/n − 1)·(x̃ Wᵀ) + (m/n)·s·(x̃ Aᵀ) Bᵀ, x̃ = dropout(x)."""
    layer = _layer(kind, 6, 5, 2, 4, dora=True, seed=7)
    layer.lora_dropout["default"].p = 0.4
    x = _input(kind, (3, 4), 6, np.random.default_rng(0))
    F.manual_seed(11)
    y = layer(x).data
    F.manual_seed(11)
    xd = F.dropout(x, 0.4, training=True).data                                          # the same mask
    W = layer.base_layer.weight.data
    W_oi = W.T if kind == "conv1d" else W                                               # (out, in)
    A, B = layer.lora_factors("default")
    s = layer.scaling["default"]
    n = np.linalg.norm(W_oi + s * B @ A, axis=1)
    scale = layer.lora_magnitude_vector["default"].weight.data / n
    expected = layer.base_layer(x).data + (scale - 1) * (xd @ W_oi.T) + scale * (s * (xd @ A.T) @ B.T)
    assert not np.allclose(xd, x.data)
    assert_close(y, expected, rtol=1e-12, atol=1e-12, name="DoRA with dropout")


def test_merge_into_a_read_only_weight_copies_it():
    layer = _layer("conv1d", 6, 5, 2, 4)
    w0 = layer.base_layer.weight.data.copy()
    frozen = np.asfortranarray(w0)  # like a memory-mapped checkpoint: read-only and not C-ordered
    frozen.flags.writeable = False
    layer.base_layer.weight.data = frozen
    layer.merge()
    assert_close(layer.base_layer.weight.data, w0 + layer.get_delta_weight("default"), rtol=1e-14, atol=1e-14, name="W")
    layer.unmerge()
    assert_close(layer.base_layer.weight.data, w0, rtol=0, atol=1e-14, name="W after unmerge")
    assert np.array_equal(frozen, w0)
