"""Real photographs that ship inside an installed package, turned into deterministic views.

scikit-image bundles about twenty photos inside its wheel (astronaut, coffee, a cat, a rocket,
the Hubble deep field, a retina, coins, the moon, textures, ...). The demo needs a few hundred
distinct images without a network, so each photo yields many views: random-resized crops at
several scales, horizontal flips and small rotations, all drawn from a seeded generator. Views of
one photo are correlated, so the demo holds out whole photos: it trains and evaluates with
`--group_by VIEW_GROUP`, which puts every view of a photo in one group and so on one side of the
split. `eva-repro demo --input_dir` uses the user's own images instead (each image on its own).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from eva_repro.utils.errors import UserError


def _stereo_left() -> np.ndarray:
    import skimage.data

    return skimage.data.stereo_motorcycle()[0]


def _loader(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


# name -> loader returning an HxW or HxWxC uint8/bool array; every file ships in the skimage wheel
# (the fetched-on-demand ones such as `skin` or `lily` are deliberately absent: no network)
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    **{name: _loader(name) for name in (
        "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
        "retina", "colorwheel", "logo", "camera", "coins", "moon", "page", "text", "brick",
        "grass", "gravel", "clock", "cell")},
    "motorcycle": _stereo_left,
}
VIEW_NAME = re.compile(r"^(?P<photo>.+)-view(?P<index>\d{4,})\.jpg$")
# `--group_by` of the demo's train and evaluate: a view's group is its photo (`chelsea-view0042.jpg`
# -> `chelsea`), so all views of a held-out photo are held out
VIEW_GROUP = r"(.+)-view\d{4,}\.jpg$"


def load_photos() -> dict[str, Image.Image]:
    """The bundled photos as RGB PIL images (no network: the files ship in the wheel)."""
    photos = {}
    for name, load in PHOTOS.items():
        array = load()
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        photos[name] = Image.fromarray(array).convert("RGB")
    return photos


def random_view(photo: Image.Image, rng: random.Random, size: int = 256) -> Image.Image:
    """A random-resized crop (8-100% of the area, aspect 3/4-4/3), maybe flipped and rotated."""
    w, h = photo.size
    for _ in range(10):
        area = rng.uniform(0.08, 1.0) * w * h
        aspect = rng.uniform(3 / 4, 4 / 3)
        cw, ch = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw, ch = min(w, h), min(w, h)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    view = photo.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.3:
        view = view.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR, expand=False)
    return view.resize((size, size), Image.Resampling.BICUBIC)


def view_paths(output_dir: str | Path, num_images: int) -> list[Path]:
    """Where view i goes: round-robin over the photos, so any prefix covers every photo."""
    names = sorted(PHOTOS)
    return [Path(output_dir) / f"{names[i % len(names)]}-view{i:04d}.jpg"
            for i in range(num_images)]


def write_demo_images(output_dir: str | Path, num_images: int, seed: int = 0) -> list[Path]:
    """Write `num_images` JPEG views; existing ones are kept (a rerun writes nothing), views of an
    earlier, larger request are removed so the folder holds exactly these images."""
    if num_images < 1:
        raise UserError(f"--num_images must be >= 1, got {num_images}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = view_paths(out, num_images)
    wanted = {p.name for p in paths}
    for stale in out.iterdir():
        if VIEW_NAME.match(stale.name) and stale.name not in wanted:
            stale.unlink()
    missing = [(i, p) for i, p in enumerate(paths) if not p.exists()]
    if missing:
        photos = load_photos()  # only decoded when something is missing: reruns stay instant
        for i, path in missing:
            photo = VIEW_NAME.match(path.name)["photo"]
            view = random_view(photos[photo], random.Random(f"{seed}:{i}"))
            tmp = path.with_name(f".{path.name}.tmp")
            view.save(tmp, format="JPEG", quality=92)
            tmp.replace(path)  # atomic: a killed run never leaves a torn JPEG behind
    return paths
