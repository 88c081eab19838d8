"""llama.cpp's LoRA adapter files (GGUF, as convert_lora_to_gguf.py writes them), both ways.

    general.type "adapter", general.architecture (the base model's), adapter.type "lora",
    adapter.lora.alpha (FLOAT32: one alpha for the whole file)
    <base tensor>.lora_a  (r, in)     PEFT's lora_A              token_embd: (vocab, r) = lora_embedding_Aᵀ
    <base tensor>.lora_b  (out, r)    PEFT's lora_B, rows as     token_embd: (dim, r)   = lora_embedding_B
                                      the base tensor's rows

llama.cpp adds alpha / r · B·A to each base tensor, r read from B's shape, and llama.cpp's loader
checks the pair against the base tensor (llama-adapter.cpp). The base tensor's rows are as the
converter stored them, so B gets the same row transform (llama's q/k interleave, found by probing the
family's from_gguf_tensor: lora_np.export.gguf_row_map). A per-layer scaling that one alpha cannot
give (rsLoRA's alpha / √r, alpha_pattern) is folded into B; rank_pattern needs nothing (r comes from
the shapes). DoRA, modules_to_save and trained biases have no form in this format and are refused.

Reading gives a PEFT adapter: lora_alpha from the file, r the most common rank, rank_pattern for the
others, target_modules the adapted modules' full names; so PEFT -> GGUF -> lora_np is exact whenever
nothing was folded.
"""
import collections
import re

import numpy as np

from ..export import gguf_architecture, gguf_row_map, gguf_tensor_names, to_gguf_rows
from ..gguf import GGUFError, GGUFFile, write_gguf
from ..nn import Embedding as BaseEmbedding
from .config import LoraConfig
from .layer import LoraLayer

__all__ = ["save_gguf_adapter", "read_gguf_adapter", "GGUF_ADAPTER_OUTTYPES"]

GGUF_ADAPTER_OUTTYPES = {"f32": "F32", "f16": "F16"}
_PREFIX = "base_model.model."
_SUGGEST = "; export the merged model instead (lora-np export --format gguf)"


def _refuse_unsupported(config, adapter_name):
    for what, on in (("DoRA (use_dora)", config.use_dora), ("modules_to_save", config.modules_to_save),
                     (f"bias={config.bias!r}", config.bias != "none")):
        if on:
            raise NotImplementedError(f"GGUF adapter export: adapter {adapter_name!r} uses {what}, which llama.cpp's "
                                      f"LoRA adapter format cannot hold{_SUGGEST}")


def _all_names(model):
    """{id(parameter): [its names]}: more than one for tied weights."""
    names = collections.defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    return names


def save_gguf_adapter(lora_model, out, adapter_name="default", outtype="f32"):
    """Write adapter `adapter_name` of a LoraModel as a llama.cpp LoRA GGUF file `out` (f32 or f16)."""
    if adapter_name not in lora_model.peft_config:
        raise ValueError(f"GGUF adapter export: unknown adapter {adapter_name!r}; "
                         f"known: {list(lora_model.peft_config)}")
    if outtype not in GGUF_ADAPTER_OUTTYPES:
        raise ValueError(f"GGUF adapter export: outtype {outtype!r} is not one of {', '.join(GGUF_ADAPTER_OUTTYPES)}")
    config = lora_model.peft_config[adapter_name]
    _refuse_unsupported(config, adapter_name)
    base = lora_model.model
    arch = gguf_architecture(base.config)
    names = gguf_tensor_names(type(base), base.config)
    all_names = _all_names(base)
    alpha = float(config.lora_alpha)
    ggml_type = GGUF_ADAPTER_OUTTYPES[outtype]
    tensors = {}
    for path, module in base.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.r:
            continue
        gname = names.get(f"{path}.weight")
        if gname is None:
            raise NotImplementedError(f"GGUF adapter export: {path} has no tensor in llama.cpp's {arch!r} "
                                      f"architecture{_SUGGEST}")
        tied = [n for n in all_names[id(module.base_layer.weight)] if n != f"{path}.base_layer.weight"]
        if tied:  # one GGUF tensor: llama.cpp would apply the adapter to both uses (or fail on the shapes)
            raise NotImplementedError(f"GGUF adapter export: {path} shares its weight with {tied[0]} (tied "
                                      f"embeddings), which a GGUF model stores as one tensor{_SUGGEST}")
        lora_A, lora_B = module.lora_factors(adapter_name)
        r, layer_alpha = module.r[adapter_name], module.lora_alpha[adapter_name]
        if config.use_rslora or layer_alpha != alpha:  # llama.cpp scales by alpha / r: fold the rest into B
            lora_B = lora_B * (module.scaling[adapter_name] * r / alpha)
        if isinstance(module.base_layer, BaseEmbedding):
            lora_a, lora_b = lora_A.T, lora_B                                 # (vocab, r), (dim, r)
        else:  # (r, in), (out, r): B's rows in the order the converter stored the base tensor's
            row_map = gguf_row_map(type(base), gname, lora_B.shape, base.config)
            lora_a, lora_b = lora_A, to_gguf_rows(row_map, lora_B, constant=False)
        tensors[f"{gname}.lora_a"] = (np.ascontiguousarray(lora_a, dtype=np.float32), ggml_type)
        tensors[f"{gname}.lora_b"] = (np.ascontiguousarray(lora_b, dtype=np.float32), ggml_type)
    if not tensors:
        raise ValueError(f"GGUF adapter export: adapter {adapter_name!r} adapts no layer")
    metadata = {"general.architecture": arch, "general.type": "adapter", "adapter.type": "lora",
                "adapter.lora.alpha": alpha}
    if config.base_model_name_or_path:
        metadata["general.base_model.0.name"] = config.base_model_name_or_path
    write_gguf(out, metadata, tensors)
    return out


def read_gguf_adapter(path, model):
    """(LoraConfig, {PEFT file key: array}) of a llama.cpp LoRA GGUF file for `model` (the base model it
    adapts); ValueError naming the file and the key or tensor that does not fit."""
    f = GGUFFile(path)
    meta = f.metadata

    def fail(problem):
        raise GGUFError(f"{path}: {problem}")

    arch = gguf_architecture(model.config)
    for key, want in (("general.type", "adapter"), ("adapter.type", "lora"), ("general.architecture", arch)):
        if meta.get(key) != want:
            fail(f"{key} is {meta.get(key)!r}, expected {want!r} (a LoRA adapter for this {arch} model)")
    alpha = meta.get("adapter.lora.alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not np.isfinite(alpha):
        fail(f"adapter.lora.alpha is {alpha!r}, expected a number")
    pairs = collections.defaultdict(dict)
    for name in f.tensors:
        base_name, _, half = name.rpartition(".")
        if half not in ("lora_a", "lora_b"):
            fail(f"tensor {name!r} is neither a .lora_a nor a .lora_b")
        pairs[base_name][half] = name
    cls = type(model)
    names = gguf_tensor_names(cls, model.config)
    tensors, ranks = {}, {}
    for gname, pair in pairs.items():
        if len(pair) != 2:
            fail(f"tensor {gname!r} has {', '.join(pair)} but not its other half")
        param = cls.gguf_parameter_name(gname)
        if param is None or names.get(param) != gname or not param.endswith(".weight"):
            fail(f"tensor {gname!r} is not a weight of llama.cpp's {arch!r} architecture that lora_np knows")
        module_path = param[:-len(".weight")]
        module = model.get_submodule(module_path)
        layer = module.base_layer if isinstance(module, LoraLayer) else module
        lora_a, lora_b = (f.load(pair[h]) for h in ("lora_a", "lora_b"))
        rows, cols = layer.weight.shape                                       # Linear (out, in), Embedding (vocab, dim)
        embedding = isinstance(layer, BaseEmbedding)
        if lora_a.ndim != 2:
            fail(f"{gname}: lora_a has shape {lora_a.shape}, expected 2 dims")
        r = lora_a.shape[1] if embedding else lora_a.shape[0]
        want_a, want_b = ((rows, r), (cols, r)) if embedding else ((r, cols), (rows, r))
        if lora_a.shape != want_a or lora_b.shape != want_b:
            fail(f"{gname}: lora_a {lora_a.shape} / lora_b {lora_b.shape} do not fit the base tensor "
                 f"{tuple(layer.weight.shape)} (expected {want_a} / {want_b})")
        for h, arr in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not np.isfinite(arr).all():
                fail(f"tensor {pair[h]!r} holds non-finite values (NaN or infinity)")
        key = _PREFIX + module_path
        if embedding:
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = lora_a.T.copy(), lora_b
        else:
            row_map = gguf_row_map(cls, gname, lora_b.shape, model.config)
            tensors[f"{key}.lora_A.weight"] = lora_a
            tensors[f"{key}.lora_B.weight"] = lora_b if row_map is None else lora_b[row_map[0]]
        ranks[module_path] = r
    if not ranks:
        fail("holds no LoRA tensors")
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(p): k for p, k in ranks.items() if k != r}
    if alpha == 0:  # llama.cpp then scales by 1: alpha = r in every layer
        alpha, alpha_pattern = r, {re.escape(p): k for p, k in ranks.items() if k != r}
    else:
        alpha_pattern = {}
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(ranks), rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern, base_model_name_or_path=meta.get("general.base_model.0.name"))
    return config, tensors
