"""`eva-repro extract` end to end: shards, provenance, bad inputs, resume, merge, torchrun.

Encoders are real architectures, random-init and depth-truncated (1 block); the pipeline tests
use the base-size pair (EVA02-B-16 + ViT-B-16, 14x14 native) to stay fast on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
from open_clip.model import _build_vision_tower
from PIL import Image
from safetensors.torch import save_file

from eva_repro import cli
from eva_repro.data import extract as extract_mod
from eva_repro.data import shards
from eva_repro.data.encoders import EncoderError
from eva_repro.data.extract import ExtractError, extract, merge
from eva_repro.data.images import InputError
from eva_repro.utils import files
from eva_repro.utils.preemption import Preempted

sys.path.insert(0, str(Path(__file__).parent))
from test_images import make_bad_corpus, make_broken_tar  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IMAGENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"
SMALL = dict(eva="EVA02-B-16", clip="ViT-B-16", eva_weights="random", clip_weights="random",
             encoder_depth=1, grid=14, batch_size=2, num_workers=0, progress=False)
SMALL_ARGS = ["--eva", "EVA02-B-16", "--clip", "ViT-B-16", "--eva_weights", "random",
              "--clip_weights", "random", "--encoder_depth", "1", "--grid", "14",
              "--num_workers", "0", "--no_progress"]


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Small distinct photos-like images (different sizes / aspect ratios), some captioned."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(40, 120)), int(rng.integers(40, 120))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        sub = folder / ("nested" if i % 3 == 2 else "")
        sub.mkdir(exist_ok=True)
        p = sub / f"img_{i:02d}.{'JPG' if i % 2 else 'png'}"
        Image.fromarray(arr).save(p, "JPEG" if i % 2 else "PNG")
        if i % 2 == 0:
            p.with_suffix(".txt").write_text(f"caption {i}")
        paths.append(p)
    return paths


def shard_digests(out: Path) -> dict[str, str]:
    return {p.name: files.sha256_file(p) for p in sorted(out.glob("shard-*"))}


def test_extract_folder_end_to_end(tmp_path):
    write_images(tmp_path / "in", 5)
    m = extract(tmp_path / "in", tmp_path / "out", shard_size=3, **SMALL)
    assert m["num_samples"] == 5 and m["num_failures"] == 0 and m["num_inputs"] == 5
    assert [s["num_samples"] for s in m["shards"]] == [3, 2]
    assert (m["tokens"], m["clip_dim"], m["eva_dim"]) == (196, 768, 768)
    assert m["grid"] == 14 and m["include_cls"] is False and m["dtype"] == "float16"
    eva_p, clip_p = m["encoders"]["eva"], m["encoders"]["clip"]
    assert eva_p["name"] == "EVA02-B-16" and eva_p["weights"] == "random-init, seed 0"
    assert clip_p["arch"] == "ViT-B-16-quickgelu" and clip_p["image_size"] == 224
    assert "CLS" in eva_p["token_convention"] and eva_p["mean"] == clip_p["mean"]

    manifest = shards.read_manifest(tmp_path / "out")
    shards.verify_checksums(manifest)
    reader = shards.ShardReader(manifest)
    assert reader.keys() == ["img_00.png", "img_01.JPG", "img_03.JPG", "img_04.png",
                             "nested/img_02.png"]
    sidecar = manifest.sidecar(manifest.shards[0])
    assert sidecar.captions == ["caption 0", None, None]
    row = reader.read(4)
    assert row["clip"].shape == (196, 768) and row["clip"].dtype == torch.float16
    assert torch.isfinite(row["eva"].float()).all() and row["eva"].float().std() > 0.1
    assert not torch.equal(reader.read(0)["eva"], reader.read(1)["eva"])
    assert shards.read_failures(tmp_path / "out") == []


def test_weights_files_give_the_tokens_of_open_clip_and_timm(tmp_path):
    """--eva_weights / --clip_weights FILE: shard tokens == open_clip / timm called directly."""
    paths = write_images(tmp_path / "in", 2)
    torch.manual_seed(11)
    trunk = timm.create_model("eva02_large_patch14_clip_224", num_classes=0, depth=1).eval()
    save_file(trunk.state_dict(), tmp_path / "eva.safetensors")
    cfg = open_clip.get_model_config("ViT-L-14-quickgelu")
    visual = _build_vision_tower(cfg["embed_dim"], {**cfg["vision_cfg"], "layers": 1},
                                 quick_gelu=True).eval()
    torch.save({f"visual.{k}": v for k, v in visual.state_dict().items()}, tmp_path / "clip.pt")

    m = extract(paths, tmp_path / "out", eva="EVA02-L-14", clip="ViT-L-14",
                eva_weights=tmp_path / "eva.safetensors", clip_weights=tmp_path / "clip.pt",
                encoder_depth=1, grid=16, training_mode="cls_patch", dtype="float32",
                num_workers=0, progress=False)
    assert m["include_cls"] is True and m["tokens"] == 257 and m["dtype"] == "float32"
    assert m["encoders"]["eva"]["weights_sha256"] == files.sha256_file(tmp_path / "eva.safetensors")
    reader = shards.ShardReader(tmp_path / "out")

    preprocess = open_clip.image_transform(224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                           std=open_clip.OPENAI_DATASET_STD)
    x = torch.stack([preprocess(Image.open(p)) for p in paths])
    visual.output_tokens, visual.proj = True, None
    with torch.inference_mode():
        eva_ref = trunk.forward_features(x)
        pooled, patches = visual(x)
    clip_ref = torch.cat([pooled[:, None], patches], dim=1)
    for i in range(2):
        row = reader.read(i)
        torch.testing.assert_close(row["eva"], eva_ref[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(row["clip"], clip_ref[i], atol=1e-4, rtol=1e-4)


def test_cli_grid8_and_the_public_reference_script(tmp_path, monkeypatch):
    write_images(tmp_path / "in", 3)
    monkeypatch.setattr(sys, "argv", [
        "extract_embeddings.py", "--input_dir", str(tmp_path / "in"), "--output_dir",
        str(tmp_path / "shim"), "--batch_size", "32", *SMALL_ARGS[:-3], "--grid", "7",
        "--training_mode", "cls_patch"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(REPO / "extract_embeddings.py"), run_name="__main__")
    assert e.value.code == 0
    m = shards.read_manifest(tmp_path / "shim")
    assert (m.grid, m.tokens, m.include_cls) == (7, 50, True)

    # the same data through `eva-repro extract` at --grid 8 (area pooling from 14x14)
    assert cli.main(["extract", str(tmp_path / "in"), "--output_dir", str(tmp_path / "cli"),
                     *SMALL_ARGS[:-3], "--grid", "8", "--num_workers", "1", "--no_progress",
                     "--dtype", "bfloat16"]) == 0
    m = shards.read_manifest(tmp_path / "cli")
    assert (m.grid, m.tokens, m.include_cls, m.data["dtype"]) == (8, 64, False, "bfloat16")
    assert shards.ShardReader(m).read(0)["eva"].dtype == torch.bfloat16


def test_bad_inputs_are_skipped_the_counts_add_up_and_merge_rebuilds_them(tmp_path):
    expected = make_bad_corpus(tmp_path / "bad", good=2)
    tar = make_broken_tar(tmp_path / "wds.tar")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'bad' / 'good_0.jpg'}\n{tmp_path}\nmissing.png\n")
    inputs = [tmp_path / "bad", tar, listing]
    m = extract(inputs, tmp_path / "out", shard_size=4, **SMALL)
    failures = shards.read_failures(tmp_path / "out")
    assert m["num_samples"] + m["num_failures"] == m["num_inputs"] == len(expected) + 2 + 5 + 3
    assert m["num_samples"] == 5  # good_0, good_1, tar a + b, good_0 again via the list
    reasons = {f["key"]: f["reason"] for f in failures}
    for name, reason in expected.items():
        assert reasons[f"bad/{name}"].startswith(reason)
    assert reasons["wds/c"].startswith("not an image")
    assert reasons["wds/d"].startswith("broken tar member")
    assert reasons["wds/<unreadable>"].startswith("broken tar")
    assert reasons[str(tmp_path)].startswith("unreadable")  # a directory listed as an image
    assert reasons["missing.png"].startswith("unreadable")
    keys = shards.ShardReader(tmp_path / "out").keys()
    assert set(keys) == {"bad/good_0.jpg", "bad/good_1.jpg", "wds/a", "wds/b",
                         str(tmp_path / "bad" / "good_0.jpg")}
    caps = [c for s in shards.read_manifest(tmp_path / "out").shards
            for c in shards.read_manifest(tmp_path / "out").sidecar(s).captions]
    assert "caption a" in caps and "caption b" in caps

    # --merge rebuilds the manifest and failures.jsonl from the chunk records alone
    before = (tmp_path / "out" / "failures.jsonl").read_text()
    (tmp_path / "out" / "manifest.json").unlink()
    (tmp_path / "out" / "failures.jsonl").unlink()
    assert cli.main(["extract", "--merge", "--output_dir", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == m
    assert (tmp_path / "out" / "failures.jsonl").read_text() == before
    with pytest.raises(ExtractError, match="not an `eva-repro extract` output"):
        merge(tmp_path / "bad")


def test_errors_before_any_work(tmp_path):
    write_images(tmp_path / "in", 1)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="input not found"):
        extract(tmp_path / "nope", out, **SMALL)
    with pytest.raises(EncoderError, match="unknown encoder 'EVA9'"):
        extract(tmp_path / "in", out, **{**SMALL, "eva": "EVA9"})
    (tmp_path / "w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(EncoderError, match="w.safetensors: weights do not match EVA02-B-16"):
        extract(tmp_path / "in", out, **{**SMALL, "eva_weights": tmp_path / "w.safetensors"})
    with pytest.raises(ExtractError, match="--grid 16 is finer than --eva EVA02-B-16's native"):
        extract(tmp_path / "in", out, **{**SMALL, "grid": 16})
    with pytest.raises(ExtractError, match="training_mode"):
        extract(tmp_path / "in", out, **{**SMALL, "training_mode": "cls"})
    assert not out.exists()  # nothing was written by any of these


def test_sigterm_stops_at_a_chunk_boundary_and_the_rerun_finishes_the_same_shards(tmp_path,
                                                                                  monkeypatch):
    write_images(tmp_path / "in", 6)
    kw = dict(SMALL, shard_size=2)
    extract(tmp_path / "in", tmp_path / "clean", **kw)
    real_write_shard = shards.write_shard

    def preempted_during_first_chunk(out_dir, index, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while chunk 0 is being finished
        return real_write_shard(out_dir, index, *args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", preempted_during_first_chunk)
    with pytest.raises(Preempted, match="stopped on SIGTERM after 1 chunks"):
        extract(tmp_path / "in", tmp_path / "stopped", **kw)
    monkeypatch.setattr(shards, "write_shard", real_write_shard)
    assert sorted(p.name for p in (tmp_path / "stopped").glob("shard-*.safetensors")) == [
        "shard-00000.safetensors"]
    result = extract_mod.run_extraction(tmp_path / "in", tmp_path / "stopped",
                                        extract_mod.Settings(**kw))
    assert (result.stats.chunks_skipped, result.stats.chunks_written) == (1, 2)
    assert shard_digests(tmp_path / "stopped") == shard_digests(tmp_path / "clean")


def test_torchrun_two_processes_cover_every_input_once(tmp_path):
    write_images(tmp_path / "in", 5)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    # timm-only encoder pair: each worker process skips open_clip's slow import
    small = dict(SMALL, clip="EVA02-B-16")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "eva_repro", "extract", str(tmp_path / "in"), "--output_dir",
           str(tmp_path / "out"), *SMALL_ARGS, "--clip", "EVA02-B-16", "--shard_size", "2",
           "--batch_size", "2"]
    errors = []
    for _ in range(2):  # one retry: a free port can be taken by a concurrent job between
        # torchrun choosing it and binding it (the extraction itself is deterministic)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            break
        errors.append(proc.stderr[-3000:])
    assert proc.returncode == 0, "\n-----\n".join(errors)
    m = shards.read_manifest(tmp_path / "out")
    keys = shards.ShardReader(m).keys()
    assert sorted(keys) == sorted(set(keys)) and len(keys) == m.num_samples == 5
    assert m.data["num_inputs"] == 5 and len(m.shards) == 3
    logs = {r: [json.loads(x)["chunk"] for x in
                (tmp_path / "out" / "logs" / f"extract-rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)}
    assert logs == {0: [0, 2], 1: [1]}  # chunk i -> rank i % world_size

    single = extract(tmp_path / "in", tmp_path / "single", shard_size=2, **small)
    reader, ref = shards.ShardReader(m), shards.ShardReader(tmp_path / "single")
    assert single["num_samples"] == 5 and ref.keys() == keys
    for i in range(5):
        for k in ("clip", "eva"):
            torch.testing.assert_close(reader.read(i)[k], ref.read(i)[k], atol=1e-2, rtol=0)


@pytest.mark.skipif(not IMAGENET.is_dir(), reason="../shared/data/imagenet-sample not present")
def test_real_photos(tmp_path):
    photos = sorted(IMAGENET.glob("*.JPEG"))[:3]
    m = extract(photos, tmp_path / "out", **SMALL)
    assert m["num_samples"] == 3 and m["num_failures"] == 0
    row = shards.ShardReader(tmp_path / "out").read(2)["clip"].float()
    assert torch.isfinite(row).all() and row.std() > 0.1


def test_all_inputs_failing_is_an_error_after_logging_them(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    (tmp_path / "in" / "tiny.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ExtractError, match="no input could be decoded \\(all 2 failed\\)"):
        extract(tmp_path / "in", tmp_path / "out", **SMALL)
    assert len(shards.read_failures(tmp_path / "out")) == 2
    assert not list((tmp_path / "out").glob("shard-*"))


def test_recipe_blip3o_writes_blip3o_target_tokens(tmp_path, capsys):
    write_images(tmp_path / "in", 3)
    out = tmp_path / "out"
    args = ["extract", str(tmp_path / "in"), "--output_dir", str(out), "--recipe", "blip3o",
            "--eva_weights", "random", "--clip", "ViT-B-16", "--clip_weights", "random",
            "--encoder_depth", "1", "--num_workers", "0", "--no_progress"]
    assert cli.main(args) == 0
    m = shards.read_manifest(out)
    eva = m.data["encoders"]["eva"]
    assert (m.grid, m.tokens, m.eva_dim, m.clip_dim, m.include_cls) == (8, 64, 1792, 768, False)
    assert (eva["name"], eva["image_size"], eva["native_grid"], eva["token_source"]) == (
        "EVA02-E-14-plus", 448, 32, "last_block")
    assert m.data["encoders"]["clip"]["token_source"] == "final_norm"
    rows = shards.ShardReader(m).read_rows(0, 0, 3)
    assert rows["eva"].shape == (3, 64, 1792) and rows["clip"].shape == (3, 64, 768)
    # raw scale: no final norm, so token norms are not LayerNorm's sqrt(1792) ~ 42.3
    assert abs(rows["eva"].float().norm(dim=-1).mean().item() - 1792 ** 0.5) > 2
    capsys.readouterr()
    assert cli.main([*args, "--eva", "EVA02-L-14"]) == 2
    err = capsys.readouterr().err
    assert "--recipe blip3o sets --eva EVA02-E-14-plus" in err and len(err.splitlines()) == 1


def test_a_resumed_run_redoes_a_finished_shard_damaged_since(uninterrupted_extract, tmp_path,
                                                             capsys, flip_bytes):
    """A finished shard corrupted after it was written (size unchanged) is not counted as done:
    the rerun checks it against its sidecar's sha256, says so and extracts that chunk again."""
    images, _, finished = uninterrupted_extract
    kw = CONTRACT
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    clean = shard_digests(out)
    damaged = out / "shard-00000.safetensors"
    flip_bytes(damaged, 56)
    assert shard_digests(out) != clean
    capsys.readouterr()
    result = extract_mod.run_extraction(images, out, extract_mod.Settings(**kw))
    assert (result.stats.chunks_skipped, result.stats.chunks_written) == (1, 1)
    assert result.stats.images == 2  # only the damaged chunk was decoded again
    why = f"{damaged}: sha256 does not match its sidecar shard-00000.json (damaged after it was written)"
    assert f"[extract] {why}; extracting chunk 0 again\n" in capsys.readouterr().err
    log = [json.loads(line) for line in (out / "logs" / "extract-rank0.jsonl").read_text().splitlines()]
    assert [r["redo"] for r in log if "redo" in r] == [why]
    assert shard_digests(out) == clean
    shards.verify_checksums(shards.read_manifest(out))


# ---------------------------------------------------------------------------------------------
# the resume contract: wherever a run is killed, the rerun's output is the uninterrupted run's,
# byte for byte (logs/ aside: it records timings)

CONTRACT = dict(SMALL, shard_size=2, grid=2)


def _extract_digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): files.sha256_file(p) for p in sorted(out.rglob("*"))
            if p.is_file() and p.parts[len(out.parts)] != "logs"}


@pytest.fixture(scope="module")
def uninterrupted_extract(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    write_images(root / "in", 4)
    extract(root / "in", root / "out", **CONTRACT)
    digests = _extract_digests(root / "out")
    assert sorted(digests) == ["chunks/chunk-00000.json", "chunks/chunk-00001.json",
                               "extract_config.json", "failures.jsonl", "manifest.json",
                               "shard-00000.json", "shard-00000.safetensors", "shard-00001.json",
                               "shard-00001.safetensors"]
    return root / "in", digests, root / "out"


@pytest.mark.parametrize("killed_writing", [
    "extract_config.json", "shard-00000.safetensors", "chunk-00001.json",
    "shard-00001.safetensors", "shard-00001.json", "failures.jsonl", "manifest.json"])
def test_extract_killed_anywhere_resumes_to_the_uninterrupted_output(
        killed_writing, uninterrupted_extract, tmp_path, capsys, kill_writing):
    images, whole, _ = uninterrupted_extract
    out = tmp_path / "out"
    kill_writing(killed_writing)
    with pytest.raises(KeyboardInterrupt, match=f"killed while writing .*/{killed_writing}"):
        extract(images, out, **CONTRACT)
    assert list(out.rglob(f".{killed_writing}.killed.tmp"))  # what SIGKILL leaves
    capsys.readouterr()
    extract(images, out, **CONTRACT)
    left = ("chunks/" if killed_writing.startswith("chunk-") else "") + f".{killed_writing}.killed.tmp"
    assert f"removed 1 temp file(s) a killed run left in {out} ({left})" in capsys.readouterr().err
    assert _extract_digests(out) == whole


def test_a_run_killed_in_a_shard_resumes_only_that_chunk_and_refuses_other_settings(
        uninterrupted_extract, tmp_path, kill_writing):
    """Killed while writing chunk 1's shard (its record is committed): merge refuses the
    unfinished directory, the rerun decodes only that chunk, a rerun of a finished directory
    decodes nothing, and other settings or another input list are refused."""
    images, whole, finished = uninterrupted_extract
    resumed = tmp_path / "resumed"
    kill_writing("shard-00001.safetensors")
    with pytest.raises(KeyboardInterrupt):
        extract(images, resumed, **CONTRACT)
    assert sorted(p.name for p in resumed.glob("shard-*")) == [
        "shard-00000.json", "shard-00000.safetensors"]
    assert not (resumed / "manifest.json").exists()
    with pytest.raises(ExtractError, match="1 of 2 chunks unfinished"):
        merge(resumed)

    result = extract_mod.run_extraction(images, resumed, extract_mod.Settings(**CONTRACT))
    assert (result.stats.chunks_skipped, result.stats.chunks_written) == (1, 1)
    assert result.stats.images == 2  # only the unfinished chunk was decoded again
    assert shard_digests(resumed) == {k: v for k, v in whole.items() if k.startswith("shard-")}
    assert result.manifest == json.loads((finished / "manifest.json").read_text())

    again = extract_mod.run_extraction(images, resumed, extract_mod.Settings(**CONTRACT))
    assert (again.stats.chunks_skipped, again.stats.images) == (2, 0)

    with pytest.raises(ExtractError, match="different settings.grid"):
        extract(images, resumed, **{**CONTRACT, "grid": 7})
    more = tmp_path / "in"
    shutil.copytree(images, more)
    write_images(more, 5, seed=1)  # the input list changed
    with pytest.raises(ExtractError, match="different input list"):
        extract(more, resumed, **CONTRACT)


def test_a_refused_resume_names_the_inputs_when_only_their_paths_differ():
    from eva_repro.data.extract import config_diff

    old = {"settings": {}, "encoders": {}, "inputs": ["/data/../photos"], "num_inputs": 3,
           "inputs_sha256": "a"}
    new = {**old, "inputs": ["/photos"], "inputs_sha256": "b"}
    assert config_diff(old, new) == ["input list (3 -> 3 inputs; given as /data/../photos, now "
                                     "/photos)"]
    assert config_diff(old, {**new, "inputs": old["inputs"]}) == ["input list (3 -> 3 inputs)"]
