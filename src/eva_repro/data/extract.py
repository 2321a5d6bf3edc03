"""`eva-repro extract`: images -> frozen EVA-CLIP (target) and CLIP (condition) tokens -> shards.

The input list (see `eva_repro.data.images.discover`) is cut into chunks of `shard_size` inputs;
chunk i becomes shard i, whatever the number of processes, so shard names are global:

* resume: a chunk is done when its record (`chunks/chunk-00007.json`: inputs, samples,
  failures) and, if it has samples, its shard exist and the shard still matches the sha256 of
  its sidecar (a shard damaged since is logged and extracted again); a rerun skips done
  chunks. A killed run
  loses at most the chunks in progress, and a resumed run writes exactly the shards an
  uninterrupted one would (batches never straddle chunks, so even float rounding matches).
* torchrun: chunk i goes to rank i % world_size; after a barrier rank 0 merges.
* merge (`--merge`, or automatically at the end): failures.jsonl rebuilt from the records,
  then manifest.json; it checks that inputs = samples + failures.

`extract_config.json` pins what determines the bytes on disk (encoders and their weights,
grid, mode, dtype, shard size, the input list); resuming with different settings is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from eva_repro import __version__
from eva_repro.data import shards
from eva_repro.data.encoders import (
    REGISTRY,
    TOKEN_SOURCES,
    FrozenEncoder,
    load_encoder,
    pool_grid,
)
from eva_repro.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIZE,
    Discovery,
    ImageDataset,
    InputItem,
    collate,
    discover,
    list_images,
)
from eva_repro.data.layout import TOKEN_MODES, select_tokens
from eva_repro.utils import files
from eva_repro.utils.devices import autocast, pick_device
from eva_repro.utils.distributed import Dist, barrier
from eva_repro.utils.errors import UserError
from eva_repro.utils.flags import add_flags, option, values
from eva_repro.utils.lockfile import DirectoryLock
from eva_repro.utils.preemption import Preempted, StopSignals, ignore_stop_signals
from eva_repro.utils.progress import progress_bar

__all__ = ["ExtractError", "Settings", "configure_parser", "extract", "list_images", "merge",
           "run", "run_extraction"]

CONFIG = "extract_config.json"
CHUNKS = "chunks"
CONFIG_FORMAT = "eva-repro-extract"
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
# Named target recipes: the settings they fix. BLIP3-o (JiuhaiChen/BLIP3o): EVA-CLIP-E-14-plus at
# 448 px, the last block's output without the final norm, CLS dropped, 32 x 32 average-pooled
# 4 x 4 to 8 x 8 = 64 tokens, raw scale.
RECIPES = {"blip3o": {"eva": "EVA02-E-14-plus", "eva_image_size": 448,
                      "eva_token_source": "last_block", "grid": 8, "training_mode": "patch_only"}}


class ExtractError(UserError):
    """A run that cannot start or finish: one line naming the problem and the fix."""


@dataclass
class Settings:
    """Everything an extraction depends on. `fingerprint()` is what the bytes depend on."""

    eva: str = option("EVA02-L-14", "target encoder (the names: --list_encoders)",
                      group="encoders")
    clip: str = option("ViT-L-14", "condition encoder (same choices)")
    eva_weights: str = option("auto", "auto | pretrained | random | PATH (file or snapshot dir)")
    clip_weights: str = option("auto", "as --eva_weights")
    grid: int = option(16, "patch grid per side: 16 native at 224 px, 8 = avg-pooled (BLIP3-o)",
                       group="tokens and shards")
    training_mode: str = option("patch_only", "patch_only drops the CLS token, cls_patch keeps it "
                                "first", choices=TOKEN_MODES)
    dtype: str = option("float16", "stored dtype", choices=list(shards.DTYPES))
    shard_size: int = option(512, "inputs per shard")
    encoder_depth: int | None = option(None, "keep only the first N blocks of both encoders "
                                       "(smoke runs)")
    seed: int = option(0, "seed of random-init encoders")
    min_size: int = option(DEFAULT_MIN_SIZE, "skip images smaller than this many px per side")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "skip images with more pixels (decompression "
                             "bombs)")
    limit: int | None = option(None, "use only the first N inputs")
    eva_image_size: int | None = option(None, "input resolution (default: the encoder's own; "
                                        "position embeddings are resampled)")
    clip_image_size: int | None = option(None, "as --eva_image_size")
    eva_token_source: str = option("final_norm", "final_norm: after the final norm; last_block: "
                                   "the last block's output before it", choices=TOKEN_SOURCES)
    clip_token_source: str = option("final_norm", "as --eva_token_source", choices=TOKEN_SOURCES)
    # not in the fingerprint: they change speed, not results
    batch_size: int = option(32, "images per encoder batch", group="speed")
    num_workers: int | None = option(None, "decode workers (default: up to 8 per GPU, fewer on "
                                     "CPU)")
    device: str | None = option(None, "default: cuda:LOCAL_RANK if available")
    autocast: str = option("bf16", "autocast dtype on CUDA (CPU always runs fp32)",
                           choices=list(AUTOCAST))
    progress: bool = option(True, "a progress bar (off: a line every few seconds)")

    def fingerprint(self) -> dict[str, Any]:
        keys = ("eva", "clip", "grid", "training_mode", "dtype", "shard_size", "encoder_depth",
                "seed", "min_size", "max_pixels", "limit")
        out = {k: getattr(self, k) for k in keys}
        # recorded only when set: at their defaults they leave the bytes as the keys above fix them
        for k in ("eva_image_size", "clip_image_size", "eva_token_source", "clip_token_source"):
            if getattr(self, k) != getattr(Settings, k):
                out[k] = getattr(self, k)
        return out

    @classmethod
    def from_recipe(cls, recipe: str | None, **values: Any) -> Settings:
        """Settings with a named recipe's values; a conflicting explicit value is an error."""
        if recipe is None:
            return cls(**values)
        if recipe not in RECIPES:
            raise ExtractError(f"unknown --recipe {recipe!r}; choose one of {sorted(RECIPES)}")
        for key, value in RECIPES[recipe].items():
            given = values.get(key)
            if given is not None and given != value:
                raise ExtractError(f"--recipe {recipe} sets --{key} {value}; drop --{key} "
                                   f"{given} or the recipe")
            values[key] = value
        return cls(**values)

    def validate(self) -> None:
        if self.training_mode not in TOKEN_MODES:
            raise ExtractError(f"--training_mode must be one of {TOKEN_MODES}, "
                               f"got {self.training_mode!r}")
        if self.dtype not in shards.DTYPES:
            raise ExtractError(f"--dtype must be one of {tuple(shards.DTYPES)}, got {self.dtype!r}")
        if self.autocast not in AUTOCAST:
            raise ExtractError(f"--autocast must be one of {tuple(AUTOCAST)}")
        for name in ("eva_token_source", "clip_token_source"):
            if getattr(self, name) not in TOKEN_SOURCES:
                raise ExtractError(f"--{name} must be one of {TOKEN_SOURCES}")
        for name in ("grid", "shard_size", "batch_size", "min_size", "max_pixels"):
            if getattr(self, name) < 1:
                raise ExtractError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ExtractError(f"--num_workers must be >= 0, got {self.num_workers}")
        if self.limit is not None and self.limit < 1:
            raise ExtractError(f"--limit must be >= 1 (the first N inputs), got {self.limit}")
        for name in ("encoder_depth", "eva_image_size", "clip_image_size"):  # None: the encoder's
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ExtractError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise ExtractError(f"--seed must be >= 0, got {self.seed}")


@dataclass
class Stats:
    images: int = 0  # inputs processed by this rank in this call (decoded or failed)
    samples: int = 0
    failures: int = 0
    seconds: float = 0.0  # from the first batch request to the last shard written
    chunks_written: int = 0
    chunks_skipped: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Result:
    manifest: dict[str, Any] | None
    stats: Stats = field(default_factory=Stats)


# ---------------------------------------------------------------------------------------------
# torchrun


def _join_job(device: str | None) -> Dist:
    """This rank's place in a torchrun job (one process: a world of 1) and its device. The
    group is gloo on any device: extraction only waits at barriers, and ranks may share a GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    owns = world > 1 and not torch.distributed.is_initialized()
    if owns:
        torch.distributed.init_process_group("gloo")
    return Dist(rank, world, local, dev, owns)


# ---------------------------------------------------------------------------------------------
# plan: chunks, config, resume state


def chunk_path(out_dir: Path, index: int) -> Path:
    return out_dir / CHUNKS / f"chunk-{index:05d}.json"


def _inputs_digest(items: Sequence[InputItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.key}\t{it.source}\n".encode())
    return h.hexdigest()


def _provenance_id(prov: dict[str, Any]) -> dict[str, Any]:
    """Provenance minus where the weights happen to lie (same sha256 = same weights)."""
    return {k: v for k, v in prov.items() if k != "weights_path"}


def _make_config(settings: Settings, inputs: Sequence[str], discovery: Discovery,
                 encoders: dict[str, FrozenEncoder]) -> dict[str, Any]:
    return {
        "format": CONFIG_FORMAT,
        "version": 1,
        "created_by": f"eva-repro {__version__}",
        "settings": settings.fingerprint(),
        "encoders": {role: enc.provenance for role, enc in encoders.items()},
        "inputs": list(inputs),
        "num_inputs": discovery.num_inputs,
        "num_items": len(discovery.items),
        "num_chunks": math.ceil(len(discovery.items) / settings.shard_size),
        "inputs_sha256": _inputs_digest(discovery.items),
        "discovery_failures": discovery.failures,
    }


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a directory's extraction config and a new run's, one phrase each."""
    diff = [f"settings.{k}" for k in new["settings"]
            if old.get("settings", {}).get(k) != new["settings"][k]]
    for role in new["encoders"]:
        if _provenance_id(old.get("encoders", {}).get(role, {})) != \
                _provenance_id(new["encoders"][role]):
            diff.append(f"{role} encoder/weights")
    if old.get("inputs_sha256") != new["inputs_sha256"]:
        given = ("" if old.get("inputs") == new["inputs"] else
                 f"; given as {_shown(old.get('inputs'))}, now {_shown(new['inputs'])}")
        diff.append(f"input list ({old.get('num_inputs')} -> {new['num_inputs']} inputs{given})")
    return diff


def _shown(inputs: Sequence[str] | None) -> str:
    inputs = list(inputs or [])
    return ", ".join(inputs[:2]) + (f" and {len(inputs) - 2} more" if len(inputs) > 2 else "")


def _report_leftovers(out_dir: Path, removed: list[str]) -> None:
    if removed:
        print(f"removed {len(removed)} temp file(s) a killed run left in {out_dir} "
              f"({', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''})", file=sys.stderr)


def _prepare_output(out_dir: Path, config: dict[str, Any], d: Dist) -> None:
    """Write the config on a fresh directory; refuse to resume one made with other settings."""
    path = out_dir / CONFIG
    if path.exists():
        old = json.loads(path.read_text())
        diff = config_diff(old, config)
        if diff:
            raise ExtractError(f"{path}: this directory holds an extraction with a different "
                               f"{', '.join(diff)}; use a new --output_dir, or the same "
                               "arguments to resume it")
        return
    if not d.is_main:  # rank 0 checks and writes; looking here would race with its first shard
        return
    if any(out_dir.glob("shard-*.json")):
        raise ExtractError(f"{out_dir}: holds shards not written by `eva-repro extract` (no "
                           f"{CONFIG}); use a new --output_dir")
    files.atomic_write_json(path, config)


def _read_record(out_dir: Path, index: int) -> dict[str, Any] | None:
    path = chunk_path(out_dir, index)
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except json.JSONDecodeError:
        return None  # a torn record cannot exist (atomic writes); treat as not done anyway


def finished_chunks(out_dir: Path, num_chunks: int) -> dict[int, dict[str, Any]]:
    """Chunk index -> record, for chunks whose record and (if non-empty) shard are committed."""
    done_shards = shards.finished_shards(out_dir)
    done = {}
    for i in range(num_chunks):
        rec = _read_record(out_dir, i)
        if rec is not None and (rec["num_samples"] == 0 or i in done_shards):
            done[i] = rec
    return done


def _redo_damaged(out_dir: Path, finished: Sequence[int], rank: int) -> list[int]:
    """The finished chunks (of this rank) whose shard fails its sidecar's sha256, each logged:
    a resumed run extracts them again rather than count a damaged file as done."""
    finished_shards = shards.finished_shards(out_dir)
    damaged = shards.damaged_shards(out_dir, [finished_shards[c] for c in finished
                                              if c in finished_shards])
    for c, why in damaged.items():
        print(f"[extract] {why}; extracting chunk {c} again", file=sys.stderr)
        _log(out_dir, rank, {"chunk": c, "redo": why})
    return sorted(damaged)


# ---------------------------------------------------------------------------------------------
# the pipeline


def _chunks(items: Sequence[InputItem], size: int) -> list[list[InputItem]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def _batches(chunk_sizes: Sequence[int], batch_size: int) -> tuple[list[list[int]], list[int]]:
    """Per-chunk batches of flat dataset indices (never across a chunk) and each one's chunk."""
    batches, owner, start = [], [], 0
    for c, n in enumerate(chunk_sizes):
        for b in range(0, n, batch_size):
            batches.append(list(range(start + b, start + min(b + batch_size, n))))
            owner.append(c)
        start += n
    return batches, owner


def encode_batch(enc: FrozenEncoder, pixels: dict[int, torch.Tensor], settings: Settings,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """One encoder on one batch of pixels (keyed by input size) -> its tokens in the shards'
    layout and dtype, on the CPU: normalise, encode (autocast on CUDA), pool to the grid, keep
    or drop the CLS token."""
    x = enc.normalize(pixels[enc.image_size])
    with autocast(x.device, AUTOCAST[settings.autocast]):
        tokens = enc(x)
    tokens = select_tokens(pool_grid(tokens.float(), settings.grid), settings.training_mode)
    return tokens.to(out_dtype).cpu()  # cast on the device: half the bytes to copy back


def _write_chunk(out_dir: Path, index: int, items: Sequence[InputItem],
                 buf: dict[str, Any], settings: Settings) -> None:
    """Record first, shard second: the chunk counts as done only once both exist."""
    record = {"index": index, "num_inputs": len(items), "num_samples": len(buf["keys"]),
              "failures": buf["failures"]}
    files.atomic_write_json(chunk_path(out_dir, index), record)
    if buf["keys"]:
        shards.write_shard(out_dir, index, torch.cat(buf["clip"]), torch.cat(buf["eva"]),
                           buf["keys"], buf["captions"], settings.dtype)


def _log(out_dir: Path, rank: int, record: dict[str, Any]) -> None:
    path = out_dir / "logs" / f"extract-rank{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def _default_workers(device: torch.device, world: int) -> int:
    cpus = os.cpu_count() or 2
    if device.type == "cuda":
        return max(1, min(8, cpus // world))
    return max(0, min(4, cpus // world - 1))  # the CPU forward needs the cores too


def run_pipeline(out_dir: Path, chunks: Sequence[Sequence[InputItem]], todo: Sequence[int],
                 eva: FrozenEncoder, clip: FrozenEncoder, settings: Settings,
                 device: torch.device, rank: int = 0) -> Stats:
    """Decode, encode and write the chunks `todo` (global indices into `chunks`)."""
    stats = Stats()
    if not todo:
        return stats
    flat = [it for c in todo for it in chunks[c]]
    batches, owner = _batches([len(chunks[c]) for c in todo], settings.batch_size)
    dataset = ImageDataset(flat, [eva.image_size, clip.image_size],
                           min_size=settings.min_size, max_pixels=settings.max_pixels)
    workers = (settings.num_workers if settings.num_workers is not None
               else _default_workers(device, 1))
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        worker_init_fn=ignore_stop_signals)
    out_dtype = shards.DTYPES[settings.dtype]
    remaining = {c: len(chunks[c]) for c in todo}
    bufs: dict[int, dict[str, Any]] = {}
    bar = progress_bar(total=len(flat), unit="img", desc=f"extract[rank {rank}]" if rank else "extract",
               disable=not settings.progress or rank != 0, dynamic_ncols=True)
    start = chunk_start = time.perf_counter()
    with torch.inference_mode(), StopSignals() as signals:
        for batch, k in zip(loader, owner, strict=True):
            c = todo[k]
            buf = bufs.setdefault(c, {"clip": [], "eva": [], "keys": [], "captions": [],
                                      "failures": []})
            for idx, reason in batch.failures:
                it = flat[idx]
                buf["failures"].append({"path": it.source, "key": it.key, "reason": reason})
            if batch.indices:
                buf["eva"].append(encode_batch(eva, batch.pixels, settings, out_dtype))
                buf["clip"].append(encode_batch(clip, batch.pixels, settings, out_dtype))
                buf["keys"] += [flat[i].key for i in batch.indices]
                buf["captions"] += batch.captions
            n = len(batch.indices) + len(batch.failures)
            remaining[c] -= n
            stats.images += n
            stats.samples += len(batch.indices)
            stats.failures += len(batch.failures)
            bar.update(n)
            if remaining[c] == 0:
                _write_chunk(out_dir, c, chunks[c], bufs.pop(c), settings)
                stats.chunks_written += 1
                now = time.perf_counter()
                secs = now - chunk_start
                _log(out_dir, rank, {"chunk": c, "inputs": len(chunks[c]),
                                     "seconds": round(secs, 3),
                                     "images_per_s": round(len(chunks[c]) / secs, 2)})
                chunk_start = now
                if signals.received:  # at a chunk boundary: nothing finished is lost
                    bar.close()
                    raise Preempted(f"stopped on {signals.received} after {stats.chunks_written} "
                                    f"chunks of this run; rerun the same command to resume")
    bar.close()
    stats.seconds = time.perf_counter() - start
    return stats


# ---------------------------------------------------------------------------------------------
# merge


def merge(output_dir: str | os.PathLike) -> dict[str, Any]:
    """failures.jsonl + manifest.json from the finished chunks; every chunk must be done."""
    out_dir = Path(output_dir)
    path = out_dir / CONFIG
    if not path.exists():
        raise ExtractError(f"{path}: missing; {out_dir} is not an `eva-repro extract` output "
                           "(run extract into it first)")
    config = json.loads(path.read_text())
    n = config["num_chunks"]
    done = finished_chunks(out_dir, n)
    missing = [i for i in range(n) if i not in done]
    if missing:
        raise ExtractError(f"{out_dir}: {len(missing)} of {n} chunks unfinished (first: "
                           f"{missing[0]}); re-run the same extract command to finish them")
    failures = list(config["discovery_failures"])
    for i in range(n):
        failures += done[i]["failures"]
    files.atomic_write_bytes(out_dir / shards.FAILURES,
                              "".join(json.dumps(f) + "\n" for f in failures).encode())
    finished = shards.finished_shards(out_dir)
    listed = [finished[i] for i in range(n) if done[i]["num_samples"] > 0]
    if not listed:
        raise ExtractError(f"{out_dir}: no input could be decoded (all {config['num_inputs']} "
                           f"failed); see {out_dir / shards.FAILURES}")
    s = config["settings"]
    meta = {
        "created_by": config["created_by"] + " extract",
        "grid": s["grid"],
        "include_cls": s["training_mode"] == "cls_patch",
        "training_mode": s["training_mode"],
        "dtype": s["dtype"],
        "token_layout": ("[CLS] + " if s["training_mode"] == "cls_patch" else "")
                        + f"{s['grid']}x{s['grid']} patches, row-major",
        "num_inputs": config["num_inputs"],
        "shard_size": s["shard_size"],
        "inputs": config["inputs"],
        "encoders": config["encoders"],
        "settings": s,
    }
    manifest = shards.write_manifest(out_dir, meta, listed)
    if manifest["num_samples"] + manifest["num_failures"] != config["num_inputs"]:
        raise ExtractError(f"{out_dir}: counts do not add up ({manifest['num_samples']} samples"
                           f" + {manifest['num_failures']} failures != {config['num_inputs']} "
                           "inputs); delete the directory and extract again")
    return manifest


# ---------------------------------------------------------------------------------------------
# entry points


def run_extraction(inputs: Any, output_dir: str | os.PathLike, settings: Settings,
                   encoders: tuple[FrozenEncoder, FrozenEncoder] | None = None) -> Result:
    """The whole job: discover, build encoders, extract this rank's chunks, merge.

    Pass `encoders` (eva, clip) to reuse already built ones (benchmarks)."""
    settings.validate()
    out_dir = Path(output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExtractError(f"{out_dir}: is a file, not a directory; choose another --output_dir")
    single = isinstance(inputs, (str, os.PathLike))
    inputs_list = [str(inputs)] if single else [str(p) for p in inputs]
    discovery = discover(inputs)  # missing inputs fail here, before any model is built
    if settings.limit is not None:
        discovery.items = discovery.items[:settings.limit]
    d = _join_job(settings.device)
    device = d.device
    lock = None
    try:
        if encoders is None:
            eva = load_encoder(settings.eva, settings.eva_weights, depth=settings.encoder_depth,
                               seed=settings.seed, device=device, flag="--eva",
                               image_size=settings.eva_image_size,
                               token_source=settings.eva_token_source)
            clip = load_encoder(settings.clip, settings.clip_weights,
                                depth=settings.encoder_depth, seed=settings.seed,
                                device=device, flag="--clip", image_size=settings.clip_image_size,
                                token_source=settings.clip_token_source)
        else:
            eva, clip = (e.to(device) for e in encoders)
        for enc, flag in ((eva, "--eva"), (clip, "--clip")):
            if settings.grid > enc.native_grid:
                raise ExtractError(f"--grid {settings.grid} is finer than {flag} "
                                   f"{enc.spec.name}'s native {enc.native_grid}x"
                                   f"{enc.native_grid} grid; use --grid {enc.native_grid} or less")
        config = _make_config(settings, inputs_list, discovery, {"eva": eva, "clip": clip})
        if d.is_main:  # one writer per directory; the ranks of this job are that writer
            lock = DirectoryLock(out_dir, "eva-repro extract").acquire()
            _report_leftovers(out_dir, files.remove_leftovers(out_dir) + [  # and a record's
                f"{CHUNKS}/{name}" for name in files.remove_leftovers(out_dir / CHUNKS)])
        out_dir.mkdir(parents=True, exist_ok=True)
        _prepare_output(out_dir, config, d)
        barrier(d)  # no rank writes a shard before rank 0 has checked the directory
        chunks = _chunks(discovery.items, settings.shard_size)
        done = finished_chunks(out_dir, len(chunks))
        mine = [c for c in range(len(chunks)) if c % d.world_size == d.rank]
        for c in _redo_damaged(out_dir, [c for c in mine if c in done], d.rank):
            del done[c]
        todo = [c for c in mine if c not in done]
        if settings.num_workers is None:
            settings.num_workers = _default_workers(device, d.world_size)
        stats = run_pipeline(out_dir, chunks, todo, eva, clip, settings, device, d.rank)
        stats.chunks_skipped = len(mine) - len(todo)
        barrier(d)  # every rank's shards are committed before the manifest covers them
        manifest = None
        error: Exception | None = None
        if d.is_main:
            try:
                manifest = merge(out_dir)
            except ExtractError as e:
                error = e  # still release the other ranks from the barrier below
        barrier(d)
        if error is not None:
            raise error
        if manifest is None and (out_dir / shards.MANIFEST).exists():
            manifest = json.loads((out_dir / shards.MANIFEST).read_text())
        return Result(manifest, stats)
    finally:
        if lock is not None:
            lock.release()
        if d.owns_group:
            torch.distributed.destroy_process_group()


def extract(inputs: Any, output_dir: str | os.PathLike, *, recipe: str | None = None,
            **settings: Any) -> dict[str, Any]:
    """Extract `inputs` (a folder, .tar files, a list file, or image paths) into shards in
    `output_dir`; resumes a partial run. Returns the manifest dict (see `eva_repro.data.shards`).
    Keyword arguments are `Settings` fields (eva, clip, grid, training_mode, ...); `recipe`
    (RECIPES, e.g. "blip3o") fixes the target encoder, its resolution and layer, and the pooling,
    and an explicit value that contradicts it is an error."""
    unknown = sorted(set(settings) - {f.name for f in fields(Settings)})
    if unknown:
        raise TypeError(f"extract() got unknown settings {unknown}; see extract.Settings")
    for key in ("eva_weights", "clip_weights"):  # paths are accepted as well as names
        if key in settings:
            settings[key] = str(settings[key])
    return run_extraction(inputs, output_dir, Settings.from_recipe(recipe, **settings)).manifest


# ---------------------------------------------------------------------------------------------
# CLI


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="image folders, webdataset .tar files, list files "
                   "(one path per line, optional TAB caption) or image files")
    p.add_argument("--input_dir", action="append", default=[], help="image folder (repeatable)")
    p.add_argument("--output_dir", help="shard directory to write (or resume, or --merge)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="a named target: blip3o = EVA02-E-14-plus at 448 px, last block before "
                        "the final norm, no CLS, 32x32 pooled 4x4 to 8x8 (BLIP3-o's tokens)")
    p.add_argument("--merge", action="store_true",
                   help="only write manifest.json + failures.jsonl from finished shards")
    p.add_argument("--list_encoders", action="store_true", help="print the registry and exit")
    # unset flags stay None, so a --recipe can fill them (Settings.from_recipe)
    add_flags(p, Settings(), unset=True)


def run(args: argparse.Namespace) -> int:
    if args.list_encoders:
        for name, spec in REGISTRY.items():
            print(f"{name:18s} {spec.backend:9s} {spec.arch:34s} {spec.image_size}px  {spec.note}")
        return 0
    if not args.output_dir:
        raise ExtractError("--output_dir is required")
    if args.merge:
        m = merge(args.output_dir)
        print(f"merged {len(m['shards'])} shards: {m['num_samples']} samples, "
              f"{m['num_failures']} failures -> {Path(args.output_dir) / shards.MANIFEST}")
        return 0
    inputs = list(args.inputs) + list(args.input_dir)
    if not inputs:
        raise ExtractError("no inputs: pass image folders / .tar / list files, or --input_dir")
    # flags left unset (None) take the recipe's value, else the Settings default
    given = {k: v for k, v in values(args, Settings).items() if v is not None}
    settings = Settings.from_recipe(args.recipe, **given)
    result = run_extraction(inputs, args.output_dir, settings)
    st = result.stats
    print(f"[extract] this process: {st.images} inputs in {st.seconds:.1f} s "
          f"({st.images_per_s:.1f} img/s), {st.chunks_written} chunks written, "
          f"{st.chunks_skipped} already done", file=sys.stderr)
    if result.manifest is not None:
        m = result.manifest
        print(f"{m['num_samples']} samples + {m['num_failures']} failures = {m['num_inputs']} "
              f"inputs; {len(m['shards'])} shards, {m['tokens']} tokens, clip {m['clip_dim']}-d,"
              f" eva {m['eva_dim']}-d -> {Path(args.output_dir) / shards.MANIFEST}")
    return 0
