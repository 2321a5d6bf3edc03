"""Known-answer problems for `eva-repro check`: shards whose target distribution is known exactly.

Every problem draws the condition c as Gaussian tokens on a g x g grid and the target as a fixed
random function of it plus noise the condition does not predict:

    m_ij = c_ij                                  "grid", "wide": the token at the same place
    m_ij = c_ij + mean(c of the 4-neighbours)    "neighbour": the token and its neighbours
    m    = c                                     "global": one token per image (g = 1)
    m_ij = 2 * mean(c of the 2x2 block at ij)    "regrid": the condition on a 2g x 2g grid,
                                                  the target on g x g (both cover the image)
    y_ij = W2 tanh(W1 m_ij) + p_ij + s * z_ij U  z_ij ~ N(0, I_r), U [r, D_target] fixed

so p(y | c) is a Gaussian of rank r around a nonlinear function of the condition, and an
*oracle* generator (a fresh z) is known: its held-out cosine is the ceiling of a correct
generator, which a regressor of the mean cannot match in distribution (it has no spread in U).
The per-position offset p needs the target position, the neighbour term the condition's
positions; "wide" has a target four times the network width; "regrid" needs the condition's
positions mapped onto the target grid, as when the two encoders have different patch grids
(a flat token index, or positions counted in each grid's own units, do not line up).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from eva_repro.data import shards
from eva_repro.data.layout import align_condition, neighbour_mean

NOISE_RANK = 4


@dataclass(frozen=True)
class Problem:
    """One known-answer family at one size."""

    name: str
    grid: int
    clip_dim: int
    eva_dim: int
    samples: int
    seed: int
    neighbours: bool = False
    clip_grid: int | None = None  # the condition's grid, when it is not the target's
    noise: float = 0.5  # s: the spread of the target around its conditional mean
    gain: float = 1.5  # how far tanh saturates (how far the function is from linear)

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def clip_tokens(self) -> int:
        return (self.clip_grid or self.grid) ** 2

    def weights(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        hidden = max(self.clip_dim, self.eva_dim)
        return {
            "w1": torch.randn(self.clip_dim, hidden, generator=g) * (self.gain / math.sqrt(self.clip_dim)),
            "w2": torch.randn(hidden, self.eva_dim, generator=g) / math.sqrt(hidden),
            "pos": torch.randn(self.tokens, self.eva_dim, generator=g) * 0.5,
            "noise": torch.randn(NOISE_RANK, self.eva_dim, generator=g) / math.sqrt(NOISE_RANK),
        }

    def condition(self, start: int, n: int) -> torch.Tensor:
        return torch.stack([
            torch.randn(self.clip_tokens, self.clip_dim,
                        generator=torch.Generator().manual_seed((self.seed + 1) * 1_000_003 + i))
            for i in range(start, start + n)])

    def mean_target(self, clip: torch.Tensor) -> torch.Tensor:
        """E(y | c), shape (N, T, D_target)."""
        w = self.weights()
        if self.neighbours:
            m = clip + neighbour_mean(clip)
        elif self.clip_grid:  # the mean of k x k unit Gaussians times k: unit variance again
            m = align_condition(clip, self.tokens, cls_first=False) * (self.clip_grid / self.grid)
        else:
            m = clip
        return torch.tanh(m @ w["w1"]) @ w["w2"] + w["pos"]

    def draw_target(self, clip: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        """y ~ p(y | c): the conditional mean plus rank-r noise, sample i's drawn with seeds[i]."""
        z = torch.stack([torch.randn(self.tokens, NOISE_RANK,
                                     generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        return self.mean_target(clip) + self.noise * z @ self.weights()["noise"]

    def pairs(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples start .. start + n - 1, each the same whatever chunk it is drawn in."""
        clip = self.condition(start, n)
        return clip, self.draw_target(clip, [(self.seed + 7) * 1_000_003 + i
                                             for i in range(start, start + n)])

    def write(self, directory: str | Path, shard_size: int = 256) -> Path:
        """The problem's shards (the extraction format) in `directory`."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for index, start in enumerate(range(0, self.samples, shard_size)):
            n = min(shard_size, self.samples - start)
            clip, eva = self.pairs(start, n)
            keys = [f"{self.name}-{i:07d}" for i in range(start, start + n)]
            shards.write_shard(out, index, clip, eva, keys, dtype="float32")
        source = {"name": "eva-repro check", "weights": f"{self.name} problem, seed {self.seed}"}
        shards.write_manifest(out, {"grid": self.grid, "include_cls": False,
                                    "training_mode": "patch_only", "dtype": "float32",
                                    "encoders": {"clip": source, "eva": source},
                                    "synthetic": {"problem": self.name, "seed": self.seed}})
        return out


def problems(width: int, samples: int, seed: int = 0) -> dict[str, Problem]:
    """The families at a network width: targets as wide as the network, "wide" four times."""
    return {
        "global": Problem("global", 1, 32, width, samples, seed + 1),
        "grid": Problem("grid", 4, 32, width, samples, seed + 2),
        "neighbour": Problem("neighbour", 4, 32, width, samples, seed + 3, neighbours=True),
        "wide": Problem("wide", 4, 32, 4 * width, samples, seed + 4),
        "regrid": Problem("regrid", 4, 32, width, samples, seed + 5, clip_grid=8),
    }
