"""Frozen vision encoders for extraction: registry, weights, preprocessing, grid pooling.

Every encoder gives [B, 1 + g*g, width] tokens: one summary token first (the class token;
SigLIP has none, so its attention-pool output stands in), then the g x g patch tokens in
row-major order. Pre-projection width, never the contrastive embedding. `token_source` picks the
layer: "final_norm" (default: after the final norm) or "last_block" (the last block's output
before the final norm, BLIP3-o's target). `image_size` runs an encoder at another resolution
than its native one (position embeddings resampled by timm / open_clip when weights load), e.g.
EVA02-E-14-plus at 448 px: a 32 x 32 grid.

Backends
    timm       EVA-CLIP (open_clip builds these as a timm trunk; we build the same trunk without
               the text tower and accept open_clip checkpoints, `visual.trunk.*`), DINOv2, SigLIP
    open_clip  OpenAI CLIP ViT-L-14 / ViT-L-14-336 (quick-gelu), open_clip's own VisionTransformer
    hf         BAAI EVA-CLIP-8B through transformers `trust_remote_code` from a local snapshot

Weights: "auto" (a local HF / open_clip cache if present, else random init with a loud
warning), "pretrained" (download), "random", or a path to a file / snapshot directory. A file
that does not fit the architecture is an `EncoderError` before any image is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eva_repro.utils.errors import UserError
from eva_repro.utils.files import sha256_file

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

WEIGHT_MODES = ("auto", "pretrained", "random")
TOKEN_SOURCES = ("final_norm", "last_block")
RESIZE = "shortest side to image_size (bicubic), center crop image_size x image_size"
# file names looked for in a cache snapshot or a weights directory, best first
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                "model.safetensors", "pytorch_model.bin")


class EncoderError(UserError):
    """Unknown encoder, unusable weights: one line naming the problem and the fix."""


class RandomInitWarning(UserWarning):
    """An encoder runs with random weights: its embeddings carry no meaning."""


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    backend: str  # "timm" | "open_clip" | "hf"
    arch: str  # timm model name, open_clip config name, or HF repo id
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hf_repos: tuple[str, ...] = ()  # where cached / downloadable weights live
    summary_token: str = "cls"  # "cls" | "map" (attention-pool output; the model has no CLS)
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def _eva(name: str, arch: str, size: int, repo: str) -> EncoderSpec:
    return EncoderSpec(name, "timm", arch, size, OPENAI_MEAN, OPENAI_STD, (repo,),
                       note="EVA-CLIP (open_clip config uses this timm trunk)")


REGISTRY: dict[str, EncoderSpec] = {s.name: s for s in (
    _eva("EVA02-L-14", "eva02_large_patch14_clip_224", 224,
         "timm/eva02_large_patch14_clip_224.merged2b_s4b_b131k"),
    _eva("EVA02-L-14-336", "eva02_large_patch14_clip_336", 336,
         "timm/eva02_large_patch14_clip_336.merged2b_s6b_b61k"),
    _eva("EVA02-E-14", "eva02_enormous_patch14_clip_224", 224,
         "timm/eva02_enormous_patch14_clip_224.laion2b_s4b_b115k"),
    _eva("EVA02-E-14-plus", "eva02_enormous_patch14_clip_224", 224,
         "timm/eva02_enormous_patch14_plus_clip_224.laion2b_s9b_b144k"),
    _eva("EVA01-g-14", "eva_giant_patch14_224", 224,
         "timm/eva_giant_patch14_clip_224.laion400m_s11b_b41k"),
    _eva("EVA02-B-16", "eva02_base_patch16_clip_224", 224,
         "timm/eva02_base_patch16_clip_224.merged2b_s8b_b131k"),
    EncoderSpec("EVA-CLIP-8B", "hf", "BAAI/EVA-CLIP-8B", 224, OPENAI_MEAN, OPENAI_STD,
                ("BAAI/EVA-CLIP-8B",), note="transformers trust_remote_code, local snapshot"),
    EncoderSpec("ViT-L-14", "open_clip", "ViT-L-14-quickgelu", 224, OPENAI_MEAN, OPENAI_STD,
                ("timm/vit_large_patch14_clip_224.openai",), note="OpenAI CLIP, quick-gelu"),
    EncoderSpec("ViT-L-14-336", "open_clip", "ViT-L-14-336-quickgelu", 336, OPENAI_MEAN,
                OPENAI_STD, ("timm/vit_large_patch14_clip_336.openai",),
                note="OpenAI CLIP, quick-gelu"),
    EncoderSpec("ViT-B-16", "open_clip", "ViT-B-16-quickgelu", 224, OPENAI_MEAN, OPENAI_STD,
                ("timm/vit_base_patch16_clip_224.openai",),
                note="OpenAI CLIP base, quick-gelu, 14x14 (small: smoke runs)"),
    EncoderSpec("DINOv2-L-14", "timm", "vit_large_patch14_dinov2", 224, IMAGENET_MEAN,
                IMAGENET_STD, ("timm/vit_large_patch14_dinov2.lvd142m",),
                timm_kwargs={"img_size": 224}, note="DINOv2 at 224 px (16x16)"),
    EncoderSpec("SigLIP-SO400M-14", "timm", "vit_so400m_patch14_siglip_224", 224, SIGLIP_MEAN,
                SIGLIP_STD, ("timm/vit_so400m_patch14_siglip_224.webli",
                             "timm/vit_so400m_patch14_siglip_224.v2_webli"),
                summary_token="map", note="SigLIP, no CLS: the MAP-pool output is token 0"),
)}
ALIASES = {"DINOv2": "DINOv2-L-14", "SigLIP": "SigLIP-SO400M-14"}


def list_encoders() -> list[str]:
    return list(REGISTRY)


def get_spec(name: str) -> EncoderSpec:
    spec = REGISTRY.get(ALIASES.get(name, name))
    if spec is None:
        raise EncoderError(f"unknown encoder {name!r}; choose one of: {', '.join(REGISTRY)}")
    return spec


# ---------------------------------------------------------------------------------------------
# preprocessing (the decode side runs in DataLoader workers, normalisation on the device)


def pool_grid(tokens: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, 1 + n*n, D] -> [B, 1 + grid*grid, D]: patches area-averaged, token 0 untouched.

    n divisible by grid (16 -> 8) is an exact k x k average; otherwise (24 -> 16) each output
    cell averages the input cells its area overlaps (adaptive average pooling).
    """
    b, t, d = tokens.shape
    n = math.isqrt(t - 1)
    if n * n != t - 1:
        raise ValueError(f"expected 1 + n*n tokens, got {t}")
    if grid == n:
        return tokens
    if grid > n:
        raise EncoderError(f"--grid {grid} is finer than the encoder's native {n}x{n} grid; "
                           f"use --grid {n} or smaller")
    patches = tokens[:, 1:].float().transpose(1, 2).reshape(b, d, n, n)
    pooled = F.adaptive_avg_pool2d(patches, grid).flatten(2).transpose(1, 2)
    return torch.cat([tokens[:, :1].float(), pooled], dim=1).to(tokens.dtype)


# ---------------------------------------------------------------------------------------------
# backends: each wraps a model and returns final-norm tokens [B, 1 + n*n, width]


class _TimmTokens(nn.Module):
    def __init__(self, model: nn.Module, summary_token: str):
        super().__init__()
        self.model = model
        self.summary_token = summary_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)  # after the final norm
        prefix = int(getattr(self.model, "num_prefix_tokens", 1))
        patches = feats[:, prefix:]
        # SigLIP has no CLS token: its attention-pool output is the summary token
        summary = (self.model.attn_pool(feats)[:, None] if self.summary_token == "map"
                   else feats[:, :1])
        return torch.cat([summary, patches], dim=1)


class _OpenClipTokens(nn.Module):
    def __init__(self, visual: nn.Module, final_norm: bool = True):
        super().__init__()
        self.visual = visual
        self.final_norm = final_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        tokens = v.transformer(v._embeds(x))
        return v.ln_post(tokens) if self.final_norm else tokens  # what open_clip pools


class _HFTokens(nn.Module):
    def __init__(self, vision: nn.Module, final_norm: bool = True):
        super().__init__()
        self.vision = vision
        self.final_norm = final_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vision.parameters()).dtype
        out = self.vision(pixel_values=x.to(dtype), return_dict=True)
        hidden = out.last_hidden_state
        # EVA-CLIP-8B (like HF CLIP) normalises only the pooled CLS; we want every token normed
        norm = getattr(self.vision, "post_layernorm", None) if self.final_norm else None
        return (norm(hidden) if norm is not None else hidden).float()


class FrozenEncoder(nn.Module):
    """A frozen encoder plus its preprocessing constants and provenance."""

    def __init__(self, spec: EncoderSpec, tokens: nn.Module, width: int, patch_size: int,
                 provenance: dict[str, Any], image_size: int | None = None):
        super().__init__()
        self.spec = spec
        self.tokens = tokens.eval().requires_grad_(False)
        self.width = width
        self.patch_size = patch_size
        self.image_size = image_size or spec.image_size
        self.native_grid = self.image_size // patch_size
        self.provenance = provenance
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, s, s] -> normalised float on this encoder's device."""
        x = pixels.to(self.mean.device, non_blocking=True).float().div_(255.0)
        return x.sub_(self.mean).div_(self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)


# ---------------------------------------------------------------------------------------------
# weights


_BLOCK = re.compile(r"^(blocks|transformer\.resblocks|encoder\.layers)\.(\d+)\.")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A weights file as a flat {name: tensor}; safetensors or torch.load(weights_only=True)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # each reader raises its own types; all mean "unusable file"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EncoderError(f"{path}: cannot read weights ({msg}); pass a .safetensors file or a "
                           "state_dict saved with torch.save (loadable with weights_only=True)"
                           ) from e
    for wrapper in ("state_dict", "model", "module"):  # common checkpoint nestings
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EncoderError(f"{path}: not a state_dict of tensors; save `model.state_dict()`")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _strip_prefixes(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict:
    for p in prefixes:  # keep only the vision part of a full CLIP checkpoint
        if any(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return sd


def _drop_blocks(sd: dict[str, torch.Tensor], depth: int | None) -> dict:
    if depth is None:
        return sd
    return {k: v for k, v in sd.items()
            if not ((m := _BLOCK.match(k)) and int(m.group(2)) >= depth)}


def _check_and_load(model: nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Load `sd` into `model`, or raise one line saying how they differ."""
    params = dict(model.named_parameters())
    expected = model.state_dict()
    missing = [k for k in params if k not in sd]  # buffers (e.g. rope tables) are recomputed
    unexpected = [k for k in sd if k not in expected]
    shape = [f"{k} {list(sd[k].shape)} vs {list(expected[k].shape)}"
             for k in sd if k in expected and sd[k].shape != expected[k].shape]
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("shape mismatches", shape)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise EncoderError(f"{what}: {'; '.join(parts)}")
    model.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)


def _dir_sha256(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return h.hexdigest()


@dataclass
class WeightsSource:
    kind: str  # "random" | "file" | "dir"
    path: Path | None = None
    origin: str = ""  # "file", "hf-cache", "pretrained"


def _weight_files(spec: EncoderSpec) -> tuple[str, ...]:
    # the same HF repos also hold timm-format files, which open_clip's ViT cannot load
    return WEIGHT_FILES[:2] if spec.backend == "open_clip" else WEIGHT_FILES


def _cached_file(spec: EncoderSpec) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for repo in spec.hf_repos:
        for name in _weight_files(spec):
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str) and Path(hit).exists():
                return Path(hit)
    return None


def _cached_snapshot(repo: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(repo, "config.json")
    return Path(hit).parent if isinstance(hit, str) else None


def _download(spec: EncoderSpec, flag: str) -> WeightsSource:
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if spec.backend == "hf":
            return WeightsSource("dir", Path(snapshot_download(spec.hf_repos[0])), "pretrained")
        errors = []
        for repo in spec.hf_repos:
            for name in _weight_files(spec):
                try:
                    return WeightsSource("file", Path(hf_hub_download(repo, name)), "pretrained")
                except Exception as e:  # not in this repo, or no network: try the next one
                    errors.append(f"{repo}/{name}: {type(e).__name__}")
        raise RuntimeError(errors[-1] if errors else "no repository known")
    except Exception as e:
        raise EncoderError(f"{spec.name}: could not download pretrained weights ({e}); without "
                           f"network pass {flag}_weights FILE, or auto/random") from e


def resolve_weights(spec: EncoderSpec, weights: str, flag: str = "--eva") -> WeightsSource:
    """Where this encoder's weights come from (no loading yet)."""
    if weights == "random":
        return WeightsSource("random")
    if weights == "pretrained":
        return _download(spec, flag)
    if weights == "auto":
        if spec.backend == "hf":
            snap = _cached_snapshot(spec.hf_repos[0])
            return WeightsSource("dir", snap, "hf-cache") if snap else WeightsSource("random")
        hit = _cached_file(spec)
        return WeightsSource("file", hit, "hf-cache") if hit else WeightsSource("random")
    path = Path(weights).expanduser()
    if not path.exists():
        raise EncoderError(f"{flag}_weights {weights}: no such file or directory; pass a weights "
                           "file, a snapshot directory, or one of auto/pretrained/random")
    if path.is_dir() and spec.backend != "hf":
        found = [path / n for n in _weight_files(spec) if (path / n).exists()]
        if not found:
            raise EncoderError(f"{path}: no weights file in this directory (looked for "
                               f"{', '.join(_weight_files(spec))}); pass the file itself")
        path = found[0]
    return WeightsSource("dir" if path.is_dir() else "file", path, "file")


def _warn_random(spec: EncoderSpec, flag: str, seed: int) -> None:
    msg = (f"{spec.name}: no local weights found, using RANDOM initialisation (seed {seed}); "
           f"the embeddings are meaningless for real use. Pass {flag}_weights pretrained, a "
           f"weights file, or {flag}_weights random to silence this.")
    print(f"\n{'!' * 80}\nWARNING: {msg}\n{'!' * 80}\n", file=sys.stderr, flush=True)
    warnings.warn(msg, RandomInitWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# load_encoder: the request checked, then one builder per backend


@dataclass(frozen=True)
class TowerRequest:
    """What `load_encoder` asks of a backend's builder, checked (`image_size` None: native)."""

    depth: int | None
    seed: int
    image_size: int | None
    token_source: str
    flag: str
    device: torch.device


@dataclass(frozen=True)
class Tower:
    """A built tower: the module returning its tokens, and what the provenance records of it."""

    tokens: nn.Module
    width: int
    patch_size: int
    image_size: int
    full_depth: int
    weights: dict[str, Any]  # the provenance's weights, weights_path, weights_sha256


def load_encoder(name: str, weights: str = "auto", *, depth: int | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", flag: str = "--eva",
                 image_size: int | None = None, token_source: str = "final_norm") -> FrozenEncoder:
    """Build a frozen encoder by registry name; `flag` only words the error messages.

    `image_size` (None: the encoder's own) and `token_source` (TOKEN_SOURCES): see the top."""
    spec = get_spec(name)
    request = _check_request(spec, TowerRequest(depth, seed, image_size, token_source, flag,
                                                torch.device(device)))
    src = resolve_weights(spec, weights, flag)
    if src.kind == "random" and weights == "auto" and spec.backend != "hf":
        _warn_random(spec, flag, seed)  # (the hf backend cannot run random: its builder errors)
    tower = BUILDERS[spec.backend](spec, src, request)
    return FrozenEncoder(spec, tower.tokens, tower.width, tower.patch_size,
                         _provenance(spec, tower, request), tower.image_size).to(request.device)


def _check_request(spec: EncoderSpec, request: TowerRequest) -> TowerRequest:
    """The checks that need no weights; an image size equal to the native one becomes None."""
    if request.depth is not None and request.depth < 1:
        raise EncoderError(f"--encoder_depth must be >= 1, got {request.depth}")
    if request.token_source not in TOKEN_SOURCES:
        raise EncoderError(f"{request.flag}_token_source must be one of {TOKEN_SOURCES}, got "
                           f"{request.token_source!r}")
    if request.image_size == spec.image_size:
        request = replace(request, image_size=None)
    if request.image_size is not None and spec.backend == "hf":
        raise EncoderError(f"{request.flag}_image_size: {spec.name} runs at its own "
                           f"{spec.image_size} px only; drop the flag")
    return request


def _provenance(spec: EncoderSpec, tower: Tower, request: TowerRequest) -> dict[str, Any]:
    """What the manifest records of an encoder: registry entry, weights, geometry, tokens."""
    layer = ("final-norm" if request.token_source == "final_norm" else
             "last-block (pre-final-norm, unnormalised)")
    summary = ("attention-pool (MAP) output, the model has no CLS" if spec.summary_token == "map"
               else "CLS")
    return {
        "name": spec.name, "backend": spec.backend, "arch": spec.arch,
        **tower.weights,
        "width": tower.width, "patch_size": tower.patch_size, "image_size": tower.image_size,
        "native_image_size": spec.image_size,
        "native_grid": tower.image_size // tower.patch_size,
        "token_source": request.token_source,
        "depth": request.depth or tower.full_depth, "full_depth": tower.full_depth,
        "truncated": request.depth is not None,
        "mean": list(spec.mean), "std": list(spec.std), "resize": RESIZE,
        "token_convention": f"{layer} tokens, pre-projection; token 0 = {summary}, then g*g "
                            "patches row-major",
    }


# ---------------------------------------------------------------------------------------------
# the steps the timm and open_clip builders share


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Random init from `seed`, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_depth(spec: EncoderSpec, depth: int | None, full: int) -> None:
    if depth is not None and depth > full:
        raise EncoderError(f"--encoder_depth {depth} exceeds {spec.name}'s {full} blocks")


def _check_image_size(spec: EncoderSpec, request: TowerRequest, patch: int) -> int:
    """The image size the tower runs at; refused before any weights are read when the patches
    do not tile it."""
    size = request.image_size or spec.image_size
    if size % patch or size < patch:
        raise EncoderError(f"{request.flag}_image_size {size} is not a multiple of {spec.name}'s "
                           f"{patch}-px patches; use e.g. {max(patch, size // patch * patch)}")
    return size


def _load_weights(model: nn.Module, spec: EncoderSpec, src: WeightsSource,
                  request: TowerRequest, full: int,
                  adapt: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
                  ) -> dict[str, Any]:
    """Load `src` into `model` (random init: nothing to load), `adapt` mapping the file's keys
    onto the model's; returns the provenance's weights entries."""
    if src.kind == "random":
        return {"weights": f"random-init, seed {request.seed}"}
    sd = adapt(read_state_dict(src.path))
    what = f"{src.path}: weights do not match {spec.name} ({spec.arch}, depth {request.depth or full})"
    _check_and_load(model, _drop_blocks(sd, request.depth),
                    what + f"; pass weights saved from this architecture or choose the matching "
                    f"{request.flag} model")
    return {"weights": src.origin, "weights_path": str(src.path),
            "weights_sha256": sha256_file(src.path)}


# ---------------------------------------------------------------------------------------------
# the builders


def _timm_tower(spec: EncoderSpec, src: WeightsSource, request: TowerRequest) -> Tower:
    """A timm model (EVA-CLIP, DINOv2, SigLIP); open_clip's `visual.trunk.*` files load too."""
    import timm

    full = None
    if request.depth is not None:
        with torch.device("meta"):  # architecture only, no memory or init time
            full = len(timm.create_model(spec.arch, pretrained=False, num_classes=0,
                                         **spec.timm_kwargs).blocks)
        _check_depth(spec, request.depth, full)
    kwargs = dict(spec.timm_kwargs)
    if request.depth is not None:
        kwargs["depth"] = request.depth
    if request.image_size is not None:
        kwargs["img_size"] = request.image_size
    with _seeded(request.seed):
        model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **kwargs)
    full = full or len(model.blocks)
    patch = int(model.patch_embed.patch_size[0])
    size = _check_image_size(spec, request, patch)
    weights = _load_weights(model, spec, src, request, full, lambda sd: _timm_keys(sd, model))
    if request.token_source == "last_block":  # after the weights: the norm's are loaded, unused
        model.norm = nn.Identity()
    return Tower(_TimmTokens(model, spec.summary_token), int(model.embed_dim), patch, size, full,
                 weights)


def _open_clip_tower(spec: EncoderSpec, src: WeightsSource, request: TowerRequest) -> Tower:
    """open_clip's own VisionTransformer (OpenAI CLIP), without the contrastive projection."""
    import open_clip
    from open_clip.model import _build_vision_tower

    cfg = open_clip.get_model_config(spec.arch)
    vision_cfg = dict(cfg["vision_cfg"])
    full = int(vision_cfg["layers"])
    _check_depth(spec, request.depth, full)
    if request.depth is not None:
        vision_cfg["layers"] = request.depth
    if request.image_size is not None:
        vision_cfg["image_size"] = request.image_size
    with _seeded(request.seed):
        visual = _build_vision_tower(cfg["embed_dim"], vision_cfg,
                                     quick_gelu=cfg.get("quick_gelu", False))
    visual.proj = None  # the contrastive projection is not part of the token output
    patch = int(visual.conv1.kernel_size[0])
    size = _check_image_size(spec, request, patch)
    weights = _load_weights(visual, spec, src, request, full,
                            lambda sd: _open_clip_keys(sd, visual, request.image_size is not None))
    tokens = _OpenClipTokens(visual, final_norm=request.token_source == "final_norm")
    return Tower(tokens, int(visual.conv1.out_channels), patch, size, full, weights)


def _hf_tower(spec: EncoderSpec, src: WeightsSource, request: TowerRequest) -> Tower:
    """transformers `trust_remote_code` from a local snapshot (EVA-CLIP-8B), at its own size."""
    vision, width, patch, full = _load_hf(spec, src, request.depth, request.device, request.flag)
    files = sorted(p for p in src.path.iterdir() if p.suffix in (".safetensors", ".bin"))
    weights = {"weights": src.origin, "weights_path": str(src.path),
               "weights_sha256": _dir_sha256(files)}
    tokens = _HFTokens(vision, final_norm=request.token_source == "final_norm")
    return Tower(tokens, width, patch, spec.image_size, full, weights)


BUILDERS: dict[str, Callable[[EncoderSpec, WeightsSource, TowerRequest], Tower]] = {
    "timm": _timm_tower, "open_clip": _open_clip_tower, "hf": _hf_tower}


def _load_hf(spec: EncoderSpec, src: WeightsSource, depth: int | None, device: torch.device,
             flag: str) -> tuple[nn.Module, int, int, int]:
    if src.kind != "dir":
        raise EncoderError(f"{spec.name} needs its model code: pass {flag}_weights DIR, a local "
                           f"snapshot of {spec.arch} (config.json, modeling files, weights)")
    try:
        from transformers import AutoModel

        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:
            model = AutoModel.from_pretrained(str(src.path), trust_remote_code=True, dtype=dtype)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModel.from_pretrained(str(src.path), trust_remote_code=True,
                                              torch_dtype=dtype)
    except ImportError as e:
        raise EncoderError(f"{spec.name} needs transformers: pip install 'eva-repro[hf]'") from e
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EncoderError(f"{src.path}: cannot load {spec.name} with transformers ({msg})") from e
    vision = getattr(model, "vision_model", model)
    layers = vision.encoder.layers
    full = len(layers)
    if depth is not None:
        vision.encoder.layers = layers[:depth]
    cfg = getattr(vision, "config", None) or model.config
    cfg = getattr(cfg, "vision_config", cfg)
    return vision, int(cfg.hidden_size), int(cfg.patch_size), full


# ---------------------------------------------------------------------------------------------
# state-dict surgery: a weights file's keys onto the built tower's


def _timm_keys(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """An open_clip (`visual.trunk.*`) or timm file as this timm model's keys, without a head."""
    sd = _timm_filter(_strip_prefixes(sd, ("visual.", "trunk.")), model)
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "head_drop."))}


def _open_clip_keys(sd: dict[str, torch.Tensor], visual: nn.Module,
                    resized: bool) -> dict[str, torch.Tensor]:
    """A full CLIP or a vision-tower file as this tower's keys, without the projection;
    `resized`: the tower runs at another image size (position embeddings resampled)."""
    sd = {k: v for k, v in _strip_prefixes(sd, ("visual.",)).items() if k != "proj"}
    return _open_clip_resize(sd, visual) if resized else sd


def _open_clip_resize(sd: dict[str, torch.Tensor], visual: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip's own position-embedding resampling, for a tower built at another image size."""
    from types import SimpleNamespace

    from open_clip.model import resize_pos_embed

    prefixed = {f"visual.{k}": v for k, v in sd.items()}
    resize_pos_embed(prefixed, SimpleNamespace(visual=visual))
    return {k.removeprefix("visual."): v for k, v in prefixed.items()}


def _timm_filter(sd: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's own checkpoint filter for the model family: original-format keys, pos-embed
    resampling (e.g. DINOv2's 518-px table to 224 px)."""
    fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if fn is None:
        return sd
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            return fn(sd, model)  # some filters print per key
    except Exception:  # the strict key check afterwards reports the mismatch in one line
        return sd
