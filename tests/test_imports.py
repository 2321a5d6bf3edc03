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


def test_every_module_is_placed_and_imports_only_its_own_or_earlier_layers():
    tool = runpy.run_path(str(TOOL))
    assert tool["upward_imports"](tool["graph"]()) == []
    layers = [["", "flow"], ["train"], ["bench.*"]]
    g = {"eva_repro.flow": {"eva_repro.train"}, "eva_repro.train": {"eva_repro.flow"},
         "eva_repro.bench.quality": {"eva_repro.train"}, "eva_repro.new": set()}
    assert tool["upward_imports"](g, layers) == [
        "eva_repro.new: in no layer of LAYERS",
        "eva_repro.flow imports eva_repro.train, which is further down the pipeline"]


def test_imports_point_down_the_pipeline():
    graph = runpy.run_path(str(TOOL))["graph"]()
    later = {"eva_repro.shards", "eva_repro.data", "eva_repro.train", "eva_repro.checkpoint",
             "eva_repro.evaluate", "eva_repro.report", "eva_repro.generate", "eva_repro.cli",
             "eva_repro.demo"}
    for module in ("eva_repro.model.dit", "eva_repro.model.lumina_next", "eva_repro.flow"):
        assert not graph[module] & later, f"{module} reaches up the pipeline: {graph[module] & later}"
    assert "eva_repro.cli" not in graph["eva_repro.demo"]  # cli dispatches to demo, not back
    # evaluate measures and report renders: evaluate imports report; report imports no stage
    # (shards only for the manifest it is handed)
    assert "eva_repro.report" in graph["eva_repro.evaluate"]
    assert not graph["eva_repro.report"] & (later - {"eva_repro.shards"}), graph["eva_repro.report"]
    for module, deps in graph.items():
        if not module.startswith(("eva_repro.cli", "eva_repro.__main__", "eva_repro.bench")):
            assert "eva_repro.bench" not in deps and "eva_repro.cli" not in deps, module
