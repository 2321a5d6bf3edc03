"""`eva-repro bench`: run benchmark suites and write one JSON result per suite.

Each suite is a module in this package with `run(output_dir: Path, quick: bool) -> dict` (the
quality suite also takes `data_dirs`, `problems` and `recipes`);
results go to `<output_dir>/<suite>.json`. Benchmarks are never timed assertions in tests.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

from eva_repro.utils.files import atomic_write_json
from eva_repro.utils.lockfile import refuse_a_file

SUITES = ("model", "extract", "train", "evaluate", "quality", "backbones")


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", default="bench_results", help="where <suite>.json files go")
    p.add_argument("--suite", action="append", choices=SUITES,
                   help="suite to run (repeatable); default: all")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    p.add_argument("--data", action="append", default=[], metavar="SHARD_DIR",
                   help="quality suite: also train and score on these shard directories (e.g. "
                        "real photos through `eva-repro extract`; repeatable)")
    p.add_argument("--problem", action="append", default=[], metavar="NAME",
                   help="quality suite: only these synthetic problems (repeatable; default: all; "
                        "`none`: only the --data directories)")
    p.add_argument("--recipe", action="append", default=[], metavar="NAME",
                   help="quality suite: only these recipes (repeatable; default: all)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.output_dir)
    refuse_a_file(out)
    out.mkdir(parents=True, exist_ok=True)
    for suite in args.suite or SUITES:
        start = time.time()
        print(f"[bench] {suite} ...", flush=True)
        module = importlib.import_module(f"eva_repro.bench.{suite}")
        extra = ({"data_dirs": args.data, "problems": args.problem, "recipes": args.recipe}
                 if suite == "quality" else {})
        result = module.run(out, args.quick, **extra)
        result = {"suite": suite, "wall_s": round(time.time() - start, 1), **result}
        atomic_write_json(out / f"{suite}.json", result)
        print(json.dumps(result, indent=2), flush=True)
    return 0
