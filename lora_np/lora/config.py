"""`LoraConfig`: PEFT 0.21's LoRA configuration, with its field names and defaults.

Only the fields lora_np implements are accepted by the constructor; an unknown field
raises ValueError naming it. `from_dict` reads an `adapter_config.json` written by PEFT:
keys lora_np does not know are ignored, but a PEFT feature switched on that lora_np does
not implement (e.g. `lora_bias=true`) raises NotImplementedError naming the key.
`to_dict` writes the keys PEFT writes, so PEFT's `PeftModel.from_pretrained` loads it.
"""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = ["LoraConfig", "INIT_LORA_WEIGHTS", "BIAS_MODES", "PEFT_VERSION"]

PEFT_VERSION = "0.21.2"
INIT_LORA_WEIGHTS = (True, False, "gaussian", "pissa", "olora")
BIAS_MODES = ("none", "all", "lora_only")

# PEFT config keys that lora_np does not implement, with the value that means "unused".
# A file that sets one of them to anything else asks for a feature lora_np lacks.
_PEFT_UNUSED = {
    "auto_mapping": None, "revision": None, "megatron_config": None, "megatron_core": "megatron.core",
    "trainable_token_indices": None, "loftq_config": {}, "eva_config": None, "corda_config": None,
    "lora_ga_config": None, "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False,
    "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None, "lora_bias": False,
    "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
    "ensure_weight_tying": False,
}
# keys whose value is informational only; any value is accepted on load
_PEFT_INFO = ("auto_mapping", "revision", "megatron_core", "qalora_group_size", "peft_version")


@dataclass(init=False)
class LoraConfig:
    """LoRA hyper-parameters, named and defaulted as in `peft.LoraConfig`.

    target_modules: list of module-name suffixes, a full-match regex string, or "all-linear"
    (None: PEFT's default for the model type). rank_pattern / alpha_pattern: {pattern: value},
    a module whose full name matches `(.*\\.)?(pattern)$` gets that r / lora_alpha.
    """

    r: int = 8
    target_modules: Optional[Union[list, set, str]] = None
    exclude_modules: Optional[Union[list, set, str]] = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list, int]] = None
    layers_pattern: Optional[Union[list, str]] = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_dora: bool = False
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"LoraConfig: unknown field(s) {unknown}")
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            setattr(self, f.name, kwargs.get(f.name, default))
        self._validate()

    def _validate(self):
        def bad(name, why):
            raise ValueError(f"LoraConfig.{name}: {why}, got {getattr(self, name)!r}")

        if not _is_positive_int(self.r):
            bad("r", "must be a positive integer")
        if not _is_finite_number(self.lora_alpha):
            bad("lora_alpha", "must be a finite number")
        if not _is_finite_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        if not any(self.init_lora_weights is v if isinstance(v, bool) else self.init_lora_weights == v
                   for v in INIT_LORA_WEIGHTS):
            bad("init_lora_weights", f"must be one of {INIT_LORA_WEIGHTS}")
        if self.bias not in BIAS_MODES:
            bad("bias", f"must be one of {BIAS_MODES}")
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                if not all(isinstance(v, str) for v in value):
                    bad(name, "must be a string or a list of strings")
                setattr(self, name, set(value))
            elif value is not None and not isinstance(value, str):
                bad(name, "must be a string or a list of strings")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                bad("modules_to_save", "must be a list of module names")
            self.modules_to_save = list(self.modules_to_save)
        for name, check, what in (("rank_pattern", _is_positive_int, "positive integers"),
                                  ("alpha_pattern", _is_finite_number, "finite numbers")):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) and check(v) for k, v in value.items()):
                bad(name, f"must map pattern strings to {what}")
        layers = self.layers_to_transform
        if layers is not None:
            if isinstance(layers, int) and not isinstance(layers, bool):
                pass
            elif not isinstance(layers, (list, tuple)) or not all(_is_int(i) for i in layers):
                bad("layers_to_transform", "must be an int or a list of ints")
            else:
                self.layers_to_transform = list(layers)
            if isinstance(self.target_modules, str):
                bad("layers_to_transform", "cannot be used when target_modules is a regex string")
        if self.layers_pattern is not None:
            if isinstance(self.target_modules, str):
                bad("layers_pattern", "cannot be used when target_modules is a regex string")
            if layers is None:
                bad("layers_pattern", "needs layers_to_transform")

    @property
    def peft_type(self):
        return "LORA"

    def scaling_for(self, r, alpha):
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return LoraConfig(**{**self._fields(), **changes})

    def _fields(self):
        return {f.name: _copy_value(getattr(self, f.name)) for f in dataclasses.fields(self)}

    # -- adapter_config.json ------------------------------------------------------------
    def to_dict(self):
        """The keys PEFT 0.21 writes to adapter_config.json (sets become sorted lists)."""
        d = dict(_PEFT_UNUSED)
        d.update({k: sorted(v) if isinstance(v, set) else v for k, v in self._fields().items()})
        d["peft_type"] = "LORA"
        d["peft_version"] = PEFT_VERSION
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d, source="adapter_config.json"):
        """A config from a PEFT adapter_config.json dict; unknown keys are ignored."""
        peft_type = d.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"{source}: peft_type is {peft_type!r}, lora_np reads only LORA adapters")
        for key, unused in _PEFT_UNUSED.items():
            if key in d and key not in _PEFT_INFO and d[key] != unused and not (unused == {} and d[key] is None):
                raise NotImplementedError(f"{source}: {key}={d[key]!r} asks for a PEFT feature lora_np does not implement")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_positive_int(x):
    return _is_int(x) and x > 0


def _is_finite_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _copy_value(v):
    if isinstance(v, (list, set, dict)):
        return type(v)(v)
    return v
