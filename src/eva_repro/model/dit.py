"""eva-repro's Next-DiT (the BLIP3-o / Lumina-Next block) over patch tokens, in one file.

    x_t [B, T, D_target], t [B], c [B, Tc, D_cond]  ->  y [B, T, D_target]

    a_c = (RMSNorm(c) - mu_c) A_c  on the target grid  the aligned condition [B, T, D_cond]
    h   = W_in x_t + W_a a_c + P(pos_x)                input projection (+ aligned condition,
                                                     + absolute position)
    c'  = W_c RMSNorm(c) + P(pos_c)                  condition projected once (or the learned
                                                     null condition, for classifier-free guidance)
    a   = TimestepMLP(sin(t)) + W_p RMSNorm(mean c') adaLN input
    per block (sandwich norm, zero-init tanh gates):
        s1, g1, s2, g2 = W_ada SiLU(a)               (zero init: every block starts as identity)
        h += tanh(g1) * RMSNorm(Attn(RMSNorm(h) * (1 + s1), c'))
        h += tanh(g2) * RMSNorm(SwiGLU(RMSNorm(h) * (1 + s2)))
    Attn = self-attention over h + tanh(gate_head) * cross-attention to c', QK-norm, GQA,
           3D RoPE on (slot, row, col) for both the patch tokens and the condition tokens
    y   = W_out (RMSNorm(h) * (1 + s_f)) + W_l a_c + b_pos
                                                     (W_out zero init; W_l, b_pos: the linear
                                                     path, zero init)

`forward` returns y, the network's raw prediction: the velocity (`prediction` "v") or the clean
target x1 ("x"); `flow.transport.velocity` maps it onto the velocity, outside the network.

The options, each a DiTConfig field (`VARIANTS`: "blip3o" has none of them, "eva-repro" all):
- `abs_pos_embed`: P, a fixed sin-cos embedding of the positions RoPE uses (condition positions
  mapped onto the target grid). At t ~ 0 the patch tokens are noise, so without a
  content-independent position every query is noise and cross-attention cannot pick the
  condition patch at the same place.
- `cond_align`: W_a a_c, the condition token at the same grid position in the residual stream,
  instead of only through a zero-gated cross-attention that must first find it.
- `prediction = "x"`: y is x1. A target wider than the network cannot carry the noise in
  v = x1 - x0 through the width bottleneck; x1 is a function of the condition (JiT).
- `cond_linear`: W_l a_c + b_pos, a full-rank linear map beside the network, whose output layer
  has rank <= hidden; the network learns the residual (CorrDiff). It predicts x1: needs "x".
- `cond_whiten`: A_c = U diag(1 / sqrt(S + s * mean(S))) * sqrt(1 + s) for the training set's
  condition covariance U S U^T and shrinkage s, set once before training (`init_whitening`;
  the identity until then). AdamW learns a linear map on anisotropic features slowly; the
  shrinkage keeps any direction from being amplified more than sqrt(1 + 1/s) times.

The longer argument for each, and where it is measured: docs/model.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from eva_repro.data.layout import align_condition, check_mode, has_cls
from eva_repro.utils.errors import UserError
from eva_repro.utils.files import (
    MODEL_FIX,
    atomic_save_safetensors,
    atomic_write_json,
    load_safetensors,
    read_json_object,
)

ARCHITECTURE = "eva-repro-dit"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
PREDICTIONS = ("v", "x")  # what forward returns: the velocity, or the clean target x1
FFN_MULTIPLE_OF = 256  # SwiGLU hidden = 8/3 * hidden rounded up to this
NORM_EPS = 1e-6
ROPE_THETA = 10000.0

# The head's conditioning and prediction: eva-repro's default, and BLIP3-o's own (pure
# Lumina-Next) head, which has none of the options.
VARIANTS = {
    "eva-repro": dict(abs_pos_embed=True, prediction="x", cond_align=True, cond_linear=True,
                      cond_whiten=1.0),
    "blip3o": dict(abs_pos_embed=False, prediction="v", cond_align=False, cond_linear=False,
                   cond_whiten=None),
}
# What a score of a head with the aligned condition does not measure (the test bed's finding).
ALIGNED_HEAD_CAVEAT = (
    "This is eva-repro's default head: its aligned-condition input and linear path solve "
    "grid-aligned targets without the BLIP3-o parts, so this score does not depend on its "
    "cross-attention, 3D RoPE, timestep or adaLN modulation (the test bed measures it: "
    "`eva-repro zoo --head eva-repro`, docs/testbed.md). To judge a BLIP3-o implementation run "
    "`eva-repro check`; BLIP3-o's own head is `--model_variant blip3o`.")


ALIGNED_HEAD_CARD_CAVEAT = (
    "This is eva-repro's default head: its aligned-condition input and linear path solve the "
    "card's problems without the BLIP3-o parts, so its learning checks do not depend on its "
    "cross-attention, 3D RoPE, timestep or adaLN modulation, and 1D positions in its RoPE pass "
    "this card (docs/testbed.md). To judge BLIP3-o's own head: `--model_variant blip3o`.")


def score_caveat(config) -> str | None:
    """What a held-out score of this model does not measure, for the first lines of a report."""
    return ALIGNED_HEAD_CAVEAT if getattr(config, "cond_align", False) else None


def card_caveat(config) -> str | None:
    """What the test bed's report card of this model cannot catch, for its first lines."""
    return ALIGNED_HEAD_CARD_CAVEAT if getattr(config, "cond_align", False) else None


# width, depth, heads, kv heads: the public reference's sizes, so results compare.
PRESETS = {
    "tiny": dict(hidden=384, depth=6, n_heads=6, n_kv_heads=2),
    "small": dict(hidden=512, depth=8, n_heads=8, n_kv_heads=4),
    "base": dict(hidden=768, depth=12, n_heads=12, n_kv_heads=4),
    "large": dict(hidden=1024, depth=16, n_heads=16, n_kv_heads=8),
}


@dataclass
class DiTConfig:
    target_dim: int = 1024  # EVA-CLIP token width
    cond_dim: int = 1024  # CLIP token width
    hidden: int = 384
    depth: int = 6
    n_heads: int = 6
    n_kv_heads: int = 2
    token_mode: str = "patch_only"  # "patch_only": T = g*g; "cls_patch": T = g*g + 1 (CLS first)
    abs_pos_embed: bool = True  # add P(pos) to target and condition tokens (see the docstring)
    prediction: str = "x"  # "x": the network predicts the clean target; "v": the velocity
    cond_align: bool = True  # add the condition token at the same grid position to the input
    cond_linear: bool = True  # full-width linear path from the aligned condition to x1 (needs "x")
    cond_whiten: float | None = 1.0  # shrinkage s of the aligned condition's whitening; None: off
    tokens: int | None = None  # target tokens per sample: what the sampler generates
    grad_checkpointing: bool = False
    target_norm: float = 1.0  # mean L2 norm of raw target tokens; maps samples back to EVA scale
    extra: dict = field(default_factory=dict)  # free-form provenance (preset name, encoders...)

    def __post_init__(self) -> None:
        check_mode(self.token_mode)
        if self.hidden % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"hidden ({self.hidden}) must divide by n_heads ({self.n_heads}) and "
                             f"n_heads by n_kv_heads ({self.n_kv_heads})")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")
        if self.cond_linear and self.prediction != "x":
            raise ValueError("cond_linear predicts the clean target: it needs prediction='x'")
        if not (self.cond_align or self.cond_linear):
            self.cond_whiten = None  # it whitens the aligned condition, which nothing reads then
        if self.cond_whiten is not None and self.cond_whiten <= 0:
            raise ValueError(f"cond_whiten (the shrinkage) must be > 0 or None, got {self.cond_whiten}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """head_dim split over (slot, row, col), each even; the slot axis has only positions 0
        and 1, so it gets the fewest frequencies."""
        slot = 2 * max(1, self.head_dim // 16)
        row = (self.head_dim - slot) // 4 * 2
        return slot, row, self.head_dim - slot - row

    @property
    def ffn_dim(self) -> int:
        return FFN_MULTIPLE_OF * math.ceil(int(8 * self.hidden / 3) / FFN_MULTIPLE_OF)

    @property
    def ada_dim(self) -> int:
        return min(self.hidden, 1024)

    @classmethod
    def preset(cls, name: str, **overrides) -> DiTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "extra": {"preset": name}, **overrides})

    def to_dict(self) -> dict:
        return {"architecture": ARCHITECTURE, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> DiTConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def estimate_flops(cfg: DiTConfig, tokens: int, cond_tokens: int) -> float:
    """Forward-pass FLOPs per sample (matmuls and attention; norms and RoPE are not counted)."""
    T, Tc, h, hd = tokens, cond_tokens, cfg.hidden, cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    per_block = (
        2 * T * h * (q + 2 * kv)  # q, k, v
        + 2 * Tc * h * 2 * kv  # cross k, v
        + 4 * T * T * q + 4 * T * Tc * q  # scores and weighted sums, self and cross
        + 2 * T * q * h  # output projection
        + 2 * T * h * cfg.ffn_dim * 3  # SwiGLU
    )
    io = 2 * T * cfg.target_dim * h * 2 + 2 * Tc * cfg.cond_dim * h
    io += 2 * T * cfg.cond_dim * h * cfg.cond_align + 2 * T * cfg.cond_dim * cfg.target_dim * cfg.cond_linear
    io += 2 * T * cfg.cond_dim * cfg.cond_dim * (cfg.cond_whiten is not None)
    return float(cfg.depth * per_block + io)


# ---------------------------------------------------------------------------------------------
# 3D rotary position embedding


def token_positions(tokens: int, cls_first: bool, scale: float = 1.0) -> torch.Tensor:
    """(slot, row, col) per token [T, 3]: CLS -> (0, 0, 0), patch (r, c) -> (1, u(r), u(c)) with
    u(r) = (r + 1/2) * scale - 1/2.

    `scale` maps another grid onto the target grid by patch centres (as `align_corners=False`
    does), so a condition patch lies where its image region lies on the target grid: at scale
    1/2 the four patches under target patch (i, j) sit at i -+ 1/4, j -+ 1/4 around it.
    """
    g = math.isqrt(tokens - int(cls_first))
    if g * g != tokens - int(cls_first):
        raise UserError(f"{tokens} tokens is not a square grid{' plus CLS' if cls_first else ''}")
    r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    r, c = ((x.flatten() + 0.5) * scale - 0.5 for x in (r, c))
    patches = torch.stack([torch.ones(g * g), r, c], dim=-1)
    return torch.cat([torch.zeros(1, 3), patches]) if cls_first else patches


def rope_angles(positions: torch.Tensor, axes: tuple[int, ...], theta: float) -> torch.Tensor:
    """Angles [T, head_dim/2]: each axis block rotates its pairs by pos_axis * theta^(-2i/d_axis)."""
    parts = []
    for a, dim in enumerate(axes):
        freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(positions[:, a, None].double() * freqs)
    return torch.cat(parts, dim=-1)


def sincos_embedding(positions: torch.Tensor, axes: tuple[int, ...], theta: float) -> torch.Tensor:
    """Absolute position embedding [T, sum(axes)]: cos and sin of `rope_angles` (DiT's 2D sin-cos,
    extended to the three axes)."""
    ang = rope_angles(positions, axes, theta)
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (even, odd) pair of x [B, T, H, hd] by its angle: a true 2D rotation per pair,
    so q.k depends only on the position difference on each axis."""
    x2 = x.unflatten(-1, (-1, 2))
    x0, x1 = x2[..., 0], x2[..., 1]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


# ---------------------------------------------------------------------------------------------
# layers


class Attention(nn.Module):
    """Self-attention over x plus zero-gated cross-attention to the condition; QK-norm; GQA."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden, q + 2 * kv, bias=False)
        self.wkv_cond = nn.Linear(cfg.hidden, 2 * kv, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=NORM_EPS)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=NORM_EPS)
        self.k_cond_norm = nn.RMSNorm(cfg.head_dim, eps=NORM_EPS)
        self.cond_gate = nn.Parameter(torch.zeros(cfg.n_heads))  # tanh(0) = 0: self-attn only
        self.wo = nn.Linear(q, cfg.hidden, bias=False)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, T, H, hd], k/v [B, S, KV, hd] -> [B, H, T, hd]."""
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        if self.n_kv_heads == self.n_heads:
            return F.scaled_dot_product_attention(q, k, v)
        if q.is_cuda:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        rep = self.n_heads // self.n_kv_heads  # CPU: expanded K/V is faster than enable_gqa
        return F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope_x: tuple, rope_c: tuple) -> torch.Tensor:
        B, T, _ = x.shape
        hd, kvd = self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * hd, kvd, kvd], dim=-1)
        q = apply_rope(self.q_norm(q.view(B, T, -1, hd)), *rope_x)
        k = apply_rope(self.k_norm(k.view(B, T, -1, hd)), *rope_x)
        kc, vc = self.wkv_cond(c).view(B, c.shape[1], 2, -1, hd).unbind(2)
        kc = apply_rope(self.k_cond_norm(kc), *rope_c)
        out = self._attend(q, k, v.view(B, T, -1, hd))
        out_cond = self._attend(q, kc, vc)
        out = out + torch.tanh(self.cond_gate).view(1, -1, 1, 1) * out_cond
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # gate and value in one matmul
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * value)


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        norm = lambda: nn.RMSNorm(cfg.hidden, eps=NORM_EPS)  # noqa: E731
        self.attn_norm1, self.attn_norm2, self.ffn_norm1, self.ffn_norm2 = norm(), norm(), norm(), norm()
        self.attn = Attention(cfg)
        self.ffn = SwiGLU(cfg.hidden, cfg.ffn_dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.ada_dim, 4 * cfg.hidden))

    def forward(self, x, c, ada, rope_x, rope_c):
        scale_attn, gate_attn, scale_ffn, gate_ffn = self.ada(ada).unsqueeze(1).chunk(4, dim=-1)
        h = self.attn(self.attn_norm1(x) * (1 + scale_attn), c, rope_x, rope_c)
        x = x + torch.tanh(gate_attn) * self.attn_norm2(h)
        h = self.ffn(self.ffn_norm1(x) * (1 + scale_ffn))
        return x + torch.tanh(gate_ffn) * self.ffn_norm2(h)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000 t (DiT's frequency range) -> MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


# ---------------------------------------------------------------------------------------------
# the network


class DiT(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        self.x_embed = nn.Linear(cfg.target_dim, cfg.hidden)
        if cfg.cond_align:
            self.align_embed = nn.Linear(cfg.cond_dim, cfg.hidden, bias=False)
        if cfg.cond_linear:
            self.linear_cond = nn.Linear(cfg.cond_dim, cfg.target_dim)
            self.linear_bias = nn.Parameter(torch.zeros(cfg.tokens or 1, cfg.target_dim))
        if cfg.cond_whiten is not None:  # statistics, not parameters: saved, never trained
            self.register_buffer("cond_mean", torch.zeros(cfg.cond_dim))
            self.register_buffer("cond_white", torch.eye(cfg.cond_dim))
        self.cond_norm = nn.RMSNorm(cfg.cond_dim, eps=NORM_EPS)
        self.cond_proj = nn.Linear(cfg.cond_dim, cfg.hidden)
        self.null_cond = nn.Parameter(torch.randn(cfg.hidden) * 0.02)  # CFG "no condition"
        self.t_embed = TimestepEmbedder(cfg.ada_dim)
        self.cond_pool = nn.Sequential(nn.RMSNorm(cfg.hidden, eps=NORM_EPS),
                                       nn.Linear(cfg.hidden, cfg.ada_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.RMSNorm(cfg.hidden, eps=NORM_EPS, elementwise_affine=False)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.ada_dim, cfg.hidden))
        self.out = nn.Linear(cfg.hidden, cfg.target_dim)
        self._position_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for lin in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        # zero init: blocks start as identity, the output and the linear path at exactly zero
        zero = [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]
        if self.config.cond_linear:
            zero.append(self.linear_cond)
            nn.init.zeros_(self.linear_bias)
        for layer in zero:
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def extra_repr(self) -> str:
        c = self.config
        return (f"params={self.num_parameters() / 1e6:.2f}M, hidden={c.hidden}, depth={c.depth}, "
                f"heads={c.n_heads}/{c.n_kv_heads}kv, token_mode={c.token_mode}")

    def positions(self, tokens: int, grid_tokens: int, device: torch.device) -> tuple:
        """RoPE (cos, sin) [tokens, hd/2] and the absolute embedding [tokens, hidden] (or None) of a
        token sequence, positions in target-grid units."""
        # inference-mode tensors cannot be saved for backward later: keep them out of the cache
        key = (tokens, grid_tokens, str(device), torch.is_inference_mode_enabled())
        if key not in self._position_cache:
            cfg, cls = self.config, has_cls(self.config.token_mode)
            g_ref = math.isqrt(grid_tokens - int(cls))
            g = math.isqrt(tokens - int(cls))
            pos = token_positions(tokens, cls, scale=g_ref / max(g, 1))
            ang = rope_angles(pos, cfg.rope_axes, ROPE_THETA)
            embed = None
            if cfg.abs_pos_embed:  # the RoPE axis split, widened from one head to all of them
                axes = tuple(a * cfg.n_heads for a in cfg.rope_axes)
                embed = sincos_embedding(pos, axes, ROPE_THETA).float().to(device)
            self._position_cache[key] = (ang.cos().float().to(device), ang.sin().float().to(device), embed)
        return self._position_cache[key]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        drop_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, D_target] at time t [B] (0 noise, 1 data), cond [B, Tc, D_cond] -> the raw
        prediction y [B, T, D_target] of type `config.prediction` (`flow.transport.velocity` maps it)."""
        cfg = self.config
        *rope_x, pos_x = self.positions(x.shape[1], x.shape[1], x.device)
        *rope_c, pos_c = self.positions(cond.shape[1], x.shape[1], x.device)
        c = self.cond_proj(self.cond_norm(cond))
        aligned = self.aligned_condition(cond, x.shape[1], drop_cond)
        if drop_cond is not None:  # classifier-free guidance: swap in the learned null condition
            c = torch.where(drop_cond.view(-1, 1, 1), self.null_cond.to(c.dtype), c)
        ada = self.t_embed(t) + self.cond_pool(c.mean(dim=1))
        h = self.x_embed(x)
        if cfg.cond_align:
            h = h + self.align_embed(aligned)
        if cfg.abs_pos_embed:  # after pooling: the pooled condition stays position-free
            h, c = h + pos_x.to(h.dtype), c + pos_c.to(c.dtype)
        for block in self.blocks:
            if self.config.grad_checkpointing and self.training:
                h = checkpoint(block, h, c, ada, rope_x, rope_c, use_reentrant=False)
            else:
                h = block(h, c, ada, rope_x, rope_c)
        h = self.final_norm(h) * (1 + self.final_ada(ada).unsqueeze(1))
        y = self.out(h)
        if cfg.cond_linear:
            y = y + self.linear_cond(aligned) + self.linear_bias.to(y.dtype)
        return y

    @torch.no_grad()
    def init_whitening(self, mean: torch.Tensor, matrix: torch.Tensor) -> None:
        """Set the aligned condition's whitening a_c = (RMSNorm(c) - mean) @ matrix
        (mean [D_cond], matrix [D_cond, D_cond]; e.g. `data.condition_whitening`)."""
        if self.config.cond_whiten is None:
            raise ValueError("init_whitening needs a model with cond_whiten set")
        self.cond_mean.copy_(mean)
        self.cond_white.copy_(matrix)

    def aligned_condition(self, cond: torch.Tensor, tokens: int,
                          drop_cond: torch.Tensor | None = None) -> torch.Tensor | None:
        """RMS-normalised (and whitened) condition tokens on the target grid [B, T, D_cond]
        (zero where the condition is dropped), the input of `cond_align` and `cond_linear`;
        None without them."""
        if not (self.config.cond_align or self.config.cond_linear):
            return None
        a = align_condition(cond, tokens, has_cls(self.config.token_mode))
        a = F.rms_norm(a, (a.shape[-1],), eps=NORM_EPS)
        if self.config.cond_whiten is not None:
            a = (a - self.cond_mean.to(a.dtype)) @ self.cond_white.to(a.dtype)
        if drop_cond is not None:
            a = torch.where(drop_cond.view(-1, 1, 1), 0.0, a)
        return a

    # -- persistence: config.json + model.safetensors, like transformers / diffusers ---------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        atomic_save_safetensors(state, directory / WEIGHTS_FILE, {"architecture": ARCHITECTURE})
        atomic_write_json(directory / CONFIG_FILE, self.config.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu") -> DiT:
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.exists() or not weights_path.exists():
            raise UserError(f"{directory}: not a saved eva-repro model (needs {CONFIG_FILE} and "
                             f"{WEIGHTS_FILE}); pass the directory written by save_pretrained")
        data = read_json_object(config_path, MODEL_FIX)
        if data.get("architecture") != ARCHITECTURE:
            raise UserError(f"{config_path}: architecture {data.get('architecture')!r} is not "
                             f"{ARCHITECTURE!r}")
        model = cls(DiTConfig.from_dict(data))
        state = load_safetensors(weights_path, MODEL_FIX, map_location)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatch
            raise UserError(f"{weights_path}: weights do not fit {config_path}: {e}") from e
        if missing or unexpected:
            raise UserError(f"{weights_path}: weights do not match {config_path} (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}); the files come from "
                             "different models")
        return model.to(map_location)
