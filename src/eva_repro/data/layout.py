"""The token layout, in one place.

A sample's tokens [T, D] are either the patch grid alone, row-major ("patch_only", T = g*g), or
the CLS token first and then the grid ("cls_patch", T = 1 + g*g). The same fact goes by the name
of its context: `--training_mode` on the command line, `include_cls` in a shard manifest,
`token_mode` in a model config. Shards with a CLS row can still train a patch_only model: the
trainer then drops the CLS row on load (`drop_cls`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TOKEN_MODES = ("patch_only", "cls_patch")  # patch tokens only, or CLS first then patches


def check_mode(mode: str, what: str = "token_mode") -> str:
    if mode not in TOKEN_MODES:
        raise ValueError(f"{what} must be one of {TOKEN_MODES}, got {mode!r}")
    return mode


def has_cls(mode: str) -> bool:
    return check_mode(mode) == "cls_patch"


def mode_of(include_cls: bool) -> str:
    return "cls_patch" if include_cls else "patch_only"


def select_tokens(tokens: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, 1 + g*g, D] encoder tokens (CLS first) -> the layout's tokens: patch_only drops the
    CLS token, cls_patch keeps it."""
    return tokens if check_mode(mode, "training_mode") == "cls_patch" else tokens[:, 1:]


def drop_cls(tokens: torch.Tensor) -> torch.Tensor:
    """[B, 1 + g*g, D] -> [B, g*g, D]: the patch grid of cls_patch tokens."""
    return tokens[:, 1:]


def drops_cls(include_cls: bool, token_mode: str) -> bool:
    """Whether a model of `token_mode` drops the CLS row of shards (manifest `include_cls`): a
    patch_only model on shards that have one."""
    return include_cls and not has_cls(token_mode)


def tokens_for_model(tokens: torch.Tensor, dropping_cls: bool) -> torch.Tensor:
    """Tokens [B, T, D] as loaded from shards -> as the model takes them: the CLS row dropped
    when a patch_only model meets shards that have one (training, evaluation, sampling)."""
    return drop_cls(tokens) if dropping_cls else tokens


def pairs_for_model(clip: torch.Tensor, eva: torch.Tensor,
                    dropping_cls: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A (condition, target) pair as loaded from shards -> as the model takes it."""
    return tokens_for_model(clip, dropping_cls), tokens_for_model(eva, dropping_cls)


def grid_conv(patches: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """A 3x3 `kernel` convolved over the square patch grid of patches [B, g*g, D], the same
    kernel for every channel, zero padded at the border."""
    b, t, d = patches.shape
    g = math.isqrt(t)
    grid = patches.transpose(1, 2).reshape(b * d, 1, g, g)
    out = F.conv2d(grid, kernel.to(patches.dtype).view(1, 1, 3, 3), padding=1)
    return out.view(b, d, t).transpose(1, 2)


def neighbour_mean(patches: torch.Tensor) -> torch.Tensor:
    """The mean of each patch token's 4 grid neighbours (zero padded) [B, g*g, D]."""
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], device=patches.device)
    return grid_conv(patches, cross / 4)


def align_condition(cond: torch.Tensor, tokens: int, cls_first: bool) -> torch.Tensor:
    """Condition tokens [B, Tc, D] on the target's layout [B, tokens, D]: unchanged when the grids
    agree, else the patch grid resampled onto the target grid (area mean down, bilinear up); a
    CLS token stays first."""
    if cond.shape[1] == tokens:
        return cond
    n = int(cls_first)
    g, gc = math.isqrt(tokens - n), math.isqrt(cond.shape[1] - n)
    grid = cond[:, n:].transpose(1, 2).unflatten(-1, (gc, gc))
    if gc > g:
        grid = F.interpolate(grid, size=(g, g), mode="area")
    else:
        grid = F.interpolate(grid, size=(g, g), mode="bilinear", align_corners=False)
    patches = grid.flatten(2).transpose(1, 2)
    return torch.cat([cond[:, :1], patches], dim=1) if n else patches
