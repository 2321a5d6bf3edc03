"""What `eva-repro train` takes: TrainConfig (with transport.FlowConfig inside), its checks that need no
data, the per-preset defaults, and the command-line flags derived from it (`flags`)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from eva_repro.data import shards
from eva_repro.data.layout import TOKEN_MODES, drops_cls, mode_of
from eva_repro.data.shards import Manifest
from eva_repro.flow import sampling, transport
from eva_repro.flow.sampling import METHODS
from eva_repro.model import BACKBONES, VARIANTS, backbones, model_config, plugin
from eva_repro.utils.errors import UserError
from eva_repro.utils.flags import add_flags, option, values

OVERFIT_DEFAULT_STEPS = 300
# Peak AdamW learning rate per preset when --learning_rate is not given: roughly 1/width, the
# usual transformer practice (wider models need smaller steps). The tiny preset's was chosen on
# held-out cosine (docs/troubleshooting.md); the others are not retuned.
DEFAULT_LR = {"tiny": 3e-3, "small": 6e-4, "base": 3e-4, "large": 2e-4, "blip3o": 1e-4}
OVERFIT_BAR = 0.8  # the public reference's sanity bar for the sampled cosine in overfit mode


class TrainingError(UserError):
    """A training setup that cannot run (bad flags, data that does not fit the model)."""


# ---------------------------------------------------------------------------------------------
# configuration


@dataclass
class TrainConfig:
    """Every option of a training run; `eva-repro train --FIELD` sets it (`flags`: the flags,
    their types, defaults and `--help` sections are derived from the fields below)."""

    data_dir: str = option("", "shard directory (eva-repro extract / synth output)", group="run",
                           aliases=["--chunked_embeddings_dir"], required=True)
    output_dir: str = option("", "run directory: checkpoints, logs, model/, summary.json",
                             required=True)
    backbone: str = option("next-dit", "next-dit: eva-repro's Next-DiT (model/dit.py); "
                           "lumina-next: diffusers' LuminaNextDiT2DModel, BLIP3-o's head (needs "
                           "the diffusers extra); or your own network, package.module:factory or "
                           "path/to/file.py:factory (model/plugin.py: the preset's sizes and "
                           "--model_override values are passed to the factory)")
    model_size: str = option("base", "preset: tiny, small, base, large (both backbones); blip3o "
                             "(lumina-next: 1792 wide, 24 layers, 28 heads)")
    model_variant: str = option("eva-repro", "the next-dit head's conditioning and prediction: "
                                "eva-repro (aligned condition, x-prediction, linear path) or "
                                "blip3o (BLIP3-o's own head: cross-attention, v-prediction)")
    model_overrides: dict[str, Any] = option(
        factory=dict, flag="--model_override", repeat=True, metavar="KEY=VALUE",
        help="override a config field of the preset, e.g. depth=2 (repeatable; JSON values)")
    training_mode: str = option("auto", "token layout; auto follows the shards (patch_only on CLS "
                                "shards drops the CLS token)", choices=["auto", *TOKEN_MODES])
    batch_size: int = option(8, "per rank and micro-batch", group="batches and length")
    grad_accum: int = option(1, "micro-batches per optimiser step",
                             aliases=["--gradient_accumulation_steps"])
    num_epochs: float = option(10.0, "passes over the training split")
    max_steps: int | None = option(None, "optimiser steps (overrides --num_epochs)")
    learning_rate: float | None = option(None, f"peak learning rate (default per preset: "
                                         f"{DEFAULT_LR})", group="optimiser and schedule",
                                         aliases=["--lr"])
    min_lr_ratio: float = option(0.1, "the cosine decays to learning_rate * min_lr_ratio")
    warmup_steps: int | None = option(None, "default: 5%% of the steps, at most 1000")
    weight_decay: float = option(0.01, "matrices only; norms, biases, gates and the null "
                                 "condition: 0")
    adam_beta1: float = option(0.9)
    adam_beta2: float = option(0.95)
    grad_clip: float = option(1.0, "global gradient norm clip")
    ema_decay: float = option(0.999, "ramped in as min(decay, (1 + step) / (10 + step))")
    flow: transport.FlowConfig = option(factory=transport.FlowConfig,
                                        group="flow (transport.FlowConfig: time draws, loss "
                                              "weight, CFG dropout)")
    eval_fraction: float = option(0.05, "held-out fraction of the samples (by key hash)",
                                  group="data")
    group_by: str | None = option(None, "hold out keys in groups: 'prefix' (the key up to its last "
                                  "/ _ or -, extension dropped: frames of one video) or a regex "
                                  "whose first group names the key's group; default: each key "
                                  "alone", metavar="prefix|REGEX")
    max_samples: int | None = option(None, "use only the first N samples (quick runs)")
    overfit_test_size: int = option(0, "train on N fixed samples (default 300 steps); summary "
                                    "overfit_cosine (sampled, on those samples, at most "
                                    "--eval_samples of them) should be > 0.8")
    num_workers: int = option(2, "data loader worker processes")
    verify_checksums: bool = option(True, shards.VERIFY_HELP, aliases=["--no_verify"])
    eval_every: int = option(1000, "optimiser steps between held-out evaluations",
                             group="evaluation")
    eval_samples: int = option(64, "held-out samples drawn by the sampler at each evaluation")
    eval_sampler_steps: int = option(20)
    eval_method: str = option("heun", "the sampler of those evaluations", choices=METHODS)
    save_every: int = option(1000, group="checkpoints and logging")
    keep_checkpoints: int = option(3)
    log_every: int = option(10)
    resume: str | None = option(None, "'auto' (newest complete checkpoint in --output_dir, if "
                                "any) or a checkpoint / run directory")
    tensorboard: bool = option(True, "TensorBoard events (metrics.jsonl is written either way)")
    progress: bool = option(True, "a progress bar (off: a line every few seconds)")
    seed: int = option(0, group="system")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    compile: bool = option(False, "torch.compile the model")
    grad_checkpointing: bool = option(False, "recompute block activations in the backward pass",
                                      aliases=["--gradient_checkpointing"])
    fsdp: bool = option(False, "shard parameters/gradients/optimiser with FSDP2")
    debug_mode: bool = option(False, "per-layer gradient norms, zero/exploding gradient "
                              "warnings, activation statistics")
    max_nonfinite_steps: int = option(10, "consecutive non-finite steps before the run stops")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Flat options (as on the command line: time_mean=...) or a nested "flow" dict."""
        data = dict(data)
        flow_keys = {f.name for f in fields(transport.FlowConfig)}
        nested = data.pop("flow", None)
        flow_values = {**(asdict(nested) if isinstance(nested, transport.FlowConfig) else nested or {}),
                       **{k: data.pop(k) for k in flow_keys & set(data)}}
        unknown = sorted(set(data) - {f.name for f in fields(cls)}) + sorted(set(flow_values) - flow_keys)
        if unknown:
            raise TrainingError(f"unknown training options {unknown}")
        return cls(**data, flow=transport.FlowConfig(**flow_values))


def validate_config(cfg: TrainConfig) -> None:
    """Flag problems that need no data, before anything heavy happens."""
    lumina = cfg.backbone == "lumina-next"
    own = plugin.is_plugin_spec(cfg.backbone)
    sizes = backbones.presets(cfg.backbone) if backbones.known_backbone(cfg.backbone) else []
    checks = [
        (backbones.known_backbone(cfg.backbone), f"unknown --backbone {cfg.backbone!r}; choose one "
         f"of {BACKBONES} or give an import path, package.module:factory or file.py:factory"),
        (bool(cfg.data_dir), "--data_dir (or --chunked_embeddings_dir) is required"),
        (bool(cfg.output_dir), "--output_dir is required"),
        (cfg.model_variant in VARIANTS, f"unknown --model_variant {cfg.model_variant!r}; choose "
                                        f"one of {sorted(VARIANTS)}"),
        (cfg.model_size in sizes, f"unknown --model_size {cfg.model_size!r} for --backbone "
                                  f"{cfg.backbone}; choose one of {sizes}"),
        (not lumina or cfg.model_variant == "eva-repro",
         "--model_variant picks a next-dit head; --backbone lumina-next is diffusers' own network"),
        (not own or cfg.model_variant == "eva-repro",
         "--model_variant picks a next-dit head; a --backbone import path is your own network"),
        (cfg.training_mode in ("auto", *TOKEN_MODES),
         f"--training_mode must be auto, patch_only or cls_patch, got {cfg.training_mode!r}"),
        (cfg.batch_size >= 1, f"--batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.grad_accum >= 1, f"--grad_accum must be >= 1, got {cfg.grad_accum}"),
        (cfg.max_steps is None or cfg.max_steps >= 1, f"--max_steps must be >= 1, got {cfg.max_steps}"),
        (0 < cfg.num_epochs < math.inf, f"--num_epochs must be finite and > 0, got {cfg.num_epochs}"),
        (cfg.warmup_steps is None or cfg.warmup_steps >= 0,
         f"--warmup_steps must be >= 0, got {cfg.warmup_steps}"),
        (cfg.learning_rate is None or 0 < cfg.learning_rate < math.inf,
         f"--learning_rate must be finite and > 0, got {cfg.learning_rate}"),
        (0 <= cfg.min_lr_ratio <= 1, f"--min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}"),
        (0 <= cfg.weight_decay < math.inf,
         f"--weight_decay must be finite and >= 0, got {cfg.weight_decay}"),
        (0 <= cfg.adam_beta1 < 1, f"--adam_beta1 must be in [0, 1), got {cfg.adam_beta1}"),
        (0 <= cfg.adam_beta2 < 1, f"--adam_beta2 must be in [0, 1), got {cfg.adam_beta2}"),
        (cfg.grad_clip > 0, f"--grad_clip must be > 0, got {cfg.grad_clip}"),  # inf: no clipping
        (0 <= cfg.ema_decay < 1, f"--ema_decay must be in [0, 1), got {cfg.ema_decay}"),
        (0 <= cfg.flow.cfg_dropout <= 1,
         f"--cfg_dropout must be in [0, 1], got {cfg.flow.cfg_dropout}"),
        (0 < cfg.flow.time_std < math.inf,
         f"--time_std must be finite and > 0, got {cfg.flow.time_std}"),
        (0 < cfg.flow.time_shift < math.inf,
         f"--time_shift must be finite and > 0, got {cfg.flow.time_shift}"),
        (math.isfinite(cfg.flow.time_mean), f"--time_mean must be finite, got {cfg.flow.time_mean}"),
        (cfg.flow.time_scheme in transport.TIME_SCHEMES,
         f"--time_scheme must be one of {transport.TIME_SCHEMES}"),
        (cfg.flow.loss_weight in transport.LOSS_WEIGHTS,
         f"--loss_weight must be one of {transport.LOSS_WEIGHTS}"),
        (cfg.eval_method in sampling.METHODS, f"--eval_method must be one of {sampling.METHODS}"),
        (cfg.overfit_test_size >= 0,
         f"--overfit_test_size must be >= 0 (0: off), got {cfg.overfit_test_size}"),
        *((getattr(cfg, name) >= 1, f"--{name} must be >= 1, got {getattr(cfg, name)}")
          for name in ("log_every", "save_every", "eval_every")),
        (0 <= cfg.eval_fraction < 1, f"--eval_fraction must be in [0, 1), got {cfg.eval_fraction}"),
        (cfg.max_samples is None or cfg.max_samples >= 1,
         f"--max_samples must be >= 1, got {cfg.max_samples}"),
        (cfg.num_workers >= 0, f"--num_workers must be >= 0, got {cfg.num_workers}"),
        (cfg.eval_samples >= 0, f"--eval_samples must be >= 0, got {cfg.eval_samples}"),
        (cfg.eval_sampler_steps >= 1,
         f"--eval_sampler_steps must be >= 1, got {cfg.eval_sampler_steps}"),
        (cfg.keep_checkpoints >= 0,
         f"--keep_checkpoints must be >= 0 (0: keep all), got {cfg.keep_checkpoints}"),
        (cfg.max_nonfinite_steps >= 1,
         f"--max_nonfinite_steps must be >= 1, got {cfg.max_nonfinite_steps}"),
        (cfg.seed >= 0, f"--seed must be >= 0, got {cfg.seed}"),
    ]
    for ok, message in checks:
        if not ok:
            raise TrainingError(message)


# ---------------------------------------------------------------------------------------------
# command line


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_flags(p, TrainConfig(), choices={"model_variant": sorted(VARIANTS),
                                         "time_scheme": transport.TIME_SCHEMES,
                                         "loss_weight": transport.LOSS_WEIGHTS})


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


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = values(args, TrainConfig)
    given["model_overrides"] = parse_overrides(given.get("model_overrides") or [])
    return TrainConfig.from_dict(given)


def token_mode(cfg: TrainConfig, manifest: Manifest) -> str:
    """The run's token layout: --training_mode, or with auto the shards' (a patch_only run on
    CLS shards drops the CLS row at load time, `layout.drops_cls`)."""
    if cfg.training_mode == "cls_patch" and not manifest.include_cls:
        raise TrainingError(f"{manifest.root}: --training_mode cls_patch needs shards with a "
                            "CLS token (include_cls) but these have patches only; re-extract with "
                            "--training_mode cls_patch or train patch_only")
    return mode_of(manifest.include_cls) if cfg.training_mode == "auto" else cfg.training_mode


def build_model_config(cfg: TrainConfig, manifest: Manifest, target_norm: float) -> Any:
    """The backbone's config for this run: the preset and overrides, shaped by the data."""
    mode = token_mode(cfg, manifest)
    fixed = {"target_dim", "cond_dim", "token_mode", "target_norm", "tokens"}
    if fixed & set(cfg.model_overrides):
        raise TrainingError(f"--model_override cannot set {sorted(fixed & set(cfg.model_overrides))}:"
                            " they follow the data")
    tokens = manifest.tokens - int(drops_cls(manifest.include_cls, mode))
    try:
        return model_config(cfg.backbone, cfg.model_size, cfg.model_variant,
                            target_dim=manifest.eva_dim, cond_dim=manifest.clip_dim, token_mode=mode,
                            grad_checkpointing=cfg.grad_checkpointing, target_norm=target_norm,
                            tokens=tokens, **cfg.model_overrides)
    except TypeError as e:  # an override that is no field of the backbone's config
        raise TrainingError(f"--model_override: {e}") from e
    except ValueError as e:  # a bad mix of fields, or data the backbone cannot take
        raise TrainingError(f"{manifest.root}: {e}") from e
