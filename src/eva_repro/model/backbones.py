"""The one model factory and loader: a backbone name or a saved config -> the network.

    next-dit     eva-repro's Next-DiT (`dit.py`): DiTConfig, variants "eva-repro" / "lumina-next"
    lumina-next  diffusers' LuminaNextDiT2DModel, BLIP3-o's head (`lumina_next.py`, optional extra)

Every backbone takes forward(x_t, t, cond, drop_cond) -> velocity in eva-repro's time convention,
has `.config` (target_dim, cond_dim, token_mode, tokens, target_norm, fixed_tokens, prediction,
to_dict) and `.blocks`, and saves a self-describing directory whose config.json names its
architecture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from eva_repro.errors import UserError
from eva_repro.model import dit, lumina_next

BACKBONES = ("next-dit", "lumina-next")


def presets(backbone: str) -> list[str]:
    return sorted(dit.PRESETS if backbone == "next-dit" else lumina_next.PRESETS)


def model_config(backbone: str, preset: str, variant: str | None = None, **fields):
    """The config of a preset of a backbone; `variant` (next-dit only) picks dit.VARIANTS."""
    if backbone == "next-dit":
        return dit.DiTConfig.preset(preset, **{**dit.VARIANTS[variant or "eva-repro"], **fields})
    if backbone == "lumina-next":
        return lumina_next.LuminaNextConfig.preset(preset, **fields)
    raise UserError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")


def config_from_dict(data: dict):
    """A saved config (config.json, checkpoint or run_config 'model') -> its config object."""
    if data.get("architecture") == lumina_next.ARCHITECTURE:
        return lumina_next.LuminaNextConfig.from_dict(data)
    return dit.DiTConfig.from_dict(data)


def build_model(config) -> nn.Module:
    if isinstance(config, lumina_next.LuminaNextConfig):
        return lumina_next.LuminaNextDiT(config)
    return dit.DiT(config)


def from_pretrained(directory: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """A directory written by any backbone's save_pretrained."""
    path = Path(directory) / dit.CONFIG_FILE
    architecture = json.loads(path.read_text()).get("architecture") if path.exists() else None
    if architecture == lumina_next.ARCHITECTURE:
        return lumina_next.LuminaNextDiT.from_pretrained(directory, map_location)
    return dit.DiT.from_pretrained(directory, map_location)


def is_saved_model(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    if not (d / dit.CONFIG_FILE).exists():
        return False
    return (d / dit.WEIGHTS_FILE).exists() or (d / lumina_next.SUBFOLDER / dit.CONFIG_FILE).exists()
