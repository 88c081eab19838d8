"""Causal language models with Hugging Face's module names, one file per family; base.py holds what they share.

`LlamaForCausalLM(config)` has parameters named exactly as transformers' checkpoint
keys (`model.layers.0.self_attn.q_proj.weight`, ...), and GPT-2 likewise
(`transformer.h.0.attn.c_attn.weight`), so state dicts and PEFT adapter keys line up.

A new family: one file (config, blocks, causal-LM class, and its GGUF names) and one line in
FAMILIES (config.json's model_type) and, if llama.cpp has it, one in GGUF_ARCHITECTURES. A family's
module is imported when a model of that family is first asked for.
"""
import importlib

from .base import CausalLMOutput
from .gpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model
from .llama import LlamaConfig, LlamaForCausalLM, LlamaModel

__all__ = ["LlamaConfig", "GPT2Config", "LlamaForCausalLM", "GPT2LMHeadModel", "LlamaModel", "GPT2Model",
           "CausalLMOutput", "config_from_dict", "model_class", "family", "FAMILIES", "GGUF_ARCHITECTURES",
           "REGISTRY"]

# config.json's model_type -> (module in this package, config class, causal-LM class)
FAMILIES = {
    "llama": ("llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("llama", "LlamaConfig", "LlamaForCausalLM"),  # Llama with q/k/v biases (and sliding windows)
    "mistral": ("llama", "LlamaConfig", "LlamaForCausalLM"),  # Llama with a sliding window on every layer
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
    "smollm3": ("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM"),
    "gpt2": ("gpt2", "GPT2Config", "GPT2LMHeadModel"),
    "gemma": ("gemma", "GemmaConfig", "GemmaForCausalLM"),
    "gemma2": ("gemma", "Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3_text": ("gemma", "Gemma3TextConfig", "Gemma2ForCausalLM"),  # Gemma 2 with q/k norms, two RoPE bases
    "olmo2": ("olmo2", "Olmo2Config", "Olmo2ForCausalLM"),
    "granite": ("granite", "GraniteConfig", "GraniteForCausalLM"),
    "phi3": ("phi3", "Phi3Config", "Phi3ForCausalLM"),
}

# GGUF's general.architecture (llama.cpp's LLM_ARCH names) -> the config.json model_type that computes it
GGUF_ARCHITECTURES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "smollm3": "smollm3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "olmo2": "olmo2",
    "granite": "granite",
    "phi3": "phi3",
}


def family(model_type):
    """(config class, causal-LM class) of a config.json model_type: ValueError naming the supported ones."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ValueError(f"unknown architecture model_type={model_type!r} (supported: {', '.join(FAMILIES)})")
    module, config_name, model_name = FAMILIES[model_type]
    module = importlib.import_module(f"{__name__}.{module}")
    return getattr(module, config_name), getattr(module, model_name)


class _Registry:
    """REGISTRY[model_type] -> (config class, causal-LM class), families imported on first use."""

    def __getitem__(self, model_type):
        if model_type not in FAMILIES:
            raise KeyError(model_type)
        return family(model_type)

    def __contains__(self, model_type):
        return model_type in FAMILIES

    def __iter__(self):
        return iter(FAMILIES)

    def keys(self):
        return FAMILIES.keys()

    def values(self):
        return [family(t) for t in FAMILIES]

    def items(self):
        return [(t, family(t)) for t in FAMILIES]


REGISTRY = _Registry()


def config_from_dict(d):
    """A config object from a Hugging Face config.json dict (one of FAMILIES' model types)."""
    return family(d.get("model_type"))[0].from_config_json(d)


def model_class(config):
    """The causal-LM class that computes `config`."""
    for module, config_name, model_name in set(FAMILIES.values()):
        m = importlib.import_module(f"{__name__}.{module}")
        if type(config) is getattr(m, config_name):
            return getattr(m, model_name)
    raise TypeError(f"no model family for a {type(config).__name__}")
