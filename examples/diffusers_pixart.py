"""diffusers' `PixArtTransformer2DModel` (PixArt-alpha: DiT blocks with adaLN-single and cross-attention
to the condition) as an eva-repro backbone plugin.

    x_t [B, T, D] at time t [B] (0 noise, 1 data), c [B, Tc, Dc]  ->  v [B, T, D]

    image = x_t as a (D, g, g) latent image, g = sqrt(T)            patch_size 1: one token a cell
    c'    = rms_norm(c)                 the condition tokens, a set: no position (the design's)
    c'    = 0                           for rows with drop_cond (classifier-free guidance)
    v     = PixArtTransformer2DModel(image, timestep=1000 t, encoder_hidden_states=c')  ->  [B, T, D]

Time convention, the one place it is mapped: diffusers' PixArt takes `timestep` = 1000 t with eva-repro's
t (0 noise, 1 data), and its output is read as eva-repro's velocity x1 - x0. (PixArt-alpha itself was
trained with DDPM timesteps, 0 = clean; the network is trained from scratch here, so only the embedder's
range, [0, 1000], carries over.)

The condition is read as a set, as PixArt's own text conditioning reads a caption: its tokens carry
no position, so the plugin declares `condition_as_set` and `eva-repro check` reports its grid
checks as not applicable by design.

The network is diffusers' own class, unchanged: `caption_channels = Dc` (its caption MLP takes the
condition to `cross_attention_dim` = hidden), `out_channels = D` (PixArt's default of 8 is the doubled
learn-sigma output; here there is none), no resolution/aspect-ratio conditions.

Use:  eva-repro check --backbone examples/diffusers_pixart.py:build --output_dir out
      eva-repro train --backbone examples/diffusers_pixart.py:build ...
build(target_dim, cond_dim, tokens, hidden=, depth=, n_heads=) reads those hints and ignores others.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class PixArtConfig:
    target_dim: int
    cond_dim: int
    tokens: int
    hidden: int = 384
    depth: int = 6
    n_heads: int = 6


def grid_side(n: int, what: str) -> int:
    g = math.isqrt(n)
    if n < 1 or g * g != n:
        raise ValueError(f"diffusers PixArt backbone: {n} {what} tokens are no square grid")
    return g


class PixArtBackbone(nn.Module):
    prediction = "v"
    condition_as_set = True  # the condition tokens carry no position (the design's)

    def __init__(self, config: PixArtConfig):
        super().__init__()
        from diffusers import PixArtTransformer2DModel

        c = self.config = config
        if c.hidden % c.n_heads or c.hidden % 4:
            raise ValueError(f"diffusers PixArt backbone: hidden ({c.hidden}) must divide by n_heads "
                             f"({c.n_heads}) and by 4 (PixArt's 2D sin-cos position table)")
        self.net = PixArtTransformer2DModel(
            num_attention_heads=c.n_heads, attention_head_dim=c.hidden // c.n_heads,
            in_channels=c.target_dim, out_channels=c.target_dim, num_layers=c.depth,
            cross_attention_dim=c.hidden, caption_channels=c.cond_dim,
            sample_size=grid_side(c.tokens, "target"), patch_size=1, norm_type="ada_norm_single",
            use_additional_conditions=False, interpolation_scale=1)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (FSDP2 shards each); a property, so the state dict names them once."""
        return self.net.transformer_blocks

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x_t.shape
        g = grid_side(T, "target")  # the condition is a set: any number of tokens
        c = F.rms_norm(cond, (cond.shape[-1],), eps=1e-6)
        if drop_cond is not None:
            c = torch.where(drop_cond.view(-1, 1, 1), 0.0, c)
        image = x_t.transpose(1, 2).reshape(B, D, g, g)
        out = self.net(image, encoder_hidden_states=c, timestep=1000.0 * t.to(x_t.dtype),
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        return out.reshape(B, D, T).transpose(1, 2)


def build(target_dim: int, cond_dim: int, tokens: int, **hints) -> PixArtBackbone:
    """The eva-repro plugin factory: hidden, depth and n_heads from the hints (others are ignored)."""
    sizes = {k: hints[k] for k in ("hidden", "depth", "n_heads") if hints.get(k) is not None}
    return PixArtBackbone(PixArtConfig(target_dim, cond_dim, tokens, **sizes))
