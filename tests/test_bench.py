"""`eva-repro bench` at quick size: one suite end to end through the CLI, its JSON result."""

import json

import pytest

from eva_repro import cli


def test_model_suite_quick_writes_its_json_with_a_measured_peak(tmp_path, capsys):
    assert cli.main(["bench", "--suite", "model", "--quick", "--output_dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "model.json").read_text())
    assert result["suite"] == "model" and result["wall_s"] > 0
    assert result["compute_dtype"] in ("float32", "bfloat16 autocast")  # CPU or CUDA
    assert result["matmul_peak_gflops"] > 1  # measured in the same run, not a constant
    tiny = result["presets"][0]
    assert tiny["preset"] == "tiny" and tiny["shape"] == "256x4096" and not tiny["compiled"]
    assert tiny["samples_per_s"] > 0 and 0 < tiny["fraction_of_peak"] < 2
    assert '"suite": "model"' in capsys.readouterr().out


def test_quality_suite_scores_against_both_baselines_and_keeps_finished_problems(tmp_path,
                                                                                 monkeypatch):
    from eva_repro.bench import quality

    problem = dict(num_samples=40, grid=2, clip_dim=8, eva_dim=8, seed=0)
    monkeypatch.setattr(quality, "PROBLEMS", {"a": problem, "b": {**problem, "seed": 1}})
    monkeypatch.setattr(quality, "QUICK", {"a": 3, "b": 3})
    blip3o = quality.CONFIGS["blip3o"]
    monkeypatch.setattr(quality, "CONFIGS", {"eva-repro": {}})
    real = quality.run_problem

    def second_problem_dies(data, steps, label, work, **options):
        if work.name == "b":
            raise RuntimeError("killed")
        return real(data, steps, label, work, model_overrides={"depth": 1}, **options)

    monkeypatch.setattr(quality, "run_problem", second_problem_dies)
    with pytest.raises(RuntimeError, match="killed"):
        quality.run(tmp_path, quick=True)
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["complete"] is False and list(saved["problems"]) == ["a"]
    run = saved["problems"]["a"][0]
    assert run["variant"] == "eva-repro" and [p["step"] for p in run["curve"]] == [0, 1, 2, 3]
    assert 0 < run["mean"] < 1 and 0 < run["ridge"] <= 1 and -1 <= run["dit"] <= 1
    assert run["heldout_samples"] >= 8 and run["train_s"] > 0
    low, high = run["dit_minus_ridge_ci"]
    assert low <= round(run["dit"] - run["ridge"], 4) <= high
    monkeypatch.setattr(quality, "PROBLEMS", {"a": problem})
    monkeypatch.setattr(quality, "QUICK", {"a": 3})
    monkeypatch.setattr(quality, "CONFIGS", {"eva-repro": {}, "blip3o": blip3o})
    monkeypatch.setattr(quality, "run_problem", lambda data, steps, label, work, **kw: real(
        data, steps, label, work, model_overrides={"hidden": 32, "depth": 1, "n_heads": 2,
                                                   "n_kv_heads": 1}, **kw))
    result = quality.run(tmp_path, quick=True)
    assert result["complete"] is True and (tmp_path / "quality.png").stat().st_size > 0
    # the pure recipe learns later: it trains LENGTH times as long, not into a budget artefact
    steps = {r["variant"]: r["steps"] for r in result["problems"]["a"]}
    assert steps == {"eva-repro": 3, "blip3o": 3 * quality.LENGTH["blip3o"]}


def test_quality_suite_runs_only_the_chosen_problems_and_recipes(tmp_path, monkeypatch, capsys):
    from eva_repro import cli
    from eva_repro.bench import quality

    problem = dict(num_samples=40, grid=2, clip_dim=8, eva_dim=8, seed=0)
    monkeypatch.setattr(quality, "PROBLEMS", {"a": problem, "b": problem})
    ran = []

    def fake(data, steps, label, work, **options):
        ran.append((work.name, label))
        return {"variant": label, "curve": [{"step": 1, "heldout_cosine": 0.5}], "dit": 0.5,
                "ridge": 0.4, "mean": 0.1, "params_m": 0.1}

    monkeypatch.setattr(quality, "run_problem", fake)
    quality.run(tmp_path, quick=False, problems=["b"], recipes=["blip3o"])
    assert ran == [("b", "blip3o")]
    ran.clear()
    quality.run(tmp_path, quick=False, data_dirs=[str(tmp_path / "in8" / "shards"),
                                                  str(tmp_path / "in16" / "shards")],
                problems=["none"])
    assert ran == [("in8", "eva-repro"), ("in8", "blip3o"), ("in16", "eva-repro"), ("in16", "blip3o")]
    assert cli.main(["bench", "--suite", "quality", "--output_dir", str(tmp_path / "o"),
                     "--recipe", "blip30"]) == 2
    assert "--recipe blip30: unknown; choose from eva-repro, blip3o" in capsys.readouterr().err
