"""Which modules an adapter config targets, as PEFT's tuners_utils decides it.

Target matching follows PEFT's `check_target_module_exists`: a list matches the full
module name or a `.`-separated suffix, a string is a full-match regex, "all-linear" is
every Linear / Conv1D except the output head; `exclude_modules`, `layers_to_transform`
(+ `layers_pattern`), `rank_pattern` / `alpha_pattern` (first `(.*\\.)?(pattern)$` match
wins) and `modules_to_save` as there. `plan_adapter` lists the layers and ranks an adapter
gets, allocating nothing; `lora_shapes` the shapes of their LoRA factors.
"""
import re

from ..nn import Conv1D, Linear as BaseLinear
from ..nn import Embedding as BaseEmbedding
from .config import layers_pattern_regex, modules_to_save_regex, rank_pattern_regex
from .layer import LoraLayer, ModulesToSaveWrapper, check_supported

__all__ = ["resolve_config", "plan_adapter", "lora_shapes", "check_target_module_exists", "get_pattern_key",
           "embedding_is_targeted", "DEFAULT_TARGET_MODULES", "EMBEDDING_LAYER_NAMES"]

# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for the architectures lora_np has; the others
# (phi3, smollm3, olmo2, granite) have no default in PEFT either, which asks for target_modules
DEFAULT_TARGET_MODULES = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
                          "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
                          "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
                          "gemma3_text": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
# modules PEFT treats as embeddings when deciding to save base embedding weights
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
_EXCLUDED = "excluded"


# -- planning an adapter ---------------------------------------------------------------------
def resolve_config(config, model):
    """A copy of `config` with target_modules resolved for `model` (PEFT's default for the
    model type when None, the Linear layers' names for "all-linear")."""
    config = config.replace()
    if config.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGET_MODULES:
            raise ValueError(f"LoraConfig.target_modules is None and model type {model_type!r} has no default; "
                             "set target_modules")
        config.target_modules = set(DEFAULT_TARGET_MODULES[model_type])
    elif isinstance(config.target_modules, str) and config.target_modules.lower() == "all-linear":
        config.target_modules = _all_linear_names(model)
    return config


def plan_adapter(config, model):
    """[(module name, module, r, lora_alpha)] of every module a resolved `config` adapts in
    `model`, allocating nothing; ValueError when it adapts none or an unsupported one."""
    plan, nested = [], []
    for key, module in list(model.named_modules()):
        if not key or any(key.startswith(p + ".") for p in nested):
            continue
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            nested.append(key)
        if isinstance(module, ModulesToSaveWrapper):
            continue
        found = check_target_module_exists(config, key)
        if not found or found == _EXCLUDED:
            continue
        check_supported(module.base_layer if isinstance(module, LoraLayer) else module, key)
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern, key), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern, key), config.lora_alpha)
        plan.append((key, module, r, alpha))
    if not plan:
        looked_for = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
        extra = f" with layers_to_transform={config.layers_to_transform}" if config.layers_to_transform is not None else ""
        excl = f" (excluding {config.exclude_modules})" if config.exclude_modules else ""
        raise ValueError(f"Target modules {looked_for}{extra}{excl} not found in the base model "
                         f"{type(model).__name__}; module names look like "
                         f"{[k for k, _ in list(model.named_modules())[1:6]]}")
    return plan


def lora_shapes(module, r):
    """{suffix: shape} of the LoRA factors an adapter of rank r gives `module` (Linear /
    Conv1D: lora_A.weight (r, in), lora_B.weight (out, r); Embedding: lora_embedding_A
    (r, num_embeddings), lora_embedding_B (dim, r)), as named in adapter files."""
    base = module.base_layer if isinstance(module, LoraLayer) else module
    if isinstance(base, BaseEmbedding):
        return {"lora_embedding_A": (r, base.num_embeddings), "lora_embedding_B": (base.embedding_dim, r)}
    return {"lora_A.weight": (r, base.in_features), "lora_B.weight": (base.out_features, r)}


# -- PEFT's matching rules ------------------------------------------------------------------
def check_target_module_exists(config, key):
    """True if module `key` (its full dotted name) is a LoRA target; _EXCLUDED if explicitly excluded."""
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return _EXCLUDED
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return _EXCLUDED
    if config.modules_to_save and any(re.match(modules_to_save_regex(m), key) for m in config.modules_to_save):
        return _EXCLUDED
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    layers = config.layers_to_transform
    if found and layers is not None and (not isinstance(layers, list) or layers):
        patterns = config.layers_pattern
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)  # the first numbered segment
        else:
            match = None
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(layers_pattern_regex(pattern), key)
                if match:
                    break
        if match is None:
            return False
        idx = int(match.group("idx"))
        return idx == layers if isinstance(layers, int) else idx in layers
    return found


def get_pattern_key(patterns, key):
    """The first pattern p with `(.*\\.)?(p)$` matching `key` (else `key` itself, as PEFT)."""
    for p in patterns:
        if re.match(rank_pattern_regex(p), key):
            return p
    return key


def _all_linear_names(model):
    """Full names of every Linear / Conv1D except the output head ("all-linear")."""
    names, nested = set(), []
    head = getattr(model, "lm_head", None)
    for key, module in model.named_modules():
        if any(key.startswith(p + ".") for p in nested):
            continue
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper)):
            nested.append(key)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if isinstance(base, (BaseLinear, Conv1D)) and module is not head and base is not head:
            names.add(key)
    return names


def embedding_is_targeted(config, model):
    """PEFT's rule for saving base embedding weights along with the adapter."""
    targets = config.target_modules
    if isinstance(targets, str):
        return any(re.fullmatch(targets, k) for k, _ in model.named_modules()
                   if any(re.match(rf"(.*\.)?{e}$", k) for e in EMBEDDING_LAYER_NAMES))
    return bool(targets) and any(e in targets for e in EMBEDDING_LAYER_NAMES)
