"""Differentiable ops, named and ordered as `torch` / `torch.nn.functional`.

    primitives.py   elementwise ops, matmul and linear, reductions, shape ops, indexing, embedding, cast
    fused.py        softmax, log_softmax, cross_entropy, the causal-LM losses (chunked LM head),
                    layer_norm, rms_norm, dropout (and the default generator), gelu, silu_mul
    attention.py    rotary position embedding and scaled_dot_product_attention

Each op is a `Function` (lora_np.tensor) with its forward and backward side by side. Ops with a
kernel (silu_mul, rms_norm, rotary embedding, attention, the LM-head loss's row softmax) call one
lora_np.kernels function, which picks the backend; no Function here branches on it. To add an op:
its Function and its function in the module of its kind, its name below.
"""
import sys

from ..tensor import attach_ops
from .attention import rope_cos_sin, rotary_embedding, rotate_half, scaled_dot_product_attention
from .fused import (LinearCrossEntropy, causal_lm_head_loss, causal_lm_loss, cross_entropy, default_generator,
                    dropout, gelu, layer_norm, log_softmax, manual_seed, rms_norm, silu_mul, softmax)
from .primitives import (add, cast, cat, check_padding_idx, div, embedding, exp, getitem, linear, log, masked_fill,
                         matmul, max, mean, mul, neg, permute, pow, relu, reshape, sigmoid, silu, split, sqrt, squeeze,
                         stack, sub, sum, tanh, transpose, unsqueeze, where)

__all__ = [
    "add", "sub", "mul", "div", "neg", "pow", "matmul", "exp", "log", "sqrt", "tanh",
    "sigmoid", "relu", "silu", "silu_mul", "gelu", "sum", "mean", "max", "reshape", "transpose",
    "permute", "unsqueeze", "squeeze", "getitem", "cat", "split", "stack", "where",
    "masked_fill", "embedding", "softmax", "log_softmax", "cross_entropy", "causal_lm_loss",
    "causal_lm_head_loss", "LinearCrossEntropy", "layer_norm", "rms_norm", "dropout", "linear",
    "rotary_embedding", "rotate_half", "rope_cos_sin", "scaled_dot_product_attention", "cast", "manual_seed",
    "default_generator",
]

attach_ops(sys.modules[__name__])  # Tensor's operators and methods (x + y, x.sum()) call the ops above
