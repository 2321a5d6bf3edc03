"""Training data over embedding shards: validation, held-out split, a resumable batch schedule.

    open_training_data(dir)  validates the shard directory (manifest, checksums, shapes), splits
                             the rows into train / held-out by key hash (`shards.split_indices`)
    BatchSchedule            the deterministic stream of global micro-batches: per epoch, shard
                             order is shuffled, then rows are shuffled within windows of
                             consecutive whole shards holding >= `window_rows` rows (locality for
                             the page cache; a smaller data set is one global shuffle), all from
                             (seed, epoch) only; a `DataPosition` (epoch, batch) resumes it exactly
    BatchReader              reads one rank's rows (`ShardReader`: bounded memory, fp16 on disk
                             -> fp32 on device), drops samples holding NaN/Inf (masked out,
                             reported by key)

Ranks slice every global micro-batch into disjoint contiguous parts (rank r takes rows
[r*B, (r+1)*B)), so N ranks with micro-batch B see exactly the rows one process sees with
micro-batch N*B. Memory stays bounded: rows are read on demand, mapped only while copied.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from eva_repro.data import shards
from eva_repro.data.shards import SPLIT_SALT, Manifest, ShardError, ShardReader
from eva_repro.utils.preemption import ignore_stop_signals
from eva_repro.utils.rng import mix_seed


class DataError(ShardError):
    """Training data that cannot be used; the message names the file or flag and the fix."""


# ---------------------------------------------------------------------------------------------
# validation and split


@dataclass
class TrainData:
    """A validated shard directory and its train / held-out split (global row indices)."""

    manifest: Manifest
    reader: ShardReader  # rows in bounded memory
    keys: list[str]  # keys of the rows in use (the first `max_samples` rows)
    train_rows: list[int]
    heldout_rows: list[int]
    eval_fraction: float
    max_samples: int | None
    salt: str = SPLIT_SALT
    group_by: str | None = None  # keys held out together (shards.group_of); None: each key alone

    @property
    def tokens(self) -> int:
        return self.manifest.tokens

    @property
    def clip_dim(self) -> int:
        return self.manifest.clip_dim

    @property
    def eva_dim(self) -> int:
        return self.manifest.eva_dim

    def shard_of(self, row: int) -> int:
        return self.reader.locate(row)[0]

    def split_record(self) -> dict[str, Any]:
        """The content of run_dir/split.json (see the contract)."""
        return {
            "data_dir": str(self.manifest.root.resolve()),
            "eval_fraction": self.eval_fraction,
            "salt": self.salt,
            **shards.split_grouping(self.keys, self.heldout_rows, self.group_by),
            "num_train": len(self.train_rows),
            "num_heldout": len(self.heldout_rows),
            "heldout_keys": [self.keys[i] for i in self.heldout_rows],
            "max_samples": self.max_samples,
        }


def open_training_data(
    data_dir: str | Path,
    eval_fraction: float = 0.05,
    max_samples: int | None = None,
    verify_checksums: bool = True,
    salt: str = SPLIT_SALT,
    group_by: str | None = None,
    warn: bool = True,
) -> TrainData:
    """Open and validate a shard directory (`shards.open_shards`: manifest, sizes and shapes,
    sha256 unless `verify_checksums` is False, then with a warning unless `warn` is False);
    every problem is a one-line `ShardError`."""
    reader = shards.open_shards(data_dir, verify_checksums, warn)  # what every reader checks
    manifest = reader.manifest
    keys = reader.keys()
    if len(keys) != len(reader):
        raise DataError(f"{manifest.root}: sidecars list {len(keys)} keys for {len(reader)} rows; "
                        "re-run `eva-repro extract --merge` to rewrite the manifest")
    if max_samples is not None:
        if max_samples < 1:
            raise DataError(f"--max_samples must be >= 1, got {max_samples}")
        keys = keys[:max_samples]
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"--eval_fraction must be in [0, 1), got {eval_fraction}")
    train, heldout = shards.split_indices(keys, eval_fraction, salt, group_by)
    if not train:
        raise DataError(f"{manifest.root}: no training rows left after the {eval_fraction:.0%} "
                        "held-out split" + (f" by --group_by {group_by!r} "
                        f"({shards.count_groups(keys, group_by)} group(s))" if group_by else "")
                        + "; lower --eval_fraction or add data")
    if eval_fraction > 0 and not heldout:  # refuse now, not after a run nothing can score
        raise DataError(f"{manifest.root}: {len(keys)} samples are too few to hold any out (the "
                        f"floor is a fifth of them, up to {shards.MIN_HELDOUT}); add data, or pass "
                        "--eval_fraction 0 to train without held-out evaluation")
    return TrainData(manifest, reader, keys, train, heldout, eval_fraction,
                     max_samples, salt, group_by)


# ---------------------------------------------------------------------------------------------
# the batch schedule


@dataclass(frozen=True)
class DataPosition:
    """Where the stream is: the next global micro-batch `batch` of epoch `epoch`."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataPosition:
        return cls(int(data["epoch"]), int(data["batch"]))


@dataclass
class BatchSchedule:
    """Deterministic global micro-batches over `rows`; the last partial batch of an epoch is dropped.

    `shard_of` groups rows for the window shuffle: consecutive shards (in the shuffled shard
    order) are mixed until a window holds `window_rows` rows, so a batch touches few memory maps.
    The window is in rows, not shards: a window of a fixed number of small shards would hold
    few rows, and consecutive batches would keep drawing from the same few.
    """

    rows: list[int]
    shard_of: list[int]  # shard index per entry of `rows`
    global_batch: int  # micro-batch per rank x world size
    seed: int = 0
    window_rows: int = 4096
    _cache: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise DataError(f"batch size must be >= 1, got {self.global_batch}")
        if self.global_batch > len(self.rows):
            raise DataError(f"global batch {self.global_batch} (--batch_size x ranks) is larger than "
                            f"the {len(self.rows)} training samples; lower --batch_size or add data")

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows) // self.global_batch

    def epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            self._cache.clear()  # one epoch at a time: bounded memory
            g = torch.Generator().manual_seed(mix_seed("order", self.seed, epoch))
            groups: dict[int, list[int]] = {}
            for row, shard in zip(self.rows, self.shard_of, strict=True):
                groups.setdefault(shard, []).append(row)
            shard_ids = list(groups)
            shard_ids = [shard_ids[i] for i in torch.randperm(len(shard_ids), generator=g).tolist()]
            order: list[int] = []
            window: list[int] = []
            for i, shard in enumerate(shard_ids):
                window += groups[shard]
                if len(window) >= self.window_rows or i == len(shard_ids) - 1:
                    order.extend(window[j] for j in torch.randperm(len(window), generator=g).tolist())
                    window = []
            self._cache[epoch] = order
        return self._cache[epoch]

    def global_batch_rows(self, pos: DataPosition) -> list[int]:
        start = pos.batch * self.global_batch
        return self.epoch_order(pos.epoch)[start:start + self.global_batch]

    def advance(self, pos: DataPosition, batches: int = 1) -> DataPosition:
        total = pos.epoch * self.batches_per_epoch + pos.batch + batches
        return DataPosition(*divmod(total, self.batches_per_epoch))

    def stream(self, start: DataPosition, rank: int = 0, world_size: int = 1
               ) -> Iterator[tuple[DataPosition, list[int], int]]:
        """Forever: (position, this rank's rows, offset of those rows in the global batch)."""
        micro = self.global_batch // world_size
        pos = start
        while True:
            rows = self.global_batch_rows(pos)
            yield pos, rows[rank * micro:(rank + 1) * micro], rank * micro
            pos = self.advance(pos)


# ---------------------------------------------------------------------------------------------
# reading batches


@dataclass
class Batch:
    clip: torch.Tensor  # [B, T, Dc] in the stored dtype (fp16 by default)
    eva: torch.Tensor  # [B, T, De]
    valid: torch.Tensor  # [B] bool: False for a sample dropped for NaN/Inf (its tensors are zeroed)
    position: DataPosition
    offset: int  # position of row 0 within the global micro-batch (for per-example noise)
    bad: list[str]  # "key: reason" for every dropped sample

    def pin_memory(self) -> Batch:  # DataLoader(pin_memory=True) calls this
        self.clip, self.eva = self.clip.pin_memory(), self.eva.pin_memory()
        return self

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Batch:
        """Copy to `device` in the stored dtype (half the bytes of fp32), convert there."""
        nb = device.type == "cuda"
        clip = self.clip.to(device, non_blocking=nb).to(dtype)
        eva = self.eva.to(device, non_blocking=nb).to(dtype)
        return Batch(clip, eva, self.valid.to(device), self.position, self.offset, self.bad)


class BatchReader(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole batches: `reader[(position, rows, offset)]`.

    Used with `DataLoader(batch_size=None, sampler=schedule.stream(...))` so worker processes
    read ahead (each with its own file handles).
    """

    def __init__(self, reader: ShardReader, keys: list[str]):
        self.reader, self.keys = reader, keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, item: tuple[DataPosition, list[int], int]) -> Batch:
        position, rows, offset = item
        return read_batch(self.reader, rows, self.keys, position, offset)


def worker_init(_worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: fix glibc's mmap threshold at 1 MiB.

    glibc raises its threshold to the size of the last freed large block, so after the first
    batch every multi-MB batch buffer comes from the heap instead of its own mapping and is not
    returned on free: worker memory grows batch after batch. With a fixed threshold each buffer
    is unmapped when freed and memory stays flat (`eva-repro bench --suite train` checks it).
    No-op off glibc. Also leaves SIGTERM / SIGUSR1 to the main process (preemption).
    """
    ignore_stop_signals()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD


def keep_batch(batch: Batch) -> Batch:
    """DataLoader collate_fn: items are whole batches already (a named function, not a lambda,
    so worker processes can pickle it under any start method)."""
    return batch


def read_batch(
    reader: ShardReader, rows: list[int], keys: list[str],
    position: DataPosition = DataPosition(), offset: int = 0,
) -> Batch:
    """Rows -> batch (stored dtype); a sample with a non-finite value is zeroed, masked, reported."""
    batch = reader.gather(rows)
    clip, eva = batch["clip"], batch["eva"]
    valid = shards.finite_samples(batch)
    bad = []
    if not bool(valid.all()):
        for i in (~valid).nonzero().flatten().tolist():
            shard, row = reader.locate(rows[i])
            bad.append(f"{keys[rows[i]]} ({reader.path(shard)} row {row}): NaN/Inf in the "
                       "embeddings, skipped")
        clip[~valid], eva[~valid] = 0.0, 0.0
    return Batch(clip, eva, valid, position, offset, bad)


def load_rows(reader: ShardReader, rows: list[int], keys: list[str]
              ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """A fixed (small) set of rows as (kept rows, fp32 clip, fp32 eva), non-finite samples
    dropped: eval sets."""
    m = reader.manifest
    if not rows:
        return [], torch.empty(0, m.clip_tokens, m.clip_dim), torch.empty(0, m.tokens, m.eva_dim)
    batch = read_batch(reader, rows, keys)
    kept = [r for r, ok in zip(rows, batch.valid.tolist(), strict=True) if ok]
    return kept, batch.clip[batch.valid].float(), batch.eva[batch.valid].float()


def evenly_spaced(rows: list[int], n: int) -> list[int]:
    """At most n of `rows`, evenly spaced: a bounded read of statistics on huge datasets."""
    return rows[::max(1, len(rows) // n)][:n]


def target_norm(reader: ShardReader, rows: list[int], max_rows: int = 256,
                drop_cls: bool = False) -> float:
    """Mean L2 norm of the raw target tokens over (up to `max_rows` evenly spaced) training rows:
    a mean over that many tokens is already stable, and reading more real-size rows would only
    slow the start."""
    total, count = 0.0, 0
    for r in evenly_spaced(rows, max_rows):
        eva = reader.read(r)["eva"][int(drop_cls):].float()
        norms = eva.norm(dim=-1)
        if torch.isfinite(norms).all():
            total += float(norms.sum())
            count += norms.numel()
    if count == 0:
        raise DataError(f"{reader.manifest.root}: every sampled training target holds NaN/Inf; "
                        "re-extract the shards")
    return total / count


WHITEN_SAMPLES = 1024  # 64k+ tokens for a D x D covariance; a bounded read on huge datasets


def condition_whitening(reader: ShardReader, rows: list[int], shrink: float,
                        drop_cls: bool = False, eps: float = 1e-6,
                        max_rows: int = WHITEN_SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [Dc], matrix [Dc, Dc]) that whiten the RMS-normalised condition tokens of (up to
    `max_rows` evenly spaced) training rows: with covariance U S U^T,
    matrix = U diag(1 / sqrt(S + shrink * mean(S))) * sqrt(1 + shrink), so a direction of
    average variance keeps it and none is amplified more than sqrt(1 + 1 / shrink) times.
    Float64 sums over the same rows: every rank computes the same matrix."""
    dim = reader.manifest.clip_dim
    total, outer, count = torch.zeros(dim, dtype=torch.float64), torch.zeros(
        dim, dim, dtype=torch.float64), 0
    for r in evenly_spaced(rows, max_rows):
        clip = reader.read(r)["clip"][int(drop_cls):].double()
        if not torch.isfinite(clip).all():
            continue  # the trainer skips such samples too
        x = F.rms_norm(clip, (dim,), eps=eps)  # the model's own normalisation of the condition
        total += x.sum(0)
        outer += x.T @ x
        count += x.shape[0]
    if count < 2:
        raise DataError(f"{reader.manifest.root}: no finite training condition to whiten with; "
                        "re-extract the shards or train with --model_override cond_whiten=null")
    mean = total / count
    cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
    values, vectors = torch.linalg.eigh(cov)
    values = values.clamp_min(0)
    matrix = vectors / (values + shrink * values.mean()).sqrt() * math.sqrt(1 + shrink)
    return mean.float(), matrix.float()
