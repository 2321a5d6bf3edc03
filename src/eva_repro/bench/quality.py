"""Learning quality: held-out sampled cosine of the DiT against the mean and ridge baselines.

For each problem (synthetic sets of several shapes, plus any shard directories given with
`--data`, e.g. real photos through `eva-repro extract`) and each configuration in `CONFIGS` (the
defaults, and the pure BLIP3-o one: its head and its objective), one `eva_repro.training.train` run with
the trainer's own defaults (batch 8, 10 epochs; tiny preset, 20% held out; `--quick`: 200 steps;
the pure recipe `LENGTH` times as long)
evaluates its EMA model on every held-out sample six times along the run. The baselines are
fitted on the same run's training split and scored on the same held-out samples
(`eva_repro.evaluation.evaluate`). Reported: the curve of held-out cosine against optimiser steps
and training seconds, and the first evaluated step at which the DiT passes the mean baseline and
the ridge baseline (time-to-quality). A PNG of the curves goes beside the JSON.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from eva_repro.data import shards
from eva_repro.data.synth import write_synthetic_shards
from eva_repro.evaluation.evaluate import evaluate
from eva_repro.training import train as train_mod
from eva_repro.utils.errors import UserError
from eva_repro.utils.files import atomic_write_json

# name: synth arguments; the wide ones put 1024-d and 4096-d targets (EVA02-L, EVA-CLIP-8B widths)
# into the 384-wide tiny preset
PROBLEMS = {
    "synth-64-128": dict(num_samples=600, grid=4, clip_dim=64, eva_dim=128, seed=5),
    "synth-nonlinear": dict(num_samples=400, grid=4, clip_dim=32, eva_dim=64, seed=3, gain=4.0),
    "synth-1024-1024": dict(num_samples=600, grid=8, clip_dim=1024, eva_dim=1024, seed=1),
    "synth-1024-4096": dict(num_samples=400, grid=4, clip_dim=1024, eva_dim=4096, seed=2),
}
QUICK = {"synth-64-128": 200}  # --quick: these problems only, at this many optimiser steps
BATCH, EPOCHS, HELDOUT = 8, 10, 0.2  # the trainer's defaults (TrainConfig), 20% held out
# label: train options over the defaults. "blip3o" is BLIP3-o's own recipe: its head (the pure
# Lumina-Next block: cross-attention only, v-prediction), the plain velocity loss, logit-normal(0, 1)
# times.
CONFIGS = {
    "eva-repro": {},
    "blip3o": dict(model_variant="blip3o", loss_weight="velocity", time_mean=0.0,
                   time_std=1.0),
}
# How many times the default budget each recipe trains for. The pure head finds the aligned
# condition through cross-attention alone and learns later: at the default budget it is still
# before its rise, which would report a correct head as unable (docs/testbed.md).
LENGTH = {"eva-repro": 1, "blip3o": 5}


def first_step_above(curve: list[dict], level: float) -> dict | None:
    """The first evaluation point whose held-out cosine exceeds `level` (None: never)."""
    return next(({"step": p["step"], "train_s": p["train_s"]} for p in curve
                 if p["heldout_cosine"] > level), None)


def run_problem(data: Path, steps: int | None, label: str, work: Path,
                **train_options) -> dict[str, Any]:
    """One default-settings run (tiny; `steps` optimiser steps or the default 10 epochs;
    `train_options` over the defaults) scored on held-out data against the baselines."""
    out = work / f"run-{label}"
    samples = shards.read_manifest(data).num_samples
    scale = LENGTH.get(label, 1)
    steps = steps * scale if steps else None
    expected = steps or scale * EPOCHS * math.ceil((1 - HELDOUT) * samples / BATCH)
    summary = train_mod.train(dict(
        data_dir=str(data), output_dir=str(out), model_size="tiny", batch_size=BATCH,
        num_epochs=scale * EPOCHS, max_steps=steps, eval_fraction=HELDOUT,
        eval_every=max(1, expected // 6), eval_samples=100_000, save_every=100_000,
        num_workers=0, progress=False, tensorboard=False, log_every=50, **train_options))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "train_s": r.get("train_s", 0.0),
              "heldout_cosine": round(r["heldout_cosine"], 4)}
             for r in records if r.get("heldout_cosine") is not None]
    report = evaluate(out, data, steps=20, sweep="none", progress=False, plots=False,
                      control_samples=16)
    mean = report["baselines"]["mean"]["token_mean"]
    ridge = report["baselines"]["ridge"]["token_mean"]
    return {
        "variant": label, "steps": summary["steps"], "params_m": summary["params_m"],
        "train_s": summary["train_time_s"], "curve": curve,
        "dit": round(report["cosine"]["token_mean"], 4), "mean": round(mean, 4),
        "ridge": round(ridge, 4), "heldout_samples": report["n_samples"],
        # 95% bootstrap interval of DiT - ridge over the held-out images: is the gap resolved?
        "dit_minus_ridge_ci": [round(x, 4) for x in
                               report["baselines"]["ridge"]["dit_minus_baseline_ci"]],
        "first_above_mean": first_step_above(curve, mean),
        "first_above_ridge": first_step_above(curve, ridge),
    }


def summary_line(suite: str, problem: str, runs: list[dict]) -> str:
    """`[suite] problem: head cosine (params), ... | ridge, mean` for the log."""
    heads = ", ".join(f"{r['variant']} {r['dit']:.3f} ({r['params_m']}M)" for r in runs)
    return f"[{suite}] {problem}: {heads} | ridge {runs[0]['ridge']:.3f}, mean {runs[0]['mean']:.3f}"


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
    for ax, (name, runs) in zip(axes[0], results.items(), strict=True):
        for r in runs:
            ax.plot([p["step"] for p in r["curve"]], [p["heldout_cosine"] for p in r["curve"]],
                    marker="o", label=f"DiT {r['variant']}")
        ax.axhline(runs[0]["ridge"], color="k", ls="--", label="ridge")
        ax.axhline(runs[0]["mean"], color="gray", ls=":", label="mean")
        ax.set(title=name, xlabel="optimiser step", ylabel="held-out cosine", ylim=(0, 1))
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(output_dir: Path, quick: bool, data_dirs: list[str] | None = None,
        problems: list[str] | None = None, recipes: list[str] | None = None) -> dict[str, Any]:
    """`problems` / `recipes`: subsets of PROBLEMS / CONFIGS (None or empty: all; problems
    ["none"]: only `data_dirs`)."""
    torch.set_num_threads(1)  # the tiny DiT's small ops: one thread is fastest on a shared CPU
    configs = _pick(CONFIGS, recipes, "--recipe")
    chosen = {} if problems == ["none"] else _pick(PROBLEMS, problems, "--problem")
    synthetic = {k: v for k, v in chosen.items() if k in QUICK} if quick else chosen
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="eva-quality-") as tmp:
        jobs = []
        for name, synth in synthetic.items():
            data = Path(tmp) / name / "shards"
            write_synthetic_shards(data, dtype="float32", **synth)
            jobs.append((name, data, QUICK[name] if quick else None))
        jobs += [(_data_name(Path(d)), Path(d), 150 if quick else None) for d in data_dirs or []]
        for name, data, steps in jobs:
            results[name] = [run_problem(data, steps, label, Path(tmp) / name, **options)
                             for label, options in configs.items()]
            print(summary_line("quality", name, results[name]), flush=True)
            # the finished problems survive a crash or a kill in a later one
            atomic_write_json(output_dir / "quality.json",
                              {"suite": "quality", "complete": False, **_header(quick),
                               "problems": results})
    plot(results, output_dir / "quality.png")
    return {"complete": True, **_header(quick), "problems": results,
            "plot": str(output_dir / "quality.png")}


def _data_name(shard_dir: Path) -> str:
    """A shard directory's name in the results: `imagenet/in8/shards` is "in8", not "shards" (two
    such directories would share one key and one work directory)."""
    return shard_dir.parent.name if shard_dir.name == "shards" else shard_dir.name


def _pick(table: dict[str, Any], names: list[str] | None, flag: str) -> dict[str, Any]:
    unknown = sorted(set(names or []) - set(table))
    if unknown:
        raise UserError(f"{flag} {', '.join(unknown)}: unknown; choose from {', '.join(table)}")
    return {k: v for k, v in table.items() if not names or k in names}


def _header(quick: bool) -> dict[str, Any]:
    return {"quick": quick, "preset": "tiny", "batch_size": BATCH,
            "length": "200 steps" if quick else f"{EPOCHS} epochs",
            "length_multiplier": LENGTH, "heldout_fraction": HELDOUT,
            "sampler": "heun, 20 steps"}
