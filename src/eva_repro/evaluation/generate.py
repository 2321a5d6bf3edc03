"""Generate EVA-CLIP tokens for CLIP tokens with a trained DiT (`eva-repro sample`, Python API).

    eva = generate(model, clip_tokens, steps=20, method="heun", cfg_scale=1.0, shift=1.0, seed=0)

returns raw-EVA-scale tokens: the sampler works in the normalised space (per-token norm
sqrt(D), see `transport.normalize_target`) and every token is rescaled to `model.config.target_norm`,
the mean token norm of the training targets. The noise for sample i is drawn from its own
generator seeded by (seed, i), so a sample does not depend on the batch size or on which other
samples are generated with it.

`eva-repro sample --model_path M --input_dir SHARDS --output_dir OUT` reads the `clip` tensors of
a shard directory and writes the same shards with generated tokens under `eva` (clip, keys and
captions copied), in the same format, so every tool that reads shards reads the result.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from eva_repro.data import shards
from eva_repro.data.layout import drops_cls, has_cls, tokens_for_model
from eva_repro.flow import sampling, transport
from eva_repro.model.checkpoint import load_model
from eva_repro.model.plugin import OVERRIDE_HELP
from eva_repro.utils import files
from eva_repro.utils.devices import autocast, device_of, pick_device
from eva_repro.utils.errors import UserError
from eva_repro.utils.flags import add_flags, option
from eva_repro.utils.lockfile import DirectoryLock
from eva_repro.utils.preemption import Preempted, StopSignals
from eva_repro.utils.progress import progress_bar

METHODS = sampling.METHODS


class ModelDataMismatch(UserError):
    """Condition or target tensors that do not fit the model's config."""


def check_condition(config: Any, clip_tokens: torch.Tensor, where: str = "clip tokens") -> None:
    """Raise ModelDataMismatch when `clip_tokens` [N, T, Dc] cannot condition this model."""
    if clip_tokens.dim() != 3:
        raise ModelDataMismatch(f"{where}: expected [N, tokens, dim], got shape {tuple(clip_tokens.shape)}")
    check_layout(config, *clip_tokens.shape[1:], where,
                 "use conditions from the encoders, --grid and token mode the model was trained on")


def check_shards(config: Any, manifest: shards.Manifest, model_path: Any, targets: bool = False) -> None:
    """Raise ModelDataMismatch when the shards' tokens (and with `targets` their EVA dim) do not
    fit the model at `model_path`, as `evaluate` and `sample` read them: a patch_only model drops
    the shards' CLS row."""
    dropped = int(drops_cls(manifest.include_cls, config.token_mode))
    check_layout(config, manifest.clip_tokens - dropped, manifest.clip_dim,
                 str(manifest.root / shards.MANIFEST),
                 f"use embeddings from the encoders, --grid and token mode of the model at {model_path}",
                 target_dim=manifest.eva_dim if targets else None,
                 target_tokens=manifest.tokens - dropped if targets else None,
                 include_cls=manifest.include_cls)


def check_layout(config: Any, n_tokens: int, dim: int, where: str, fix: str, *,
                 target_dim: int | None = None, target_tokens: int | None = None,
                 include_cls: bool | None = None) -> None:
    """Raise one ModelDataMismatch naming every way conditions of `n_tokens` x `dim` (targets of
    `target_tokens` x `target_dim`, a CLS row or none per `include_cls`, where known) do not fit
    this model, then `fix`. A condition on another grid than the target's is aligned onto it."""
    problems = []
    if dim != config.cond_dim:
        problems.append(f"clip_dim {dim} vs model cond_dim {config.cond_dim}")
    if target_dim is not None and target_dim != config.target_dim:
        problems.append(f"eva_dim {target_dim} vs model target_dim {config.target_dim}")
    problems += _grid_problem(config.token_mode, n_tokens, include_cls)
    if target_tokens is not None and config.tokens not in (None, target_tokens):
        problems.append(f"{target_tokens} target tokens but the model generates {config.tokens}")
    if problems:
        raise ModelDataMismatch(f"{where}: {'; '.join(problems)}; {fix}")


def _grid_problem(token_mode: str, n_tokens: int, include_cls: bool | None) -> list[str]:
    """[] when `n_tokens` is the square grid (after the CLS token) that `token_mode` needs."""
    cls = has_cls(token_mode)
    no_cls_row = cls and include_cls is False
    g = math.isqrt(max(n_tokens - int(cls), 0))
    if g >= 1 and g * g == n_tokens - int(cls) and not no_cls_row:
        return []
    why = (f" (include_cls=False vs model token_mode {token_mode!r})" if no_cls_row else
           f", which the model's token_mode {token_mode!r} needs")
    return [f"{n_tokens} tokens is not a square grid{' plus a CLS token' if cls else ''}{why}"]


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    clip_tokens: torch.Tensor,
    steps: int = 20,
    method: str = "heun",
    cfg_scale: float = 1.0,
    shift: float = 1.0,
    seed: int = 0,
    offset: int = 0,
    raw_scale: bool = True,
    tol: float = 1e-5,
    ids: Sequence[int] | None = None,
) -> tuple[torch.Tensor, int]:
    """One batch: (tokens [B, T, De] float32 on the model's device, network evaluations).

    The noise of row i is picked by its id: `ids[i]`, default `offset + i` (`sampling.sample`).
    `tol` is dopri5's atol = rtol; raw_scale=False returns the sampler's normalised space
    (token norm sqrt(De)).
    """
    device = device_of(model)
    cond = clip_tokens.to(device=device, dtype=torch.float32)
    ids = range(offset, offset + cond.shape[0]) if ids is None else ids
    with autocast(device):
        x1, nfe = sampling.sample(model, cond, ids, steps, method, shift, cfg_scale, seed, tol)
    return (transport.denormalize_target(x1, model.config.target_norm) if raw_scale else x1), nfe


def generate(
    model: torch.nn.Module,
    clip_tokens: torch.Tensor,
    steps: int = 20,
    method: str = "heun",
    cfg_scale: float = 1.0,
    shift: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """EVA tokens [N, T, De] (float32, CPU, raw EVA scale) for CLIP tokens [N, Tc, Dc]."""
    check_condition(model.config, clip_tokens)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in progress_bar(range(0, clip_tokens.shape[0], batch_size), desc="generate",
                          disable=not progress, leave=False):
            x, _ = generate_batch(model, clip_tokens[start:start + batch_size], steps, method,
                                  cfg_scale, shift, seed, offset=start)
            out.append(x.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# `eva-repro sample`: shards in, shards out


@dataclass
class SampleOptions:
    """`eva-repro sample`'s own flags, beside the sampler's (`SamplerOptions`)."""

    batch_size: int = option(64, "samples per sampler batch")
    device: str | None = option(None, "default: cuda if available, else cpu")
    backbone: str | None = option(None, OVERRIDE_HELP)
    progress: bool = option(True, "a progress bar")
    dtype: str = option("float16", "storage dtype of the written tensors",
                        choices=sorted(shards.DTYPES))
    verify_checksums: bool = option(True, shards.VERIFY_HELP, aliases=["--no_verify"])


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="run dir, model dir or checkpoint dir")
    p.add_argument("--input_dir", required=True, help="shard directory with `clip` tokens")
    p.add_argument("--output_dir", required=True, help="where generated shards go")
    add_sampler_args(p)
    add_flags(p, SampleOptions())


# Named sampler settings. blip3o: BLIP3-o's inference, 30 Euler steps with classifier-free
# guidance 3.0 against the null condition (BLIP3-o zeroes the condition; this model zeroes its
# aligned condition and gives cross-attention its learned null token, as in training).
SAMPLERS = {"blip3o": {"method": "euler", "steps": 30, "shift": 1.0, "cfg_scale": 3.0}}


@dataclass
class SamplerOptions:
    """The sampler's flags, shared by `evaluate` and `sample`; `--sampler NAME` sets several."""

    sampler: str | None = option(None, "named settings for --method/--steps/--shift/--cfg_scale "
                                 "(blip3o: euler, 30 steps, CFG 3.0)", choices=sorted(SAMPLERS),
                                 group="sampler")
    method: str = option("heun", "ODE sampler", choices=METHODS)
    steps: int = option(20, "sampler steps, ignored by dopri5")
    shift: float = option(1.0, "time shift (>1 spends more steps near noise)")
    cfg_scale: float = option(1.0, "classifier-free guidance (1 = off)")
    seed: int = option(0, "noise seed: sample i's noise is drawn from (seed, i)")


SAMPLER_DEFAULTS = {f.name: f.default for f in fields(SamplerOptions) if f.name != "sampler"}


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    """The `SamplerOptions` flags, unset (None) unless given: `resolve_sampler` fills them."""
    add_flags(p, SamplerOptions(), unset=True)


def resolve_sampler(args: argparse.Namespace) -> None:
    """Fill --method/--steps/--shift/--cfg_scale/--seed from --sampler, else the defaults; an
    explicit value that contradicts the named sampler is a one-line error."""
    named = SAMPLERS.get(getattr(args, "sampler", None) or "", {})
    for key, default in SAMPLER_DEFAULTS.items():
        given = getattr(args, key)
        if given is not None and key in named and given != named[key]:
            raise UserError(f"--sampler {args.sampler} sets --{key} {named[key]}; drop --{key} "
                             f"{given} or the named sampler")
        setattr(args, key, given if given is not None else named.get(key, default))


def check_sampler(opts: Any) -> None:
    """The sampler flags' values (`SamplerOptions`, resolved): one line naming the first bad one.
    A cfg_scale of 0 samples unconditionally (allowed); negative or non-finite ones are refused."""
    checks = [
        (opts.steps >= 1, f"--steps must be >= 1, got {opts.steps}"),
        (0 < opts.shift < math.inf, f"--shift must be finite and > 0, got {opts.shift}"),
        (0 <= opts.cfg_scale < math.inf,
         f"--cfg_scale must be finite and >= 0 (1: off), got {opts.cfg_scale}"),
        (opts.seed >= 0, f"--seed must be >= 0, got {opts.seed}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)


SETTINGS_FILE = "sample_settings.json"


def _resume(out: Path, settings: dict) -> dict[int, shards.ShardInfo]:
    """Finished shards of an earlier run with the same settings; refuse to mix settings."""
    path = out / SETTINGS_FILE
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != settings:
            raise UserError(f"{path}: {out} holds shards generated with other settings "
                             f"({previous}); choose a new --output_dir or delete it")
        done = shards.finished_shards(out)
        for index, why in shards.damaged_shards(out, done.values()).items():
            print(f"{why}; generating shard {index} again", file=sys.stderr)
            del done[index]
        if done:
            print(f"resuming: {len(done)} finished shards in {out} are kept")
        return done
    if out.exists() and any(out.glob("shard-*")):
        raise UserError(f"{out}: already holds shards not written by `eva-repro sample`; "
                         "choose an empty --output_dir")
    files.atomic_write_json(path, settings)
    return {}


def run(args: argparse.Namespace) -> int:
    resolve_sampler(args)
    check_sampler(args)
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {args.batch_size}")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise UserError(f"{args.output_dir}: is a file, not a directory; choose another --output_dir")
    loaded = load_model(args.model_path, args.backbone)
    model = loaded.model.to(pick_device(args.device)).eval()
    reader = shards.open_shards(args.input_dir, args.verify_checksums)
    manifest = reader.manifest
    check_shards(model.config, manifest, args.model_path)
    # a patch_only model on shards with a CLS row: the row is dropped, as the trainer does
    dropping_cls = drops_cls(manifest.include_cls, model.config.token_mode)
    out = Path(args.output_dir)
    if out.resolve() == manifest.root.resolve():
        raise UserError(f"{out}: --output_dir must differ from --input_dir (it would overwrite it)")
    settings = {"model_path": str(Path(args.model_path).resolve()),
                "input_dir": str(manifest.root.resolve()),
                "sampler": {"method": args.method, "steps": args.steps, "shift": args.shift,
                            "cfg_scale": args.cfg_scale, "seed": args.seed,
                            **({"named": args.sampler} if args.sampler else {})},
                "cls_dropped": dropping_cls}
    with DirectoryLock(out, "eva-repro sample"):  # one writer per output directory
        return _sample_shards(args, model, loaded, manifest, reader, out, settings)


def _sample_shards(args: argparse.Namespace, model: torch.nn.Module, loaded: Any,
                   manifest: shards.Manifest, reader: shards.ShardReader, out: Path,
                   settings: dict) -> int:
    removed = files.remove_leftovers(out)  # a killed run's half-written shard, never committed
    if removed:
        print(f"removed {len(removed)} temp file(s) a killed run left in {out}", file=sys.stderr)
    done = _resume(out, settings)
    start_time, written = time.time(), 0
    bar = progress_bar(total=len(reader), desc="sample", unit="img", disable=not args.progress)
    offset = 0
    with StopSignals() as signals:
        for position, entry in enumerate(manifest.shards):
            n = int(entry["num_samples"])
            index = int(entry.get("index", position))  # what the output shard is written as
            if index in done and done[index].num_samples == n:  # resumed: this shard is finished
                bar.update(n)
                offset += n
                continue
            sidecar = manifest.sidecar(entry)
            clip = tokens_for_model(reader.read_rows(position, 0, n)["clip"],
                                    settings["cls_dropped"])
            gen = []
            for s in range(0, n, args.batch_size):
                x, _ = generate_batch(model, clip[s:s + args.batch_size], args.steps, args.method,
                                      args.cfg_scale, args.shift, args.seed, offset=offset + s)
                gen.append(x.cpu())
                bar.update(min(args.batch_size, n - s))
            shards.write_shard(out, index, clip, torch.cat(gen), sidecar.keys,
                               sidecar.captions, dtype=args.dtype)
            written += n
            offset += n
            if signals.received and offset < len(reader):  # at a shard boundary
                bar.close()
                raise Preempted(f"stopped on {signals.received} after {written} samples written "
                                "now; rerun the same command to resume")
    bar.close()
    meta = {k: v for k, v in manifest.data.items()
            if k not in ("format", "format_version", "num_samples", "num_failures", "tokens",
                         "clip_dim", "eva_dim", "shards")}
    meta["dtype"] = args.dtype
    if settings["cls_dropped"]:  # the written shards hold the patch tokens only
        meta["include_cls"] = False
        if "training_mode" in meta:
            meta["training_mode"] = "patch_only"
    meta["generated"] = {**settings, "model_source": loaded.source,
                         "eva_scale": f"token norm = model target_norm {model.config.target_norm:.4g}"}
    shards.write_manifest(out, meta)
    rate = written / max(time.time() - start_time, 1e-9)
    print(f"wrote generated EVA tokens for {len(reader)} samples to {out} "
          f"({written} generated now, {rate:.1f} img/s)")
    return 0
