"""PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`.

File keys are the LoraModel's parameter names without the adapter name (REFERENCE.md §2):

    base_model.model.<path>.lora_A.weight          <- <path>.lora_A.<adapter>.weight
    base_model.model.<path>.lora_embedding_A       <- <path>.lora_embedding_A.<adapter>
    base_model.model.<path>.lora_magnitude_vector  <- <path>.lora_magnitude_vector.<adapter>.weight
    base_model.model.<path>.weight                 <- <path>.modules_to_save.<adapter>.weight

plus, as PEFT, biases for bias="all" / "lora_only" and the base weights of targeted
embedding layers. A non-default adapter is saved in a sub-folder named after it (a
checked name, and the folder is checked again, symbolic links resolved, to be a direct
child of the target folder). Both files are written atomically (temporary file, then
rename), weights first.

Wherever a folder is read, a llama.cpp LoRA adapter file (`a.gguf`, lora.gguf_io) is read as well:
its config and weights are converted to PEFT's on the way in.

Loading reads the config and the weights file's header first and checks every LoRA
factor's shape there against the rank the config gives its layer, so a config whose r
disagrees with its weights is refused before any LoRA matrix is allocated; a tensor that
is not floating-point or holds NaN / infinity is refused naming the file and key. A write
error that names no file (a full disk) is re-raised naming the file being written.
"""
import json
import os

import numpy as np

from .. import safetensors
from ..fileio import read_json_object, write_atomic
from .config import LoraConfig, check_adapter_name
from .layer import LoraLayer, ModulesToSaveWrapper
from .targets import embedding_is_targeted, lora_shapes, plan_adapter, resolve_config

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "adapter_parameters", "save_adapter", "load_adapter", "from_pretrained"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def adapter_parameters(lora_model, adapter_name):
    """{file key: Parameter} of one adapter, and the set of keys a file may leave out."""
    config = lora_model.peft_config[adapter_name]
    model = lora_model.model
    out, optional = {}, set()
    tuner_paths = []
    for path, module in model.named_modules():
        key = _PREFIX + path
        if isinstance(module, ModulesToSaveWrapper):
            tuner_paths.append(path)
            if adapter_name in module.modules_to_save:
                for n, p in module.modules_to_save[adapter_name].named_parameters():
                    out[f"{key}.{n}"] = p
        if not isinstance(module, LoraLayer):
            continue
        tuner_paths.append(path)
        if adapter_name in module.lora_A:
            out[f"{key}.lora_A.weight"] = module.lora_A[adapter_name].weight
            out[f"{key}.lora_B.weight"] = module.lora_B[adapter_name].weight
        if adapter_name in module.lora_embedding_A:
            out[f"{key}.lora_embedding_A"] = module.lora_embedding_A[adapter_name]
            out[f"{key}.lora_embedding_B"] = module.lora_embedding_B[adapter_name]
        if adapter_name in module.lora_magnitude_vector:
            out[f"{key}.lora_magnitude_vector"] = module.lora_magnitude_vector[adapter_name].weight
        if config.bias == "lora_only" and adapter_name in module.r and module.bias is not None:
            out[f"{key}.base_layer.bias"] = module.bias
    if config.bias == "all":
        for n, p in model.named_parameters():
            inside_tuner = any(n.startswith(t + ".") and not n.startswith(t + ".base_layer.") for t in tuner_paths)
            if (n == "bias" or n.endswith(".bias")) and not inside_tuner:
                out[_PREFIX + n] = p
    if embedding_is_targeted(config, model):
        for path in _embedding_paths(model):
            module = model.get_submodule(path)
            if isinstance(module, LoraLayer) and adapter_name in module.r:
                key = f"{_PREFIX}{path}.base_layer.weight"
                out[key] = module.base_layer.weight
                optional.add(key)
    return out, optional


def _embedding_paths(model):
    """The input embedding (first Embedding-like module) and the output head `lm_head`."""
    from ..nn import Embedding

    paths = []
    for path, module in model.named_modules():
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if isinstance(base, Embedding):
            paths.append(path)
            break
    if "lm_head" in model._modules:
        paths.append("lm_head")
    return paths


def adapter_folder(directory, adapter_name):
    """Where adapter `adapter_name` is saved: `directory` itself for "default", else its
    sub-folder `<directory>/<adapter_name>`."""
    check_adapter_name(adapter_name, "save_pretrained")
    return directory if adapter_name == "default" else os.path.join(directory, adapter_name)


def _check_inside(folder, directory):
    """ValueError unless `folder` (links resolved) is `directory` or one of its direct children."""
    real, top = os.path.realpath(folder), os.path.realpath(directory)
    if real != top and os.path.dirname(real) != top:
        raise ValueError(f"save_pretrained: {folder} resolves to {real}, outside the target folder {top}")


def save_adapter(lora_model, directory, adapter_name):
    if adapter_name not in lora_model.peft_config:
        raise ValueError(f"save_pretrained: unknown adapter {adapter_name!r}; known: {list(lora_model.peft_config)}")
    directory = os.fspath(directory)
    folder = adapter_folder(directory, adapter_name)
    _check_inside(folder, directory)
    os.makedirs(folder, exist_ok=True)
    _check_inside(folder, directory)
    params, _ = adapter_parameters(lora_model, adapter_name)
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    safetensors.save_file({k: p.data for k, p in params.items()}, weights_path, metadata={"format": "pt"})
    config = lora_model.peft_config[adapter_name].to_dict()
    config["inference_mode"] = True
    config_path = os.path.join(folder, CONFIG_NAME)
    write_atomic(config_path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(directory):
    path = os.path.join(os.fspath(directory), CONFIG_NAME)
    try:
        d = read_json_object(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no adapter config (expected {CONFIG_NAME} in {directory})") from None
    return LoraConfig.from_dict(d, source=path), path


def load_adapter(lora_model, directory, adapter_name, is_trainable=False):
    """Add adapter `adapter_name` to `lora_model` from a PEFT folder."""
    check_adapter_name(adapter_name, "load_adapter")
    if adapter_name in lora_model.peft_config:
        raise ValueError(f"load_adapter: adapter {adapter_name!r} already exists; pick another name")
    config, config_path, weights = _checked_config(lora_model.model, directory, is_trainable)
    try:
        lora_model.inject_adapter(config, adapter_name)
    except ValueError as e:
        raise ValueError(f"{config_path}: adapter does not fit this model: {e}") from None
    try:
        _load_weights(lora_model, weights, adapter_name)
    except Exception:
        lora_model._drop_adapter(adapter_name)
        raise
    lora_model._mark_only_adapters_as_trainable()


def from_pretrained(cls, model, directory, adapter_name="default", is_trainable=False):
    check_adapter_name(adapter_name, "from_pretrained")
    config, config_path, weights = _checked_config(model, directory, is_trainable)
    try:
        lora_model = cls(model, config, adapter_name)
    except ValueError as e:
        raise ValueError(f"{config_path}: adapter does not fit this model: {e}") from None
    _load_weights(lora_model, weights, adapter_name)
    return lora_model if is_trainable else lora_model.eval()  # as PEFT: inference loads in eval mode


def _checked_config(model, directory, is_trainable):
    """(config, its path, (weights path, a function giving {file key: array})) of an adapter folder or
    a llama.cpp LoRA .gguf file, its ranks checked against the weights' shapes (for a folder from the
    weights file's header: nothing allocated yet; inject_adapter then checks the memory)."""
    if os.fspath(directory).endswith(".gguf"):
        from .gguf_io import read_gguf_adapter

        config, tensors = read_gguf_adapter(directory, model)
        config_path = weights_path = os.fspath(directory)
        header = {k: {"shape": list(v.shape)} for k, v in tensors.items()}
        weights = (weights_path, lambda: tensors)
    else:
        config, config_path = read_config(directory)
        weights_path = _weights_path(directory)
        header, _ = safetensors.read_header(weights_path)
        weights = (weights_path, lambda: safetensors.load_file(weights_path))
    config = config.replace(inference_mode=not is_trainable)
    try:
        resolved = resolve_config(config, model)
        plan = plan_adapter(resolved, model)
    except ValueError as e:
        raise ValueError(f"{config_path}: adapter does not fit this model: {e}") from None
    for key, module, r, _ in plan:
        for suffix, shape in lora_shapes(module, r).items():
            file_key = f"{_PREFIX}{key}.{suffix}"
            entry = header.get(file_key)
            if entry is not None and tuple(entry["shape"]) != shape:
                raise ValueError(f"{weights_path}: {file_key}: file shape {tuple(entry['shape'])} != model shape "
                                 f"{shape} (r={r} as {config_path} gives it for this layer)")
    return config, config_path, weights


def _weights_path(directory):
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no adapter weights (expected {WEIGHTS_NAME} in {directory})")
    return path


def _load_weights(lora_model, weights, adapter_name):
    path, load = weights
    tensors = load()
    params, optional = adapter_parameters(lora_model, adapter_name)
    missing = [k for k in params if k not in tensors and k not in optional]
    unexpected = [k for k in tensors if k not in params]
    if missing or unexpected:
        raise ValueError(f"{path}: adapter does not fit this model: missing keys {missing}, unexpected keys {unexpected}")
    for key, array in tensors.items():
        p = params[key]
        if array.shape != p.shape:
            raise ValueError(f"{path}: {key}: file shape {tuple(array.shape)} != model shape {tuple(p.shape)}")
        if array.dtype.kind != "f":
            raise ValueError(f"{path}: {key}: dtype {array.dtype} is not a floating-point type")
        if not np.isfinite(array).all():
            raise ValueError(f"{path}: {key}: holds non-finite values (NaN or infinity); the adapter is broken")
    for key, array in tensors.items():
        params[key].data = np.array(array, dtype=params[key].dtype, order="C", copy=True)
