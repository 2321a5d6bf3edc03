"""Distributed plumbing for torchrun: this rank's place in the job and its device, the
collectives the trainer needs, and the one place that knows how DDP and FSDP2 modules differ
from a plain one (wrapping, gradient sync, gradient clipping, resharding). One process without
torchrun is a world of 1 (no group, unless FSDP2 asks for one)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from eva_repro.utils.devices import pick_device
from eva_repro.utils.errors import UserError

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this run created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launch_rank() -> int:
    """This process's rank in its torchrun job (0 without torchrun), known before any process
    group exists."""
    return int(os.environ.get("RANK", "0"))


def setup_distributed(device: str, need_group: bool = False) -> Dist:
    """Join the torchrun process group when launched by torchrun; pick this rank's device.

    `need_group` (FSDP2) makes a one-process group when not launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = launch_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    if dev.type == "cuda":
        if world > 1:  # one GPU per rank, whatever index was asked for
            dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = (world > 1 or need_group) and not dist.is_initialized()
    if owns and world > 1:
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    elif owns:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank, world, local, dev, owns)


def teardown_distributed(d: Dist) -> None:
    """Destroy the process group if this run created it (a group its caller made stays)."""
    if d.owns_group:
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    if not d.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank when it is true on any (one small all-reduce)."""
    return all_reduce_sum([float(flag)], d)[0] > 0


def run_on_main(fn: Callable[[], T], d: Dist) -> T:
    """fn() on rank 0 alone, its result on every rank: for work every rank needs the answer of
    but only one should do, like hashing a checkpoint's files. What rank 0 raises, it re-raises;
    the other ranks raise the same message (a UserError stays one)."""
    if not d.enabled:
        return fn()
    box: list[Any] = [None, None, False]  # result, error message, was it a UserError
    error: Exception | None = None
    if d.is_main:
        try:
            box[0] = fn()
        except Exception as e:  # the other ranks wait on the broadcast: tell them, then raise
            error, box[1], box[2] = e, str(e), isinstance(e, UserError)
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise UserError(box[1]) if box[2] else RuntimeError(f"rank 0 failed: {box[1]}")
    return box[0]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def wrap_model(model: torch.nn.Module, ema: torch.nn.Module, d: Dist, fsdp: bool = False,
               compiled: bool = False) -> torch.nn.Module:
    """DDP or FSDP2 (sharding blocks, then the root; the EMA copy is sharded the same way)."""
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        # the DiT returns a Linear output (a view after its reshape); nothing edits it in place
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        mesh = init_device_mesh(d.device.type, (d.world_size,))
        for m in (model, ema):
            for block in m.blocks:
                fully_shard(block, mesh=mesh)
            # the EMA copy only runs forward: reshard its root too, or its parameters stay
            # gathered (plain tensors) after evaluation and the EMA update mixes kinds
            fully_shard(m, mesh=mesh, reshard_after_forward=True)
        if compiled:
            model.compile()
        return model
    if compiled:
        model.compile()
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return model


def gradient_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """Context for one backward: reduce gradients across ranks (`sync`) or only accumulate them
    (the micro-batches before a step's last). DDP skips the all-reduce inside `no_sync()`, FSDP2
    by a flag; a plain module has nothing to reduce."""
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradients of a (possibly FSDP2-sharded) module to total norm `max_norm`; returns
    the norm before clipping, over every rank's shard."""
    return float(full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """An FSDP2-sharded tensor (DTensor) gathered whole; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def reshard(model: torch.nn.Module) -> None:
    """FSDP2: back to sharded parameters after forward-only use (evaluation), which leaves them
    gathered; nothing to do for other modules."""
    if hasattr(model, "reshard"):
        model.reshard()
