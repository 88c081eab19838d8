"""`LoraConfig`: PEFT 0.21's LoRA configuration, with its field names and defaults.

Only the fields lora_np implements are accepted by the constructor; an unknown field
raises ValueError naming it. `from_dict` reads an `adapter_config.json` written by PEFT:
keys lora_np does not know are ignored, but a PEFT feature switched on that lora_np does
not implement (e.g. `lora_bias=true`) raises NotImplementedError naming the key.
`to_dict` writes the keys PEFT writes, so PEFT's `PeftModel.from_pretrained` loads it.

Every pattern field (target_modules / exclude_modules as a string, rank_pattern and
alpha_pattern keys, layers_pattern, modules_to_save) is compiled here, in the form the
matching code uses, so a bad regex is a ValueError naming the field, not a `re.error`
at injection time. `check_adapter_name` is the one rule for adapter names.
"""
import dataclasses
import math
import re
import reprlib
from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = ["LoraConfig", "INIT_LORA_WEIGHTS", "BIAS_MODES", "PEFT_VERSION", "check_adapter_name", "short_repr",
           "rank_pattern_regex", "modules_to_save_regex", "layers_pattern_regex"]

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
    r: a positive int; lora_alpha (and alpha_pattern values): finite and not 0 (PEFT takes any
    number; 0 would make an adapter whose output and gradients are always zero: it never trains;
    a negative one is kept, as in PEFT: with B = 0 at the start it trains as well as its
    absolute value); lora_dropout in [0, 1). Whether r fits in memory is checked at injection.
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
            raise ValueError(f"LoraConfig.{name}: {why}, got {short_repr(getattr(self, name))}")

        if not _is_positive_int(self.r):
            bad("r", "must be a positive integer")
        if not _is_nonzero_number(self.lora_alpha):
            bad("lora_alpha", "must be a finite number other than 0")
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
                                  ("alpha_pattern", _is_nonzero_number, "finite numbers other than 0")):
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
            if not (isinstance(self.layers_pattern, str) or
                    isinstance(self.layers_pattern, (list, tuple)) and all(isinstance(p, str) for p in self.layers_pattern)):
                bad("layers_pattern", "must be a string or a list of strings")
        for name in ("task_type", "base_model_name_or_path"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                bad(name, "must be a string or None")
        self._check_patterns()

    def _check_patterns(self):
        """Compile every pattern as the matching code will use it; a bad one names its field."""
        regexes = [(name, getattr(self, name)) for name in ("target_modules", "exclude_modules")
                   if isinstance(getattr(self, name), str)]
        regexes += [(f"{name}[{short_repr(p)}]", rank_pattern_regex(p)) for name in ("rank_pattern", "alpha_pattern")
                    for p in getattr(self, name)]
        regexes += [(f"modules_to_save[{short_repr(m)}]", modules_to_save_regex(m)) for m in self.modules_to_save or ()]
        patterns = self.layers_pattern
        for p in [patterns] if isinstance(patterns, str) else patterns or ():
            regexes.append((f"layers_pattern[{short_repr(p)}]", layers_pattern_regex(p)))
        for name, regex in regexes:
            try:
                re.compile(regex)
            except (re.error, RecursionError, OverflowError) as e:
                raise ValueError(f"LoraConfig.{name}: not a valid regular expression ({e}): {short_repr(regex)}") from None

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
            raise ValueError(f"{source}: peft_type is {short_repr(peft_type)}, lora_np reads only LORA adapters")
        for key, unused in _PEFT_UNUSED.items():
            if key in d and key not in _PEFT_INFO and d[key] != unused and not (unused == {} and d[key] is None):
                raise NotImplementedError(f"{source}: {key}={short_repr(d[key])} asks for a PEFT feature lora_np does not implement")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 120, 120
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 8


def short_repr(value):
    """repr(value) cut to a readable size, however long or deeply nested `value` is (from a file)."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return f"<an integer of {value.bit_length()} bits>"


def rank_pattern_regex(pattern):
    """The regex a rank_pattern / alpha_pattern key stands for (PEFT's get_pattern_key)."""
    return rf"(.*\.)?({pattern})$"


def modules_to_save_regex(name):
    """The regex a modules_to_save entry stands for (PEFT's check_target_module_exists)."""
    return rf"(^|.*\.){name}($|\..*)"


def layers_pattern_regex(pattern):
    """The regex that finds the layer index after a layers_pattern entry."""
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."


# Characters an adapter name may not hold: it names a folder (save_pretrained writes a
# non-default adapter into <out>/<name>/) and is a segment of dotted parameter names.
_NAME_FORBIDDEN = re.compile(r'[./\\:*?"<>|\x00-\x1f\x7f]')
_NAME_MAX_BYTES = 255  # the longest file name common file systems allow


def check_adapter_name(name, where="adapter_name"):
    """`name` if it is a usable adapter name, else ValueError naming `where` and the rule.

    PEFT itself checks nothing, but torch's ModuleDict refuses '' and any '.', so no PEFT
    adapter has such a name. lora_np's rule: a non-empty string of at most 255 UTF-8 bytes,
    without '.', '/', '\\', control characters (NUL included) or any of `:*?"<>|`, that is not
    the name of an attribute of the containers that hold adapters (e.g. 'keys', '_modules').
    So a name is always one plain path component: never '..', absolute, hidden, or a file
    of the default adapter's folder (those all hold a '.')."""
    from ..nn import ModuleDict, ParameterDict

    if not isinstance(name, str):
        raise ValueError(f"{where}: an adapter name must be a string, got {type(name).__name__} {short_repr(name)}")
    problem = None
    if not name:
        problem = "is empty"
    elif _NAME_FORBIDDEN.search(name):
        problem = f"holds {_NAME_FORBIDDEN.search(name).group()!r}; '.', '/', '\\', control characters and :*?\"<>| are not allowed"
    elif not _encodes_as_utf8(name):
        problem = "is not valid Unicode text (it holds a lone surrogate)"
    elif len(name.encode("utf-8")) > _NAME_MAX_BYTES:
        problem = f"is longer than {_NAME_MAX_BYTES} bytes"
    elif any(hasattr(container(), name) for container in (ModuleDict, ParameterDict)):
        problem = "is the name of an attribute of the adapter containers"
    if problem:
        raise ValueError(f"{where}: adapter name {short_repr(name)} {problem}")
    return name


def _encodes_as_utf8(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_positive_int(x):
    return _is_int(x) and x > 0


def _is_finite_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_nonzero_number(x):
    return _is_finite_number(x) and x != 0


def _copy_value(v):
    if isinstance(v, (list, set, dict)):
        return type(v)(v)
    return v
