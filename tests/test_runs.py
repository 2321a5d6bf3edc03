"""A card's runs trained several at once: the same runs as one at a time, the patch around each
reaching the worker, a worker's error raised here, and `--jobs`."""

import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from eva_repro.testbed import runs as runs_mod
from eva_repro.testbed.card import BUDGETS
from eva_repro.testbed.problems import problems
from eva_repro.testbed.zoo import _ema_frozen
from eva_repro.utils.devices import available_cores

pytestmark = pytest.mark.usefixtures("one_thread")
SHORT = replace(BUDGETS["toy"], steps=40, eval_every=20)


def _runs(root: Path, data: Path) -> list[dict]:
    return [runs_mod.train_options("next-dit", "eva-repro", data, root / name, SHORT, "cpu", seed=seed)
            for name, seed in (("a", 0), ("b", 1))]


def _scores(run_dir: Path) -> list:
    return [r["heldout_cosine"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "heldout_cosine" in r]


def test_runs_trained_in_workers_are_the_runs_trained_here(tmp_path):
    """Two workers train what this process trains, bit for bit, the zoo's frozen-EMA patch
    active in each: the EMA model's held-out score never moves from its step-0 value."""
    data = problems(SHORT.width, SHORT.samples)["grid"].write(tmp_path / "data")
    here, there = _runs(tmp_path / "here", data), _runs(tmp_path / "there", data)
    plain = _runs(tmp_path / "plain", data)[:1]
    here_summaries = runs_mod.train_all(here, jobs=1, around=_ema_frozen)
    summaries = runs_mod.train_all(there, jobs=2, around=_ema_frozen)
    runs_mod.train_all(plain, jobs=1)
    for a, b, sa, sb in zip(here, there, here_summaries, summaries, strict=True):
        assert _scores(Path(a["output_dir"])) == _scores(Path(b["output_dir"]))
        assert sb == json.loads((Path(b["output_dir"]) / "summary.json").read_text())  # in order
        assert {**sa, "train_time_s": 0} == {**sb, "train_time_s": 0}
    frozen, trained = _scores(tmp_path / "here" / "a"), _scores(tmp_path / "plain" / "a")
    assert len(set(frozen)) == 1 and frozen[0] == trained[0] and trained[-1] > trained[0] + 0.05


def test_a_workers_error_is_raised_here_as_its_one_line_error(tmp_path, one_line_error):
    runs = _runs(tmp_path, tmp_path / "no_such_shards")
    one_line_error(lambda: runs_mod.train_all(runs, jobs=2), "no_such_shards")


def test_jobs_is_a_count_or_one_per_core_on_a_cpu(one_line_error):
    assert runs_mod.resolve_jobs("auto", "cpu") == available_cores()
    assert runs_mod.resolve_jobs("3", "cpu") == 3
    for bad in ("0", "two"):
        one_line_error(lambda bad=bad: runs_mod.resolve_jobs(bad, "cpu"), "--jobs must be auto")


def test_a_workers_lines_name_its_run():
    out = io.StringIO()
    stream = runs_mod.Prefixed(out, "[grid] ")
    stream.write("[train] step 0")
    stream.write(": 0.5\n[train] step 20\n")
    assert out.getvalue() == "[grid] [train] step 0: 0.5\n[grid] [train] step 20\n"


def test_runs_one_after_another_in_a_worker_each_name_only_their_own_lines(capsys):
    for name in ("grid", "regrid"):
        with runs_mod.lines_named(name):
            print("[train] step 0", file=sys.stderr)
    print("after", file=sys.stderr)
    assert capsys.readouterr().err == "[grid] [train] step 0\n[regrid] [train] step 0\nafter\n"
