"""The package's import graph has no cycles (tools/import_graph.py prints it)."""

import runpy
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "import_graph.py"


def test_no_module_imports_itself_round_a_cycle():
    tool = runpy.run_path(str(TOOL))
    graph = tool["graph"]()
    assert "eva_repro.training.train" in graph and "eva_repro.model.dit" in graph["eva_repro.model.backbones"]
    assert tool["cycles"](graph) == []


def test_the_cycle_finder_finds_cycles():
    cycles = runpy.run_path(str(TOOL))["cycles"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_is_placed_and_imports_only_its_own_or_earlier_packages():
    tool = runpy.run_path(str(TOOL))
    assert tool["upward_imports"](tool["graph"]()) == []
    layers = [["", "flow", "flow.*"], ["training", "training.*"], ["bench.*"]]
    g = {"eva_repro.flow.transport": {"eva_repro.training.train"},
         "eva_repro.training.train": {"eva_repro.flow.transport", "eva_repro.training.optim"},
         "eva_repro.training.optim": set(), "eva_repro.bench.quality": {"eva_repro.training.train"},
         "eva_repro.new": set()}
    assert tool["upward_imports"](g, layers) == [
        "eva_repro.new: in no layer of LAYERS",
        "eva_repro.flow.transport imports eva_repro.training.train, which is further down the pipeline"]


def test_the_network_and_the_flow_import_no_stage_and_report_only_renders():
    graph = runpy.run_path(str(TOOL))["graph"]()
    stages = {m for m in graph if m.startswith(("eva_repro.training", "eva_repro.evaluation",
                                                 "eva_repro.testbed", "eva_repro.bench"))}
    stages |= {"eva_repro.cli", "eva_repro.demo", "eva_repro.data.loader", "eva_repro.model.checkpoint"}
    for module in ("eva_repro.model.dit", "eva_repro.model.lumina_next", "eva_repro.flow.transport",
                   "eva_repro.flow.sampling"):
        assert not graph[module] & stages, f"{module} reaches up the pipeline: {graph[module] & stages}"
    assert "eva_repro.cli" not in graph["eva_repro.demo"]  # cli dispatches to demo, not back
    # evaluate measures and report renders: evaluate imports report; report imports no stage
    assert "eva_repro.evaluation.report" in graph["eva_repro.evaluation.evaluate"]
    assert graph["eva_repro.evaluation.report"] <= {"eva_repro.evaluation.metrics", "eva_repro.utils.files"}
    for module, deps in graph.items():
        if not module.startswith(("eva_repro.cli", "eva_repro.__main__", "eva_repro.bench")):
            assert "eva_repro.bench" not in deps and "eva_repro.cli" not in deps, module
