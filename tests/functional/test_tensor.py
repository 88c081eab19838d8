"""Tensor and the autograd engine: graph building, accumulation, freeing, no_grad, dtype
rules, deep graphs and the errors a user sees."""
import gc
import sys
import weakref

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import assert_close
from lora_np import Tensor, enable_grad, is_grad_enabled, no_grad, tensor
from lora_np import functional as F
from lora_np.tensor import Function


# -- construction and dtypes ----------------------------------------------------------------------
def test_default_dtype_is_float32_and_integers_stay_integers():
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor(3.5).dtype == np.float32
    assert Tensor(np.arange(3)).dtype == np.int64
    assert Tensor(np.ones(2, np.float64)).dtype == np.float64
    assert Tensor(np.float64(2.0)).dtype == np.float64  # a NumPy scalar keeps its dtype
    assert Tensor([1, 2], dtype=np.float64).dtype == np.float64


def test_tensor_copies_detach_shares_and_drops_the_graph():
    a = np.ones(3)
    t = tensor(a, requires_grad=True)
    a[0] = 5
    assert t.data[0] == 1, "tensor() must copy"
    y = t * 2
    d = y.detach()
    assert d.data is y.data and not d.requires_grad and d._ctx is None
    assert y.numpy() is y.data
    assert Tensor(np.array(4.0)).item() == 4.0


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.uint8])
def test_integer_tensors_cannot_require_grad(dtype):
    with pytest.raises(TypeError, match=f"{np.dtype(dtype)}"):
        Tensor(np.zeros(3, dtype), requires_grad=True)
    t = Tensor(np.zeros(3, dtype))
    with pytest.raises(TypeError, match="require grad"):
        t.requires_grad_()


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "matmul", "pow"])
def test_mixing_float32_and_float64_raises_naming_the_op(op):
    a, b = Tensor(np.ones((2, 2), np.float32)), Tensor(np.ones((2, 2), np.float64))
    with pytest.raises(TypeError, match=rf"{op}.*float32.*float64"):
        getattr(F, op)(a, b)
    with pytest.raises(TypeError, match=rf"{op}.*float64.*float32"):
        getattr(F, op)(b, a)


def test_scalars_and_integer_arrays_take_the_tensor_dtype():
    x = Tensor(np.ones(3, np.float32), requires_grad=True)
    assert (x * 2.5).dtype == np.float32
    assert (2.5 - x).dtype == np.float32
    assert (x + np.arange(3)).dtype == np.float32
    assert (np.arange(3) * x).dtype == np.float32  # ndarray (op) Tensor defers to Tensor
    assert isinstance(np.arange(3) * x, Tensor)
    assert (x + Tensor(np.arange(3))).dtype == np.float32
    y = Tensor(np.ones(3, np.float64))
    assert (y * 2.5).dtype == np.float64


def test_cast_is_differentiable_and_keeps_gradient_dtypes():
    x = Tensor(np.array([1.0, 2.0], np.float32), requires_grad=True)
    y = x.double()
    assert y.dtype == np.float64
    (y * y).sum().backward()
    assert x.grad.dtype == np.float32
    assert_close(x.grad, [2.0, 4.0], 0, name="cast grad")
    assert x.float() is x


# -- backward --------------------------------------------------------------------------------------
def test_backward_needs_a_gradient_for_non_scalars():
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    y = x * 2
    with pytest.raises(RuntimeError, match=r"scalar.*\(2, 3\)"):
        y.backward()
    with pytest.raises(ValueError, match=r"\(3,\).*\(2, 3\)"):
        y.backward(np.ones(3))
    y.backward(np.ones((2, 3)))
    assert_close(x.grad, np.full((2, 3), 2.0), 0, name="grad")


def test_backward_on_a_tensor_without_grad_raises():
    with pytest.raises(RuntimeError, match="does not require grad"):
        Tensor(np.ones(())).backward()


def test_gradients_accumulate_across_backward_calls():
    x = Tensor(np.array([1.0, -2.0]), requires_grad=True)
    (x * 3).sum().backward()
    (x * x).sum().backward()
    assert_close(x.grad, 3 + 2 * x.data, 0, name="accumulated")
    x.zero_grad()
    assert x.grad is None


def test_a_reused_input_gets_the_sum_of_its_gradients():
    x = Tensor(np.array([0.5, 1.5, -1.0]), requires_grad=True)
    y = x * x + x * 3 - F.exp(x)
    y.sum().backward()
    assert_close(x.grad, 2 * x.data + 3 - np.exp(x.data), 1e-15, name="diamond")


@given(shapes=hnp.mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=3))
def test_broadcast_gradients_reduce_to_the_input_shapes(shapes):
    sa, sb = shapes.input_shapes
    a, b = Tensor(np.ones(sa), requires_grad=True), Tensor(np.ones(sb), requires_grad=True)
    (a * b).sum().backward()
    n = int(np.prod(shapes.result_shape))
    assert a.grad.shape == sa and b.grad.shape == sb
    # each input element is broadcast to n / size copies, each with gradient 1
    assert_close(a.grad, np.full(sa, n / max(int(np.prod(sa)), 1)), 0, name="a.grad")
    assert_close(b.grad, np.full(sb, n / max(int(np.prod(sb)), 1)), 0, name="b.grad")


def test_deep_chain_backpropagates_without_recursion_error():
    n = 5000
    assert n > sys.getrecursionlimit()
    x = Tensor(np.array([0.3, -0.2]), requires_grad=True)
    y = x
    for _ in range(n):
        y = y * 1.0001 + 0.001
    y.sum().backward()
    assert_close(x.grad, np.full(2, 1.0001 ** n), 1e-12, name="deep chain")


def test_deep_chain_of_matmuls_and_nonlinearities():
    rng = np.random.default_rng(0)
    w = Tensor(rng.standard_normal((4, 4)) * 0.3, requires_grad=True)
    x = Tensor(rng.standard_normal((2, 4)))
    h = x
    for _ in range(1500):  # 3000 ops, one shared weight: its gradient accumulates 1500 times
        h = F.tanh(h @ w)
    h.sum().backward()
    assert w.grad.shape == (4, 4) and np.isfinite(w.grad).all()


def test_graph_is_freed_after_backward():
    x = Tensor(np.ones(1000), requires_grad=True)
    h = F.exp(x)                    # Exp saves its output for backward
    saved = weakref.ref(h._ctx.out)
    y = F.sum(h * 2)
    del h
    gc.collect()
    assert saved() is not None, "the graph keeps what backward needs until backward runs"
    y.backward()
    gc.collect()
    assert saved() is None, "backward frees what the graph saved"
    assert y._ctx is None
    w = F.exp(x) * 2
    w.sum().backward()
    with pytest.raises(RuntimeError, match="freed"):
        (w * 3).sum().backward()  # w's own graph went with the first backward


def test_graph_keeps_no_unsaved_intermediate_alive():
    """An activation that no op saved for backward is freed as soon as the user drops it."""
    x = Tensor(np.ones(1000), requires_grad=True)
    h = x + 1                     # Add saves nothing
    big = weakref.ref(h.data)
    y = (h * 2.0).sum()           # Mul by a constant saves only the constant
    del h
    gc.collect()
    assert big() is None, "the graph must not hold intermediate tensors"
    y.backward()
    assert_close(x.grad, np.full(1000, 2.0), 0, name="grad")


def test_wrong_gradient_shape_from_a_function_is_reported():
    class Bad(Function):
        def forward(self, x):
            return x * 2

        def backward(self, g):
            return g.sum(0)

    x = Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"Bad.backward.*\(3,\).*\(2, 3\)"):
        Bad.apply(x).sum().backward()


def test_custom_function_skips_gradients_nobody_needs():
    calls = []

    class ScaledMul(Function):
        def forward(self, a, b, scale=1.0):
            self.a, self.b, self.scale = a, b, scale
            return a * b * scale

        def backward(self, g):
            calls.append(self.needs_input_grad)
            ga = g * self.b * self.scale if self.needs_input_grad[0] else None
            gb = g * self.a * self.scale if self.needs_input_grad[1] else None
            return ga, gb

    a = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    b = Tensor(np.array([3.0, 4.0]))
    ScaledMul.apply(a, b, scale=0.5).sum().backward()
    assert calls == [(True, False)]
    assert b.grad is None
    assert_close(a.grad, [1.5, 2.0], 0, name="a.grad")


# -- no_grad ---------------------------------------------------------------------------------------
def test_no_grad_builds_no_graph_and_restores_the_mode():
    x = Tensor(np.ones(3), requires_grad=True)
    with no_grad():
        assert not is_grad_enabled()
        y = F.exp(x * 2).sum()
        with enable_grad():
            z = x * 2
        assert not is_grad_enabled()
    assert is_grad_enabled()
    assert y._ctx is None and not y.requires_grad
    assert z.requires_grad and z._ctx is not None
    with pytest.raises(ValueError):
        with no_grad():
            raise ValueError("boom")
    assert is_grad_enabled(), "an exception inside no_grad must restore the mode"


def test_no_grad_as_a_decorator():
    @no_grad()
    def f(x):
        """doc"""
        return x * 2

    x = Tensor(np.ones(3), requires_grad=True)
    y = f(x)
    assert not y.requires_grad and y._ctx is None
    assert f.__name__ == "f" and f.__doc__ == "doc"
    assert is_grad_enabled()


def test_frozen_tensors_get_no_gradient():
    w = Tensor(np.ones((3, 3)), requires_grad=False)
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    (x @ w).sum().backward()
    assert w.grad is None and x.grad is not None


# -- methods and operators ----------------------------------------------------------------------
@given(st.data())
def test_methods_forward_to_functional(data):
    shape = data.draw(hnp.array_shapes(min_dims=2, max_dims=3, max_side=3))
    a = np.random.default_rng(0).standard_normal(shape)
    t = Tensor(a)
    assert_close(t.T.data, a.T, 0, name="T")
    assert_close(t.reshape(-1).data, a.reshape(-1), 0, name="reshape")
    assert_close(t.reshape((a.size,)).data, a.reshape(-1), 0, name="reshape tuple")
    assert_close(t.view(a.size, 1).data, a.reshape(-1, 1), 0, name="view")
    assert_close(t.sum(-1, keepdim=True).data, a.sum(-1, keepdims=True), 1e-15, name="sum")
    assert_close(t.mean().data, a.mean(), 1e-15, name="mean")
    assert_close(t.max(0).data, a.max(0), 0, name="max")
    assert_close(t.transpose(0, -1).data, np.swapaxes(a, 0, -1), 0, name="transpose")
    assert_close(t.unsqueeze(0).squeeze(0).data, a, 0, name="unsqueeze/squeeze")
    assert_close((-t).data, -a, 0, name="neg")
    assert_close((t ** 2).data, a ** 2, 0, name="pow")
    assert_close((2 ** Tensor(np.abs(a))).data, 2 ** np.abs(a), 1e-15, name="rpow")
    assert_close((1 / (t * t + 1)).data, 1 / (a * a + 1), 1e-15, name="rtruediv")
    assert t.shape == a.shape and t.ndim == a.ndim and t.dim() == a.ndim and t.numel() == a.size
    assert t.size() == a.shape and t.size(-1) == a.shape[-1] and len(t) == len(a)
    assert np.array_equal(np.asarray(t), a)


def test_comparisons_give_bool_tensors_without_a_graph():
    x = Tensor(np.array([-1.0, 0.0, 2.0]), requires_grad=True)
    for r, expected in ((x > 0, [False, False, True]), (x >= 0, [False, True, True]),
                        (x < 0, [True, False, False]), (x <= 0, [True, True, False])):
        assert r.dtype == np.bool_ and not r.requires_grad and r.data.tolist() == expected


def test_repr_mentions_grad():
    assert "requires_grad=True" in repr(Tensor(np.ones(2), requires_grad=True))
    assert "requires_grad" not in repr(Tensor(np.ones(2)))
