"""Evaluation benchmark: images/s of `eva-repro evaluate` and the NFE each sampler needs.

A small DiT is trained by the trainer (`eva_repro.training.train`, its defaults) on synthetic shards
(`eva_repro.data.synth`, known target function), then evaluated on its run's held-out split. For
every sampler (euler, heun, dopri5, with and without time shift) the cosine to the true targets
is measured over a range of step counts; the "converged" cosine is the one at the finest
setting, and we report the smallest NFE from which the cosine stays within 1% of it (99% of the
converged value, from above or below).
Goal: heun with time shift within 10 NFE.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from eva_repro.data.loader import load_rows, open_training_data
from eva_repro.data.synth import write_synthetic_shards
from eva_repro.evaluation.evaluate import evaluate
from eva_repro.evaluation.generate import generate_batch
from eva_repro.flow.transport import token_cosine
from eva_repro.model.checkpoint import load_model
from eva_repro.training.train import train
from eva_repro.utils.devices import pick_device

MODEL = {"hidden": 128, "depth": 3, "n_heads": 4, "n_kv_heads": 2}


def nfe_from(curve: list[dict], ok) -> float:
    """Smallest NFE from which on every setting of `curve` satisfies `ok(entry)`."""
    ordered = sorted(curve, key=lambda e: e["nfe"])
    reach = ordered[-1]["nfe"]
    for e in reversed(ordered):
        if not ok(e):
            break
        reach = e["nfe"]
    return reach


def nfe_within(curve: list[dict], converged: float, tolerance: float = 0.01) -> float:
    """Smallest NFE from which on the cosine stays within `tolerance` (relative) of `converged`.

    "Within 1%" rather than ">= 99%": a sampler can overshoot at few steps (one Euler step lands on
    the conditional mean, whose cosine is higher than a proper sample's), and that is not
    convergence.
    """
    return nfe_from(curve, lambda e: abs(e["cosine"] - converged) <= tolerance * abs(converged))


def nfe_to_converge(model: torch.nn.Module, clip: torch.Tensor, eva: torch.Tensor, quick: bool) -> dict:
    """Per sampler and shift: cosine to the targets vs NFE, the converged cosine (finest setting)
    and the NFE from which it stays within 1% of it. Also, per setting, the cosine to a reference
    ODE solution from the same noise (dopri5, tol 1e-6; 1e-5 when quick): the solver error alone,
    without the
    sample-to-sample spread of the model."""
    grids = {
        "euler": [1, 2, 3, 4, 6, 8, 12, 16, 24, 32] + ([] if quick else [64, 128]),
        "heun": [1, 2, 3, 4, 5, 6, 8, 12, 16] + ([] if quick else [32, 64]),
        "dopri5": [1e-2, 1e-3, 1e-4] + ([] if quick else [1e-5]),
    }
    reference, _ = generate_batch(model, clip, 0, "dopri5", seed=0, tol=1e-5 if quick else 1e-6)
    out = {}
    for method, grid in grids.items():
        for shift in (1.0, 3.0):
            curve = []
            for knob in grid:
                steps, tol = (0, knob) if method == "dopri5" else (knob, 1e-5)
                gen, nfe = generate_batch(model, clip, steps, method, shift=shift, seed=0, tol=tol)
                curve.append({"steps": steps, "tol": tol if method == "dopri5" else None, "nfe": nfe,
                              "cosine": token_cosine(gen, eva).mean().item(),
                              "solution_cosine": token_cosine(gen, reference).mean().item()})
            converged = curve[-1]["cosine"]
            out[f"{method}_shift{shift:g}"] = {
                "converged_cosine": round(converged, 4),
                "nfe_within_1pct": nfe_within(curve, converged),
                "nfe_to_solution_0.99": nfe_from(curve, lambda e: e["solution_cosine"] >= 0.99),
                "curve": [{**e, "cosine": round(e["cosine"], 4),
                           "solution_cosine": round(e["solution_cosine"], 4)} for e in curve]}
    return out


def run(output_dir: Path, quick: bool) -> dict:
    device = pick_device().type
    if device == "cpu":  # a shared small CPU: more intra-op threads than free cores thrash
        torch.set_num_threads(1)
    work = Path(output_dir) / "evaluate_bench"
    shutil.rmtree(work, ignore_errors=True)  # this suite's own directory: a fresh run each time
    write_synthetic_shards(work / "shards", 1280 if quick else 5120, grid=4, clip_dim=64,
                           eva_dim=128, seed=0)
    steps = 800 if quick else 3000
    start = time.perf_counter()
    train({"data_dir": str(work / "shards"), "output_dir": str(work / "run"), "device": device,
           "model_size": "tiny", "model_overrides": dict(MODEL), "max_steps": steps,
           "batch_size": 32, "eval_fraction": 0.2, "eval_every": steps, "eval_samples": 8,
           "num_workers": 0, "progress": False, "tensorboard": False})
    train_s = time.perf_counter() - start
    model = load_model(work / "run").model.to(device).eval()
    data = open_training_data(work / "shards", eval_fraction=0.2)
    _, test_clip, test_eva = load_rows(data.reader, data.heldout_rows[:128], data.keys)
    sampler = nfe_to_converge(model, test_clip, test_eva, quick)
    generate_batch(model, test_clip[:8], 2, "heun")  # warm-up
    start = time.perf_counter()
    generate_batch(model, test_clip, 10, "heun", shift=3.0)
    generation_per_s = len(test_clip) / (time.perf_counter() - start)

    report = evaluate(work / "run", work / "shards", work / "report",
                      num_samples=len(data.heldout_rows), sweep="small", device=device,
                      progress=False, method="heun", steps=10, shift=3.0)
    heun = sampler["heun_shift3"]
    return {
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "model": {"params": model.num_parameters(), **MODEL, "train_steps": steps,
                  "train_seconds": round(train_s, 1)},
        "generation_images_per_s": round(generation_per_s, 1),  # heun 10 steps, shift 3, batch 128
        "evaluate": {"n_samples": report["n_samples"], "seconds": report["timing"]["seconds"],
                     "main_pass_images_per_s": report["timing"]["main_pass_images_per_s"],
                     "sampler": "heun 10 steps shift 3 (20 NFE) + controls + velocity",
                     "token_mean": round(report["cosine"]["token_mean"], 4),
                     "mean_baseline": round(report["baselines"]["mean"]["token_mean"], 4),
                     "ridge_baseline": round(report["baselines"]["ridge"]["token_mean"], 4)},
        "nfe_within_1pct": {k: v["nfe_within_1pct"] for k, v in sampler.items()},
        "nfe_to_solution_0.99": {k: v["nfe_to_solution_0.99"] for k, v in sampler.items()},
        "converged_cosine": {k: v["converged_cosine"] for k, v in sampler.items()},
        "goal_heun_shift_within_10_nfe": heun["nfe_within_1pct"] <= 10,
        "curves": {k: v["curve"] for k, v in sampler.items()},
    }
