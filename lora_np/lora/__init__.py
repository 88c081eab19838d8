"""LoRA with PEFT 0.21's semantics: config, layers, injection, merging, adapter files."""
from .config import LoraConfig
from .layer import Embedding, Linear, LoraLayer, ModulesToSaveWrapper
from .model import LoraModel, get_peft_model

__all__ = ["LoraConfig", "LoraModel", "get_peft_model", "LoraLayer", "Linear", "Embedding", "ModulesToSaveWrapper"]
