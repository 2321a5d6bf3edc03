"""`eva-repro demo --quick` end to end: bundled photos -> shards -> tiny DiT -> report, twice.

One module-scoped run is shared by the checks; the second invocation must reuse everything (no
shard or checkpoint rewritten, no training step taken).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from eva_repro import cli
from eva_repro.data.demo_images import PHOTOS, VIEW_GROUP, view_paths, write_demo_images
from eva_repro.demo import QUICK

PNG = b"\x89PNG\r\n\x1a\n"


def _get(report: dict, dotted: str):
    value = report
    for part in dotted.split("."):
        value = value[part]
    return value


def _mtimes(root: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.glob(pattern))}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo") / "out"
    assert cli.main(["demo", "--quick", "--output_dir", str(out)]) == 0
    first = {"shards": _mtimes(out, "shards/shard-*"),
             "checkpoints": _mtimes(out, "run/checkpoints/*/*"),
             "images": _mtimes(out, "images/*"),
             "summary": (out / "run" / "summary.json").read_text(),
             "metrics": (out / "run" / "metrics.jsonl").read_text(),
             "report": (out / "report" / "report.json").read_text()}
    assert cli.main(["demo", "--quick", "--output_dir", str(out)]) == 0
    return {"out": out, "first": first}


def test_report_has_finite_headline_numbers(demo):
    out = demo["out"]
    report = json.loads((out / "report" / "report.json").read_text())
    heldout = json.loads((out / "run" / "split.json").read_text())["num_heldout"]
    assert report["n_samples"] == heldout > 0  # every held-out image, never a training one
    for key in ("cosine.token_mean", "cosine.image_mean", "baselines.mean.token_mean",
                "baselines.ridge.token_mean", "controls.shuffled.token_mean",
                "retrieval.recall_at_1", "retrieval.recall_at_5"):
        value = _get(report, key)
        assert isinstance(value, float) and math.isfinite(value), key
        assert -1.0 <= value <= 1.0, key
    bands = report["cosine"]["bands"]
    assert bands and all(math.isfinite(v) for v in bands.values())
    assert sum(bands.values()) == pytest.approx(1.0)
    assert report["sampler"]["method"] == "heun" and report["sampler"]["steps"] == QUICK.sampler_steps
    # where the encoder weights came from is on record in the report, not only on the terminal
    announced = json.loads((out / "demo_summary.json").read_text())["encoder_weights"]
    recorded = {e["name"]: e["weights"] for e in report["data"]["encoders"].values()}
    assert set(recorded) == set(announced) == {"EVA02-L-14", "ViT-L-14"}
    for name, weights in announced.items():  # random init here (no cache), hf-cache elsewhere
        assert recorded[name] == ("random-init, seed 0" if weights == "RANDOM INIT" else "hf-cache")
    assert report["data"]["tokens"] == 64 and report["data"]["grid"] == 8
    # whole photos are held out: no photo has a view on both sides of the split
    split = json.loads((out / "run" / "split.json").read_text())
    photo = {p.name: p.name.split("-view")[0] for p in view_paths(out / "images", QUICK.num_images)}
    held = {photo[k] for k in split["heldout_keys"]}
    assert split["group_by"] == report["split"]["group_by"] == VIEW_GROUP
    assert report["split"]["num_heldout_groups"] == len(held) >= 1
    assert not held & {v for k, v in photo.items() if k not in split["heldout_keys"]}
    assert f"4 of {len(PHOTOS)} groups held out" in (out / "report" / "report.md").read_text()


def test_outputs_exist_and_plots_are_png(demo):
    out = demo["out"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert "**Quality:" in (out / "report" / "report.md").read_text()
    assert report["plots"]
    for name in report["plots"].values():
        assert (out / "report" / name).read_bytes()[:8] == PNG, name
    page = (out / "DEMO.md").read_text()
    summary = json.loads((out / "demo_summary.json").read_text())
    assert "| **DiT** |" in page and "Grouping: keys held out in groups" in page
    assert all(f"{k} {v}" in page for k, v in summary["encoder_weights"].items())
    assert summary["num_images"] == QUICK.num_images
    train = json.loads((out / "run" / "summary.json").read_text())
    assert train["steps"] == QUICK.steps and math.isfinite(train["final_loss"])
    assert (out / "run" / "model" / "model.safetensors").exists()


def test_second_run_reuses_shards_and_run(demo):
    out, first = demo["out"], demo["first"]
    assert first["shards"] and _mtimes(out, "shards/shard-*") == first["shards"]
    assert first["checkpoints"] and _mtimes(out, "run/checkpoints/*/*") == first["checkpoints"]
    assert _mtimes(out, "images/*") == first["images"]
    assert (out / "run" / "summary.json").read_text() == first["summary"]
    assert (out / "run" / "metrics.jsonl").read_text() == first["metrics"]  # no step taken
    assert (out / "report" / "report.json").read_text() == first["report"]
    stages = json.loads((out / "demo_summary.json").read_text())["stages"]
    for stage in ("extract", "train", "evaluate"):  # with the time of the run that did them
        assert stages[stage]["reused"] and stages[stage]["earlier_run"], stages
    assert stages["train"]["seconds"] > 1


def test_other_settings_in_same_output_dir_are_refused(demo, capsys):
    # one directory holds one demo; mixing plans would mix shards and runs
    code = cli.main(["demo", "--quick", "--steps", str(QUICK.steps + 1),
                     "--output_dir", str(demo["out"])])
    assert code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "demo_config.json" in err and "new --output_dir" in err


def test_demo_images_are_deterministic_and_cover_every_photo(tmp_path):
    paths = write_demo_images(tmp_path / "a", len(PHOTOS) + 2)
    again = write_demo_images(tmp_path / "b", len(PHOTOS) + 2)
    assert [p.name for p in paths] == [p.name for p in again]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(paths, again, strict=True))
    assert {p.name.split("-view")[0] for p in paths} == set(PHOTOS)
    # asking for fewer views drops the extra ones: the folder holds exactly the request
    write_demo_images(tmp_path / "a", 3)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == \
        sorted(p.name for p in view_paths(tmp_path / "a", 3))


def test_interrupted_demo_redoes_only_the_missing_stage(demo):
    # as if the demo had been killed during evaluation: the report is gone, the rest is kept
    out, first = demo["out"], demo["first"]
    for f in (out / "report").iterdir():
        f.unlink()
    assert cli.main(["demo", "--quick", "--output_dir", str(out)]) == 0
    assert json.loads((out / "report" / "report.json").read_text())["cosine"] == \
        json.loads(first["report"])["cosine"]  # deterministic: the same numbers again
    assert _mtimes(out, "shards/shard-*") == first["shards"]
    stages = json.loads((out / "demo_summary.json").read_text())["stages"]
    assert stages["train"]["earlier_run"] and not stages["evaluate"]["reused"]
