"""`get_peft_model` and `LoraModel`: inject LoRA layers into a model as PEFT 0.21 does.

`LoraModel` wraps the user's model as `base_model.model`, so parameter names read like
PEFT's (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight`).
Which modules an adapter targets is lora_np.lora.targets' (PEFT's matching rules).

Adapter names are checked (`check_adapter_name`) wherever one comes in. Before any LoRA
matrix is allocated, `plan_adapter` lists the layers and ranks and `check_adapter_memory`
refuses an adapter whose matrices would not fit in the memory available, naming r and
the bytes it needs (a ValueError, never a MemoryError after minutes of work).
"""
import contextlib
import math
import os
import warnings

import numpy as np

from ..nn import Conv1D, Linear as BaseLinear, Module
from ..options import Float, Int
from .config import LoraConfig, check_adapter_name
from .layer import LoraLayer, ModulesToSaveWrapper, lora_layer_for
from .targets import lora_shapes, plan_adapter, resolve_config

__all__ = ["LoraModel", "get_peft_model", "check_adapter_memory"]

# add_weighted_adapter's numbers: a weight may be any finite number, svd_clamp is a quantile
_WEIGHT = Float()
_SVD_RANK = Int(min=1, none_ok=True)
_SVD_CLAMP = Float(min=0, max=1, none_ok=True)


def get_peft_model(model, config, adapter_name="default"):
    """Wrap `model` with LoRA adapters as described by `config` (a LoraConfig)."""
    return LoraModel(model, config, adapter_name)


class _BaseModel(Module):
    """Holds the adapted model as `.model`, as PEFT's tuner does."""

    def __init__(self, model):
        super().__init__()
        self.model = model


class LoraModel(Module):
    """A model with LoRA layers injected; forward is the wrapped model's forward."""

    def __init__(self, model, config, adapter_name="default"):
        super().__init__()
        check_adapter_name(adapter_name, "get_peft_model: adapter_name")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"get_peft_model: config must be a LoraConfig, got {type(config).__name__}")
        self.base_model = _BaseModel(model)
        self.peft_config = {}
        self.active_adapters = [adapter_name]
        self.inject_adapter(config, adapter_name)
        self._mark_only_adapters_as_trainable()

    @property
    def model(self):
        return self.base_model.model

    def __getattr__(self, name):
        base = self.__dict__.get("base_model")
        if base is None:
            raise AttributeError(name)
        return getattr(base.model, name)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    @property
    def active_adapter(self):
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    def get_base_model(self):
        return self.model

    # -- injection ------------------------------------------------------------------------
    def _tuner_modules(self):
        """(path, module) of every LoRA layer and modules_to_save wrapper, paths relative to the model."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, (LoraLayer, ModulesToSaveWrapper))]

    def inject_adapter(self, config, adapter_name, init_lora_weights=None):
        """Add adapter `adapter_name` to every module `config` targets (PEFT's inject_adapter)."""
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        model = self.model
        config = resolve_config(config, model)
        plan = plan_adapter(config, model)
        check_adapter_memory(plan, config)
        self.peft_config[adapter_name] = config
        for key, module, r, alpha in plan:
            base = module.base_layer if isinstance(module, LoraLayer) else module
            _match_fan_in_fan_out(config, base)
            try:
                if isinstance(module, LoraLayer):
                    module.update_layer(adapter_name, r, alpha, config, init_lora_weights)
                else:
                    new = lora_layer_for(module, adapter_name, r, alpha, config, key, init_lora_weights)
                    parent, name = _parent(model, key)
                    _replace_child(parent, name, new)
                    new.set_adapter(self.active_adapters, trainable=not config.inference_mode)
            except Exception:
                self._drop_adapter(adapter_name)
                raise
        for key in list(self._modules_to_save_keys(config)):
            parent, name = _parent(model, key)
            target = parent._modules[name]
            if isinstance(target, ModulesToSaveWrapper):
                target.update(adapter_name)
            else:
                _replace_child(parent, name, ModulesToSaveWrapper(target, adapter_name))
        return [key for key, *_ in plan]

    def _modules_to_save_keys(self, config):
        if not config.modules_to_save:
            return []
        keys, nested = [], []
        for key, module in self.model.named_modules():
            if not key or any(key.startswith(p + ".") for p in nested):
                continue
            if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
                nested.append(key)
            if any(key.endswith(m) for m in config.modules_to_save):
                if isinstance(module, LoraLayer):
                    raise ValueError(f"modules_to_save: {key!r} is also a LoRA target")
                keys.append(key)
        return keys

    def _mark_only_adapters_as_trainable(self):
        self.model.requires_grad_(False)
        trainable = not any(self.peft_config[a].inference_mode for a in self.active_adapters if a in self.peft_config)
        for _, module in self._tuner_modules():
            module.set_adapter(self.active_adapters, trainable=trainable)
        for name in self.active_adapters:
            bias = self.peft_config[name].bias if name in self.peft_config else "none"
            if bias == "all":
                for n, p in self.model.named_parameters():
                    if n == "bias" or n.endswith(".bias"):
                        p.requires_grad = True
            elif bias == "lora_only":
                for _, module in self._tuner_modules():
                    if isinstance(module, LoraLayer) and module.bias is not None:
                        module.bias.requires_grad = True

    # -- adapters -------------------------------------------------------------------------
    def add_adapter(self, adapter_name, config):
        """Add another adapter; it is not active until set_adapter names it."""
        self.inject_adapter(config, adapter_name)
        self._mark_only_adapters_as_trainable()

    def set_adapter(self, adapter_name):
        """Activate one adapter (a name) or several (a list of names); the others are frozen."""
        self.active_adapters = self._known(_adapter_names(adapter_name, "set_adapter"), "set_adapter")
        self._mark_only_adapters_as_trainable()

    def _known(self, names, where):
        """`names` if every one is an adapter of this model, else ValueError listing the unknown ones."""
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"{where}: unknown adapter(s) {unknown}; known: {list(self.peft_config)}")
        return names

    def delete_adapter(self, adapter_name):
        check_adapter_name(adapter_name, "delete_adapter")
        if adapter_name not in self.peft_config:
            raise ValueError(f"delete_adapter: unknown adapter {adapter_name!r}; known: {list(self.peft_config)}")
        for _, module in self._tuner_modules():
            if isinstance(module, LoraLayer) and adapter_name in module.merged_adapters:
                raise ValueError(f"delete_adapter: adapter {adapter_name!r} is merged; unmerge first")
        self._drop_adapter(adapter_name)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
        self._mark_only_adapters_as_trainable()

    def _drop_adapter(self, adapter_name):
        self.peft_config.pop(adapter_name, None)
        for _, module in self._tuner_modules():
            module.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the context the model computes as its base model (merged adapters are unmerged)."""
        modules = [m for _, m in self._tuner_modules()]
        for m in modules:
            m.disable_adapters = True
        try:
            yield self
        finally:
            for m in modules:
                m.disable_adapters = False

    # -- merging --------------------------------------------------------------------------
    def merge_adapter(self, adapter_names=None, safe_merge=False):
        """Merge adapters (default: the active ones) into the base weights. Explicit only."""
        if adapter_names is not None:
            adapter_names = self._known(_adapter_names(adapter_names, "merge_adapter: adapter_names", single=False),
                                        "merge_adapter")
        for _, module in self._tuner_modules():
            if isinstance(module, LoraLayer):
                module.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self):
        for _, module in self._tuner_modules():
            if isinstance(module, LoraLayer):
                module.unmerge()

    merge = merge_adapter
    unmerge = unmerge_adapter

    def merge_and_unload(self, safe_merge=False, adapter_names=None):
        """Merge, then return the base model with every LoRA layer replaced by its base layer."""
        self.merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)
        return self.unload()

    def unload(self):
        """The base model with every LoRA layer replaced by its (unmerged-as-is) base layer and every
        modules_to_save wrapper by its active copy."""
        model = self.model
        for key, module in self._tuner_modules():
            parent, name = _parent(model, key)
            if isinstance(module, LoraLayer):
                _replace_child(parent, name, module.base_layer)
            else:
                active = module.active_adapters
                _replace_child(parent, name, module.modules_to_save[active[0]] if active else module.original_module)
        return model

    # -- combining adapters ---------------------------------------------------------------
    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None,
                             svd_clamp=None, svd_full_matrices=True):
        """A new adapter combining `adapters` with `weights` (PEFT's "linear", "cat", "svd")."""
        check_adapter_name(adapter_name, "add_weighted_adapter")
        if adapter_name in self.peft_config:
            return
        adapters = self._known(_adapter_names(adapters, "add_weighted_adapter: adapters", single=False),
                               "add_weighted_adapter")
        if not isinstance(weights, (list, tuple)) or len(adapters) != len(weights):
            raise ValueError(f"add_weighted_adapter: {len(adapters)} adapters need a list of as many weights, "
                             f"got {weights!r}")
        weights = [_WEIGHT.check(f"add_weighted_adapter: weights[{i}]", w) for i, w in enumerate(weights)]
        svd_rank = _SVD_RANK.check("add_weighted_adapter: svd_rank", svd_rank)
        svd_clamp = _SVD_CLAMP.check("add_weighted_adapter: svd_clamp", svd_clamp)
        for a in adapters:
            if self.peft_config[a].use_dora:
                raise NotImplementedError(f"add_weighted_adapter: adapter {a!r} uses DoRA, which lora_np cannot combine")
        wrappers = [m for _, m in self._tuner_modules() if isinstance(m, ModulesToSaveWrapper)]
        if any(sum(a in w.modules_to_save for a in adapters) > 1 for w in wrappers):
            raise ValueError("add_weighted_adapter: adapters target the same module with modules_to_save")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        configs = [self.peft_config[a] for a in adapters]
        ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
        if combination_type == "linear":
            if len(set(ranks)) != 1:
                raise ValueError(f"add_weighted_adapter: 'linear' needs adapters of one rank, got {ranks}")
            new_rank = ranks[0]
        elif combination_type == "cat":
            new_rank = sum(ranks)
        elif combination_type == "svd":
            new_rank = svd_rank or max(ranks)
        else:
            raise ValueError(f"add_weighted_adapter: combination_type {combination_type!r} is not one of "
                             "'linear', 'cat', 'svd'")
        kinds = {type(c.target_modules) for c in configs}
        if len(kinds) > 1:
            raise ValueError("add_weighted_adapter: adapters mix list and regex target_modules")
        if kinds == {str}:
            targets = "|".join(f"({c.target_modules})" for c in configs)
        else:
            targets = set().union(*(c.target_modules for c in configs))
        new_config = configs[0].replace(r=new_rank, lora_alpha=new_rank, target_modules=targets,
                                        rank_pattern={}, alpha_pattern={})
        self.inject_adapter(new_config, adapter_name, init_lora_weights=True)
        for _, layer in self._tuner_modules():
            if isinstance(layer, LoraLayer) and adapter_name in layer.r:
                self._combine_into(layer, adapters, weights, adapter_name, combination_type, new_rank,
                                   svd_clamp, svd_full_matrices)
        self._mark_only_adapters_as_trainable()

    @staticmethod
    def _combine_into(layer, adapters, weights, adapter_name, combination_type, new_rank, svd_clamp,
                      svd_full_matrices):
        present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
        if not present:
            raise ValueError(f"add_weighted_adapter: none of {adapters} is in this layer")
        new_A, new_B = layer.lora_factors(adapter_name)  # views of the new adapter's parameters
        new_A[...] = 0
        new_B[...] = 0
        if combination_type == "cat":
            rows = 0
            for a, w in present:
                lora_A, lora_B = layer.lora_factors(a)
                k = lora_A.shape[0]
                new_A[rows:rows + k] = lora_A * w * layer.scaling[a]
                new_B[:, rows:rows + k] = lora_B
                rows += k
        elif combination_type == "linear":
            # sign goes to A; √|w·s| to both factors
            A_sum, B_sum = 0, 0
            for a, w in present:
                lora_A, lora_B = layer.lora_factors(a)
                ws = w * layer.scaling[a]
                A_sum = A_sum + lora_A * (np.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
                B_sum = B_sum + lora_B * np.sqrt(abs(ws))
            new_A[...], new_B[...] = A_sum, B_sum
        else:
            delta = sum(layer.get_delta_weight(a) * w for a, w in present)                # base layout
            if layer.fan_in_fan_out:
                delta = delta.T                                                           # (out, in)
            U, S, Vh = np.linalg.svd(delta, full_matrices=svd_full_matrices)
            U = U[:, :new_rank] * S[:new_rank]                                            # (out, r)
            Vh = Vh[:new_rank]                                                            # (r, in)
            if svd_clamp is not None:
                hi = np.quantile(np.concatenate([U.ravel(), Vh.ravel()]), svd_clamp)
                U, Vh = np.clip(U, -hi, hi), np.clip(Vh, -hi, hi)
            new_A[:Vh.shape[0]], new_B[:, :U.shape[1]] = Vh, U

    # -- counting -------------------------------------------------------------------------
    def get_nb_trainable_parameters(self):
        return self.num_parameters(only_trainable=True), self.num_parameters()

    def print_trainable_parameters(self):
        """PEFT's line: `trainable params: 460,800 || all params: ... || trainable%: 0.3414`."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- PEFT files -------------------------------------------------------------------------
    def save_pretrained(self, save_directory, selected_adapters=None):
        from .peft_io import save_adapter

        names = list(self.peft_config) if selected_adapters is None else self._known(
            _adapter_names(selected_adapters, "save_pretrained: selected_adapters", single=False), "save_pretrained")
        for name in names:
            save_adapter(self, save_directory, name)

    def load_adapter(self, directory, adapter_name, is_trainable=False):
        from .peft_io import load_adapter

        load_adapter(self, directory, adapter_name, is_trainable)

    @classmethod
    def from_pretrained(cls, model, directory, adapter_name="default", is_trainable=False):
        """Load a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) onto `model`."""
        from .peft_io import from_pretrained

        return from_pretrained(cls, model, directory, adapter_name, is_trainable)


def _adapter_names(names, where, single=True):
    """A list of checked adapter names from one name (single=True) or a list / tuple of names."""
    if single and isinstance(names, str):
        return [check_adapter_name(names, where)]
    if not isinstance(names, (list, tuple)):
        raise ValueError(f"{where}: expected {'an adapter name or ' if single else ''}a list of adapter names, "
                         f"got {type(names).__name__} {names!r}")
    return [check_adapter_name(n, where) for n in names]


# -- checking an adapter's memory before allocating it ----------------------------------------
def available_memory():
    """Bytes a new allocation can get: Linux's MemAvailable (else physical memory), capped by
    the cgroup limit a container may set (v2 memory.max, v1 memory.limit_in_bytes, less usage)."""
    free = _meminfo_available()
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None:
            free = max(limit - usage, 0) if free is None else min(free, max(limit - usage, 0))
    return free


def _meminfo_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _read_int(path):
    """The integer in a one-line file; None when absent, unreadable or not a number ("max")."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def check_adapter_memory(plan, config, limit=None):
    """ValueError naming r and the bytes needed when the planned LoRA factors (plus DoRA's
    magnitudes and a float64 working copy of the largest factor, which initialisation makes)
    need more than `limit` bytes (default: the memory available now)."""
    total = largest = 0
    for _, module, r, _ in plan:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        shape_A, shape_B = lora_shapes(module, r).values()
        sizes = [math.prod(shape_A), math.prod(shape_B)]
        magnitude = shape_B[0] if config.use_dora else 0                                  # m (out,)
        total += (sum(sizes) + magnitude) * base.weight.dtype.itemsize
        largest = max(largest, max(sizes) * 8)
    needed = total + largest
    limit = available_memory() if limit is None else limit
    if limit is not None and needed > limit:
        ranks = sorted({r for _, _, r, _ in plan})
        raise ValueError(f"LoraConfig.r: an adapter of rank {ranks[0] if len(ranks) == 1 else ranks} on "
                         f"{len(plan)} layers needs {needed:,d} bytes, more than the {limit:,d} bytes of memory "
                         "available; choose a smaller r (or rank_pattern)")


def _match_fan_in_fan_out(config, base):
    """PEFT's dispatch: Conv1D needs fan_in_fan_out=True, Linear False; it fixes the config and warns."""
    if isinstance(base, Conv1D) and not config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. "
                      "Setting fan_in_fan_out to True.")
        config.fan_in_fan_out = True
    elif isinstance(base, BaseLinear) and config.fan_in_fan_out:
        warnings.warn("fan_in_fan_out is set to True but the target module is `Linear`. "
                      "Setting fan_in_fan_out to False.")
        config.fan_in_fan_out = False


def _parent(model, key):
    parent_key, _, name = key.rpartition(".")
    return model.get_submodule(parent_key), name


def _replace_child(parent, name, new):
    parent._modules[name] = new  # keeps the registration order (setattr would move it last)
    object.__setattr__(parent, name, new)
