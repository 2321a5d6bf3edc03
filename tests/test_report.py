"""The rendering of a finished evaluation (report.json, report.md, the plots) from a hand-made
report dict: no model, no shards (tests/test_evaluate.py runs the whole command)."""

import copy
import json

import pytest
import torch
from PIL import Image

from eva_repro.evaluation.report import PLOTS, markdown, write_outputs


def _summary(token_mean: float) -> dict:
    return {"token_mean": token_mean, "token_median": token_mean + 0.01,
            "token_p10": token_mean - 0.1, "image_mean": token_mean, "global_mean": token_mean + 0.05}


def _sweep_entry(method: str, steps: int, shift: float, cfg_scale: float, nfe: float,
                 token_mean: float) -> dict:
    return {"method": method, "steps": steps, "shift": shift, "cfg_scale": cfg_scale, "nfe": nfe,
            "token_mean": token_mean, "n_samples": 16}


@pytest.fixture
def report() -> dict:
    """The keys of `evaluate.build_report` that the renderer reads, for a 4 x 4 grid."""
    def baseline(token_mean: float, ci: list[float]) -> dict:
        return {**_summary(token_mean), "fit": {"num_train_samples": 500},
                "dit_minus_baseline": 0.82 - token_mean, "dit_minus_baseline_ci": ci,
                "error_reduction": 1 - 0.18 / (1 - token_mean)}

    return {
        "n_samples": 64,
        "seed": 0,
        "model": {"path": "/runs/a"},
        "cosine": {**_summary(0.82), "band": "very high",
                   "bands": {"poor": 0.0, "moderate": 0.1, "high": 0.2, "very high": 0.5,
                             "excellent": 0.2},
                   "per_position": [0.7 + 0.01 * i for i in range(16)]},
        "baselines": {"mean": baseline(0.55, [0.25, 0.29]), "ridge": baseline(0.81, [-0.01, 0.03])},
        "controls": {"shuffled": {**_summary(0.3), "drop": 0.52},
                     "diversity": {"token_mean": 0.9}},
        "retrieval": {"pool_size": 64, "recall_at_1": 0.5, "recall_at_5": 0.8,
                      "chance_at_1": 1 / 64, "ridge": {"recall_at_1": 0.4, "recall_at_5": 0.7}},
        "distribution": {
            "samples": 64, "k": 3, "pooled_dim": 1024,
            "note": "64 images <= pooled dim 1024: the pooled covariances are rank-deficient",
            "dit": {"fd_pooled": 0.0123, "fd_token": 81.5, "precision": 0.7, "recall": 0.65},
            "ridge": {"fd_pooled": 0.0301, "fd_token": 240.0, "precision": 0.9, "recall": 0.2},
            "mean": {"fd_pooled": 0.5, "fd_token": 900.0, "precision": 1.0, "recall": 0.0}},
        "velocity_cosine": {"0.1": 0.9, "0.5": 0.7},
        "sampler": {"method": "heun", "steps": 8, "nfe": 15.0, "cfg_scale": 1.0, "shift": 1.0},
        "sweep": [_sweep_entry("euler", s, shift, 1.0, s, 0.7 + 0.01 * s) for s in (1, 2, 4)
                  for shift in (1.0, 3.0)]
        + [_sweep_entry("heun", 4, 1.0, 1.0, 7, 0.8), _sweep_entry("euler", 4, 1.0, 3.0, 8, 0.79)],
        "split": {"source": "run/split.json", "model_trained_on": "the training split",
                  "evaluated_on": "the held-out split", "baselines_fit_on": "the training split"},
        "data": {"cls_scored": False},
        "warnings": [],
    }


def test_plots_are_valid_pngs(report, tmp_path):
    write_outputs(report, torch.linspace(0.3, 0.95, 64 * 16).view(64, 16), tmp_path, plots=True)
    assert report["plots"] == PLOTS
    assert json.loads((tmp_path / "report.json").read_text())["plots"] == PLOTS
    for name in report["plots"].values():
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200


def test_without_plots_or_sweep(report, tmp_path):
    write_outputs(report, torch.rand(64, 16), tmp_path / "a", plots=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["report.json", "report.md"]
    assert "plots" not in report
    # a CLS token first (17 positions, the grid from the other 16) and no sweep: no NFE curve
    cls = {**report, "sweep": [], "data": {"cls_scored": True},
           "cosine": {**report["cosine"], "per_position": [0.5] + report["cosine"]["per_position"]}}
    write_outputs(cls, torch.rand(64, 17), tmp_path / "b", plots=True)
    assert set(cls["plots"]) == {"histogram", "heatmap"}
    assert not (tmp_path / "b" / PLOTS["nfe"]).exists()


def test_markdown_says_how_the_dit_compares(report):
    md = markdown(report)
    assert md.startswith("# Evaluation of `/runs/a`\n") and md.endswith("\n")
    assert "**Quality: very high**: mean per-image cosine **0.820** on 64 held-out images" in md
    assert "| mean-token baseline | 0.550 |" in md
    assert "+0.270 [+0.250, +0.290] (60% less error)" in md  # interval above 0
    assert "+0.010 [-0.010, +0.030]: level" in md  # interval holds 0
    assert "falls: the condition is used" in md
    assert "best 0.800 with heun shift 1 CFG 1 at 7 NFE" in md
    assert "Images per band: poor 0%, moderate 10%, high 20%, very high 50%, excellent 20%" in md
    assert "**Note:**" not in md and "**Warning:**" not in md
    assert "## Distribution" in md and "| FD pooled | FD token | precision | recall |" in md
    assert "| **DiT** | 0.0123 | 81.5 | 0.700 | 0.650 |" in md
    assert "| ridge baseline | 0.0301 | 240 | 0.900 | 0.200 |" in md
    assert "| mean-token baseline | 0.5 | 900 | 1.000 | 0.000 |" in md
    assert "on 64 images. Lower FD and higher recall than ridge" in md and "rank-deficient" in md


def test_markdown_flags_what_went_wrong(report):
    r = copy.deepcopy(report)
    r["baselines"]["ridge"].update(dit_minus_baseline=-0.05, dit_minus_baseline_ci=[-0.07, -0.03])
    r["controls"]["shuffled"]["drop"] = 0.0
    r["split"]["note"] = "no training split known"
    r["warnings"] = ["something odd"]
    r["sweep"] = [_sweep_entry("euler", 1, 1.0, 1.0, 1, 0.9)]
    md = markdown(r)
    assert "-0.050 [-0.070, -0.030]: the baseline is better" in md
    assert "does NOT fall: the model ignores its condition" in md
    assert "**Note:** no training split known." in md and "**Warning:** something odd." in md
    assert "One Euler step returns the model's estimate of the conditional mean" in md
    r["controls"] = {}  # no controls (a single image): no shuffled row, no diversity line
    r["distribution"] = {"samples": 1, "k": 3, "skipped": "needs more than 3 images, got 1"}
    md = markdown(r)
    assert "shuffled conditions" not in md and "Diversity" not in md
    assert "Not computed: needs more than 3 images, got 1." in md and "FD pooled" not in md
    del r["distribution"]  # a report dict without the distribution metrics
    assert "## Distribution" not in markdown(r)


def test_markdown_says_how_the_split_grouped_its_keys(report):
    r = copy.deepcopy(report)
    assert "Grouping: not recorded" in markdown(r)  # a split without group_by
    r["split"].update(group_by=None, num_groups=40, num_heldout_groups=8)
    assert "Grouping: none: each key held out on its own" in markdown(r)
    r["split"].update(group_by=r"(.+)-view\d{4,}\.jpg$", num_groups=20, num_heldout_groups=4)
    assert ("Grouping: keys held out in groups by `--group_by (.+)-view\\d{4,}\\.jpg$`: 4 of 20 "
            "groups held out, every key of a group on one side.") in markdown(r)


def test_the_first_lines_say_what_the_score_of_the_default_head_does_not_measure(report):
    from eva_repro.model import DiTConfig, model_config
    from eva_repro.model.dit import card_caveat, score_caveat

    default = model_config("next-dit", "tiny", "eva-repro", target_dim=8, cond_dim=8)
    pure = model_config("next-dit", "tiny", "blip3o", target_dim=8, cond_dim=8)
    assert score_caveat(pure) is None and score_caveat(DiTConfig(cond_align=False, cond_linear=False)) is None
    assert card_caveat(pure) is None and card_caveat(default).startswith("This is eva-repro's default")
    with_caveat = {**report, "model": {**report["model"], "caveat": score_caveat(default)}}
    lines = markdown(with_caveat).splitlines()
    assert lines[2].startswith("> This is eva-repro's default head") and "3D RoPE, timestep" in lines[2]
    assert not markdown(report).splitlines()[2].startswith(">")
