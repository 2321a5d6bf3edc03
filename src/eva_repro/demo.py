"""`eva-repro demo`: images -> frozen encoders -> shards -> DiT -> evaluation report, offline.

Every stage goes through the same public entry points a user would call (the `extract` Python
API, the `train` and `evaluate` commands) and writes into one output directory:

    OUT/images/   deterministic views of the bundled photos (or --input_dir is used as is)
    OUT/shards/   EVA-CLIP target + CLIP condition tokens (eva-repro extract)
    OUT/run/      the training run: checkpoints, metrics.jsonl, tb/, model/, summary.json
    OUT/report/   report.json, report.md, PNG plots (eva-repro evaluate)
    OUT/DEMO.md   encoder weights, the report, timings and paths in one page
                  (+ demo_summary.json, demo_stages.json, demo_config.json: the same as data)

A second run with the same arguments redoes nothing: the images are kept, extraction resumes
(every chunk is already done), a finished run (summary.json with the planned steps) is not
retrained and an up-to-date report is reused; an interrupted run continues where it stopped
(training with `--resume auto`). Another --output_dir starts from scratch.

The bundled views are split by photo (`--group_by demo_images.VIEW_GROUP` on train, recorded in
split.json and the report): every view of a held-out photo is held out, so the held-out cosine is
measured on photos the model never saw. `--input_dir` images are split one by one.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from eva_repro.commands import COMMANDS
from eva_repro.data import encoders, shards
from eva_repro.data.demo_images import PHOTOS, VIEW_GROUP, write_demo_images
from eva_repro.data.extract import extract
from eva_repro.utils import files
from eva_repro.utils.errors import UserError
from eva_repro.utils.flags import count_or_auto
from eva_repro.utils.lockfile import refuse_a_file

EVA, CLIP, GRID = "EVA02-L-14", "ViT-L-14", 8  # 8 x 8 = 64 tokens, the BLIP3-o setting
CONFIG, SUMMARY, STAGES = "demo_config.json", "demo_summary.json", "demo_stages.json"


class DemoError(UserError):
    """A demo that cannot run as asked; one line naming the problem and the fix."""


@dataclass(frozen=True)
class DemoPlan:
    """What the demo does: FULL and QUICK are sized for the time budget of a small CPU that
    docs/results.md states, beside the times per stage that experiments/demo.sh measures."""

    num_images: int
    encoder_depth: int | None  # None: the full architectures
    steps: int  # optimiser steps of the tiny DiT
    batch_size: int
    eval_fraction: float
    sampler_steps: int  # heun steps of the evaluation sampler
    sweep: str  # evaluate --sweep: none | small | full
    sweep_samples: int
    # held-out images for the trainer's own evaluations and evaluate's controls (shuffled
    # condition, second sample): each is a full sampling pass, and a few images tell these
    # apart; the reported cosine and baselines use every held-out image
    check_samples: int


FULL = DemoPlan(num_images=200, encoder_depth=None, steps=300, batch_size=16, eval_fraction=0.2,
                sampler_steps=20, sweep="small", sweep_samples=8, check_samples=16)
QUICK = DemoPlan(num_images=40, encoder_depth=1, steps=40, batch_size=8, eval_fraction=0.2,
                 sampler_steps=10, sweep="none", sweep_samples=0, check_samples=16)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", default="demo_output", help="everything the demo writes")
    p.add_argument("--input_dir", default=None,
                   help="your own images (a folder, searched recursively) instead of the "
                        "bundled scikit-image photos")
    p.add_argument("--quick", action="store_true",
                   help="1-block encoders, fewer images and steps: a smoke run")
    p.add_argument("--pretrained", action="store_true",
                   help="download real EVA-CLIP / CLIP weights (needs a network)")
    p.add_argument("--num_images", type=int, default=None,
                   help=f"bundled-photo views to make (default {FULL.num_images}, quick "
                        f"{QUICK.num_images})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default {FULL.steps}, quick {QUICK.steps})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--threads", default="auto",
                   help="CPU threads for torch; auto: every core for the encoders, and for the "
                        "DiT the cores the load average leaves free (at least 1): its threads "
                        "wait on each other when other jobs hold the cores")


def make_plan(args: argparse.Namespace) -> DemoPlan:
    plan = QUICK if args.quick else FULL
    for flag in ("num_images", "steps"):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise DemoError(f"--{flag} must be >= 1, got {value}")
            plan = replace(plan, **{flag: value})
    return plan


def set_threads(threads: str, own: int = 0, large_matmuls: bool = False) -> int:
    """Set torch's intra-op threads: a number, or `auto`.

    `auto` gives work made of large matrix products (the encoders) every core: each op is long
    enough that sharing the cores with other jobs costs it little. Work made of many small ops
    (the tiny DiT) gets only the cores that other processes leave free: its threads wait for each
    other at every op, so one that shares its core with another job stalls them all. `own` is
    the thread count this process used in the previous stage, which the 1-minute load average
    still counts.
    """
    import os

    import torch

    from eva_repro.utils.devices import available_cores

    n = count_or_auto(threads, "threads", DemoError)
    if n is None:
        cores = available_cores()
        others = max(0.0, os.getloadavg()[0] - own) if hasattr(os, "getloadavg") else 0.0
        n = cores if large_matmuls else max(1, min(cores, round(cores - others)))
    torch.set_num_threads(n)
    return n


def _stage(number: int, text: str, args: argparse.Namespace, state: dict[str, int],
           large_matmuls: bool = False) -> None:
    """Print the stage header; with --threads auto, re-read the load for this stage."""
    state["threads"] = set_threads(args.threads, state.get("threads", 0), large_matmuls)
    print(f"\n[{number}/4] {text} ({state['threads']} CPU thread(s))", flush=True)


def _check_config(out: Path, config: dict[str, Any]) -> None:
    """One output directory holds one demo: refuse to mix settings (shards, run, report)."""
    path = out / CONFIG
    if path.exists():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if diff:
            raise DemoError(f"{path}: {out} holds a demo made with other settings "
                            f"({', '.join(f'{k}: {old.get(k)} -> {config.get(k)}' for k in diff)});"
                            " use a new --output_dir, or delete this one")


def _save_config(out: Path, config: dict[str, Any]) -> None:
    """Written once the shards exist: a run that failed before (say --pretrained without a
    network) leaves nothing behind that would refuse the next attempt's settings."""
    if not (out / CONFIG).exists():
        files.atomic_write_json(out / CONFIG, config)


def _announce_weights(weights: str) -> dict[str, str]:
    """Say where encoder weights come from before any work, in words a user cannot miss."""
    found = {}
    for name, flag in ((EVA, "--eva"), (CLIP, "--clip")):
        if weights == "pretrained":
            found[name] = "pretrained (download)"
            continue
        src = encoders.resolve_weights(encoders.get_spec(name), weights, flag)
        found[name] = "RANDOM INIT" if src.kind == "random" else f"cached {src.path}"
    print("eva-repro demo: encoder weights")
    for name, where in found.items():
        print(f"  {name:<12} {where}")
    if any(w == "RANDOM INIT" for w in found.values()):
        print("  No cached pretrained weights were found (no network is needed or used), so the\n"
              "  encoders are randomly initialised: the pipeline, the training and the report are\n"
              "  real, but the embeddings are not CLIP's. Use --pretrained, or put the open_clip\n"
              "  weights in the Hugging Face cache, for meaningful numbers.", flush=True)
    return found


def _run_command(argv: list[str]) -> None:
    """Run one pipeline command in this process, as `eva-repro <argv>` would (printed first, so the
    user can rerun the stage by hand): its own flags parser, its own `run`."""
    import importlib

    print(f"\n$ eva-repro {' '.join(argv)}", flush=True)
    module = importlib.import_module(COMMANDS[argv[0]][0])
    parser = argparse.ArgumentParser(prog=f"eva-repro {argv[0]}")
    module.configure_parser(parser)
    code = module.run(parser.parse_args(argv[1:]))
    if code:
        raise DemoError(f"`eva-repro {argv[0]}` failed (exit code {code}); see its message above")


def _extract(images: str, shard_dir: Path, weights: str, plan: DemoPlan, device: str | None
             ) -> tuple[dict[str, Any], bool]:
    """extract() resumes by itself: chunks already done are skipped, so a rerun writes nothing."""
    before = set(shards.finished_shards(shard_dir)) if shard_dir.exists() else set()
    with warnings.catch_warnings():
        # the encoders print their random-init banner; the demo announced it already
        warnings.simplefilter("ignore", encoders.RandomInitWarning)
        manifest = extract(images, shard_dir, eva=EVA, clip=CLIP, eva_weights=weights,
                           clip_weights=weights, grid=GRID, training_mode="patch_only",
                           batch_size=8, shard_size=32, encoder_depth=plan.encoder_depth,
                           device=device)
    reused = len(before & {s["index"] for s in manifest["shards"]})
    print(f"{manifest['num_samples']} images in {len(manifest['shards'])} shards "
          f"({reused} reused, {len(manifest['shards']) - reused} written), {manifest['tokens']} "
          f"tokens, clip {manifest['clip_dim']}-d, eva {manifest['eva_dim']}-d")
    return manifest, reused == len(manifest["shards"])


def _split_sizes(manifest: dict[str, Any], shard_dir: Path, eval_fraction: float,
                 group_by: str | None = None) -> tuple[int, int]:
    """(train, held-out) sample counts of the split the trainer will make (same function)."""
    keys = shards.ShardReader(shard_dir).keys()
    train, heldout = shards.split_indices(keys, eval_fraction, group_by=group_by)
    if not heldout or len(train) < 2:
        raise DemoError(f"{shard_dir}: {manifest['num_samples']} images give {len(train)} "
                        f"training and {len(heldout)} held-out samples; the demo needs more "
                        "images (--num_images, or more files in --input_dir)")
    return len(train), len(heldout)


def _finished_run(run_dir: Path, steps: int) -> dict[str, Any] | None:
    """summary.json of a run that completed exactly `steps` steps and exported its model."""
    path = run_dir / "summary.json"
    if not path.exists() or not (run_dir / "model" / "config.json").exists():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("steps") == steps else None


def _train(out: Path, plan: DemoPlan, num_train: int, device: str | None,
           group_by: str | None = None) -> tuple[dict[str, Any], bool]:
    run_dir = out / "run"
    done = _finished_run(run_dir, plan.steps)
    if done is not None:
        # not `train --resume auto`: resuming a finished run would re-save and re-export it
        print(f"reusing the finished run in {run_dir} ({done['steps']} steps; delete it to "
              "retrain)")
        return done, True
    batch = min(plan.batch_size, num_train)
    argv = ["train", "--chunked_embeddings_dir", str(out / "shards"), "--output_dir",
            str(run_dir), "--model_size", "tiny", "--batch_size", str(batch),
            "--max_steps", str(plan.steps), "--eval_fraction", str(plan.eval_fraction),
            "--resume", "auto", "--save_every", str(max(plan.steps // 4, 1)),
            "--eval_every", str(plan.steps), "--eval_sampler_steps", str(plan.sampler_steps),
            "--eval_samples", str(plan.check_samples),
            "--log_every", str(max(plan.steps // 10, 1)),
            # the data is a few MB in memory: loader processes would only compete for the cores
            "--num_workers", "0"]
    if group_by:
        argv += ["--group_by", group_by]
    if device:
        argv += ["--device", device]
    _run_command(argv)
    summary = _finished_run(run_dir, plan.steps)
    if summary is None:
        raise DemoError(f"{run_dir}: training ended without a summary.json for {plan.steps} "
                        "steps; see the log above")
    return summary, False


def _evaluate(out: Path, plan: DemoPlan, num_heldout: int, device: str | None
              ) -> tuple[dict[str, Any], bool]:
    report_dir, run_dir = out / "report", out / "run"
    report = report_dir / "report.json"
    if report.exists() and report.stat().st_mtime >= (run_dir / "summary.json").stat().st_mtime:
        print(f"reusing the report in {report_dir} (newer than the run; delete it to re-evaluate)")
        return json.loads(report.read_text()), True
    argv = ["evaluate", "--model_path", str(run_dir), "--embeddings_dir", str(out / "shards"),
            "--output_dir", str(report_dir), "--num_samples", str(num_heldout),
            "--steps", str(plan.sampler_steps), "--sweep", plan.sweep,
            "--control_samples", str(plan.check_samples)]
    if plan.sweep_samples:
        argv += ["--sweep_samples", str(plan.sweep_samples)]
    if device:
        argv += ["--device", device]
    _run_command(argv)
    return json.loads(report.read_text()), False


class StageLog:
    """Per-stage seconds and threads in OUT/demo_stages.json, saved after every stage, so that a
    stage reused by a later invocation still shows the time of the one that did the work (even
    when that one was interrupted afterwards)."""

    def __init__(self, out: Path):
        self.path = out / STAGES
        self.earlier = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.stages: dict[str, dict[str, Any]] = {}

    def done(self, name: str, t0: float, threads: int, reused: bool) -> None:
        rec: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1), "threads": threads,
                               "reused": reused}
        old = self.earlier.get(name)
        if reused and old and (not old["reused"] or old.get("earlier_run")):
            rec = {**old, "reused": True, "earlier_run": True}
        self.stages[name] = rec
        self.path.parent.mkdir(parents=True, exist_ok=True)
        files.atomic_write_json(self.path, {**self.earlier, **self.stages})


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _time_line(stages: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, rec in stages.items():
        text = f"{name} {rec['seconds']:.0f} s ({rec['threads']} thread{'s' * (rec['threads'] > 1)})"
        if rec.get("earlier_run"):
            text += " in an earlier run, reused now"
        elif rec["reused"]:
            text += ", reused"
        parts.append(text)
    return "; ".join(parts)


def _write_summary(out: Path, weights: dict[str, str], report: dict[str, Any],
                   train_summary: dict[str, Any], stages: dict[str, dict[str, Any]],
                   manifest: dict[str, Any], plan: DemoPlan, total: float) -> str:
    """OUT/DEMO.md and OUT/demo_summary.json: weights, the report, timings, where things are."""
    report_md = (out / "report" / "report.md").read_text()
    random_init = any(w == "RANDOM INIT" for w in weights.values())
    lines = ["# eva-repro demo", "",
             "Encoder weights: " + "; ".join(f"{k} {v}" for k, v in weights.items()) + ".",
             ("**The encoders are randomly initialised**: the pipeline and the numbers are real, "
              "but the embeddings are not CLIP's." if random_init else ""),
             "", f"{manifest['num_samples']} images, {manifest['tokens']} tokens per image, "
             f"tiny DiT {train_summary['params_m']}M parameters, {train_summary['steps']} steps "
             f"(final loss {_fmt(train_summary.get('final_loss'))}).", "",
             "#" + report_md if report_md.startswith("# ") else report_md,
             f"Time per stage: {_time_line(stages)}. This invocation: {total:.1f} s.",
             "", f"Files: {out / 'shards'}, {out / 'run'}, {out / 'report'}.", ""]
    text = "\n".join(lines)
    files.atomic_write_bytes(out / "DEMO.md", text.encode())
    files.atomic_write_json(out / SUMMARY, {
        "plan": asdict(plan), "encoder_weights": weights, "stages": stages,
        "invocation_seconds": total, "num_images": manifest["num_samples"],
        "train": train_summary,
        "headline": {"n_samples": report["n_samples"],
                     "token_mean": report["cosine"]["token_mean"],
                     "image_mean": report["cosine"]["image_mean"],
                     "band": report["cosine"].get("band"),
                     "mean_baseline": report["baselines"]["mean"]["token_mean"],
                     "ridge_baseline": report["baselines"]["ridge"]["token_mean"],
                     "shuffled": report["controls"].get("shuffled", {}).get("token_mean"),
                     "recall_at_1": report["retrieval"]["recall_at_1"],
                     "recall_at_5": report["retrieval"]["recall_at_5"],
                     "group_by": report["split"].get("group_by"),
                     "heldout_groups": report["split"].get("num_heldout_groups")},
        "paths": {k: str(out / k) for k in ("images", "shards", "run", "report")}})
    return report_md


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    plan = make_plan(args)
    out = Path(args.output_dir)
    refuse_a_file(out)
    weights = "pretrained" if args.pretrained else "auto"
    input_dir = str(Path(args.input_dir).resolve()) if args.input_dir else None
    if input_dir and not Path(input_dir).is_dir():
        raise DemoError(f"--input_dir {args.input_dir}: not a folder; pass a folder of images")
    start = time.perf_counter()
    weights_found = _announce_weights(weights)
    # the bundled views: every view of a photo in one group, so held-out photos are unseen ones
    group_by = None if input_dir else VIEW_GROUP
    config = {"plan": asdict(plan), "input_dir": input_dir, "weights": weights, "eva": EVA,
              "clip": CLIP, "grid": GRID, "group_by": group_by}
    _check_config(out, config)
    log = StageLog(out)
    state: dict[str, int] = {}

    def done(name: str, t0: float, reused: bool) -> None:
        log.done(name, t0, state["threads"], reused)

    t0 = time.perf_counter()
    if input_dir:
        images = input_dir
        _stage(1, f"images: your folder {images}", args, state)
    else:
        _stage(1, f"images: {plan.num_images} deterministic views of {len(PHOTOS)} bundled "
                  f"photos -> {out / 'images'}", args, state)
        images = str(out / "images")
        write_demo_images(images, plan.num_images)
    done("images", t0, False)

    t0 = time.perf_counter()
    depth = "full depth" if plan.encoder_depth is None else f"first {plan.encoder_depth} block(s)"
    _stage(2, f"extract: {EVA} target, {CLIP} condition ({depth}), {GRID}x{GRID} grid -> "
              f"{out / 'shards'}", args, state, large_matmuls=True)
    manifest, reused = _extract(images, out / "shards", weights, plan, args.device)
    if manifest["num_failures"]:
        print(f"{manifest['num_failures']} images could not be used; see "
              f"{out / 'shards' / shards.FAILURES}")
    _save_config(out, config)
    num_train, num_heldout = _split_sizes(manifest, out / "shards", plan.eval_fraction, group_by)
    done("extract", t0, reused)

    t0 = time.perf_counter()
    _stage(3, f"train: tiny DiT, {plan.steps} steps, {num_train} training / {num_heldout} "
              f"held-out images -> {out / 'run'}", args, state)
    train_summary, reused = _train(out, plan, num_train, args.device, group_by)
    done("train", t0, reused)

    t0 = time.perf_counter()
    _stage(4, f"evaluate: the run's {num_heldout} held-out images -> {out / 'report'}", args,
           state)
    report, reused = _evaluate(out, plan, num_heldout, args.device)
    done("evaluate", t0, reused)
    total = time.perf_counter() - start

    report_md = _write_summary(out, weights_found, report, train_summary,
                               log.stages, manifest, plan, total)
    print("\n" + report_md)
    if not input_dir:
        print(f"Held out: every view of {report['split'].get('num_heldout_groups')} of the "
              f"{len(PHOTOS)} photos (--group_by {VIEW_GROUP!r}); no view of a held-out photo "
              "was trained on.")
    print(f"demo finished in {total / 60:.1f} min ({manifest['num_samples']} images; "
          f"encoders: {', '.join(f'{k} {v}' for k, v in weights_found.items())})")
    print(f"  summary {out / 'DEMO.md'}\n  shards  {out / 'shards'}\n  run     {out / 'run'}\n"
          f"  report  {out / 'report'}")
    return report


def run(args: argparse.Namespace) -> int:
    import torch

    before = torch.get_num_threads()
    try:
        run_demo(args)
    finally:
        torch.set_num_threads(before)  # in-process callers (tests) get their setting back
    return 0
