"""diffusers' `SD3Transformer2DModel` (Stable Diffusion 3's MMDiT: joint attention over image tokens and
condition tokens, each stream with its own weights) as an eva-repro backbone plugin.

    x_t [B, T, D] at time t [B] (0 noise, 1 data), c [B, Tc, Dc]  ->  v [B, T, D]

    image  = x_t as a (D, g, g) latent image, g = sqrt(T)           patch_size 1: one token a cell
    c'     = rms_norm(c)                 the condition tokens, a set: no position (the design's)
    pooled = mean_j rms_norm(c)_j       SD3's pooled text embedding, here the mean condition token
    c', pooled = 0                      for rows with drop_cond (classifier-free guidance)
    v      = -SD3Transformer2DModel(image, encoder_hidden_states=c', pooled_projections=pooled,
                                    timestep=1000 (1 - t))  ->  [B, T, D]

Time convention, the one place it is mapped: SD3 (diffusers' FlowMatchEulerDiscreteScheduler) runs on
sigma = 1 - t (1 = noise, x = (1 - sigma) x1 + sigma x0) with `timestep = 1000 sigma`, and its network
predicts noise minus data, x0 - x1. So the wrapper passes timestep = 1000 (1 - t) and negates the
output to return eva-repro's velocity v = x1 - x0.

The condition is read as a set, as SD3's own text conditioning reads a caption: its tokens carry
no position, so the plugin declares `condition_as_set` and `eva-repro check` reports its grid
checks as not applicable by design.

The network is diffusers' own class, unchanged: `joint_attention_dim = pooled_projection_dim = Dc`,
`caption_projection_dim = hidden` (the context stream's width must equal the image stream's),
`pos_embed_max_size = g` (SD3 crops its position table from a max-size grid; g gives the full grid),
`qk_norm = "rms_norm"` (as SD3.5), `out_channels = D`.

Use:  eva-repro check --backbone examples/diffusers_sd3.py:build --output_dir out
      eva-repro train --backbone examples/diffusers_sd3.py:build ...
build(target_dim, cond_dim, tokens, hidden=, depth=, n_heads=) reads those hints and ignores others.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class SD3Config:
    target_dim: int
    cond_dim: int
    tokens: int
    hidden: int = 384
    depth: int = 6
    n_heads: int = 6


def grid_side(n: int, what: str) -> int:
    g = math.isqrt(n)
    if n < 1 or g * g != n:
        raise ValueError(f"diffusers SD3 backbone: {n} {what} tokens are no square grid")
    return g


class SD3Backbone(nn.Module):
    prediction = "v"
    condition_as_set = True  # the condition tokens carry no position (the design's)

    def __init__(self, config: SD3Config):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        c = self.config = config
        if c.hidden % c.n_heads or c.hidden % 4:
            raise ValueError(f"diffusers SD3 backbone: hidden ({c.hidden}) must divide by n_heads "
                             f"({c.n_heads}) and by 4 (SD3's 2D sin-cos position table)")
        g = grid_side(c.tokens, "target")
        self.net = SD3Transformer2DModel(
            sample_size=g, patch_size=1, in_channels=c.target_dim, out_channels=c.target_dim,
            num_layers=c.depth, attention_head_dim=c.hidden // c.n_heads, num_attention_heads=c.n_heads,
            joint_attention_dim=c.cond_dim, caption_projection_dim=c.hidden, pooled_projection_dim=c.cond_dim,
            pos_embed_max_size=g, qk_norm="rms_norm")
        # The last block is `context_pre_only`: it attends with the context's keys and values but drops
        # the context's own outputs, so its context queries never reach the loss. Frozen, so that DDP
        # and the host's gradient check see only parameters that can learn.
        last = self.net.transformer_blocks[-1].attn
        for unused in last.add_q_proj, getattr(last, "norm_added_q", None):
            if unused is not None:
                unused.requires_grad_(False)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (FSDP2 shards each); a property, so the state dict names them once."""
        return self.net.transformer_blocks

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x_t.shape
        g = grid_side(T, "target")  # the condition is a set: any number of tokens
        if g > self.net.config.pos_embed_max_size:
            raise ValueError(f"diffusers SD3 backbone: a {g}x{g} grid is larger than the "
                             f"{self.config.tokens} tokens it was built for (SD3's position table, "
                             "pos_embed_max_size)")
        c = F.rms_norm(cond, (cond.shape[-1],), eps=1e-6)
        pooled = c.mean(1)
        if drop_cond is not None:
            c = torch.where(drop_cond.view(-1, 1, 1), 0.0, c)
            pooled = torch.where(drop_cond.view(-1, 1), 0.0, pooled)
        image = x_t.transpose(1, 2).reshape(B, D, g, g)
        out = self.net(image, encoder_hidden_states=c, pooled_projections=pooled,
                       timestep=1000.0 * (1.0 - t.to(x_t.dtype)), return_dict=False)[0]
        return -out.reshape(B, D, T).transpose(1, 2)  # noise - data  ->  data - noise


def build(target_dim: int, cond_dim: int, tokens: int, **hints) -> SD3Backbone:
    """The eva-repro plugin factory: hidden, depth and n_heads from the hints (others are ignored)."""
    sizes = {k: hints[k] for k in ("hidden", "depth", "n_heads") if hints.get(k) is not None}
    return SD3Backbone(SD3Config(target_dim, cond_dim, tokens, **sizes))
