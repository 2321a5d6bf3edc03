"""docs/testbed.md "The regrid problem": the learns_regrid check alone, at the quick budget, for
the pure head, its 1D-RoPE mutant and the plain DiT example, one training seed at a time (the
full cards: experiments/testbed.sh).

    python experiments/regrid.py [OUT] [BUDGET] [SEEDS] [--reuse]
        -> OUT/regrid.json (at the quick budget, the default, also experiments/results/testbed/)

SEEDS is a comma list (default 0,1,2,3). Every seed is judged on its own, so the file says how
often each backbone passes; `card_passes` is the card's verdict, which trains a failed problem
again with the next seed (`SEEDS_PER_PROBLEM`): a pass on one of the first seeds. `--reuse`
judges finished runs under OUT again instead of training them.
"""

import json
import sys
from pathlib import Path

from eva_repro.testbed.card import BUDGETS, SEEDS_PER_PROBLEM, learn, learning_check
from eva_repro.testbed.problems import problems
from eva_repro.testbed.runs import train_all, train_options
from eva_repro.utils.devices import available_cores
from eva_repro.utils.files import atomic_write_json

HERE = Path(__file__).resolve().parent
BACKBONES = {
    "correct": "eva_repro.testbed.zoo:correct",
    "rope_1d": "eva_repro.testbed.zoo:rope_1d",
    "plain_dit": str(HERE.parent / "examples" / "plain_dit.py") + ":build",
}


def main(out: Path, budget_name: str = "quick", seeds: str = "0,1,2,3", reuse: bool = False) -> dict:
    budget = BUDGETS[budget_name].for_problem("regrid")
    problem = problems(budget.width, budget.samples)["regrid"]
    data = problem.write(out / "data" / "regrid")
    runs = {(name, seed): train_options(backbone, "eva-repro", data, out / "runs" / f"{name}-seed{seed}",
                                        budget, "cpu", seed=seed)
            for name, backbone in BACKBONES.items() for seed in map(int, seeds.split(","))}
    train_all(list(runs.values()), available_cores(), reuse)  # one run per core
    rows = {}
    for name, backbone in BACKBONES.items():
        per_seed = {}
        for seed in map(int, seeds.split(",")):
            scored = learn("regrid", data, Path(runs[name, seed]["output_dir"]), budget, problem, "cpu")
            check = learning_check(scored, grid_dependent=True, by_design_set=False)
            per_seed[seed] = {"passed": check.passed, "gap_closed": check.value,
                              "scores": scored.scores, "curve": scored.curve}
            print(name, seed, json.dumps(scored.scores), f"gap {check.value:.3f}", flush=True)
        first = list(per_seed.values())[:SEEDS_PER_PROBLEM]
        rows[name] = {"backbone": backbone.replace(str(HERE.parent) + "/", ""),
                      "seeds_passed": sum(r["passed"] for r in per_seed.values()),
                      "seeds": len(per_seed), "card_passes": any(r["passed"] for r in first),
                      "per_seed": per_seed}
    result = {"budget": budget_name, "steps": budget.steps, "problem": "regrid",
              "threshold": check.threshold, "rows": rows}
    atomic_write_json(out / "regrid.json", result)
    if budget_name == "quick":
        (HERE / "results" / "testbed").mkdir(parents=True, exist_ok=True)
        atomic_write_json(HERE / "results" / "testbed" / "regrid.json", result)
    return result


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--reuse"]
    main(Path(args[0] if args else "regrid"), *args[1:3], reuse="--reuse" in sys.argv)
