"""Bring your own DiT: `--backbone package.module:factory` or `--backbone path/to/file.py:factory`.

The factory is called as `factory(target_dim=, cond_dim=, tokens=, **hints)` and returns an
`nn.Module`; `hints` are the size fields of the chosen preset and `--model_override`s (`hidden`,
`depth`, `n_heads`, ...), which a factory may use or ignore (it should take `**kwargs`).

    forward(x_t [B, T, D_target], t [B], cond [B, Tc, D_cond][, drop_cond [B] bool]) -> [B, T, D_target]

in eva-repro's convention (t = 0 noise, t = 1 data, x_t = (1 - t) x0 + t x1), returning the
velocity v = x1 - x0, or the clean target x1 when the module declares `prediction = "x"`.
The wrapper returns that raw prediction as it is and declares its type (`config.prediction`);
`transport.velocity` maps it, the one place. Optional, used when present:

    drop_cond           a forward argument: True rows take the network's own null condition
                        (classifier-free guidance); without it, a dropped condition is zeros
    prediction          "v" (default) or "x"
    blocks              an nn.ModuleList of transformer blocks (FSDP2 shards each)
    noise_unconditional True: the design does not read t ("Is Noise Conditioning Necessary for
                        Denoising Generative Models?", 2025); `check` then does not ask for t
    condition_as_set    True: the design reads the condition without its positions (diffusers'
                        Lumina-Next); `check` then reports the grid checks as not applicable

The run stores the import path and the factory's arguments in config.json, so `evaluate`,
`sample`, `--resume` and torchrun (DDP / FSDP2) rebuild the same network; weights are the
wrapper's state dict in model.safetensors.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from eva_repro.data.layout import check_mode
from eva_repro.flow import transport
from eva_repro.utils.errors import UserError
from eva_repro.utils.files import (
    MODEL_FIX,
    atomic_save_safetensors,
    atomic_write_json,
    load_safetensors,
    read_json_object,
)

ARCHITECTURE = "eva-repro-plugin"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


OVERRIDE_HELP = ("a plugin model only: rebuild its network from this import path instead of the "
                 "one its run recorded (the file or package moved)")


class PluginError(UserError):
    """A backbone import path that cannot be imported, called or used (one line, names it)."""


def is_plugin_spec(backbone: str) -> bool:
    """`module:factory` or `file.py:factory` (the built-in backbones are plain names)."""
    return ":" in backbone


def resolve_spec(spec: str) -> str:
    """A file spec with its path made absolute (so a run rebuilds it from any directory)."""
    target, _, factory = spec.rpartition(":")
    if target.endswith(".py"):
        return f"{Path(target).resolve()}:{factory}"
    return spec


def import_factory(spec: str):
    """The factory callable named by `spec`, or a PluginError naming the spec and the fix."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise PluginError(f"--backbone {spec!r}: expected package.module:factory or "
                          "path/to/file.py:factory")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise PluginError(f"--backbone {spec!r}: no file {path} (moved? give its new "
                                  f"path: --backbone NEW/PATH.py:{name})")
            module_name = f"eva_repro_plugin_{abs(hash(str(path.resolve())))}"
            module = sys.modules.get(module_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[module_name] = module  # dataclasses and pickling look modules up
                try:
                    loader_spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(module_name, None)
                    raise
        else:
            module = importlib.import_module(target)
    except PluginError:
        raise
    except Exception as e:  # the user's module failed to import: say which, and why
        raise PluginError(f"--backbone {spec!r}: cannot import {target}: "
                          f"{type(e).__name__}: {e}") from e
    factory = getattr(module, name, None)
    if not callable(factory):
        raise PluginError(f"--backbone {spec!r}: {target} has no callable {name!r}")
    return factory


def _accepts(fn, name: str) -> bool:
    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@dataclass
class PluginConfig:
    """A plugin network's config: what the host needs (dims, layout, target scale) plus the
    import path and the factory's arguments, enough to rebuild it."""

    backbone: str  # the import path, file specs absolute
    target_dim: int
    cond_dim: int
    tokens: int | None = None
    token_mode: str = "patch_only"
    target_norm: float = 1.0
    hints: dict[str, Any] = field(default_factory=dict)  # the factory's other keyword arguments
    prediction: str = "v"  # read from the module it built
    noise_unconditional: bool = False
    condition_as_set: bool = False
    extra: dict = field(default_factory=dict)
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_mode(self.token_mode)

    def factory_kwargs(self) -> dict[str, Any]:
        return {**self.hints, "target_dim": self.target_dim, "cond_dim": self.cond_dim,
                "tokens": self.tokens}

    def to_dict(self) -> dict:
        return {"architecture": ARCHITECTURE, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> PluginConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class PluginModel(nn.Module):
    """eva-repro's model interface (forward(x, t, cond, drop_cond) -> the raw prediction,
    config with its `prediction` type, save/load, blocks) around the network a factory
    returned, held as `.net`."""

    def __init__(self, config: PluginConfig):
        super().__init__()
        factory = import_factory(config.backbone)
        try:
            net = factory(**config.factory_kwargs())
        except Exception as e:
            raise PluginError(f"--backbone {config.backbone!r}: the factory raised "
                              f"{type(e).__name__}: {e}") from e
        if not isinstance(net, nn.Module):
            raise PluginError(f"--backbone {config.backbone!r}: the factory returned "
                              f"{type(net).__name__}, not a torch.nn.Module")
        try:
            inspect.signature(net.forward).bind(None, None, None)
        except TypeError as e:
            raise PluginError(f"--backbone {config.backbone!r}: {type(net).__name__}.forward must "
                              f"take (x_t, t, cond[, drop_cond]): {e}") from e
        config.prediction = getattr(net, "prediction", "v")
        if config.prediction not in transport.PREDICTIONS:
            raise PluginError(f"--backbone {config.backbone!r}: prediction {config.prediction!r} "
                              f"is none of {transport.PREDICTIONS}")
        config.noise_unconditional = bool(getattr(net, "noise_unconditional", False))
        config.condition_as_set = bool(getattr(net, "condition_as_set", False))
        self.config, self.net = config, net
        self._takes_drop = _accepts(net.forward, "drop_cond")

    @property
    def blocks(self) -> nn.ModuleList:
        """The network's transformer blocks (FSDP2 shards each); none declared: no blocks."""
        return getattr(self.net, "blocks", nn.ModuleList())

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def extra_repr(self) -> str:
        return f"params={self.num_parameters() / 1e6:.2f}M, backbone={self.config.backbone}"

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                drop_cond: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D_target] at time t [B] (0 noise, 1 data), cond [B, Tc, D_cond] -> the
        network's raw prediction (`config.prediction`)."""
        if drop_cond is not None and self._takes_drop:
            y = self.net(x, t, cond, drop_cond=drop_cond)
        else:
            if drop_cond is not None:  # the network has no null condition of its own
                cond = torch.where(drop_cond.view(-1, 1, 1), 0.0, cond)
            y = self.net(x, t, cond)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise PluginError(f"--backbone {self.config.backbone!r}: forward returned {got} for "
                              f"x_t of shape {tuple(x.shape)}; it must return the same shape")
        return y

    # -- persistence: config.json (import path + arguments) + model.safetensors ---------------

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_save_safetensors(state, directory / WEIGHTS_FILE, {"architecture": ARCHITECTURE})
        atomic_write_json(directory / CONFIG_FILE, self.config.to_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu",
                        backbone: str | None = None) -> PluginModel:
        """The saved network, rebuilt from its recorded import path (or `backbone`)."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.exists() or not weights_path.exists():
            raise PluginError(f"{directory}: not a saved plugin model (needs {CONFIG_FILE} and "
                              f"{WEIGHTS_FILE})")
        model = cls(PluginConfig.from_dict(with_backbone(read_json_object(config_path, MODEL_FIX),
                                                         backbone, config_path)))
        state = load_safetensors(weights_path, MODEL_FIX, map_location)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise PluginError(f"{weights_path}: weights do not fit the network {model.config.backbone} "
                              f"builds from {config_path}: {e}") from e
        return model.to(map_location)


def with_backbone(saved: dict, backbone: str | None, where: Any) -> dict:
    """A saved config with its import path replaced by `backbone` (None: as saved)."""
    if backbone is None:
        return saved
    if saved.get("architecture") != ARCHITECTURE:
        raise PluginError(f"{where}: --backbone rebuilds a plugin model, but this one is "
                          f"{saved.get('architecture')!r}; drop --backbone")
    return {**saved, "backbone": resolve_spec(backbone)}


def plugin_config(spec: str, target_dim: int, cond_dim: int, tokens: int | None = None,
                  token_mode: str = "patch_only", target_norm: float = 1.0,
                  hints: dict[str, Any] | None = None, grad_checkpointing: bool = False,
                  extra: dict | None = None) -> PluginConfig:
    if grad_checkpointing:
        raise PluginError(f"--backbone {spec!r}: --grad_checkpointing is for the built-in "
                          "backbones; a plugin recomputes activations itself if it wants to")
    if tokens is not None and math.isqrt(tokens) ** 2 != tokens and token_mode == "patch_only":
        raise PluginError(f"--backbone {spec!r}: {tokens} patch tokens are no square grid")
    return PluginConfig(resolve_spec(spec), target_dim, cond_dim, tokens, token_mode, target_norm,
                        dict(hints or {}), extra=dict(extra or {}))
