"""experiments/: the scripts that reproduce README's results call the CLI with flags it takes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eva_repro import cli

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.sh"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_command_of_the_script_parses(script, tmp_path):
    calls = tmp_path / "calls.jsonl"
    stub = tmp_path / "stub.py"  # stands in for `eva-repro`: records its argv, runs nothing
    stub.write_text("import json, sys\n"
                    f"open({str(calls)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    subprocess.run(["bash", str(script), str(tmp_path / "out")], check=True, cwd=tmp_path,
                   env={"PATH": "/usr/bin:/bin", "EVA_REPRO": f"{sys.executable} {stub}"})
    argvs = [json.loads(line) for line in calls.read_text().splitlines()]
    assert argvs, f"{script.name} ran no eva-repro command"
    for argv in argvs:
        args = cli.build_parser(argv).parse_args(argv)  # a renamed flag exits here
        assert args.command == argv[0]


def test_the_scripts_cover_the_readme_results():
    assert {p.name for p in SCRIPTS} >= {"learning.sh", "imagenet.sh", "quality.sh"}


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
