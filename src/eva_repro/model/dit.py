"""BLIP3-o / Lumina-Next style Diffusion Transformer over patch tokens, in one file.

    x_t [B, T, D_target], t [B], c [B, Tc, D_cond]  ->  velocity [B, T, D_target]

    a_c = (RMSNorm(c) - mu_c) A_c  on the target grid  the aligned condition [B, T, D_cond],
                                                     whitened (mu_c, A_c: training-set statistics)
    a_c += K * a_c                                   `cond_local`: a 3x3 kernel K convolved over
                                                     the grid, one for all channels (zero init)
    h   = W_in x_t + W_a a_c + P(pos_x)              input projection (+ aligned condition,
                                                     + absolute position)
    c'  = W_c RMSNorm(c) + P(pos_c)                  condition projected once (or the learned
                                                     null condition, for classifier-free guidance)
    a   = TimestepMLP(sin(t)) + W_p RMSNorm(mean c') adaLN input
    per block (sandwich norm, zero-init tanh gates):
        s1, g1, s2, g2 = W_ada SiLU(a)               (zero init: every block starts as identity)
        h += tanh(g1) * RMSNorm(Attn(RMSNorm(h) * (1 + s1), c'))
        h += tanh(g2) * RMSNorm(SwiGLU(RMSNorm(h) * (1 + s2)))
                                                     (`dropout` on both branches in training;
                                                     off by default: measured, no gain)
    Attn = self-attention over h + tanh(gate_head) * cross-attention to c', QK-norm, GQA,
           3D RoPE on (slot, row, col) for both the patch tokens and the condition tokens
    y   = W_out (RMSNorm(h) * (1 + s_f)) + W_l a_c + b_pos [+ MLP(a_c)]
                                                     (W_out zero init; W_l, b_pos: the full-width
                                                     linear path, zero init; MLP: the optional
                                                     per-token nonlinear path, zero-init output)
    v   = y                                          prediction "v" (Lumina-Next, BLIP3-o)
    v   = (y - x_t) / (1 - t)                        prediction "x": y is the clean target
                                                     (JiT; flow.velocity_from_data)

The pure Lumina-Next / BLIP3-o head is `VARIANTS["lumina-next"]`: v-prediction, condition through
cross-attention (and the pooled adaLN input) only, RoPE as the only position signal. The default
adds these, each a config field, because the target tokens sit on the same grid as the
condition tokens (the image-to-image setting of SR3, Palette or Marigold, which concatenate the
aligned condition to the input):
- `cond_align`: the condition token at the same grid position enters the residual stream
  directly, instead of through a zero-gated cross-attention that must first find it. With noise
  as the only query content at t ~ 0, that search is what kept the pure head below the mean
  baseline for hundreds of steps.
- `prediction = "x"`: the network predicts x1, not v = x1 - x0. A target wider than the network
  (1024-d or 4096-d EVA tokens into a 384-wide model) cannot carry the noise x0 through the width
  bottleneck, which v needs; x1 is a function of the condition and needs no noise.
- `cond_linear`: a full-width linear map from the aligned condition (and the position) to x1 beside
  the network, which then learns the residual, as CorrDiff's regression-then-diffusion does. The
  network's output layer has rank <= hidden, too few for a 1024-d target; the linear path has
  full rank (with a per-position bias when `tokens` is known, like the ridge baseline's). It
  starts at zero and is trained with the rest: initialised by least squares instead, the run
  starts at the ridge baseline but then gains less than one that learns both together.

- `cond_whiten`: the aligned condition is whitened with statistics of the training set,
  A_c = U diag(1 / sqrt(S + s * mean(S))) * sqrt(1 + s) for its covariance U S U^T and shrinkage s,
  set once before training (`init_whitening`; identity until then, so an unfitted model is the
  plain one). Real encoder features are far from isotropic (a few directions carry most of the
  variance), and AdamW learns a linear map on such inputs slowly; whitened, the linear path and
  the input projection see well-conditioned features. The shrinkage keeps the low-variance
  directions, mostly noise, from being amplified more than sqrt(1 + 1/s) times.
- `cond_local`: after the whitening, a 3x3 kernel convolved over the grid adds each token's
  neighbours to the aligned condition, so the linear path and the input see the condition around
  a target token, not only the token at its place (the target at one place depends on its
  surroundings, which the network otherwise reaches only through attention that must learn where
  to look). One kernel for all channels, zero init: it starts as the plain aligned condition, and
  with 9 parameters it cannot fit per-channel noise (a depthwise kernel did, on real photos).
  A saved gate switches it off (`enable_local_mix`): the trainer trains it only where the
  training data show that a token's neighbours carry target information.

P is a fixed sin-cos embedding of the same (slot, row, col) positions RoPE uses, condition
positions mapped onto the target grid (DiT adds one too; Lumina-Next relies on RoPE alone). At
t ~ 0 the patch tokens are pure noise, so without it every query is noise and cross-attention
cannot pick the condition patch at the same place until the network has grown a
content-independent component itself.
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

from eva_repro import flow
from eva_repro.errors import UserError
from eva_repro.files import (
    MODEL_FIX,
    atomic_save_safetensors,
    atomic_write_json,
    load_safetensors,
    read_json_object,
)
from eva_repro.layout import check_mode, grid_conv, has_cls

ARCHITECTURE = "eva-repro-dit"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"

# The head's conditioning and prediction: the default, and the pure Lumina-Next (BLIP3-o) block.
VARIANTS = {
    "eva-repro": dict(abs_pos_embed=True, prediction="x", cond_align=True, cond_linear=True,
                      cond_whiten=1.0, cond_local=True),
    "lumina-next": dict(abs_pos_embed=False, prediction="v", cond_align=False, cond_linear=False,
                        cond_whiten=None, cond_local=False),
}
# What a score of a head with the aligned condition does not measure (the test bed's finding).
ALIGNED_HEAD_CAVEAT = (
    "This is eva-repro's default head: its aligned-condition input and linear path solve "
    "grid-aligned targets without the BLIP3-o parts, so this score does not depend on its "
    "cross-attention, 3D RoPE, timestep or adaLN modulation (the test bed measures it: "
    "`eva-repro zoo --head eva-repro`, docs/testbed.md). To judge a BLIP3-o implementation run "
    "`eva-repro check`; BLIP3-o's own head is `--model_variant lumina-next`.")


def score_caveat(config) -> str | None:
    """What a held-out score of this model does not measure, for the first lines of a report."""
    return ALIGNED_HEAD_CAVEAT if getattr(config, "cond_align", False) else None


LEGACY = {"abs_pos_embed": False, "prediction": "v", "cond_align": False, "cond_linear": False,
          "cond_whiten": None, "cond_local": False}

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
    ffn_multiple_of: int = 256  # SwiGLU hidden = 8/3 * hidden rounded up to this
    token_mode: str = "patch_only"  # "patch_only": T = g*g; "cls_patch": T = g*g + 1 (CLS first)
    rope_theta: float = 10000.0
    rope_axes: tuple[int, int, int] | None = None  # head_dim split (slot, row, col); None = auto
    abs_pos_embed: bool = True  # add P(pos) to target and condition tokens (see the docstring)
    prediction: str = "x"  # "x": the network predicts the clean target; "v": the velocity
    cond_align: bool = True  # add the condition token at the same grid position to the input
    cond_linear: bool = True  # full-width linear path from the aligned condition to x1 (needs "x")
    cond_mlp: int = 0  # > 0: hidden width of a per-token MLP beside the linear path (needs it)
    cond_whiten: float | None = 1.0  # shrinkage s of the aligned condition's whitening; None: off
    cond_local: bool = True  # add a 3x3 mix of its grid neighbours to the aligned condition
    tokens: int | None = None  # target tokens per sample: sizes the linear path's position bias
    dropout: float = 0.0  # on each block's attention and FFN branch output, in training only
    norm_eps: float = 1e-6
    grad_checkpointing: bool = False
    target_norm: float = 1.0  # mean L2 norm of raw target tokens; maps samples back to EVA scale
    extra: dict = field(default_factory=dict)  # free-form provenance (preset name, encoders...)

    def __post_init__(self) -> None:
        check_mode(self.token_mode)
        if self.hidden % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"hidden ({self.hidden}) must divide by n_heads ({self.n_heads}) and "
                             f"n_heads by n_kv_heads ({self.n_kv_heads})")
        if self.prediction not in flow.PREDICTIONS:
            raise ValueError(f"prediction must be one of {flow.PREDICTIONS}, got {self.prediction!r}")
        if self.cond_linear and self.prediction != "x":
            raise ValueError("cond_linear predicts the clean target: it needs prediction='x'")
        if self.cond_mlp and not self.cond_linear:
            raise ValueError("cond_mlp extends the linear path: it needs cond_linear=True")
        if not (self.cond_align or self.cond_linear):
            self.cond_whiten = None  # it whitens the aligned condition, which nothing reads then
        if self.cond_whiten is not None and self.cond_whiten <= 0:
            raise ValueError(f"cond_whiten (the shrinkage) must be > 0 or None, got {self.cond_whiten}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.rope_axes is None:
            slot = 2 * max(1, self.head_dim // 16)  # the slot axis only has positions 0 and 1
            row = (self.head_dim - slot) // 4 * 2
            self.rope_axes = (slot, row, self.head_dim - slot - row)
        self.rope_axes = tuple(self.rope_axes)
        if sum(self.rope_axes) != self.head_dim or any(a % 2 for a in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must be even and sum to {self.head_dim}")

    @property
    def fixed_tokens(self) -> int | None:
        """The token count every input must have (the linear path's per-position bias), or None."""
        return self.tokens if self.cond_linear and self.tokens else None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @property
    def ffn_dim(self) -> int:
        m = self.ffn_multiple_of
        return m * math.ceil(int(8 * self.hidden / 3) / m)

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
        data = {**LEGACY, **data}  # models saved before a field existed had none
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
    io += 2 * T * (cfg.cond_dim + cfg.target_dim) * cfg.cond_mlp
    io += 2 * T * cfg.cond_dim * 9 * cfg.cond_local
    io += 2 * T * cfg.cond_dim * cfg.cond_dim * (cfg.cond_whiten is not None)
    return float(cfg.depth * per_block + io)


# ---------------------------------------------------------------------------------------------
# 3D rotary position embedding


def token_positions(tokens: int, cls_first: bool, scale: float = 1.0) -> torch.Tensor:
    """(slot, row, col) per token [T, 3]: CLS -> (0, 0, 0), patch (r, c) -> (1, r*scale, c*scale).

    `scale` maps another grid onto the target grid, so the condition patch that covers the same
    image region as a target patch gets the same (row, col).
    """
    g = math.isqrt(tokens - int(cls_first))
    if g * g != tokens - int(cls_first):
        raise UserError(f"{tokens} tokens is not a square grid{' plus CLS' if cls_first else ''}")
    r, c = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    patches = torch.stack([torch.ones(g * g), r.flatten() * scale, c.flatten() * scale], dim=-1)
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


def add_neighbours(a: torch.Tensor, kernel: torch.Tensor, cls_first: bool) -> torch.Tensor:
    """a [B, T, D] + the 3x3 `kernel` convolved over the patch grid, the same kernel for every
    channel (zero padded); a CLS token passes unchanged."""
    n = int(cls_first)
    return torch.cat([a[:, :n], a[:, n:] + grid_conv(a[:, n:], kernel)], dim=1)


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
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.k_cond_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
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
        norm = lambda: nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)  # noqa: E731
        self.attn_norm1, self.attn_norm2, self.ffn_norm1, self.ffn_norm2 = norm(), norm(), norm(), norm()
        self.attn = Attention(cfg)
        self.ffn = SwiGLU(cfg.hidden, cfg.ffn_dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.ada_dim, 4 * cfg.hidden))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, c, ada, rope_x, rope_c):
        scale_attn, gate_attn, scale_ffn, gate_ffn = self.ada(ada).unsqueeze(1).chunk(4, dim=-1)
        h = self.attn(self.attn_norm1(x) * (1 + scale_attn), c, rope_x, rope_c)
        x = x + torch.tanh(gate_attn) * self.dropout(self.attn_norm2(h))
        h = self.ffn(self.ffn_norm1(x) * (1 + scale_ffn))
        return x + torch.tanh(gate_ffn) * self.dropout(self.ffn_norm2(h))


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
        if cfg.cond_mlp:
            self.cond_mlp = nn.Sequential(nn.Linear(cfg.cond_dim, cfg.cond_mlp), nn.GELU(),
                                          nn.Linear(cfg.cond_mlp, cfg.target_dim))
        if cfg.cond_local:
            self.local_mix = nn.Parameter(torch.zeros(3, 3))  # one kernel for every channel
            self.register_buffer("local_gate", torch.ones(()))  # 0: the mix is off (enable_local_mix)
        if cfg.cond_whiten is not None:  # statistics, not parameters: saved, never trained
            self.register_buffer("cond_mean", torch.zeros(cfg.cond_dim))
            self.register_buffer("cond_white", torch.eye(cfg.cond_dim))
        self.cond_norm = nn.RMSNorm(cfg.cond_dim, eps=cfg.norm_eps)
        self.cond_proj = nn.Linear(cfg.cond_dim, cfg.hidden)
        self.null_cond = nn.Parameter(torch.randn(cfg.hidden) * 0.02)  # CFG "no condition"
        self.t_embed = TimestepEmbedder(cfg.ada_dim)
        self.cond_pool = nn.Sequential(nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps),
                                       nn.Linear(cfg.hidden, cfg.ada_dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_norm = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps, elementwise_affine=False)
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
        # zero init: blocks start as identity, the output (velocity) starts at exactly zero
        # the linear path starts at zero too (or at least squares: init_linear_path)
        zero = [b.ada[-1] for b in self.blocks] + [self.final_ada[-1], self.out]
        if self.config.cond_mlp:
            zero.append(self.cond_mlp[-1])
        if self.config.cond_local:
            nn.init.zeros_(self.local_mix)
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
            ang = rope_angles(pos, cfg.rope_axes, cfg.rope_theta)
            embed = None
            if cfg.abs_pos_embed:  # the RoPE axis split, widened from one head to all of them
                axes = tuple(a * cfg.n_heads for a in cfg.rope_axes)
                embed = sincos_embedding(pos, axes, cfg.rope_theta).float().to(device)
            self._position_cache[key] = (ang.cos().float().to(device), ang.sin().float().to(device), embed)
        return self._position_cache[key]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        drop_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, D_target] at time t [B] (0 noise, 1 data), cond [B, Tc, D_cond] -> v."""
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
        if cfg.cond_mlp:
            y = y + self.cond_mlp(aligned)
        return flow.velocity_from_prediction(y, x, t, cfg.prediction)

    @torch.no_grad()
    def init_whitening(self, mean: torch.Tensor, matrix: torch.Tensor) -> None:
        """Set the aligned condition's whitening a_c = (RMSNorm(c) - mean) @ matrix
        (mean [D_cond], matrix [D_cond, D_cond]; e.g. `data.condition_whitening`)."""
        if self.config.cond_whiten is None:
            raise ValueError("init_whitening needs a model with cond_whiten set")
        self.cond_mean.copy_(mean)
        self.cond_white.copy_(matrix)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.config.cond_local:  # weights saved before the gate existed trained the mix
            state_dict.setdefault(prefix + "local_gate", torch.ones(()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def enable_local_mix(self, on: bool) -> None:
        """Switch the neighbour mix on or off (a saved gate, not a parameter). Off, the kernel
        gets no gradient and stays at its zero init: the model is the plain one."""
        if not self.config.cond_local:
            raise ValueError("enable_local_mix needs a model with cond_local=True")
        self.local_gate.fill_(float(on))

    @torch.no_grad()
    def init_linear_path(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Start the linear path at a fitted map x1 ~ RMSNorm(c) @ weight + bias, in the sampler's
        normalised target space (weight [D_cond, D_target], bias [tokens or 1, D_target]), e.g.
        the ridge baseline: the untrained model then samples exactly that map and the network
        starts from its residual. With whitening, the map is carried over to the whitened
        features (set the whitening first)."""
        if not self.config.cond_linear:
            raise ValueError("init_linear_path needs a model with cond_linear=True")
        weight, bias = weight.double(), bias.double()
        if self.config.cond_whiten is not None:  # x W + b = ((x - mu) A) (A^-1 W) + (mu W + b)
            bias = bias + self.cond_mean.double() @ weight
            weight = torch.linalg.solve(self.cond_white.double(), weight)
        self.linear_cond.weight.copy_(weight.T)
        self.linear_cond.bias.zero_()
        self.linear_bias.copy_(bias.to(self.linear_bias).expand_as(self.linear_bias))

    def aligned_condition(self, cond: torch.Tensor, tokens: int,
                          drop_cond: torch.Tensor | None = None) -> torch.Tensor | None:
        """RMS-normalised (and whitened) condition tokens on the target grid [B, T, D_cond]
        (zero where the condition is dropped), the input of `cond_align` and `cond_linear`;
        None without them."""
        if not (self.config.cond_align or self.config.cond_linear):
            return None
        a = align_condition(cond, tokens, has_cls(self.config.token_mode))
        a = F.rms_norm(a, (a.shape[-1],), eps=self.config.norm_eps)
        if self.config.cond_whiten is not None:
            a = (a - self.cond_mean.to(a.dtype)) @ self.cond_white.to(a.dtype)
        if self.config.cond_local:
            a = add_neighbours(a, self.local_mix * self.local_gate, has_cls(self.config.token_mode))
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
