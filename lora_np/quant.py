"""A frozen base kept in GGUF's quantized blocks: QuantizedLinear, QuantizedEmbedding, quantize_model.

    model = quantize_model(model, "q4_k")      # every Linear and Embedding of a float model, in place
    layer = QuantizedLinear(blocks, "Q4_1", bias)  # blocks: uint8 [out_features, row bytes], as in a GGUF file

QuantizedLinear computes y = x Wᵀ + b and, in backward, dx = dy W (lora_np.kernels.quant: the C GEMMs
over the blocks, or the NumPy reference); the weight gets no gradient and is never held as floats.
QuantizedEmbedding dequantizes the rows it looks up. A tied LM head shares the embedding's blocks.
Both answer `.weight` with a QuantizedWeight (shape, dtype; `.data` dequantizes, for inspection).

The quantizers (quantize, from lora_np.kernels.quantize) equal llama.cpp's reference ones bit for bit;
"bf16" and "f16" keep 2-byte floats: a bf16 checkpoint so kept computes what its float32 model computes, up
to the order of float32 summation.
"""
import numpy as np

from .kernels.quant import QUANT_TYPES, check_blocks, dequantize_rows, quant_linear_backward, quant_linear_forward
from .kernels.quantize import BLOCK_SIZES, QUANTIZE_TYPES, quantize
from .nn import Conv1D, Embedding, Linear, Module, Parameter
from .tensor import Function, Tensor

# llama.cpp's fallback (llama-quant.cpp) for a tensor whose rows are not whole blocks of the asked type
_FALLBACK = {"Q4_K": "Q5_0"}


class QuantLinear(Function):
    """y = x Wᵀ + b with W in blocks; x (..., in), b (out,). The input's gradient only (and the bias's
    when it is trainable): the quantized weight is frozen."""

    def forward(self, x, bias, blocks=None, ggml_type=None):
        self.blocks, self.ggml_type, self.xshape = blocks, ggml_type, x.shape
        y = quant_linear_forward(np.ascontiguousarray(x.reshape(-1, x.shape[-1])), blocks, ggml_type, bias)  # (N, out)
        return y.reshape(x.shape[:-1] + (blocks.shape[0],))

    def backward(self, g):
        g2 = np.ascontiguousarray(g.reshape(-1, g.shape[-1]))                                            # (N, out)
        gx = quant_linear_backward(g2, self.blocks, self.ggml_type).reshape(self.xshape) if self.needs_input_grad[0] \
            else None
        gb = g2.sum(0) if self.needs_input_grad[1] else None
        return gx, gb


class QuantizedWeight:
    """What `.weight` of a quantized layer answers: shape, dtype (the layer's float type), ggml_type, the
    blocks, and `.data`, W dequantized into a new float array (for inspection and export; the layer itself
    never makes one). It is frozen: assigning `.data` raises, so nothing merges into it unnoticed."""

    requires_grad = False
    grad = None

    def __init__(self, blocks, ggml_type, shape, dtype):
        self.blocks, self.ggml_type, self.shape, self.dtype = blocks, ggml_type, tuple(shape), np.dtype(dtype)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def data(self):
        return dequantize_rows(self.blocks, self.ggml_type, self.dtype)

    @data.setter
    def data(self, value):
        raise NotImplementedError(f"a {self.ggml_type} weight {self.shape} kept in its blocks cannot be assigned; "
                                  "load the model with dequantize=True to change its weights")

    def __repr__(self):
        return f"QuantizedWeight({self.ggml_type}, shape={self.shape}, dtype={self.dtype})"


class QuantizedLinear(Module):
    """A frozen Linear whose weight [out_features, in_features] stays in ggml blocks (`weight_blocks`,
    uint8 [out_features, row bytes], type `ggml_type`); bias (float, frozen) optional; `dtype`: the
    float type of its inputs and outputs (the model's)."""

    def __init__(self, blocks, ggml_type, bias=None, dtype=np.float32):
        super().__init__()
        self.out_features, self.in_features = check_blocks("QuantizedLinear", blocks, ggml_type)
        self.ggml_type, self.weight_blocks, self.dtype = ggml_type, blocks, np.dtype(dtype)
        if bias is not None and np.shape(bias) != (self.out_features,):
            raise ValueError(f"QuantizedLinear: bias has shape {np.shape(bias)}, expected ({self.out_features},)")
        self.bias = None if bias is None else Parameter(np.asarray(bias, self.dtype), requires_grad=False)
        self.weight = QuantizedWeight(blocks, ggml_type, (self.out_features, self.in_features), self.dtype)

    def forward(self, x):
        x = x if isinstance(x, Tensor) else Tensor(x)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear: input shape {x.shape} does not match in_features {self.in_features}")
        if x.dtype != self.dtype:
            raise TypeError(f"QuantizedLinear: input dtype {x.dtype} differs from the layer's {self.dtype}")
        return QuantLinear.apply(x, self.bias, blocks=self.weight_blocks, ggml_type=self.ggml_type)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"type={self.ggml_type}")


class QuantizedEmbedding(Module):
    """A frozen Embedding whose weight [num_embeddings, embedding_dim] stays in ggml blocks; a lookup
    dequantizes the rows it reads to `dtype`."""

    def __init__(self, blocks, ggml_type, dtype=np.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = check_blocks("QuantizedEmbedding", blocks, ggml_type)
        self.ggml_type, self.weight_blocks, self.dtype = ggml_type, blocks, np.dtype(dtype)
        self.weight = QuantizedWeight(blocks, ggml_type, (self.num_embeddings, self.embedding_dim), self.dtype)

    def forward(self, input_ids):
        ids = np.asarray(input_ids.data if isinstance(input_ids, Tensor) else input_ids)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"QuantizedEmbedding: input ids must be integers, got dtype {ids.dtype}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_embeddings):
            raise IndexError(f"QuantizedEmbedding: ids must lie in [0, {self.num_embeddings}), got "
                             f"[{ids.min()}, {ids.max()}]")
        rows = dequantize_rows(self.weight_blocks[ids.reshape(-1)], self.ggml_type, self.dtype)  # (n, C)
        return Tensor(rows.reshape(ids.shape + (self.embedding_dim,)))

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.ggml_type}"


# ---- whole models -------------------------------------------------------------------------


def check_float_weights(model, op):
    """Refuse `op` (NotImplementedError naming the layer) when the model keeps a weight in quantized blocks:
    what writes or changes float weights (merged exports) needs the model loaded with dequantize=True."""
    for name, module in model.named_modules():
        if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            raise NotImplementedError(f"{op} needs float weights, but {name} keeps its {module.ggml_type} weight in "
                                      "blocks; load the model with dequantize=True (lora-np: --dequantize)")


def quantize_model(model, ggml_type):
    """Replace every Linear, GPT-2 Conv1D and Embedding of a float model by its quantized form, in place,
    and return the model. A tied LM head shares its embedding's blocks. A weight whose rows are not
    whole blocks of ggml_type takes llama.cpp's fallback (q4_k -> q5_0) or, without one, stays float.
    "bf16" / "f16" keep every weight as 2-byte floats (lossless for weights that are bf16 / f16 values).
    LoRA adapters go on afterwards (a model that has them is refused)."""
    t = ggml_type.upper()
    if ggml_type.lower() not in QUANTIZE_TYPES:
        raise ValueError(f"quantize_model: type {ggml_type!r} is not supported; supported: {', '.join(QUANTIZE_TYPES)}")
    adapted = [name for name, m in model.named_modules() if hasattr(m, "lora_A")]
    if adapted:
        raise ValueError(f"quantize_model: the model already has LoRA layers ({adapted[0]}, ...); quantize the base "
                         "first, then add the adapter")
    blocks_of = {}
    for module, chosen in quantize_plan(model, t).items():
        w = module.weight.data.T if type(module) is Conv1D else module.weight.data                    # [out, in]
        blocks_of[id(module.weight)] = (quantize(w, chosen), chosen)
    return use_blocks(model, blocks_of)


def quantize_plan(model, ggml_type):
    """{module: the ggml type its weight gets} for each Linear, GPT-2 Conv1D and Embedding of a float model
    (the first of modules sharing a weight, as a tied head): ggml_type (upper case) where the rows are whole
    blocks of it, else llama.cpp's fallback (q4_k -> q5_0) where that fits; a weight neither fits is left out
    (it stays float)."""
    plan, seen = {}, set()
    for module in model.modules():
        if type(module) in (Linear, Conv1D, Embedding) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            k = module.weight.shape[0 if type(module) is Conv1D else 1]                             # in_features
            chosen = ggml_type if k % BLOCK_SIZES[ggml_type] == 0 else _FALLBACK.get(ggml_type)
            if chosen is not None and k % BLOCK_SIZES[chosen] == 0:
                plan[module] = chosen
    return plan


def use_blocks(model, blocks_of):
    """Replace each Linear, Conv1D and Embedding whose weight Parameter p has blocks_of[id(p)] =
    (blocks [out, row bytes], ggml type) by a QuantizedLinear / QuantizedEmbedding holding those blocks
    (so a tied head shares its embedding's), keeping the bias and the dtype; returns the model."""
    for name, module in list(model.named_modules()):
        if type(module) not in (Linear, Conv1D, Embedding) or id(module.weight) not in blocks_of:
            continue
        blocks, ggml_type = blocks_of[id(module.weight)]
        dtype = module.weight.dtype
        if type(module) is Embedding:
            replacement = QuantizedEmbedding(blocks, ggml_type, dtype)
        else:
            replacement = QuantizedLinear(blocks, ggml_type, None if module.bias is None else module.bias.data, dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    return model


__all__ = ["QuantizedLinear", "QuantizedEmbedding", "QuantizedWeight", "QuantLinear", "quantize", "quantize_model",
           "quantize_plan", "use_blocks", "check_float_weights",
           "QUANTIZE_TYPES", "QUANT_TYPES"]
