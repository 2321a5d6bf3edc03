"""experiments/: the scripts behind the docs' results tables run, at toy size, end to end.

Each script runs under bash with `EVA_REPRO` pointing at a stub that records its argv and runs
nothing: every command must parse with the real parser, each flag spelt out in full (a renamed
flag fails here, even one whose old name is a prefix of the new). The recorded commands are then
replayed in this process, in order, with toy sizes appended (argparse keeps the last value of a
flag: fewer samples, steps and encoder blocks; the quality suite's problem list swapped for one
toy problem), so the script's own directories chain stage to stage, and the outputs the docs
quote (report.json, quality.json) must exist and hold finite numbers. demo.sh is only recorded:
its commands are `eva-repro demo` as tests/test_demo.py runs it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eva_repro import cli
from eva_repro.data.demo_images import write_demo_images

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--model_override", "hidden=32", "--model_override", "depth=1",
              "--model_override", "n_heads=2", "--model_override", "n_kv_heads=1"]
# appended to each command: the last value of a flag wins
TOY = {
    "synth": ["--num_samples", "40", "--grid", "2", "--clip_dim", "8", "--eva_dim", "8"],
    "extract": ["--encoder_depth", "1", "--limit", "10", "--batch_size", "10"],
    "train": ["--max_steps", "2", "--batch_size", "4", "--eval_every", "2", "--eval_samples", "2",
              "--eval_sampler_steps", "2", "--save_every", "2", "--no_tensorboard", *TINY_MODEL],
    "evaluate": ["--num_samples", "8", "--steps", "2", "--control_samples", "4",
                 "--baseline_samples", "64", "--sweep", "none", "--no_plots"],
    "bench": ["--quick"],
}


def _record(script: Path, tmp_path: Path, *args: str) -> list[list[str]]:
    subprocess.run(["bash", "-n", str(script)], check=True)  # the whole script parses
    calls = tmp_path / "calls.jsonl"
    stub = tmp_path / "stub.py"  # stands in for `eva-repro`: records its argv, runs nothing
    stub.write_text("import json, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    subprocess.run(["bash", str(script), *args], check=True, cwd=tmp_path,
                   env={"PATH": "/usr/bin:/bin", "EVA_REPRO": f"{sys.executable} {stub}"})
    argvs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert argvs, f"{script.name} ran no eva-repro command"
    for argv in argvs:
        parse_exactly(argv)
    return argvs


def parse_exactly(argv: list[str]) -> argparse.Namespace:
    """argv parsed by its command's own parser with abbreviations off: an unknown flag, or a
    prefix of a flag (what argparse would otherwise take for it), fails the test."""
    assert argv and argv[0] in cli.COMMANDS, f"not an eva-repro command: {argv}"
    parser = argparse.ArgumentParser(prog=f"eva-repro {argv[0]}", allow_abbrev=False)
    importlib.import_module(cli.COMMANDS[argv[0]][0]).configure_parser(parser)
    try:
        return parser.parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`eva-repro {' '.join(argv)}` does not parse (see its error above)")


def _toy(argv: list[str]) -> list[str]:
    return argv + TOY.get(argv[0], [])


@pytest.fixture
def toy_quality(monkeypatch):
    from eva_repro.bench import quality

    problem = dict(num_samples=40, grid=2, clip_dim=8, eva_dim=8, seed=0)
    monkeypatch.setattr(quality, "PROBLEMS", {"toy": problem})
    monkeypatch.setattr(quality, "QUICK", {"toy": 2})
    # the toy model keeps steps cheap; the suite's train options still go through the trainer
    real = quality.run_problem
    monkeypatch.setattr(quality, "run_problem", lambda data, steps, label, work, **kw: real(
        data, steps, label, work, model_overrides={"hidden": 32, "depth": 1, "n_heads": 2,
                                                   "n_kv_heads": 1}, **kw))


def _replay(argvs: list[list[str]]) -> None:
    for argv in argvs:
        assert cli.main(_toy(argv)) == 0, argv


def _finite(report: dict) -> None:
    for value in (report["cosine"]["token_mean"], report["baselines"]["mean"]["token_mean"],
                  report["baselines"]["ridge"]["token_mean"]):
        assert isinstance(value, float) and math.isfinite(value) and -1 <= value <= 1


def test_every_script_is_tested():
    scripts = {p.name for p in (ROOT / "experiments").iterdir() if p.suffix in (".sh", ".py")}
    assert scripts == {"blip3o_photos.sh", "demo.sh", "fsync_cost.py", "heldout_bugs.py", "imagenet.sh",
                       "learning.sh", "noise_cost.py", "quality.sh", "regrid.py", "testbed.sh"}


@pytest.mark.usefixtures("one_thread")
def test_regrid_scores_each_backbone_on_the_finer_condition_at_toy_size(tmp_path):
    script = runpy.run_path(str(ROOT / "experiments" / "regrid.py"))
    result = script["main"](tmp_path / "out", "toy", "0,1")
    assert json.loads((tmp_path / "out" / "regrid.json").read_text()) == json.loads(json.dumps(result))
    assert result["budget"] == "toy" and set(result["rows"]) == {"correct", "rope_1d", "plain_dit"}
    assert result["steps"] == 2 * script["BUDGETS"]["toy"].steps  # regrid trains twice as long
    for row in result["rows"].values():
        runs = row["per_seed"].values()
        assert row["seeds"] == 2 and row["seeds_passed"] == sum(r["passed"] for r in runs)
        assert row["card_passes"] == any(r["passed"] for r in runs)
        for r in runs:
            assert isinstance(r["passed"], bool) and math.isfinite(r["gap_closed"])
            assert set(r["scores"]) == {"dit", "mean", "ridge", "oracle"}
    seeds = [r["curve"] for r in result["rows"]["correct"]["per_seed"].values()]
    assert seeds[0] != seeds[1]  # another seed trains another run
    again = script["main"](tmp_path / "out", "toy", "0,1", reuse=True)  # judged, not retrained
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(result))


@pytest.mark.usefixtures("one_thread")
def test_learning_runs_every_family_at_toy_size(tmp_path):
    out = tmp_path / "out"
    argvs = _record(ROOT / "experiments" / "learning.sh", tmp_path, str(out))
    assert [a[0] for a in argvs] == ["synth", "train", "evaluate"] * 4
    _replay(argvs)
    families = sorted(p.name for p in out.iterdir())
    assert len(families) == 4
    for family in families:
        _finite(json.loads((out / family / "report" / "report.json").read_text()))
        curve = [json.loads(line) for line in (out / family / "run" / "metrics.jsonl").read_text()
                 .splitlines() if "heldout_cosine" in line]
        assert curve and all(math.isfinite(c["heldout_cosine"]) for c in curve)


@pytest.mark.usefixtures("one_thread")
def test_imagenet_extracts_trains_and_evaluates_at_toy_size(tmp_path):
    images, out = tmp_path / "images", tmp_path / "out"
    write_demo_images(images, 10)
    argvs = _record(ROOT / "experiments" / "imagenet.sh", tmp_path, str(images), str(out))
    assert [a[0] for a in argvs] == ["extract", "train", "evaluate"] * 2 + ["train", "evaluate"]
    _replay(argvs)
    for grid, tokens in ((8, 64), (16, 256)):
        report = json.loads((out / f"in{grid}" / "report" / "report.json").read_text())
        _finite(report)
        assert report["data"]["tokens"] == tokens
    plain = json.loads((out / "in8" / "run-nowhiten" / "model" / "config.json").read_text())
    assert plain["cond_whiten"] is None  # the pair differs in the whitening only
    _finite(json.loads((out / "in8" / "report-nowhiten" / "report.json").read_text()))


@pytest.mark.usefixtures("one_thread")
def test_blip3o_photos_trains_the_pure_head_longer_and_evaluates_it_at_toy_size(tmp_path):
    shards, out = tmp_path / "shards", tmp_path / "out"
    assert cli.main(["synth", "--output_dir", str(shards), *TOY["synth"]]) == 0
    argvs = _record(ROOT / "experiments" / "blip3o_photos.sh", tmp_path, str(shards), str(out), "3",
                    "--group_by", "(.+)")  # flags after EPOCHS reach the trainer
    assert [a[0] for a in argvs] == ["train", "evaluate"]
    train = parse_exactly(argvs[0])
    assert (train.model_variant, train.loss_weight, train.num_epochs) == ("blip3o", "velocity", 3)
    assert train.group_by == "(.+)"
    assert train.eval_every == 3 * 4 // 6  # 32 of the 40 samples train: 4 batches of 8 an epoch
    _replay(argvs)
    _finite(json.loads((out / "report" / "report.json").read_text()))
    config = json.loads((out / "run" / "model" / "config.json").read_text())
    # the pure head: v-prediction, and the condition reaches it through cross-attention only
    assert (config["prediction"], config["cond_align"], config["cond_linear"]) == ("v", False, False)


@pytest.mark.usefixtures("one_thread")
def test_testbed_judges_a_mutant_and_collects_its_table_at_toy_size(tmp_path):
    out = tmp_path / "out"
    argvs = _record(ROOT / "experiments" / "testbed.sh", tmp_path, str(out), "toy")
    assert [a[0] for a in argvs] == ["zoo"] * 3 and all("toy" in a for a in argvs)
    first = argvs[0] + ["--mutant", "t_ignored"]  # one card of the first table
    assert cli.main(first) == 0  # the mutant fails its card, as it must: the zoo exits 0
    table = json.loads((out / "zoo" / "zoo.json").read_text())
    failed = {c["name"] for c in table["t_ignored"]["checks"] if c["passed"] is False}
    assert "uses_t" in failed and not table["t_ignored"]["passed"]


def test_every_heldout_bug_changes_its_network_and_the_rewrites_are_named_must_pass():
    script = runpy.run_path(str(ROOT / "experiments" / "heldout_bugs.py"))
    from eva_repro.model import build_model, model_config
    from eva_repro.testbed.interface import perturbed, relative

    def net(name: str) -> torch.nn.Module:
        torch.manual_seed(0)
        cfg = model_config(f"{ROOT}/experiments/heldout_bugs.py:{name}", "tiny", "eva-repro",
                           target_dim=16, cond_dim=8, tokens=16, token_mode="patch_only", hidden=32,
                           depth=1, n_heads=4, n_kv_heads=2)
        return perturbed(build_model(cfg)).eval()

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 16, generator=g), torch.rand(2, generator=g)
    conds = torch.randn(2, 16, 8, generator=g), torch.randn(2, 64, 8, generator=g)  # grid, regrid
    drop = torch.tensor([True, False])  # one row takes the null condition
    for f in script["FACTORIES"]:
        name = f.__name__
        reference = net("plain_correct" if name.startswith("plain_") else "head_correct")
        bugged = net(name)
        bugged.load_state_dict(reference.state_dict())
        with torch.no_grad():
            bugged.train(name == "plain_pairs_shifted_in_training")  # that bug lives in training
            change = max(relative(bugged(x, t, c, drop), reference(x, t, c, drop)) for c in conds)
        assert change > 1e-4, f"{name} computes what its unmodified network computes"
    assert [f.__name__ for f in script["FACTORIES"] if script["must_pass"](f.__name__)] == [
        "plain_shift_scale_swapped_equivalent", "head_gqa_tiled_equivalent"]


@pytest.mark.usefixtures("one_thread")
def test_heldout_bugs_judges_a_factory_and_tabulates_its_card_at_toy_size(tmp_path):
    script = runpy.run_path(str(ROOT / "experiments" / "heldout_bugs.py"))
    rows = script["main"](tmp_path, "toy", ["head_queries_normalised_over_batch"])
    row = rows["head_queries_normalised_over_batch"]
    assert row["passed"] is False and row["must_pass"] is False and row["wall_s"] >= 0
    assert "batch_independent" in row["failed"]
    md = (tmp_path / "heldout.md").read_text().splitlines()
    assert md[2].startswith("| head_queries_normalised_over_batch | pure Next-DiT | FAILS: caught | ")
    card = tmp_path / "head_queries_normalised_over_batch" / "runs" / "grid" / "metrics.jsonl"
    stamp = card.stat().st_mtime_ns
    again = script["main"](tmp_path, "toy", ["head_queries_normalised_over_batch"], reuse=True)
    assert again == rows and card.stat().st_mtime_ns == stamp  # judged again, not retrained
    with pytest.raises(SystemExit, match="no factory"):
        script["main"](tmp_path, "toy", ["no_such_bug"])


@pytest.mark.usefixtures("one_thread", "toy_quality")
def test_quality_writes_its_json_at_toy_size(tmp_path):
    out = tmp_path / "out"
    argvs = _record(ROOT / "experiments" / "quality.sh", tmp_path, str(out))
    assert argvs == [["bench", "--suite", "quality", "--output_dir", str(out)]]
    _replay(argvs)
    result = json.loads((out / "quality.json").read_text())
    assert result["complete"] is True and set(result["problems"]) == {"toy"}
    runs = result["problems"]["toy"]
    assert [r["variant"] for r in runs] == ["eva-repro", "blip3o"]
    assert all(math.isfinite(r["dit"]) for r in runs), runs
    from eva_repro.bench import quality

    assert [r["steps"] for r in runs] == [2, 2 * quality.LENGTH["blip3o"]]  # the pure recipe: longer


def test_demo_runs_the_full_demo_and_the_quick_one_twice_each(tmp_path):
    out = tmp_path / "out"
    argvs = _record(ROOT / "experiments" / "demo.sh", tmp_path, str(out))
    assert argvs == [["demo", "--output_dir", str(out / "demo_200")],
                     ["demo", "--quick", "--output_dir", str(out / "demo_quick")]] * 2


def test_fsync_cost_script_turns_every_fsync_off_and_reports_medians(tmp_path, monkeypatch):
    """experiments/fsync_cost.py: 'off' leaves no fsync at all (none of a checkpoint's 15 is left),
    'on' is the shipped code; the report has both medians and their ratio."""
    import importlib.util
    import os

    path = Path(__file__).resolve().parents[1] / "experiments" / "fsync_cost.py"
    spec = importlib.util.spec_from_file_location("fsync_cost", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    model = script.DiT(script.DiTConfig(target_dim=8, cond_dim=8, hidden=16, depth=1, n_heads=2,
                                        n_kv_heads=1))
    state = script.training_state(model)
    with script.fsync_off():
        script.checkpoint.save_checkpoint(tmp_path / "off", state)
        model.save_pretrained(tmp_path / "off-model")
    assert calls == []
    script.checkpoint.save_checkpoint(tmp_path / "on", state)
    # 4 tensor files (file + directory each), 3 JSON files (file + directory each), the rename
    assert len(calls) == 4 * 2 + 3 * 2 + 1
    report = script.main(["--preset", "tiny", "--runs", "1", "--dir", str(tmp_path),
                          "--out", str(tmp_path / "cost.json")])
    assert json.loads((tmp_path / "cost.json").read_text()) == report
    for kind in ("checkpoint", "save_pretrained"):
        r = report["results"][kind]
        assert len(r["seconds"]["on"]) == len(r["seconds"]["off"]) == 1
        assert r["ratio_on_over_off"] == round(r["median_on_s"] / r["median_off_s"], 2)
    assert report["model"]["preset"] == "tiny" and report["filesystem"]["type"] != "?"


@pytest.mark.usefixtures("one_thread")
def test_noise_cost_compares_two_draws_of_the_same_distribution(tmp_path):
    """experiments/noise_cost.py: the replaced per-example draw and the shipped one both give
    standard normals, an example's own values whatever its batch; the report has both times."""
    script = runpy.run_path(str(ROOT / "experiments" / "noise_cost.py"))
    cfg = script["transport"].FlowConfig(cfg_dropout=0.5)
    old = script["per_example"](script["batch_at"](4), (4, 64, 64), cfg, 0, 4)
    new = script["train"].draw_noise(script["batch_at"](4), (4, 64, 64), cfg, 0, 4, script["CPU"])
    for x0 in (old[0], new[0]):
        assert abs(x0.mean().item()) < 0.02 and abs(x0.std().item() - 1) < 0.02
    one = script["per_example"](script["batch_at"](1), (1, 64, 64), cfg, 0, 4)
    assert torch.equal(one[0][0], old[0][0])
    report = script["main"](["--shape", "2,4,8", "--runs", "1", "--out", str(tmp_path / "n.json")])
    assert json.loads((tmp_path / "n.json").read_text()) == report
    row = report["results"]["2x4x8"]
    assert row["ratio_one_call_over_per_example"] == round(row["one_call_s"] / row["per_example_s"], 2)
    assert report["tiny_step"]["seconds"] > 0 and report["tiny_step"]["shape"] == [2, 4, 8]
