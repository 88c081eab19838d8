"""mlx-lm's LoRA adapter folders (`mlx_lm.lora --train` output), both ways.

    adapter_config.json   {"fine_tune_type": "lora", "num_layers": N,
                           "lora_parameters": {"rank": r, "scale": s, "dropout": p, "keys": [...]}, ...}
    adapters.safetensors  model.layers.<i>.<key>.lora_a  (in, r)   = PEFT's lora_Aᵀ
                          model.layers.<i>.<key>.lora_b  (r, out)  = PEFT's lora_Bᵀ
                          embeddings: lora_a (vocab, r) = lora_embedding_Aᵀ, lora_b (r, dim) = lora_embedding_Bᵀ

mlx-lm (mlx_lm/tuner/utils.py, linear_to_lora_layers) adapts the modules named by `keys` relative to
each of the last `num_layers` decoder layers, and those named by `keys` relative to the model (e.g.
`lm_head`); each computes y = base(x) + s · (dropout(x) @ lora_a) @ lora_b, with one rank and one raw
scale s (not alpha / r) for all. Exporting a PEFT adapter therefore pads lower ranks of a rank_pattern
with zero rows and columns (the same update) and folds a layer scaling other than the common one
(rsLoRA, alpha_pattern) into lora_b; importing gives PEFT r = rank and lora_alpha = s · r (the integer or
float next to it whose alpha / r is s exactly, where there is one), the adapted modules by full name.
mlx-lm's module names are transformers' for the llama-style families, so the keys are the model's own
module paths.
"""
import collections
import json
import os
import re

import numpy as np

from . import safetensors
from .fileio import read_json_object, write_atomic
from .lora.config import LoraConfig
from .lora.layer import LoraLayer
from .lora.peft_io import CONFIG_NAME as PEFT_CONFIG_NAME
from .lora.peft_io import WEIGHTS_NAME as PEFT_WEIGHTS_NAME

__all__ = ["save_mlx_adapter", "read_mlx_adapter", "mlx_to_peft", "MLXAdapterError", "MLX_CONFIG_NAME",
           "MLX_WEIGHTS_NAME"]

MLX_CONFIG_NAME = "adapter_config.json"
MLX_WEIGHTS_NAME = "adapters.safetensors"
_LAYER = re.compile(r"^(?P<stack>.+)\.(?P<index>\d+)\.(?P<key>.+)$")  # model.layers.3.self_attn.q_proj
_EMBEDDING_NAMES = ("embed_tokens",)  # module names mlx-lm makes a LoRAEmbedding of
_PREFIX = "base_model.model."


class MLXAdapterError(ValueError):
    """An mlx-lm adapter folder lora_np cannot read: the message names the file and the key."""


def _layout(paths, n_layers):
    """(num_layers, keys) in mlx-lm's terms for the adapted module paths; NotImplementedError when they
    are not the same modules in each of the last num_layers layers (plus modules outside the layers)."""
    per_layer, top = collections.defaultdict(set), set()
    for path in paths:
        m = _LAYER.match(path)
        if m:
            per_layer[int(m["index"])].add(m["key"])
        else:
            top.add(path)
    if not per_layer:
        return 0, sorted(top)
    first = min(per_layer)
    keys = per_layer[first]
    uneven = [i for i in range(first, n_layers) if per_layer.get(i) != keys]
    if uneven:
        raise NotImplementedError(f"MLX export: mlx-lm adapts the same modules in each of the last num_layers layers, "
                                  f"but this adapter adapts {sorted(keys)} in layer {first} and "
                                  f"{sorted(per_layer.get(uneven[0], ()))} in layer {uneven[0]}")
    return n_layers - first, sorted(keys | top)


def save_mlx_adapter(lora_model, out, adapter_name="default"):
    """Write adapter `adapter_name` of a LoraModel as an mlx-lm adapter folder `out`."""
    if adapter_name not in lora_model.peft_config:
        raise ValueError(f"MLX export: unknown adapter {adapter_name!r}; known: {list(lora_model.peft_config)}")
    config = lora_model.peft_config[adapter_name]
    for what, on in (("DoRA (use_dora)", config.use_dora), ("modules_to_save", config.modules_to_save),
                     (f"bias={config.bias!r}", config.bias != "none")):
        if on:
            raise NotImplementedError(f"MLX export: adapter {adapter_name!r} uses {what}, which mlx-lm's LoRA "
                                      "adapter format cannot hold; export the merged model instead")
    base = lora_model.model
    layers = {path: m for path, m in base.named_modules() if isinstance(m, LoraLayer) and adapter_name in m.r}
    if not layers:
        raise ValueError(f"MLX export: adapter {adapter_name!r} adapts no layer")
    num_layers, keys = _layout(layers, getattr(base.config, base.config.layers_field))
    rank = max(m.r[adapter_name] for m in layers.values())
    scale = collections.Counter(m.scaling[adapter_name] for m in layers.values()).most_common(1)[0][0]
    tensors = {}
    for path, module in layers.items():
        lora_A, lora_B = module.lora_factors(adapter_name)  # (r, in), (out, r); embeddings (r, vocab), (dim, r)
        if module.scaling[adapter_name] != scale:
            lora_B = lora_B * (module.scaling[adapter_name] / scale)
        r = module.r[adapter_name]
        a = np.zeros((rank, lora_A.shape[1]), lora_A.dtype)                       # (rank, in), zero-padded
        b = np.zeros((lora_B.shape[0], rank), lora_B.dtype)                       # (out, rank)
        a[:r], b[:, :r] = lora_A, lora_B
        tensors[f"{path}.lora_a"], tensors[f"{path}.lora_b"] = a.T, b.T           # (in, rank), (rank, out)
    mlx_config = {"fine_tune_type": "lora", "num_layers": num_layers,
                  "lora_parameters": {"rank": rank, "scale": scale, "dropout": config.lora_dropout, "keys": keys}}
    if config.base_model_name_or_path:
        mlx_config["model"] = config.base_model_name_or_path
    os.makedirs(out, exist_ok=True)
    safetensors.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                          os.path.join(out, MLX_WEIGHTS_NAME), metadata={"format": "mlx"})
    write_atomic(os.path.join(out, MLX_CONFIG_NAME), json.dumps(mlx_config, indent=4) + "\n")
    return out


def _alpha(scale, rank):
    """PEFT's lora_alpha for mlx-lm's raw scale: the nearest integer to scale · rank if alpha / rank gives the
    scale back exactly, else scale · rank or a float next to it that does (PEFT then computes the same scale),
    else (no float does) scale · rank, its scaling one rounding away."""
    alpha = scale * rank
    candidates = [round(alpha), alpha, float(np.nextafter(alpha, np.inf)), float(np.nextafter(alpha, -np.inf))]
    return next((c for c in candidates if c != 0 and c / rank == scale), alpha)


def read_mlx_adapter(folder):
    """(LoraConfig, {PEFT file key: array}) of an mlx-lm adapter folder; MLXAdapterError naming the file."""
    folder = os.fspath(folder)
    config_path, weights_path = os.path.join(folder, MLX_CONFIG_NAME), os.path.join(folder, MLX_WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (an mlx-lm adapter folder holds {MLX_CONFIG_NAME} and "
                                    f"{MLX_WEIGHTS_NAME})")
    d = read_json_object(config_path, MLXAdapterError, "an mlx-lm adapter config")
    kind = d.get("fine_tune_type", "lora")
    if kind != "lora":
        raise NotImplementedError(f"{config_path}: fine_tune_type {kind!r} is not supported (only 'lora')")
    params = d.get("lora_parameters")
    if not isinstance(params, dict):
        raise MLXAdapterError(f"{config_path}: lora_parameters must be an object, got {params!r:.80}")
    for key, kinds in (("rank", int), ("scale", (int, float)), ("dropout", (int, float))):
        if isinstance(params.get(key), bool) or not isinstance(params.get(key), kinds):
            raise MLXAdapterError(f"{config_path}: lora_parameters.{key} is {params.get(key)!r:.80}, expected a number")
    rank, scale = params["rank"], float(params["scale"])
    arrays = safetensors.load_file(weights_path)
    modules = collections.defaultdict(dict)
    for key, array in arrays.items():
        path, _, half = key.rpartition(".")
        if half not in ("lora_a", "lora_b"):
            raise MLXAdapterError(f"{weights_path}: tensor {key!r} is neither a .lora_a nor a .lora_b (DoRA's "
                                  "magnitudes and full fine-tuning are not supported)")
        if array.ndim != 2 or array.dtype.kind != "f" or not np.isfinite(array).all():
            raise MLXAdapterError(f"{weights_path}: tensor {key!r} must be a finite 2-D float array, got "
                                  f"{array.dtype} {array.shape}")
        modules[path][half] = array
    tensors = {}
    for path, pair in sorted(modules.items()):
        if len(pair) != 2:
            raise MLXAdapterError(f"{weights_path}: {path} has {', '.join(pair)} but not its other half")
        a, b = pair["lora_a"], pair["lora_b"]
        if a.shape[1] != rank or b.shape[0] != rank:
            raise MLXAdapterError(f"{weights_path}: {path}: lora_a {a.shape} / lora_b {b.shape} do not have "
                                  f"rank {rank} (lora_parameters.rank)")
        key = _PREFIX + path
        if path.rpartition(".")[2] in _EMBEDDING_NAMES:
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = a.T.copy(), b.T.copy()
        else:
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a.T.copy(), b.T.copy()
    if not tensors:
        raise MLXAdapterError(f"{weights_path}: holds no LoRA tensors")
    config = LoraConfig(r=rank, lora_alpha=_alpha(scale, rank), lora_dropout=float(params["dropout"]),
                        target_modules=sorted(modules), base_model_name_or_path=d.get("model"), inference_mode=True)
    return config, tensors


def mlx_to_peft(folder, out):
    """Convert the mlx-lm adapter folder `folder` into the PEFT adapter folder `out`."""
    config, tensors = read_mlx_adapter(folder)
    os.makedirs(out, exist_ok=True)
    safetensors.save_file(tensors, os.path.join(out, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    write_atomic(os.path.join(out, PEFT_CONFIG_NAME), json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    return out
