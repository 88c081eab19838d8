"""The run folder on disk: its lock, checkpoints, the final adapter, and the leftovers of
killed writes (see lora_np.train for what each failure leaves there).

    out/adapter_config.json, adapter_model.safetensors   the final adapter (PEFT format)
    out/checkpoints/latest.json                           {"checkpoint": "step-NNNNNN", "step": N}
    out/checkpoints/step-NNNNNN/                          adapter/, optimizer.safetensors, trainer_state.json
    out/.lora-np.lock                                     held by the one `lora-np train` using the folder
"""
import dataclasses
import json
import os
import re
import secrets
import shutil
import socket
import time

from . import safetensors
from .fileio import TEMP_NAME, fsync_dir, named, read_json_object, write_atomic
from .optim import flatten_state_dict

__all__ = ["RunFolderBusy", "RunFileError", "LOCK_NAME", "RUN_FILES", "lock_run_folder", "remove_leftovers",
           "earlier_run", "remove_run", "save_checkpoint", "load_checkpoint", "save_adapter"]


class RunFolderBusy(RuntimeError):
    """Another `lora-np train` holds the run folder's lock; the message names the holder."""


class RunFileError(ValueError):
    """A run file (metrics.jsonl, a checkpoint) is damaged; the message names the file."""


# -- the run folder: lock, earlier runs, leftovers of killed writes ------------------------------
LOCK_NAME = ".lora-np.lock"
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.svg", "checkpoints")
# Temporary folders of checkpoint and adapter writes (temporary files: fileio.TEMP_NAME).
_TEMP_FOLDER = re.compile(r"^\.tmp-")


def lock_run_folder(out):
    """An open file descriptor holding an exclusive flock on `out`'s lock file (released when it is
    closed or the process ends, however it ends); RunFolderBusy naming the holder if another has it."""
    import fcntl

    path = os.path.join(out, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that is starting"
        os.close(fd)
        raise RunFolderBusy(f"{out} is in use by another lora-np train ({holder}; lock file {path}); "
                            f"wait for it to end or choose another --out") from None
    except BaseException:
        os.close(fd)
        raise
    with named(path):
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    return fd


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def remove_leftovers(out):
    """Remove the temporary files and folders of writes that a killed run left in `out` and
    `out`/checkpoints (only with the run folder's lock held: no live writer owns them)."""
    for folder in (out, _checkpoint_dir(out)):
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if TEMP_NAME.match(name) or _TEMP_FOLDER.match(name):
                    _remove(os.path.join(folder, name))


def earlier_run(out):
    """The lora_np run files already in `out`."""
    return [name for name in RUN_FILES if os.path.lexists(os.path.join(out, name))]


def remove_run(out):
    """Remove the lora_np run files of an earlier run in `out` (--overwrite); other files stay."""
    for name in RUN_FILES:
        _remove(os.path.join(out, name))


# -- checkpoints ----------------------------------------------------------------------------
_CHECKPOINT_NAME = re.compile(r"^step-\d{6,}(\.\d+)?$")
_STATE_KEYS = ("step", "optimizer", "scheduler", "batches", "rng", "args")


def _checkpoint_dir(out):
    return os.path.join(out, "checkpoints")


def save_checkpoint(out, step, peft_model, optimizer, scheduler, batches_state, rng_state, args, extra=None):
    """Write a checkpoint of `step` and point latest.json at it. It is written to a temporary
    folder and renamed to a name no folder has (step-NNNNNN, or step-NNNNNN.1 if that exists,
    which latest.json may name); latest.json is then replaced atomically and only after that are
    older checkpoints removed, so at every instant latest.json names a complete checkpoint.
    `extra`: more trainer_state.json keys. Returns the checkpoint's folder."""
    root = _checkpoint_dir(out)
    os.makedirs(root, exist_ok=True)
    name, k = f"step-{step:06d}", 0
    while os.path.lexists(os.path.join(root, name)):
        k += 1
        name = f"step-{step:06d}.{k}"
    tmp = os.path.join(root, f".tmp-{name}-{secrets.token_hex(6)}")
    os.makedirs(tmp)
    try:
        peft_model.save_pretrained(os.path.join(tmp, "adapter"))
        arrays, meta = flatten_state_dict(optimizer.state_dict())
        safetensors.save_file(arrays, os.path.join(tmp, "optimizer.safetensors"))
        state = {"step": step, "optimizer": meta, "scheduler": scheduler.state_dict(), "batches": batches_state,
                 "rng": rng_state, "args": dataclasses.asdict(args), **(extra or {})}
        write_atomic(os.path.join(tmp, "trainer_state.json"), json.dumps(state, indent=1).encode())
        fsync_dir(tmp)
        os.replace(tmp, os.path.join(root, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    write_atomic(os.path.join(root, "latest.json"), json.dumps({"checkpoint": name, "step": step}).encode())
    fsync_dir(root)
    for old in os.listdir(root):
        if old.startswith("step-") and old != name:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return os.path.join(root, name)


def _read_json(path, what):
    """The JSON object in `path`; RunFileError naming it when it is missing or not one."""
    try:
        return read_json_object(path, RunFileError, what)
    except FileNotFoundError:
        raise RunFileError(f"{path}: missing ({what})") from None


def load_checkpoint(out):
    """(folder, trainer_state) of the checkpoint latest.json names in run directory `out`;
    RunFileError naming the file when latest.json or the checkpoint is damaged."""
    latest = os.path.join(_checkpoint_dir(out), "latest.json")
    if not os.path.exists(latest):
        raise FileNotFoundError(f"--resume: {out} has no checkpoint ({latest} is missing)")
    name = _read_json(latest, "the name of the newest checkpoint").get("checkpoint")
    if not isinstance(name, str) or not _CHECKPOINT_NAME.match(name):
        raise RunFileError(f"{latest}: 'checkpoint' must name a step-NNNNNN folder, got {name!r}")
    folder = os.path.join(_checkpoint_dir(out), name)
    for part in ("adapter", "optimizer.safetensors", "trainer_state.json"):
        if not os.path.exists(os.path.join(folder, part)):
            raise RunFileError(f"{latest} names {folder}, which has no {part}: the checkpoint is damaged")
    path = os.path.join(folder, "trainer_state.json")
    state = _read_json(path, "the trainer state")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise RunFileError(f"{path}: no {', '.join(missing)}")
    if not isinstance(state["step"], int) or state["step"] < 0 or not isinstance(state["args"], dict):
        raise RunFileError(f"{path}: 'step' must be an integer >= 0 and 'args' an object")
    return folder, state


# -- the final adapter ------------------------------------------------------------------------
def save_adapter(peft, out):
    """The final adapter into `out`: written to a temporary folder, then the weights and then the
    config (which completes an adapter folder) renamed into place; a failure leaves no mix."""
    from .lora.peft_io import CONFIG_NAME, WEIGHTS_NAME  # lora is imported on first use

    tmp = os.path.join(out, f".tmp-adapter-{secrets.token_hex(6)}")
    try:
        peft.save_pretrained(tmp)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
