"""`eva-repro train`: embedding shards -> DiT checkpoints; one process, DDP (torchrun) or FSDP2.

    eva-repro train --data_dir D --output_dir O [--model_size tiny] [--max_steps N] ...
    torchrun --nproc_per_node 8 -m eva_repro train ... [--fsdp]
    python train_eva_reproduction.py --chunked_embeddings_dir D --output_dir O ...   (same flags)

One optimiser step = `--grad_accum` micro-batches of `--batch_size` samples on every rank, so the
global batch is batch_size x ranks x grad_accum. Noise, t and the CFG drop of every example are
drawn from a generator seeded by (seed, data position, row in the global batch): a run is
reproducible whatever the world size, and a resumed run continues the exact trajectory.

Output (run_dir = --output_dir): run_config.json, split.json, metrics.jsonl, tb/, checkpoints/,
model/ (EMA weights, save_pretrained), summary.json. Only rank 0 writes, holding the directory's
lock (`lockfile`). SIGTERM / SIGUSR1 stop after the current step with a checkpoint, exit 75
(`preemption`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from eva_repro import __version__, files, flow, layout, optim
from eva_repro import checkpoint as ckpt
from eva_repro import data as data_mod
from eva_repro.data import BatchSchedule, DataPosition, TrainData
from eva_repro.devices import autocast
from eva_repro.distributed import (
    Dist,
    all_reduce_sum,
    barrier,
    run_on_main,
    setup_distributed,
    wrap_model,
)
from eva_repro.files import atomic_write_json
from eva_repro.init_from_data import fit_to_training_data
from eva_repro.lockfile import DirectoryLock
from eva_repro.model import build_model
from eva_repro.monitoring import DebugMonitor, Interval, MetricsLog, log
from eva_repro.preemption import Preempted, StopSignals
from eva_repro.progress import progress_bar
from eva_repro.shards import MIN_HELDOUT
from eva_repro.train_config import (
    DEFAULT_LR,
    OVERFIT_BAR,
    OVERFIT_DEFAULT_STEPS,
    TrainConfig,
    TrainingError,  # raised from setup; callers catch it as train.TrainingError
    build_model_config,
    config_from_args,
    configure_parser,  # noqa: F401 -- `eva-repro train`'s flags: cli finds them here
    token_mode,
    validate_config,
)


class TrainingDiverged(TrainingError, RuntimeError):
    """Too many consecutive non-finite steps; the message names the step, the batch and the fix.
    A TrainingError, so the CLI prints one `error:` line and exits 2 (still a RuntimeError, as
    it always was, for callers that catch that)."""


# ---------------------------------------------------------------------------------------------
# the objective on one batch


def draw_noise(
    batch: data_mod.Batch, shape: tuple[int, ...], flow_cfg: flow.FlowConfig, seed: int,
    global_batch: int, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, t, drop) per example from a generator seeded by the example's index in the epoch's
    order, so an example's draw is the same whatever the world size, micro-batch or
    accumulation split, and a resumed run redraws exactly what the killed one would have."""
    g = torch.Generator(device=device)
    first = batch.position.batch * global_batch + batch.offset
    x0, ts, drops = [], [], []
    for i in range(shape[0]):
        g.manual_seed(data_mod.mix_seed("noise", seed, batch.position.epoch, first + i))
        x0.append(torch.randn(shape[1:], generator=g, device=device))
        ts.append(flow.sample_time(1, flow_cfg.time_scheme, flow_cfg.time_mean, flow_cfg.time_std,
                                   flow_cfg.time_shift, generator=g, device=device))
        drops.append(torch.rand(1, generator=g, device=device) < flow_cfg.cfg_dropout)
    return torch.stack(x0), torch.cat(ts), torch.cat(drops)


# ---------------------------------------------------------------------------------------------
# evaluation


@dataclass
class EvalSet:
    """Samples scored during training: their row ids (which key their noise), conditions, targets."""

    ids: list[int]
    clip: torch.Tensor
    eva: torch.Tensor


@torch.no_grad()
def sampled_cosine(
    model: nn.Module, samples: EvalSet, cfg: TrainConfig, device: torch.device,
) -> float | None:
    """Sample targets for the set's conditions with the (EMA) model (`flow.sample`, noise keyed
    by row id, as `eva-repro evaluate` does); mean token cosine to its targets (None for an empty
    set, e.g. --eval_fraction 0)."""
    if not samples.ids:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(samples.ids), cfg.batch_size):
        c = samples.clip[start:start + cfg.batch_size].to(device).float()
        e = samples.eva[start:start + cfg.batch_size].to(device).float()
        with autocast(device):
            x, _ = flow.sample(model, c, samples.ids[start:start + cfg.batch_size],
                               cfg.eval_sampler_steps, cfg.eval_method, cfg.flow.time_shift)
        cos = flow.token_cosine(x, e)
        total += float(cos.sum())
        count += cos.numel()
    if hasattr(model, "reshard"):  # FSDP2: back to sharded parameters after forward-only use
        model.reshard()
    model.train(was_training)
    return total / count


def heldout_scores(run: TrainingRun) -> dict[str, Any]:
    """Held-out (and, in overfit mode, training-set) sampled cosine of the EMA model."""
    cfg, d = run.cfg, run.d
    record: dict[str, Any] = {"step": run.step, "heldout_cosine": sampled_cosine(
        run.ema, run.eval_set, cfg, d.device)}
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    message = f"step {run.step}: sampled cosine (EMA) held-out {fmt(record['heldout_cosine'])}"
    if run.overfit_set is not None:
        record["overfit_cosine"] = sampled_cosine(run.ema, run.overfit_set, cfg, d.device)
        message += f", overfit set {fmt(record['overfit_cosine'])}"
    log(d, message)
    return record


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class TrainingRun:
    """Everything the loop needs, set up once."""

    cfg: TrainConfig
    d: Dist
    run_dir: Path
    data: TrainData
    schedule: BatchSchedule
    model: nn.Module  # what forward/backward go through (DDP / FSDP wrapped)
    raw: nn.Module  # the DiT itself (FSDP: the sharded module)
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    total_steps: int
    warmup: int
    drop_cls: bool
    train_rows: list[int]
    eval_set: EvalSet
    overfit_set: EvalSet | None
    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    resumed_from: str | None = None
    recent_losses: list[float] = field(default_factory=list)  # for summary final_loss


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _select_rows(cfg: TrainConfig, data: TrainData, d: Dist) -> list[int]:
    if not cfg.overfit_test_size:
        return data.train_rows
    n = min(cfg.overfit_test_size, len(data.train_rows))
    if n < cfg.overfit_test_size:
        log(d, f"--overfit_test_size {cfg.overfit_test_size} > {n} training samples: using {n}")
    return data.train_rows[:n]


def _micro_batch(cfg: TrainConfig, rows: int, d: Dist) -> int:
    if cfg.overfit_test_size and cfg.batch_size * d.world_size > rows:
        b = max(1, rows // d.world_size)
        log(d, f"overfit mode: --batch_size {cfg.batch_size} is more than the {rows} samples, "
               f"using {b} per rank")
        return b
    return cfg.batch_size


def _total_steps(cfg: TrainConfig, schedule: BatchSchedule) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    if cfg.overfit_test_size:
        return OVERFIT_DEFAULT_STEPS
    return max(1, int(cfg.num_epochs * schedule.batches_per_epoch) // cfg.grad_accum)


def refuse_existing_run(run_dir: Path) -> None:
    """A fresh run never writes over another: its metrics would be truncated and checkpoint
    rotation (by step number) would delete the new run's checkpoints, keeping the old ones."""
    found = ckpt.run_files(run_dir)
    if found:
        raise TrainingError(f"{run_dir}: holds another training run ({', '.join(found)}); pass "
                            "--resume auto to continue it, or a new --output_dir")


def setup(cfg: TrainConfig) -> TrainingRun:
    validate_config(cfg)
    if cfg.learning_rate is None:
        cfg = replace(cfg, learning_rate=DEFAULT_LR.get(cfg.model_size, 3e-4))
    d = setup_distributed(cfg.device, need_group=cfg.fsdp)
    run_dir = Path(cfg.output_dir)
    if not cfg.resume:
        run_on_main(lambda: refuse_existing_run(run_dir), d)
    resume_path = run_on_main(lambda: ckpt.resolve_resume(run_dir, cfg.resume), d)
    seed_everything(cfg.seed)

    data = data_mod.open_training_data(cfg.data_dir, cfg.eval_fraction, cfg.max_samples,
                                       cfg.verify_checksums, group_by=cfg.group_by,
                                       warn=d.is_main)
    if resume_path is not None:
        check_same_split(run_dir, data)
    rows = _select_rows(cfg, data, d)
    micro = _micro_batch(cfg, len(rows), d)
    schedule = BatchSchedule(rows, [data.shard_of(r) for r in rows], micro * d.world_size,
                             seed=cfg.seed)
    total = _total_steps(cfg, schedule)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else optim.default_warmup(total)

    drop_cls = layout.drops_cls(data.manifest.include_cls, token_mode(cfg, data.manifest))
    model_cfg = build_model_config(cfg, data.manifest, data_mod.target_norm(data.reader, rows,
                                                                            drop_cls=drop_cls))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    raw = build_model(model_cfg).to(d.device)
    if resume_path is None:  # a resumed run loads its own statistics and weights
        fit_to_training_data(raw, data.reader, rows, drop_cls, lambda message: log(d, message))
    ema = build_model(model_cfg).to(d.device)
    ema.load_state_dict(raw.state_dict())
    ema.requires_grad_(False)
    model = wrap_model(raw, ema, d, fsdp=cfg.fsdp, compiled=cfg.compile)
    optimizer = optim.build_optimizer(raw, cfg.learning_rate, cfg.weight_decay,
                                      (cfg.adam_beta1, cfg.adam_beta2), d.device.type == "cuda")

    def load(rows_: list[int]) -> EvalSet:
        kept, clip, eva = data_mod.load_rows(data.reader, rows_, data.keys)
        return EvalSet(kept, *layout.pairs_for_model(clip, eva, drop_cls))

    eval_rows = data.heldout_rows[:cfg.eval_samples]
    run = TrainingRun(cfg, d, run_dir, data, schedule, model, raw, ema, optimizer,
                      total, warmup, drop_cls, rows, load(eval_rows),
                      load(rows[:max(cfg.eval_samples, 1)]) if cfg.overfit_test_size else None)
    if resume_path is not None:
        restore(run, resume_path)
    return run


def check_same_split(run_dir: Path, data: data_mod.TrainData) -> None:
    """A resumed run must hold out what it held out before: another --eval_fraction, --group_by
    or --max_samples would train on samples the run's earlier steps were scored on."""
    path = run_dir / "split.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    new = data.split_record()
    if sorted(old.get("heldout_keys", [])) != sorted(new["heldout_keys"]):
        raise TrainingError(
            f"{path}: this run held out {old.get('num_heldout')} samples (eval_fraction "
            f"{old.get('eval_fraction')}, group_by {old.get('group_by')!r}) and the resumed one "
            f"would hold out {new['num_heldout']} others (eval_fraction {new['eval_fraction']}, "
            f"group_by {new['group_by']!r}); resume with the run's own split flags, or train "
            "into a new --output_dir")


def restore(run: TrainingRun, path: Path) -> None:
    """Continue from a checkpoint written with any world size."""
    state = ckpt.load_training_state(path, run.raw, run.ema, run.optimizer)
    run.step = state.step
    run.position = DataPosition.from_dict(state.meta["data_position"])
    saved_batch = int(state.meta.get("global_batch", run.schedule.global_batch))
    if saved_batch != run.schedule.global_batch:  # another world size / batch: same sample count
        samples = run.position.batch * saved_batch
        run.position = DataPosition(run.position.epoch, samples // run.schedule.global_batch)
        log(run.d, f"global micro-batch {saved_batch} -> {run.schedule.global_batch}: continuing at "
                   f"sample {samples} of epoch {run.position.epoch}")
    run.recent_losses = list(state.meta.get("recent_losses", []))
    ckpt.restore_rng(*state.rng)
    run.resumed_from = str(path)
    log(run.d, f"resumed from {path} at step {run.step} (epoch {run.position.epoch}, batch "
               f"{run.position.batch})")


def save(run: TrainingRun) -> None:
    """Gather full state dicts (every rank), write on rank 0 only."""
    meta = {"data_position": run.position.to_dict(), "world_size": run.d.world_size,
            "global_batch": run.schedule.global_batch,
            "scheduler": {"kind": "warmup_cosine", "total_steps": run.total_steps,
                          "warmup_steps": run.warmup, "min_lr_ratio": run.cfg.min_lr_ratio,
                          "base_lr": run.cfg.learning_rate},
            "recent_losses": run.recent_losses}
    state = ckpt.gather_training_state(run.step, run.raw, run.ema, run.optimizer, meta)
    if run.d.is_main:
        path = ckpt.save_checkpoint(run.run_dir, state, keep=run.cfg.keep_checkpoints)
        log(run.d, f"checkpoint {path}")
    barrier(run.d)


def export_ema(run: TrainingRun) -> None:
    """run_dir/model/: the EMA weights, save_pretrained (unsharded)."""
    state = ckpt.full_model_state(run.ema)
    if run.d.is_main:
        plain = build_model(run.raw.config)
        plain.load_state_dict(state)
        plain.save_pretrained(run.run_dir / "model")
    barrier(run.d)


def write_run_files(run: TrainingRun) -> None:
    if not run.d.is_main:
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.run_dir / "run_config.json", {
        "args": {**asdict(run.cfg), "data_dir": str(Path(run.cfg.data_dir).resolve())},
        "data_dir": str(Path(run.cfg.data_dir).resolve()),
        "model": run.raw.config.to_dict(),
        "flow": asdict(run.cfg.flow),
        "world_size": run.d.world_size,
        "global_batch": run.schedule.global_batch * run.cfg.grad_accum,
        "total_steps": run.total_steps,
        "warmup_steps": run.warmup,
        "drop_cls": run.drop_cls,
        "eva_repro_version": __version__,
        "torch_version": torch.__version__,
        "manifest": {k: v for k, v in run.data.manifest.data.items() if k != "shards"},
    })
    atomic_write_json(run.run_dir / "split.json", run.data.split_record())


def _loader(run: TrainingRun) -> Iterator[data_mod.Batch]:
    dataset = data_mod.BatchReader(run.data.reader, run.data.keys)
    stream = run.schedule.stream(run.position, run.d.rank, run.d.world_size)
    workers = run.cfg.num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=stream, num_workers=workers,
        pin_memory=run.d.device.type == "cuda", prefetch_factor=4 if workers else None,
        collate_fn=data_mod.keep_batch,
        worker_init_fn=data_mod.worker_init)
    return iter(loader)


def train_step(run: TrainingRun, batches: Iterator[data_mod.Batch], stats: dict[str, Any]
               ) -> tuple[float, float, float, int, float]:
    """One optimiser step over grad_accum micro-batches -> (loss, cosine, grad norm, samples,
    data wait seconds). A non-finite step is skipped (no update) and counted."""
    cfg, d = run.cfg, run.d
    optim.set_lr(run.optimizer, cfg.learning_rate * optim.lr_multiplier(
        run.step, run.total_steps, run.warmup, cfg.min_lr_ratio))
    loss_sum, cos_sum, n_valid, wait = 0.0, 0.0, 0.0, 0.0
    run.optimizer.zero_grad(set_to_none=True)
    for micro in range(cfg.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        for bad in batch.bad:
            stats["skipped_samples"] += 1
            log(d, f"skipping sample {bad}")
        run.position = run.schedule.advance(batch.position)
        b = batch.to(d.device)
        clip, eva = layout.pairs_for_model(b.clip, b.eva, run.drop_cls)
        x0, t, drop = draw_noise(b, tuple(eva.shape), cfg.flow, cfg.seed,
                                 run.schedule.global_batch, d.device)
        last = micro == cfg.grad_accum - 1
        sync = contextlib.nullcontext()
        if not last and hasattr(run.model, "no_sync"):
            sync = run.model.no_sync()
        elif hasattr(run.model, "set_requires_gradient_sync"):  # FSDP2
            run.model.set_requires_gradient_sync(last)
        with sync:
            with autocast(run.d.device):
                out = flow.velocity_loss(run.model, eva, clip, x0, t, drop, cfg.flow.loss_weight,
                                         mask=b.valid, prediction=run.raw.config.prediction)
            (out.loss / cfg.grad_accum).backward()
        n = float(b.valid.sum())
        loss_sum += float(out.loss.detach()) * n
        cos_sum += float(out.cosine) * n
        n_valid += n
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), cfg.grad_clip)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    loss_sum, cos_sum, n_valid = all_reduce_sum([loss_sum, cos_sum, n_valid], d)
    loss = loss_sum / max(n_valid, 1.0)
    cosine = cos_sum / max(n_valid, 1.0)
    if math.isfinite(loss) and math.isfinite(grad_norm):
        run.optimizer.step()
        optim.ema_update(run.ema, run.raw, run.step, cfg.ema_decay)
        stats["nonfinite_in_a_row"] = 0
    else:
        run.optimizer.zero_grad(set_to_none=True)
        stats["nonfinite_steps"] += 1
        stats["nonfinite_in_a_row"] += 1
        where = (f"step {run.step + 1}, batch {batch.position.batch} of epoch "
                 f"{batch.position.epoch}")
        log(d, f"non-finite loss/gradient ({loss:.3g}, grad norm {grad_norm:.3g}) at {where}: "
               "step skipped")
        if stats["nonfinite_in_a_row"] >= cfg.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{stats['nonfinite_in_a_row']} non-finite steps in a row, the last at {where}; "
                "lower --learning_rate, check the data, or resume from an earlier checkpoint")
    return loss, cosine, grad_norm, int(n_valid), wait


def train(config: TrainConfig | dict[str, Any],
          on_step: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train as configured; returns the summary (also written to run_dir/summary.json on rank 0).

    `on_step(step, record)` is called after every optimiser step (tests use it to simulate a crash).
    One writer per run directory: a second `train` on it stops before touching anything.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    validate_config(cfg)
    with contextlib.ExitStack() as stack:
        if int(os.environ.get("RANK", "0")) == 0:  # the ranks of one job are one writer
            stack.enter_context(DirectoryLock(cfg.output_dir, "eva-repro train"))
            remove_leftovers(Path(cfg.output_dir))
        return _train(cfg, on_step)


def remove_leftovers(run_dir: Path) -> list[str]:
    """Delete the temp files (`.<name>.<random>.tmp`) a killed run left in run_dir and
    run_dir/model/: never renamed into place, so never part of the run; say how many. Rank 0,
    holding the lock (checkpoints/ cleans its own half-written directories when it saves)."""
    removed = files.remove_leftovers(run_dir) + [
        f"model/{name}" for name in files.remove_leftovers(run_dir / "model")]
    if removed:
        print(f"removed {len(removed)} temp file(s) a killed run left in {run_dir} "
              f"({', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''})", file=sys.stderr)
    return removed


def _train(cfg: TrainConfig, on_step: Callable[[int, dict[str, Any]], None] | None) -> dict[str, Any]:
    run = setup(cfg)
    cfg, d = run.cfg, run.d
    write_run_files(run)
    metrics = MetricsLog(run.run_dir, d.is_main, cfg.tensorboard,
                         run.step if run.resumed_from else None)
    monitor = DebugMonitor(run.raw, d) if cfg.debug_mode else None
    log(d, f"{cfg.model_size}: {run.raw.num_parameters() / 1e6:.1f}M parameters, "
           f"{len(run.train_rows)} training / {len(run.data.heldout_rows)} held-out samples (key "
           f"hash < {cfg.eval_fraction:g}, at least min({MIN_HELDOUT}, samples / 5)"
           + (f"; grouped by {cfg.group_by!r}: {run.data.split_record()['num_heldout_groups']} of "
              f"{run.data.split_record()['num_groups']} groups held out" if cfg.group_by else "")
           + "), "
           f"global batch {run.schedule.global_batch * cfg.grad_accum}, {run.total_steps} steps "
           f"on {d.world_size} x {d.device} ({'FSDP2' if cfg.fsdp else 'DDP' if d.enabled else 'single'})")
    stats = {"skipped_samples": 0, "nonfinite_steps": 0, "nonfinite_in_a_row": 0}
    run.model.train()
    batches = _loader(run)
    interval = Interval()
    start_time = time.perf_counter()
    train_s = 0.0  # seconds in optimiser steps since this process started (the curves' x-axis)
    bar = progress_bar(total=run.total_steps, initial=run.step, unit="step", desc="train",
                       dynamic_ncols=True, disable=not (d.is_main and cfg.progress))
    with StopSignals() as signals:
        try:
            if run.step == 0:  # the untrained baseline, so the curve starts where learning starts
                metrics.write(heldout_scores(run))
            while run.step < run.total_steps:
                t0 = time.perf_counter()
                loss, cosine, norm, samples, wait = train_step(run, batches, stats)
                step_s = time.perf_counter() - t0
                train_s += step_s
                run.step += 1
                interval.add(loss, cosine, norm, samples, wait, step_s)
                if math.isfinite(loss):
                    run.recent_losses = (run.recent_losses + [loss])[-10:]
                record: dict[str, Any] = {"step": run.step, "loss": loss}
                if run.step % cfg.log_every == 0 or run.step == run.total_steps:
                    record = {"step": run.step, "epoch": run.position.epoch, **interval.record(),
                              "lr": run.optimizer.param_groups[0]["lr"],
                              "skipped_samples": stats["skipped_samples"],
                              "nonfinite_steps": stats["nonfinite_steps"]}
                    if monitor is not None:
                        record.update(monitor.check(run.step, norm))
                    metrics.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    sps=f"{record['samples_per_s']:.0f}")
                    interval.reset()
                if run.step % cfg.eval_every == 0 and run.step < run.total_steps:
                    metrics.write({**heldout_scores(run), "train_s": round(train_s, 2)})
                if run.step % cfg.save_every == 0 and run.step < run.total_steps:
                    save(run)
                bar.update(1)
                if on_step is not None:
                    on_step(run.step, record)
                if stop_requested(signals, d) and run.step < run.total_steps:
                    if run.step % cfg.save_every:
                        save(run)
                    log(d, f"{signals.received or 'a stop signal'}: stopped after step {run.step} "
                           f"with a checkpoint; rerun with --resume auto to continue")
                    raise Preempted(f"stopped on {signals.received or 'a signal'} at step {run.step} "
                                    f"of {run.total_steps}, checkpoint saved in {run.run_dir}")
            bar.close()
            save(run)
            export_ema(run)
            final_eval = {**heldout_scores(run), "train_s": round(train_s, 2)}
            metrics.write(final_eval)
            summary = _summary(run, final_eval, stats, time.perf_counter() - start_time)
            if d.is_main:
                atomic_write_json(run.run_dir / "summary.json", summary)
            return summary
        finally:
            bar.close()
            metrics.close()
            del batches
            if d.owns_group:
                dist.destroy_process_group()


def _summary(run: TrainingRun, final_eval: dict[str, Any], stats: dict[str, Any], seconds: float
             ) -> dict[str, Any]:
    recent = run.recent_losses
    summary = {
        "steps": run.step,
        "final_loss": float(np.mean(recent)) if recent else None,  # last 10 steps
        "last_loss": recent[-1] if recent else None,
        "heldout_cosine": final_eval["heldout_cosine"],
        "heldout_samples": len(run.eval_set.ids),
        "train_samples": len(run.train_rows),
        "target_norm": run.raw.config.target_norm,
        "params_m": round(run.raw.num_parameters() / 1e6, 3),
        "world_size": run.d.world_size,
        "global_batch": run.schedule.global_batch * run.cfg.grad_accum,
        "skipped_samples": stats["skipped_samples"],
        "nonfinite_steps": stats["nonfinite_steps"],
        "train_time_s": round(seconds, 2),
        "resumed_from": run.resumed_from,
    }
    if run.overfit_set is not None:
        summary["overfit_cosine"] = final_eval["overfit_cosine"]
        summary["overfit_samples"] = len(run.overfit_set.ids)
        summary["overfit_passed"] = (summary["overfit_cosine"] or 0.0) > OVERFIT_BAR
    return summary


def stop_requested(signals: StopSignals, d: Dist) -> bool:
    """Any rank signalled: every rank stops after the same step (one small all-reduce)."""
    flag = float(signals.received is not None)
    return all_reduce_sum([flag], d)[0] > 0 if d.enabled else bool(flag)


def run(args: argparse.Namespace) -> int:
    summary = train(config_from_args(args))
    if int(os.environ.get("RANK", "0")) == 0:
        keys = ("steps", "final_loss", "heldout_cosine", "overfit_cosine")
        print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0
