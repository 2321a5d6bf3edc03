"""Training from disk at real token sizes: steps/s, data-wait fraction, and flat peak memory.

Shards of real-size pairs (256 x 4096 EVA target, 256 x 1024 CLIP condition, fp16, ~2.6 MB per
sample) are written to a temp directory and dropped from the page cache, so reads come from disk.
Then (1) one full pass of the training data loader over the whole dataset (after a short warm-up
that starts the workers and fills the prefetch queue), sampling the memory of the process tree
(trainer + loader workers) every 0.1 s as PSS from /proc, so pages the forked workers share are
counted once: with rows mapped only while copied it must stay flat although the dataset is >= 4x the RSS
budget (full mode); (2) a short `eva_repro.training.train` run (tiny preset, batch 8) for steps/s and the
fraction of step time spent waiting for data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from eva_repro.data import loader as data_mod
from eva_repro.data import shards
from eva_repro.training.train import train
from eva_repro.utils.devices import pick_device

TOKENS, EVA_DIM, CLIP_DIM = 256, 4096, 1024
SAMPLE_BYTES = TOKENS * (EVA_DIM + CLIP_DIM) * 2
RSS_BUDGET_GB = 1.0  # the trainer + loader processes should fit in this beyond their baseline


def _pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (forked workers, page cache maps) counted once overall."""
    for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            with open(f"/proc/{pid}/{name}") as f:
                for line in f:
                    if line.startswith(key):
                        return int(line.split()[1]) * 1024
        except OSError:  # no smaps_rollup (old kernel) or the process just exited
            continue
    return 0


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def tree_rss_bytes(pid: int | None = None) -> int:
    """Resident memory of a process and all its descendants (trainer + loader workers), as PSS so
    pages the forked workers share with the trainer are not counted twice."""
    pid = os.getpid() if pid is None else pid
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += _pss_bytes(p)
        stack.extend(_children(p))
    return total


class RssSampler:
    """Background thread recording the process-tree RSS every `interval` seconds."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(tree_rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.start = tree_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.end = tree_rss_bytes()

    def report(self) -> dict[str, float | bool]:
        gb = 1024**3
        samples = self.samples or [self.start]
        half = len(samples) // 2
        first, second = max(samples[:half] or samples), max(samples[half:])
        peak = max(samples + [self.start, self.end])
        return {"rss_start_gb": round(self.start / gb, 3), "rss_peak_gb": round(peak / gb, 3),
                "rss_end_gb": round(self.end / gb, 3),
                "rss_growth_gb": round((peak - self.start) / gb, 3),
                "rss_peak_first_half_gb": round(first / gb, 3),
                "rss_peak_second_half_gb": round(second / gb, 3),
                # flat: reading the second half of the run needs no more memory than the first
                "rss_flat": second <= first * 1.05 + 64 * 1024**2}


def write_real_size_shards(out: Path, num_samples: int, shard_size: int = 64, seed: int = 0) -> None:
    """Random fp16 pairs at real size, written shard by shard (bounded memory), then evicted
    from the page cache so the benchmark reads from disk."""
    g = torch.Generator().manual_seed(seed)
    for index, start in enumerate(range(0, num_samples, shard_size)):
        n = min(shard_size, num_samples - start)
        clip = torch.randn(n, TOKENS, CLIP_DIM, generator=g, dtype=torch.float16)
        eva = torch.randn(n, TOKENS, EVA_DIM, generator=g, dtype=torch.float16)
        shards.write_shard(out, index, clip, eva, [f"bench-{i:07d}" for i in range(start, start + n)])
        del clip, eva
    shards.write_manifest(out, {"grid": 16, "include_cls": False, "dtype": "float16",
                                "encoders": {"bench": "random"}})
    for path in out.glob("shard-*.safetensors"):
        _evict(path)


def _evict(path: Path) -> None:
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def loader_pass(data_dir: Path, batch_size: int, workers: int) -> dict:
    """One epoch of the trainer's data path (schedule -> DataLoader workers -> fp32 batches)."""
    data = data_mod.open_training_data(data_dir, eval_fraction=0.0, verify_checksums=False,
                                       warn=False)  # its own fresh shards; times the reads
    schedule = data_mod.BatchSchedule(data.train_rows, [data.shard_of(r) for r in data.train_rows],
                                      batch_size)
    stream = schedule.stream(data_mod.DataPosition())
    loader = torch.utils.data.DataLoader(
        data_mod.BatchReader(data.reader, data.keys), batch_size=None, sampler=stream,
        num_workers=workers, prefetch_factor=4 if workers else None,
        collate_fn=data_mod.keep_batch,
        worker_init_fn=data_mod.worker_init)
    batches = schedule.batches_per_epoch
    warmup = max(2, batches // 10)  # workers started, prefetch queue full: the steady state
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    with RssSampler() as rss:
        checksum = 0.0
        for _ in range(batches - warmup):
            b = next(it).to(torch.device("cpu"))
            checksum += float(b.eva[:, 0, 0].sum())  # touch the data
    del it
    seconds = time.perf_counter() - start
    read_gb = (batches - warmup) * batch_size * SAMPLE_BYTES / 1e9
    return {"batches": batches, "warmup_batches": warmup, "seconds": round(seconds, 2),
            "samples_per_s": round((batches - warmup) * batch_size / seconds, 2),
            "read_gb": round(read_gb, 2), "read_gb_per_s": round(read_gb / seconds, 3),
            "workers": workers, **rss.report()}


def train_run(data_dir: Path, out: Path, steps: int, workers: int, device: str) -> dict:
    cfg = dict(data_dir=str(data_dir), output_dir=str(out), model_size="tiny", batch_size=8,
               max_steps=steps, log_every=max(1, steps // 4), save_every=10**9, eval_every=10**9,
               eval_samples=8, eval_sampler_steps=2, eval_fraction=0.01, num_workers=workers,
               verify_checksums=False, progress=False, tensorboard=False, device=device)
    with RssSampler() as rss:
        summary = train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "samples_per_s" in r]
    steady = records[1:] or records  # the first interval includes warm-up
    sps = sum(r["samples_per_s"] for r in steady) / len(steady)
    wait = sum(r["data_wait_fraction"] for r in steady) / len(steady)
    return {"steps": summary["steps"], "steps_per_s": round(sps / 8, 3),
            "samples_per_s": round(sps, 2), "data_wait_fraction": round(wait, 4),
            "workers": workers, **rss.report()}


def run(output_dir: Path, quick: bool) -> dict:
    device = pick_device().type
    budget_samples = int(RSS_BUDGET_GB * 1024**3 / SAMPLE_BYTES)
    num_samples = 96 if quick else 4 * budget_samples + 256  # >= 4x the RSS budget on disk
    steps = 4 if quick else (200 if device == "cuda" else 8)  # a real-size step is slow on a CPU
    workers = 2
    tmp = Path(tempfile.mkdtemp(prefix="eva-bench-train-"))
    try:
        start = time.perf_counter()
        write_real_size_shards(tmp / "shards", num_samples)
        write_s = time.perf_counter() - start
        dataset_gb = num_samples * SAMPLE_BYTES / 1024**3
        passes = loader_pass(tmp / "shards", 8, workers)
        for path in (tmp / "shards").glob("shard-*.safetensors"):
            _evict(path)  # cold again for the training run
        training = train_run(tmp / "shards", tmp / "run", steps, workers, device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # flat: the second half of the pass needs no more memory than the first (nothing grows with
    # the data read) and the whole pipeline, prefetch queue included, fits the budget
    flat = bool(passes["rss_flat"] and passes["rss_peak_gb"] <= RSS_BUDGET_GB)
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "shape": {"tokens": TOKENS, "target_dim": EVA_DIM, "cond_dim": CLIP_DIM,
                  "dtype_on_disk": "float16", "batch": 8, "preset": "tiny"},
        "dataset": {"samples": num_samples, "gb": round(dataset_gb, 2), "write_s": round(write_s, 1),
                    "rss_budget_gb": RSS_BUDGET_GB,
                    "dataset_over_budget": round(dataset_gb / RSS_BUDGET_GB, 2)},
        "loader_epoch": passes,
        "training": training,
        # > 1: the loader alone delivers more than the training step consumes (no starving)
        "loader_over_training": round(passes["samples_per_s"] / training["samples_per_s"], 2),
        "rss_flat": flat,
        "goal": "over a full pass of a dataset >= 4x the RSS budget (full mode), the memory of "
                "trainer + loader workers (PSS) stays within the budget and the second half of the "
                "pass needs no more than the first; data_wait_fraction near 0 when compute-bound",
    }
