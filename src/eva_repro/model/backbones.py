"""The one model factory and loader: a backbone name or a saved config -> the network.

    next-dit     eva-repro's Next-DiT (`dit.py`): DiTConfig, variants "eva-repro" / "blip3o"
    lumina-next  diffusers' LuminaNextDiT2DModel, BLIP3-o's head (`lumina_next.py`, optional extra)
    mod:factory  your own network (`plugin.py`): an import path or path/to/file.py:factory

Every backbone takes forward(x_t, t, cond, drop_cond) in eva-repro's time convention and returns
its raw prediction, whose type `.config.prediction` declares ("v" or "x"; `flow.transport.velocity` maps
it); has `.config` (target_dim, cond_dim, token_mode, tokens, target_norm,
prediction, to_dict) and `.blocks`, and saves a self-describing directory whose config.json
names its architecture.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

from eva_repro.model import dit, lumina_next, plugin
from eva_repro.utils.errors import UserError
from eva_repro.utils.files import MODEL_FIX, read_json_object

BACKBONES = ("next-dit", "lumina-next")


def known_backbone(backbone: str) -> bool:
    return backbone in BACKBONES or plugin.is_plugin_spec(backbone)


def presets(backbone: str) -> list[str]:
    """A plugin takes the Next-DiT presets' sizes as its factory's hints."""
    return sorted(lumina_next.PRESETS if backbone == "lumina-next" else dit.PRESETS)


def model_config(backbone: str, preset: str, variant: str | None = None, **fields):
    """The config of a preset of a backbone; `variant` (next-dit only) picks dit.VARIANTS."""
    if backbone == "next-dit":
        return dit.DiTConfig.preset(preset, **{**dit.VARIANTS[variant or "eva-repro"], **fields})
    if backbone == "lumina-next":
        return lumina_next.LuminaNextConfig.preset(preset, **fields)
    if plugin.is_plugin_spec(backbone):
        host = {k: fields.pop(k) for k in ("target_dim", "cond_dim", "tokens", "token_mode",
                                           "target_norm", "grad_checkpointing") if k in fields}
        return plugin.plugin_config(backbone, hints={**dit.PRESETS[preset], **fields},
                                    extra={"preset": preset}, **host)
    raise UserError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")


def config_from_dict(data: dict, backbone: str | None = None):
    """A saved config (config.json, checkpoint or run_config 'model') -> its config object; a
    plugin's import path replaced by `backbone` when given."""
    data = plugin.with_backbone(data, backbone, "config.json")
    if data.get("architecture") == lumina_next.ARCHITECTURE:
        return lumina_next.LuminaNextConfig.from_dict(data)
    if data.get("architecture") == plugin.ARCHITECTURE:
        return plugin.PluginConfig.from_dict(data)
    return dit.DiTConfig.from_dict(data)


def build_model(config) -> nn.Module:
    if isinstance(config, lumina_next.LuminaNextConfig):
        return lumina_next.LuminaNextDiT(config)
    if isinstance(config, plugin.PluginConfig):
        return plugin.PluginModel(config)
    return dit.DiT(config)


def from_pretrained(directory: str | os.PathLike, map_location: str = "cpu",
                    backbone: str | None = None) -> nn.Module:
    """A directory written by any backbone's save_pretrained (a plugin's rebuilt from
    `backbone` when given)."""
    path = Path(directory) / dit.CONFIG_FILE
    architecture = read_json_object(path, MODEL_FIX).get("architecture") if path.exists() else None
    if backbone is not None and architecture != plugin.ARCHITECTURE:
        plugin.with_backbone({"architecture": architecture}, backbone, path)  # raises
    if architecture == lumina_next.ARCHITECTURE:
        return lumina_next.LuminaNextDiT.from_pretrained(directory, map_location)
    if architecture == plugin.ARCHITECTURE:
        return plugin.PluginModel.from_pretrained(directory, map_location, backbone)
    return dit.DiT.from_pretrained(directory, map_location)


def is_saved_model(directory: str | os.PathLike) -> bool:
    d = Path(directory)
    if not (d / dit.CONFIG_FILE).exists():
        return False
    return (d / dit.WEIGHTS_FILE).exists() or (d / lumina_next.SUBFOLDER / dit.CONFIG_FILE).exists()
