"""docs/testbed.md "The regrid problem": the learns_regrid check alone, at the quick budget, for
the pure head, its 1D-RoPE mutant and the plain DiT example (the full cards: experiments/testbed.sh).

    python experiments/regrid.py [OUT] [BUDGET]   -> OUT/regrid.json (at the quick budget, the
                                                    default, also experiments/results/testbed/)
"""

import json
import sys
from pathlib import Path

from eva_repro.testbed.card import BUDGETS, learn, learning_check, train_options
from eva_repro.testbed.problems import problems
from eva_repro.utils.files import atomic_write_json

HERE = Path(__file__).resolve().parent
BACKBONES = {
    "correct": "eva_repro.testbed.zoo:correct",
    "rope_1d": "eva_repro.testbed.zoo:rope_1d",
    "plain_dit": str(HERE.parent / "examples" / "plain_dit.py") + ":build",
}


def main(out: Path, budget_name: str = "quick") -> None:
    budget = BUDGETS[budget_name]
    problem = problems(budget.width, budget.samples)["regrid"]
    data = problem.write(out / "data" / "regrid")
    rows = {}
    for name, backbone in BACKBONES.items():
        run = out / "runs" / name
        options = train_options(backbone, "eva-repro", data, run, budget, "cpu", seed=0)
        scored = learn("regrid", data, run, options, budget, problem)
        check = learning_check(scored, grid_dependent=True, by_design_set=False)
        shown = backbone.replace(str(HERE.parent) + "/", "")
        rows[name] = {"backbone": shown, "passed": check.passed, "gap_closed": check.value,
                      "threshold": check.threshold, "scores": scored.scores}
        print(name, json.dumps(rows[name]["scores"]), f"gap {check.value:.3f}", flush=True)
    result = {"budget": budget_name, "problem": "regrid", "rows": rows}
    atomic_write_json(out / "regrid.json", result)
    if budget_name != "quick":
        return
    (HERE / "results" / "testbed").mkdir(parents=True, exist_ok=True)
    atomic_write_json(HERE / "results" / "testbed" / "regrid.json", result)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "regrid"), *sys.argv[2:3])
