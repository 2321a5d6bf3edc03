"""A plain DiT (Peebles & Xie 2023) with PixArt-alpha's cross-attention, as an eva-repro backbone plugin.

    x_t [B, T, D] at time t [B] (0 noise, 1 data, x_t = (1 - t) x0 + t x1), c [B, Tc, Dc]  ->  v [B, T, D]

    h     = W_in x_t + P(g)                   P: DiT's fixed 2D sin-cos table, g = sqrt(T), row-major
    e     = MLP(sincos_256(1000 t))           DiT's timestep embedder (frequencies to 10000, SiLU MLP)
    c     = null            for rows with drop_cond    a learned null token (classifier-free guidance)
    k     = W_c LN(c) + P(gc -> g)            the condition's own 2D sin-cos table, gc = sqrt(Tc), its
                                              cells placed on the target grid: (j + 1/2) g / gc - 1/2
    each block, with (b1, s1, a1, b2, s2, a2) = Linear(SiLU(e)) zero-initialised (adaLN-Zero):
        h = h + a1 * SelfAttn(LN(h) * (1 + s1) + b1)
        h = h + CrossAttn(queries h, keys/values k)      PixArt-alpha: unmodulated, output zero-init
        h = h + a2 * MLP(LN(h) * (1 + s2) + b2)
    v     = W_out(LN(h) * (1 + s) + b)        final adaLN layer, (b, s) and W_out zero-initialised

Time convention: eva-repro's t goes in as is (the embedder sees 1000 t, DiT's timestep range) and
the output is eva-repro's velocity v = x1 - x0 (`prediction` "v"), so there is nothing to map.
The network starts as the identity plus a zero output, as DiT's does.

Use:  eva-repro check --backbone examples/plain_dit.py:build --output_dir out
      eva-repro train --backbone examples/plain_dit.py:build ...
build(target_dim, cond_dim, tokens, hidden=, depth=, n_heads=) reads those hints and ignores others.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class PlainDiTConfig:
    target_dim: int  # EVA-CLIP token width
    cond_dim: int  # CLIP token width
    tokens: int  # target tokens per sample, a square grid
    hidden: int = 384
    depth: int = 6
    n_heads: int = 6
    mlp_ratio: float = 4.0
    freq_dim: int = 256  # sinusoidal features of the timestep


def grid_side(n: int, what: str) -> int:
    g = math.isqrt(n)
    if n < 1 or g * g != n:
        raise ValueError(f"plain DiT: {n} {what} tokens are no square grid")
    return g


def sincos_2d(dim: int, grid: int, size: int, device: torch.device) -> torch.Tensor:
    """DiT's (MAE's) 2D sin-cos table [grid*grid, dim], row-major: half the channels encode the row,
    half the column. The grid's cells sit at (j + 1/2) size / grid - 1/2 on a size x size grid."""
    pos = (torch.arange(grid, device=device, dtype=torch.float64) + 0.5) * size / grid - 0.5
    omega = 10000.0 ** -(torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim // 4))
    one = torch.cat([(pos[:, None] * omega).sin(), (pos[:, None] * omega).cos()], -1)  # [grid, dim/2]
    rows, cols = one[:, None].expand(grid, grid, -1), one[None].expand(grid, grid, -1)
    return torch.cat([rows, cols], -1).reshape(grid * grid, dim).float()


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], -1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head attention of queries x over keys/values kv (self-attention when kv is x)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(kv_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)
        k, v = self.kv(kv).view(B, kv.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn, self.cross = Attention(hidden, heads), Attention(hidden, heads)
        width = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU("tanh"), nn.Linear(width, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, h: torch.Tensor, e: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        b1, s1, a1, b2, s2, a2 = self.ada(e).chunk(6, dim=-1)
        x = modulate(self.norm1(h), b1, s1)
        h = h + a1[:, None] * self.attn(x, x)
        h = h + self.cross(h, k)
        return h + a2[:, None] * self.mlp(modulate(self.norm2(h), b2, s2))


class PlainDiT(nn.Module):
    prediction = "v"

    def __init__(self, config: PlainDiTConfig):
        super().__init__()
        c = self.config = config
        if c.hidden % c.n_heads or c.hidden % 4:
            raise ValueError(f"plain DiT: hidden ({c.hidden}) must divide by n_heads ({c.n_heads}) and by 4 "
                             "(the 2D sin-cos table)")
        grid_side(c.tokens, "target")
        self.x_in, self.c_in = nn.Linear(c.target_dim, c.hidden), nn.Linear(c.cond_dim, c.hidden)
        self.c_norm = nn.LayerNorm(c.cond_dim)
        self.null = nn.Parameter(torch.randn(c.cond_dim) * 0.02)  # the dropped condition, every token
        self.t_mlp = nn.Sequential(nn.Linear(c.freq_dim, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden))
        self.blocks = nn.ModuleList(Block(c.hidden, c.n_heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm_out = nn.LayerNorm(c.hidden, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden, 2 * c.hidden))
        self.out = nn.Linear(c.hidden, c.target_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's initialisation: xavier linears, N(0, 0.02) timestep MLP, zero adaLN and output layers
        (and PixArt-alpha's zero cross-attention output), so that every block starts as the identity."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.t_mlp[0], self.t_mlp[2]:
            nn.init.normal_(m.weight, std=0.02)
        for m in [m for b in self.blocks for m in (b.ada[1], b.cross.out)] + [self.ada_out[1], self.out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        g, gc = grid_side(x_t.shape[1], "target"), grid_side(cond.shape[1], "condition")
        hidden = self.config.hidden
        if drop_cond is not None:
            cond = torch.where(drop_cond.view(-1, 1, 1), self.null.to(cond.dtype), cond)
        h = self.x_in(x_t) + sincos_2d(hidden, g, g, x_t.device).to(x_t.dtype)
        k = self.c_in(self.c_norm(cond)) + sincos_2d(hidden, gc, g, cond.device).to(x_t.dtype)
        e = self.t_mlp(timestep_features(t, self.config.freq_dim).to(x_t.dtype))
        for block in self.blocks:
            h = block(h, e, k)
        shift, scale = self.ada_out(e).chunk(2, dim=-1)
        return self.out(modulate(self.norm_out(h), shift, scale))


def build(target_dim: int, cond_dim: int, tokens: int, **hints) -> PlainDiT:
    """The eva-repro plugin factory: hidden, depth and n_heads from the hints (others are ignored)."""
    sizes = {k: hints[k] for k in ("hidden", "depth", "n_heads") if hints.get(k) is not None}
    return PlainDiT(PlainDiTConfig(target_dim, cond_dim, tokens, **sizes))
