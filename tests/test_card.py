"""The report card: its files and exit code, and each learning, control and distribution check
failing on the input it is meant to catch (trained at the toy budget, or scored by hand)."""

import json
from dataclasses import replace

import pytest

from eva_repro import cli
from eva_repro.testbed import card as card_mod
from eva_repro.testbed.card import BUDGETS, FixedTime, NullCondition, Scored
from eva_repro.testbed.problems import problems

pytestmark = pytest.mark.usefixtures("one_thread")
TOY = BUDGETS["toy"]


def test_the_cli_writes_the_card_and_exits_with_its_verdict(tmp_path, capsys, synth_shards):
    out, real = tmp_path / "card", synth_shards(96, grid=2, clip_dim=16, eva_dim=24, seed=0)
    code = cli.main(["check", "--backbone", "next-dit", "--output_dir", str(out), "--budget", "toy",
                     "--device", "cpu", "--data", str(real)])
    card = json.loads((out / "check.json").read_text())
    assert code == (0 if card["passed"] else 1)
    names = [c["name"] for c in card["checks"]]
    assert len(names) == 23 and len(set(names)) == 23
    shards = next(c for c in card["checks"] if c["name"] == "learns_real0")  # --data: vs ridge
    assert shards["detail"].startswith(f"{real}: dit ") and "oracle" not in shards["detail"]
    assert {"learns_global", "learns_grid", "learns_neighbour", "learns_wide", "overfits_16_samples",
            "t_fixed_while_sampling", "guidance_null_condition", "distribution_grid"} <= set(names)
    for c in card["checks"]:
        assert set(c) >= {"passed", "value", "threshold", "meaning"} and c["meaning"]
    assert card["passed"] == all(c["passed"] is not False for c in card["checks"])
    assert card["scores"]["grid"]["dit"] > card["scores"]["grid"]["mean"] + 0.1  # it learned
    md = (out / "check.md").read_text()
    assert md.startswith("# eva-repro check: next-dit") and md.count("| learns_") == 5
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Scored:
    """The default head trained on the grid problem at the toy budget, scored held-out."""
    out = tmp_path_factory.mktemp("grid")
    p = problems(TOY.width, TOY.samples)["grid"]
    data = p.write(out / "data")
    options = card_mod.train_options("next-dit", "eva-repro", data, out / "run", TOY, "cpu")
    return card_mod.learn("grid", data, out / "run", options, TOY, p)


def _as(s: Scored, model) -> Scored:
    return replace(s, model=model, samples=card_mod.sample(model, s.clip, s.ids, TOY))


def test_controls_pass_a_trained_model_and_fail_it_with_t_or_the_condition_removed(grid):
    verdicts = {c.name: c.passed for c in card_mod.controls(grid, TOY)}
    assert all(verdicts.values()), verdicts
    blind = {c.name: c.passed for c in card_mod.controls(_as(grid, FixedTime(grid.model)), TOY)}
    assert blind["t_fixed_while_sampling"] is False
    uncond = {c.name: c.passed for c in card_mod.controls(_as(grid, NullCondition(grid.model)), TOY)}
    assert uncond["condition_shuffled_across_images"] is False
    assert uncond["condition_permuted_within_image"] is False
    assert uncond["guidance_null_condition"] is False


def test_the_learning_and_distribution_checks_fail_a_regressor_of_the_mean(grid):
    ridge = replace(grid, samples=grid.references["ridge"])
    oracle = replace(grid, samples=grid.references["oracle"])
    mean = replace(grid, samples=grid.references["mean"])
    assert card_mod.distribution_check(ridge).passed is False  # no spread around the mean
    assert card_mod.distribution_check(oracle).passed is True
    assert card_mod.learning_check(mean, True, False).passed is False
    assert card_mod.learning_check(mean, True, False).value == pytest.approx(0.0, abs=1e-6)
    assert card_mod.learning_check(oracle, True, False).value == pytest.approx(1.0, abs=1e-6)
    assert card_mod.learning_check(oracle, True, True).passed is None  # a set reader, by design
