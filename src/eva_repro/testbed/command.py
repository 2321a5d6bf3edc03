"""`eva-repro check`: the report card of a DiT (`card.run_card`); exit 0 passed, 1 failed, 2 bad input.

    eva-repro check --backbone examples/plain_dit.py:build --output_dir card [--budget quick]
"""

from __future__ import annotations

import argparse

from eva_repro.model import VARIANTS
from eva_repro.testbed.card import BUDGETS, run_card
from eva_repro.testbed.runs import JOBS_HELP


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", required=True, help="next-dit, lumina-next, or your own network: "
                   "package.module:factory or path/to/file.py:factory")
    p.add_argument("--model_variant", default="eva-repro", choices=sorted(VARIANTS),
                   help="next-dit only: the head to judge")
    p.add_argument("--output_dir", required=True, help="the card (check.json, check.md, "
                   "curves.png) and its problems' data and runs")
    p.add_argument("--budget", default="quick", choices=list(BUDGETS),
                   help="quick: minutes on a CPU; full: the GPU setting; toy: seconds, too short "
                   "to judge (the test suite's)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--jobs", default="auto", help=JOBS_HELP)
    p.add_argument("--data", action="append", default=[], metavar="SHARDS",
                   help="also learn these shard directories (eva-repro extract output; repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true", help="judge the finished runs already in "
                   "--output_dir that were trained with the same settings instead of training "
                   "them again (after a change to the checks)")


def run(args: argparse.Namespace) -> int:
    card = run_card(args.backbone, args.output_dir, args.budget, args.device, args.model_variant,
                    args.data, args.seed, reuse=args.reuse, jobs=args.jobs)
    return 0 if card["passed"] else 1
