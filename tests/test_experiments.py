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
