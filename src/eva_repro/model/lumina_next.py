"""diffusers' `LuminaNextDiT2DModel` (BLIP3-o's head) as an eva-repro backbone, in one file.

    x_t [B, T, D_target], t [B], c [B, Tc, D_cond]  ->  v [B, T, D_target] (prediction "v")

    image  = x_t as a (D_target, g, g) latent image, g = sqrt(T)    patch_size 1: one token a cell
    v      = LuminaNextDiT2DModel(image, timestep=t, encoder_hidden_states=c,
                                  encoder_mask=1, image_rotary_emb=2D RoPE)  ->  [B, T, D_target]
    c      = 0 where the condition is dropped                  BLIP3-o's null condition (CFG)

Time convention, the one place it is mapped: eva-repro's t (0 noise, 1 data) is what Lumina-Next's
network takes as `timestep`, and its output is the velocity x1 - x0 that eva-repro's sampler
integrates. BLIP3-o drives the same network from diffusers' FlowMatchEulerDiscreteScheduler,
whose sigma runs the other way (1 noise): it passes `timestep = 1 - sigma` and negates the
output (`-model_pred`) to get the scheduler's noise-minus-data direction; both reduce to ours.

The network is diffusers' own class, unchanged and at its own initialisation (what BLIP3-o trains
from): `learn_sigma=False`, `cross_attention_dim = D_cond` (its key/value projections and the
caption embedder take the condition width to the hidden width), all-ones masks. The exported
model directory holds it as a diffusers model directory (`transformer/`, whose config.json names
`LuminaNextDiT2DModel`), loadable with `LuminaNextDiT2DModel.from_pretrained` alone.

diffusers is an optional extra (`pip install eva-repro[diffusers]`), imported only when this
backbone is built.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn as nn

from eva_repro.model.dit import PRESETS as DIT_PRESETS
from eva_repro.utils.errors import UserError
from eva_repro.utils.files import MODEL_FIX, atomic_write_json, read_json_object

ARCHITECTURE = "diffusers-lumina-next"
CONFIG_FILE, SUBFOLDER = "config.json", "transformer"
INSTALL_HINT = "pip install 'eva-repro[diffusers]' (or: pip install diffusers)"

# eva-repro's preset sizes (so the backbones compare at equal width, depth and heads), and
# BLIP3-o's head: EVA-CLIP-E width 1792, 24 layers, 28 heads, no grouped kv.
PRESETS = {**DIT_PRESETS, "blip3o": dict(hidden=1792, depth=24, n_heads=28, n_kv_heads=28)}


class LuminaNextConfigError(UserError):
    """A configuration the diffusers Lumina-Next network cannot take."""


@dataclass
class LuminaNextConfig:
    target_dim: int = 1792  # EVA-CLIP token width = the latent image's channels
    cond_dim: int = 1024  # condition token width = cross_attention_dim
    hidden: int = 384
    depth: int = 6
    n_heads: int = 6
    n_kv_heads: int = 2
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5
    qk_norm: bool = True
    token_mode: str = "patch_only"  # the 2D latent grid has no CLS slot
    tokens: int | None = None  # target tokens per sample (a square grid), when known
    target_norm: float = 1.0  # mean L2 norm of raw target tokens; maps samples back to EVA scale
    grad_checkpointing: bool = False
    extra: dict = field(default_factory=dict)
    # fixed by the design, read by `flow.transport.velocity`, the evaluator and the sampler like DiTConfig's
    prediction = "v"

    def __post_init__(self) -> None:
        problems = []
        if self.token_mode != "patch_only":
            problems.append("the Lumina-Next backbone has no CLS slot in its 2D latent grid: train "
                            "with --training_mode patch_only")
        if self.hidden % self.n_heads or self.n_heads % self.n_kv_heads:
            problems.append(f"hidden ({self.hidden}) must divide by n_heads ({self.n_heads}) and "
                            f"n_heads by n_kv_heads ({self.n_kv_heads})")
        elif self.head_dim % 4:
            problems.append(f"head_dim {self.head_dim} (hidden / n_heads) must divide by 4 for "
                            "Lumina-Next's 2D RoPE")
        if self.tokens is not None and math.isqrt(self.tokens) ** 2 != self.tokens:
            problems.append(f"{self.tokens} tokens are no square grid, which the 2D latent needs")
        if self.grad_checkpointing:
            problems.append("diffusers' LuminaNextDiT2DModel has no gradient checkpointing: drop "
                            "--grad_checkpointing or use --backbone next-dit")
        if problems:
            raise LuminaNextConfigError("lumina-next backbone: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads

    @classmethod
    def preset(cls, name: str, **overrides) -> LuminaNextConfig:
        if name not in PRESETS:
            raise LuminaNextConfigError(f"unknown lumina-next preset {name!r}; choose one of "
                                        f"{sorted(PRESETS)}")
        return cls(**{**PRESETS[name], "extra": {"preset": name}, **overrides})

    def to_dict(self) -> dict:
        return {"architecture": ARCHITECTURE, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> LuminaNextConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def diffusers_kwargs(self) -> dict:
        """The LuminaNextDiT2DModel constructor arguments for this config."""
        return dict(sample_size=math.isqrt(self.tokens or 64), patch_size=1,
                    in_channels=self.target_dim, hidden_size=self.hidden, num_layers=self.depth,
                    num_attention_heads=self.n_heads, num_kv_heads=self.n_kv_heads,
                    multiple_of=self.ffn_multiple_of, norm_eps=self.norm_eps, learn_sigma=False,
                    qk_norm=self.qk_norm, cross_attention_dim=self.cond_dim)


def import_diffusers_model():
    try:
        from diffusers import LuminaNextDiT2DModel
    except ImportError as e:
        raise LuminaNextConfigError(f"the lumina-next backbone needs diffusers ({e}): "
                                    f"{INSTALL_HINT}") from e
    return LuminaNextDiT2DModel


class LuminaNextDiT(nn.Module):
    """eva-repro's model interface (forward(x, t, cond, drop_cond), config, save/load) around an
    unmodified diffusers LuminaNextDiT2DModel, held as `.net`."""

    # its condition keys carry no position (diffusers' design): `eva-repro check` reports the
    # grid checks as not applicable instead of failing them
    condition_as_set = True

    def __init__(self, config: LuminaNextConfig, net: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.net = net if net is not None else import_diffusers_model()(**config.diffusers_kwargs())
        with torch.no_grad():  # allocated with torch.empty and never read at patch_size 1
            self.net.pad_token.zero_()
        self.net.pad_token.requires_grad_(False)  # DDP needs every trainable parameter used
        self._rope_cache: dict[tuple, torch.Tensor] = {}

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks (FSDP2 shards each)."""
        return self.net.layers

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def extra_repr(self) -> str:
        c = self.config
        return (f"params={self.num_parameters() / 1e6:.2f}M, hidden={c.hidden}, depth={c.depth}, "
                f"heads={c.n_heads}/{c.n_kv_heads}kv (diffusers LuminaNextDiT2DModel)")

    def rotary(self, grid: int, device: torch.device) -> torch.Tensor:
        """Lumina-Next's 2D RoPE table (complex, [grid, grid, head_dim / 2]), as BLIP3-o builds it."""
        key = (grid, str(device), torch.is_inference_mode_enabled())
        if key not in self._rope_cache:
            from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

            self._rope_cache[key] = get_2d_rotary_pos_embed_lumina(
                self.config.head_dim, grid, grid).to(device)
        return self._rope_cache[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D_target] at time t [B] (0 noise, 1 data), cond [B, Tc, D_cond] -> v, the
        network's raw prediction (`config.prediction` "v": nothing to map)."""
        B, T, D = x.shape
        g = math.isqrt(T)
        if g * g != T:
            raise LuminaNextConfigError(f"lumina-next backbone: {T} tokens are no square grid")
        if drop_cond is not None:  # BLIP3-o's classifier-free guidance: a zero condition
            cond = torch.where(drop_cond.view(-1, 1, 1), 0.0, cond)
        image = x.transpose(1, 2).reshape(B, D, g, g)
        mask = torch.ones(cond.shape[:2], dtype=torch.int32, device=cond.device)
        out = self.net(hidden_states=image, timestep=t.to(x.dtype), encoder_hidden_states=cond,
                       encoder_mask=mask, image_rotary_emb=self.rotary(g, x.device),
                       cross_attention_kwargs={}, return_dict=False)[0]
        return out.reshape(B, D, T).transpose(1, 2)

    # -- persistence: our config.json + the diffusers model directory in transformer/ ----------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """<dir>/config.json (eva-repro's) and <dir>/transformer/ (diffusers' save_pretrained),
        the subfolder written to a temporary name first and renamed into place."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp, final = directory / f".{SUBFOLDER}.tmp{os.getpid()}", directory / SUBFOLDER
        shutil.rmtree(tmp, ignore_errors=True)
        self.net.save_pretrained(tmp, safe_serialization=True)
        old = directory / f".{SUBFOLDER}.old{os.getpid()}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        atomic_write_json(directory / CONFIG_FILE, {**self.config.to_dict(), "subfolder": SUBFOLDER})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu") -> LuminaNextDiT:
        directory = Path(directory)
        config_path = directory / CONFIG_FILE
        if not config_path.exists() or not (directory / SUBFOLDER / CONFIG_FILE).exists():
            raise LuminaNextConfigError(f"{directory}: not a saved lumina-next model (needs "
                                        f"{CONFIG_FILE} and {SUBFOLDER}/); pass the directory "
                                        "written by save_pretrained")
        config = LuminaNextConfig.from_dict(read_json_object(config_path, MODEL_FIX))
        net = import_diffusers_model().from_pretrained(directory / SUBFOLDER,
                                                       low_cpu_mem_usage=False)
        return cls(config, net).to(map_location)
