"""The device and its autocast, decided in one place for every stage.

    device = pick_device(name, local_rank)   # None / "auto": this rank's GPU, else the CPU
    with autocast(device):                   # bf16 on CUDA; fp32 on the CPU
        ...

On the CPU nothing is autocast: a CPU without native bf16 emulates its matmuls, far slower than fp32.
"""

from __future__ import annotations

import contextlib
import os

import torch

from eva_repro.utils.errors import UserError


class DeviceError(UserError):
    """A device that this machine does not have."""


def pick_device(name: str | None = None, local_rank: int = 0) -> torch.device:
    """`name` (`cpu`, `cuda`, `cuda:1`, ...); None, "" or "auto": CUDA when there is one. A bare
    `cuda` is this process's GPU under torchrun (LOCAL_RANK modulo the visible GPUs)."""
    if not name or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"--device {name}: not a device name ({e}); use cpu, cuda or "
                          "cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name} but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS has one)."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count()) or 1


def device_of(module: torch.nn.Module) -> torch.device:
    """Where a model's parameters live."""
    return next(module.parameters()).device


def autocast(device: torch.device, dtype: torch.dtype | None = torch.bfloat16
             ) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on CUDA; on the CPU, or with dtype None, full precision."""
    if device.type == "cuda" and dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()
