"""`eva-repro train`: embedding shards -> DiT checkpoints; one process, DDP (torchrun) or FSDP2.

    eva-repro train --data_dir D --output_dir O [--model_size tiny] [--max_steps N] ...
    torchrun --nproc_per_node 8 -m eva_repro train ... [--fsdp]
    python train_eva_reproduction.py --chunked_embeddings_dir D --output_dir O ...   (same flags)

One optimiser step = `--grad_accum` micro-batches of `--batch_size` samples on every rank, so the
global batch is batch_size x ranks x grad_accum. Noise, t and the CFG drop of every example are
drawn from a generator seeded by (seed, data position, row in the global batch): a run is
reproducible whatever the world size, and a resumed run continues the exact trajectory.

Read top-down: the entry points (`train`, `run`); `setup`, which builds the frozen `Run` (what
stays fixed: config, data, models, optimiser) and the mutable `State` (step, data position,
counters); the loop (`train_loop`, `train_step`, `draw_noise`); checkpoints (`save`, `restore`,
`export_ema`); what a run logs (`StepLog`, `heldout_scores`, the summary).

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
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch import nn

from eva_repro import __version__
from eva_repro.data import layout
from eva_repro.data import loader as data_mod
from eva_repro.data.loader import BatchSchedule, DataPosition, TrainData
from eva_repro.data.shards import MIN_HELDOUT
from eva_repro.flow import sampling, transport
from eva_repro.flow.transport import token_cosine
from eva_repro.model import build_model
from eva_repro.model import checkpoint as ckpt
from eva_repro.training import optim
from eva_repro.training.init_from_data import fit_to_training_data
from eva_repro.training.monitoring import DebugMonitor, Interval, MetricsLog, log
from eva_repro.training.train_config import (
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
from eva_repro.utils import files, rng
from eva_repro.utils.devices import autocast
from eva_repro.utils.distributed import (
    Dist,
    all_reduce_sum,
    any_rank,
    barrier,
    clip_grad_norm,
    gradient_sync,
    launch_rank,
    reshard,
    run_on_main,
    setup_distributed,
    teardown_distributed,
    wrap_model,
)
from eva_repro.utils.files import atomic_write_json
from eva_repro.utils.lockfile import DirectoryLock
from eva_repro.utils.preemption import Preempted, StopSignals
from eva_repro.utils.progress import progress_bar

OnStep = Callable[[int, dict[str, Any]], None]

# ---------------------------------------------------------------------------------------------
# entry points


def train(config: TrainConfig | dict[str, Any], on_step: OnStep | None = None) -> dict[str, Any]:
    """Train as configured; returns the summary (also written to run_dir/summary.json on rank 0).

    `on_step(step, record)` is called after every optimiser step (tests use it to simulate a crash).
    One writer per run directory: a second `train` on it stops before touching anything.
    """
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
    validate_config(cfg)
    with contextlib.ExitStack() as stack:
        if launch_rank() == 0:  # the ranks of one job are one writer
            stack.enter_context(DirectoryLock(cfg.output_dir, "eva-repro train"))
            remove_leftovers(Path(cfg.output_dir))
        run, state = setup(cfg)
        return train_loop(run, state, on_step)


def run(args: argparse.Namespace) -> int:
    """`eva-repro train`: train, then print the summary's headline numbers as one JSON line."""
    summary = train(config_from_args(args))
    if launch_rank() == 0:
        keys = ("steps", "final_loss", "heldout_cosine", "overfit_cosine")
        print(json.dumps({k: summary[k] for k in keys if k in summary}))
    return 0


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


# ---------------------------------------------------------------------------------------------
# setup


@dataclass(frozen=True, eq=False)
class Run:
    """What stays fixed for the whole run, set up once (the modules' weights and the optimiser's
    state change in place; the fields do not)."""

    cfg: TrainConfig  # validated, --learning_rate resolved
    d: Dist
    run_dir: Path
    data: TrainData
    schedule: BatchSchedule  # the rows trained on (`schedule.rows`) and their order
    global_batch: int  # samples per optimiser step, all ranks and micro-batches together
    total_steps: int
    warmup: int
    drop_cls: bool
    model: nn.Module  # what forward/backward go through (DDP / FSDP wrapped)
    raw: nn.Module  # the DiT itself (FSDP: the sharded module)
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    eval_set: EvalSet
    overfit_set: EvalSet | None
    resumed_from: str | None = None


@dataclass
class State:
    """What changes as the run goes. A checkpoint keeps the step, the data position and the last
    losses; the counters and train_s are this process's."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    recent_losses: list[float] = field(default_factory=list)  # for the summary's final_loss
    skipped_samples: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    train_s: float = 0.0  # seconds in optimiser steps since this process started (the curves' x-axis)


@dataclass
class EvalSet:
    """Samples scored during training: their row ids (which key their noise), conditions, targets."""

    ids: list[int]
    clip: torch.Tensor
    eva: torch.Tensor


def setup(cfg: TrainConfig) -> tuple[Run, State]:
    """The process group, the data and its schedule, the models and optimiser, the eval sets; a
    resumed run's weights and state from its checkpoint. `cfg` is validated (`train` does it)."""
    if cfg.learning_rate is None:
        cfg = replace(cfg, learning_rate=DEFAULT_LR.get(cfg.model_size, 3e-4))
    d = setup_distributed(cfg.device, need_group=cfg.fsdp)
    run_dir = Path(cfg.output_dir)
    if not cfg.resume:
        run_on_main(lambda: refuse_existing_run(run_dir), d)
    resume_path = run_on_main(lambda: ckpt.resolve_resume(run_dir, cfg.resume), d)
    seed_everything(cfg.seed)
    data, schedule = _open_data(cfg, d, run_dir, resume_path)
    total = _total_steps(cfg, schedule)
    drop_cls = layout.drops_cls(data.manifest.include_cls, token_mode(cfg, data.manifest))
    raw, ema = _build_models(cfg, data, schedule.rows, drop_cls, d, resume_path)
    # wrapped before the optimiser is built: FSDP2 replaces the parameters it shards
    model = wrap_model(raw, ema, d, fsdp=cfg.fsdp, compiled=cfg.compile)
    optimizer = optim.build_optimizer(raw, cfg.learning_rate, cfg.weight_decay,
                                      (cfg.adam_beta1, cfg.adam_beta2), d.device.type == "cuda")
    overfit_rows = schedule.rows[:max(cfg.eval_samples, 1)] if cfg.overfit_test_size else None
    run = Run(cfg=cfg, d=d, run_dir=run_dir, data=data, schedule=schedule,
              global_batch=schedule.global_batch * cfg.grad_accum, total_steps=total,
              warmup=cfg.warmup_steps if cfg.warmup_steps is not None else optim.default_warmup(total),
              drop_cls=drop_cls, model=model, raw=raw, ema=ema, optimizer=optimizer,
              eval_set=_eval_set(data, data.heldout_rows[:cfg.eval_samples], drop_cls),
              overfit_set=None if overfit_rows is None else _eval_set(data, overfit_rows, drop_cls))
    if resume_path is None:
        return run, State()
    return replace(run, resumed_from=str(resume_path)), restore(run, resume_path)


def refuse_existing_run(run_dir: Path) -> None:
    """A fresh run never writes over another: its metrics would be truncated and checkpoint
    rotation (by step number) would delete the new run's checkpoints, keeping the old ones."""
    found = ckpt.run_files(run_dir)
    if found:
        raise TrainingError(f"{run_dir}: holds another training run ({', '.join(found)}); pass "
                            "--resume auto to continue it, or a new --output_dir")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _open_data(cfg: TrainConfig, d: Dist, run_dir: Path, resume_path: Path | None
               ) -> tuple[TrainData, BatchSchedule]:
    """The split (a resumed run's must be its own) and the schedule of the rows trained on."""
    data = data_mod.open_training_data(cfg.data_dir, cfg.eval_fraction, cfg.max_samples,
                                       cfg.verify_checksums, group_by=cfg.group_by,
                                       warn=d.is_main)
    if resume_path is not None:
        check_same_split(run_dir, data)
    rows = _select_rows(cfg, data, d)
    micro = _micro_batch(cfg, len(rows), d)
    return data, BatchSchedule(rows, [data.shard_of(r) for r in rows], micro * d.world_size,
                               seed=cfg.seed)


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


def _build_models(cfg: TrainConfig, data: TrainData, rows: list[int], drop_cls: bool, d: Dist,
                  resume_path: Path | None) -> tuple[nn.Module, nn.Module]:
    """The DiT (same initial weights on every rank, fitted to its training rows unless resumed)
    and its EMA copy."""
    model_cfg = build_model_config(cfg, data.manifest, data_mod.target_norm(data.reader, rows,
                                                                            drop_cls=drop_cls))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    raw = build_model(model_cfg).to(d.device)
    if resume_path is None:  # a resumed run loads its own statistics and weights
        fit_to_training_data(raw, data.reader, rows, drop_cls, lambda message: log(d, message))
    ema = build_model(model_cfg).to(d.device)
    ema.load_state_dict(raw.state_dict())
    ema.requires_grad_(False)
    return raw, ema


def _eval_set(data: TrainData, rows: list[int], drop_cls: bool) -> EvalSet:
    kept, clip, eva = data_mod.load_rows(data.reader, rows, data.keys)
    return EvalSet(kept, *layout.pairs_for_model(clip, eva, drop_cls))


# ---------------------------------------------------------------------------------------------
# the loop


def train_loop(run: Run, state: State, on_step: OnStep | None = None) -> dict[str, Any]:
    """Step until total_steps (logging, evaluating and saving on their intervals; a stop signal
    saves and raises Preempted), then save, export the EMA model and return the summary."""
    write_run_files(run)
    log(run.d, describe(run))
    run.model.train()
    batches = _loader(run, state.position)
    start = time.perf_counter()
    logs = StepLog(run, state)
    with StopSignals() as signals:
        try:
            if state.step == 0:  # the untrained baseline, so the curve starts where learning starts
                logs.metrics.write(heldout_scores(run, state))
            while state.step < run.total_steps:
                record = _one_step(run, state, batches, logs)
                if on_step is not None:
                    on_step(state.step, record)
                if any_rank(signals.received is not None, run.d) and state.step < run.total_steps:
                    _stop(run, state, signals)
            logs.bar.close()
            return _finish(run, state, logs, start)
        finally:
            logs.close()
            del batches
            teardown_distributed(run.d)


def write_run_files(run: Run) -> None:
    if not run.d.is_main:
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run.run_dir / "run_config.json", {
        "args": {**asdict(run.cfg), "data_dir": str(Path(run.cfg.data_dir).resolve())},
        "data_dir": str(Path(run.cfg.data_dir).resolve()),
        "model": run.raw.config.to_dict(),
        "flow": asdict(run.cfg.flow),
        "world_size": run.d.world_size,
        "global_batch": run.global_batch,
        "total_steps": run.total_steps,
        "warmup_steps": run.warmup,
        "drop_cls": run.drop_cls,
        "eva_repro_version": __version__,
        "torch_version": torch.__version__,
        "manifest": {k: v for k, v in run.data.manifest.data.items() if k != "shards"},
    })
    atomic_write_json(run.run_dir / "split.json", run.data.split_record())


def describe(run: Run) -> str:
    """The run's first log line: model, split, batch, length, where it runs."""
    cfg, d = run.cfg, run.d
    grouped = ""
    if cfg.group_by:
        split = run.data.split_record()
        grouped = (f"; grouped by {cfg.group_by!r}: {split['num_heldout_groups']} of "
                   f"{split['num_groups']} groups held out")
    mode = "FSDP2" if cfg.fsdp else "DDP" if d.enabled else "single"
    return (f"{cfg.model_size}: {run.raw.num_parameters() / 1e6:.1f}M parameters, "
            f"{len(run.schedule.rows)} training / {len(run.data.heldout_rows)} held-out samples "
            f"(key hash < {cfg.eval_fraction:g}, at least min({MIN_HELDOUT}, samples / 5)"
            f"{grouped}), global batch {run.global_batch}, {run.total_steps} steps on "
            f"{d.world_size} x {d.device} ({mode})")


def _loader(run: Run, start: DataPosition) -> Iterator[data_mod.Batch]:
    """This rank's micro-batches from `start` on, read ahead by --num_workers processes."""
    dataset = data_mod.BatchReader(run.data.reader, run.data.keys)
    stream = run.schedule.stream(start, run.d.rank, run.d.world_size)
    workers = run.cfg.num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=stream, num_workers=workers,
        pin_memory=run.d.device.type == "cuda", prefetch_factor=4 if workers else None,
        collate_fn=data_mod.keep_batch,
        worker_init_fn=data_mod.worker_init)
    return iter(loader)


def _one_step(run: Run, state: State, batches: Iterator[data_mod.Batch], logs: StepLog
              ) -> dict[str, Any]:
    """Train one step, count it, log it; evaluate and save on their intervals. Returns the
    step's metrics record."""
    t0 = time.perf_counter()
    result = train_step(run, state, batches)
    seconds = time.perf_counter() - t0
    _advance(run, state, result, seconds)
    record = logs.step(state, result, seconds)
    if state.step % run.cfg.eval_every == 0 and state.step < run.total_steps:
        logs.metrics.write({**heldout_scores(run, state), "train_s": round(state.train_s, 2)})
    if state.step % run.cfg.save_every == 0 and state.step < run.total_steps:
        save(run, state)
    logs.bar.update(1)
    return record


@dataclass(frozen=True)
class StepResult:
    """What one optimiser step measured (loss and cosine: means over its valid samples on every
    rank) and where it left the data."""

    loss: float
    cosine: float
    grad_norm: float  # before clipping
    samples: int
    wait_s: float  # waiting for data
    skipped: int  # samples dropped for NaN / Inf
    last_batch: DataPosition  # its last micro-batch's position (named when it is non-finite)
    position: DataPosition  # the next micro-batch's

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def train_step(run: Run, state: State, batches: Iterator[data_mod.Batch]) -> StepResult:
    """One optimiser step, number state.step + 1, over --grad_accum micro-batches. A non-finite
    step is skipped (no update); `_advance` counts it."""
    cfg = run.cfg
    optim.set_lr(run.optimizer, cfg.learning_rate * optim.lr_multiplier(
        state.step, run.total_steps, run.warmup, cfg.min_lr_ratio))
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum, cos_sum, n_valid, wait, skipped = 0.0, 0.0, 0.0, 0.0, 0
    for micro in range(cfg.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        for bad in batch.bad:
            log(run.d, f"skipping sample {bad}")
        skipped += len(batch.bad)
        b = batch.to(run.d.device)
        clip, eva = layout.pairs_for_model(b.clip, b.eva, run.drop_cls)
        x0, t, drop = draw_noise(b, tuple(eva.shape), cfg.flow, cfg.seed,
                                 run.schedule.global_batch, run.d.device)
        out = _backward(run, eva, clip, x0, t, drop, b.valid, sync=micro == cfg.grad_accum - 1)
        n = float(b.valid.sum())
        loss_sum += float(out.loss.detach()) * n
        cos_sum += float(out.cosine) * n
        n_valid += n
    grad_norm = clip_grad_norm(run.raw, cfg.grad_clip)
    loss_sum, cos_sum, n_valid = all_reduce_sum([loss_sum, cos_sum, n_valid], run.d)
    result = StepResult(loss_sum / max(n_valid, 1.0), cos_sum / max(n_valid, 1.0), grad_norm,
                        int(n_valid), wait, skipped, batch.position,
                        run.schedule.advance(batch.position))
    if result.finite:
        run.optimizer.step()
        optim.ema_update(run.ema, run.raw, state.step, cfg.ema_decay)
    else:
        run.optimizer.zero_grad(set_to_none=True)
    return result


def draw_noise(
    batch: data_mod.Batch, shape: tuple[int, ...], flow_cfg: transport.FlowConfig, seed: int,
    global_batch: int, device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x0, t, drop) for the micro-batch in one counter-based draw (`utils.rng`) keyed by each
    example's index in the epoch's order, so an example's draw is the same whatever the world
    size, micro-batch or accumulation split, and a resumed run redraws exactly what the killed
    one would have."""
    first = batch.position.batch * global_batch + batch.offset
    examples = torch.arange(first, first + shape[0], dtype=torch.int64, device=device)
    keys = examples ^ rng.mix_seed("noise", seed, batch.position.epoch)
    per_example = math.prod(shape[1:])
    u = rng.uniform(keys, per_example + 2)  # x0's values, then t's, then the dropout's
    x0 = rng.normal_from_uniform(u[:, :per_example]).view(shape)
    t = transport.time_from_uniform(u[:, per_example], flow_cfg.time_scheme, flow_cfg.time_mean,
                                    flow_cfg.time_std, flow_cfg.time_shift)
    return x0, t, u[:, per_example + 1] < flow_cfg.cfg_dropout


def _backward(run: Run, eva: torch.Tensor, clip: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
              drop: torch.Tensor, valid: torch.Tensor, sync: bool) -> transport.FlowLoss:
    """One micro-batch's loss and its backward (scaled for accumulation); gradients are reduced
    across ranks only on the step's last micro-batch (`sync`)."""
    with gradient_sync(run.model, sync):
        with autocast(run.d.device):
            out = transport.velocity_loss(run.model, eva, clip, x0, t, drop, run.cfg.flow.loss_weight,
                                     mask=valid, prediction=run.raw.config.prediction)
        (out.loss / run.cfg.grad_accum).backward()
    return out


def _advance(run: Run, state: State, result: StepResult, seconds: float) -> None:
    """Count the step into the state; --max_nonfinite_steps non-finite steps in a row end the run."""
    state.step += 1
    state.position = result.position
    state.train_s += seconds
    state.skipped_samples += result.skipped
    if math.isfinite(result.loss):
        state.recent_losses = (state.recent_losses + [result.loss])[-10:]
    if result.finite:
        state.nonfinite_in_a_row = 0
        return
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    where = (f"step {state.step}, batch {result.last_batch.batch} of epoch "
             f"{result.last_batch.epoch}")
    log(run.d, f"non-finite loss/gradient ({result.loss:.3g}, grad norm {result.grad_norm:.3g}) "
               f"at {where}: step skipped")
    if state.nonfinite_in_a_row >= run.cfg.max_nonfinite_steps:
        raise TrainingDiverged(
            f"{state.nonfinite_in_a_row} non-finite steps in a row, the last at {where}; "
            "lower --learning_rate, check the data, or resume from an earlier checkpoint")


class TrainingDiverged(TrainingError, RuntimeError):
    """Too many consecutive non-finite steps; the message names the step, the batch and the fix.
    A TrainingError, so the CLI prints one `error:` line and exits 2 (still a RuntimeError, for
    callers that catch that)."""


def _stop(run: Run, state: State, signals: StopSignals) -> NoReturn:
    """A rank was signalled: every rank saves after this same step, then raises Preempted."""
    if state.step % run.cfg.save_every:
        save(run, state)
    log(run.d, f"{signals.received or 'a stop signal'}: stopped after step {state.step} "
               f"with a checkpoint; rerun with --resume auto to continue")
    raise Preempted(f"stopped on {signals.received or 'a signal'} at step {state.step} "
                    f"of {run.total_steps}, checkpoint saved in {run.run_dir}")


def _finish(run: Run, state: State, logs: StepLog, start: float) -> dict[str, Any]:
    """The last checkpoint, the exported EMA model, the final scores and the summary."""
    save(run, state)
    export_ema(run)
    final_eval = {**heldout_scores(run, state), "train_s": round(state.train_s, 2)}
    logs.metrics.write(final_eval)
    summary = _summary(run, state, final_eval, time.perf_counter() - start)
    if run.d.is_main:
        atomic_write_json(run.run_dir / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------------
# checkpoints


def save(run: Run, state: State) -> None:
    """Gather full state dicts (every rank), write on rank 0 only."""
    meta = {"data_position": state.position.to_dict(), "world_size": run.d.world_size,
            "global_batch": run.schedule.global_batch,  # samples per data position
            "scheduler": {"kind": "warmup_cosine", "total_steps": run.total_steps,
                          "warmup_steps": run.warmup, "min_lr_ratio": run.cfg.min_lr_ratio,
                          "base_lr": run.cfg.learning_rate},
            "recent_losses": state.recent_losses}
    saved = ckpt.gather_training_state(state.step, run.raw, run.ema, run.optimizer, meta)
    if run.d.is_main:
        path = ckpt.save_checkpoint(run.run_dir, saved, keep=run.cfg.keep_checkpoints)
        log(run.d, f"checkpoint {path}")
    barrier(run.d)


def restore(run: Run, path: Path) -> State:
    """Continue from a checkpoint written with any world size: its weights, EMA, optimiser and
    RNG go into this run; returns its state."""
    saved = ckpt.load_training_state(path, run.raw, run.ema, run.optimizer)
    position = DataPosition.from_dict(saved.meta["data_position"])
    per_position = run.schedule.global_batch
    saved_batch = int(saved.meta.get("global_batch", per_position))
    if saved_batch != per_position:  # another world size / batch: same sample count
        samples = position.batch * saved_batch
        position = DataPosition(position.epoch, samples // per_position)
        log(run.d, f"global micro-batch {saved_batch} -> {per_position}: continuing at "
                   f"sample {samples} of epoch {position.epoch}")
    ckpt.restore_rng(*saved.rng)
    log(run.d, f"resumed from {path} at step {saved.step} (epoch {position.epoch}, batch "
               f"{position.batch})")
    return State(saved.step, position, list(saved.meta.get("recent_losses", [])))


def export_ema(run: Run) -> None:
    """run_dir/model/: the EMA weights, save_pretrained (unsharded)."""
    state = ckpt.full_model_state(run.ema)
    if run.d.is_main:
        plain = build_model(run.raw.config)
        plain.load_state_dict(state)
        plain.save_pretrained(run.run_dir / "model")
    barrier(run.d)


# ---------------------------------------------------------------------------------------------
# what a run logs


class StepLog:
    """Where each step's numbers go: the interval's averages into metrics.jsonl / TensorBoard
    every --log_every steps (with --debug_mode's per-layer statistics), and the progress bar."""

    def __init__(self, run: Run, state: State):
        cfg, d = run.cfg, run.d
        self.run = run
        self.metrics = MetricsLog(run.run_dir, d.is_main, cfg.tensorboard,
                                  state.step if run.resumed_from else None)
        self.monitor = DebugMonitor(run.raw, d) if cfg.debug_mode else None
        self.interval = Interval()
        self.bar = progress_bar(total=run.total_steps, initial=state.step, unit="step",
                                desc="train", dynamic_ncols=True,
                                disable=not (d.is_main and cfg.progress))

    def step(self, state: State, result: StepResult, seconds: float) -> dict[str, Any]:
        """Add the step to the interval; on a log step write the interval's record. Returns the
        step's record (the interval's on a log step, else its loss)."""
        self.interval.add(result.loss, result.cosine, result.grad_norm, result.samples,
                          result.wait_s, seconds)
        if state.step % self.run.cfg.log_every and state.step != self.run.total_steps:
            return {"step": state.step, "loss": result.loss}
        record = {"step": state.step, "epoch": state.position.epoch, **self.interval.record(),
                  "lr": self.run.optimizer.param_groups[0]["lr"],
                  "skipped_samples": state.skipped_samples,
                  "nonfinite_steps": state.nonfinite_steps}
        if self.monitor is not None:
            record.update(self.monitor.check(state.step, result.grad_norm))
        self.metrics.write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             sps=f"{record['samples_per_s']:.0f}")
        self.interval.reset()
        return record

    def close(self) -> None:
        self.bar.close()
        self.metrics.close()


def heldout_scores(run: Run, state: State) -> dict[str, Any]:
    """Held-out (and, in overfit mode, training-set) sampled cosine of the EMA model."""
    cfg, d = run.cfg, run.d
    record: dict[str, Any] = {"step": state.step, "heldout_cosine": sampled_cosine(
        run.ema, run.eval_set, cfg, d.device)}
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    message = f"step {state.step}: sampled cosine (EMA) held-out {fmt(record['heldout_cosine'])}"
    if run.overfit_set is not None:
        record["overfit_cosine"] = sampled_cosine(run.ema, run.overfit_set, cfg, d.device)
        message += f", overfit set {fmt(record['overfit_cosine'])}"
    log(d, message)
    return record


@torch.no_grad()
def sampled_cosine(
    model: nn.Module, samples: EvalSet, cfg: TrainConfig, device: torch.device,
) -> float | None:
    """Sample targets for the set's conditions with the (EMA) model (`sampling.sample`, noise keyed
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
            x, _ = sampling.sample(model, c, samples.ids[start:start + cfg.batch_size],
                               cfg.eval_sampler_steps, cfg.eval_method, cfg.flow.time_shift)
        cos = token_cosine(x, e)
        total += float(cos.sum())
        count += cos.numel()
    reshard(model)
    model.train(was_training)
    return total / count


def _summary(run: Run, state: State, final_eval: dict[str, Any], seconds: float) -> dict[str, Any]:
    recent = state.recent_losses
    summary = {
        "steps": state.step,
        "final_loss": float(np.mean(recent)) if recent else None,  # last 10 steps
        "last_loss": recent[-1] if recent else None,
        "heldout_cosine": final_eval["heldout_cosine"],
        "heldout_samples": len(run.eval_set.ids),
        "train_samples": len(run.schedule.rows),
        "target_norm": run.raw.config.target_norm,
        "params_m": round(run.raw.num_parameters() / 1e6, 3),
        "world_size": run.d.world_size,
        "global_batch": run.global_batch,
        "skipped_samples": state.skipped_samples,
        "nonfinite_steps": state.nonfinite_steps,
        "train_time_s": round(seconds, 2),
        "resumed_from": run.resumed_from,
    }
    if run.overfit_set is not None:
        summary["overfit_cosine"] = final_eval["overfit_cosine"]
        summary["overfit_samples"] = len(run.overfit_set.ids)
        summary["overfit_passed"] = (summary["overfit_cosine"] or 0.0) > OVERFIT_BAR
    return summary
