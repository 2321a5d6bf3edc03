"""The generator networks: eva-repro's Next-DiT (`dit.py`, one file), diffusers' Lumina-Next
(`lumina_next.py`) and the one factory / loader over both (`backbones.py`)."""

from eva_repro.data.layout import TOKEN_MODES
from eva_repro.model.backbones import (
    BACKBONES,
    build_model,
    config_from_dict,
    from_pretrained,
    is_saved_model,
    model_config,
)
from eva_repro.model.dit import PRESETS, VARIANTS, DiT, DiTConfig, estimate_flops

__all__ = ["BACKBONES", "DiT", "DiTConfig", "PRESETS", "TOKEN_MODES", "VARIANTS", "build_model",
           "config_from_dict", "estimate_flops", "from_pretrained", "is_saved_model", "model_config"]
