"""The package's import graph has no cycles (tools/import_graph.py prints it)."""

import runpy
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"


def test_no_module_imports_itself_round_a_cycle():
    tool = runpy.run_path(str(TOOL))
    graph = tool["graph"]()
    assert "eva_repro.train" in graph and "eva_repro.model.dit" in graph["eva_repro.model.backbones"]
    assert tool["cycles"](graph) == []


def test_the_cycle_finder_finds_cycles():
    cycles = runpy.run_path(str(TOOL))["cycles"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
