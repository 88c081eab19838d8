"""LoRA layers with PEFT 0.21's structure and semantics.

An adapted layer keeps the frozen `base_layer` and, per adapter name, `lora_A` / `lora_B`
(Linear without bias: A [r, in], B [out, r]), `lora_dropout`, `scaling`, and for DoRA a
`lora_magnitude_vector` entry whose `weight` is m [out]. Embedding layers keep
`lora_embedding_A` [r, num_embeddings] and `lora_embedding_B` [dim, r] instead. Parameter
names therefore match PEFT's (`q_proj.lora_A.default.weight`).

Linear (W [out, in]) and GPT-2's Conv1D (W [in, out], `fan_in_fan_out`) share one class:

    y = base_layer(x) + s · (dropout(x) Aᵀ) Bᵀ            s = lora_alpha / r  (or / √r: rsLoRA)

The LoRA branch is one autograd Function (`LoraLinear`) that calls the C core
(`kernels.lora_forward` / `lora_backward`) on 2-D views; the base path is the base
layer's own forward, so a frozen base weight costs no weight-gradient work.
DoRA (Liu et al. 2024, as PEFT computes it): with n = ‖W + s·BA‖ per output row, treated
as a constant in backward (DoRA §4.3),

    y = base(x) + (m/n − 1) ⊙ (x Wᵀ) + (m/n) ⊙ s·(dropout(x) Aᵀ) Bᵀ

where, as in PEFT, x Wᵀ is the running output less the bias when dropout is off (eval or
p = 0), and dropout(x) Wᵀ otherwise. Merged: W' = (m/n)·(W + s·BA), n from the unmerged W.

Merging is explicit (`merge` / `unmerge`), never a side effect of `eval()`.
"""
import copy

import numpy as np

from .. import functional as F
from .. import kernels
from ..nn import Conv1D, Dropout, Module, ModuleDict, Parameter, ParameterDict
from ..nn import Embedding as BaseEmbedding
from ..nn import Linear as BaseLinear
from ..quant import QuantizedLinear
from ..tensor import Function, Tensor, _check_float_dtypes

__all__ = ["LoraLinear", "LoraLayer", "Linear", "Embedding", "DoraLinearLayer", "ModulesToSaveWrapper",
           "lora_layer_for", "check_supported"]


class LoraLinear(Function):
    """y + s · (x Aᵀ) Bᵀ for x (..., in), A (r, in), B (out, r); y (..., out), or None for zeros.

    Forward and backward run in the C core on 2-D C-contiguous views, N = all leading dims."""

    def forward(self, y, x, lora_A, lora_B, scaling, inplace=False):
        """inplace=True adds into y's own array (the caller owns it and reads it nowhere else)."""
        in_features, out_features = lora_A.shape[1], lora_B.shape[0]
        if x.shape[-1] != in_features or lora_B.shape[1] != lora_A.shape[0]:
            raise ValueError(f"lora: input shape {x.shape} does not match lora_A {lora_A.shape} / lora_B {lora_B.shape}")
        self.x_shape, self.scaling = x.shape, scaling
        self.x = np.ascontiguousarray(x.reshape(-1, in_features))                           # (N, in)
        self.lora_A, self.lora_B = np.ascontiguousarray(lora_A), np.ascontiguousarray(lora_B)
        if y is None:
            out = np.zeros((self.x.shape[0], out_features), x.dtype)                        # (N, out)
        elif inplace and y.flags.c_contiguous and y.dtype == x.dtype:
            out = y.reshape(-1, out_features)                                                  # (N, out), a view
        else:
            out = np.array(y.reshape(-1, out_features), dtype=x.dtype, order="C", copy=True)  # (N, out)
        self.t = kernels.lora_forward(out, self.x, self.lora_A, self.lora_B, scaling)        # t = x Aᵀ (N, r)
        return out.reshape(x.shape[:-1] + (out_features,))

    def backward(self, g):
        need_y, need_x, need_A, need_B = self.needs_input_grad
        g2 = np.ascontiguousarray(g.reshape(-1, g.shape[-1]))                                # (N, out)
        dx = np.zeros_like(self.x) if need_x else None
        d_lora_A = np.zeros_like(self.lora_A) if need_A else None
        d_lora_B = np.zeros_like(self.lora_B) if need_B else None
        if need_x or need_A or need_B:
            kernels.lora_backward(dx, d_lora_A, d_lora_B, g2, self.x, self.t, self.lora_A, self.lora_B, self.scaling)
        return (g if need_y else None, None if dx is None else dx.reshape(self.x_shape), d_lora_A, d_lora_B)


def lora_linear(y, x, lora_A, lora_B, scaling, inplace=False):
    """Tensor-level entry to LoraLinear: y + s·(x Aᵀ) Bᵀ (y may be None)."""
    _check_float_dtypes("lora", [t.data for t in (y, x, lora_A, lora_B) if t is not None])
    return LoraLinear.apply(y, x, lora_A, lora_B, scaling=scaling, inplace=inplace)


class DoraLinearLayer(Module):
    """Holds DoRA's magnitude vector m [out] as `weight` (PEFT keeps it in such a module)."""

    def __init__(self, magnitude):
        super().__init__()
        self.weight = Parameter(magnitude)


class LoraLayer(Module):
    """What every adapted layer shares: adapters by name, activation, merge bookkeeping."""

    fan_in_fan_out = False

    def __init__(self, base_layer):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.lora_alpha, self.scaling = {}, {}, {}
        self.lora_dropout = ModuleDict()
        self.lora_A = ModuleDict()
        self.lora_B = ModuleDict()
        self.lora_embedding_A = ParameterDict()
        self.lora_embedding_B = ParameterDict()
        self.lora_magnitude_vector = ModuleDict()
        self.merged_adapters = []
        self.active_adapters = []
        self.disable_adapters = False
        self._weight_norms = {}  # DoRA: n = ‖W + s·BA‖ at merge time, which unmerge needs

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    @property
    def merged(self):
        return bool(self.merged_adapters)

    @property
    def adapter_names(self):
        return list(self.r)

    def adapter_parameters(self, adapter_name):
        """The Parameters of one adapter in this layer."""
        params = []
        for container in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if adapter_name in container:
                params.extend(container[adapter_name].parameters())
        for container in (self.lora_embedding_A, self.lora_embedding_B):
            if adapter_name in container:
                params.append(container[adapter_name])
        return params

    def forward(self, x):
        """base_layer(x) plus each active adapter of this layer (none when disabled or merged)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        result = self.base_layer(x)                                                       # (..., out)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.r:  # an adapter this layer has
                result = self._add_adapter(result, x, name)
        return result

    def _add_adapter(self, result, x, name):  # pragma: no cover - abstract
        raise NotImplementedError

    def set_adapter(self, adapter_names, trainable=True):
        """Make these adapters active; only active adapters' parameters require grad."""
        self.active_adapters = list(adapter_names)
        for name in self.adapter_names:
            for p in self.adapter_parameters(name):
                p.requires_grad = trainable and name in self.active_adapters

    def delete_adapter(self, adapter_name):
        if adapter_name in self.merged_adapters:
            raise ValueError(f"cannot delete adapter {adapter_name!r} while it is merged; unmerge first")
        for container in (self.lora_dropout, self.lora_A, self.lora_B, self.lora_embedding_A,
                          self.lora_embedding_B, self.lora_magnitude_vector):
            if adapter_name in container:
                del container[adapter_name]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(adapter_name, None)
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    # -- the low-rank factors, as the base weight's layout needs them --------------------
    def lora_factors(self, adapter_name):
        """(A [r, in], B [out, r]) arrays such that the update is s·BA (transposed if fan_in_fan_out)."""
        return self.lora_A[adapter_name].weight.data, self.lora_B[adapter_name].weight.data

    def get_delta_weight(self, adapter_name):
        """s·BA in the base weight's layout ([out, in], or [in, out] when fan_in_fan_out)."""
        lora_A, lora_B = self.lora_factors(adapter_name)
        delta = lora_B @ lora_A                                                             # (out, in)
        return (delta.T if self.fan_in_fan_out else delta) * self.scaling[adapter_name]

    # -- merge ----------------------------------------------------------------------------
    def merge(self, safe_merge=False, adapter_names=None):
        """Add the adapters' updates into the base weight (by default: the active adapters).
        safe_merge: merge into a copy and refuse a result that is not finite."""
        if isinstance(self.base_layer, QuantizedLinear):
            raise NotImplementedError(f"merging into a quantized base ({self.base_layer.ggml_type} blocks) is not "
                                      "supported yet; load the model with dequantize=True to merge")
        names = self.active_adapters if adapter_names is None else adapter_names
        weight = self.base_layer.weight
        for name in names:
            if name not in self.r or name in self.merged_adapters:
                continue
            w = weight.data
            own = w.flags.writeable and w.flags.c_contiguous and not safe_merge  # e.g. not a read-only file map
            merged = self._merge_one(w if own else np.array(w, order="C"), name)
            if safe_merge and not np.isfinite(merged).all():
                self._weight_norms.pop(name, None)
                raise ValueError(f"safe_merge: merging adapter {name!r} into {type(self.base_layer).__name__} "
                                 f"weight {weight.shape} gives non-finite values; the adapter seems broken")
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self):
        """Take every merged adapter back out of the base weight, last merged first."""
        weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight.data = self._unmerge_one(weight.data, name)  # merge left it writeable and contiguous
            self._weight_norms.pop(name, None)

    def _merge_one(self, w, name):
        """w + s·BA (in place, by the kernel); DoRA: (m/n)·(w + s·BA) with n from the unmerged weight."""
        lora_A, lora_B = self.lora_factors(name)
        if name in self.lora_magnitude_vector:
            norm = self._weight_norm(self._unmerged_weight(), lora_A, lora_B, self.scaling[name])
            self._weight_norms[name] = norm
            return self._dora_factor(name, norm) * (w + self.get_delta_weight(name))
        kernels.lora_merge(w, np.ascontiguousarray(lora_A), np.ascontiguousarray(lora_B), self.scaling[name],
                           fan_in_fan_out=self.fan_in_fan_out)
        return w

    def _unmerge_one(self, w, name):
        if name in self.lora_magnitude_vector:
            return w / self._dora_factor(name, self._weight_norms[name]) - self.get_delta_weight(name)
        lora_A, lora_B = self.lora_factors(name)
        kernels.lora_merge(w, np.ascontiguousarray(lora_A), np.ascontiguousarray(lora_B), -self.scaling[name],
                           fan_in_fan_out=self.fan_in_fan_out)
        return w

    def _unmerged_weight(self):
        """A copy of the base weight with every merged adapter taken out."""
        w = self.base_layer.weight.data.copy()
        for name in reversed(self.merged_adapters):
            w = self._unmerge_one(w, name)
        return w

    # -- DoRA ------------------------------------------------------------------------------
    def _weight_oi(self, w):
        """The base weight as [out, in] whatever its storage layout."""
        return w.T if self.fan_in_fan_out else w

    def _weight_norm(self, w, lora_A, lora_B, scaling):
        """‖W + s·BA‖ per output row: DoRA's n [out]."""
        return np.linalg.norm(self._weight_oi(w) + scaling * (lora_B @ lora_A), axis=1).astype(w.dtype)

    def _init_dora(self, name):
        """m = n at the start, so DoRA begins as plain LoRA."""
        lora_A, lora_B = self.lora_factors(name)
        self.lora_magnitude_vector[name] = DoraLinearLayer(
            self._weight_norm(self.base_layer.weight.data, lora_A, lora_B, self.scaling[name]))

    def _dora_scale(self, name):
        """m / n as a Tensor [out]; n is computed without a graph: a constant in backward (DoRA §4.3)."""
        lora_A, lora_B = self.lora_factors(name)
        norm = self._weight_norm(self.base_layer.weight.data, lora_A, lora_B, self.scaling[name])
        return self.lora_magnitude_vector[name].weight / Tensor(norm)

    def _dora_factor(self, name, norm):
        factor = self.lora_magnitude_vector[name].weight.data / norm                     # (out,)
        return factor[None, :] if self.fan_in_fan_out else factor[:, None]

    def __repr__(self):
        return "lora." + super().__repr__()  # as PEFT prints its LoRA layers

    def _check_r(self, r):
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"LoRA r must be a positive integer, got {r!r}")


class Linear(LoraLayer):
    """LoRA around a Linear (W [out, in]) or a GPT-2 Conv1D (W [in, out], fan_in_fan_out=True)."""

    def __init__(self, base_layer, adapter_name, r, lora_alpha, config, init_lora_weights=None):
        super().__init__(base_layer)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.active_adapters = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, config, init_lora_weights)

    def update_layer(self, adapter_name, r, lora_alpha, config, init_lora_weights=None):
        self._check_r(r)
        init = config.init_lora_weights if init_lora_weights is None else init_lora_weights
        if init in ("pissa", "olora") and r > min(self.in_features, self.out_features):
            # the decomposition has only min(in, out) components: A, B would not have r rows / columns
            raise ValueError(f"LoraConfig.init_lora_weights={init!r} needs r <= min(in_features, out_features) = "
                             f"{min(self.in_features, self.out_features)}, got r={r}")
        if isinstance(self.base_layer, QuantizedLinear) and (init in ("pissa", "olora") or config.use_dora):
            what = "use_dora=True" if config.use_dora else f"init_lora_weights={init!r}"
            raise NotImplementedError(f"LoraConfig.{what} needs the float weight, and this layer's base is "
                                      f"{self.base_layer.ggml_type} blocks; load the model with dequantize=True")
        dtype = self.base_layer.weight.dtype
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = config.scaling_for(r, lora_alpha)
        self.lora_dropout[adapter_name] = Dropout(config.lora_dropout)
        # nn.Linear's init is kaiming-uniform with a=√5: U(−1/√fan_in, 1/√fan_in), as PEFT's A
        self.lora_A[adapter_name] = BaseLinear(self.in_features, r, bias=False, dtype=dtype)
        self.lora_B[adapter_name] = BaseLinear(r, self.out_features, bias=False, dtype=dtype)
        if init == "pissa":
            self._pissa_init(adapter_name)
        elif init == "olora":
            self._olora_init(adapter_name)
        elif init is not False:
            if init == "gaussian":
                a = self.lora_A[adapter_name].weight
                a.data = F.default_generator().normal(0.0, 1.0 / r, a.shape).astype(dtype)
            self.lora_B[adapter_name].weight.data[...] = 0
        if config.use_dora:
            self._init_dora(adapter_name)
        self.set_adapter(self.active_adapters, trainable=not config.inference_mode)

    def _pissa_init(self, name):
        """PiSSA: A, B from the top-r singular triplets of W (S/s split evenly); W -= s·BA."""
        w = self.base_layer.weight
        r, s = self.r[name], self.scaling[name]
        work = np.promote_types(w.dtype, np.float32)
        U, S, Vh = np.linalg.svd(self._weight_oi(w.data).astype(work), full_matrices=False)  # W = U S Vh
        sqrt_s = np.sqrt(S[:r] / s)                                                       # (r,)
        lora_A = sqrt_s[:, None] * Vh[:r]                                                  # (r, in)
        lora_B = U[:, :r] * sqrt_s[None, :]                                                # (out, r)
        self._set_factors_and_residual(name, lora_A, lora_B, work)

    def _olora_init(self, name):
        """OLoRA: W = QR; B = Q[:, :r], A = R[:r]; W -= s·BA."""
        w = self.base_layer.weight
        r = self.r[name]
        work = np.promote_types(w.dtype, np.float32)
        Q, R = np.linalg.qr(self._weight_oi(w.data).astype(work))                        # (out, k), (k, in)
        self._set_factors_and_residual(name, R[:r], Q[:, :r], work)

    def _set_factors_and_residual(self, name, lora_A, lora_B, work):
        w = self.base_layer.weight
        dtype = w.dtype
        self.lora_A[name].weight.data = np.ascontiguousarray(lora_A, dtype=dtype)
        self.lora_B[name].weight.data = np.ascontiguousarray(lora_B, dtype=dtype)
        residual = self._weight_oi(w.data).astype(work) - self.scaling[name] * (lora_B @ lora_A)   # (out, in)
        w.data = np.ascontiguousarray(self._weight_oi(residual).astype(dtype))

    # -- forward ---------------------------------------------------------------------------
    def _add_adapter(self, result, x, name):
        if name in self.lora_magnitude_vector:
            return self._dora_forward(result, x, name)
        # result is this forward's own array (no backward reads it): add into it
        return lora_linear(result, self.lora_dropout[name](x), self.lora_A[name].weight, self.lora_B[name].weight,
                           self.scaling[name], inplace=True)

    def _dora_forward(self, result, x, name):
        dropout, scaling = self.lora_dropout[name], self.scaling[name]
        lora_A, lora_B = self.lora_A[name].weight, self.lora_B[name].weight
        if dropout.p == 0 or not self.training:
            # PEFT reuses the running output, less the bias, as x Wᵀ
            base = result if self.bias is None else result - self.bias
        else:
            x = dropout(x)
            w = self.base_layer.weight
            base = F.linear(x, F.permute(w, (1, 0)) if self.fan_in_fan_out else w)
        mag_norm_scale = self._dora_scale(name)                                           # (out,)
        lora = lora_linear(None, x, lora_A, lora_B, scaling)                              # (..., out)
        return result + (mag_norm_scale - 1.0) * base + mag_norm_scale * lora

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, fan_in_fan_out={self.fan_in_fan_out}"


class Embedding(LoraLayer):
    """LoRA around an Embedding: y = W[ids] + s · A.T[ids] Bᵀ (no dropout, as in PEFT).
    DoRA (n = ‖Wᵀ + s·BA‖ per embedding dimension): y = (m/n) ⊙ (W[ids] + s · A.T[ids] Bᵀ)."""

    fan_in_fan_out = True  # the update s·(BA)ᵀ is laid out [num_embeddings, dim]

    def __init__(self, base_layer, adapter_name, r, lora_alpha, config, init_lora_weights=None):
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.active_adapters = [adapter_name]
        self.update_layer(adapter_name, r, lora_alpha, config, init_lora_weights)

    def update_layer(self, adapter_name, r, lora_alpha, config, init_lora_weights=None):
        self._check_r(r)
        init = config.init_lora_weights if init_lora_weights is None else init_lora_weights
        dtype = self.base_layer.weight.dtype
        rng = F.default_generator()
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = config.scaling_for(r, lora_alpha)
        self.lora_dropout[adapter_name] = Dropout(config.lora_dropout)
        lora_A = rng.standard_normal((r, self.in_features))                               # (r, num_embeddings)
        lora_B = rng.standard_normal((self.out_features, r))                              # (dim, r)
        if init is not False:  # every other init: A = 0, B ~ N(0, 1) (loralib's Embedding)
            lora_A[...] = 0
        self.lora_embedding_A[adapter_name] = Parameter(lora_A.astype(dtype))
        self.lora_embedding_B[adapter_name] = Parameter(lora_B.astype(dtype))
        if config.use_dora:
            self._init_dora(adapter_name)
        self.set_adapter(self.active_adapters, trainable=not config.inference_mode)

    def lora_factors(self, adapter_name):
        return self.lora_embedding_A[adapter_name].data, self.lora_embedding_B[adapter_name].data

    def _add_adapter(self, result, x, name):
        after_A = F.embedding(x, F.permute(self.lora_embedding_A[name], (1, 0)),          # (..., r)
                              self.base_layer.padding_idx)  # PEFT's _embed passes it on
        lora = F.matmul(after_A, F.permute(self.lora_embedding_B[name], (1, 0)))          # (..., dim)
        if name in self.lora_magnitude_vector:  # DoRA scales the whole running output, as PEFT
            mag_norm_scale = self._dora_scale(name)                                       # (dim,)
            return mag_norm_scale * result + mag_norm_scale * lora * self.scaling[name]
        return result + lora * self.scaling[name]

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}"


class ModulesToSaveWrapper(Module):
    """A fully trained copy of a module per adapter (`modules_to_save`); the original stays frozen."""

    def __init__(self, module_to_save, adapter_name):
        super().__init__()
        self.original_module = module_to_save
        self.modules_to_save = ModuleDict()
        self.active_adapters = []
        self.disable_adapters = False
        self.update(adapter_name)

    def update(self, adapter_name):
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)

    @property
    def adapter_names(self):
        return list(self.modules_to_save.keys())

    def adapter_parameters(self, adapter_name):
        return list(self.modules_to_save[adapter_name].parameters()) if adapter_name in self.modules_to_save else []

    def set_adapter(self, adapter_names, trainable=True):
        active = [n for n in adapter_names if n in self.modules_to_save]
        if len(active) > 1:
            raise ValueError(f"modules_to_save: only one adapter can be active at a time, got {active}")
        self.active_adapters = active
        self.original_module.requires_grad_(False)
        for name in self.adapter_names:
            self.modules_to_save[name].requires_grad_(trainable and name in active)

    def delete_adapter(self, adapter_name):
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def forward(self, *args, **kwargs):
        if self.disable_adapters or not self.active_adapters:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapters[0]](*args, **kwargs)


def lora_layer_for(target, adapter_name, r, lora_alpha, config, key, init_lora_weights=None):
    """A new LoRA layer around `target` (Linear, Conv1D or Embedding); init_lora_weights
    overrides the config's."""
    check_supported(target, key)
    if isinstance(target, BaseEmbedding):
        return Embedding(target, adapter_name, r, lora_alpha, config, init_lora_weights)
    return Linear(target, adapter_name, r, lora_alpha, config, init_lora_weights)


def check_supported(target, key):
    """ValueError unless `target` is a layer LoRA can adapt (Linear, Conv1D, Embedding, QuantizedLinear)."""
    if not isinstance(target, (BaseLinear, Conv1D, BaseEmbedding, QuantizedLinear)):
        raise ValueError(f"target module {key!r} is a {type(target).__name__}; LoRA supports Linear, Conv1D, "
                         "Embedding and QuantizedLinear layers")
