"""Evaluation metrics: pure tensor functions over generated vs true EVA tokens.

Shapes: tokens [N, T, D] (N images, T tokens, D channels). Every cosine is taken after L2
normalisation per token, so the token norm (which the model does not predict, see
`transport.denormalize_target`) never enters a score.

Quality bands (the public reference's words, applied to per-image mean cosine):
    < 0.4 poor,  0.4-0.7 moderate,  > 0.7 high,  > 0.8 very high,  > 0.9 excellent
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from eva_repro.flow import sampling, transport
from eva_repro.flow.transport import token_cosine

# (lower edge, name), ascending: a value belongs to the last band whose edge it exceeds.
BANDS: tuple[tuple[float, str], ...] = (
    (-math.inf, "poor"), (0.4, "moderate"), (0.7, "high"), (0.8, "very high"), (0.9, "excellent"),
)
THRESHOLDS = (0.4, 0.7, 0.8, 0.9)


def band_name(cosine: float) -> str:
    """The public reference's word for a cosine: 0.75 -> 'high', 0.95 -> 'excellent'."""
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
    return token_cosine(mean_pool(pred), mean_pool(target))


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
    return token_cosine(sample_a, sample_b).mean().item()


@torch.no_grad()
def velocity_cosine(
    velocity_fn: sampling.VelocityFn,
    target: torch.Tensor,
    t_values: Sequence[float],
    noise: torch.Tensor,
) -> dict[str, float]:
    """Mean token cosine between predicted and true velocity at fixed times t.

    velocity_fn(x_t, t[B]) -> v, e.g. `sampling.guided_velocity(model, cond)`; target: raw EVA
    tokens [B, T, D] (normalised here as in training); noise: x0 [B, T, D], e.g.
    `sampling.sample_noise(ids, T, D, seed)`, the same draw at every t.
    """
    x1 = transport.normalize_target(target)
    x0 = noise.to(device=x1.device, dtype=x1.dtype)
    out = {}
    for t_value in t_values:
        t = torch.full((x1.shape[0],), float(t_value), device=x1.device)
        v_pred = velocity_fn(transport.interpolate(x0, x1, t), t).float()
        out[f"{t_value:g}"] = token_cosine(v_pred, transport.target_velocity(x0, x1)).mean().item()
    return out


# ---------------------------------------------------------------------------------------------
# distribution metrics: does the set of predictions look like the set of targets?
#
# Per-sample cosines reward regressing to the mean: the conditional mean scores the best expected
# cosine while collapsing the spread of the outputs. These compare the two sets as distributions
# (Frechet distance of Gaussian fits; k-NN precision / recall), which a regressor does not win.


class Moments:
    """Streaming mean and covariance of rows [n, D], accumulated in float64.

    Sums are taken around a shift (the first batch's mean) to avoid cancellation:
        mu = s + S1 / n,   Sigma = (S2 - S1 S1^T / n) / (n - 1)
    with S1 = sum (x - s), S2 = sum (x - s)(x - s)^T (the unbiased covariance, as numpy's cov)."""

    def __init__(self) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.s1: torch.Tensor | None = None
        self.s2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> Moments:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self.shift is None:
            self.shift = x.mean(dim=0)
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
        elif x.shape[1] != self.shift.shape[0]:
            raise ValueError(f"Moments: rows of dim {x.shape[1]} added to dim {self.shift.shape[0]}")
        xc = x - self.shift
        self.s1 += xc.sum(dim=0)
        self.s2 += xc.T @ xc
        self.n += x.shape[0]
        return self

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu [D], Sigma [D, D]); needs at least 2 rows."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, got {self.n}")
        m = self.s1 / self.n
        cov = (self.s2 - self.n * torch.outer(m, m)) / (self.n - 1)
        return self.shift + m, (cov + cov.T) / 2


def token_moments(tokens: torch.Tensor) -> Moments:
    """Moments of the individual tokens of [N, T, D] (N*T rows) in the model's target space:
    each token L2-normalised and scaled by sqrt(D) (`transport.normalize_target`). The token norm is
    not predicted (see `transport.denormalize_target`) and the baselines predict other norms (the mean
    baseline's mean of unit tokens is shorter than 1); unnormalised, the distance would mostly
    measure norms no cosine sees. The sqrt(D) makes elements ~unit variance, as the flow's noise."""
    return Moments().add(transport.normalize_target(tokens))


def frechet_from_moments(a: Moments, b: Moments) -> float:
    """`frechet_distance` from two streamed `Moments`."""
    (mu_a, s_a), (mu_b, s_b) = a.mean_cov(), b.mean_cov()
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"frechet_distance: dims {mu_a.shape[0]} and {mu_b.shape[0]} differ")
    # Tr (S_a S_b)^(1/2) = Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): the inner matrix is symmetric PSD,
    # so both roots come from eigh, with rounding's tiny negative eigenvalues clamped to 0
    evals, evecs = torch.linalg.eigh(s_a)
    root_a = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    inner = root_a @ s_b @ root_a
    tr_cross = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_cross
    return max(fd.item(), 0.0)  # >= 0 in exact arithmetic; rounding can leave -1e-12


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of the rows of a [N, D] and b [M, D] (as FID):

        FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

    mu, S: sample mean and unbiased covariance, all in float64. 0 for equal sets; symmetric;
    in squared units of the rows. With fewer samples than dims the covariances are rank-deficient
    and the estimate is biased upward (it still is computed; compare FDs at equal N only)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"frechet_distance: a {tuple(a.shape)} and b {tuple(b.shape)} must be "
                         "[N, D] and [M, D] with the same D")
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"frechet_distance needs at least 2 samples per set, got {a.shape[0]} "
                         f"and {b.shape[0]}")
    return frechet_from_moments(Moments().add(a), Moments().add(b))


def _chunk_rows(n_cols: int) -> int:
    return max(1, 2**22 // max(n_cols, 1))  # [chunk, n_cols] float64 distances: <= 32 MiB


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N]: distance of each row of x to its k-th nearest *other* row (self excluded)."""
    x = x.to(torch.float64)
    step = _chunk_rows(x.shape[0])
    # each row's own distance 0 is the smallest of its row: the k-th other is the (k+1)-th value
    return torch.cat([torch.cdist(x[i:i + step], x).kthvalue(k + 1, dim=1).values
                      for i in range(0, x.shape[0], step)])


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """[M] bool: does each point lie in the union of the balls (centres [N, D], radii [N])?"""
    points, centres = points.to(torch.float64), centres.to(torch.float64)
    step = _chunk_rows(centres.shape[0])
    return torch.cat([(torch.cdist(points[i:i + step], centres) <= radii).any(dim=1)
                      for i in range(0, points.shape[0], step)])


def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019), Euclidean, in float64:

        manifold(X) = union over x in X of the ball B(x, d_k(x, X)),  d_k: distance to the k-th
                      nearest other sample of X
        precision   = |{f in fake : f in manifold(real)}| / M    (fakes look real: fidelity)
        recall      = |{r in real : r in manifold(fake)}| / N    (reals are covered: diversity)

    A collapsed fake set (all samples equal) has radius 0: recall ~0, precision ~1 when the point
    is inside the real manifold. Needs more than k samples per set."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"knn_precision_recall: real {tuple(real.shape)} and fake "
                         f"{tuple(fake.shape)} must be [N, D] and [M, D] with the same D")
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"knn_precision_recall with k={k} needs more than {k} samples per set, got "
                         f"{real.shape[0]} and {fake.shape[0]}")
    precision = _inside(fake, real, knn_radii(real, k)).double().mean().item()
    recall = _inside(real, fake, knn_radii(fake, k)).double().mean().item()
    return {"precision": precision, "recall": recall}


def distribution_summary(pooled_pred: torch.Tensor, pooled_target: torch.Tensor,
                         tokens_pred: Moments, tokens_target: Moments, k: int = 3) -> dict:
    """`distribution_scores` from [N, D] mean-pooled embeddings and streamed `token_moments`
    (what `evaluate` collects batch by batch instead of keeping every token)."""
    return {"fd_pooled": frechet_distance(pooled_pred, pooled_target),
            "fd_token": frechet_from_moments(tokens_pred, tokens_target),
            **knn_precision_recall(pooled_target, pooled_pred, k),
            "samples": pooled_pred.shape[0], "tokens": tokens_pred.n}


def distribution_scores(pred: torch.Tensor, target: torch.Tensor, k: int = 3) -> dict:
    """How the set of predictions pred [N, T, D] is distributed against the targets [N, T, D]:

        fd_pooled   frechet_distance of the `mean_pool` embeddings ([N, D]; unit-token means)
        fd_token    frechet_distance of all N*T individual tokens, each L2-normalised and scaled
                    by sqrt(D) (`token_moments`: the model's target space)
        precision, recall   knn_precision_recall(real=target pools, fake=pred pools, k)
        samples, tokens     N and N*T, the sizes behind the estimates

    A generator should show low FD and a recall near the targets' own; a regressor (the
    conditional mean) collapses the spread: a larger FD (the missing trace) and a low recall.
    With N below the pooled dim D the pooled covariances are rank-deficient: fd_pooled is biased
    upward (still computed; compare predictors at equal N)."""
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"distribution_scores: pred {tuple(pred.shape)} and target "
                         f"{tuple(target.shape)} must be equal [N, T, D]")
    return distribution_summary(mean_pool(pred), mean_pool(target), token_moments(pred),
                                token_moments(target), k)
