"""`eva-repro evaluate` end to end on synthetic data with a small DiT trained in-process."""

import json
import math
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from eva_repro import cli
from eva_repro.bench.evaluate import nfe_within
from eva_repro.data import shards
from eva_repro.data.loader import open_training_data
from eva_repro.data.synth import write_synthetic_shards
from eva_repro.evaluation.baselines import fit_baselines
from eva_repro.evaluation.evaluate import (
    PREDICTORS,
    Distribution,
    EvalOptions,
    HeldOutBatch,
    evaluate,
    resolve_split,
)
from eva_repro.evaluation.generate import ModelDataMismatch
from eva_repro.flow.transport import token_cosine
from eva_repro.model import DiT, DiTConfig
from eva_repro.model.checkpoint import CheckpointError
from eva_repro.training.train import train
from eva_repro.utils import files

DIMS = dict(grid=4, clip_dim=32, eva_dim=64, seed=0)
FAST = dict(steps=6, sweep="none", control_samples=16, progress=False, plots=False)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, one_thread):
    """Synthetic shards + the run directory `eva-repro train` wrote for a small DiT on them.

    Module-scoped (not in conftest.py) so the thread setting is undone for other test files."""
    root = tmp_path_factory.mktemp("eval")
    data = root / "shards"
    write_synthetic_shards(data, 640, shard_size=256, **DIMS)
    run = root / "run"
    train({"data_dir": str(data), "output_dir": str(run), "model_size": "tiny", "max_steps": 400,
           "model_overrides": {"hidden": 96, "depth": 2, "n_heads": 4, "n_kv_heads": 2},
           "batch_size": 32, "eval_fraction": 0.2, "eval_every": 1000, "eval_samples": 8,
           "num_workers": 0, "progress": False, "tensorboard": False})
    split = open_training_data(data, eval_fraction=0.2)
    return {"root": root, "data": data, "run": run, "heldout": split.heldout_rows,
            "train": split.train_rows}


@pytest.fixture(scope="module")
def cli_report(trained_run):
    """The full CLI path once, with the sampler sweep and plots."""
    out = trained_run["root"] / "report"
    code = cli.main(["evaluate", "--model_path", str(trained_run["run"]), "--embeddings_dir",
                     str(trained_run["data"]), "--output_dir", str(out), "--num_samples", "64",
                     "--steps", "8", "--sweep", "small", "--sweep_samples", "16",
                     "--control_samples", "32", "--quiet"])
    assert code == 0
    return out, json.loads((out / "report.json").read_text())


def test_report_has_the_documented_keys(cli_report, trained_run):
    out, r = cli_report
    assert r["n_samples"] == 64
    for key in ("token_mean", "token_median", "token_p10", "image_mean", "global_mean", "bands",
                "above", "band", "per_position"):
        assert key in r["cosine"], key
    assert set(r["cosine"]["bands"]) == {"poor", "moderate", "high", "very high", "excellent"}
    assert sum(r["cosine"]["bands"].values()) == pytest.approx(1.0)
    assert len(r["cosine"]["per_position"]) == 16
    for name in ("mean", "ridge"):
        assert isinstance(r["baselines"][name]["token_mean"], float)
    assert isinstance(r["controls"]["shuffled"]["token_mean"], float)
    assert 0 <= r["retrieval"]["recall_at_1"] <= r["retrieval"]["recall_at_5"] <= 1
    assert r["sampler"] == {**r["sampler"], "method": "heun", "steps": 8, "nfe": 15.0,
                            "cfg_scale": 1.0, "shift": 1.0}
    assert set(r["velocity_cosine"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"}
    assert r["seed"] == 0 and r["model"]["source"] and r["data"]["grid"] == 4
    assert r["split"]["known"] is True and r["split"]["source"].endswith("split.json")
    assert r["baselines"]["ridge"]["fit"]["num_train_samples"] == len(trained_run["train"])
    methods = {(e["method"], e["shift"]) for e in r["sweep"]}
    assert methods == {(m, s) for m in ("euler", "heun", "dopri5") for s in (1.0, 3.0)}
    assert {e["cfg_scale"] for e in r["sweep"]} == {1.0, 1.5, 3.0}
    blip3o = [e for e in r["sweep"] if e.get("named") == "blip3o"]  # BLIP3-o's own settings
    assert [(e["method"], e["steps"], e["cfg_scale"], e["nfe"]) for e in blip3o] == [
        ("euler", 30, 3.0, 30.0)]
    assert set(r["plots"]) == {"histogram", "heatmap", "nfe"}  # their pixels: tests/test_report.py
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in r["plots"].values())
    md = (out / "report.md").read_text()
    assert f"**Quality: {r['cosine']['band']}**" in md and "ridge baseline" in md
    low, high = r["baselines"]["ridge"]["dit_minus_baseline_ci"]
    assert f"{r['baselines']['ridge']['dit_minus_baseline']:+.3f} [{low:+.3f}, {high:+.3f}]" in md


def test_trained_model_beats_mean_baseline_and_uses_its_condition(cli_report, trained_run):
    _, r = cli_report
    dit, mean = r["cosine"]["token_mean"], r["baselines"]["mean"]["token_mean"]
    shuffled = r["controls"]["shuffled"]["token_mean"]
    assert 0.45 < mean < 0.65  # what the synthetic map's per-position offsets explain
    assert dit > mean + 0.05, (dit, mean)
    assert shuffled < dit - 0.3, (shuffled, dit)  # wrong conditions: the cosine collapses
    assert r["baselines"]["ridge"]["token_mean"] > mean
    assert r["baselines"]["ridge"]["dit_minus_baseline_ci"][0] > 0  # above ridge, resolved
    assert r["retrieval"]["recall_at_1"] > 5 * r["retrieval"]["chance_at_1"]
    assert r["velocity_cosine"]["0.5"] > 0.5
    low, high = r["baselines"]["mean"]["dit_minus_baseline_ci"]  # the gap, with its interval
    assert 0.05 < low < r["baselines"]["mean"]["dit_minus_baseline"] < high
    # the synthetic target is a function of its condition: samples from another seed's noise
    # land next to the first ones, but are not the same draw
    assert 0.95 < r["controls"]["diversity"]["token_mean"] < 1.0


def test_distribution_metrics_of_the_dit_and_the_baselines(cli_report):
    out, r = cli_report
    d = r["distribution"]
    assert d["samples"] == r["n_samples"] == 64 and d["k"] == 3 and d["pooled_dim"] == 64
    assert "biased upward" in d["note"]  # 64 images for a 64-d covariance
    for name in ("dit", "ridge", "mean"):
        m = d[name]
        assert set(m) == {"fd_pooled", "fd_token", "precision", "recall", "samples", "tokens"}
        assert all(math.isfinite(m[key]) for key in ("fd_pooled", "fd_token")), m
        assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
        assert m["samples"] == 64 and m["tokens"] == 64 * 16
    assert d["ridge"]["fd_token"] > 0
    assert d["dit"]["fd_token"] < d["ridge"]["fd_token"] < d["mean"]["fd_token"] / 10
    assert d["dit"]["fd_pooled"] < d["ridge"]["fd_pooled"] < d["mean"]["fd_pooled"]
    assert d["mean"]["recall"] == 0.0 and d["mean"]["precision"] == 1.0  # one point for all images
    assert d["dit"]["recall"] > 0.5
    md = (out / "report.md").read_text()
    assert "## Distribution" in md and f"| ridge baseline | {d['ridge']['fd_pooled']:.4g} |" in md


def test_distribution_needs_more_images_than_neighbours():
    tokens = torch.randn(3, 4, 8)
    distribution = Distribution(torch.device("cpu"))
    distribution.update(HeldOutBatch([0, 1, 2], tokens, tokens, tokens),
                        {name: tokens for name in PREDICTORS})
    d = distribution.result()
    assert d["skipped"] == "needs more than 3 images, got 3" and "dit" not in d


def test_evaluation_is_deterministic_and_warns_on_too_many_samples(trained_run, capsys):
    kw = dict(FAST, num_samples=10_000, baseline_samples=200)
    a = evaluate(trained_run["run"], trained_run["data"], None, **kw)
    assert "larger than the" in capsys.readouterr().err
    assert a["n_samples"] == len(trained_run["heldout"]) and a["n_requested"] == 10_000
    assert any("evaluating all" in w for w in a["warnings"])
    b = evaluate(trained_run["run"], trained_run["data"], None, EvalOptions(**kw))
    for key in ("token_mean", "image_mean", "per_position"):
        assert a["cosine"][key] == b["cosine"][key]
    assert a["controls"] == b["controls"] and a["velocity_cosine"] == b["velocity_cosine"]
    c = evaluate(trained_run["run"], trained_run["data"], None, **{**kw, "seed": 1})
    assert c["cosine"]["token_mean"] != a["cosine"]["token_mean"]
    # the noise is keyed by sample id, not by batch: another batch size scores the same
    d = evaluate(trained_run["run"], trained_run["data"], None, **{**kw, "batch_size": 3})
    assert d["cosine"]["token_mean"] == pytest.approx(a["cosine"]["token_mean"], abs=1e-5)
    for name in ("dit", "ridge"):  # the token moments streamed over 3-image batches: the same
        assert d["distribution"][name] == pytest.approx(a["distribution"][name], rel=1e-3)
    assert d["velocity_cosine"] == pytest.approx(a["velocity_cosine"], abs=1e-5)


def test_model_dir_without_split_says_so(trained_run, tmp_path):
    r = evaluate(trained_run["run"] / "model", trained_run["data"], tmp_path, **FAST,
                 num_samples=16, baseline_samples=100)
    # a model dir inside a run dir still finds the run's split
    assert r["split"]["known"] is True
    other = tmp_path / "copy"
    DiT.from_pretrained(trained_run["run"] / "model").save_pretrained(other)
    r = evaluate(other, trained_run["data"], tmp_path / "o", **FAST, num_samples=16,
                 baseline_samples=100, eval_fraction=0.1)
    assert r["split"]["known"] is False and "no training split known" in r["split"]["note"]
    assert r["split"]["model_trained_on"] == "unknown"
    assert "no training split known" in (tmp_path / "o" / "report.md").read_text()


def test_evaluate_model_py_shim_has_the_same_flags(trained_run, tmp_path, monkeypatch):
    out = tmp_path / "shim"
    monkeypatch.setattr(sys, "argv", [
        "evaluate_model.py", "--model_path", str(trained_run["run"]), "--embeddings_dir",
        str(trained_run["data"]), "--output_dir", str(out), "--num_samples", "8", "--steps", "2",
        "--sweep", "none", "--no_plots", "--quiet", "--baseline_samples", "64"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "evaluate_model.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert json.loads((out / "report.json").read_text())["n_samples"] == 8


# -- bad input: one clear line naming the file -------------------------------------------------


def test_dims_that_do_not_match_the_shards(trained_run, tmp_path, one_line_error):
    write_synthetic_shards(tmp_path / "wide", 20, grid=4, clip_dim=48, eva_dim=64, seed=0)
    one_line_error(lambda: evaluate(trained_run["run"], tmp_path / "wide", None, **FAST),
                   "clip_dim 48 vs model cond_dim 32", ModelDataMismatch)


def test_checkpoint_from_another_architecture(trained_run, tmp_path, one_line_error):
    bad = tmp_path / "other"
    DiT(DiTConfig(target_dim=64, cond_dim=32, hidden=32, depth=1, n_heads=4, n_kv_heads=2)
        ).save_pretrained(bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architecture": "some-unet"}))
    one_line_error(lambda: evaluate(bad, trained_run["data"], None, **FAST), "some-unet")


def test_run_dir_without_model_and_missing_path(tmp_path, trained_run, capsys, one_line_error):
    run = tmp_path / "run"
    files.atomic_write_json(run / "run_config.json", {})
    message = one_line_error(lambda: evaluate(run, trained_run["data"], None, **FAST),
                             "run directory with no model", CheckpointError)
    # the CLI prints it as one `error:` line and exits 2
    assert cli.main(["evaluate", "--model_path", str(run), "--embeddings_dir",
                     str(trained_run["data"]), "--output_dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"
    with pytest.raises(ValueError, match="does not exist"):
        evaluate(tmp_path / "nope", trained_run["data"], None, **FAST)


def test_empty_shard_dir(tmp_path, trained_run, one_line_error):
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: evaluate(trained_run["run"], tmp_path / "empty", None, **FAST),
                   "holds no shards", shards.ShardError)


def test_nfe_within_one_percent():
    curve = [{"nfe": 1, "cosine": 0.80}, {"nfe": 2, "cosine": 0.70}, {"nfe": 4, "cosine": 0.60},
             {"nfe": 8, "cosine": 0.695}, {"nfe": 16, "cosine": 0.70}]
    # nfe 2 is within 1% of 0.70 but nfe 4 is not: it counts from 8 on
    assert nfe_within(curve, 0.70) == 8


def test_cls_token_is_reported_apart_from_the_patch_grid(tmp_path, one_thread):
    write_synthetic_shards(tmp_path / "cls", 40, include_cls=True, **DIMS)
    torch.manual_seed(0)
    DiT(DiTConfig(target_dim=64, cond_dim=32, hidden=32, depth=1, n_heads=4, n_kv_heads=2,
                  token_mode="cls_patch")).save_pretrained(tmp_path / "model")
    r = evaluate(tmp_path / "model", tmp_path / "cls", tmp_path / "out",
                 **{**FAST, "plots": True}, eval_fraction=0.3)
    assert len(r["cosine"]["per_position"]) == 17 and "cls_mean" in r["cosine"]
    assert r["cosine"]["cls_mean"] == pytest.approx(r["cosine"]["per_position"][0], abs=1e-5)
    assert (tmp_path / "out" / "cosine_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert "nfe" not in r["plots"]  # no sweep, no curve


def test_a_patch_only_model_on_cls_shards_is_scored_on_the_patch_tokens(tmp_path, one_thread,
                                                                        one_line_error):
    """As the trainer does (--training_mode patch_only on CLS shards), the CLS row is dropped:
    the DiT and both baselines are scored on the same 16 patch tokens."""
    data = tmp_path / "cls"
    write_synthetic_shards(data, 40, include_cls=True, **DIMS)
    torch.manual_seed(0)
    DiT(DiTConfig(target_dim=64, cond_dim=32, hidden=32, depth=1, n_heads=4, n_kv_heads=2,
                  token_mode="patch_only", tokens=16)).save_pretrained(tmp_path / "model")
    r = evaluate(tmp_path / "model", data, tmp_path / "out", **FAST, eval_fraction=0.3)
    assert r["data"]["cls_dropped"] and not r["data"]["cls_scored"]
    assert r["data"]["scored_tokens"] == len(r["cosine"]["per_position"]) == 16
    assert "cls_mean" not in r["cosine"]
    assert "Scored on the 16 patch tokens" in (tmp_path / "out" / "report.md").read_text()
    reader = shards.ShardReader(data)
    train, heldout = shards.split_indices(reader.keys(), 0.3)
    _, ridge = fit_baselines(reader, sorted(train), progress=False, drop_cls=True)
    assert r["baselines"]["ridge"]["fit"]["cls_dropped"] and ridge.bias.shape[0] == 16
    rows = reader.gather(heldout)
    patch_cos = token_cosine(ridge.predict(rows["clip"][:, 1:]), rows["eva"][:, 1:].float())
    assert r["baselines"]["ridge"]["token_mean"] == pytest.approx(patch_cos.mean().item(), abs=1e-4)
    # a CLS model cannot be scored on shards without the CLS token
    write_synthetic_shards(tmp_path / "patches", 40, **DIMS)
    DiT(DiTConfig(target_dim=64, cond_dim=32, hidden=32, depth=1, n_heads=4, n_kv_heads=2,
                  token_mode="cls_patch")).save_pretrained(tmp_path / "cls_model")
    one_line_error(lambda: evaluate(tmp_path / "cls_model", tmp_path / "patches", None, **FAST),
                   "include_cls=False vs model token_mode 'cls_patch'", ModelDataMismatch)


def test_split_of_another_data_dir_keeps_the_runs_fraction_and_salt(tmp_path):
    keys = [f"img-{i}" for i in range(200)]
    loaded = SimpleNamespace(split={"data_dir": str(tmp_path / "elsewhere"), "eval_fraction": 0.3,
                                    "salt": "other"}, source="run dir", run_dir=tmp_path)
    heldout, train, info = resolve_split(loaded, SimpleNamespace(root=tmp_path), keys, 0.1)
    assert (train, heldout) == shards.split_indices(keys, 0.3, "other")
    assert heldout != shards.split_indices(keys, 0.3)[1]  # the default salt splits otherwise
    assert not info["known"] and "salt 'other'" in info["source"]
