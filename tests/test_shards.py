"""The shard format: atomic writes, manifest, bounded-memory reads, checksums, held-out split."""

import json
import os
import pickle
import re

import pytest
import torch

from eva_repro.data import shards


def _write(tmp_path, index, n, start=0, dtype="float16"):
    clip, eva = torch.randn(n, 5, 6), torch.randn(n, 5, 8)
    keys = [f"k{i}" for i in range(start, start + n)]
    info = shards.write_shard(tmp_path, index, clip, eva, keys, [f"cap {k}" for k in keys], dtype)
    return info, clip, eva


def test_write_and_read_round_trip(tmp_path):
    a, clip_a, eva_a = _write(tmp_path, 0, 3)
    b, clip_b, eva_b = _write(tmp_path, 1, 2, start=3)
    manifest = shards.write_manifest(tmp_path, {"grid": 2, "include_cls": True, "dtype": "float16"})
    assert manifest["num_samples"] == 5 and manifest["tokens"] == 5
    assert (manifest["clip_dim"], manifest["eva_dim"]) == (6, 8)
    assert [s["sha256"] for s in manifest["shards"]] == [a.sha256, b.sha256]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))

    reader = shards.ShardReader(tmp_path)
    assert len(reader) == 5 and reader.locate(3) == (1, 0)
    row = reader.read(4)
    assert row["clip"].dtype == torch.float16
    assert torch.equal(row["eva"], eva_b[1].half())
    assert torch.equal(reader.read_rows(0, 1, 3)["clip"], clip_a[1:3].half())
    assert reader.keys() == ["k0", "k1", "k2", "k3", "k4"]
    assert reader.manifest.sidecar(reader.manifest.shards[1]).captions == ["cap k3", "cap k4"]
    # a reader crosses into DataLoader workers without its open memory maps
    clone = pickle.loads(pickle.dumps(reader))
    assert torch.equal(clone.read(0)["clip"], reader.read(0)["clip"])
    with pytest.raises(IndexError):
        reader.read(5)


def test_float32_shards_are_exact(tmp_path):
    _, clip, _ = _write(tmp_path, 0, 2, dtype="float32")
    shards.write_manifest(tmp_path, {"grid": 2, "include_cls": True})
    assert torch.equal(shards.ShardReader(tmp_path).read(1)["clip"], clip[1])


def test_only_committed_shards_count(tmp_path):
    _write(tmp_path, 0, 2)
    info, _, _ = _write(tmp_path, 1, 2, start=2)
    (tmp_path / "shard-00001.json").unlink()  # killed between tensors and sidecar
    assert list(shards.finished_shards(tmp_path)) == [0]
    (tmp_path / "shard-00000.safetensors").unlink()  # sidecar without tensors does not count
    assert shards.finished_shards(tmp_path) == {}


def test_manifest_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(shards.ShardError, match="does not exist; run `eva-repro extract`"):
        shards.read_manifest(tmp_path / "nope")
    with pytest.raises(shards.ShardError, match="holds no shards"):
        shards.read_manifest(tmp_path)
    _write(tmp_path, 0, 2)
    with pytest.raises(shards.ShardError, match="extract --merge"):
        shards.read_manifest(tmp_path)
    shards.write_manifest(tmp_path, {"grid": 2, "include_cls": True})
    (tmp_path / "shard-00000.safetensors").unlink()
    with pytest.raises(shards.ShardError, match="listed in the manifest but missing"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(shards.ShardError, match="not valid JSON"):
        shards.read_manifest(tmp_path)


def test_checksum_mismatch_is_detected(tmp_path):
    _write(tmp_path, 0, 2)
    shards.write_manifest(tmp_path, {"grid": 2, "include_cls": True})
    manifest = shards.read_manifest(tmp_path)
    shards.verify_checksums(manifest)
    path = tmp_path / "shard-00000.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(shards.ShardError, match="sha256 does not match"):
        shards.verify_checksums(manifest)


def test_failures_are_appended_and_counted(tmp_path):
    _write(tmp_path, 0, 1)
    shards.append_failures(tmp_path, [{"path": "a.jpg", "reason": "truncated"}])
    shards.append_failures(tmp_path, [{"path": "b.jpg", "reason": "zero bytes"}])
    assert [f["path"] for f in shards.read_failures(tmp_path)] == ["a.jpg", "b.jpg"]
    assert shards.write_manifest(tmp_path, {"grid": 2})["num_failures"] == 2


def test_small_data_keeps_a_held_out_floor_chosen_by_key_hash():
    keys = [f"photo_{i:02d}.jpg" for i in range(20)]  # the public reference README's 20 photos at 5%
    train, heldout = shards.split_indices(keys, 0.05)
    assert len(heldout) == 4 and sorted(train + heldout) == list(range(20))
    scores = [shards.heldout_score(k) for k in keys]
    assert max(scores[i] for i in heldout) < min(scores[i] for i in train)  # lowest hashes
    _, again = shards.split_indices(list(reversed(keys)), 0.05)
    assert {keys[19 - i] for i in again} == {keys[i] for i in heldout}
    many = [f"img-{i}" for i in range(400)]  # enough data: the fraction alone decides
    assert len(shards.split_indices(many, 0.05)[1]) == sum(
        shards.heldout_score(k) < 0.05 for k in many) >= shards.MIN_HELDOUT
    assert shards.split_indices(keys[:4], 0.05)[1] == []  # too few to spare any


def test_split_is_deterministic_by_key_and_near_the_fraction():
    keys = [f"img-{i}" for i in range(20000)]
    train, heldout = shards.split_indices(keys, 0.05)
    assert sorted(train + heldout) == list(range(20000))
    assert 0.045 < len(heldout) / len(keys) < 0.055
    # membership depends on the key only: reordering or subsetting the data keeps it
    shuffled = list(reversed(keys))
    _, heldout_rev = shards.split_indices(shuffled, 0.05)
    assert {shuffled[i] for i in heldout_rev} == {keys[i] for i in heldout}
    assert shards.split_indices(keys[:10], 0.0)[1] == []
    with pytest.raises(ValueError, match="eval_fraction"):
        shards.split_indices(keys, 1.0)


def test_atomic_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        _write(tmp_path, 0, 1)
    finally:
        os.umask(old)
    for name in ("shard-00000.safetensors", "shard-00000.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644  # readable by a shared team


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_reader_matches_safetensors_and_keeps_no_maps(tmp_path, dtype):
    """Rows come back bit-exact in the stored dtype, and no file stays mapped or open after a
    read (a reader that keeps its maps grows resident memory to the dataset size over an epoch)."""
    stored = []
    for index, start in ((0, 0), (1, 8), (2, 16)):
        _, clip, eva = _write(tmp_path, index, 8 if index < 2 else 4, start=start, dtype=dtype)
        stored.append({"clip": clip.to(shards.DTYPES[dtype]), "eva": eva.to(shards.DTYPES[dtype])})
    shards.write_manifest(tmp_path, {"grid": 2, "include_cls": True, "dtype": dtype})
    reader = shards.ShardReader(tmp_path)
    for i in (0, 7, 8, 19):
        got, want = reader.read(i), {k: v[i % 8] for k, v in stored[i // 8].items()}
        assert all(torch.equal(want[k], got[k]) and got[k].dtype == want[k].dtype for k in want)
    assert torch.equal(reader.read_rows(1, 2, 6)["eva"], stored[1]["eva"][2:6])
    with open("/proc/self/maps") as f:
        assert not [line for line in f if str(tmp_path) in line]
    assert not [fd for fd in os.listdir("/proc/self/fd")
                if str(tmp_path) in os.path.realpath(f"/proc/self/fd/{fd}")]
    again = pickle.loads(pickle.dumps(reader))  # DataLoader workers get a header-less copy
    assert torch.equal(again.read(19)["clip"], stored[2]["clip"][3])


def test_truncated_shard_is_a_one_line_error_naming_the_file(tmp_path, one_line_error):
    _write(tmp_path, 0, 4)
    shards.write_manifest(tmp_path, {"grid": 2, "include_cls": True})
    path = tmp_path / "shard-00000.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    message = one_line_error(lambda: shards.ShardReader(tmp_path).read(3),
                             r"shard-00000.safetensors: cannot read rows", shards.ShardError)
    assert "re-extract" in message
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(shards.ShardError, match="unreadable safetensors shard"):
        shards.ShardReader(tmp_path).read(0)


def test_gather_and_batches_return_the_rows_asked_for_in_order_across_shards(tmp_path):
    from eva_repro.data.synth import write_synthetic_shards

    write_synthetic_shards(tmp_path, 300, grid=2, clip_dim=8, eva_dim=12, shard_size=128,
                           dtype="float16")
    reader = shards.ShardReader(tmp_path)
    # runs inside a shard, a run across the 127 | 128 shard boundary, repeats, back and forth
    wanted = [5, 6, 7, 126, 127, 128, 129, 2, 299, 7, 255, 256]
    one_by_one = {k: torch.stack([reader.read(i)[k] for i in wanted]) for k in shards.TENSOR_KEYS}
    gathered = reader.gather(wanted)
    for k in shards.TENSOR_KEYS:
        assert gathered[k].dtype == torch.float16 and torch.equal(gathered[k], one_by_one[k])
    seen, got = [], []
    for batch, rows in reader.batches(wanted, batch_size=5):
        seen += batch
        got.append(rows["clip"])
        assert rows["eva"].dtype == torch.float32 and rows["eva"].shape[0] == len(batch)
    assert seen == wanted and torch.equal(torch.cat(got), one_by_one["clip"].float())
    assert reader.gather([])["eva"].shape == (0, 4, 12)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.pop("tokens"), "'tokens' is missing; rewrite it"),
    (lambda m: m.update(clip_dim="16"), "'clip_dim' is '16', not a positive integer; rewrite it"),
    (lambda m: m.update(shards={"0": "shard-00000.safetensors"}),
     "'shards' is a dict, not a list of shards; rewrite it"),
    (lambda m: m.update(shards=["shard-00000.safetensors"]),
     "shard entry 'shard-00000.safetensors' lacks 'file' / 'num_samples'; rewrite it"),
])
def test_a_malformed_manifest_is_one_line_naming_the_field(tmp_path, one_line_error, edit,
                                                           message):
    _write(tmp_path, 0, 2)
    manifest = shards.write_manifest(tmp_path, {"grid": 2, "include_cls": True})
    edit(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    text = one_line_error(lambda: shards.read_manifest(tmp_path), re.escape(message),
                          shards.ShardError)
    assert text.startswith(f"{tmp_path / 'manifest.json'}: ")


def _ungrouped_split(keys, eval_fraction, salt=shards.SPLIT_SALT):
    """The split without grouping, written out: the default must be exactly this."""
    scores = [shards.heldout_score(key, salt) for key in keys]
    floor = min(shards.MIN_HELDOUT, len(keys) // 5) if eval_fraction > 0 else 0
    by_score = sorted(range(len(keys)), key=scores.__getitem__)
    held = set(by_score[:max(floor, sum(s < eval_fraction for s in scores))])
    return [i for i in range(len(keys)) if i not in held], sorted(held)


@pytest.mark.parametrize("n", [4, 20, 57, 400])
@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.2])
def test_the_default_split_is_unchanged_by_group_by(n, fraction):
    keys = [f"img-{i}" for i in range(n)]
    expected = _ungrouped_split(keys, fraction)
    assert shards.split_indices(keys, fraction) == expected
    assert shards.split_indices(keys, fraction, group_by=None) == expected
    # a regex that puts every key in a group of its own makes the same split
    assert shards.split_indices(keys, fraction, group_by=r"^(.*)$") == expected


def _groups(keys, rows, group_by):
    return {shards.group_of(keys[i], group_by) for i in rows}


@pytest.mark.parametrize(("group_by", "keys", "group"), [
    ("prefix", [f"video{v}/frame_{f:04d}.jpg" for v in range(30) for f in range(7)],
     lambda k: k.split("/")[0] + "/frame"),
    ("prefix", [f"clip{v:02d}_{f:03d}" for v in range(30) for f in range(5)], lambda k: k[:6]),
    (r"(.+)-view\d+", [f"photo{p}-view{i:04d}.jpg" for i in range(200) for p in [i % 20]],
     lambda k: k.split("-view")[0]),
])
def test_keys_sharing_a_group_are_held_out_together(group_by, keys, group):
    assert {shards.group_of(k, group_by) for k in keys} == {group(k) for k in keys}
    train, heldout = shards.split_indices(keys, 0.2, group_by=group_by)
    assert sorted(train + heldout) == list(range(len(keys))) and heldout and train
    held, trained = _groups(keys, heldout, group_by), _groups(keys, train, group_by)
    assert not held & trained  # no group straddles train / held-out
    n_groups = len(held | trained)
    assert len(held) >= min(shards.MIN_HELDOUT, n_groups // 5)  # the floor counts groups
    # the split without grouping does put views of one source on both sides
    plain_train, plain_held = shards.split_indices(keys, 0.2)
    assert _groups(keys, plain_held, group_by) & _groups(keys, plain_train, group_by)
    # membership depends on the group only: reordering the keys keeps it
    _, again = shards.split_indices(list(reversed(keys)), 0.2, group_by=group_by)
    assert {keys[len(keys) - 1 - i] for i in again} == {keys[i] for i in heldout}
    record = shards.split_grouping(keys, heldout, group_by)
    assert record == {"group_by": group_by, "num_groups": n_groups, "num_heldout_groups": len(held)}


def test_group_by_prefix_and_regex_errors():
    assert shards.group_of("video1/frame_0042.jpg", "prefix") == "video1/frame"
    assert shards.group_of("hubble_deep_field-view0001.jpg", "prefix") == "hubble_deep_field"
    assert shards.group_of("tarname/000123", "prefix") == "tarname"
    assert shards.group_of("lonely.jpg", "prefix") == "lonely"
    assert shards.group_of("cam2-0007.png", r"^cam\d+") == "cam2"  # no group: the whole match
    with pytest.raises(shards.UserError, match="does not match the key 'other.jpg'"):
        shards.split_indices(["cam1-0001.png", "other.jpg"], 0.2, group_by=r"^(cam\d+)-")
    with pytest.raises(shards.UserError, match="not a regular expression"):
        shards.group_of("a", "(")
