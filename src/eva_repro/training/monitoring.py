"""What a training run tells its user: `metrics.jsonl` + TensorBoard (MetricsLog), one-line
progress messages on rank 0 (log), the averages of a log line (Interval), and --debug_mode's
per-layer gradient and activation statistics (DebugMonitor)."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from eva_repro.utils.distributed import Dist, full_tensor


class MetricsLog:
    """metrics.jsonl + TensorBoard on rank 0; nothing on other ranks."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # a killed run may have logged steps past its last checkpoint: they are redone
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        elif resume_step is None:
            self.path.write_text("")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is a dependency, but keep training without it
                warnings.warn("tensorboard is not installed: logging to metrics.jsonl only",
                              stacklevel=2)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def log(d: Dist, message: str) -> None:
    if d.is_main:
        print(f"[train] {message}", file=sys.stderr, flush=True)


class Interval:
    """Sums over the steps since the last log line."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.finite, self.samples = 0, 0
        self.loss, self.cos, self.norm = 0.0, 0.0, 0.0
        self.wait, self.busy = 0.0, 0.0  # seconds waiting for data / in training steps

    def add(self, loss: float, cosine: float, norm: float, samples: int, wait: float,
            seconds: float) -> None:
        """One step; its seconds exclude evaluation and checkpoints. A skipped (non-finite)
        step counts its samples and time but not its loss."""
        self.samples += samples
        self.wait += wait
        self.busy += seconds
        if math.isfinite(loss):
            self.finite += 1
            self.loss += loss
            self.cos += cosine
            self.norm += norm

    def record(self) -> dict[str, float]:
        """The interval's means: loss, velocity cosine and gradient norm over its finite steps,
        throughput and the fraction of its time spent waiting for data."""
        elapsed = max(self.busy, 1e-9)
        n = max(self.finite, 1)
        return {"loss": self.loss / n, "velocity_cosine": self.cos / n, "grad_norm": self.norm / n,
                "samples_per_s": self.samples / elapsed, "data_wait_fraction": self.wait / elapsed}


class DebugMonitor:
    """--debug_mode: per-layer gradient norms, zero / exploding gradient warnings, activations."""

    def __init__(self, model: nn.Module, d: Dist, explode_factor: float = 10.0):
        self.model, self.d, self.explode_factor = model, d, explode_factor
        self.activations: dict[str, dict[str, float]] = {}
        self.norm_history: list[float] = []
        self.handles = [m.register_forward_hook(self._hook(name))
                        for name, m in self._layers(model)]

    @staticmethod
    def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
        out = []
        for name, m in model.named_children():
            if isinstance(m, nn.ModuleList):
                out.extend((f"{name}.{i}", sub) for i, sub in enumerate(m))
            else:
                out.append((name, m))
        return out

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and torch.is_grad_enabled():
                y = output.detach().float()
                self.activations[name] = {"mean": float(y.mean()), "std": float(y.std()),
                                          "absmax": float(y.abs().max())}
        return hook

    def grad_norms(self) -> dict[str, float]:
        norms = {}
        for name, m in self._layers(self.model):
            sq = 0.0
            for p in m.parameters():
                if p.grad is not None:
                    g = full_tensor(p.grad)
                    sq += float(g.detach().float().pow(2).sum())
            norms[name] = math.sqrt(sq)
        return norms

    def check(self, step: int, total_norm: float) -> dict[str, float]:
        """Per-layer norms (and warnings) for the metrics record of this step."""
        norms = self.grad_norms()
        if step > 2:  # at step 1 the zero-initialised output layer blocks every other gradient
            zero = [n for n, v in norms.items() if v == 0.0]
            if zero:
                log(self.d, f"warning: step {step}: zero gradient in {zero}")
        median = float(np.median(self.norm_history)) if len(self.norm_history) >= 5 else None
        if median and total_norm > self.explode_factor * median:
            log(self.d, f"warning: step {step}: exploding gradient norm {total_norm:.3g} "
                        f"(> {self.explode_factor:g}x the running median {median:.3g})")
        if math.isfinite(total_norm):
            self.norm_history = (self.norm_history + [total_norm])[-100:]
        record = {f"grad_norm/{k}": v for k, v in norms.items()}
        for name, stats in self.activations.items():
            record.update({f"act/{name}/{k}": v for k, v in stats.items()})
        return record
