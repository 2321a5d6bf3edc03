"""Checkpoints: atomic layout, keep-last-K, resume selection, exact state round trip, load_model."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from eva_repro.model import DiT, DiTConfig
from eva_repro.model import checkpoint as ckpt

OPTS = StateDictOptions(full_state_dict=True, cpu_offload=True, strict=False)



pytestmark = pytest.mark.usefixtures("one_thread")

def _tiny_model(seed=0):
    torch.manual_seed(seed)
    return DiT(DiTConfig(target_dim=8, cond_dim=6, hidden=32, depth=1, n_heads=2, n_kv_heads=1))


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(2, 4, 8, generator=g), torch.randn(2, 4, 6, generator=g)
    loss = (model(x, torch.rand(2, generator=g), c) - x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _state(model, opt, step, meta=None):
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ckpt.TrainingState(step, sd, sd, get_optimizer_state_dict(model, opt, options=OPTS),
                              model.config.to_dict(), meta or {"data_position": {"epoch": 0, "batch": step}})


def test_round_trip_restores_model_optimizer_and_rng_exactly(tmp_path):
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for s in range(3):
        _step(model, opt, s)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = ckpt.save_checkpoint(tmp_path, _state(model, opt, 3))
    assert path.name == "step-00000003" and (path / ckpt.COMPLETE).exists()
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    _step(model, opt, 3)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    state = ckpt.load_checkpoint(path)
    assert state.step == 3 and state.meta["data_position"] == {"epoch": 0, "batch": 3}
    ckpt.restore_rng(*state.rng)
    assert (random.random(), float(np.random.rand())) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])
    fresh = DiT(DiTConfig.from_dict(state.model_config))
    fresh.load_state_dict(state.model)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)  # hyperparameters come back too
    set_optimizer_state_dict(fresh, opt2, state.optimizer, options=OPTS)
    assert opt2.param_groups[0]["lr"] == 1e-2 and tuple(opt2.param_groups[0]["betas"]) == (0.9, 0.95)
    _step(fresh, opt2, 3)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, reference[k]), k
    # files: tensors in safetensors, the rest JSON; no pickle
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(["COMPLETE", "config.json", "ema.safetensors", "model.safetensors",
                            "optimizer.safetensors", "rng.safetensors", "trainer_state.json"])
    json.loads((path / "trainer_state.json").read_text())


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_valid_one(tmp_path, capsys,
                                                                       one_line_error):
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt, 0)
    for step in (10, 20, 30):
        ckpt.save_checkpoint(tmp_path, _state(model, opt, step))
    root = tmp_path / ckpt.CHECKPOINTS
    flipped = root / "step-00000030" / "ema.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0x10  # one bit, after the checkpoint was completed
    flipped.write_bytes(bytes(data))
    truncated = root / "step-00000020" / "optimizer.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert ckpt.resolve_resume(tmp_path, "auto").name == "step-00000010"
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2 and "step-00000030: ema.safetensors does not match" in warnings[0]
    assert "step-00000020: optimizer.safetensors does not match" in warnings[1]
    one_line_error(lambda: ckpt.resolve_resume(tmp_path, str(root / "step-00000030")),
                   "ema.safetensors does not match", ckpt.CheckpointError)  # asked for by name
    (root / "step-00000010" / "rng.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="none of its 3 checkpoints verifies"):
        ckpt.resolve_resume(tmp_path, "auto")



def test_a_checkpoint_whose_marker_records_no_digests_is_refused(tmp_path, one_line_error):
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt, 0)
    path = ckpt.save_checkpoint(tmp_path, _state(model, opt, 10))
    ckpt.verify_checkpoint(path)
    (path / ckpt.COMPLETE).write_text('{"step": 10}')
    one_line_error(lambda: ckpt.verify_checkpoint(path), "records no sha256 digests",
                   ckpt.CheckpointError)

FULL_DISK = """
import resource, signal, sys, torch
sys.path.insert(0, {tests!r})
from test_checkpoint import _state, _step, _tiny_model
from eva_repro.model import checkpoint as ckpt
from eva_repro.utils.files import DiskFullError
model = _tiny_model(); opt = torch.optim.AdamW(model.parameters()); _step(model, opt, 0)
ckpt.save_checkpoint({run!r}, _state(model, opt, 10))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # ulimit -f: the disk is "full"
try:
    ckpt.save_checkpoint({run!r}, _state(model, opt, 20))
except DiskFullError as e:
    print(e)
"""


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_says_where(tmp_path):
    script = FULL_DISK.format(tests=str(Path(__file__).parent), run=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    message = proc.stdout.strip()
    assert "\n" not in message and "model.safetensors: out of disk space or the file-size limit" in message
    assert "MB free there" in message
    root = tmp_path / ckpt.CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["step-00000010"]  # no temp dir, no step 20
    assert ckpt.resolve_resume(tmp_path, "auto").name == "step-00000010"
    assert ckpt.load_checkpoint(root / "step-00000010").step == 10


def test_half_written_checkpoints_are_never_picked_and_only_k_are_kept(tmp_path):
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt, 0)
    for step in (10, 20, 30, 40):
        ckpt.save_checkpoint(tmp_path, _state(model, opt, step), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    # a writer killed mid-way: a temp dir, and a step dir without its COMPLETE marker
    root = tmp_path / ckpt.CHECKPOINTS
    (root / ".tmp-step-00000050-123").mkdir()
    (root / "step-00000060").mkdir()
    (root / "step-00000060" / "model.safetensors").write_bytes(b"partial")
    assert ckpt.resolve_resume(tmp_path, "auto").name == "step-00000040"
    assert ckpt.resolve_resume(tmp_path, None) is None
    assert ckpt.resolve_resume(tmp_path / "elsewhere", "auto") is None  # fresh run
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(root / "step-00000060"))
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        ckpt.load_checkpoint(root / "step-00000060")
    ckpt.save_checkpoint(tmp_path, _state(model, opt, 50), keep=2)
    assert not (root / ".tmp-step-00000050-123").exists()  # stale temp dirs are cleaned up
    assert ckpt.resolve_resume(tmp_path, str(tmp_path)).name == "step-00000050"


def test_load_model_accepts_run_model_and_checkpoint_dirs(tmp_path):
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt, 0)
    state = _state(model, opt, 7)
    ema = _tiny_model(seed=1)
    state.ema = ema.state_dict()
    run = tmp_path / "run"
    path = ckpt.save_checkpoint(run, state)
    (run / "split.json").write_text(json.dumps({"heldout_keys": ["a"]}))
    x, t, c = torch.randn(1, 4, 8), torch.rand(1), torch.randn(1, 4, 6)
    expected = ema.eval()(x, t, c)

    for where, source in [(path, "checkpoint"), (run, "run dir, checkpoint"),
                          (run / "checkpoints", "checkpoint")]:
        loaded = ckpt.load_model(where)
        assert loaded.source.startswith(source) and loaded.run_dir == run
        assert loaded.split == {"heldout_keys": ["a"]} and not loaded.model.training
        assert torch.allclose(loaded.model(x, t, c), expected)  # EMA weights, not training ones
    ema.save_pretrained(run / "model")
    loaded = ckpt.load_model(run)
    assert loaded.source.startswith("run dir (exported") and loaded.split is not None
    assert ckpt.load_model(run / "model").run_dir == run
    with pytest.raises(ValueError, match="does not exist"):
        ckpt.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no model here"):
        ckpt.load_model(tmp_path / "empty")
