"""Merge an adapter into its base model and save a Hugging Face folder
(config.json + model.safetensors) that transformers loads as it is."""
import json
import os
import shutil

import numpy as np

from . import safetensors
from .models import GPT2Config

__all__ = ["save_merged", "hf_config_dict"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def hf_config_dict(config):
    """config.json contents transformers reads for this lora_np config."""
    d = {k: v for k, v in config.to_dict().items() if v is not None}
    if isinstance(config, GPT2Config):
        d.update(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_ctx=config.n_positions,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        qwen2 = config.qkv_bias and not config.attention_bias
        d.update(architectures=["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
                 model_type="qwen2" if qwen2 else "llama", hidden_act="silu")
        d.pop("qkv_bias")
        d.pop("rope_scaling", None)
        d["rope_parameters"] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    d["torch_dtype"] = "float32"
    return d


def save_merged(model, out, tokenizer_source=None):
    """Merge every adapter of a LoraModel (or take a plain model) and write `out/` atomically
    (a temporary folder renamed into place). Tokenizer files beside a Hugging Face base model
    are copied; a GGUF base model's tokenizer stays in its GGUF file."""
    base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    if os.path.exists(out) and os.listdir(out):
        raise FileExistsError(f"merge: {out} exists and is not empty")
    parent = os.path.dirname(os.path.abspath(out))
    tmp = os.path.join(parent, f".tmp-merge-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        tensors = {name: np.ascontiguousarray(p.data, dtype=np.float32)
                   for name, p in base.named_parameters()}  # tied head: saved once, under the embedding
        for name, array in tensors.items():
            if not np.isfinite(array).all():
                raise ValueError(f"merge: merged tensor {name!r} is not finite")
        safetensors.save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(hf_config_dict(base.config), fh, indent=2)
        if tokenizer_source and os.path.isdir(tokenizer_source):
            for name in _TOKENIZER_FILES:
                if os.path.exists(os.path.join(tokenizer_source, name)):
                    shutil.copy(os.path.join(tokenizer_source, name), tmp)
        if os.path.exists(out):
            os.rmdir(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
