"""Baselines the DiT must beat, fitted on the training split only and streamed from shards.

mean   the mean target token per position (of L2-normalised tokens: the direction that maximises
       the summed cosine to the training tokens). Ignores the condition entirely.
ridge  a linear map from a condition token to the target token at the same position, plus a
       per-position bias, fitted in closed form; a condition on another grid is first resampled
       onto the target grid (`layout.align_condition`, the DiT's aligned input). Features are
       RMS-normalised condition tokens (like the DiT's input RMSNorm, which keeps CLIP's few
       huge-norm tokens from dominating); targets are L2-normalised (the metric is cosine).

Ridge needs only X^T X [Dc+P, Dc+P] and X^T Y [Dc+P, De] (P = positions with a bias), summed
over batches in float64, so memory is independent of the number of samples and D can be 4096.
lambda = alpha * (number of training tokens), alpha picked on a held-in tenth of the training
samples by closed-form validation error (no second pass over the data), then refit on all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from eva_repro.data.layout import align_condition, pairs_for_model
from eva_repro.data.shards import ShardReader, finite_samples
from eva_repro.utils.errors import UserError
from eva_repro.utils.progress import progress_bar

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
    tokens: int  # target tokens per sample: the grid the condition is aligned onto
    cls_first: bool = False
    info: dict = field(default_factory=dict)

    def predict(self, clip: torch.Tensor) -> torch.Tensor:
        x = rms_normalize(align_condition(clip, self.tokens, self.cls_first))
        return x @ self.weight.to(x.device) + self.bias.to(x.device)


class RidgeAccumulator:
    """Sufficient statistics of the ridge problem with features [x, one-hot(position group)]."""

    def __init__(self, cond_dim: int, target_dim: int, tokens: int, position_bias: bool = True,
                 device: torch.device | str = "cpu", cls_first: bool = False):
        self.groups = tokens if position_bias else 1
        self.cls_first = cls_first
        f64 = dict(dtype=torch.float64, device=device)
        self.sxx = torch.zeros(cond_dim, cond_dim, **f64)
        self.sxp = torch.zeros(self.groups, cond_dim, **f64)  # sum of x per group
        self.count = torch.zeros(self.groups, **f64)
        self.sxy = torch.zeros(cond_dim, target_dim, **f64)
        self.spy = torch.zeros(self.groups, target_dim, **f64)  # sum of y per group
        self.syy = torch.zeros((), **f64)
        self.device = device

    def update(self, clip: torch.Tensor, eva: torch.Tensor) -> None:
        """Conditions [B, Tc, Dc] (aligned onto the target grid and RMS-normalised here: the
        features) and targets [B, T, De]."""
        x = rms_normalize(align_condition(clip.to(self.device), eva.shape[1], self.cls_first))
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
    cls_first = m.include_cls and not drop_cls
    mean_acc = MeanAccumulator()
    fit = RidgeAccumulator(m.clip_dim, m.eva_dim, tokens, position_bias, device, cls_first)
    val = RidgeAccumulator(m.clip_dim, m.eva_dim, tokens, position_bias, device, cls_first)
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
    ridge = RidgeBaseline(weight=w[: m.clip_dim], bias=w[m.clip_dim:], alpha=alpha, tokens=tokens,
                          cls_first=cls_first, info=info)
    return mean_acc.result(), ridge
