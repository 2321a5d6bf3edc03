"""The BLIP3-o / Lumina-Next style DiT (see `dit.py`, one file)."""

from eva_repro.model.dit import PRESETS, TOKEN_MODES, VARIANTS, DiT, DiTConfig, estimate_flops

__all__ = ["DiT", "DiTConfig", "PRESETS", "TOKEN_MODES", "VARIANTS", "estimate_flops"]
