"""Training end to end on synthetic shards: learning, overfit, kill/resume, DDP/FSDP2, bad input."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eva_repro.data.loader import condition_whitening, open_training_data
from eva_repro.data.shards import ShardReader
from eva_repro.data.synth import write_synthetic_shards
from eva_repro.evaluation.evaluate import evaluate
from eva_repro.model import VARIANTS
from eva_repro.model import checkpoint as ckpt
from eva_repro.training import train as train_mod
from eva_repro.utils.preemption import EXIT_PREEMPTED, Preempted

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"hidden": 64, "depth": 2, "n_heads": 2, "n_kv_heads": 1}  # fast model for plumbing tests


@pytest.fixture(scope="module")
def small_data(synth_shards):
    """Grid 2 (4 tokens), 16-d condition, 32-d target: cheap steps."""
    return synth_shards(96, grid=2, clip_dim=16, eva_dim=32, seed=0, shard_size=32)



pytestmark = pytest.mark.usefixtures("one_thread")

def _cfg(data_dir, out, **kw):
    base = dict(data_dir=str(data_dir), output_dir=str(out), model_size="tiny",
                model_overrides=dict(SMALL), batch_size=4, max_steps=6, log_every=1,
                save_every=1000, eval_every=1000, eval_samples=8, eval_sampler_steps=4,
                num_workers=0, progress=False, tensorboard=False, seed=0)
    base.update(kw)
    return base


def _metrics(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _losses(run_dir):
    return {m["step"]: m["loss"] for m in _metrics(run_dir) if "loss" in m}


def test_loss_falls_and_heldout_cosine_rises(tmp_path):
    data = tmp_path / "data"
    write_synthetic_shards(data, 320, grid=2, clip_dim=16, eva_dim=32, seed=1, shard_size=128)
    out = tmp_path / "run"
    summary = train_mod.train(_cfg(
        data, out, model_overrides={"hidden": 96, "depth": 2, "n_heads": 4, "n_kv_heads": 2},
        batch_size=32, max_steps=240, eval_every=40, eval_samples=16, eval_sampler_steps=10,
        eval_fraction=0.05, log_every=20, learning_rate=3e-3, time_scheme="uniform"))
    metrics = _metrics(out)
    losses = [m["loss"] for m in metrics if "loss" in m]
    cosines = [m["heldout_cosine"] for m in metrics if "heldout_cosine" in m]
    assert summary["steps"] == 240 and summary["final_loss"] < 0.6 * losses[0]
    assert len(cosines) == 7 and cosines[-1] == summary["heldout_cosine"]  # steps 0, 40, ..., 240
    assert abs(cosines[0]) < 0.1 and summary["heldout_cosine"] > 0.85  # measured 0.94
    # rises, then holds its plateau (13 held-out samples: +-0.005 between evaluations)
    assert cosines[1] > cosines[0] + 0.5 and cosines[-1] >= max(cosines) - 0.02
    assert {"velocity_cosine", "grad_norm", "lr", "samples_per_s", "data_wait_fraction"} <= set(metrics[1])
    split = json.loads((out / "split.json").read_text())
    assert split["num_heldout"] == summary["heldout_samples"] == len(split["heldout_keys"]) > 0
    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["data_dir"] == str(data.resolve()) and run_config["model"]["hidden"] == 96
    assert run_config["model"]["target_norm"] == pytest.approx(summary["target_norm"])
    assert summary["target_norm"] > 1.0
    loaded = ckpt.load_model(out)  # the exported EMA model, with its split
    assert loaded.source.startswith("run dir (exported") and loaded.split == split
    assert loaded.model.config.target_norm == pytest.approx(summary["target_norm"])


@pytest.mark.slow
def test_overfit_tiny_preset_on_8_samples(tmp_path):
    """The public reference's sanity bar with default hyperparameters: tiny preset, 8 samples, batch 8, 300
    steps on CPU, sampled cosine (EMA) on exactly those samples > 0.8."""
    data = tmp_path / "data"
    write_synthetic_shards(data, 8, grid=4, clip_dim=64, eva_dim=128, seed=0)
    out = tmp_path / "run"
    summary = train_mod.train(dict(
        data_dir=str(data), output_dir=str(out), model_size="tiny", batch_size=8,
        overfit_test_size=8, eval_fraction=0.0, num_workers=0, progress=False, tensorboard=False,
        save_every=10_000, eval_every=10_000, log_every=50))
    assert summary["steps"] == 300 and summary["overfit_samples"] == 8
    assert summary["train_samples"] == 8 and summary["heldout_cosine"] is None
    assert summary["final_loss"] < 0.5 * _metrics(out)[1]["loss"]
    # measured 0.987 (0.09 before the model had an absolute position embedding)
    assert summary["overfit_passed"] and summary["overfit_cosine"] > 0.9, summary


def _kill_at(step, cfg, threads):
    """Run `cfg` in a subprocess that SIGKILLs itself right after optimiser step `step`."""
    script = textwrap.dedent(f"""
        import json, os, signal, sys, torch
        torch.set_num_threads({threads})
        from eva_repro.training.train import train
        def on_step(s, record):
            if s == {step}:
                os.kill(os.getpid(), signal.SIGKILL)
        train(json.loads(sys.argv[1]), on_step=on_step)
    """)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cfg)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_sigkill_and_resume_continues_the_exact_trajectory(tmp_path, small_data):
    reference = tmp_path / "reference"
    full = train_mod.train(_cfg(small_data, reference, max_steps=10, save_every=4))
    killed = tmp_path / "killed"
    cfg = _cfg(small_data, killed, max_steps=10, save_every=4, resume="auto")
    _kill_at(7, cfg, torch.get_num_threads())  # checkpoints at 4; steps 5-7 logged, then lost
    assert [p.name for p in ckpt.list_checkpoints(killed)] == ["step-00000004"]
    assert max(_losses(killed)) == 7
    resumed = train_mod.train(cfg)
    assert resumed["resumed_from"].endswith("step-00000004")
    want, got = _losses(reference), _losses(killed)
    assert sorted(got) == list(range(1, 11))  # steps 5-7 of the killed run were replaced
    assert [got[s] for s in range(5, 11)] == [want[s] for s in range(5, 11)]  # exactly equal
    assert resumed["final_loss"] == full["final_loss"]
    a = load_file(str(reference / "model" / "model.safetensors"))
    b = load_file(str(killed / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_and_resume_continues_the_exact_trajectory(tmp_path, small_data):
    reference = tmp_path / "reference"
    train_mod.train(_cfg(small_data, reference, max_steps=10, save_every=4))
    stopped = tmp_path / "stopped"
    cfg = _cfg(small_data, stopped, max_steps=10, save_every=4, resume="auto")

    def preempt_at_6(step, record):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # what Slurm / Kubernetes send first

    with pytest.raises(Preempted, match="SIGTERM at step 6 of 10"):
        train_mod.train(cfg, on_step=preempt_at_6)
    assert [p.name for p in ckpt.list_checkpoints(stopped)] == ["step-00000004", "step-00000006"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = train_mod.train(cfg)
    assert resumed["resumed_from"].endswith("step-00000006")
    want, got = _losses(reference), _losses(stopped)
    assert sorted(got) == list(range(1, 11)) and got == want  # no step lost or changed


def _last_logged_step(run_dir):
    """Highest step in metrics.jsonl so far (the file is being written: a line may be partial)."""
    try:
        return max(_losses(run_dir), default=0)
    except (OSError, json.JSONDecodeError):
        return 0


def test_cli_exits_75_on_sigusr1_with_the_last_step_saved(tmp_path, small_data):
    out = tmp_path / "run"
    args = _cli_args(_cfg(small_data, out, max_steps=100000)) + ["--save_every", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "eva_repro", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and _last_logged_step(out) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # Slurm's --signal=USR1@<seconds> warning
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "preempted: stopped on SIGUSR1" in err and "Traceback" not in err
    last = ckpt.latest_checkpoint(out)
    assert int(last.name.split("-")[1]) == max(_losses(out)) >= 3


def test_grad_accumulation_equals_the_larger_batch(tmp_path, small_data):
    # lr 1e-3: a fixed step size, so the tolerance below means the same whatever the preset default
    a = train_mod.train(_cfg(small_data, tmp_path / "a", batch_size=2, grad_accum=2, max_steps=2,
                             learning_rate=1e-3))
    b = train_mod.train(_cfg(small_data, tmp_path / "b", batch_size=4, grad_accum=1, max_steps=2,
                             learning_rate=1e-3))
    assert a["last_loss"] == pytest.approx(b["last_loss"], rel=1e-5)
    wa = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "a")).model
    wb = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "b")).model
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_reaches_the_saved_model(tmp_path, small_data):
    # that it computes the same gradients is test_model's; here: the flag reaches the model
    train_mod.train(_cfg(small_data, tmp_path / "a", max_steps=1, grad_checkpointing=True))
    assert json.loads((tmp_path / "a" / "model" / "config.json").read_text())["grad_checkpointing"]


def _torchrun(args, tmp_path, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", "-m", "eva_repro", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _cli_args(cfg):
    args = ["--data_dir", cfg["data_dir"], "--output_dir", cfg["output_dir"], "--model_size",
            "tiny", "--batch_size", str(cfg["batch_size"]), "--max_steps", str(cfg["max_steps"]),
            "--log_every", "1", "--eval_samples", "4", "--eval_sampler_steps", "2",
            "--num_workers", "0", "--no_progress", "--no_tensorboard", "--device", "cpu"]
    for k, v in cfg["model_overrides"].items():
        args += ["--model_override", f"{k}={v}"]
    return args


def test_ddp_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, small_data):
    single = tmp_path / "single"
    train_mod.train(_cfg(small_data, single, batch_size=4, max_steps=2, learning_rate=1e-3))
    ddp = tmp_path / "ddp"
    _torchrun(_cli_args(_cfg(small_data, ddp, batch_size=2, max_steps=2)) + ["--lr", "1e-3"],
              tmp_path)
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(single))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(ddp))
    assert b.meta["world_size"] == 2 and a.meta["data_position"] == b.meta["data_position"]
    for k in a.model:  # step 2 updates every parameter (step 1 only the zero-init output)
        torch.testing.assert_close(a.model[k], b.model[k], atol=1e-6, rtol=0)
    assert _losses(single)[2] == pytest.approx(_losses(ddp)[2], rel=1e-6)
    # a checkpoint written by 2 ranks resumes in 1 process
    resumed = train_mod.train(_cfg(small_data, ddp, batch_size=4, max_steps=3, resume="auto"))
    assert resumed["steps"] == 3 and resumed["resumed_from"].endswith("step-00000002")
    # 2 ranks resume past a damaged newest checkpoint: rank 0 alone hashes it and warns once
    damaged = ckpt.latest_checkpoint(ddp) / "ema.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:100])
    proc = _torchrun(_cli_args(_cfg(small_data, ddp, batch_size=2, max_steps=4))
                     + ["--resume", "auto"], tmp_path)
    assert proc.stderr.count("skipping a damaged checkpoint") == 1, proc.stderr[-2000:]
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("step-00000002")


def test_fsdp2_two_processes_on_cpu(tmp_path, small_data):
    out = tmp_path / "fsdp"
    _torchrun([*_cli_args(_cfg(small_data, out, batch_size=2, max_steps=2)), "--fsdp",
               "--lr", "1e-3"], tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out))  # full, unsharded tensors
    single = tmp_path / "single"
    train_mod.train(_cfg(small_data, single, batch_size=4, max_steps=2, learning_rate=1e-3))
    ref = ckpt.load_checkpoint(ckpt.latest_checkpoint(single))
    for k in ref.model:  # to 5% of lr, as in the Lumina-Next DDP test below (Adam near eps)
        assert state.model[k].shape == ref.model[k].shape
        torch.testing.assert_close(state.model[k], ref.model[k], atol=0.05 * 1e-3, rtol=0)
    assert _losses(single)[2] == pytest.approx(_losses(out)[2], rel=1e-6)
    assert ckpt.load_model(out).model.config.hidden == SMALL["hidden"]
    # and resumes in one process, still sharded (a world of 1)
    resumed = train_mod.train(_cfg(small_data, out, batch_size=4, max_steps=3, resume="auto",
                                   fsdp=True))
    assert resumed["steps"] == 3 and resumed["world_size"] == 1
    assert not torch.distributed.is_initialized()  # the run cleans up the group it made


def test_nan_samples_are_skipped_and_debug_mode_logs_layers(tmp_path):
    data = tmp_path / "data"
    write_synthetic_shards(data, 16, grid=2, clip_dim=16, eva_dim=32, shard_size=16)
    t = load_file(str(data / "shard-00000.safetensors"))
    t["eva"][3, 0, 0] = float("nan")
    save_file(t, str(data / "shard-00000.safetensors"))
    out = tmp_path / "run"
    summary = train_mod.train(_cfg(data, out, batch_size=4, max_steps=8, debug_mode=True,
                                   verify_checksums=False, eval_fraction=0.0))
    assert summary["skipped_samples"] == 2  # 2 epochs of 16 samples, one of them bad
    assert summary["nonfinite_steps"] == 0 and summary["final_loss"] == summary["final_loss"]
    last = _metrics(out)[-2]
    assert {"grad_norm/blocks.0", "grad_norm/out", "act/blocks.1/std"} <= set(last)


def test_non_finite_losses_in_a_row_stop_the_run_naming_step_and_batch(tmp_path, small_data,
                                                                      monkeypatch):
    real = train_mod.transport.velocity_loss

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        return dataclasses.replace(out, loss=out.loss * float("nan"))

    monkeypatch.setattr(train_mod.transport, "velocity_loss", poisoned)
    with pytest.raises(train_mod.TrainingDiverged, match=r"3 non-finite steps in a row, the last "
                                                         r"at step 3, batch 2 of epoch 0"):
        train_mod.train(_cfg(small_data, tmp_path / "run", max_nonfinite_steps=3))


def test_bad_inputs_fail_before_training_with_one_line(tmp_path, small_data, one_line_error):
    out = tmp_path / "run"
    one_line_error(lambda: train_mod.train(_cfg(small_data, out, model_size="huge")), "unknown --model_size")
    one_line_error(lambda: train_mod.train(_cfg(tmp_path / "none", out)), "does not exist")
    one_line_error(lambda: train_mod.train(_cfg(small_data, out, batch_size=500)), "larger than")
    one_line_error(lambda: train_mod.train(_cfg(small_data, out, loss_weight="snr")), "--loss_weight")
    one_line_error(lambda: train_mod.train(_cfg(small_data, out, training_mode="cls_patch")), "CLS")
    one_line_error(lambda: train_mod.train(_cfg(small_data, out, model_overrides={"nope": 1})),
                   "model_override")
    one_line_error(lambda: train_mod.train(_cfg(small_data, out, resume=str(tmp_path))),
                   "not a complete checkpoint")
    one_line_error(lambda: train_mod.train(_cfg(small_data, out, max_samples=4)),
                   "too few to hold any out")
    assert not (out / "checkpoints").exists()


def test_a_fresh_run_refuses_a_directory_holding_another_run(tmp_path, small_data, one_line_error):
    out = tmp_path / "run"
    train_mod.train(_cfg(small_data, out, max_steps=2, save_every=2))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    message = one_line_error(lambda: train_mod.train(_cfg(small_data, out, max_steps=1)),
                             "holds another training run")
    assert message == (f"{out}: holds another training run (run_config.json, checkpoints, "
                       "metrics.jsonl); pass --resume auto to continue it, or a new --output_dir")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing truncated, no checkpoint rotated away
    assert train_mod.train(_cfg(small_data, out, max_steps=3, resume="auto"))["steps"] == 3
    partial = tmp_path / "partial"  # killed before its first checkpoint: still a run
    partial.mkdir()
    (partial / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    one_line_error(lambda: train_mod.train(_cfg(small_data, partial)), r"\(metrics.jsonl\); pass")
    assert (partial / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_a_run_removes_the_temp_files_a_killed_run_left_and_nothing_else(tmp_path, small_data,
                                                                        capsys):
    import tempfile

    out = tmp_path / "run"
    train_mod.train(_cfg(small_data, out, max_steps=2, save_every=2))
    planted = []  # what a run killed mid-write leaves: files.py's atomic-write temp files
    for where, name in ((out, "summary.json"), (out, "run_config.json"),
                        (out / "model", "model.safetensors")):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=where)
        os.write(fd, b"half written")
        os.close(fd)
        planted.append(Path(tmp))
    kept = {out / "notes.tmp": b"mine", out / ".hidden": b"mine", out / "model" / "README": b"mine"}
    for path, data in kept.items():
        path.write_bytes(data)
    capsys.readouterr()
    assert train_mod.train(_cfg(small_data, out, max_steps=3, resume="auto"))["steps"] == 3
    err = capsys.readouterr().err
    assert f"removed 3 temp file(s) a killed run left in {out} (" in err
    assert not any(p.exists() for p in planted)
    assert not list(out.glob(".*.tmp")) and not list((out / "model").glob(".*.tmp"))
    assert {p: p.read_bytes() for p in kept} == kept  # other files, dot-files included, stay


def test_group_by_holds_out_whole_groups_and_a_resume_must_keep_the_split(tmp_path, small_data,
                                                                         one_line_error):
    out, group_by = tmp_path / "run", r"(\d)$"  # synth-0000042 -> group "2": 10 groups
    train_mod.train(_cfg(small_data, out, max_steps=2, save_every=2, eval_fraction=0.2,
                         group_by=group_by))
    split = json.loads((out / "split.json").read_text())
    assert (split["group_by"], split["num_groups"]) == (group_by, 10)
    held = {k[-1] for k in split["heldout_keys"]}
    assert len(held) == split["num_heldout_groups"] >= 2  # the floor: a fifth of the groups
    keys = ShardReader(small_data).keys()
    assert {k for k in keys if k[-1] in held} == set(split["heldout_keys"])  # whole groups only
    assert json.loads((out / "run_config.json").read_text())["args"]["group_by"] == group_by
    one_line_error(lambda: train_mod.train(_cfg(small_data, out, max_steps=3, resume="auto",
                                                eval_fraction=0.2)),
                   "resume with the run's own split flags")
    assert train_mod.train(_cfg(small_data, out, max_steps=3, resume="auto", eval_fraction=0.2,
                                group_by=group_by))["steps"] == 3


def test_public_reference_script_accepts_its_flags_and_reports_errors_in_one_line(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    train_mod.configure_parser(parser)
    cfg = train_mod.config_from_args(parser.parse_args([
        "--chunked_embeddings_dir", "D", "--output_dir", "O", "--batch_size", "8", "--num_epochs",
        "10", "--overfit_test_size", "10", "--debug_mode", "--model_size", "base",
        "--training_mode", "patch_only", "--model_override", "depth=2", "--loss_weight",
        "velocity", "--time_mean", "0"]))
    assert (cfg.data_dir, cfg.batch_size, cfg.num_epochs, cfg.overfit_test_size) == ("D", 8, 10, 10)
    assert (cfg.flow.loss_weight, cfg.flow.time_mean, cfg.flow.time_std) == ("velocity", 0.0, 1.0)
    assert cfg.debug_mode and cfg.model_size == "base" and cfg.training_mode == "patch_only"
    assert cfg.model_overrides == {"depth": 2}
    proc = subprocess.run([sys.executable, str(ROOT / "train_eva_reproduction.py"),
                           "--chunked_embeddings_dir", str(tmp_path / "missing"), "--output_dir",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_dit_beats_ridge_and_mean_on_held_out_data(tmp_path):
    """The learning issue's bar in CI: the default head and hyperparameters (a 128-wide, 2-block
    DiT, for time), a synthetic problem whose target is far from linear in the condition (ridge
    well below 1), held-out samples only. Measured: DiT 0.950, ridge 0.893, mean 0.468 (without
    the condition whitening 0.947; with the previous objective, velocity loss and
    logit-normal(-0.8, 0.8): 0.917)."""
    data = tmp_path / "data"
    write_synthetic_shards(data, 1600, grid=4, clip_dim=32, eva_dim=64, seed=3, gain=4.0)
    out = tmp_path / "run"
    small = dict(hidden=128, depth=2, n_heads=4, n_kv_heads=2)
    train_mod.train(dict(
        data_dir=str(data), output_dir=str(out), model_size="tiny", model_overrides=small,
        batch_size=32, max_steps=600, eval_fraction=0.2, num_workers=0, progress=False,
        tensorboard=False, save_every=10_000, eval_every=10_000, log_every=100))
    r = evaluate(out, data, num_samples=200, steps=20, sweep="none", progress=False, plots=False)
    dit = r["cosine"]["token_mean"]
    ridge, mean = r["baselines"]["ridge"]["token_mean"], r["baselines"]["mean"]["token_mean"]
    assert r["n_samples"] == 200 and ridge < 0.92, r  # a problem with room above the ridge
    assert dit > ridge + 0.02 and dit > mean + 0.3, (dit, ridge, mean)


def test_model_variant_selects_the_blip3o_head(tmp_path, small_data):
    out = tmp_path / "pure"
    train_mod.train(_cfg(small_data, out, max_steps=1, model_variant="blip3o"))
    config = json.loads((out / "model" / "config.json").read_text())
    assert {k: config[k] for k in VARIANTS["blip3o"]} == VARIANTS["blip3o"]
    default = tmp_path / "default"
    train_mod.train(_cfg(small_data, default, max_steps=1))
    config = json.loads((default / "model" / "config.json").read_text())
    assert config["prediction"] == "x" and config["cond_linear"] and config["tokens"] == 4
    with pytest.raises(train_mod.TrainingError, match="prediction='x'"):
        train_mod.train(_cfg(small_data, tmp_path / "bad", max_steps=1,
                             model_overrides={**SMALL, "prediction": "v"}))


def test_diffusers_lumina_next_backbone_learns_and_runs_through_evaluate(tmp_path):
    """--backbone lumina-next: diffusers' network trained, exported as a diffusers directory,
    and scored by the evaluator like any run, past the mean baseline on held-out data.

    One token per image: diffusers' cross-attention gives the condition keys no position (BLIP3-o
    conditions on a set of LLM states), so on a grid it must find the aligned condition token by
    content alone and learns slowly (bench --suite backbones). Measured: 0.90 vs mean 0.62."""
    data = tmp_path / "data"
    write_synthetic_shards(data, 400, grid=1, clip_dim=16, eva_dim=32, seed=3)
    out = tmp_path / "run"
    summary = train_mod.train(dict(
        data_dir=str(data), output_dir=str(out), backbone="lumina-next", model_size="tiny",
        model_overrides=dict(SMALL), batch_size=16, max_steps=300, eval_fraction=0.2,
        num_workers=0, progress=False, tensorboard=False, save_every=10_000, eval_every=10_000,
        log_every=100))
    from diffusers import LuminaNextDiT2DModel

    assert LuminaNextDiT2DModel.from_pretrained(out / "model" / "transformer").config.num_layers == 2
    r = evaluate(out, data, steps=20, sweep="none", progress=False, plots=False)
    dit, mean = r["cosine"]["token_mean"], r["baselines"]["mean"]["token_mean"]
    assert r["model"]["config"]["architecture"] == "diffusers-lumina-next"
    assert dit > mean + 0.15 and summary["params_m"] > 0, (dit, mean)


def test_ddp_two_processes_train_the_lumina_next_backbone_like_one(tmp_path, small_data):
    lumina = dict(backbone="lumina-next", batch_size=4, max_steps=2, learning_rate=1e-3)
    single = tmp_path / "single"
    train_mod.train(_cfg(small_data, single, **lumina))
    ddp = tmp_path / "ddp"
    _torchrun(_cli_args(_cfg(small_data, ddp, batch_size=2, max_steps=2))
              + ["--lr", "1e-3", "--backbone", "lumina-next"], tmp_path)
    a = ckpt.load_checkpoint(ckpt.latest_checkpoint(single))
    b = ckpt.load_checkpoint(ckpt.latest_checkpoint(ddp))
    assert b.meta["world_size"] == 2 and set(a.model) == set(b.model)
    # Adam's first steps move each weight by lr * g / (|g| + eps): for a gradient element near
    # eps, a summation-order difference of the all-reduce becomes a fraction of lr, so the
    # weights agree to 5% of lr; a DDP bug (gradients summed, not averaged, or another batch)
    # moves them by ~lr and the loss with them
    for k in a.model:
        torch.testing.assert_close(a.model[k], b.model[k], atol=0.05 * 1e-3, rtol=0)
    assert _losses(single)[2] == pytest.approx(_losses(ddp)[2], rel=1e-6)
    loaded = ckpt.load_model(ddp)
    assert type(loaded.model).__name__ == "LuminaNextDiT" and loaded.source.startswith("run dir")


def test_lumina_next_backbone_refuses_what_it_cannot_do_in_one_line(tmp_path, small_data,
                                                                     one_line_error):
    out = tmp_path / "run"
    lumina = dict(backbone="lumina-next")
    one_line_error(lambda: train_mod.train(_cfg(small_data, out, **lumina, model_variant="blip3o")),
                   "diffusers' own network")
    one_line_error(lambda: train_mod.train(_cfg(small_data, out, backbone="unet")), "unknown --backbone")
    one_line_error(lambda: train_mod.train(_cfg(small_data, out, model_size="blip3o")),
                   "for --backbone next-dit")
    cls = tmp_path / "cls"
    write_synthetic_shards(cls, 60, grid=2, clip_dim=16, eva_dim=32, seed=0, include_cls=True)
    one_line_error(lambda: train_mod.train(_cfg(cls, out, **lumina, training_mode="cls_patch")),
                   "no CLS slot")
    one_line_error(lambda: train_mod.train(_cfg(small_data, out, **lumina, grad_checkpointing=True)),
                   "gradient checkpointing")
    assert not (out / "checkpoints").exists()


def test_the_runs_held_out_cosine_is_the_evaluators(tmp_path, small_data):
    """One noise function keyed by row id (flow.sample_noise): the trainer's last held-out
    cosine and `eva-repro evaluate` on the same run, sampler and samples agree."""
    out = tmp_path / "run"
    summary = train_mod.train(_cfg(small_data, out, max_steps=20, eval_fraction=0.2,
                                   eval_samples=1000, eval_sampler_steps=4))
    r = evaluate(out, small_data, num_samples=1000, steps=4, method="heun", sweep="none",
                 progress=False, plots=False, control_samples=0)
    assert r["n_samples"] == summary["heldout_samples"] > 8
    assert r["cosine"]["token_mean"] == pytest.approx(summary["heldout_cosine"], rel=1e-5)


def test_whitening_is_fitted_on_the_training_split_and_can_be_turned_off(tmp_path, small_data):
    train_mod.train(_cfg(small_data, tmp_path / "w", max_steps=1, eval_fraction=0.2))
    weights = load_file(str(tmp_path / "w" / "model" / "model.safetensors"))
    rows = open_training_data(small_data, eval_fraction=0.2).train_rows
    mean, matrix = condition_whitening(ShardReader(small_data), rows, shrink=1.0)
    assert torch.equal(weights["cond_mean"], mean) and torch.equal(weights["cond_white"], matrix)
    off = dict(SMALL, cond_whiten=None)
    train_mod.train(_cfg(small_data, tmp_path / "off", max_steps=1, model_overrides=off))
    config = json.loads((tmp_path / "off" / "model" / "config.json").read_text())
    assert config["cond_whiten"] is None
    assert "cond_white" not in load_file(str(tmp_path / "off" / "model" / "model.safetensors"))


def test_a_patch_only_run_on_cls_shards_drops_the_cls_row_and_evaluates_the_same_way(tmp_path):
    data, out = tmp_path / "cls", tmp_path / "run"
    write_synthetic_shards(data, 60, grid=2, clip_dim=16, eva_dim=32, seed=0, include_cls=True)
    summary = train_mod.train(_cfg(data, out, max_steps=2, training_mode="patch_only",
                                   eval_fraction=0.2, eval_samples=100))
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["token_mode"] == "patch_only" and config["tokens"] == 4
    assert json.loads((out / "run_config.json").read_text())["drop_cls"] is True
    r = evaluate(out, data, None, num_samples=100, steps=4, method="heun", sweep="none",
                 progress=False, plots=False, control_samples=0)
    assert r["data"]["cls_dropped"] and len(r["cosine"]["per_position"]) == 4
    assert r["cosine"]["token_mean"] == pytest.approx(summary["heldout_cosine"], rel=1e-5)
