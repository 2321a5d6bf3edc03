"""A card's training runs: the trainer's options for one problem, and training several runs at
once, one worker process per core.

    summaries = train_all([train_options(...), ...], jobs=2)   # the trainer's summary per run

A card's problems are independent runs of `eva-repro train`. The budgets' small networks keep
one thread busy (their ops are too small to share out), so on a CPU with several cores a card
trains one run per core, longest first, each worker with `cores // jobs` threads. A worker is a
fresh (spawned) process: it receives the run's options and the patch to enter around training
(the zoo's pipeline bugs), nothing else; its log lines are prefixed with the run's name.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import shutil
import sys
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any, TextIO

import torch

from eva_repro.training.train import train
from eva_repro.utils.devices import available_cores, pick_device
from eva_repro.utils.errors import UserError
from eva_repro.utils.flags import count_or_auto

HELDOUT_FRACTION = 0.2  # of each problem's samples, held out from training and scored
Around = Callable[[], contextlib.AbstractContextManager] | None  # entered around each run


def train_options(backbone: str, variant: str, data_dir: Path, run_dir: Path, budget: Any,
                  device: str, **extra: Any) -> dict[str, Any]:
    """The trainer's options for one of a card's runs (`budget`: a `card.Budget`)."""
    return dict(data_dir=str(data_dir), output_dir=str(run_dir), backbone=backbone,
                model_variant=variant, model_size="tiny", model_overrides=budget.hints(),
                batch_size=budget.batch, max_steps=budget.steps, eval_every=budget.eval_every,
                eval_samples=64, eval_sampler_steps=budget.sampler_steps,
                eval_fraction=HELDOUT_FRACTION, num_workers=0, progress=False, tensorboard=False,
                save_every=10**9, keep_checkpoints=1, log_every=10**9, device=device, **extra)


def reusable(run_dir: Path, options: dict[str, Any]) -> bool:
    """A finished run in `run_dir` trained with exactly these options (`--reuse`)."""
    try:
        saved = json.loads((run_dir / "run_config.json").read_text())["args"]
        json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError, KeyError):
        return False
    same = {k: v for k, v in options.items() if k not in ("data_dir", "output_dir")}
    flat = {**saved, **saved.get("flow", {})}
    return all(flat.get(k) == v for k, v in same.items()) and \
        Path(saved["data_dir"]) == Path(options["data_dir"]).resolve()


def train_once(options: dict[str, Any], reuse: bool) -> dict[str, Any]:
    """The trainer's summary: a matching finished run when `reuse`, else a fresh run (this card's
    own earlier run of the same problem is replaced)."""
    run_dir = Path(options["output_dir"])
    if reuse and reusable(run_dir, options):
        return json.loads((run_dir / "summary.json").read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return train(options)


JOBS_HELP = ("training runs at once, each in its own process: a number, or auto (one per CPU core "
             "on a CPU, one at a time on a GPU)")


def resolve_jobs(jobs: int | str, device: str) -> int:
    """`--jobs`: a number >= 1, or auto (one run per core on a CPU; one at a time elsewhere,
    where running several has not been measured)."""
    n = count_or_auto(jobs, "jobs", UserError)
    if n is None:
        return available_cores() if pick_device(device).type == "cpu" else 1
    return n


def train_all(runs: list[dict[str, Any]], jobs: int = 1, reuse: bool = False,
              around: Around = None) -> list[dict[str, Any]]:
    """Train every run (a list of trainer options); their summaries, in the same order. With
    `jobs` > 1, up to that many at once in worker processes, the longest first; the first run to
    raise stops the rest from starting, and its error is raised here."""
    jobs = min(jobs, len(runs))
    if jobs <= 1:
        with around() if around else contextlib.nullcontext():
            return [train_once(options, reuse) for options in runs]
    threads = max(1, available_cores() // jobs)
    order = sorted(range(len(runs)), key=lambda i: -runs[i]["max_steps"])
    with futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = {i: pool.submit(_worker, runs[i], reuse, around, threads) for i in order}
        done, _ = futures.wait(pending.values(), return_when=futures.FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            pool.shutdown(cancel_futures=True)
            raise failed[0].exception()
        return [pending[i].result() for i in range(len(runs))]


def _worker(options: dict[str, Any], reuse: bool, around: Around, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    with lines_named(Path(options["output_dir"]).name), around() if around else contextlib.nullcontext():
        return train_once(options, reuse)


def lines_named(name: str) -> contextlib.AbstractContextManager:
    """Standard error with every line starting `[name] ` until the block ends: a worker process
    trains several runs one after another, and each run's lines carry its own name only."""
    return contextlib.redirect_stderr(Prefixed(sys.stderr, f"[{name}] "))


class Prefixed:
    """A text stream that starts every line with `prefix` (a worker's log lines say whose)."""

    def __init__(self, stream: TextIO, prefix: str):
        self.stream, self.prefix, self.at_line_start = stream, prefix, True

    def write(self, text: str) -> int:
        for part in text.splitlines(keepends=True):
            self.stream.write(self.prefix + part if self.at_line_start else part)
            self.at_line_start = part.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)
