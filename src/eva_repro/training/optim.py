"""The optimiser, its learning-rate schedule and the EMA copy of the weights.

    groups = param_groups(model, weight_decay)          AdamW groups: decay on matrices only
    lr(step) = base * lr_multiplier(step, total, warmup, floor)
                                                        linear warmup, then cosine to base * floor
    ema <- lerp(ema, model, 1 - min(decay, (1 + step) / (10 + step)))
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: decaying norms, biases, gates or the null condition towards
    zero fights the zero-init design rather than regularising."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    fused: bool) -> torch.optim.AdamW:
    """AdamW, one fused kernel per step (`fused`, CUDA) or one multi-tensor op per step stage
    (torch picks it on CUDA only; on the CPU it gives the per-parameter loop's values bit for bit,
    in fewer ops)."""
    stepping = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, **stepping)


def lr_multiplier(step: int, total: int, warmup: int, floor: float) -> float:
    """Linear warmup from ~0 to 1 over `warmup` steps, then cosine decay to `floor` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def default_warmup(total: int) -> int:
    return max(1, min(1000, round(0.05 * total)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))  # early on, follow the fast-moving weights
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_params, params, 1 - d)
