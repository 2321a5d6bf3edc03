"""Training checkpoints (atomic, resumable, world-size independent) and the one model loader.

    run_dir/checkpoints/step-00000100/
        config.json             model config (DiTConfig.to_dict), so the directory is self-describing
        model.safetensors       full (unsharded) training weights
        ema.safetensors         full EMA weights: what evaluation and export use
        optimizer.safetensors   full optimiser state tensors ("state/<fqn>/exp_avg", ...)
        rng.safetensors         torch CPU / CUDA, numpy and python RNG states, as tensors
        trainer_state.json      step, data position, scheduler, optimiser hyperparameters, RNG
                                scalars, whatever else the trainer passes in `meta`
        COMPLETE                written last: the step and the sha256 of every file above

A checkpoint is written into a hidden temp directory beside the final one, COMPLETE last, then
renamed into place: a crash leaves either a complete checkpoint or a temp directory that is never
picked (and is removed by the next save). Damage after that (a truncated copy, a flipped bit) is
caught by the digests: `--resume auto` falls back to the newest checkpoint that verifies, with a
warning naming what was wrong. Tensors are full state dicts (gathered from DDP/FSDP2
by the trainer), so a checkpoint loads with any world size. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from eva_repro.model import build_model, config_from_dict, from_pretrained, is_saved_model
from eva_repro.utils.errors import UserError
from eva_repro.utils.files import (
    atomic_save_safetensors,
    atomic_write_json,
    fsync_path,
    load_safetensors,
    read_json_object,
    sha256_file,
)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STEP_DIR = re.compile(r"^step-(\d{8})$")
TENSOR_FILES = ("model", "ema", "optimizer", "rng")
CHECKPOINT_FIX = "the checkpoint is damaged: use an older one (or the run's exported model/)"


class CheckpointError(UserError):
    """A checkpoint or model path that cannot be used; the message names it and the fix."""


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written ones never appear)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


RUN_FILES = ("run_config.json", CHECKPOINTS, "metrics.jsonl")  # what makes a directory a run


def run_files(run_dir: str | os.PathLike) -> list[str]:
    """The files of an earlier training run in run_dir (empty when it holds none)."""
    return [name for name in RUN_FILES if (Path(run_dir) / name).exists()]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---------------------------------------------------------------------------------------------
# RNG states: tensors in safetensors, the few scalars in JSON


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["python_state"] = torch.tensor(internal, dtype=torch.int64)
    scalars = {"numpy": [kind, int(pos), int(has_gauss), float(cached)],
               "python": [version, gauss_next]}
    return tensors, scalars


def restore_rng(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = scalars["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         cached))
    version, gauss_next = scalars["python"]
    random.setstate((version, tuple(tensors["python_state"].tolist()), gauss_next))


# ---------------------------------------------------------------------------------------------
# optimiser state: full (FQN-keyed) state dict -> tensors + JSON


def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """`get_optimizer_state_dict(..., full_state_dict=True)` -> (tensors, JSON-able rest).

    Tensors are named "state/<parameter FQN>/<key>" (e.g. exp_avg, step); param_groups (lr,
    betas, the FQNs of their parameters) and any non-tensor state go to JSON.
    """
    tensors, scalars = {}, {}
    for fqn, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{fqn}/{key}"] = value.detach().cpu()
            else:
                scalars.setdefault(fqn, {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "state_scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], other: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, fqn, key = name.split("/", 2)
        state.setdefault(fqn, {})[key] = value
    for fqn, entries in other.get("state_scalars", {}).items():
        state.setdefault(fqn, {}).update(entries)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
              for g in other["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------------------------------
# save / load


@dataclass
class TrainingState:
    """Everything one checkpoint holds; tensors are full (unsharded) CPU state dicts."""

    step: int
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # full optimiser state dict keyed by parameter FQN
    model_config: dict[str, Any]
    meta: dict[str, Any]  # data position, scheduler, anything JSON the trainer wants back
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None


def save_checkpoint(run_dir: str | os.PathLike, state: TrainingState, keep: int = 3) -> Path:
    """Write `state` atomically to run_dir/checkpoints/step-XXXXXXXX; keep the newest `keep`."""
    final = step_dir(run_dir, state.step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a writer that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    try:  # a full disk (or anything else) leaves no half checkpoint and the older ones intact
        _write_files(tmp, state)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # e.g. the final save of a run resumed at exactly this step
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(tmp: Path, state: TrainingState) -> None:
    rng_tensors, rng_scalars = state.rng if state.rng is not None else capture_rng()
    opt_tensors, opt_other = split_optimizer_state(state.optimizer)
    atomic_write_json(tmp / "config.json", state.model_config)
    atomic_save_safetensors(state.model, tmp / "model.safetensors")
    atomic_save_safetensors(state.ema, tmp / "ema.safetensors")
    atomic_save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
    atomic_save_safetensors(rng_tensors, tmp / "rng.safetensors")
    atomic_write_json(tmp / "trainer_state.json", {
        "step": state.step, "optimizer": opt_other, "rng": rng_scalars, **state.meta})
    digests = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    atomic_write_json(tmp / COMPLETE, {"step": state.step, "sha256": digests})


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Every file matches the digest COMPLETE recorded."""
    path = Path(path)
    try:
        record = json.loads((path / COMPLETE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {COMPLETE} marker ({e})") from e
    expected = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(expected, dict) or not expected:
        raise CheckpointError(f"{path}: its {COMPLETE} marker records no sha256 digests, so the "
                              "files cannot be verified; use another checkpoint")
    for name, digest in expected.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if sha256_file(file) != digest:
            raise CheckpointError(f"{path}: {name} does not match its recorded sha256 (truncated "
                                  "or corrupted after it was written)")


def resolve_resume(run_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """`--resume auto` -> the newest complete checkpoint of run_dir that verifies (or None),
    warning about each newer damaged one; an explicit path must be complete and verify."""
    if not resume:
        return None
    if resume == "auto":
        return _newest_valid(list_checkpoints(run_dir))
    path = Path(resume)
    if (path / CHECKPOINTS).is_dir():  # a run directory
        found = _newest_valid(list_checkpoints(path))
        if found is None:
            raise CheckpointError(f"{path}: --resume run directory has no complete checkpoint; "
                                  "use --resume auto to start fresh when there is none")
        return found
    if not (path / COMPLETE).exists():
        raise CheckpointError(f"{path}: not a complete checkpoint (no {COMPLETE} marker); pass a "
                              f"directory like {Path(run_dir) / CHECKPOINTS / 'step-00001000'}")
    verify_checkpoint(path)
    return path


def _newest_valid(checkpoints: list[Path]) -> Path | None:
    for path in reversed(checkpoints):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            print(f"warning: skipping a damaged checkpoint: {e}", file=sys.stderr)
    if checkpoints:  # starting over would silently discard the run: the user decides
        raise CheckpointError(f"{checkpoints[-1].parent}: none of its {len(checkpoints)} "
                              "checkpoints verifies; move the directory away to start fresh")
    return None


def load_checkpoint(path: str | os.PathLike) -> TrainingState:
    path = Path(path)
    if not (path / COMPLETE).exists():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {COMPLETE} marker); resume from "
                              "an older one or start fresh")
    try:
        meta = json.loads((path / "trainer_state.json").read_text())
        config = json.loads((path / "config.json").read_text())
        tensors = {name: load_file(str(path / f"{name}.safetensors")) for name in TENSOR_FILES}
    except (OSError, json.JSONDecodeError, Exception) as e:  # safetensors has its own errors
        raise CheckpointError(f"{path}: unreadable checkpoint ({e}); delete it to resume from an "
                              "older one") from e
    step = int(meta.pop("step"))
    optimizer = join_optimizer_state(tensors["optimizer"], meta.pop("optimizer"))
    rng = (tensors["rng"], meta.pop("rng"))
    return TrainingState(step, tensors["model"], tensors["ema"], optimizer, config, meta, rng)


# ---------------------------------------------------------------------------------------------
# full state dicts from (possibly DDP / FSDP2-sharded) modules: collectives, call on every rank


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def gather_training_state(step: int, model: torch.nn.Module, ema: torch.nn.Module,
                          optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> TrainingState:
    """Full CPU state dicts of the training weights, EMA and optimiser (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    full = _full_options()
    return TrainingState(step, get_model_state_dict(model, options=full),
                         get_model_state_dict(ema, options=full),
                         get_optimizer_state_dict(model, optimizer, options=full),
                         model.config.to_dict(), meta)


def load_training_state(path: str | os.PathLike, model: torch.nn.Module, ema: torch.nn.Module,
                        optimizer: torch.optim.Optimizer) -> TrainingState:
    """Load a checkpoint written with any world size into these (possibly sharded) modules; the
    optimiser keeps this run's own stepping options (fused / foreach). Returns the state for
    its step and meta."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = load_checkpoint(path)
    try:
        set_model_state_dict(model, state.model, options=_full_options())
        set_model_state_dict(ema, state.ema, options=_full_options())
        keep = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g}
                for g in optimizer.param_groups]
        # strict=False: a parameter that never had a gradient (e.g. the null condition with
        # --cfg_dropout 0) has no optimiser state to restore
        set_optimizer_state_dict(model, optimizer, state.optimizer,
                                 options=_full_options(strict=False))
        for g, kept in zip(optimizer.param_groups, keep, strict=True):
            g.update(kept)  # how to step is this run's business, not the checkpoint's
            g["betas"] = tuple(g["betas"])
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: does not fit this model / optimiser ({e}); resume "
                              "with the same --model_size and data, or start a new "
                              "--output_dir") from e
    return state


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded CPU state dict of a (possibly FSDP2-sharded) module (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


# ---------------------------------------------------------------------------------------------
# the one model loader (evaluate / sample / demo)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    run_dir: Path | None
    split: dict | None
    source: str


def _split_of(run_dir: Path | None) -> dict | None:
    if run_dir is not None and (run_dir / "split.json").exists():
        return read_json_object(run_dir / "split.json", "the run's held-out split is damaged: "
                                "restore it from a copy of the run")
    return None


def _model_from_checkpoint(ckpt: Path, backbone: str | None = None) -> torch.nn.Module:
    config = read_json_object(ckpt / "config.json", CHECKPOINT_FIX)
    model = build_model(config_from_dict(config, backbone))
    state = load_safetensors(ckpt / "ema.safetensors", CHECKPOINT_FIX)
    try:
        model.load_state_dict(state)
    except (RuntimeError, OSError) as e:
        raise CheckpointError(f"{ckpt}: EMA weights do not fit its config.json ({e}); the "
                              "checkpoint is damaged: use an older one") from e
    return model


def load_model(path: str | os.PathLike, backbone: str | None = None) -> LoadedModel:
    """A run dir, a model dir (save_pretrained) or a checkpoint dir -> EMA model on CPU, eval mode;
    a plugin network rebuilt from `backbone` instead of its recorded import path when given.

    A run dir uses run_dir/model/ (the exported EMA weights) or, while training is still going,
    its newest complete checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: model path does not exist; pass a training run directory, "
                              "a model directory (save_pretrained) or a checkpoint directory")
    if (path / COMPLETE).exists():  # checkpoint dir: run_dir/checkpoints/step-N
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS else None
        loaded = LoadedModel(_model_from_checkpoint(path, backbone), run_dir, _split_of(run_dir),
                             f"checkpoint {path.name} (EMA)")
    elif is_saved_model(path):
        run_dir = path.parent if (path.parent / "split.json").exists() else None
        loaded = LoadedModel(from_pretrained(path, "cpu", backbone), run_dir,
                             _split_of(run_dir), "model dir")
    elif (path / "model" / "config.json").exists():
        loaded = LoadedModel(from_pretrained(path / "model", "cpu", backbone), path,
                             _split_of(path), "run dir (exported EMA model)")
    elif (ckpt := latest_checkpoint(path)) is not None:
        loaded = LoadedModel(_model_from_checkpoint(ckpt, backbone), path, _split_of(path),
                             f"run dir, checkpoint {ckpt.name} (EMA)")
    elif path.name == CHECKPOINTS and (ckpt := latest_checkpoint(path.parent)) is not None:
        loaded = LoadedModel(_model_from_checkpoint(ckpt, backbone), path.parent,
                             _split_of(path.parent),
                             f"checkpoint {ckpt.name} (EMA)")
    elif (path / "run_config.json").exists() or (path / CHECKPOINTS).is_dir():
        raise CheckpointError(f"{path}: run directory with no model (no {path / 'model'} and no "
                              "complete checkpoint): training has not saved one yet; wait for its "
                              "first checkpoint or pass another run")
    else:
        raise CheckpointError(f"{path}: no model here (needs config.json + model.safetensors, a run "
                              "directory with model/ or a complete checkpoint); pass a run, model "
                              "or checkpoint directory")
    loaded.model.eval()
    return loaded
