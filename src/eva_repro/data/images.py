"""Extraction inputs: discovery (folders, webdataset tars, list files) and safe decoding.

Discovery turns the user's inputs into an ordered list of `InputItem`s (deterministic: the same
inputs always give the same order, which is what makes shard indices global and resumable) plus
the inputs that already failed there (duplicates, a tar whose tail is unreadable). Decoding runs
in DataLoader workers; every bad input becomes a failure record with a reason, never an
exception, so one bad file cannot stop a run and the counts always add up:

    inputs = samples written + failures logged
"""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from eva_repro.utils.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LIST_EXTENSIONS = (".txt", ".lst", ".list", ".tsv")
DEFAULT_MIN_SIZE = 8  # px per side; smaller images carry no usable patch structure
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (~0.25 GB RGB)


def resize_center_crop(img: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> uint8 [3, size, size]: open_clip's eval transform before ToTensor."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC)
    img = TF.center_crop(img, [size, size])
    return TF.pil_to_tensor(img)


class InputError(UserError):
    """The inputs themselves are unusable (missing, empty): one line, before any work."""


class DecodeError(Exception):
    """One input could not be turned into an image; the message is the logged reason."""


@dataclass(frozen=True)
class InputItem:
    key: str  # unique, stable sample id (relative path / tar-stem/member-key)
    path: str  # the file, or the tar holding the member
    member: str | None = None  # tar member name
    offset: int = 0  # tar member data offset
    size: int = -1  # tar member data size
    caption: str | None = None  # inline caption (list file: path<TAB>caption)
    caption_path: str | None = None  # sidecar .txt next to the image
    caption_offset: int = -1  # tar member .txt data location
    caption_size: int = -1

    @property
    def source(self) -> str:
        return f"{self.path}::{self.member}" if self.member else self.path


@dataclass
class Discovery:
    items: list[InputItem]
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_inputs(self) -> int:
        return len(self.items) + len(self.failures)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under `root`, recursively, sorted by relative path; any extension case.

    Broken symlinks with an image name are listed too: they are inputs that fail with a reason
    rather than silently vanishing from the counts.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: input directory does not exist")
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle (or a second link to the same folder): once is enough
            dirnames.clear()
            continue
        seen.add(real)
        dirnames.sort()
        found.extend(Path(dirpath) / f for f in filenames if is_image_name(f))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _sidecar(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    return str(txt) if txt.is_file() else None


def _folder_items(root: Path, prefix: str) -> list[InputItem]:
    return [InputItem(key=prefix + p.relative_to(root).as_posix(), path=str(p),
                      caption_path=_sidecar(p)) for p in list_images(root)]


def _tar_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _tar_items(path: Path) -> tuple[list[InputItem], list[dict[str, Any]]]:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    failures = []
    last = None
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:  # headers only; member data is read later, in a worker, by offset
                last = m.name
                if m.isreg():
                    key, ext = _tar_key(m.name)
                    groups.setdefault(key, {}).setdefault(ext, m)
    except (tarfile.TarError, OSError, EOFError) as e:
        where = f"after member {last}" if last else "at its start"
        failures.append({"path": str(path), "key": f"{path.stem}/<unreadable>",
                         "reason": f"broken tar: unreadable {where} ({e}); later members lost"})
    items = []
    for key, members in groups.items():
        img = next((members[e] for e in members if is_image_name("." + e)), None)
        if img is None:
            continue
        cap = members.get("txt")
        items.append(InputItem(
            key=f"{path.stem}/{key}", path=str(path), member=img.name, offset=img.offset_data,
            size=img.size, caption_offset=cap.offset_data if cap else -1,
            caption_size=cap.size if cap else -1))
    return items, failures


def _list_file_items(path: Path) -> list[InputItem]:
    items = []
    for line in path.read_text().splitlines():
        entry, _, caption = line.strip().partition("\t")
        if not entry or entry.startswith("#"):
            continue
        p = Path(entry).expanduser()
        if not p.is_absolute():
            p = path.parent / p
        items.append(InputItem(key=entry, path=str(p), caption=caption or None,
                               caption_path=None if caption else _sidecar(p)))
    return items


def discover(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> Discovery:
    """Inputs (folders, .tar files, list files, image paths) -> ordered items + failures."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [Path(p).expanduser() for p in inputs]
    if not inputs:
        raise InputError("no inputs given; pass an image folder, webdataset .tar files or a "
                         "text file listing image paths")
    items: list[InputItem] = []
    failures: list[dict[str, Any]] = []
    for p in inputs:
        if p.is_dir():
            items += _folder_items(p, f"{p.name}/" if len(inputs) > 1 else "")
        elif p.suffix.lower() == ".tar" and p.is_file():
            tar_items, tar_failures = _tar_items(p)
            items += tar_items
            failures += tar_failures
        elif is_image_name(p.name) and (p.exists() or p.is_symlink()):
            items.append(InputItem(key=str(p), path=str(p), caption_path=_sidecar(p)))
        elif p.suffix.lower() in LIST_EXTENSIONS and p.is_file():
            items += _list_file_items(p)
        elif not p.exists():
            raise InputError(f"{p}: input not found; pass an image folder, webdataset .tar "
                             "files or a text file listing image paths")
        else:
            raise InputError(f"{p}: not an image folder, .tar, list file "
                             f"({', '.join(LIST_EXTENSIONS)}) or image "
                             f"({', '.join(IMAGE_EXTENSIONS)})")
    unique, seen = [], set()
    for item in items:
        if item.key in seen:
            failures.append({"path": item.source, "key": item.key,
                             "reason": "duplicate: same key as an earlier input"})
        else:
            seen.add(item.key)
            unique.append(item)
    if not unique and not failures:
        raise InputError(f"no images found in {', '.join(map(str, inputs))} (looked for "
                         f"{', '.join(IMAGE_EXTENSIONS)}, any case)")
    return Discovery(unique, failures)


# ---------------------------------------------------------------------------------------------
# decoding


def read_bytes(item: InputItem) -> bytes:
    """The encoded image bytes of one input; `DecodeError` on unreadable / broken sources."""
    try:
        if item.member is None:
            with open(item.path, "rb") as f:
                return f.read()
        with open(item.path, "rb") as f:
            f.seek(item.offset)
            data = f.read(item.size)
    except OSError as e:
        raise DecodeError(f"unreadable: {e.strerror or e}") from e
    if len(data) != item.size:
        raise DecodeError(f"broken tar member: truncated ({len(data)} of {item.size} bytes)")
    return data


def read_caption(item: InputItem) -> str | None:
    try:
        if item.caption is not None:
            return item.caption
        if item.caption_path:
            return Path(item.caption_path).read_text(errors="replace").strip()
        if item.caption_offset >= 0:
            with open(item.path, "rb") as f:
                f.seek(item.caption_offset)
                return f.read(item.caption_size).decode(errors="replace").strip()
    except OSError:
        return None  # a caption is optional; the image still counts
    return None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; 16-bit and float greyscale are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.max() > 255):
            arr = arr / 257.0  # 0..65535 -> 0..255
        elif img.mode == "F" and arr.max() <= 1.0:
            arr = arr * 255.0
        img = Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")  # alpha dropped, as open_clip does


def decode_image(data: bytes, *, min_size: int = DEFAULT_MIN_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes -> RGB image with EXIF orientation applied, or `DecodeError(reason)`."""
    if not data:
        raise DecodeError("empty file: 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise DecodeError(f"decompression bomb: {e}") from e
    except Image.UnidentifiedImageError as e:
        raise DecodeError("not an image: no known image format in the file") from e
    except Exception as e:  # a recognised format whose header is broken
        raise DecodeError(f"corrupt image: bad header: {type(e).__name__}: {e}") from e
    w, h = img.size
    if w * h > max_pixels:  # checked from the header, before any pixel is decoded
        raise DecodeError(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except Exception as e:  # truncated / corrupt data surfaces only when pixels are decoded
        raise DecodeError(f"corrupt image: {type(e).__name__}: {e}") from e
    if min(img.size) < min_size:
        raise DecodeError(f"too small: {img.size[0]}x{img.size[1]} px (minimum {min_size} px "
                          "per side)")
    return img


class ImageDataset(torch.utils.data.Dataset):
    """items[i] -> {"index", "pixels": {size: uint8 [3, s, s]}, "caption"} or {"index", "error"}.

    One crop per distinct encoder image size; normalisation happens later on the device, so
    workers ship uint8 (4x less than float through the worker queues).
    """

    def __init__(self, items: Sequence[InputItem], sizes: Sequence[int], *,
                 min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.items = list(items)
        self.sizes = sorted(set(sizes))
        self.min_size = min_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        try:
            img = decode_image(read_bytes(item), min_size=self.min_size,
                               max_pixels=self.max_pixels)
            pixels = {s: resize_center_crop(img, s) for s in self.sizes}
        except DecodeError as e:
            return {"index": index, "error": str(e)}
        except Exception as e:  # never let one input kill the run: log it instead
            return {"index": index, "error": f"decode error: {type(e).__name__}: {e}"}
        return {"index": index, "pixels": pixels, "caption": read_caption(item)}


@dataclass
class ImageBatch:
    """Decoded images of one batch plus the inputs that failed in it (by dataset index)."""

    indices: list[int]  # dataset indices of the decoded images, in order
    pixels: dict[int, torch.Tensor]  # size -> uint8 [n, 3, s, s]
    captions: list[str | None]
    failures: list[tuple[int, str]]  # (dataset index, reason)

    def pin_memory(self) -> ImageBatch:
        self.pixels = {s: t.pin_memory() for s, t in self.pixels.items()}
        return self


def collate(samples: Sequence[dict[str, Any]]) -> ImageBatch:
    ok = [s for s in samples if "error" not in s]
    sizes = ok[0]["pixels"].keys() if ok else ()
    return ImageBatch(
        indices=[s["index"] for s in ok],
        pixels={size: torch.stack([s["pixels"][size] for s in ok]) for size in sizes},
        captions=[s["caption"] for s in ok],
        failures=[(s["index"], s["error"]) for s in samples if "error" in s],
    )
