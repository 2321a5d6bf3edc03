"""Synthetic shards: a fixed, neighbour-mixing function of the condition, in the shard format."""

import json

import pytest
import torch

from eva_repro.cli import main as cli
from eva_repro.data import shards
from eva_repro.data.layout import neighbour_mean
from eva_repro.data.synth import _function_weights, make_pairs, write_synthetic_shards


def test_synthetic_pairs_are_a_fixed_function_of_the_condition(tmp_path):
    clip, eva = make_pairs(6, grid=4, clip_dim=8, eva_dim=12, seed=3)
    clip2, eva2 = make_pairs(2, grid=4, clip_dim=8, eva_dim=12, seed=3, start=4)
    assert torch.equal(clip[4:], clip2) and torch.equal(eva[4:], eva2)  # chunking-independent
    assert not torch.equal(make_pairs(1, 4, 8, 12, seed=4)[1], eva[:1])  # seed picks the function
    # each target token depends on its neighbours' condition tokens, not only its own
    bumped = clip[:1].clone()
    bumped[0, 1] += 1.0  # token (0, 1) is a neighbour of token (0, 0)
    w = _function_weights(4, 8, 12, 3)
    out = torch.tanh((bumped + 0.5 * neighbour_mean(bumped)) @ w["w1"]) @ w["w2"] + w["pos"]
    assert not torch.allclose(out[0, 0], eva[0, 0]) and torch.allclose(out[0, 15], eva[0, 15])
    cls_clip, cls_eva = make_pairs(2, 4, 8, 12, seed=3, include_cls=True)
    assert cls_clip.shape == (2, 17, 8) and torch.equal(cls_eva[:, 1:], eva[:2])


def test_synth_cli_writes_a_valid_shard_directory(tmp_path):
    out = tmp_path / "synth"
    assert cli(["synth", "--output_dir", str(out), "--num_samples", "300", "--shard_size", "128",
                "--dtype", "float32"]) == 0
    manifest = shards.read_manifest(out)
    assert manifest.num_samples == 300 and len(manifest.shards) == 3
    assert (manifest.tokens, manifest.clip_dim, manifest.eva_dim, manifest.grid) == (16, 64, 128, 4)
    shards.verify_checksums(manifest)
    clip, eva = make_pairs(1, seed=0, start=299)
    row = shards.ShardReader(manifest).read(299)
    assert torch.equal(row["clip"], clip[0]) and torch.equal(row["eva"], eva[0])
    assert json.loads((out / "manifest.json").read_text())["encoders"]["eva"]["name"] == "synthetic"
    with pytest.raises(ValueError, match="num_samples"):
        write_synthetic_shards(tmp_path / "x", 0)


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    assert cli(["synth", "--output_dir", str(tmp_path), "--num_samples", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --num_samples must be >= 1") and "Traceback" not in err


def test_synth_refuses_a_directory_that_is_not_empty(tmp_path, one_line_error):
    out = tmp_path / "synth"
    write_synthetic_shards(out, 20, grid=2, clip_dim=4, eva_dim=4, shard_size=8, seed=0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    message = one_line_error(lambda: write_synthetic_shards(out, 10, grid=2, clip_dim=4, eva_dim=4,
                                                            shard_size=8, seed=1), "not empty")
    assert message == (f"{out}: not empty (holds manifest.json, shard-00000.json, shard-00000."
                       "safetensors and 4 more); synth writes a fresh shard directory: choose a "
                       "new --output_dir or empty this one")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old shards untouched
    assert shards.read_manifest(out).num_samples == 20


def test_synth_removes_a_killed_runs_temp_files_before_writing(tmp_path):
    import os
    import tempfile

    out = tmp_path / "synth"
    out.mkdir()
    fd, _ = tempfile.mkstemp(prefix=".shard-00000.safetensors.", suffix=".tmp", dir=out)
    os.close(fd)  # all a synth killed in its first shard write leaves
    write_synthetic_shards(out, 10, grid=2, clip_dim=4, eva_dim=4, shard_size=8)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "shard-00000.json", "shard-00000.safetensors", "shard-00001.json",
        "shard-00001.safetensors"]
