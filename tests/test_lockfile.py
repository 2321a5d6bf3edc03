"""One writer per directory: a live holder refuses a second writer; a dead one never blocks."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eva_repro.data.extract import extract
from eva_repro.data.synth import write_synthetic_shards
from eva_repro.evaluation.evaluate import evaluate
from eva_repro.training import train as train_mod
from eva_repro.utils.errors import UserError
from eva_repro.utils.lockfile import LOCK_NAME, DirectoryLock, DirectoryLocked

ROOT = Path(__file__).resolve().parents[1]


def _hold_in_subprocess(directory: Path) -> subprocess.Popen:
    script = textwrap.dedent(f"""
        import sys, time
        from eva_repro.utils.lockfile import DirectoryLock
        DirectoryLock({str(directory)!r}, "eva-repro train").acquire()
        print("held", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(tmp_path):
    proc = _hold_in_subprocess(tmp_path)
    try:
        with pytest.raises(DirectoryLocked) as info:
            DirectoryLock(tmp_path, "eva-repro train").acquire()
        message = str(info.value)
        assert "\n" not in message and str(tmp_path) in message
        assert f"pid {proc.pid}" in message and "eva-repro train on host" in message
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the file stays behind ...
    with DirectoryLock(tmp_path, "next run"):  # ... and does not block the next run
        pass


def test_train_and_extract_refuse_a_directory_another_process_writes(tmp_path):
    data = tmp_path / "data"
    write_synthetic_shards(data, 40, grid=2, clip_dim=8, eva_dim=8, seed=0)
    run_dir = tmp_path / "run"
    cfg = dict(data_dir=str(data), output_dir=str(run_dir), model_size="tiny", max_steps=1,
               model_overrides={"hidden": 32, "depth": 1, "n_heads": 2, "n_kv_heads": 1},
               batch_size=4, num_workers=0, progress=False, tensorboard=False)
    with (DirectoryLock(run_dir, "eva-repro train"),
          pytest.raises(DirectoryLocked, match="another process is writing here")):
        train_mod.train(cfg)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    assert train_mod.train(cfg)["steps"] == 1  # released: the run goes ahead
    report_dir = tmp_path / "report"
    with (DirectoryLock(report_dir, "eva-repro evaluate"),
          pytest.raises(DirectoryLocked, match="eva-repro evaluate on host")):
        evaluate(run_dir, data, report_dir, steps=2, sweep="none", plots=False, progress=False)
    assert not report_dir.exists()  # the holder made it for its lock and removed both
    shards_dir, image = tmp_path / "shards", tmp_path / "photo.png"
    Image.fromarray(np.full((64, 64, 3), 128, dtype=np.uint8)).save(image)
    with (DirectoryLock(shards_dir, "eva-repro extract"),
          pytest.raises(DirectoryLocked, match="eva-repro extract on host")):
        extract([image], shards_dir, eva="EVA02-B-16", clip="ViT-B-16", eva_weights="random",
                clip_weights="random", encoder_depth=1, grid=2, num_workers=0, progress=False)
    assert not shards_dir.exists()


def test_a_killed_holders_forked_children_do_not_keep_the_lock(tmp_path):
    """DataLoader workers are forked: a SIGKILLed train's live workers must not block --resume."""
    script = textwrap.dedent(f"""
        import os, sys, time
        from eva_repro.utils.lockfile import DirectoryLock
        DirectoryLock({str(tmp_path)!r}, "eva-repro train").acquire()
        child = os.fork()
        if child == 0:
            time.sleep(600)
            os._exit(0)
        print(child, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    grandchild = int(proc.stdout.readline())
    try:
        with pytest.raises(DirectoryLocked, match=f"pid {proc.pid}"):
            DirectoryLock(tmp_path, "eva-repro train").acquire()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(grandchild, 0)  # the forked worker still lives ...
        with DirectoryLock(tmp_path, "eva-repro train --resume auto") as lock:  # ... and blocks nothing
            assert lock.path.exists()
    finally:
        proc.kill()
        proc.wait()
        os.kill(grandchild, signal.SIGKILL)


def test_a_second_lock_in_the_same_process_is_refused_and_keeps_the_first(tmp_path):
    with DirectoryLock(tmp_path, "eva-repro train") as first:
        with pytest.raises(DirectoryLocked, match="eva-repro train on host .*pid " + str(os.getpid())):
            DirectoryLock(tmp_path, "eva-repro extract").acquire()
        proc = _probe(tmp_path)  # the refusal did not drop the first lock (closing any fd would)
        assert proc.returncode == 3, proc.stderr
        assert first.path.exists()


def _probe(directory: Path) -> subprocess.CompletedProcess:
    script = textwrap.dedent(f"""
        import sys
        from eva_repro.utils.lockfile import DirectoryLock, DirectoryLocked
        try:
            DirectoryLock({str(directory)!r}, "probe").acquire()
        except DirectoryLocked:
            sys.exit(3)
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def test_release_removes_the_lock_file_and_the_directories_it_made(tmp_path):
    target = tmp_path / "a" / "b"
    with DirectoryLock(target, "eva-repro train") as lock:
        assert lock.path.exists()
    assert list(tmp_path.iterdir()) == []  # a failed command leaves no trace
    target.mkdir(parents=True)
    (target / "keep.txt").write_text("x")
    with DirectoryLock(target, "eva-repro train"):
        pass
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]  # an existing dir keeps its files
    with DirectoryLock(tmp_path / "c", "eva-repro train"):
        (tmp_path / "c" / "out.json").write_text("{}")
    assert (tmp_path / "c" / "out.json").exists()  # a directory with output stays


def test_a_command_that_fails_after_taking_the_lock_leaves_no_lock_file(tmp_path):
    run_dir = tmp_path / "run"
    cfg = dict(data_dir=str(tmp_path / "missing"), output_dir=str(run_dir), model_size="tiny",
               max_steps=1, num_workers=0, progress=False, tensorboard=False)
    with pytest.raises(UserError, match="missing"):  # raised by setup, with the lock held
        train_mod.train(cfg)
    assert not run_dir.exists()
