"""What `eva-repro train` takes: TrainConfig (with flow.FlowConfig inside), its checks that need no
data, the per-preset defaults, and the command-line flags derived from it."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from eva_repro import flow
from eva_repro.errors import UserError
from eva_repro.layout import TOKEN_MODES, mode_of
from eva_repro.shards import Manifest

OVERFIT_DEFAULT_STEPS = 300
# Peak AdamW learning rate per preset when --learning_rate is not given: roughly 1/width, the
# usual transformer practice (wider models need smaller steps). The tiny preset's was measured
# (README, "Learning"): 3e-3 beat 1e-3 on held-out cosine at 300 steps; the others are not retuned.
DEFAULT_LR = {"tiny": 3e-3, "small": 6e-4, "base": 3e-4, "large": 2e-4, "blip3o": 1e-4}
OVERFIT_BAR = 0.8  # the seed's sanity bar for the sampled cosine in overfit mode


class TrainingError(UserError):
    """A training setup that cannot run (bad flags, data that does not fit the model)."""


LINEAR_INITS = ("zero", "ridge")  # how the head's linear path starts


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    data_dir: str = ""
    output_dir: str = ""
    backbone: str = "next-dit"  # next-dit (model/dit.py) | lumina-next (diffusers, BLIP3-o's head)
    model_size: str = "base"
    model_variant: str = "eva-repro"  # next-dit: eva-repro | lumina-next (pure BLIP3-o block)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # config fields over the preset
    linear_init: str = "zero"  # zero | ridge: how the head's linear path starts (measured)
    training_mode: str = "auto"  # auto (from the manifest) | patch_only | cls_patch
    # batches and length
    batch_size: int = 8  # per rank and micro-batch
    grad_accum: int = 1
    num_epochs: float = 10.0
    max_steps: int | None = None  # overrides num_epochs
    # optimiser and schedule
    learning_rate: float | None = None  # None: DEFAULT_LR of the preset
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int | None = None  # None: 5% of the steps, at most 1000
    weight_decay: float = 0.01  # matrices only; norms, biases, gates and the null condition: 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # ramped in as min(decay, (1 + step) / (10 + step))
    flow: flow.FlowConfig = field(default_factory=flow.FlowConfig)  # time draws, CFG dropout
    # data
    eval_fraction: float = 0.05
    max_samples: int | None = None
    overfit_test_size: int = 0
    num_workers: int = 2
    verify_checksums: bool = True
    # evaluation
    eval_every: int = 1000
    eval_samples: int = 64  # held-out samples drawn by the sampler at each evaluation
    eval_sampler_steps: int = 20
    eval_method: str = "heun"
    # checkpoints and logging
    save_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    resume: str | None = None  # None | "auto" | path
    tensorboard: bool = True
    progress: bool = True
    # system
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    fsdp: bool = False
    debug_mode: bool = False
    max_nonfinite_steps: int = 10  # consecutive non-finite steps before the run stops

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Flat options (as on the command line: time_mean=...) or a nested "flow" dict."""
        data = dict(data)
        flow_keys = {f.name for f in fields(flow.FlowConfig)}
        nested = data.pop("flow", None)
        flow_values = {**(asdict(nested) if isinstance(nested, flow.FlowConfig) else nested or {}),
                       **{k: data.pop(k) for k in flow_keys & set(data)}}
        unknown = sorted(set(data) - {f.name for f in fields(cls)}) + sorted(set(flow_values) - flow_keys)
        if unknown:
            raise TrainingError(f"unknown training options {unknown}")
        return cls(**data, flow=flow.FlowConfig(**flow_values))


def validate_config(cfg: TrainConfig) -> None:
    """Flag problems that need no data, before anything heavy happens."""
    from eva_repro.model import BACKBONES, VARIANTS, backbones

    lumina = cfg.backbone == "lumina-next"
    sizes = backbones.presets(cfg.backbone) if cfg.backbone in BACKBONES else []
    checks = [
        (cfg.backbone in BACKBONES, f"unknown --backbone {cfg.backbone!r}; choose one of {BACKBONES}"),
        (bool(cfg.data_dir), "--data_dir (or --chunked_embeddings_dir) is required"),
        (bool(cfg.output_dir), "--output_dir is required"),
        (cfg.model_variant in VARIANTS, f"unknown --model_variant {cfg.model_variant!r}; choose "
                                        f"one of {sorted(VARIANTS)}"),
        (cfg.model_size in sizes, f"unknown --model_size {cfg.model_size!r} for --backbone "
                                  f"{cfg.backbone}; choose one of {sizes}"),
        (not lumina or cfg.model_variant == "eva-repro",
         "--model_variant picks a next-dit head; --backbone lumina-next is diffusers' own network"),
        (not lumina or cfg.linear_init == "zero",
         "--linear_init ridge needs the next-dit backbone's linear path; lumina-next has none"),
        (cfg.training_mode in ("auto", *TOKEN_MODES),
         f"--training_mode must be auto, patch_only or cls_patch, got {cfg.training_mode!r}"),
        (cfg.batch_size >= 1, f"--batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.grad_accum >= 1, f"--grad_accum must be >= 1, got {cfg.grad_accum}"),
        (cfg.max_steps is None or cfg.max_steps >= 1, f"--max_steps must be >= 1, got {cfg.max_steps}"),
        (cfg.num_epochs > 0, f"--num_epochs must be > 0, got {cfg.num_epochs}"),
        (cfg.learning_rate is None or cfg.learning_rate > 0,
         f"--learning_rate must be > 0, got {cfg.learning_rate}"),
        (0 <= cfg.ema_decay < 1, f"--ema_decay must be in [0, 1), got {cfg.ema_decay}"),
        (cfg.linear_init in LINEAR_INITS, f"--linear_init must be one of {LINEAR_INITS}"),
        (cfg.flow.time_scheme in flow.TIME_SCHEMES,
         f"--time_scheme must be one of {flow.TIME_SCHEMES}"),
        (cfg.flow.loss_weight in flow.LOSS_WEIGHTS,
         f"--loss_weight must be one of {flow.LOSS_WEIGHTS}"),
        (cfg.eval_method in flow.METHODS, f"--eval_method must be one of {flow.METHODS}"),
        (cfg.overfit_test_size >= 0, "--overfit_test_size must be >= 0"),
        (min(cfg.log_every, cfg.save_every, cfg.eval_every) >= 1,
         "--log_every, --save_every and --eval_every must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)


# ---------------------------------------------------------------------------------------------
# command line


def configure_parser(p: argparse.ArgumentParser) -> None:
    c = TrainConfig()
    a = p.add_argument
    a("--data_dir", "--chunked_embeddings_dir", dest="data_dir", required=True,
      help="shard directory (eva-repro extract / synth output)")
    a("--output_dir", required=True, help="run directory: checkpoints, logs, model/, summary.json")
    from eva_repro.model import BACKBONES, VARIANTS

    a("--backbone", default=c.backbone, choices=list(BACKBONES),
      help="next-dit: eva-repro's Next-DiT (model/dit.py); lumina-next: diffusers' "
           "LuminaNextDiT2DModel, BLIP3-o's head (needs the diffusers extra)")
    a("--model_size", default=c.model_size,
      help="preset: tiny, small, base, large (both backbones); blip3o (lumina-next: 1792 wide, "
           "24 layers, 28 heads)")

    a("--model_variant", default=c.model_variant, choices=list(VARIANTS),
      help="the head's conditioning and prediction: eva-repro (aligned condition, x-prediction, "
           "linear path) or lumina-next (the pure BLIP3-o head: cross-attention, v-prediction)")
    a("--model_override", dest="model_overrides", action="append", default=[], metavar="KEY=VALUE",
      help="override a config field of the preset, e.g. depth=2 (repeatable; JSON values)")
    a("--linear_init", default=c.linear_init, choices=list(LINEAR_INITS),
      help="eva-repro head: start its linear path at zero (default: best on the synthetic "
           "sets) or at the ridge fit of the training split (starts at ridge; better on small "
           "real-photo sets, see README Learning)")
    a("--training_mode", default=c.training_mode, choices=["auto", *TOKEN_MODES],
      help="token layout; auto follows the shards (patch_only on CLS shards drops the CLS token)")
    a("--batch_size", type=int, default=c.batch_size, help="per rank and micro-batch")
    a("--grad_accum", "--gradient_accumulation_steps", dest="grad_accum", type=int,
      default=c.grad_accum)
    a("--num_epochs", type=float, default=c.num_epochs)
    a("--max_steps", type=int, default=None, help="optimiser steps (overrides --num_epochs)")
    a("--learning_rate", "--lr", dest="learning_rate", type=float, default=None,
      help=f"peak learning rate (default per preset: {DEFAULT_LR})")
    a("--min_lr_ratio", type=float, default=c.min_lr_ratio, help="cosine floor / learning rate")
    a("--warmup_steps", type=int, default=None, help="default: 5%% of the steps, at most 1000")
    a("--weight_decay", type=float, default=c.weight_decay)
    a("--adam_beta1", type=float, default=c.adam_beta1)
    a("--adam_beta2", type=float, default=c.adam_beta2)
    a("--grad_clip", type=float, default=c.grad_clip)
    a("--ema_decay", type=float, default=c.ema_decay)
    add_dataclass_flags(p.add_argument_group("flow (flow.FlowConfig)"), c.flow,
                        choices={"time_scheme": flow.TIME_SCHEMES,
                                 "loss_weight": flow.LOSS_WEIGHTS})
    a("--eval_fraction", type=float, default=c.eval_fraction)
    a("--max_samples", type=int, default=None, help="use only the first N samples (quick runs)")
    a("--overfit_test_size", type=int, default=0,
      help="train on N fixed samples (default 300 steps); summary overfit_cosine (sampled, on "
           "those samples, at most --eval_samples of them) should be > 0.8")
    a("--num_workers", type=int, default=c.num_workers, help="data loader worker processes")
    a("--no_verify_checksums", dest="verify_checksums", action="store_false",
      help="skip the sha256 check of every shard at start-up")
    a("--eval_every", type=int, default=c.eval_every)
    a("--eval_samples", type=int, default=c.eval_samples)
    a("--eval_sampler_steps", type=int, default=c.eval_sampler_steps)
    a("--eval_method", default=c.eval_method, choices=list(flow.METHODS))
    a("--save_every", type=int, default=c.save_every)
    a("--keep_checkpoints", type=int, default=c.keep_checkpoints)
    a("--log_every", type=int, default=c.log_every)
    a("--resume", default=None, help="'auto' (newest complete checkpoint in --output_dir, if any) "
                                     "or a checkpoint / run directory")
    a("--no_tensorboard", dest="tensorboard", action="store_false")
    a("--no_progress", dest="progress", action="store_false")
    a("--seed", type=int, default=c.seed)
    a("--device", default=c.device, help="auto, cpu, cuda or cuda:N")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--grad_checkpointing", "--gradient_checkpointing", dest="grad_checkpointing",
      action="store_true")
    a("--fsdp", action="store_true", help="shard parameters/gradients/optimiser with FSDP2")
    a("--debug_mode", action="store_true",
      help="per-layer gradient norms, zero/exploding gradient warnings, activation statistics")
    a("--max_nonfinite_steps", type=int, default=c.max_nonfinite_steps)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TrainingError(f"--model_override {item!r}: expected KEY=VALUE, e.g. depth=2")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def add_dataclass_flags(group, config: Any, choices: dict[str, Any] | None = None) -> None:
    """One --FIELD flag per field of a dataclass instance, typed and defaulted by it."""
    for f in fields(config):
        value = getattr(config, f.name)
        group.add_argument(f"--{f.name}", type=type(value), default=value,
                           choices=(choices or {}).get(f.name), help=f"default {value}")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)} | {f.name for f in fields(flow.FlowConfig)}
    values = {k: v for k, v in vars(args).items() if k in known}
    values["model_overrides"] = parse_overrides(values.get("model_overrides") or [])
    return TrainConfig.from_dict(values)


def build_model_config(cfg: TrainConfig, manifest: Manifest, target_norm: float) -> Any:
    """The backbone's config for this run: the preset and overrides, shaped by the data."""
    from eva_repro.model import model_config

    token_mode = mode_of(manifest.include_cls)
    if cfg.training_mode == "cls_patch" and token_mode == "patch_only":
        raise TrainingError(f"{manifest.root}: --training_mode cls_patch needs shards with a "
                            "CLS token (include_cls) but these have patches only; re-extract with "
                            "--training_mode cls_patch or train patch_only")
    if cfg.training_mode == "patch_only":
        token_mode = "patch_only"  # CLS tokens (if any) are dropped at load time
    fixed = {"target_dim", "cond_dim", "token_mode", "target_norm", "tokens"}
    if fixed & set(cfg.model_overrides):
        raise TrainingError(f"--model_override cannot set {sorted(fixed & set(cfg.model_overrides))}:"
                            " they follow the data")
    tokens = manifest.tokens - int(manifest.include_cls and token_mode == "patch_only")
    try:
        return model_config(cfg.backbone, cfg.model_size, cfg.model_variant,
                            target_dim=manifest.eva_dim, cond_dim=manifest.clip_dim, token_mode=token_mode,
                            grad_checkpointing=cfg.grad_checkpointing, target_norm=target_norm,
                            tokens=tokens, **cfg.model_overrides)
    except TypeError as e:  # an override that is no field of the backbone's config
        raise TrainingError(f"--model_override: {e}") from e
    except ValueError as e:  # a bad mix of fields, or data the backbone cannot take
        raise TrainingError(f"{manifest.root}: {e}") from e
