"""Export a merged model: a Hugging Face folder (config.json + model.safetensors) that transformers
loads as it is (`lora-np merge`), or a GGUF file that llama.cpp and transformers (gguf_file=) load
(`lora-np export --format gguf`); an adapter is merged into its base weights first.

The GGUF side needs no per-family writer: a family's GGUF tables (`gguf_names`, `gguf_block_names`,
`from_gguf_tensor`, `Config.from_gguf`), which the loader reads GGUF files with, are inverted here.
`gguf_tensor_names` inverts the names; `gguf_row_map` finds what `from_gguf_tensor` does by probing
it (a row permutation, as llama's q/k interleave, plus a constant), so its inverse is exact;
`gguf_config_keys` runs `Config.from_gguf` against a recorder that answers each key with the config's
own value, which gives the `{arch}.*` keys, then reads them back with the real reader and refuses a
config that does not come back (a field GGUF has no key for) naming the field. A config's `to_gguf()`
(llama's: RoPE scaling) gives the form the file holds it in, the keys it writes itself and the tensors that are
config, not parameters (Llama 3's rope_freqs, the inverse of `gguf_config_tensors`); those go through the same
read-back check.
"""
import contextlib
import dataclasses
import errno
import json
import os
import secrets
import shutil
from types import SimpleNamespace

import numpy as np

from . import gguf as _gguf
from . import safetensors
from .fileio import fsync_dir, named, write_atomic
from .models import GGUF_ARCHITECTURES
from .models.base import GGUFConfigReader
from .quant import check_float_weights

__all__ = ["save_merged", "hf_config_dict", "save_merged_gguf", "requantization_summary", "OUTTYPES",
           "gguf_architecture", "gguf_tensor_names", "gguf_row_map", "to_gguf_rows", "gguf_config_keys",
           "hf_tokenizer_metadata"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def hf_config_dict(config):
    """config.json contents transformers reads for this lora_np config (each family writes its own)."""
    return {**config.to_config_json(), "torch_dtype": "float32"}


def _remove_orphans(parent, prefix):
    """Remove temporary folders `prefix<pid>-*` in `parent` left by killed writers (their pid is gone)."""
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        try:
            os.kill(int(name[len(prefix):].split("-")[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except (ValueError, OSError):  # not our pattern, or a live process of another user
            pass


@contextlib.contextmanager
def _as_written_to(tmp, out):
    """An OSError naming a file in the temporary folder `tmp` re-raised naming it as in `out`."""
    try:
        yield
    except OSError as e:
        if not isinstance(e.filename, str) or not e.filename.startswith(tmp + os.sep):
            raise
        raise type(e)(e.errno, e.strerror, out + e.filename[len(tmp):]) from e


def save_merged(model, out, tokenizer_source=None):
    """Merge every adapter of a LoraModel (or take a plain model) and write `out/` atomically:
    the files go to a temporary folder beside it (fsynced), which is renamed into place, so
    `out` is either absent / empty or complete. `out` must not exist or be an empty folder
    (FileExistsError otherwise, before anything is merged); temporary folders of killed merges
    into the same parent are removed. Tokenizer files beside a Hugging Face base model are
    copied; a GGUF base model's tokenizer stays in its GGUF file."""
    out = os.fspath(out)
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise FileExistsError(errno.EEXIST, "exists and is not an empty folder", out)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(os.path.abspath(out))}.merge-"
    _remove_orphans(parent, prefix)
    check_float_weights(model, "save_merged")
    base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    tensors = {name: np.ascontiguousarray(p.data, dtype=np.float32)
               for name, p in base.named_parameters()}  # tied head: saved once, under the embedding
    for name, array in tensors.items():
        if not np.isfinite(array).all():
            raise ValueError(f"merged tensor {name!r} is not finite (NaN or inf in the base model or the adapter)")
    tmp = os.path.join(parent, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp)
    try:
        with named(out), _as_written_to(tmp, out):
            safetensors.save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            write_atomic(os.path.join(tmp, "config.json"), json.dumps(hf_config_dict(base.config), indent=2))
            if tokenizer_source and os.path.isdir(tokenizer_source):
                for name in _TOKENIZER_FILES:
                    if os.path.exists(os.path.join(tokenizer_source, name)):
                        shutil.copy(os.path.join(tokenizer_source, name), tmp)
            os.replace(tmp, out)  # onto an empty folder too (rename(2)); refused if `out` filled up meanwhile
        fsync_dir(parent)  # the rename itself, durable
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -- GGUF ------------------------------------------------------------------------------------
# --outtype -> (ggml type of the weight matrices, general.file_type: llama.cpp's llama_ftype)
OUTTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2)}
_QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION, written beside quantized tensors as the converter does
_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")  # tokenizer keys, not the computation's


def gguf_architecture(config):
    """llama.cpp's general.architecture for a config: the inverse of models.GGUF_ARCHITECTURES."""
    for arch, model_type in GGUF_ARCHITECTURES.items():
        if model_type == config.model_type:
            return arch
    raise NotImplementedError(f"GGUF export: model_type {config.model_type!r} has no GGUF architecture in lora_np "
                              f"(GGUF architectures: {', '.join(GGUF_ARCHITECTURES)}); export a Hugging Face "
                              "folder with `lora-np merge` instead")


def gguf_tensor_names(model_cls, config):
    """{parameter name: GGUF tensor name}: the inverse of the family's gguf_names and gguf_block_names."""
    names = {param: gname for gname, param in model_cls.gguf_names.items()}
    for i in range(getattr(config, config.layers_field)):
        names.update((f"{model_cls.gguf_block_prefix}.{i}.{param}", f"blk.{i}.{suffix}")
                     for suffix, param in model_cls.gguf_block_names.items())
    return names


def gguf_row_map(model_cls, gname, shape, config):
    """(perm, offset) such that the family's from_gguf_tensor(gname, x) == x[perm] + offset for x of `shape`
    (offset one value per row), found by probing it with zeros and with the row indices; None when it
    returns its input unchanged. NotImplementedError when it is not a row permutation plus a constant."""
    probe_shape = (shape[0],) + (1,) * (len(shape) - 1)
    zeros = np.zeros(probe_shape)
    index = np.arange(shape[0], dtype=np.float64).reshape(probe_shape)
    offset = model_cls.from_gguf_tensor(gname, zeros, config)
    moved = model_cls.from_gguf_tensor(gname, index, config)
    if offset is zeros and moved is index:
        return None
    perm = np.asarray(moved - offset).reshape(-1)
    if perm.shape != (shape[0],) or not np.array_equal(np.sort(perm), np.arange(shape[0])):
        raise NotImplementedError(f"GGUF export: {model_cls.__name__}.from_gguf_tensor({gname!r}) is not a row "
                                  "permutation plus a constant, so lora_np cannot invert it")
    return perm.astype(np.intp), np.asarray(offset)


def to_gguf_rows(row_map, array, constant=True):
    """`array` (rows first, as the model holds it) as the GGUF file holds it: the inverse of a gguf_row_map
    (constant=False: its permutation only, for a LoRA B factor, which the constant does not touch)."""
    if row_map is None:
        return array
    perm, offset = row_map
    out = np.empty_like(array)
    out[perm] = array - offset.reshape(offset.shape[:1] + (1,) * (array.ndim - 1)) if constant else array
    return out


class _KeyRecorder:
    """Stands in for models.base.GGUFConfigReader in a family's Config.from_gguf: each key it is asked
    for is answered with the config's own value and recorded, which gives the `{arch}.*` keys."""

    def __init__(self, config, arch, tensors, metadata, config_tensors):
        self.config, self.arch, self.tensors, self.metadata = config, arch, tensors, metadata
        self.config_tensors = config_tensors
        self.keys = {}  # GGUF key -> (value, GGUF type)
        self.types = {f.name: f.type for f in dataclasses.fields(config)}

    def key(self, name):
        return f"{self.arch}.{name}"

    def number(self, field, name, default=KeyError):
        if self.key(name) in self.metadata:  # a key the config writes itself (its to_gguf): answered as written
            return self.metadata[self.key(name)]
        value = getattr(self.config, field) if default is KeyError else getattr(self.config, field, default)
        if value is not None:  # FLOAT32 when the field, its default or its value says float (llama.cpp checks)
            is_float = "float" in str(self.types.get(field)) or isinstance(default, float) or isinstance(value, float)
            self.keys[self.key(name)] = (float(value), "FLOAT32") if is_float else (int(value), "UINT32")
        return value

    def vocab_size(self):
        return self.number("vocab_size", "vocab_size")

    def token_ids(self):  # the tokenizer's keys are written from the tokenizer (below), not recorded here
        return {}

    def build(self, config_cls, **fields):
        return self.config

    def config_tensor(self, name):
        return self.config_tensors[name]

    def refuse_unless(self, name, ok):
        """A key the family accepts absent or at one value: written when that value says something (llama.cpp's
        default for an absent key may differ, as value_length's n_embd / n_head); 0 and "none" (a feature off)
        and a factor of 1.0 are what llama.cpp assumes when the key is absent."""
        values = [v for v in ok if v is not None]
        if len(values) != 1 or isinstance(values[0], bool) or values[0] in (0, "none") or \
                isinstance(values[0], float) and values[0] == 1.0:
            return
        self.keys[self.key(name)] = (values[0], _gguf.value_type(values[0])[0])


def _same_value(a, b):
    if isinstance(a, float) or isinstance(b, float):  # GGUF stores FLOAT32
        return a is not None and b is not None and np.float32(a) == np.float32(b)
    return a == b


def gguf_config_keys(config, arch, tensors, metadata=None, config_tensors=None):
    """({key: value}, {key: GGUF type}) of the `{arch}.*` keys that give `config` back through the family's
    Config.from_gguf (`tensors` {GGUF name: shape} of the file, `metadata` its other keys, `config_tensors`
    {name: values} of the tensors it reads as config); NotImplementedError naming a field that does not come
    back (GGUF has no key for its value)."""
    metadata, config_tensors = metadata or {}, config_tensors or {}
    infos = {name: SimpleNamespace(shape=shape) for name, shape in tensors.items()}
    recorder = _KeyRecorder(config, arch, infos, metadata, config_tensors)
    type(config).from_gguf(recorder)
    keys = {k: v for k, (v, _) in recorder.keys.items()}
    types = {k: t for k, (_, t) in recorder.keys.items()}
    try:
        back = type(config).from_gguf(GGUFConfigReader({**metadata, "general.architecture": arch, **keys}, infos,
                                                       "the GGUF export", config_tensors)).to_dict()
    except (ValueError, NotImplementedError) as e:
        raise NotImplementedError(f"GGUF export: the {arch} keys lora_np writes do not read back: {e}") from None
    for field, value in config.to_dict().items():
        if field not in _TOKEN_ID_FIELDS and not _same_value(value, back.get(field)):
            raise NotImplementedError(f"GGUF export: {type(config).__name__}.{field} = {value!r} has no GGUF key in "
                                      f"llama.cpp's {arch!r} architecture (it would read back as "
                                      f"{back.get(field)!r}); export a Hugging Face folder with `lora-np merge`")
    return keys, types


def _tensor_type(gname, shape, outtype):
    """convert_hf_to_gguf.py's choice: 1-D tensors and norms F32; the rest `outtype`, F16 where a
    quantized type's blocks do not divide the rows."""
    ggml_type = OUTTYPES[outtype][0]
    if len(shape) <= 1 or gname.endswith("_norm.weight"):
        return "F32"
    if ggml_type in ("Q8_0", "Q4_0") and shape[-1] % 32:
        return "F16"
    return ggml_type


def _source_metadata(source, vocab_size):
    """(metadata, value types) a merged GGUF takes from its base model: from a GGUF file its general.* (but
    the file type and alignment) and tokenizer.* keys, from a Hugging Face folder its tokenizer.json
    converted (hf_tokenizer_metadata); without a tokenizer llama.cpp's "none" vocabulary (token ids only)."""
    source = os.fspath(source) if source else None
    if source and source.endswith(".gguf"):
        f = _gguf.GGUFFile(source)
        keep = [k for k in f.metadata if k.startswith("tokenizer.") or k.startswith("general.") and k not in (
            "general.architecture", "general.file_type", "general.quantization_version", "general.alignment")]
        return {k: f.metadata[k] for k in keep}, {k: f.value_types[k] for k in keep}
    folder = source if source and os.path.isdir(source) else os.path.dirname(source) if source else None
    if folder and os.path.exists(os.path.join(folder, "tokenizer.json")):
        return hf_tokenizer_metadata(folder, vocab_size)
    return {"tokenizer.ggml.model": "none"}, {}


# llama.cpp's token types (llama_token_type)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def _without_offsets(spec):
    """A pre-tokenizer spec without `trim_offsets` (it moves offsets, not tokens)."""
    if isinstance(spec, dict):
        return {k: _without_offsets(v) for k, v in spec.items() if k != "trim_offsets"}
    if isinstance(spec, list):
        return [_without_offsets(v) for v in spec]
    return spec


def hf_tokenizer_metadata(folder, vocab_size):
    """(tokenizer.* keys, their GGUF types) of a Hugging Face folder's byte-level BPE tokenizer, as
    convert_hf_to_gguf.py's _set_vocab_gpt2 writes them: tokens by id ([PAD<id>] for ids the tokenizer lacks
    up to `vocab_size`, type UNUSED), added special tokens CONTROL and other added ones USER_DEFINED,
    the merges, `tokenizer.ggml.pre` the llama.cpp name of the tokenizer.json's pre-tokenizer, the special
    token ids, add_bos / add_eos and the chat template as lora_np's tokenizer resolves them from the folder.
    NotImplementedError naming what GGUF's gpt2 tokenizer cannot hold (another model, a normalizer)."""
    from .fileio import read_json_object
    from .tokenizer import GGUF_PRE_TOKENIZERS, PRE_TOKENIZERS, load_tokenizer

    path = os.path.join(folder, "tokenizer.json")
    spec = read_json_object(path, ValueError, "a tokenizer")
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or spec.get("normalizer"):
        raise NotImplementedError(f"GGUF export: {path}: only byte-level BPE tokenizers without a normalizer are "
                                  f"converted (model {model.get('type')!r}, byte_fallback "
                                  f"{model.get('byte_fallback')!r}, normalizer {spec.get('normalizer')!r})")
    pre = _without_offsets(spec.get("pre_tokenizer"))
    names = [n for n, p in PRE_TOKENIZERS.items() if _without_offsets(p) == pre]
    ignore_merges = bool(model.get("ignore_merges", False))
    gguf_pre = next((g for g, (n, ignore, _) in GGUF_PRE_TOKENIZERS.items() if n in names and ignore == ignore_merges),
                    None)
    if gguf_pre is None:
        raise NotImplementedError(f"GGUF export: {path}: pre_tokenizer {spec.get('pre_tokenizer')!r:.200} "
                                  f"(ignore_merges {ignore_merges}) has no llama.cpp name lora_np knows")
    tok = load_tokenizer(folder)
    vocab = tok.get_vocab()
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    n = max(vocab_size, max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = [_UNUSED if i not in by_id else _CONTROL if added.get(i, {}).get("special") else
             _USER_DEFINED if i in added else _NORMAL for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": gguf_pre, "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges}
    for key, token_id in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id),
                          ("unknown_token_id", tok.unk_token_id), ("padding_token_id", tok.pad_token_id)):
        if token_id is not None:
            metadata[f"tokenizer.ggml.{key}"] = token_id
    metadata["tokenizer.ggml.add_bos_token"] = tok.bos_token_id is not None and tok.prefix_ids == [tok.bos_token_id]
    metadata["tokenizer.ggml.add_eos_token"] = tok.eos_token_id is not None and tok.suffix_ids == [tok.eos_token_id]
    if tok.chat_template is not None:
        metadata["tokenizer.chat_template"] = tok.chat_template
    return metadata, {}


def _base_weights(model):
    """{id(base weight Parameter): a copy of its data} for each adapted layer of a LoraModel, before merging
    (merging replaces the data of the same Parameter)."""
    from .lora.layer import LoraLayer

    return {id(m.base_layer.weight): np.array(m.base_layer.weight.data, dtype=np.float32)
            for _, m in model.named_modules() if isinstance(m, LoraLayer)}


def _requantization_error(array, ggml_type, base=None, merged=None):
    """{"type", "error": ‖deq(Q(W')) − W'‖ / ‖W'‖, "delta_error": ‖(deq(Q(W')) − W_base) − (W' − W_base)‖
    / ‖W' − W_base‖ (None without an adapted base)} of the array `ggml_type` writes; `base` and `merged`
    (model order) give the adapter's update W' − W_base, whose norm a row permutation does not change."""
    if ggml_type == "F16":  # a quantized outtype's fallback for rows that are not whole blocks
        written = array.astype(np.float16)
    else:
        written = _gguf.dequantize(_gguf.quantize(array, ggml_type), ggml_type).reshape(array.shape)
    lost = float(np.linalg.norm(written.astype(np.float64) - array))
    norm = float(np.linalg.norm(array.astype(np.float64)))
    delta = None if base is None else float(np.linalg.norm(merged.astype(np.float64) - base))
    return {"type": ggml_type, "error": lost / norm if norm else 0.0, "delta_error": lost / delta if delta else None}


def requantization_summary(errors):
    """The error a quantized export adds, in one line, and a second on the adapter's update where tensors had
    one: the worst and the median tensor of `errors` (the dict save_merged_gguf(errors=) fills)."""
    def worst_and_median(key):
        values = {name: e[key] for name, e in errors.items() if e[key] is not None}
        worst = max(values, key=values.get)
        return f"worst {values[worst]:.3g} ({worst}), median {float(np.median(list(values.values()))):.3g}"

    lines = [f"requantization error |deq(Q(W')) - W'| / |W'| over {len(errors)} tensors: "
             f"{worst_and_median('error')}"]
    if any(e["delta_error"] is not None for e in errors.values()):
        lines.append(f"of the adapter's update, |deq(Q(W')) - W'| / |W' - W_base| (1 or more: lost): "
                     f"{worst_and_median('delta_error')}")
    return "\n".join(lines)


def save_merged_gguf(model, out, source=None, outtype="f32", errors=None):
    """Merge every adapter of a LoraModel (or take a plain model) and write it to the GGUF file `out` as
    llama.cpp's convert_hf_to_gguf.py writes it: llama.cpp's tensor names, the family's converter
    transform (llama's q/k row interleave) redone, the `{arch}.*` keys, tensors in `outtype` (f32, f16,
    q8_0, q4_0; norms and 1-D tensors F32). The general.* and tokenizer.* keys of a GGUF `source` (the
    base model's file: vocabulary, merges, special tokens, chat template) are carried over, a Hugging Face
    folder's tokenizer.json converted; without a tokenizer (no `source`, or a folder with no tokenizer.json)
    the file has llama.cpp's "none" vocabulary.
    A quantized `outtype` (q8_0, q4_0) adds an error: a dict `errors` is filled with, per tensor written in a
    type other than F32, {"type", "error": ‖deq(Q(W')) − W'‖ / ‖W'‖ of the merged weight W', "delta_error":
    ‖deq(Q(W')) − W'‖ / ‖W' − W_base‖, how much of the adapter's update the requantization loses (≥ 1: all of
    it; None for a tensor no adapter changed)}; requantization_summary(errors) says it in one or two lines.
    Returns `out`."""
    if outtype not in OUTTYPES:
        raise ValueError(f"GGUF export: outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    arch = gguf_architecture(model.config)
    metadata, types = _source_metadata(source, model.config.vocab_size)
    check_float_weights(model, "save_merged_gguf")
    measure = errors is not None and OUTTYPES[outtype][0] not in ("F32", "F16")
    before = _base_weights(model) if measure and hasattr(model, "merge_and_unload") else {}
    base = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    config, cls = base.config, type(base)
    names = gguf_tensor_names(cls, config)
    params = dict(base.named_parameters())  # a tied head once, under the embedding: no output.weight
    shapes = {names[p]: tuple(param.shape) for p, param in params.items() if p in names}
    # the config as the file holds it: keys it writes itself, tensors that are config (Llama 3's rope_freqs)
    file_config, own_keys, config_tensors = config.to_gguf()
    own_keys = {f"{arch}.{k}": v for k, v in own_keys.items()}
    shapes.update((name, array.shape) for name, array in config_tensors.items())
    keys, key_types = gguf_config_keys(file_config, arch, shapes, {**metadata, **own_keys},
                                       config_tensors)  # first: it names a config field
    keys.update(own_keys)
    key_types.update((k, _gguf.value_type(v)[0]) for k, v in own_keys.items())
    unnamed = [p for p in params if p not in names]
    if unnamed:
        raise NotImplementedError(f"GGUF export: parameters {unnamed[:5]} have no tensor name in llama.cpp's "
                                  f"{arch!r} architecture")
    file_type = OUTTYPES[outtype][1]
    tensors = {name: (array, "F32") for name, array in config_tensors.items()}
    for p, param in params.items():
        gname = names[p]
        array = np.asarray(param.data, dtype=np.float32)
        if not np.isfinite(array).all():
            raise ValueError(f"merged tensor {p!r} is not finite (NaN or inf in the base model or the adapter)")
        merged = array
        array = to_gguf_rows(gguf_row_map(cls, gname, array.shape, config), array)
        tensors[gname] = (array, _tensor_type(gname, array.shape, outtype))
        if measure and tensors[gname][1] != "F32":
            errors[gname] = _requantization_error(array, tensors[gname][1], before.pop(id(param), None), merged)
    quantized = any(t not in ("F32", "F16") for _, t in tensors.values())
    header = {"general.architecture": arch, **{k: v for k, v in metadata.items() if k.startswith("general.")},
              "general.file_type": file_type, **({"general.quantization_version": _QUANTIZATION_VERSION}
                                                 if quantized else {}),
              **keys, **{k: v for k, v in metadata.items() if not k.startswith("general.")}}
    _gguf.write_gguf(out, header, tensors, value_types={**types, **key_types, "general.file_type": "UINT32",
                                                         "general.quantization_version": "UINT32"})
    return out
