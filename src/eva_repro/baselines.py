"""Baselines the DiT must beat, fitted on the training split only and streamed from shards.

mean   the mean target token per position (of L2-normalised tokens: the direction that maximises
       the summed cosine to the training tokens). Ignores the condition entirely.
ridge  a linear map from a condition token to the target token at the same position, plus a
       per-position bias, fitted in closed form. Features are RMS-normalised condition tokens
       (like the DiT's input RMSNorm, which keeps CLIP's few huge-norm tokens from dominating);
       targets are L2-normalised (the metric is cosine).

Ridge needs only X^T X [Dc+P, Dc+P] and X^T Y [Dc+P, De] (P = positions with a bias), summed
over batches in float64, so memory is independent of the number of samples and D can be 4096.
lambda = alpha * (number of training tokens), alpha picked on a held-in tenth of the training
samples by closed-form validation error (no second pass over the data), then refit on all.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from eva_repro.errors import UserError
from eva_repro.layout import neighbour_mean, pairs_for_model
from eva_repro.progress import progress_bar
from eva_repro.shards import ShardReader, finite_samples

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


# ---------------------------------------------------------------------------------------------
# streaming rows out of shards


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token x / rms(x): unit mean square per element (ridge features)."""
    x = x.float()
    return x * (math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True).clamp_min(eps))


# ---------------------------------------------------------------------------------------------
# mean target token per position


@dataclass
class MeanBaseline:
    mean: torch.Tensor  # [T, De], mean of unit-norm target tokens per position

    def predict(self, clip: torch.Tensor) -> torch.Tensor:
        """The same tokens for every image: [B, T, De]."""
        return self.mean.to(clip.device).expand(clip.shape[0], -1, -1)


class MeanAccumulator:
    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, eva: torch.Tensor) -> None:
        s = F.normalize(eva.float(), dim=-1).sum(dim=0).double()
        self.total = s if self.total is None else self.total + s
        self.count += eva.shape[0]

    def result(self) -> MeanBaseline:
        if self.total is None:
            raise UserError("mean baseline: no training samples to fit on")
        return MeanBaseline((self.total / self.count).float())


# ---------------------------------------------------------------------------------------------
# ridge regression, condition token -> target token


@dataclass
class RidgeBaseline:
    weight: torch.Tensor  # [Dc, De]
    bias: torch.Tensor  # [P, De]: per position (P = T) or one global bias (P = 1)
    alpha: float
    info: dict = field(default_factory=dict)

    def predict(self, clip: torch.Tensor) -> torch.Tensor:
        x = rms_normalize(clip)
        return x @ self.weight.to(x.device) + self.bias.to(x.device)


class RidgeAccumulator:
    """Sufficient statistics of the ridge problem with features [x, one-hot(position group)]."""

    def __init__(self, cond_dim: int, target_dim: int, tokens: int, position_bias: bool = True,
                 device: torch.device | str = "cpu"):
        self.groups = tokens if position_bias else 1
        f64 = dict(dtype=torch.float64, device=device)
        self.sxx = torch.zeros(cond_dim, cond_dim, **f64)
        self.sxp = torch.zeros(self.groups, cond_dim, **f64)  # sum of x per group
        self.count = torch.zeros(self.groups, **f64)
        self.sxy = torch.zeros(cond_dim, target_dim, **f64)
        self.spy = torch.zeros(self.groups, target_dim, **f64)  # sum of y per group
        self.syy = torch.zeros((), **f64)
        self.device = device

    def update(self, clip: torch.Tensor, eva: torch.Tensor) -> None:
        self.add(rms_normalize(clip.to(self.device)), eva)

    def add(self, x: torch.Tensor, eva: torch.Tensor) -> None:
        """Features x [B, T, Dc] (already computed from the condition) and targets [B, T, De]."""
        x = x.to(self.device).float()
        y = F.normalize(eva.to(self.device).float(), dim=-1)  # [B, T, De]
        if self.groups == 1:
            x, y = x.reshape(1, -1, x.shape[-1]), y.reshape(1, -1, y.shape[-1])
        else:
            x, y = x.transpose(0, 1), y.transpose(0, 1)  # [T, B, D]: group = position
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        # per-batch products in fp32 (fast), accumulated in fp64 (exact enough over millions of rows)
        self.sxx += (flat_x.T @ flat_x).double()
        self.sxy += (flat_x.T @ flat_y).double()
        self.sxp += x.sum(dim=1).double()
        self.spy += y.sum(dim=1).double()
        self.count += x.shape[1]
        self.syy += flat_y.square().sum().double()

    def __iadd__(self, other: RidgeAccumulator) -> RidgeAccumulator:
        for name in ("sxx", "sxp", "count", "sxy", "spy", "syy"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def first_features(self, k: int) -> RidgeAccumulator:
        """The same statistics for the problem that keeps only the first k features."""
        sub = copy.copy(self)
        sub.sxx, sub.sxp, sub.sxy = self.sxx[:k, :k], self.sxp[:, :k], self.sxy[:k]
        return sub

    @property
    def tokens_seen(self) -> float:
        return float(self.count.sum())

    def _system(self, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Normal equations A W = B of the augmented problem; lambda on the x block only."""
        dc = self.sxx.shape[0]
        a = torch.cat([
            torch.cat([self.sxx + lam * torch.eye(dc, dtype=self.sxx.dtype, device=self.sxx.device),
                       self.sxp.T], dim=1),
            torch.cat([self.sxp, torch.diag(self.count.clamp_min(1.0))], dim=1),
        ])
        return a, torch.cat([self.sxy, self.spy])

    def solve(self, alpha: float) -> torch.Tensor:
        """Weights [Dc+P, De] for lambda = alpha * tokens seen."""
        a, b = self._system(alpha * self.tokens_seen)
        return torch.linalg.solve(a, b)

    def mse(self, w: torch.Tensor) -> float:
        """Mean squared error per token of weights `w` on the data in these statistics:
        ||Y - XW||^2 = tr(Y'Y) - 2 tr(W'X'Y) + tr(W'X'XW), no pass over the data needed."""
        a, b = self._system(0.0)
        sse = self.syy - 2 * (w * b).sum() + (w * (a @ w)).sum()
        return float(sse / self.tokens_seen)


def held_in_rows(rows: Sequence[int]) -> set[int]:
    """Every 10th training row, held in to choose ridge's alpha (none with fewer than 20)."""
    return set(list(rows)[9::10]) if len(rows) >= 20 else set()


def _finite_batches(reader: ShardReader, rows: Sequence[int], held_in: set[int], batch_size: int
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
    """(clip, eva, is_held_in, number left out) per batch of `rows`: NaN/Inf samples are left
    out, as the trainer skips them."""
    for batch, data in reader.batches(rows, batch_size):
        finite = finite_samples(data)
        is_val = torch.tensor([i in held_in for i in batch], dtype=torch.bool)[finite]
        yield data["clip"][finite], data["eva"][finite], is_val, int((~finite).sum())


def fit_baselines(
    reader: ShardReader,
    train_indices: Sequence[int],
    batch_size: int = 64,
    alphas: Sequence[float] = ALPHAS,
    position_bias: bool = True,
    device: torch.device | str = "cpu",
    progress: bool = True,
    drop_cls: bool = False,
) -> tuple[MeanBaseline, RidgeBaseline]:
    """Fit both baselines in one streamed pass over `train_indices` (training split only), on
    the tokens the model sees: without the shards' CLS row when `drop_cls` (a patch_only model
    on CLS shards, `layout.drops_cls`)."""
    if len(train_indices) == 0:
        raise UserError("baselines: no training samples to fit on")
    m = reader.manifest
    tokens = m.tokens - int(drop_cls)
    mean_acc = MeanAccumulator()
    fit = RidgeAccumulator(m.clip_dim, m.eva_dim, tokens, position_bias, device)
    val = RidgeAccumulator(m.clip_dim, m.eva_dim, tokens, position_bias, device)
    held_in = held_in_rows(train_indices)
    bar = progress_bar(total=len(train_indices), desc="fit baselines", unit="img", disable=not progress,
               leave=False)
    skipped = 0
    for clip, eva, is_val, left_out in _finite_batches(reader, train_indices, held_in, batch_size):
        skipped += left_out
        clip, eva = pairs_for_model(clip, eva, drop_cls)
        mean_acc.update(eva)
        if (~is_val).any():
            fit.update(clip[~is_val], eva[~is_val])
        if is_val.any():
            val.update(clip[is_val], eva[is_val])
        bar.update(len(is_val))
    bar.close()
    scores = {}
    if held_in and fit.tokens_seen > 0:
        scores = {a: val.mse(fit.solve(a)) for a in alphas}
        alpha = min(scores, key=scores.get)
    else:
        alpha = 1e-2  # too few samples to validate: a light default
    fit += val
    w = fit.solve(alpha).float().cpu()
    info = {
        "alpha": alpha,
        "lambda": alpha * fit.tokens_seen,
        "validation_mse": {f"{a:g}": round(s, 6) for a, s in scores.items()},
        "num_train_samples": len(train_indices) - skipped,
        "skipped_nonfinite_samples": skipped,
        "num_held_in_samples": len(held_in),
        "features": "RMS-normalised condition token + per-position bias" if position_bias
        else "RMS-normalised condition token + bias",
        "cls_dropped": drop_cls,
    }
    ridge = RidgeBaseline(weight=w[: m.clip_dim], bias=w[m.clip_dim:], alpha=alpha, info=info)
    return mean_acc.result(), ridge


RIDGE_INIT_SAMPLES = 4096  # enough for a D x D map; a bounded extra read on huge datasets


def ridge_linear_path(reader: ShardReader, train_rows: Sequence[int], drop_cls: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, RidgeBaseline, int]:
    """The ridge map fitted on (at most RIDGE_INIT_SAMPLES of) training rows, scaled into the
    sampler's target space (token norm sqrt(De)): (weight [Dc, De], bias [P, De], the fit, the
    samples it read), for `DiT.init_linear_path`. Held-out rows are never read; every rank fits
    the same map (float64 sums over the same rows)."""
    stride = max(1, math.ceil(len(train_rows) / RIDGE_INIT_SAMPLES))
    subset = sorted(list(train_rows)[::stride])
    _, ridge = fit_baselines(reader, subset, progress=False, drop_cls=drop_cls)
    scale = math.sqrt(reader.manifest.eva_dim)  # ridge predicts unit tokens
    return ridge.weight * scale, ridge.bias * scale, ridge, len(subset)


# ---------------------------------------------------------------------------------------------
# does a token's neighbourhood carry what ridge on the token misses?

NEIGHBOUR_TOKENS = 65536  # training tokens read: enough for a 2 Dc x 2 Dc fit, bounded on any data


@dataclass
class NeighbourGain:
    """Held-in ridge error with the token alone and with its neighbour mean added."""

    same_token_mse: float
    neighbour_mse: float
    samples: int

    @property
    def gain(self) -> float:
        """The fraction of same-token ridge's error that the neighbours remove."""
        return 1.0 - self.neighbour_mse / max(self.same_token_mse, 1e-12)


def neighbour_gain(reader: ShardReader, train_rows: Sequence[int],
                   alphas: Sequence[float] = ALPHAS) -> NeighbourGain | None:
    """Ridge from [token, mean of its 4 grid neighbours] against ridge from the token alone, each
    with its best alpha (the wider one searched next to the narrower one's), scored on every
    10th of (evenly spaced) training rows and fitted on the rest: how much of the target a
    linear map can take from a token's surroundings. Patch tokens only (a CLS token has no
    neighbours); float64 sums, so every rank gets the same answer. None with too few samples
    to hold any in (`held_in_rows`)."""
    m = reader.manifest
    patches = m.tokens - int(m.include_cls)
    stride = max(1, math.ceil(len(train_rows) * patches / NEIGHBOUR_TOKENS))
    rows = list(train_rows)[::stride]
    held_in = held_in_rows(rows)
    if not held_in:
        return None
    fit = RidgeAccumulator(2 * m.clip_dim, m.eva_dim, patches)
    val = RidgeAccumulator(2 * m.clip_dim, m.eva_dim, patches)
    for clip, eva, is_val, _ in _finite_batches(reader, rows, held_in, 64):
        clip, eva = pairs_for_model(clip, eva, m.include_cls)  # a CLS token has no neighbours
        x = rms_normalize(clip)
        x = torch.cat([x, neighbour_mean(x)], dim=-1)
        fit.add(x[~is_val], eva[~is_val])
        val.add(x[is_val], eva[is_val])
    if fit.tokens_seen == 0 or val.tokens_seen == 0:  # all but a few samples non-finite
        return None
    token_fit, token_val = fit.first_features(m.clip_dim), val.first_features(m.clip_dim)
    same = {a: token_val.mse(token_fit.solve(a)) for a in alphas}
    # the wider fit only near the same-token optimum: each solve is ~8x the cost
    i = alphas.index(min(same, key=same.get))
    both = min(val.mse(fit.solve(a)) for a in alphas[max(0, i - 1):i + 2])
    return NeighbourGain(min(same.values()), both, len(rows))
