"""Files written whole or not at all, JSON read with errors that name the file.

Every file lora_np writes goes through `atomic_file`: the bytes go to a temporary file
`.NAME.<12 hex>.tmp` in the same folder, which is fsynced and renamed over NAME, so a
reader sees the old file or the new one, never a part; on any error the temporary file is
removed and the OSError names NAME (a failed write() or fsync() on a full disk names no
file by itself).
"""
import contextlib
import json
import os
import re
import secrets

__all__ = ["named", "atomic_file", "write_atomic", "fsync_dir", "temp_name", "TEMP_NAME", "read_json_object"]

# The temporary names of atomic_file: what the next run may remove when a killed writer left one.
TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def temp_name(path):
    """A fresh temporary name beside `path` (matched by TEMP_NAME)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")


@contextlib.contextmanager
def named(path):
    """Re-raise an OSError that names no file (write() or fsync() failing with ENOSPC or EIO)
    as the same error naming `path`, so that the user learns which output failed."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise type(e)(e.errno, e.strerror, os.fspath(path)) from e


@contextlib.contextmanager
def atomic_file(path, mode="wb", encoding=None):
    """A file object whose contents replace `path` when the block ends without an error."""
    path = os.fspath(path)
    tmp = temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # never through a planted link
    except OSError as e:  # a missing or read-only folder: name the file the caller asked for
        raise type(e)(e.errno, e.strerror, path) from None
    try:
        with named(path), open(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        with named(path):
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path, data):
    """Write bytes (or str, as UTF-8) to `path` with atomic_file."""
    with atomic_file(path) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def fsync_dir(path):
    """Make renames in folder `path` durable (where the OS lets a folder be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json_object(path, error=ValueError, what=None):
    """The JSON object in file `path`; `error` naming the file (and `what` it holds) when the
    file is not valid JSON (bad UTF-8, nested too deeply, a number too long) or not an object.
    A missing file raises FileNotFoundError as open() does."""
    label = f" ({what})" if what else ""
    try:
        with open(path, "rb") as fh:
            value = json.loads(fh.read())
    except RecursionError:
        raise error(f"{path}: not valid JSON{label}: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
        raise error(f"{path}: not valid JSON{label}: {e}") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object{label}, got a JSON {type(value).__name__}")
    return value
