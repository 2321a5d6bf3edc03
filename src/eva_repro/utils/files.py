"""Files written whole or not at all: a temp file in the same directory, fsync, atomic rename,
fsync of the directory (so the rename itself survives a power cut).

A full disk (or a file-size limit) becomes one line, DiskFullError, naming the file, the bytes
and the free space, and leaves nothing partial behind. Every writer of eva-repro goes through
here: shards, manifests, checkpoints, models, reports. A writer killed mid-write leaves only its
temp file (`.<name>.<random>.tmp`); `remove_leftovers` deletes those on the next run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from eva_repro.utils.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(UserError):
    """A write ran out of space or hit a file-size limit; the partial file was removed."""


class UnreadableFileError(UserError):
    """A JSON or safetensors file that exists but cannot be parsed (truncated, overwritten)."""


MODEL_FIX = ("the model directory is damaged: copy it again, or export it again from its run "
             "(save_pretrained)")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def read_json_object(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """A JSON object from `path`; a file that is not one is a one-line error naming it and `fix`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnreadableFileError(f"{path}: not valid JSON ({_one_line(e)}); {fix}") from e
    if not isinstance(data, dict):
        raise UnreadableFileError(f"{path}: holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def load_safetensors(path: str | os.PathLike, fix: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file`; a truncated or damaged file is a one-line error naming it."""
    try:
        return load_file(str(path), device=device)
    except (OSError, SafetensorError) as e:
        raise UnreadableFileError(f"{path}: unreadable safetensors file ({_one_line(e)}); {fix}") from e


def _out_of_space(path: Path, nbytes: int, error: BaseException) -> DiskFullError | None:
    """The one-line error for a full disk (OSError, or safetensors' "os error N"), else None."""
    code = error.errno if isinstance(error, OSError) else None
    if code is None and (m := re.search(r"os error (\d+)", str(error))):
        code = int(m.group(1))
    if code not in NO_SPACE:
        return None
    free = shutil.disk_usage(path.parent).free
    limit = " or the file-size limit (ulimit -f)" if code == errno.EFBIG else ""
    return DiskFullError(f"{path}: out of disk space{limit} writing {nbytes / 1e6:.1f} MB "
                         f"({free / 1e6:.0f} MB free there); free space or write elsewhere "
                         "(nothing partial was kept)")


TEMP_GLOB = ".*.tmp"  # the temp files below: .<name>.<random>.tmp beside their target


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file's data, or a directory's entries (what makes a rename in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_leftovers(directory: str | os.PathLike) -> list[str]:
    """Delete the temp files a killed writer left in `directory` (never renamed into place, so
    never part of any output); returns their names. Call it holding the directory's lock."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for tmp in sorted(directory.glob(TEMP_GLOB)):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return removed


def _publish(tmp: str, path: Path) -> None:
    """Rename a finished (fsynced) temp file into place with normal permissions (mkstemp makes
    it 0600), then fsync the directory so the rename survives a crash."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if (full := _out_of_space(path, len(data), e)) is not None:
            raise full from e
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file` through a temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        fsync_path(tmp)
        _publish(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if (full := _out_of_space(path, nbytes, e)) is not None:
            raise full from e
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
