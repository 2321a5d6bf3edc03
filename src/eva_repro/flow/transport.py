"""Rectified flow: the one place the time convention, the prediction type, target scaling and the
loss live (the samplers: `flow.sampling`).

Convention (everywhere in eva-repro):
    t = 0 is noise, t = 1 is data
    x_t = (1 - t) * x0 + t * x1          x0 ~ N(0, I), x1 = normalised target
    v   = dx_t/dt = x1 - x0              the network regresses v
Sampling integrates dx/dt = v(x, t) forward from t = 0 (noise) to t = 1 (data).

Prediction targets map onto v here and nowhere else (SiT's transport): a network returns its
raw prediction and declares its type (`config.prediction`, PREDICTIONS); `velocity` calls it
and maps the output. A network that predicts the clean target x1_hat (x-prediction, JiT: Li &
He 2025) has the velocity
    v = (x1_hat - x_t) / (1 - t)         `velocity_from_data`, 1 - t clamped at DATA_EPS

Loss: the velocity MSE per example, times a weight of t (`loss_weight`):
    "velocity"   1                   rectified flow / SD3 / Lumina-Next / BLIP3-o
    "data"       (1 - t)^2           = |x1_hat - x1|^2 for the implied clean target
                                       x1_hat = x_t + (1 - t) v_hat (1 - t clamped at DATA_EPS)
With "velocity", an x-predicting network's x1 error is weighted by 1 / (1 - t)^2, so the loss is
spent near the data, where x_t already holds the answer; with "data" every t counts by its error
in data space, and the draws near noise, where the condition alone decides the sample, count.

Target scaling: EVA tokens are L2-normalised per token and multiplied by sqrt(D), so a target
element has unit variance like the noise. (Unit-norm targets next to N(0, I) noise would make
the data a vanishing fraction of x_t in 4096-d.) `normalize_target` is the only place this
happens; `denormalize_target` maps generated tokens back to a chosen token norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from eva_repro.utils import rng

TIME_SCHEMES = ("uniform", "logit_normal")
PREDICTIONS = ("v", "x")  # what the network outputs: the velocity, or the clean target x1
LOSS_WEIGHTS = ("velocity", "data")  # weight of the velocity MSE at time t (module docstring)
DATA_EPS = 0.05  # JiT's clamp of 1 - t in the x -> v conversion


def _expand_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, 1, ...] so t broadcasts over a token tensor."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1))).to(x.dtype)


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t x1, with t [B] (t=0 noise, t=1 data); one fused pass (lerp)."""
    return torch.lerp(x0, x1, _expand_time(t, x0))


def target_velocity(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """v = x1 - x0, the (constant) velocity of the straight path from noise to data."""
    return x1 - x0


def velocity_from_data(x1_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = (x1_hat - x_t) / (1 - t): the velocity of the straight path through x_t that ends at
    the predicted target (the one place x-prediction meets the convention)."""
    return (x1_hat - x_t) / (1 - _expand_time(t, x_t)).clamp_min(DATA_EPS)


def velocity_from_prediction(y: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                             prediction: str) -> torch.Tensor:
    """A network's raw output y of `prediction` type ("v": the velocity, "x": the clean target)
    as the velocity the loss and the samplers use."""
    if prediction == "v":
        return y
    if prediction == "x":
        return velocity_from_data(y, x_t, t)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def velocity(model: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
             drop_cond: torch.Tensor | None = None, prediction: str | None = None) -> torch.Tensor:
    """The velocity of `model` at (x_t, t) given `cond` (rows of `drop_cond` take the null
    condition): its raw output mapped by the prediction type it declares,
    `model.config.prediction`, or by `prediction` for a model behind a wrapper that hides its
    config (DDP)."""
    y = model(x_t, t, cond, drop_cond=drop_cond)
    return velocity_from_prediction(y, x_t, t, prediction or model.config.prediction)


def prediction_from_velocity(v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                             prediction: str) -> torch.Tensor:
    """The inverse of `velocity_from_prediction`: what the network itself output (exact where
    1 - t >= DATA_EPS)."""
    if prediction == "v":
        return v
    if prediction == "x":
        return x_t + (1 - _expand_time(t, x_t)).clamp_min(DATA_EPS) * v
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def normalize_target(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-token x / ||x|| * sqrt(D): elements then have unit variance, like N(0, I) noise."""
    x = x.float()
    return x * (math.sqrt(x.shape[-1]) / x.norm(dim=-1, keepdim=True).clamp_min(eps))


def denormalize_target(y: torch.Tensor, norm: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """Inverse of `normalize_target` up to the token norm the caller wants (e.g. the data mean)."""
    return y * (norm / y.norm(dim=-1, keepdim=True).clamp_min(eps))


def loss_weight(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-example weight [B] of the velocity MSE at times t [B] (module docstring)."""
    if kind == "velocity":
        return torch.ones_like(t)
    if kind == "data":
        return (1 - t).clamp_min(DATA_EPS).square()
    raise ValueError(f"unknown loss weight {kind!r}; choose one of {LOSS_WEIGHTS}")


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift (SD3 / Lumina) in our convention: shift > 1 spends more time near noise.

    SD3 writes s*u / (1 + (s-1)*u) for u = 1 - t (u=1 noise); we map back to t = 1 - u'.
    shift = 1 is the identity; t = 0 and t = 1 are fixed points.
    """
    if shift == 1.0:
        return t
    u = 1 - t
    return 1 - shift * u / (1 + (shift - 1) * u)


def sample_time(
    batch: int,
    scheme: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Training times t [B] in (0, 1): `uniform` or `logit_normal(mean, std)` (SD3), then shifted."""
    u = torch.rand(batch, generator=generator, device=device)
    return time_from_uniform(u, scheme, mean, std, shift)


def time_from_uniform(
    u: torch.Tensor, scheme: str = "logit_normal", mean: float = 0.0, std: float = 1.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """`sample_time`'s times from uniforms u in (0, 1) (the inverse CDF of the scheme), so a
    counter-based draw (`utils.rng`) gives them too."""
    if scheme == "uniform":
        t = u
    elif scheme == "logit_normal":
        t = torch.sigmoid(mean + std * rng.normal_from_uniform(u))
    else:
        raise ValueError(f"unknown time scheme {scheme!r}; choose one of {TIME_SCHEMES}")
    return shift_time(t, shift)


# ---------------------------------------------------------------------------------------------
# training objective


@dataclass
class FlowConfig:
    """Training-time draws and the loss: t ~ time_scheme (logit-normal(-1.5, 1) by default: most
    draws near noise, where only the condition informs; docs/results.md), shifted by
    time_shift; the loss weight of t; classifier-free guidance's condition dropout."""

    time_scheme: str = "logit_normal"
    time_mean: float = -1.5
    time_std: float = 1.0
    time_shift: float = 1.0
    loss_weight: str = "data"  # "velocity" | "data" (see the module docstring)
    cfg_dropout: float = 0.1  # probability of replacing the condition by the null one


@dataclass
class FlowLoss:
    loss: torch.Tensor  # scalar, differentiable
    cosine: torch.Tensor  # mean cos(predicted v, true v) per token, detached
    per_example: torch.Tensor  # [B] (weighted) MSE per example, detached
    t: torch.Tensor  # [B] the times used


def flow_loss(
    model: torch.nn.Module,
    target: torch.Tensor,
    cond: torch.Tensor,
    cfg: FlowConfig | None = None,
    generator: torch.Generator | None = None,
) -> FlowLoss:
    """The weighted velocity MSE (cfg.loss_weight) on fresh noise and fresh t for every example.

    `target` is the raw EVA tokens [B, T, D] (normalised here).
    """
    cfg = cfg or FlowConfig()
    b, device = target.shape[0], target.device
    x0 = torch.randn(target.shape, generator=generator, device=device, dtype=target.dtype)
    t = sample_time(b, cfg.time_scheme, cfg.time_mean, cfg.time_std, cfg.time_shift, generator,
                    device)
    drop = None
    if cfg.cfg_dropout > 0:
        drop = torch.rand(b, generator=generator, device=device) < cfg.cfg_dropout
    return velocity_loss(model, target, cond, x0, t, drop, cfg.loss_weight)


def velocity_loss(
    model: torch.nn.Module,
    target: torch.Tensor,
    cond: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    drop: torch.Tensor | None = None,
    weight: str = FlowConfig.loss_weight,
    mask: torch.Tensor | None = None,
    prediction: str | None = None,
) -> FlowLoss:
    """The objective of `flow_loss` on the caller's noise x0, times t [B] and condition dropout
    [B] (the trainer draws them per example, independent of the rank layout), weighted by
    `loss_weight(t, weight)`. `mask` [B] (bool) leaves padded examples out of the loss and
    cosine means; `prediction` as in `velocity`."""
    x1 = normalize_target(target)
    v_true = target_velocity(x0, x1)
    v_pred = velocity(model, interpolate(x0, x1, t), t, cond, drop, prediction).float()
    per_example = F.mse_loss(v_pred, v_true, reduction="none").mean(dim=tuple(range(1, v_true.dim())))
    per_example = per_example * loss_weight(t, weight)
    cosine = token_cosine(v_pred.detach(), v_true).reshape(v_true.shape[0], -1).mean(dim=1)  # [B]
    if mask is None:
        return FlowLoss(per_example.mean(), cosine.mean(), per_example.detach(), t)
    n = mask.sum().clamp_min(1)
    keep = lambda x: torch.where(mask, x, 0.0).sum() / n  # noqa: E731  (where: a NaN stays out)
    return FlowLoss(keep(per_example), keep(cosine), per_example.detach(), t)


def token_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The cosine of eva-repro: per token over the last dim, in fp32, [..., T] for equal-shape
    [..., T, D] inputs (the loss log, the trainer's held-out score, the evaluator, the baselines).
    Fused reductions: F.cosine_similarity is much slower on CPU."""
    if a.shape != b.shape:
        raise ValueError(f"token_cosine: shapes {tuple(a.shape)} and {tuple(b.shape)} differ")
    a, b = a.float(), b.float()
    dot = torch.linalg.vecdot(a, b)
    return dot / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(eps)
