"""Evaluation metrics: pure tensor functions over generated vs true EVA tokens.

Shapes: tokens [N, T, D] (N images, T tokens, D channels). Every cosine is taken after L2
normalisation per token, so the token norm (which the model does not predict, see
`flow.denormalize_target`) never enters a score.

Quality bands (the seed's words, applied to per-image mean cosine):
    < 0.4 poor,  0.4-0.7 moderate,  > 0.7 high,  > 0.8 very high,  > 0.9 excellent
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from eva_repro import flow

# (lower edge, name), ascending: a value belongs to the last band whose edge it exceeds.
BANDS: tuple[tuple[float, str], ...] = (
    (-math.inf, "poor"), (0.4, "moderate"), (0.7, "high"), (0.8, "very high"), (0.9, "excellent"),
)
THRESHOLDS = (0.4, 0.7, 0.8, 0.9)


def band_name(cosine: float) -> str:
    """The seed's word for a cosine: 0.75 -> 'high', 0.95 -> 'excellent'."""
    name = BANDS[0][1]
    for edge, label in BANDS:
        if cosine > edge:
            name = label
    return name


def mean_pool(tokens: torch.Tensor) -> torch.Tensor:
    """[N, T, D] -> [N, D]: mean of the L2-normalised tokens (so no single token's norm dominates)."""
    return F.normalize(tokens.float(), dim=-1).mean(dim=1)


def pooled_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine per image [N] between the mean-pooled embeddings (the 'global' similarity)."""
    return flow.token_cosine(mean_pool(pred), mean_pool(target))


def band_fractions(per_image: torch.Tensor) -> dict[str, float]:
    """Fraction of images in each disjoint band (sums to 1), keyed by the band's word."""
    x = per_image.float().flatten()
    if x.numel() == 0:
        raise ValueError("band_fractions needs at least one value")
    out = {}
    for i, (edge, label) in enumerate(BANDS):
        upper = BANDS[i + 1][0] if i + 1 < len(BANDS) else math.inf
        out[label] = ((x > edge) & (x <= upper)).float().mean().item()
    return out


def above_fractions(per_image: torch.Tensor, thresholds: Sequence[float] = THRESHOLDS) -> dict[str, float]:
    """Fraction of images strictly above each threshold: {'0.4': f, '0.7': f, ...} (cumulative)."""
    x = per_image.float().flatten()
    return {f"{t:g}": (x > t).float().mean().item() for t in thresholds}


def quantile(x: torch.Tensor, q: float) -> float:
    """Linear-interpolated quantile like `torch.quantile`, without its 2^24-element limit."""
    v = x.float().flatten().sort().values
    pos = q * (v.numel() - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, v.numel() - 1)
    return (v[lo] + (pos - lo) * (v[hi] - v[lo])).item()


def cosine_summary(token_cos: torch.Tensor, pooled_cos: torch.Tensor | None = None) -> dict:
    """Summary of a [N, T] token-cosine matrix (and optional [N] pooled cosines)."""
    flat = token_cos.float().flatten()
    per_image = token_cos.float().mean(dim=1)
    out = {
        "token_mean": flat.mean().item(),
        "token_median": quantile(flat, 0.5),
        "token_p10": quantile(flat, 0.1),
        "image_mean": per_image.mean().item(),
        "image_min": per_image.min().item(),
        "band": band_name(per_image.mean().item()),
        "bands": band_fractions(per_image),
        "above": above_fractions(per_image),
    }
    if pooled_cos is not None:
        out["global_mean"] = pooled_cos.float().mean().item()
    return out


def paired_difference(a: torch.Tensor, b: torch.Tensor, level: float = 0.95,
                      resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean of a - b over paired per-image scores [N], with a percentile bootstrap interval
    (images resampled with replacement, `resamples` times, a fixed seed): does the gap between two
    predictors exceed what these N images resolve? It covers the choice of images and of their
    noise, not the training seed."""
    diff = (a.double() - b.double()).flatten()
    n = diff.numel()
    g = torch.Generator().manual_seed(seed)
    chunk = max(1, 2**22 // n)  # bounded memory for large evaluations
    means = torch.cat([diff[torch.randint(n, (min(chunk, resamples - i), n), generator=g)].mean(1)
                       for i in range(0, resamples, chunk)])
    tail = (1 - level) / 2
    return {"mean": diff.mean().item(), "low": quantile(means, tail),
            "high": quantile(means, 1 - tail), "level": level, "n": n}


def retrieval_recall(
    queries: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5), pool_size: int | None = None,
) -> dict[str, float]:
    """Recall@k of query i finding target i among the targets of its pool, by cosine.

    queries/targets [N, D] (e.g. mean-pooled generated / true embeddings). The N images are cut
    into consecutive pools of `pool_size` (default: one pool of N); the rank of the true target is
    1 + the number of pool targets scoring strictly higher (ties count in the query's favour).
    """
    if queries.shape != targets.shape or queries.dim() != 2:
        raise ValueError(f"queries {tuple(queries.shape)} and targets {tuple(targets.shape)} must be "
                         "equal [N, D]")
    n = queries.shape[0]
    pool_size = pool_size or n
    q, t = F.normalize(queries.float(), dim=-1), F.normalize(targets.float(), dim=-1)
    ranks = []
    for start in range(0, n, pool_size):
        qs, ts = q[start:start + pool_size], t[start:start + pool_size]
        scores = qs @ ts.T
        own = scores.diagonal().unsqueeze(1)
        ranks.append(1 + (scores > own).sum(dim=1))
    rank = torch.cat(ranks).float()
    return {f"recall_at_{k}": (rank <= k).float().mean().item() for k in ks}


def diversity(sample_a: torch.Tensor, sample_b: torch.Tensor) -> float:
    """Mean token cosine between two samples drawn for the same conditions (1.0 = deterministic)."""
    return flow.token_cosine(sample_a, sample_b).mean().item()


@torch.no_grad()
def velocity_cosine(
    velocity_fn: flow.VelocityFn,
    target: torch.Tensor,
    t_values: Sequence[float],
    noise: torch.Tensor,
) -> dict[str, float]:
    """Mean token cosine between predicted and true velocity at fixed times t.

    velocity_fn(x_t, t[B]) -> v, e.g. `flow.guided_velocity(model, cond)`; target: raw EVA
    tokens [B, T, D] (normalised here as in training); noise: x0 [B, T, D], e.g.
    `flow.sample_noise(ids, T, D, seed)`, the same draw at every t.
    """
    x1 = flow.normalize_target(target)
    x0 = noise.to(device=x1.device, dtype=x1.dtype)
    out = {}
    for t_value in t_values:
        t = torch.full((x1.shape[0],), float(t_value), device=x1.device)
        v_pred = velocity_fn(flow.interpolate(x0, x1, t), t).float()
        out[f"{t_value:g}"] = flow.token_cosine(v_pred, flow.target_velocity(x0, x1)).mean().item()
    return out
