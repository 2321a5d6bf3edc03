"""Synthetic shards with a known answer: learning can be tested without images or encoders.

The condition is Gaussian tokens on a g x g grid; the target is a fixed random nonlinear
function of each condition token *and its 4 neighbours*, plus a per-position offset:

    m_ij  = c_ij + 0.5 * mean(c of the 4-neighbours of (i, j))     (zero padded at the border)
    y_ij  = W2 tanh(W1 m_ij) + p_ij          W1 ~ N(0, gain^2 / D_clip)

so a model must read the condition through position-aware cross-attention. The function's
weights depend on `seed` only, and the target is deterministic given the condition: a perfect
model reaches cosine 1.0. `gain` sets how far tanh saturates, i.e. how far the function is from
linear: the larger it is, the further a ridge regression falls below a perfect model
(docs/results.md has the ridge baseline of each problem, with the command that measures it).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from eva_repro.data import shards
from eva_repro.data.layout import TOKEN_MODES, neighbour_mean
from eva_repro.utils import files
from eva_repro.utils.errors import UserError
from eva_repro.utils.lockfile import LOCK_NAME, DirectoryLock


def _function_weights(grid: int, clip_dim: int, eva_dim: int, seed: int,
                      gain: float = 1.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hidden = max(clip_dim, eva_dim)
    return {
        "w1": torch.randn(clip_dim, hidden, generator=g) * (gain / math.sqrt(clip_dim)),
        "w2": torch.randn(hidden, eva_dim, generator=g) / math.sqrt(hidden),
        "pos": torch.randn(grid * grid, eva_dim, generator=g) * 0.5,
        "cls": torch.randn(eva_dim, eva_dim, generator=g) / math.sqrt(eva_dim),
    }


def make_pairs(
    num_samples: int,
    grid: int = 4,
    clip_dim: int = 64,
    eva_dim: int = 128,
    seed: int = 0,
    include_cls: bool = False,
    start: int = 0,
    gain: float = 1.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(clip [N, T, clip_dim], eva [N, T, eva_dim]) for samples start .. start+N-1.

    Sample i is the same whatever `start`/`num_samples` it is generated with, so shards written in
    chunks are identical to one big call.
    """
    w = _function_weights(grid, clip_dim, eva_dim, seed, gain)
    clip = torch.stack([
        torch.randn(grid * grid, clip_dim, generator=torch.Generator().manual_seed(
            (seed + 1) * 1_000_003 + i))
        for i in range(start, start + num_samples)
    ])
    eva = torch.tanh((clip + 0.5 * neighbour_mean(clip)) @ w["w1"]) @ w["w2"] + w["pos"]
    if include_cls:  # CLS tokens: condition = mean patch, target = a fixed map of the mean target
        clip = torch.cat([clip.mean(dim=1, keepdim=True), clip], dim=1)
        eva = torch.cat([torch.tanh(eva.mean(dim=1, keepdim=True) @ w["cls"]), eva], dim=1)
    return clip, eva


def write_synthetic_shards(
    output_dir: str | Path,
    num_samples: int,
    grid: int = 4,
    clip_dim: int = 64,
    eva_dim: int = 128,
    seed: int = 0,
    shard_size: int = 256,
    include_cls: bool = False,
    dtype: str = "float16",
    gain: float = 1.5,
) -> dict:
    """Write `num_samples` synthetic pairs as shards in the extraction format; returns the manifest."""
    for flag, value in (("num_samples", num_samples), ("grid", grid), ("clip_dim", clip_dim),
                        ("eva_dim", eva_dim), ("shard_size", shard_size)):
        if value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if not 0 < gain < math.inf:
        raise UserError(f"--gain must be finite and > 0, got {gain}")
    out = Path(output_dir)
    with DirectoryLock(out, "eva-repro synth"):  # one writer; the shards of no other run mixed in
        files.remove_leftovers(out)  # a killed synth's half-written shard
        held = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME)
        if held:
            listed = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
            raise UserError(f"{out}: not empty (holds {listed}); synth writes a fresh shard "
                            "directory: choose a new --output_dir or empty this one")
        return _write(out, num_samples, grid, clip_dim, eva_dim, seed, shard_size, include_cls,
                      dtype, gain)


def _write(out: Path, num_samples: int, grid: int, clip_dim: int, eva_dim: int, seed: int,
           shard_size: int, include_cls: bool, dtype: str, gain: float) -> dict:
    for index, start in enumerate(range(0, num_samples, shard_size)):
        n = min(shard_size, num_samples - start)
        clip, eva = make_pairs(n, grid, clip_dim, eva_dim, seed, include_cls, start=start,
                               gain=gain)
        keys = [f"synth-{i:07d}" for i in range(start, start + n)]
        shards.write_shard(out, index, clip, eva, keys, dtype=dtype)
    source = {"name": "synthetic", "weights": f"random function, seed {seed}"}
    meta = {
        "grid": grid,
        "include_cls": include_cls,
        "training_mode": "cls_patch" if include_cls else "patch_only",
        "dtype": dtype,
        "encoders": {"clip": source, "eva": source},
        "synthetic": {"seed": seed, "num_samples": num_samples, "gain": gain,
                      "function": __doc__.split("\n\n")[1]},
    }
    return shards.write_manifest(out, meta)


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", required=True)
    p.add_argument("--num_samples", type=int, default=1024)
    p.add_argument("--grid", type=int, default=4)
    p.add_argument("--clip_dim", type=int, default=64)
    p.add_argument("--eva_dim", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard_size", type=int, default=256)
    p.add_argument("--training_mode", choices=TOKEN_MODES, default="patch_only")
    p.add_argument("--dtype", choices=sorted(shards.DTYPES), default="float16")
    p.add_argument("--gain", type=float, default=1.5,
                   help="nonlinearity of the target function (tanh saturation); 1.5 is near-linear")


def run(args: argparse.Namespace) -> int:
    manifest = write_synthetic_shards(
        args.output_dir, args.num_samples, args.grid, args.clip_dim, args.eva_dim, args.seed,
        args.shard_size, args.training_mode == "cls_patch", args.dtype, args.gain)
    print(f"wrote {manifest['num_samples']} synthetic samples in {len(manifest['shards'])} shards "
          f"to {args.output_dir} (tokens {manifest['tokens']}, clip {manifest['clip_dim']}-d, "
          f"eva {manifest['eva_dim']}-d)")
    return 0
