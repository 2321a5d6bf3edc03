"""Atomic writes: fsync the temp file, rename, fsync the directory; a killed writer's temp files
are removed by the next run (`remove_leftovers`)."""

import os
import stat
import tempfile

import torch
from safetensors.torch import load_file

from eva_repro.utils import files


def _record(monkeypatch) -> list[tuple[str, str]]:
    calls = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_atomic_writes_fsync_the_file_before_the_rename_and_the_directory_after(tmp_path,
                                                                                 monkeypatch):
    calls = _record(monkeypatch)
    files.atomic_save_safetensors({"x": torch.arange(3.0)}, tmp_path / "t.safetensors")
    assert calls == [("fsync", "file"), ("replace", "t.safetensors"), ("fsync", "dir")]
    calls.clear()
    files.atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert calls == [("fsync", "file"), ("replace", "m.json"), ("fsync", "dir")]
    assert torch.equal(load_file(tmp_path / "t.safetensors")["x"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "t.safetensors"]


def test_remove_leftovers_deletes_only_the_temp_files_of_atomic_writes(tmp_path):
    kept = ["shard-00000.safetensors", "shard-00000.json", "manifest.json", "notes.tmp",
            ".eva-repro.lock"]
    for name in kept:
        (tmp_path / name).write_text("x")
    fd, tmp = tempfile.mkstemp(prefix=".shard-00001.safetensors.", suffix=".tmp", dir=tmp_path)
    os.close(fd)  # what a SIGKILL in the middle of atomic_save_safetensors leaves
    fd, tmp2 = tempfile.mkstemp(prefix=".manifest.json.", suffix=".tmp", dir=tmp_path)
    os.close(fd)
    removed = files.remove_leftovers(tmp_path)
    assert removed == sorted([os.path.basename(tmp), os.path.basename(tmp2)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert files.remove_leftovers(tmp_path / "missing") == []
