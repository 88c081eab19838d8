"""Modules in the style of torch.nn, with Hugging Face's module names.

A `Module` registers the `Parameter`s and child `Module`s assigned to it as
attributes, so `named_parameters()` yields dotted names such as
`model.layers.0.self_attn.q_proj.weight` that line up with checkpoints and with
PEFT's adapter keys. The layers here are the generic ones; each model family's attention,
MLP and block live with its config in lora_np/models/.
"""
import math
from collections import OrderedDict
from functools import partial

import numpy as np

from . import functional as F
from .functional.attention import check_sliding_window_softcap
from .tensor import DEFAULT_DTYPE, Tensor

__all__ = [
    "Parameter", "Module", "ModuleList", "ModuleDict", "ParameterDict", "Linear", "Conv1D", "Embedding", "LayerNorm", "RMSNorm",
    "Dropout", "skip_init", "KVCache", "ACTIVATIONS", "activation", "attend", "check_dropout_p",
]


class Parameter(Tensor):
    """A Tensor that a Module registers; requires grad unless told otherwise."""

    __slots__ = ()

    def __init__(self, data, requires_grad=True, dtype=None):
        super().__init__(data, requires_grad=requires_grad, dtype=dtype)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"


def _rng():
    return F.default_generator()


class Module:
    """Base class: attribute assignment registers Parameters and Modules, in order."""

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        params = self.__dict__.get("_parameters")
        if params is None:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() before assigning {name!r}")
        params.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    # -- traversal ----------------------------------------------------------------------
    def named_children(self):
        return iter(self._modules.items())

    def children(self):
        return iter(self._modules.values())

    def named_modules(self, prefix=""):
        stack = [(prefix, self)]
        seen = set()
        while stack:  # iterative, in registration order
            name, mod = stack.pop()
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            yield name, mod
            for child_name, child in reversed(list(mod._modules.items())):
                stack.append((f"{name}.{child_name}" if name else child_name, child))

    def modules(self):
        return (m for _, m in self.named_modules())

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        seen = set()
        mods = self.named_modules(prefix) if recurse else [(prefix, self)]
        for mod_name, mod in mods:
            for name, p in mod._parameters.items():
                if remove_duplicate:
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self, recurse=True):
        return (p for _, p in self.named_parameters(recurse=recurse))

    def get_submodule(self, target):
        mod = self
        for part in target.split(".") if target else []:
            if part not in mod._modules:
                raise AttributeError(f"{type(mod).__name__} has no submodule {part!r} (looking for {target!r})")
            mod = mod._modules[part]
        return mod

    # -- state --------------------------------------------------------------------------
    def state_dict(self):
        """name -> ndarray for every parameter (tied parameters appear under each name)."""
        return OrderedDict((n, p.data) for n, p in self.named_parameters(remove_duplicate=False))

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into parameters. Returns (missing_keys, unexpected_keys);
        with strict=True either being non-empty raises KeyError listing them."""
        own = OrderedDict(self.named_parameters(remove_duplicate=False))
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for k, p in own.items():
            if k in state_dict:
                arr = np.asarray(state_dict[k])
                if arr.shape != p.shape:
                    raise ValueError(f"load_state_dict: {k}: checkpoint shape {arr.shape} != model shape {p.shape}")
                p.data = np.array(arr, dtype=p.dtype, copy=True)
        return missing, unexpected

    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self):
        return self.train(False)

    def requires_grad_(self, requires_grad=True):
        for p in self.parameters():
            p.requires_grad = requires_grad
        return self

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, dtype):
        """Convert every parameter to `dtype` in place (float32 or float64)."""
        dtype = np.dtype(dtype)
        for p in self.parameters():
            if p.dtype != dtype and p.dtype.kind == "f":
                p.data = p.data.astype(dtype)
                if p.grad is not None:
                    p.grad = p.grad.astype(dtype)
        return self

    def num_parameters(self, only_trainable=False):
        """Elements of the parameters (the trainable ones only, if asked); a frozen weight kept in quantized
        blocks (lora_np.quant, `weight_blocks`) counts its float shape's elements, a tied head's blocks once."""
        n = sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)
        if not only_trainable:
            n += sum(math.prod(shape) for shape in {id(m.weight_blocks): m.weight.shape for m in self.modules()
                                                    if hasattr(m, "weight_blocks")}.values())
        return int(n)

    def extra_repr(self):
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, mod in self._modules.items():
            child = repr(mod).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child}")
        return "\n".join(lines) + (")" if len(lines) == 1 else "\n)")


class ModuleList(Module):
    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        setattr(self, str(len(self._modules)), module)
        return self

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __setitem__(self, i, module):
        setattr(self, str(i % len(self)), module)

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())


class ModuleDict(Module):
    """Modules keyed by name (PEFT keeps one LoRA sub-layer per adapter name in these)."""

    def __init__(self, modules=None):
        super().__init__()
        for k, m in (modules or {}).items():
            self[k] = m

    def __getitem__(self, key):
        return self._modules[key]

    def __setitem__(self, key, module):
        setattr(self, key, module)

    def __delitem__(self, key):
        delattr(self, key)

    def __contains__(self, key):
        return key in self._modules

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def keys(self):
        return self._modules.keys()

    def items(self):
        return self._modules.items()

    def values(self):
        return self._modules.values()


class ParameterDict(Module):
    """Parameters keyed by name (PEFT's lora_embedding_A / lora_embedding_B / magnitude vectors)."""

    def __getitem__(self, key):
        return self._parameters[key]

    def __setitem__(self, key, param):
        if not isinstance(param, Parameter):
            raise TypeError(f"ParameterDict: {key!r} must be a Parameter, got {type(param).__name__}")
        setattr(self, key, param)

    def __delitem__(self, key):
        delattr(self, key)

    def __contains__(self, key):
        return key in self._parameters

    def __len__(self):
        return len(self._parameters)

    def __iter__(self):
        return iter(self._parameters)

    def keys(self):
        return self._parameters.keys()

    def items(self):
        return self._parameters.items()

    def values(self):
        return self._parameters.values()


# -- layers --------------------------------------------------------------------------------
_INIT = [True]


class skip_init:
    """Inside, new layers get placeholder parameters that take no memory (read-only
    broadcast views of one element) instead of random values: for loaders that replace
    every weight, so a config that promises more than the file holds costs nothing."""

    def __enter__(self):
        self._prev, _INIT[0] = _INIT[0], False

    def __exit__(self, *exc):
        _INIT[0] = self._prev


def _placeholder(shape, dtype):
    return np.broadcast_to(np.zeros((), dtype), shape)


def _drawn(shape, dtype, draw):
    """An array of `dtype` filled by draw(n) (float64 draws, cast) a chunk at a time: the values of one
    draw(size) call, without its float64 temporary of the whole shape (a big embedding's 1.2 GB)."""
    out = np.empty(shape, dtype)
    flat = out.reshape(-1)
    chunk = 1 << 20
    for i in range(0, flat.size, chunk):
        flat[i:i + chunk] = draw(min(chunk, flat.size - i))
    return out


def _uniform(shape, bound, dtype):
    if not _INIT[0]:
        return _placeholder(shape, dtype)
    rng = _rng()
    return _drawn(shape, dtype, lambda n: rng.uniform(-bound, bound, size=n))


def _normal(shape, std, dtype):
    if not _INIT[0]:
        return _placeholder(shape, dtype)
    rng = _rng()
    return _drawn(shape, dtype, lambda n: rng.standard_normal(n) * std)


def _full(shape, value, dtype):
    if not _INIT[0]:
        return _placeholder(shape, dtype)
    return np.full(shape, value, dtype)


class Linear(Module):
    """y = x Wᵀ + b with weight [out_features, in_features] (torch's init)."""

    def __init__(self, in_features, out_features, bias=True, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1 / math.sqrt(in_features) if in_features else 0
        self.weight = Parameter(_uniform((out_features, in_features), bound, dtype))
        self.bias = Parameter(_uniform((out_features,), bound, dtype)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Conv1D(Module):
    """GPT-2's `Conv1D(nf, nx)`: weight stored [in (nx), out (nf)], y = x W + b."""

    def __init__(self, nf, nx, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = Parameter(_normal((nx, nf), 0.02, dtype))
        self.bias = Parameter(_full(nf, 0, dtype))

    @property
    def in_features(self):
        return self.nx

    @property
    def out_features(self):
        return self.nf

    def forward(self, x):
        return F.linear(x, F.permute(self.weight, (1, 0)), self.bias)

    def extra_repr(self):
        return f"nf={self.nf}, nx={self.nx}"


class Embedding(Module):
    """torch.nn.Embedding: weight [num_embeddings, embedding_dim] ~ N(0, 1); padding_idx (as the model's
    config.pad_token_id gives it to transformers' embed_tokens): that row starts at zero and takes no
    gradient, in this layer and in a LoRA adapter on it (PEFT's lora.Embedding passes it on)."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = F.check_padding_idx(padding_idx, num_embeddings, "Embedding: padding_idx")
        self.weight = Parameter(_normal((num_embeddings, embedding_dim), 1.0, dtype))
        if self.padding_idx is not None and _INIT[0]:  # (a model being loaded draws no weights)
            self.weight.data[self.padding_idx] = 0

    def forward(self, input_ids):
        return F.embedding(input_ids, self.weight, self.padding_idx)

    def extra_repr(self):
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}"


class LayerNorm(Module):
    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.weight = Parameter(_full(self.normalized_shape, 1, dtype)) if elementwise_affine else None
        self.bias = Parameter(_full(self.normalized_shape, 0, dtype)) if elementwise_affine and bias else None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(Module):
    """transformers' LlamaRMSNorm: x / sqrt(mean(x²) + eps) · weight."""

    def __init__(self, hidden_size, eps=1e-6, dtype=DEFAULT_DTYPE):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(_full(hidden_size, 1, dtype))

    def forward(self, x):
        return F.rms_norm(x, (self.weight.shape[0],), self.weight, self.eps)


class Dropout(Module):
    def __init__(self, p=0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


# transformers' ACT2FN names -> lora_np ops (gelu_new and gelu_pytorch_tanh are one function, the tanh form).
ACTIVATIONS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "tanh": F.tanh, "sigmoid": F.sigmoid,
    "gelu": partial(F.gelu, approximate="none"),
    "gelu_new": partial(F.gelu, approximate="tanh"), "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
}


def activation(name, where="activation"):
    """The op for a transformers activation name; NotImplementedError naming `where` for others."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise NotImplementedError(f"{where} {name!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


class KVCache:
    """Keys and values of earlier positions, per layer, for incremental decoding (no graph). Every position
    is kept, also on sliding-window layers: the window is attention's (the keys outside it are skipped)."""

    def __init__(self):
        self.keys, self.values = {}, {}

    def update(self, layer_idx, k, v):
        """Append k, v (B, Hkv, T, D) arrays; return the full (B, Hkv, S, D) arrays."""
        if layer_idx in self.keys:
            k = np.concatenate([self.keys[layer_idx], k], axis=2)
            v = np.concatenate([self.values[layer_idx], v], axis=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def seq_len(self):
        return next(iter(self.keys.values())).shape[2] if self.keys else 0


def attend(q, k, v, cache, layer_idx, cos, sin, attn_mask, scale=None, dropout=0.0, sliding_window=None,
           softcap=None):
    """The tail every family's attention layer shares: RoPE, cache, causal SDPA (scale None: 1/sqrt(D)); with
    dropout > 0 (training) the attention weights are dropped out, on the unfused path.
    `sliding_window` W (None: none): each query sees the last W positions, itself included (Mistral, Qwen2,
    Gemma's sliding layers; the cache keeps every position, the window is the mask's); `softcap` c (None:
    none): scores c·tanh(s/c) before the mask (Gemma 2's attn_logit_softcapping). See
    F.scaled_dot_product_attention. cos/sin (T, rd) with rd < D rotate the first rd dims only (partial rotary).
    q (B,Hq,T,D), k/v (B,Hkv,T,D)."""
    if cos is not None:
        q = F.rotary_embedding(q, cos, sin)
        k = F.rotary_embedding(k, cos, sin)
    if cache is not None:
        kd, vd = cache.update(layer_idx, k.data, v.data)
        k, v = Tensor(kd), Tensor(vd)
    if dropout:
        return _attention_with_dropout(q, k, v, attn_mask, scale, dropout, sliding_window, softcap)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=True, scale=scale,
                                          sliding_window=sliding_window, softcap=softcap)


def check_dropout_p(where, p):
    """p, after checking that it is a dropout probability: ValueError naming `where` if not."""
    if not 0 <= p < 1:
        raise ValueError(f"{where}: dropout must be in [0, 1), got {p}")
    return p


def _attention_with_dropout(q, k, v, attn_mask, scale, p, sliding_window=None, softcap=None):
    """Causal attention, dropout(p) on the weights, as transformers' eager attention in training (soft cap
    and sliding window as in attend). q (B,Hq,T,D), k/v (B,Hkv,S,D); the causal mask is aligned to the
    bottom right, as in SDPA."""
    sliding_window, softcap = check_sliding_window_softcap("attention", sliding_window, softcap)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv != Hq:  # each key/value head serves Hq // Hkv consecutive query heads
        k = F.reshape(F.stack([k] * (Hq // Hkv), dim=2), (B, Hq, S, D))
        v = F.reshape(F.stack([v] * (Hq // Hkv), dim=2), (B, Hq, S, D))
    scores = F.mul(F.matmul(q, F.transpose(k, 2, 3)), 1.0 / math.sqrt(D) if scale is None else scale)  # (B,Hq,T,S)
    if softcap is not None:
        scores = F.mul(F.tanh(F.mul(scores, 1.0 / softcap)), softcap)
    position = np.arange(T)[:, None] + (S - T)                                                        # (T, 1)
    seen = np.arange(S)[None, :] <= position                                                          # (T, S)
    if sliding_window is not None:
        seen &= np.arange(S)[None, :] > position - sliding_window
    bias = np.where(seen, 0.0, -np.inf).astype(q.dtype)
    if attn_mask is not None:
        m = attn_mask.data if isinstance(attn_mask, Tensor) else np.asarray(attn_mask)
        bias = bias + (np.where(m, 0.0, -np.inf).astype(q.dtype) if m.dtype == np.bool_ else m.astype(q.dtype))
    weights = F.dropout(F.softmax(F.add(scores, bias), dim=-1), p, training=True)                     # (B,Hq,T,S)
    return F.matmul(weights, v)                                                                       # (B,Hq,T,D)
