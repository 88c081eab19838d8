"""Export a model as a Hugging Face folder (config.json + model.safetensors) that
transformers loads as it is; an adapter is merged into its base weights first
(`lora-np merge`)."""
import contextlib
import errno
import json
import os
import secrets
import shutil

import numpy as np

from . import safetensors
from .fileio import fsync_dir, named, write_atomic

__all__ = ["save_merged", "hf_config_dict"]

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
