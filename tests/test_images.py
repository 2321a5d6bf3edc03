"""Input discovery and decoding: folders, tars, list files, EXIF, colour modes, bad inputs."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eva_repro.data.images import (
    DecodeError,
    ImageDataset,
    InputError,
    collate,
    decode_image,
    discover,
    list_images,
)


def image_bytes(color=(200, 30, 30), size=(40, 30), fmt="JPEG", mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **save)
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny valid PNG whose header claims width x height (PIL reads only the header)."""
    data = bytearray(image_bytes(fmt="PNG", mode="L", color=0, size=(1, 1)))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def make_bad_corpus(root: Path, good: int = 3) -> dict[str, str]:
    """Good images plus one of each kind of bad input; returns {file name: expected reason}."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(good):
        (root / f"good_{i}.jpg").write_bytes(image_bytes((40 * i, 100, 200 - 40 * i)))
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=90)
    full = buf.getvalue()
    expected = {
        "truncated.jpg": "corrupt image",
        "not_an_image.jpg": "not an image",
        "empty.png": "empty file",
        "tiny.png": "too small",
        "bomb.png": "decompression bomb",
        "dangling.jpg": "unreadable",
    }
    (root / "truncated.jpg").write_bytes(full[: len(full) * 2 // 3])  # header intact, data cut
    (root / "not_an_image.jpg").write_text("this is a text file, not a JPEG\n" * 20)
    (root / "empty.png").write_bytes(b"")
    (root / "tiny.png").write_bytes(image_bytes(size=(1, 1), fmt="PNG"))
    (root / "bomb.png").write_bytes(png_bomb())
    os.symlink(root / "does_not_exist.jpg", root / "dangling.jpg")
    if os.geteuid() != 0:  # root reads through chmod 000; the dangling link covers root runs
        (root / "locked.jpg").write_bytes(image_bytes())
        (root / "locked.jpg").chmod(0)
        expected["locked.jpg"] = "unreadable"
    return expected


def make_broken_tar(path: Path) -> Path:
    """Two good captioned members, a garbage member, then a member cut off mid-data."""
    members = {"a.jpg": image_bytes((10, 200, 10)), "a.txt": b"caption a",
               "b.png": image_bytes((10, 10, 200), fmt="PNG"), "b.txt": b"caption b",
               "c.jpg": b"\x00garbage" * 50, "d.jpg": image_bytes(size=(200, 200))}
    write_tar(path, members)
    with tarfile.open(path) as tf:
        d = tf.getmember("d.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: d.offset_data + 100])  # d.jpg truncated, end-of-archive lost
    return path


# ---------------------------------------------------------------------------------------------
# discovery


def test_list_images_is_recursive_sorted_and_case_insensitive(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    for name in ("b.JPG", "a.png", "sub/c.Jpeg", "sub/deeper/d.webp", "e.BMP"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("caption")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "sub", tmp_path / "sub" / "deeper" / "loop")  # a cycle: listed once
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert rel == ["a.png", "b.JPG", "e.BMP", "sub/c.Jpeg", "sub/deeper/d.webp"]
    with pytest.raises(InputError, match="does not exist"):
        list_images(tmp_path / "missing")


def test_discover_folder_tar_and_list_file(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "x").mkdir(parents=True)
    (folder / "one.jpg").write_bytes(image_bytes())
    (folder / "one.txt").write_text("  a red square \n")
    (folder / "x" / "two.png").write_bytes(image_bytes(fmt="PNG"))
    d = discover(folder)
    assert [it.key for it in d.items] == ["one.jpg", "x/two.png"]
    assert d.items[0].caption_path and not d.items[1].caption_path
    assert d.num_inputs == 2 and not d.failures

    tar = write_tar(tmp_path / "wds.tar", {"s/0001.jpg": image_bytes(), "s/0001.txt": b"cap 1",
                                           "s/0002.png": image_bytes(fmt="PNG"),
                                           "s/0002.json": b"{}", "s/0003.txt": b"orphan"})
    d = discover(tar)
    assert [it.key for it in d.items] == ["wds/s/0001", "wds/s/0002"]
    assert d.items[0].member == "s/0001.jpg" and d.items[0].caption_offset > 0
    assert d.items[1].caption_offset == -1

    listing = tmp_path / "list.txt"
    listing.write_text(f"imgs/one.jpg\tfrom the list\n# comment\n\n{folder / 'x' / 'two.png'}\n"
                       "imgs/one.jpg\n")
    d = discover(listing)
    assert [it.key for it in d.items] == ["imgs/one.jpg", str(folder / "x" / "two.png")]
    assert d.items[0].caption == "from the list"
    assert [f["reason"] for f in d.failures] == ["duplicate: same key as an earlier input"]
    assert d.num_inputs == 3

    d = discover([folder, tar])  # several inputs: folder keys are prefixed by the folder name
    assert [it.key for it in d.items] == ["imgs/one.jpg", "imgs/x/two.png", "wds/s/0001",
                                          "wds/s/0002"]


def test_discover_errors_are_one_line(tmp_path, one_line_error):
    one_line_error(lambda: discover(tmp_path / "nope"), "input not found", InputError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        discover(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(InputError, match="not an image folder"):
        discover(tmp_path / "weights.bin")


# ---------------------------------------------------------------------------------------------
# decoding


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    out = decode_image(buf.getvalue())
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue band is now on top


@pytest.mark.parametrize("mode,color,fmt,expected", [
    ("L", 128, "PNG", (128, 128, 128)),
    ("CMYK", (0, 255, 255, 0), "JPEG", (255, 0, 0)),
    ("RGBA", (10, 20, 30, 0), "PNG", (10, 20, 30)),
    ("LA", (77, 255), "PNG", (77, 77, 77)),
    ("I;16", 30000, "PNG", (117, 117, 117)),  # 16-bit is rescaled, not clipped to 255
    ("1", 1, "PNG", (255, 255, 255)),
])
def test_modes_convert_to_rgb(mode, color, fmt, expected):
    out = decode_image(image_bytes(color, size=(16, 16), fmt=fmt, mode=mode))
    assert out.mode == "RGB"
    np.testing.assert_allclose(np.asarray(out)[8, 8], expected, atol=3)


def test_palette_with_transparency_and_webp():
    p = Image.new("P", (16, 16), 3)
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=0)
    assert np.asarray(decode_image(buf.getvalue()))[0, 0].tolist() == [0, 0, 255]
    assert decode_image(image_bytes(fmt="WEBP", size=(16, 16))).size == (16, 16)


def test_size_limits():
    with pytest.raises(DecodeError, match=r"too small: 1x1 px \(minimum 8"):
        decode_image(image_bytes(size=(1, 1), fmt="PNG"))
    assert decode_image(image_bytes(size=(8, 300), fmt="PNG")).size == (8, 300)
    with pytest.raises(DecodeError, match="decompression bomb: .*10000000000 pixels"):
        decode_image(png_bomb())
    with pytest.raises(DecodeError, match="pixels > limit 1000"):
        decode_image(image_bytes(size=(40, 30)), max_pixels=1000)


def test_bad_corpus_each_input_fails_with_its_reason(tmp_path):
    expected = make_bad_corpus(tmp_path / "bad")
    tar = make_broken_tar(tmp_path / "shards.tar")
    d = discover([tmp_path / "bad", tar])
    assert [f["reason"].split(":")[0] for f in d.failures] == ["broken tar"]
    ds = ImageDataset(d.items, [32])
    out = {d.items[i].key: ds[i] for i in range(len(ds))}
    for name, reason in expected.items():
        assert out[f"bad/{name}"]["error"].startswith(reason), (name, out[f"bad/{name}"])
    assert out["shards/c"]["error"].startswith("not an image")
    assert out["shards/d"]["error"].startswith("broken tar member: truncated")
    good = {k: v for k, v in out.items() if "error" not in v}
    assert sorted(good) == ["bad/good_0.jpg", "bad/good_1.jpg", "bad/good_2.jpg",
                            "shards/a", "shards/b"]
    assert good["shards/a"]["caption"] == "caption a"
    assert good["bad/good_0.jpg"]["pixels"][32].shape == (3, 32, 32)
    assert len(good) + sum("error" in v for v in out.values()) + len(d.failures) == d.num_inputs


def test_dataloader_workers_return_failures_instead_of_raising(tmp_path):
    make_bad_corpus(tmp_path / "bad", good=2)
    d = discover(tmp_path / "bad")
    ds = ImageDataset(d.items, [16, 24])
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate)
    batches = list(loader)
    decoded = [i for b in batches for i in b.indices]
    failed = [i for b in batches for i, _ in b.failures]
    assert sorted(decoded + failed) == list(range(len(ds)))
    assert len(decoded) == 2
    b = next(b for b in batches if b.indices)
    assert b.pixels[16].dtype == torch.uint8 and b.pixels[24].shape[1:] == (3, 24, 24)
    all_bad = collate([{"index": 0, "error": "empty file: 0 bytes"}])
    assert all_bad.indices == [] and all_bad.pixels == {} and all_bad.failures == [
        (0, "empty file: 0 bytes")]
