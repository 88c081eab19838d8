"""lora_np: LoRA fine-tuning of transformer language models with NumPy.

Light names are imported eagerly; heavier parts (models, LoRA, loaders, training)
load on first use so that `import lora_np` stays fast.
"""
import importlib

# kernels first: its backend module sets the `lora-np` command's OpenBLAS policy before NumPy loads
from . import kernels
from . import functional, nn
from .functional import manual_seed
from .tensor import Tensor, enable_grad, is_grad_enabled, no_grad, tensor

__version__ = "0.1.0"

_LAZY = {
    # name: (module, attribute)
    "backend": ("kernels", "backend"),
    "set_backend": ("kernels", "set_backend"),
    "available_backends": ("kernels", "available_backends"),
    "set_num_threads": ("kernels", "set_num_threads"),
    "get_num_threads": ("kernels", "get_num_threads"),
    "LoraConfig": ("lora", "LoraConfig"),
    "get_peft_model": ("lora", "get_peft_model"),
    "LoraModel": ("lora", "LoraModel"),
    "LlamaConfig": ("models", "LlamaConfig"),
    "GPT2Config": ("models", "GPT2Config"),
    "LlamaForCausalLM": ("models", "LlamaForCausalLM"),
    "GPT2LMHeadModel": ("models", "GPT2LMHeadModel"),
    "load_model": ("loaders", "load_model"),
    "default_model_path": ("loaders", "default_model_path"),
    "load_tokenizer": ("tokenizer", "load_tokenizer"),
    # the library's own errors (all but RunFolderBusy and NonFiniteLoss are ValueErrors)
    "OptionError": ("options", "OptionError"),
    "GGUFError": ("gguf", "GGUFError"),
    "SafetensorsError": ("safetensors", "SafetensorsError"),
    "TokenizerError": ("tokenizer", "TokenizerError"),
    "CheckpointError": ("loaders", "CheckpointError"),
    "RunFileError": ("checkpoints", "RunFileError"),
    "RunExists": ("train", "RunExists"),
    "RunFolderBusy": ("checkpoints", "RunFolderBusy"),
    "NonFiniteLoss": ("train", "NonFiniteLoss"),
}

__all__ = ["Tensor", "tensor", "no_grad", "enable_grad", "is_grad_enabled", "functional", "nn",
           "manual_seed", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lora_np' has no attribute {name!r}")
