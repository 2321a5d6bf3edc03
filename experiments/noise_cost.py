"""What the trainer's noise costs: one counter-based draw per micro-batch (`train.draw_noise`,
`utils.rng`) against a torch.Generator seeded per example (the design it replaced), and against
one training step of the tiny preset.

    python experiments/noise_cost.py [--shape B,T,D ...] [--runs 5]
                                     [--out experiments/results/noise_cost.json]

Both draws give each example the same values in any batch; the counter-based one does it in one
call for the batch (x0, t and the condition dropout), the other with a Generator, a manual_seed
and three draws per example. Reports the best of `--runs` seconds of each per shape, their ratio,
and the noise's share of a tiny-preset step (forward, backward, AdamW) at the first shape. Run it
on one thread (OMP_NUM_THREADS=1) for a figure comparable across machines.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path

import torch

from eva_repro.data.loader import Batch, DataPosition
from eva_repro.flow import transport
from eva_repro.model import PRESETS, DiT, DiTConfig
from eva_repro.training import train
from eva_repro.utils import rng
from eva_repro.utils.files import atomic_write_json

SHAPES = ["32,16,64", "64,64,1024", "64,256,1792"]  # tiny preset runs; a 64 x 1024 grid; BLIP3-o's width
CPU = torch.device("cpu")


def per_example(batch: Batch, shape: tuple[int, ...], cfg: transport.FlowConfig, seed: int,
                global_batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The replaced design: a Generator seeded from (seed, epoch, example index) per example."""
    g = torch.Generator()
    first = batch.position.batch * global_batch + batch.offset
    x0, ts, drops = [], [], []
    for i in range(shape[0]):
        g.manual_seed(rng.mix_seed("noise", seed, batch.position.epoch, first + i))
        x0.append(torch.randn(shape[1:], generator=g))
        ts.append(transport.sample_time(1, cfg.time_scheme, cfg.time_mean, cfg.time_std,
                                        cfg.time_shift, generator=g))
        drops.append(torch.rand(1, generator=g) < cfg.cfg_dropout)
    return torch.stack(x0), torch.cat(ts), torch.cat(drops)


def best_seconds(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def batch_at(rows: int) -> Batch:
    return Batch(torch.zeros(rows, 1, 1), torch.zeros(rows, 1, 1), torch.ones(rows, dtype=torch.bool),
                 DataPosition(0, 3), 0, [])


def tiny_step_seconds(shape: tuple[int, ...], cfg: transport.FlowConfig, runs: int) -> float:
    b, tokens, dim = shape
    model = DiT(DiTConfig(**{**PRESETS["tiny"], "target_dim": dim, "cond_dim": dim, "tokens": tokens}))
    opt = torch.optim.AdamW(model.parameters())
    x1, cond = torch.randn(shape), torch.randn(shape)

    def step() -> None:
        x0, t, drop = train.draw_noise(batch_at(b), shape, cfg, 0, b, CPU)
        transport.velocity_loss(model, x1, cond, x0, t, drop,
                                prediction=model.config.prediction).loss.backward()
        opt.step()
        opt.zero_grad()

    return best_seconds(step, runs)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", help="B,T,D (repeatable); default: " + " ".join(SHAPES))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "noise_cost.json")
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape or SHAPES]
    cfg = transport.FlowConfig(cfg_dropout=0.1)
    results = {}
    for shape in shapes:
        old = best_seconds(functools.partial(per_example, batch_at(shape[0]), shape, cfg, 0, shape[0]),
                           args.runs)
        new = best_seconds(functools.partial(train.draw_noise, batch_at(shape[0]), shape, cfg, 0,
                                             shape[0], CPU), args.runs)
        results["x".join(map(str, shape))] = {"per_example_s": old, "one_call_s": new,
                                              "ratio_one_call_over_per_example": round(new / old, 2)}
    step = tiny_step_seconds(shapes[0], cfg, args.runs)
    first = results["x".join(map(str, shapes[0]))]
    report = {
        "command": "python experiments/noise_cost.py " + " ".join(argv or []),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "results": results,
        "tiny_step": {"shape": list(shapes[0]), "seconds": step,
                      "noise_share": round(first["one_call_s"] / step, 5)},
    }
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
