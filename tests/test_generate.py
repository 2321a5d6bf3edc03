"""generate(): raw EVA scale, seeded and batch-independent, clear errors; `eva-repro sample`."""

import json
import os
import signal

import pytest
import torch

from eva_repro import cli
from eva_repro.data import shards
from eva_repro.data.synth import write_synthetic_shards
from eva_repro.evaluation.generate import ModelDataMismatch, check_layout, generate
from eva_repro.model import DiT, DiTConfig
from eva_repro.utils import files
from eva_repro.utils.preemption import EXIT_PREEMPTED


def _model(target_norm=5.0, token_mode="patch_only"):
    torch.manual_seed(0)
    model = DiT(DiTConfig(target_dim=24, cond_dim=16, hidden=32, depth=1, n_heads=4, n_kv_heads=2,
                          target_norm=target_norm, token_mode=token_mode))
    for p in model.parameters():  # leave the zero init so the output depends on the condition
        p.data.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_generate_returns_raw_scale_tokens():
    model = _model(target_norm=5.0)
    clip = torch.randn(5, 16, 16)
    eva = generate(model, clip, steps=3, method="euler")
    assert eva.shape == (5, 16, 24) and eva.dtype == torch.float32
    assert torch.allclose(eva.norm(dim=-1), torch.full((5, 16), 5.0), atol=1e-4)


def test_generate_is_seeded_and_independent_of_batch_size():
    model = _model()
    clip = torch.randn(7, 16, 16, generator=torch.Generator().manual_seed(1))
    a = generate(model, clip, steps=2, method="heun", seed=3, batch_size=7)
    b = generate(model, clip, steps=2, method="heun", seed=3, batch_size=2)
    assert torch.allclose(a, b, atol=1e-5)
    c = generate(model, clip, steps=2, method="heun", seed=4)
    assert not torch.allclose(a, c)
    guided = generate(model, clip, steps=2, cfg_scale=2.0, seed=3)
    assert not torch.allclose(a, guided)


def test_generate_rejects_mismatched_conditions():
    model = _model()
    with pytest.raises(ModelDataMismatch, match="cond_dim 16"):
        generate(model, torch.randn(2, 16, 8))
    with pytest.raises(ModelDataMismatch, match="not a square grid"):
        generate(model, torch.randn(2, 17, 16))
    with pytest.raises(ModelDataMismatch, match="CLS"):
        generate(_model(token_mode="cls_patch"), torch.randn(2, 16, 16))
    fixed = DiT(DiTConfig(target_dim=24, cond_dim=16, hidden=32, depth=1, n_heads=4, n_kv_heads=2,
                          tokens=16))
    with pytest.raises(ModelDataMismatch, match="64 target tokens but the model generates 16"):
        check_layout(fixed.config, 64, 16, "shards", "", target_tokens=64)


def test_a_condition_on_another_grid_conditions_the_model_s_own_target_grid():
    model = DiT(DiTConfig(target_dim=24, cond_dim=16, hidden=32, depth=1, n_heads=4, n_kv_heads=2,
                          tokens=16))
    assert generate(model, torch.randn(2, 64, 16), steps=2).shape == (2, 16, 24)


def test_sample_cli_writes_shards_in_the_same_format(tmp_path, capsys):
    src, out, model_dir = tmp_path / "in", tmp_path / "out", tmp_path / "model"
    write_synthetic_shards(src, 12, grid=4, clip_dim=16, eva_dim=24, seed=0, shard_size=5)
    model = _model(target_norm=3.0)
    model.save_pretrained(model_dir)
    argv = ["sample", "--model_path", str(model_dir), "--input_dir", str(src), "--output_dir",
            str(out), "--steps", "2", "--method", "euler", "--batch_size", "4", "--device", "cpu"]
    assert cli.main(argv) == 0
    m_in, m_out = shards.read_manifest(src), shards.read_manifest(out)
    assert m_out.num_samples == 12 and len(m_out.shards) == 3 and m_out.eva_dim == 24
    assert m_out.grid == 4 and m_out.data["generated"]["sampler"]["method"] == "euler"
    shards.verify_checksums(m_out)
    r_in, r_out = shards.ShardReader(m_in), shards.ShardReader(m_out)
    assert r_out.keys() == r_in.keys()
    clip_in = torch.stack([r_in.read(i)["clip"] for i in range(12)])
    assert torch.equal(torch.stack([r_out.read(i)["clip"] for i in range(12)]), clip_in)
    generated = torch.stack([r_out.read(i)["eva"].float() for i in range(12)])
    # the same numbers as the Python API (up to fp16 storage)
    expected = generate(model, clip_in.float(), steps=2, method="euler")
    assert torch.allclose(generated, expected, atol=2e-2)
    # re-running with the same settings resumes; other settings are refused
    assert cli.main(argv) == 0
    assert cli.main(argv + ["--seed", "5"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert json.loads((out / "sample_settings.json").read_text())["sampler"]["seed"] == 0


def test_sample_cli_stops_on_sigterm_at_a_shard_boundary_with_exit_75(tmp_path, capsys,
                                                                       monkeypatch):
    src, out, model_dir = tmp_path / "in", tmp_path / "out", tmp_path / "model"
    write_synthetic_shards(src, 12, grid=4, clip_dim=16, eva_dim=24, seed=0, shard_size=5)
    _model().save_pretrained(model_dir)
    argv = ["sample", "--model_path", str(model_dir), "--input_dir", str(src), "--output_dir",
            str(out), "--steps", "2", "--method", "euler", "--device", "cpu"]
    real_write_shard = shards.write_shard

    def preempted_while_writing(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_write_shard(*args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", preempted_while_writing)
    assert cli.main(argv) == EXIT_PREEMPTED
    assert "preempted: stopped on SIGTERM after 5 samples" in capsys.readouterr().err
    assert [p.name for p in out.glob("shard-*.safetensors")] == ["shard-00000.safetensors"]
    monkeypatch.setattr(shards, "write_shard", real_write_shard)
    assert cli.main(argv) == 0 and shards.read_manifest(out).num_samples == 12


def test_sample_cli_named_blip3o_sampler(tmp_path, capsys):
    src, model_dir = tmp_path / "in", tmp_path / "model"
    write_synthetic_shards(src, 4, grid=4, clip_dim=16, eva_dim=24, seed=0)
    _model().save_pretrained(model_dir)
    argv = ["sample", "--model_path", str(model_dir), "--input_dir", str(src), "--output_dir",
            str(tmp_path / "out"), "--sampler", "blip3o", "--device", "cpu"]
    assert cli.main(argv) == 0
    settings = json.loads((tmp_path / "out" / "sample_settings.json").read_text())["sampler"]
    assert settings == {"method": "euler", "steps": 30, "shift": 1.0, "cfg_scale": 3.0,
                        "seed": 0, "named": "blip3o"}
    capsys.readouterr()
    assert cli.main([*argv[:-4], "--output_dir", str(tmp_path / "o2"), "--sampler", "blip3o",
                     "--steps", "10"]) == 2
    err = capsys.readouterr().err
    assert "--sampler blip3o sets --steps 30" in err and len(err.splitlines()) == 1


def test_sample_cli_rejects_wrong_dims_in_one_line(tmp_path, capsys):
    write_synthetic_shards(tmp_path / "in", 4, grid=4, clip_dim=8, eva_dim=24, seed=0)
    _model().save_pretrained(tmp_path / "model")
    assert cli.main(["sample", "--model_path", str(tmp_path / "model"), "--input_dir",
                     str(tmp_path / "in"), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "clip_dim 8" in err and "\n" not in err


def test_sample_cli_drops_the_cls_row_for_a_patch_only_model(tmp_path, capsys):
    """As the trainer and evaluate do: CLS shards in, patch-only shards out; a CLS model on
    shards without a CLS row is refused before anything is written."""
    src, out = tmp_path / "in", tmp_path / "out"
    write_synthetic_shards(src, 6, grid=4, clip_dim=16, eva_dim=24, seed=0, include_cls=True)
    model = _model()
    model.save_pretrained(tmp_path / "model")
    argv = ["sample", "--model_path", str(tmp_path / "model"), "--input_dir", str(src),
            "--output_dir", str(out), "--steps", "2", "--method", "euler", "--device", "cpu"]
    assert cli.main(argv) == 0
    m_out = shards.read_manifest(out)
    assert m_out.tokens == 16 and not m_out.include_cls
    r_in, r_out = shards.ShardReader(src), shards.ShardReader(out)
    clip = torch.stack([r_in.read(i)["clip"] for i in range(6)])[:, 1:]
    assert torch.equal(torch.stack([r_out.read(i)["clip"] for i in range(6)]), clip)
    expected = generate(model, clip.float(), steps=2, method="euler")
    assert torch.allclose(torch.stack([r_out.read(i)["eva"].float() for i in range(6)]), expected,
                          atol=2e-2)
    capsys.readouterr()
    _model(token_mode="cls_patch").save_pretrained(tmp_path / "cls_model")
    assert cli.main([*argv[:2], str(tmp_path / "cls_model"), "--input_dir", str(out),
                     "--output_dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "manifest.json: 16 tokens is not a square grid plus a CLS token" in err
    assert "\n" not in err and not (tmp_path / "o2").exists()


def test_sample_resume_matches_shards_by_their_index_not_their_position(tmp_path):
    """Input shards 1-3 (shard 0 gone): a rerun after the last output shard was lost rewrites it
    (matching 'finished' by position would skip it and report success with 24 of 36)."""
    src, model_dir = tmp_path / "in", tmp_path / "model"
    write_synthetic_shards(src, 48, grid=4, clip_dim=16, eva_dim=24, seed=0, shard_size=12)
    manifest = json.loads((src / "manifest.json").read_text())
    first = manifest["shards"].pop(0)
    assert first["index"] == 0
    (src / first["file"]).unlink()
    (src / "shard-00000.json").unlink()
    manifest["num_samples"] = 36
    (src / "manifest.json").write_text(json.dumps(manifest))
    _model().save_pretrained(model_dir)

    def sample(out):
        return cli.main(["sample", "--model_path", str(model_dir), "--input_dir", str(src),
                         "--output_dir", str(out), "--steps", "2", "--method", "euler",
                         "--device", "cpu", "--no_progress"])

    assert sample(tmp_path / "whole") == 0
    whole = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    assert [s["index"] for s in whole["shards"]] == [1, 2, 3] and whole["num_samples"] == 36
    out = tmp_path / "out"
    assert sample(out) == 0
    written = json.loads((out / "manifest.json").read_text())
    last = written["shards"].pop()  # an interruption before the last shard was committed
    (out / last["file"]).unlink()
    (out / "shard-00003.json").unlink()
    written["num_samples"] -= last["num_samples"]
    (out / "manifest.json").write_text(json.dumps(written))
    assert sample(out) == 0
    resumed = shards.read_manifest(out)
    assert resumed.num_samples == 36 and len(shards.ShardReader(resumed).keys()) == 36
    assert resumed.data["shards"] == whole["shards"]  # the same files, sha256 for sha256
    shards.verify_checksums(resumed)


def test_a_rerun_removes_the_temp_file_of_a_shard_write_that_was_killed(tmp_path, capsys):
    import tempfile

    src, out, model_dir = tmp_path / "in", tmp_path / "out", tmp_path / "model"
    write_synthetic_shards(src, 12, grid=4, clip_dim=16, eva_dim=24, seed=0, shard_size=5)
    _model().save_pretrained(model_dir)
    argv = ["sample", "--model_path", str(model_dir), "--input_dir", str(src), "--output_dir",
            str(out), "--steps", "2", "--method", "euler", "--device", "cpu", "--no_progress"]
    assert cli.main(argv) == 0
    (out / "manifest.json").unlink()  # SIGKILL while writing shard 2: its tensors never landed
    (out / "shard-00002.json").unlink()
    (out / "shard-00002.safetensors").unlink()
    fd, tmp = tempfile.mkstemp(prefix=".shard-00002.safetensors.", suffix=".tmp", dir=out)
    os.write(fd, b"half a shard")
    os.close(fd)
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert f"removed 1 temp file(s) a killed run left in {out}" in capsys.readouterr().err
    assert not list(out.glob("*.tmp")) and shards.read_manifest(out).num_samples == 12


def test_sample_resume_regenerates_a_finished_shard_damaged_since(tmp_path, capsys, flip_bytes,
                                                                   tiny_model_dir):
    src, out = tmp_path / "in", tmp_path / "out"
    write_synthetic_shards(src, 12, grid=4, clip_dim=16, eva_dim=24, seed=0, shard_size=5)
    argv = ["sample", "--model_path", str(tiny_model_dir(16, 24)), "--input_dir", str(src),
            "--output_dir", str(out), "--steps", "2", "--method", "euler", "--device", "cpu",
            "--no_progress"]
    assert cli.main(argv) == 0
    clean = {p.name: files.sha256_file(p) for p in sorted(out.glob("shard-*"))}
    damaged = out / "shard-00001.safetensors"
    flip_bytes(damaged, 56)
    capsys.readouterr()
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"{damaged}: sha256 does not match its sidecar shard-00001.json "
                            "(damaged after it was written); generating shard 1 again\n")
    assert "resuming: 2 finished shards" in captured.out and "(5 generated now" in captured.out
    assert {p.name: files.sha256_file(p) for p in sorted(out.glob("shard-*"))} == clean


# ---------------------------------------------------------------------------------------------
# the resume contract: wherever a run is interrupted, the rerun's output is the uninterrupted
# run's, byte for byte


def _sample_argv(model, src, out):
    return ["sample", "--model_path", str(model), "--input_dir", str(src), "--output_dir",
            str(out), "--steps", "2", "--method", "euler", "--device", "cpu", "--no_progress"]


def _output_digests(out):
    return {p.name: files.sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted_sample(synth_shards, tiny_model_dir, tmp_path_factory):
    """(input dir, model dir, sha256 of every file an uninterrupted `sample` wrote): 3 shards."""
    src = synth_shards(12, grid=4, clip_dim=16, eva_dim=24, seed=0, shard_size=4)
    model, out = tiny_model_dir(16, 24), tmp_path_factory.mktemp("sample") / "out"
    assert cli.main(_sample_argv(model, src, out)) == 0
    digests = _output_digests(out)
    assert sorted(digests) == ["manifest.json", "sample_settings.json", "shard-00000.json",
                               "shard-00000.safetensors", "shard-00001.json",
                               "shard-00001.safetensors", "shard-00002.json",
                               "shard-00002.safetensors"]
    return src, model, digests


@pytest.mark.parametrize("killed_writing", [
    "sample_settings.json", "shard-00000.safetensors", "shard-00000.json",
    "shard-00001.safetensors", "shard-00001.json", "shard-00002.safetensors",
    "shard-00002.json", "manifest.json"])
def test_sample_killed_anywhere_resumes_to_the_uninterrupted_output(
        killed_writing, uninterrupted_sample, tmp_path, capsys, kill_writing):
    src, model, whole = uninterrupted_sample
    out = tmp_path / "out"
    kill_writing(killed_writing)
    with pytest.raises(KeyboardInterrupt, match=f"killed while writing {out / killed_writing}"):
        cli.main(_sample_argv(model, src, out))
    assert (out / f".{killed_writing}.killed.tmp").exists()  # what SIGKILL leaves
    capsys.readouterr()
    assert cli.main(_sample_argv(model, src, out)) == 0
    assert f"removed 1 temp file(s) a killed run left in {out}" in capsys.readouterr().err
    assert _output_digests(out) == whole


@pytest.mark.parametrize("lost", [1, 2, 3])
def test_sample_resumes_to_the_uninterrupted_output_after_its_last_shards_are_lost(
        lost, uninterrupted_sample, tmp_path):
    """Shards and manifest gone (a node's local cache wiped, a partial copy): the rerun writes
    exactly the missing shards again."""
    src, model, whole = uninterrupted_sample
    out = tmp_path / "out"
    assert cli.main(_sample_argv(model, src, out)) == 0
    (out / "manifest.json").unlink()
    for index in range(3 - lost, 3):
        for suffix in (".json", ".safetensors"):
            (out / f"shard-{index:05d}{suffix}").unlink()
    assert cli.main(_sample_argv(model, src, out)) == 0
    assert _output_digests(out) == whole
