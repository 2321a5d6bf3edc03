"""Embedding shards: the one on-disk format between extraction and training/evaluation.

A shard directory holds

    manifest.json               what the directory contains (written last, see `write_manifest`)
    shard-00000.safetensors     tensors `clip` [N, T, D_clip] and `eva` [N, T, D_eva]
    shard-00000.json            sidecar: keys, captions, sample count and sha256 of the tensors
    failures.jsonl              one line per input that was skipped, with its reason

A shard is finished when its sidecar exists: the tensors are renamed into place first and the
sidecar (which records their sha256) second, both atomically, so a killed writer leaves either
a finished shard or nothing that counts. Every command that reads shards opens them with
`open_shards`: manifest, sizes and shapes always, sha256 unless --no_verify (then it warns).
`ShardReader` reads only the rows it is asked for, so memory stays bounded whatever the data
size. No pickle anywhere.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from eva_repro.utils.errors import UserError
from eva_repro.utils.files import atomic_save_safetensors, atomic_write_json, sha256_file

FORMAT = "eva-repro-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FAILURES = "failures.jsonl"
TENSOR_KEYS = ("clip", "eva")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


class ShardError(UserError):
    """A shard directory or file that cannot be used; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------
# writing


def shard_stem(index: int) -> str:
    return f"shard-{index:05d}"


@dataclass
class ShardInfo:
    index: int
    file: str  # file name of the tensors, relative to the shard directory
    num_samples: int
    sha256: str
    keys: list[str] = field(default_factory=list, repr=False)
    captions: list[str | None] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        """What the manifest lists per shard (keys stay in the sidecar)."""
        return {k: v for k, v in asdict(self).items() if k not in ("keys", "captions")}


def write_shard(
    out_dir: str | os.PathLike,
    index: int,
    clip: torch.Tensor,
    eva: torch.Tensor,
    keys: Sequence[str],
    captions: Sequence[str | None] | None = None,
    dtype: str = "float16",
) -> ShardInfo:
    """Write one finished shard atomically: tensors first, then the sidecar that commits it."""
    n = len(keys)
    if clip.shape[0] != n or eva.shape[0] != n:
        raise ValueError(f"shard {index}: {n} keys but clip {tuple(clip.shape)}, eva {tuple(eva.shape)}")
    captions = list(captions) if captions is not None else [None] * n
    out_dir = Path(out_dir)
    stem = shard_stem(index)
    tensors = {"clip": clip.to(DTYPES[dtype]).cpu(), "eva": eva.to(DTYPES[dtype]).cpu()}
    atomic_save_safetensors(tensors, out_dir / f"{stem}.safetensors", {"format": FORMAT})
    info = ShardInfo(
        index=index,
        file=f"{stem}.safetensors",
        num_samples=n,
        sha256=sha256_file(out_dir / f"{stem}.safetensors"),
        keys=list(keys),
        captions=captions,
    )
    atomic_write_json(out_dir / f"{stem}.json", asdict(info))
    return info


def read_sidecar(path: str | os.PathLike) -> ShardInfo:
    try:
        data = json.loads(Path(path).read_text())
        return ShardInfo(**data)
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise ShardError(f"{path}: unreadable shard sidecar ({e}); delete it and its .safetensors "
                         "file and re-run extraction to rewrite that shard") from e


def finished_shards(out_dir: str | os.PathLike) -> dict[int, ShardInfo]:
    """Shards whose sidecar and tensors both exist (a resumed writer skips these)."""
    out_dir = Path(out_dir)
    done = {}
    for sidecar in sorted(out_dir.glob("shard-*.json")):
        info = read_sidecar(sidecar)
        if (out_dir / info.file).exists():
            done[info.index] = info
    return done


def damaged_shards(out_dir: str | os.PathLike, infos: Iterable[ShardInfo]) -> dict[int, str]:
    """index -> why, for finished shards whose tensors no longer match the sha256 their sidecar
    recorded (damaged or replaced after they were written): a resumed writer redoes these
    instead of trusting that a file that exists is the file it wrote."""
    out_dir, damaged = Path(out_dir), {}
    for info in infos:
        path = out_dir / info.file
        if sha256_file(path) != info.sha256:
            damaged[info.index] = (f"{path}: sha256 does not match its sidecar "
                                   f"{Path(info.file).stem}.json (damaged after it was written)")
    return damaged


def append_failures(out_dir: str | os.PathLike, failures: Iterable[dict[str, Any]]) -> None:
    """Append skipped inputs (`{"path": ..., "reason": ...}`) to failures.jsonl."""
    lines = "".join(json.dumps(f) + "\n" for f in failures)
    if lines:
        with open(Path(out_dir) / FAILURES, "a") as f:
            f.write(lines)


def read_failures(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(out_dir) / FAILURES
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_manifest(
    out_dir: str | os.PathLike, meta: dict[str, Any], shards: Sequence[ShardInfo] | None = None
) -> dict[str, Any]:
    """Write manifest.json covering `shards` (default: every finished shard in `out_dir`).

    `meta` carries what the writer knows: grid, tokens, include_cls, dtype, encoders provenance.
    Dims and counts are read back from the shards themselves so the manifest cannot disagree.
    """
    out_dir = Path(out_dir)
    shards = sorted(shards if shards is not None else finished_shards(out_dir).values(),
                    key=lambda s: s.index)
    if not shards:
        raise ShardError(f"{out_dir}: no finished shards to list in a manifest")
    with safe_open(str(out_dir / shards[0].file), framework="pt") as f:
        clip_shape = f.get_slice("clip").get_shape()
        eva_shape = f.get_slice("eva").get_shape()
    failures = read_failures(out_dir)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **meta,
        "num_samples": sum(s.num_samples for s in shards),
        "num_failures": len(failures),
        "tokens": eva_shape[1],
        "clip_tokens": clip_shape[1],
        "clip_dim": clip_shape[2],
        "eva_dim": eva_shape[2],
        "shards": [s.summary() for s in shards],
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class Manifest:
    root: Path
    data: dict[str, Any]

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.data["shards"]

    @property
    def num_samples(self) -> int:
        return int(self.data["num_samples"])

    @property
    def tokens(self) -> int:
        """Target (EVA) tokens per sample."""
        return int(self.data["tokens"])

    @property
    def clip_tokens(self) -> int:
        """Condition (CLIP) tokens per sample: the target's grid unless the writer used another."""
        return int(self.data.get("clip_tokens", self.data["tokens"]))

    @property
    def clip_dim(self) -> int:
        return int(self.data["clip_dim"])

    @property
    def eva_dim(self) -> int:
        return int(self.data["eva_dim"])

    @property
    def include_cls(self) -> bool:
        return bool(self.data.get("include_cls", False))

    @property
    def grid(self) -> int:
        return int(self.data["grid"])

    def sidecar(self, shard: dict[str, Any]) -> ShardInfo:
        return read_sidecar(self.root / (Path(shard["file"]).stem + ".json"))


def read_manifest(root: str | os.PathLike) -> Manifest:
    """Open a shard directory; every problem is a `ShardError` naming the path and the fix."""
    root = Path(root)
    if not root.is_dir():
        raise ShardError(f"{root}: shard directory does not exist; run `eva-repro extract` "
                         "(or `eva-repro synth`) with --output_dir pointing there first")
    path = root / MANIFEST
    if not path.exists():
        hint = ("it has shards but no manifest: run `eva-repro extract --merge --output_dir "
                f"{root}`" if any(root.glob("shard-*.json")) else "it holds no shards: run "
                "`eva-repro extract` (or `eva-repro synth`) into it first")
        raise ShardError(f"{path}: missing; {hint}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e}); re-run `eva-repro extract --merge`") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ShardError(f"{path}: not an {FORMAT} manifest (format={found!r})")
    if data.get("format_version", 0) > FORMAT_VERSION:
        raise ShardError(f"{path}: format version {data['format_version']} is newer than this "
                         f"eva-repro understands ({FORMAT_VERSION}); upgrade eva-repro")
    fix = (f"rewrite it (`eva-repro extract --merge --output_dir {root}` for an extraction) or "
           "write these shards again")
    if "shards" in data and not isinstance(data["shards"], list):
        raise ShardError(f"{path}: 'shards' is a {type(data['shards']).__name__}, not a list of "
                         f"shards; {fix}")
    if not data.get("shards") or data.get("num_samples", 0) == 0:
        raise ShardError(f"{path}: lists no samples; the extraction produced nothing usable "
                         f"(see {root / FAILURES})")
    optional = ("clip_tokens",) if "clip_tokens" in data else ()
    for key in ("num_samples", "tokens", "clip_dim", "eva_dim", *optional):
        if not isinstance(data.get(key), int) or isinstance(data[key], bool) or data[key] < 1:
            state = "missing" if key not in data else f"{data[key]!r}, not a positive integer"
            raise ShardError(f"{path}: '{key}' is {state}; {fix}")
    for shard in data["shards"]:
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str)
                and isinstance(shard.get("num_samples"), int)):
            raise ShardError(f"{path}: shard entry {shard!r} lacks 'file' / 'num_samples'; {fix}")
        if not (root / shard["file"]).exists():
            raise ShardError(f"{root / shard['file']}: listed in the manifest but missing; "
                             "restore it or re-run extraction into this directory")
    return Manifest(root=root, data=data)


NO_VERIFY_FIX = "or pass --no_verify to use it unchecked"
VERIFY_HELP = ("check the sha256 of every shard read (sizes and shapes are checked either way; "
               "--no_verify skips it with a warning)")


def verify_checksums(manifest: Manifest) -> None:
    """Raise `ShardError` for the first shard whose sha256 differs from the manifest."""
    for shard in manifest.shards:
        path = manifest.root / shard["file"]
        if sha256_file(path) != shard["sha256"]:
            raise ShardError(f"{path}: sha256 does not match {manifest.root / MANIFEST}; the file "
                             "is corrupt or was replaced: re-extract it or restore it, "
                             f"{NO_VERIFY_FIX}")


def check_shapes(reader: ShardReader) -> None:
    """Every shard holds [N, T, D] tensors that agree with the manifest, in one dtype, and is as
    long as its header says (a truncated copy fails here, before any row is read)."""
    manifest = reader.manifest
    want = {"clip": (manifest.clip_tokens, manifest.clip_dim), "eva": (manifest.tokens, manifest.eva_dim)}
    first_dtypes: dict[str, torch.dtype] = {}
    for i, shard in enumerate(manifest.shards):
        path, base, header = reader._header(i)
        specs = {k: reader.spec(k, i) for k in TENSOR_KEYS}
        dtypes = {k: dtype for k, (dtype, _) in specs.items()}
        found = {k: tuple(shape) for k, (_, shape) in specs.items()}
        first_dtypes = first_dtypes or dtypes
        if dtypes != first_dtypes:
            raise ShardError(f"{path}: dtypes {dtypes} differ from the first shard's {first_dtypes}; "
                             "re-extract the shards with one --dtype")
        for key, (tokens, dim) in want.items():
            n, t, d = (found[key] + (None, None, None))[:3]
            if len(found[key]) != 3 or (t, d) != (tokens, dim) or n != int(shard["num_samples"]):
                raise ShardError(
                    f"{path}: {key} has shape {list(found[key])} but {manifest.root / MANIFEST}"
                    f" says [{shard['num_samples']}, {tokens}, {dim}]; all shards of a directory "
                    "must come from the same encoders and grid: move this shard elsewhere or "
                    "re-extract it")
            begin, end = header[key]["data_offsets"]
            if end - begin != math.prod(found[key]) * dtypes[key].itemsize:
                raise ShardError(f"{path}: {key} spans {end - begin} bytes but shape "
                                 f"{list(found[key])} needs {math.prod(found[key]) * dtypes[key].itemsize}"
                                 "; the header is damaged: re-extract it")
        size = path.stat().st_size
        expected = base + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        if size != expected:
            raise ShardError(f"{path}: {size} bytes but its header describes {expected}; the file "
                             "is truncated or was damaged: re-extract it or restore it")


def open_shards(root: str | os.PathLike, verify: bool = True, warn: bool = True) -> ShardReader:
    """The one way every command opens shards to read (train, evaluate, sample, demo via them):
    the manifest (`read_manifest`), every shard's size, dtypes and shapes against it
    (`check_shapes`), and, unless `verify` is False (`--no_verify`), every shard's
    sha256; skipping that prints a one-line warning on stderr (unless `warn` is False)."""
    manifest = read_manifest(root)
    reader = ShardReader(manifest)
    check_shapes(reader)
    if verify:
        verify_checksums(manifest)
    elif warn:
        print(f"warning: --no_verify: the sha256 of the {len(manifest.shards)} shard(s) in "
              f"{manifest.root} was not checked (sizes and shapes were)", file=sys.stderr)
    return reader


def _read_exactly(fd: int, buf: np.ndarray, offset: int, what: str) -> None:
    """Fill `buf` from `offset` of the open file: a read may return fewer bytes than asked (the
    kernel caps one call near 2 GiB), and none at all means the file ends early."""
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], offset + done)
        except OSError as e:
            raise ShardError(f"{what} ({e}); re-extract it") from e
        if got == 0:
            raise ShardError(f"{what} (the file ends {len(view) - done} bytes early: truncated); "
                             "re-extract it")
        done += got


class ShardReader:
    """Row access to every shard of a manifest, in bounded memory.

    Rows are addressed globally (0 .. num_samples-1) in manifest order; `locate(i)` gives the
    (shard, row) pair. Each read copies exactly the bytes of its rows with one positioned read
    (`os.preadv`) and maps nothing: a reader that stayed mapped would keep every page it touched
    resident, so over an epoch its memory would grow to the dataset size (the page cache still
    serves repeated reads). Headers (safetensors: u64 length, JSON, raw bytes) are read once per
    shard and process; a pickled reader (a DataLoader worker) re-reads them lazily.
    """

    def __init__(self, manifest: Manifest | str | os.PathLike):
        self.manifest = manifest if isinstance(manifest, Manifest) else read_manifest(manifest)
        counts = [int(s["num_samples"]) for s in self.manifest.shards]
        self.offsets = [0]
        for c in counts:
            self.offsets.append(self.offsets[-1] + c)
        self._headers: dict[int, tuple[Path, int, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_headers": {}}

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} samples")
        shard = bisect.bisect_right(self.offsets, index) - 1
        return shard, index - self.offsets[shard]

    def path(self, shard: int) -> Path:
        return self.manifest.root / self.manifest.shards[shard]["file"]

    def _header(self, shard: int) -> tuple[Path, int, dict[str, Any]]:
        if shard not in self._headers:
            path = self.path(shard)
            try:
                with open(path, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
                if not all(header.get(k, {}).get("dtype") in SAFETENSORS_DTYPES for k in TENSOR_KEYS):
                    raise ValueError(f"needs {TENSOR_KEYS} as one of {sorted(SAFETENSORS_DTYPES)}")
            except (OSError, ValueError) as e:
                raise ShardError(f"{path}: unreadable safetensors shard ({e}); re-extract it") from e
            self._headers[shard] = (path, 8 + size, header)
        return self._headers[shard]

    def spec(self, key: str, shard: int = 0) -> tuple[torch.dtype, list[int]]:
        """(dtype, shape) of tensor `key` ('clip' or 'eva') as stored in a shard."""
        info = self._header(shard)[2][key]
        return SAFETENSORS_DTYPES[info["dtype"]], info["shape"]

    def read_into(self, shard: int, start: int, out: dict[str, torch.Tensor]) -> None:
        """Copy rows [start, start + len(out[k])) of one shard straight into the tensors `out`
        (one positioned read per tensor from the page cache, no mapping, no intermediate buffer)."""
        path, base, header = self._header(shard)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ShardError(f"{path}: cannot open ({e}); re-extract it") from e
        try:
            for key, dst in out.items():
                info = header[key]
                if SAFETENSORS_DTYPES[info["dtype"]] != dst.dtype:
                    raise ShardError(f"{path}: {key} is {info['dtype']} but other shards hold "
                                     f"{dst.dtype}; re-extract the shards with one --dtype")
                row_bytes = math.prod(info["shape"][1:]) * dst.dtype.itemsize
                flat = dst.view(torch.uint8).reshape(-1).numpy()
                _read_exactly(fd, flat, base + info["data_offsets"][0] + start * row_bytes,
                              f"{path}: cannot read rows {start}.. of {key}")
        finally:
            os.close(fd)

    def read_rows(self, shard: int, start: int, stop: int) -> dict[str, torch.Tensor]:
        """Rows [start, stop) of one shard as {'clip': ..., 'eva': ...} in the stored dtype."""
        out = {}
        for key in TENSOR_KEYS:
            dtype, shape = self.spec(key, shard)
            out[key] = torch.empty(stop - start, *shape[1:], dtype=dtype)
        self.read_into(shard, start, out)
        return out

    def gather(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """Global rows, in the order given, as {'clip': ..., 'eva': ...} in the stored dtype: the
        one row reader. Each run of consecutive rows of one shard is one read, straight into its
        slice of the result."""
        out = {}
        for key in TENSOR_KEYS:
            dtype, shape = self.spec(key)
            out[key] = torch.empty(len(rows), *shape[1:], dtype=dtype)
        start = 0
        while start < len(rows):
            shard, row = self.locate(rows[start])
            stop = start + 1
            last = min(len(rows), start + self.offsets[shard + 1] - rows[start])  # shard's end
            while stop < last and rows[stop] == rows[stop - 1] + 1:
                stop += 1
            self.read_into(shard, row, {k: v[start:stop] for k, v in out.items()})
            start = stop
        return out

    def batches(self, rows: Sequence[int], batch_size: int
                ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(rows, {'clip', 'eva'} float32) for `rows` in the given order, `batch_size` at a time."""
        for start in range(0, len(rows), batch_size):
            batch = list(rows[start:start + batch_size])
            yield batch, {k: v.float() for k, v in self.gather(batch).items()}

    def read(self, index: int) -> dict[str, torch.Tensor]:
        shard, row = self.locate(index)
        return {k: v[0] for k, v in self.read_rows(shard, row, row + 1).items()}

    def keys(self) -> list[str]:
        """Sample keys for every global row, in order (read from the sidecars)."""
        out: list[str] = []
        for shard in self.manifest.shards:
            out.extend(self.manifest.sidecar(shard).keys)
        return out


# ---------------------------------------------------------------------------------------------
# held-out split


def finite_samples(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N] bool: samples whose tensors (TENSOR_KEYS) are all finite. Every reader skips the
    others: the trainer masks them, the baselines leave them out."""
    return torch.stack([torch.isfinite(rows[k]).flatten(1).all(1) for k in TENSOR_KEYS]).all(0)


SPLIT_SALT = "eva-repro"  # the default salt of the key hash; a run records its own in split.json


def heldout_score(key: str, salt: str = SPLIT_SALT) -> float:
    """A stable uniform number in [0, 1) per key: the split depends on the key only, not order."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


MIN_HELDOUT = 8  # held-out floor when eval_fraction > 0, at most a fifth of the samples

# --group_by: the key up to its last separator, once the basename's extension is dropped
# ("video1/frame_0042.jpg" -> "video1/frame", "astronaut-view0003.jpg" -> "astronaut")
GROUP_PREFIX = "prefix"
GROUP_SEPARATORS = "/_-"


def group_of(key: str, group_by: str | None) -> str:
    """The group a key is held out with: the key itself (no grouping), its prefix up to the last
    separator (`group_by="prefix"`), or the first capture group of the regex `group_by` (the
    whole match without one), searched in the key. A key the regex does not match is an error:
    a silently ungrouped key would leak its group into both sides of the split."""
    if group_by is None:
        return key
    if group_by == GROUP_PREFIX:
        head, sep, base = key.rpartition("/")
        stem = base.rsplit(".", 1)[0] if "." in base[1:] else base
        name = head + sep + stem
        cut = max(name.rfind(c) for c in GROUP_SEPARATORS)
        return name[:cut] if cut > 0 else name
    match = group_pattern(group_by).search(key)
    if match is None:
        raise UserError(f"--group_by {group_by!r} does not match the key {key!r}; every key must "
                        f"match (its first group names the key's group), or use --group_by "
                        f"{GROUP_PREFIX} (the key up to its last {' '.join(GROUP_SEPARATORS)})")
    return match.group(1) if match.re.groups else match.group(0)


def group_pattern(group_by: str) -> re.Pattern[str]:
    try:
        return re.compile(group_by)
    except re.error as e:
        raise UserError(f"--group_by {group_by!r} is not a regular expression ({e}); pass a regex "
                        f"whose first group names the key's group, or {GROUP_PREFIX}") from None


def split_indices(
    keys: Sequence[str], eval_fraction: float, salt: str = SPLIT_SALT, group_by: str | None = None
) -> tuple[list[int], list[int]]:
    """Deterministic (train, heldout) row indices by key hash.

    A key is held out when its hash score is below eval_fraction. With eval_fraction > 0 on
    small data, the keys of lowest score are added until min(MIN_HELDOUT, len(keys) // 5) are
    held out, so a run of 20 photos at 5% still has held-out samples (4) to score.

    With `group_by` (see `group_of`) the hash is of each key's group, so every key of a group
    falls on the same side: all frames of a held-out video, all views of a held-out photo. The
    floor then counts groups, min(MIN_HELDOUT, groups // 5), and adds them lowest score first
    (without grouping every key is its own group: the same rule)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise UserError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    floor = min(MIN_HELDOUT, len(keys) // 5) if eval_fraction > 0 else 0
    if group_by is None:  # one key, one group
        scores = [heldout_score(key, salt) for key in keys]
        by_score = sorted(range(len(keys)), key=scores.__getitem__)
        cut = max(floor, sum(s < eval_fraction for s in scores))
        held = set(by_score[:cut])
    else:
        members: dict[str, list[int]] = {}
        for i, key in enumerate(keys):
            members.setdefault(group_of(key, group_by), []).append(i)
        score = {g: heldout_score(g, salt) for g in members}
        floor = min(MIN_HELDOUT, len(members) // 5) if eval_fraction > 0 else 0
        held = set()
        for n, g in enumerate(sorted(members, key=lambda g: (score[g], g))):
            if score[g] >= eval_fraction and n >= floor:
                break
            held.update(members[g])
    train = [i for i in range(len(keys)) if i not in held]
    return train, sorted(held)


def count_groups(keys: Iterable[str], group_by: str | None) -> int:
    return len({group_of(key, group_by) for key in keys})


def split_grouping(keys: list[str], heldout_rows: list[int], group_by: str | None) -> dict[str, Any]:
    """How the split grouped its keys, for split.json and the report: `group_by` (None: every
    key on its own) and the number of groups in all and held out."""
    return {"group_by": group_by, "num_groups": count_groups(keys, group_by),
            "num_heldout_groups": count_groups([keys[i] for i in heldout_rows], group_by)}
