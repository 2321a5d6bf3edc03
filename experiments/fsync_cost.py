"""What the durable writes cost: saving the `large` DiT with fsync on vs off.

    python experiments/fsync_cost.py [--preset large] [--runs 3] [--dir /tmp]
                                     [--out experiments/results/fsync_cost.json]

Two saves of DiT(DiTConfig.preset(PRESET, target_dim=1024, cond_dim=1024, tokens=256)):

    checkpoint       checkpoint.save_checkpoint: model + EMA + AdamW moments + RNG (what the
                     trainer writes every --save_every steps)
    save_pretrained  the exported model directory (config.json + model.safetensors)

each timed `--runs` times with fsync on (as shipped) and off (files.fsync_path and os.fsync
replaced by no-ops: the renames stay atomic, nothing waits for the disk), interleaved on / off.
Before every timed save the page cache is flushed (os.sync, untimed) and the previous save is
deleted, so no save pays for another's dirty pages. "off" still ends with the data in the page
cache only: the kernel writes it back later (vm.dirty_* below decide when), which is the cost
fsync moves into the save. Reports the median seconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from eva_repro.model import DiT, DiTConfig, checkpoint
from eva_repro.utils import files

RESULTS = Path(__file__).resolve().parent / "results" / "fsync_cost.json"


@contextlib.contextmanager
def fsync_off():
    """Every fsync eva-repro makes becomes a no-op (fsync_path and the os.fsync of
    atomic_write_bytes); restored on exit."""
    saved = files.fsync_path, checkpoint.fsync_path, os.fsync
    files.fsync_path = checkpoint.fsync_path = lambda path: None
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        files.fsync_path, checkpoint.fsync_path, os.fsync = saved


def training_state(model: DiT) -> checkpoint.TrainingState:
    """A full training state of `model`'s size: EMA weights and AdamW's two moments per
    parameter (random: the bytes, not their values, are what is timed)."""
    model_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [name for name, _ in model.named_parameters()]
    state = {name: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(model_sd[name]),
                    "exp_avg_sq": torch.rand_like(model_sd[name])} for name in params}
    return checkpoint.TrainingState(
        step=1, model=model_sd, ema={k: v.clone() for k, v in model_sd.items()},
        optimizer={"state": state, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95),
                                                     "params": params}]},
        model_config=model.config.to_dict(), meta={"position": {"epoch": 0, "batch": 1}})


def bytes_under(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def timed_save(kind: str, model: DiT, state: checkpoint.TrainingState, work: Path,
               fsync: bool) -> tuple[float, int]:
    target = work / kind
    shutil.rmtree(target, ignore_errors=True)
    os.sync()  # start from a clean page cache: no save pays for the last one's write-back
    with contextlib.nullcontext() if fsync else fsync_off():
        start = time.perf_counter()
        if kind == "checkpoint":
            checkpoint.save_checkpoint(target, state, keep=1)
        else:
            model.save_pretrained(target)
        seconds = time.perf_counter() - start
    size = bytes_under(target)
    shutil.rmtree(target, ignore_errors=True)
    os.sync()
    return seconds, size


def filesystem(path: Path) -> dict:
    """The mount the saves went to (longest /proc/mounts prefix) and the kernel's write-back
    settings."""
    real, best = str(path.resolve()), ("?", "?", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mount, fstype = line.split()[:3]
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[1]):
                best = (dev, mount, fstype)
    vm = {}
    for name in ("dirty_ratio", "dirty_background_ratio", "dirty_expire_centisecs"):
        with contextlib.suppress(OSError):
            vm[name] = int(Path(f"/proc/sys/vm/{name}").read_text())
    return {"device": best[0], "mount": best[1], "type": best[2], "vm": vm,
            "free_gb": round(shutil.disk_usage(path).free / 1e9, 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="large")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the saves are written")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--kinds", nargs="+", default=["checkpoint", "save_pretrained"])
    args = p.parse_args(argv)
    torch.manual_seed(0)
    config = DiTConfig.preset(args.preset, target_dim=1024, cond_dim=1024, tokens=256)
    model = DiT(config)
    state = training_state(model) if "checkpoint" in args.kinds else None
    work = Path(tempfile.mkdtemp(prefix="fsync-cost-", dir=args.dir))
    results: dict = {}
    try:
        for kind in args.kinds:
            times: dict[str, list[float]] = {"on": [], "off": []}
            for _ in range(args.runs):
                for mode in ("on", "off"):
                    seconds, size = timed_save(kind, model, state, work, fsync=mode == "on")
                    times[mode].append(round(seconds, 3))
                    print(f"{kind:16s} fsync {mode:3s} {seconds:7.2f} s  ({size / 1e9:.2f} GB)",
                          file=sys.stderr)
            on, off = statistics.median(times["on"]), statistics.median(times["off"])
            results[kind] = {"bytes": size, "seconds": times, "median_on_s": on,
                             "median_off_s": off, "ratio_on_over_off": round(on / off, 2),
                             "extra_s": round(on - off, 3),
                             "on_gb_per_s": round(size / 1e9 / on, 3)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = {
        "what": "seconds to save the model with eva-repro's fsyncs on (as shipped) vs off "
                "(files.fsync_path and os.fsync no-ops); page cache flushed before each save; "
                "runs interleaved on/off",
        "model": {"preset": args.preset, "target_dim": 1024, "cond_dim": 1024, "tokens": 256,
                  "num_parameters": model.num_parameters()},
        "runs": args.runs, "results": results, "filesystem": filesystem(Path(args.dir)),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "command": "python experiments/fsync_cost.py " + " ".join(argv if argv is not None
                                                                   else sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
