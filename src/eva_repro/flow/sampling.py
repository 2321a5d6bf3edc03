"""Sampling: integrate dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from eva_repro.flow.transport import shift_time, velocity
from eva_repro.utils import rng

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
METHODS = ("euler", "heun", "dopri5")


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """steps + 1 times from 0 (noise) to 1 (data), uniformly spaced then shifted."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=torch.float64),
                      shift)


def sample_ode(
    velocity_fn: VelocityFn,
    x0: torch.Tensor,
    steps: int = 20,
    method: str = "heun",
    shift: float = 1.0,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> tuple[torch.Tensor, int]:
    """Integrate dx/dt = v(x, t) from t=0 (x0 = noise) to t=1. Returns (x1, network evaluations).

    euler: 1 evaluation per step (1st order); heun: 2 per step (2nd order, trapezoidal
    corrector) except an Euler step onto t = 1, as in EDM (the field of an x-predicting network
    is singular there; the Euler step lands exactly on its prediction); dopri5: adaptive
    Dormand-Prince via torchdiffeq, `steps` ignored, and `shift` reparametrises time so its
    step-size control sees the same schedule.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {METHODS}")
    b = x0.shape[0]
    nfe = 0

    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return velocity_fn(x, torch.full((b,), t, device=x.device, dtype=x.dtype))

    if method == "dopri5":
        return _dopri5(v, x0, shift, atol, rtol), nfe
    ts = time_grid(steps, shift, x0.device).tolist()
    x = x0
    for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
        h = t1 - t0
        d0 = v(x, t0)
        if method == "euler" or t1 == 1.0:
            x = x + h * d0
        else:
            d1 = v(x + h * d0, t1)
            x = x + 0.5 * h * (d0 + d1)
    return x, nfe


def _dopri5(
    v: Callable[[torch.Tensor, float], torch.Tensor], x0: torch.Tensor, shift: float,
    atol: float, rtol: float,
) -> torch.Tensor:
    from torchdiffeq import odeint

    # Integrate in s in [0, 1] with t = shift_time(s): dx/ds = v(x, t(s)) * dt/ds.
    def field(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if shift == 1.0:
            return v(x, float(s))
        s = s.detach().double()
        u = 1 - s  # t = 1 - shift*u / (1 + (shift-1)*u); dt/ds = shift / (1 + (shift-1)*u)^2
        t = 1 - shift * u / (1 + (shift - 1) * u)
        dt_ds = shift / (1 + (shift - 1) * u) ** 2
        return v(x, float(t)) * float(dt_ds)

    s = torch.tensor([0.0, 1.0], device=x0.device, dtype=x0.dtype)
    return odeint(field, x0, s, method="dopri5", atol=atol, rtol=rtol)[-1]


def guided_velocity(
    model: torch.nn.Module, cond: torch.Tensor, cfg_scale: float = 1.0
) -> VelocityFn:
    """velocity_fn for `sample_ode`: v_u + s * (v_c - v_u), one batched call; s = 1 is off."""

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if cfg_scale == 1.0:
            return velocity(model, x, t, cond).float()
        b = x.shape[0]
        drop = torch.arange(2 * b, device=x.device) >= b
        v = velocity(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, cond]), drop)
        v_cond, v_uncond = v.float().chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)

    return field


@torch.no_grad()
def sample_noise(ids: Sequence[int], tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """The one per-sample noise x0 ~ N(0, I) [len(ids), tokens, dim], in one counter-based draw
    (`utils.rng`) keyed by (seed, ids[i]): a sample's noise depends on its id (its row in the
    shards) only, never on batching, so the trainer's held-out cosine, `eva-repro evaluate` and
    `eva-repro sample` draw the same noise for the same image."""
    keys = torch.tensor([int(i) for i in ids], dtype=torch.int64) ^ rng.mix_seed("sample", seed)
    return rng.normal(keys, (tokens, dim))


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    cond: torch.Tensor,
    ids: Sequence[int] | None = None,
    steps: int = 20,
    method: str = "heun",
    shift: float = 1.0,
    cfg_scale: float = 1.0,
    seed: int = 0,
    tol: float = 1e-5,
) -> tuple[torch.Tensor, int]:
    """Targets for `cond` [B, Tc, Dc] in the normalised space, and the network evaluations.

    Sample i starts from `sample_noise` keyed by `ids[i]` (default i): the trainer's held-out
    cosine, `eva-repro evaluate` and `eva-repro sample` all sample through here. The target has
    the token count the model was built for (`config.tokens`; the condition may lie on another
    grid), or the condition's where the config leaves it open; `tol` is dopri5's atol = rtol.
    """
    ids = range(cond.shape[0]) if ids is None else ids
    x0 = sample_noise(ids, model.config.tokens or cond.shape[1], model.config.target_dim,
                      seed).to(cond.device)
    x1, nfe = sample_ode(guided_velocity(model, cond, cfg_scale), x0, steps, method, shift,
                         atol=tol, rtol=tol)
    return x1.float(), nfe
