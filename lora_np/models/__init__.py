"""Causal language models with Hugging Face's module names, one file per family: llama.py (Llama, SmolLM2,
TinyLlama, Qwen2-style q/k/v biases) and gpt2.py; base.py holds what they share.

`LlamaForCausalLM(config)` has parameters named exactly as transformers' checkpoint
keys (`model.layers.0.self_attn.q_proj.weight`, ...), and GPT-2 likewise
(`transformer.h.0.attn.c_attn.weight`), so state dicts and PEFT adapter keys line up.

A new family: one file (config, blocks, causal-LM class) and one line in REGISTRY.
"""
from .base import CausalLMOutput
from .gpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model
from .llama import LlamaConfig, LlamaForCausalLM, LlamaModel

__all__ = ["LlamaConfig", "GPT2Config", "LlamaForCausalLM", "GPT2LMHeadModel", "LlamaModel", "GPT2Model",
           "CausalLMOutput", "config_from_dict", "model_class", "REGISTRY"]

# config.json's model_type -> (config class, causal-LM class)
REGISTRY = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (LlamaConfig, LlamaForCausalLM),  # Llama with q/k/v biases
    "gpt2": (GPT2Config, GPT2LMHeadModel),
}


def config_from_dict(d):
    """A config object from a Hugging Face config.json dict (one of REGISTRY's model types)."""
    model_type = d.get("model_type")
    if not isinstance(model_type, str) or model_type not in REGISTRY:
        raise ValueError(f"unknown architecture model_type={model_type!r} (supported: {', '.join(REGISTRY)})")
    return REGISTRY[model_type][0].from_config_json(d)


def model_class(config):
    """The causal-LM class that computes `config`."""
    for config_cls, model_cls in REGISTRY.values():
        if type(config) is config_cls:
            return model_cls
    raise TypeError(f"no model family for a {type(config).__name__}")
