"""Backbones: eva-repro's Next-DiT against diffusers' LuminaNextDiT2DModel (BLIP3-o's head).

On problems of the learning benchmark (`bench.quality`), at equal width and depth (the
tiny preset: 384 wide, 6 blocks, batch 16, default settings otherwise), three heads are trained
and scored on held-out samples against the mean and ridge baselines:
- `next-dit`: eva-repro's default head (aligned condition, x-prediction, linear path);
- `next-dit-pure`: our Next-DiT as BLIP3-o's head (`--model_variant blip3o`: cross-attention
  only, v-prediction), the same conditioning as diffusers' network;
- `diffusers-lumina-next`: diffusers' own network (`--backbone lumina-next`).
Reported per head: the curve of held-out cosine against steps and training seconds, the first
step past each baseline, parameters, training samples/s and sampling samples/s (heun, 20 steps).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from eva_repro.bench.quality import PROBLEMS as QUALITY_PROBLEMS
from eva_repro.bench.quality import plot, run_problem, summary_line
from eva_repro.data.shards import ShardReader
from eva_repro.data.synth import write_synthetic_shards
from eva_repro.evaluation.generate import generate
from eva_repro.model.checkpoint import load_model

HEADS = {
    "next-dit": dict(backbone="next-dit", model_variant="eva-repro"),
    "next-dit-pure": dict(backbone="next-dit", model_variant="blip3o"),
    "diffusers-lumina-next": dict(backbone="lumina-next"),
}
# the learning benchmark's grid problems, and one token per image: diffusers' cross-attention
# gives the condition keys no position, so only there is the aligned condition token free to find
PROBLEMS = {
    "synth-64-128": QUALITY_PROBLEMS["synth-64-128"],
    "synth-nonlinear": QUALITY_PROBLEMS["synth-nonlinear"],
    "synth-1-token": (dict(num_samples=600, grid=1, clip_dim=64, eva_dim=128, seed=5), 600),
}
QUICK = {"synth-64-128": 150, "synth-1-token": 150}
SAMPLING_BATCH = 64


def sampling_rate(run_dir: Path, data: Path) -> float:
    """Samples/s of the run's EMA model through 20 heun steps on a batch of conditions."""
    model = load_model(run_dir).model
    reader = ShardReader(data)
    clip = reader.read_rows(0, 0, SAMPLING_BATCH)["clip"].float()
    tokens = model.config.tokens or clip.shape[1]
    clip = clip[:, -tokens:]  # patch_only models take the patches of CLS-first shards
    start = time.perf_counter()
    generate(model, clip, steps=20, method="heun", batch_size=SAMPLING_BATCH)
    return clip.shape[0] / (time.perf_counter() - start)


def run(output_dir: Path, quick: bool) -> dict[str, Any]:
    torch.set_num_threads(1)  # the tiny models' small ops: one thread is fastest on a shared CPU
    problems = {k: (PROBLEMS[k][0], v) for k, v in QUICK.items()} if quick else PROBLEMS
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="eva-backbones-") as tmp:
        for name, (synth, steps) in problems.items():
            work = Path(tmp) / name
            data = work / "shards"
            write_synthetic_shards(data, dtype="float32", **synth)
            results[name] = []
            for label, options in HEADS.items():
                r = run_problem(data, steps, label, work, **options)
                # training seconds without the periodic evaluations (metrics.jsonl's train_s)
                r["train_samples_per_s"] = round(16 * steps / r["curve"][-1]["train_s"], 1)
                r["sample_samples_per_s"] = round(sampling_rate(work / f"run-{label}", data), 1)
                results[name].append(r)
            print(summary_line("backbones", name, results[name]), flush=True)
    plot(results, output_dir / "backbones.png")
    return {"quick": quick, "preset": "tiny", "batch_size": 16, "sampler": "heun, 20 steps",
            "heads": HEADS, "problems": results, "plot": str(output_dir / "backbones.png")}
