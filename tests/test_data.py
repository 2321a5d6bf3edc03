"""Training data: validation, split, the deterministic/resumable batch schedule, rank slicing."""

import json
from itertools import islice

import pytest
import torch
from safetensors.torch import load_file, save_file

from eva_repro.data import shards
from eva_repro.data.loader import (
    BatchReader,
    BatchSchedule,
    DataPosition,
    condition_whitening,
    load_rows,
    open_training_data,
    read_batch,
    target_norm,
)
from eva_repro.data.synth import make_pairs, write_synthetic_shards


@pytest.fixture(scope="module")
def synth_dir(synth_shards):
    return synth_shards(100, grid=2, clip_dim=8, eva_dim=12, seed=0, shard_size=16)


def _schedule(rows, shard_size=16, global_batch=8, seed=0, window=32):
    return BatchSchedule(rows, [r // shard_size for r in rows], global_batch, seed=seed,
                         window_rows=window)


def test_split_is_by_key_hash_and_heldout_is_never_trained_on(synth_dir):
    data = open_training_data(synth_dir, eval_fraction=0.2)
    keys = shards.ShardReader(synth_dir).keys()
    assert (data.train_rows, data.heldout_rows) == shards.split_indices(keys, 0.2)
    assert not set(data.train_rows) & set(data.heldout_rows)
    assert 5 <= len(data.heldout_rows) <= 35
    record = data.split_record()
    assert record["heldout_keys"] == [keys[i] for i in data.heldout_rows]
    assert (record["num_train"], record["num_heldout"], record["salt"]) == (
        len(data.train_rows), len(data.heldout_rows), "eva-repro")
    assert (record["group_by"], record["num_groups"]) == (None, 100)  # each key its own group
    grouped = open_training_data(synth_dir, eval_fraction=0.2, group_by=r"-\d{5}(\d)")
    tens = {keys[i][-2] for i in grouped.heldout_rows}  # synth-0000042 -> group "4"
    assert {i for i, k in enumerate(keys) if k[-2] in tens} == set(grouped.heldout_rows)
    assert grouped.split_record()["num_heldout_groups"] == len(tens) >= 2
    small = open_training_data(synth_dir, eval_fraction=0.2, max_samples=80)
    assert max(small.train_rows + small.heldout_rows) < 80 and small.split_record()["max_samples"] == 80
    # the split of a key does not depend on max_samples (while the fraction alone holds out at
    # least the small-data floor, shards.MIN_HELDOUT)
    assert len(small.heldout_rows) >= shards.MIN_HELDOUT
    assert set(small.heldout_rows) == {r for r in data.heldout_rows if r < 80}


def test_epoch_order_is_a_shuffled_permutation_with_shard_window_locality():
    rows = list(range(96))  # 6 shards of 16
    s = _schedule(rows)
    e0, e1 = s.epoch_order(0), s.epoch_order(1)
    assert sorted(e0) == rows and sorted(e1) == rows and e0 != e1
    assert e0 != sorted(e0)
    assert _schedule(rows).epoch_order(1) == e1 and _schedule(rows, seed=1).epoch_order(1) != e1
    # rows come in windows of 32 rows = 2 whole shards: each block of 32 covers exactly 2 shards
    for w in range(3):
        block = e0[32 * w:32 * (w + 1)]
        assert len({r // 16 for r in block}) == 2
    # data smaller than the default window is one global shuffle: the first 32 rows of an
    # epoch come from (nearly) every shard
    assert len({r // 16 for r in BatchSchedule(rows, [r // 16 for r in rows], 8).epoch_order(0)[:32]}) >= 5
    # shard order is shuffled too (not always shards 0,1 first)
    firsts = {frozenset(r // 16 for r in _schedule(rows, seed=k).epoch_order(0)[:32]) for k in range(6)}
    assert len(firsts) > 1
    assert s.batches_per_epoch == 12


def test_ranks_get_disjoint_slices_of_the_same_global_batch_and_resume_exactly():
    rows = list(range(40))
    s = _schedule(rows, global_batch=8)
    single = list(islice(s.stream(DataPosition()), 7))  # crosses the epoch boundary (5 per epoch)
    r0 = list(islice(s.stream(DataPosition(), rank=0, world_size=2), 7))
    r1 = list(islice(s.stream(DataPosition(), rank=1, world_size=2), 7))
    for (pos, rows_all, off), (p0, a, o0), (p1, b, o1) in zip(single, r0, r1, strict=True):
        assert pos == p0 == p1 and off == 0 and (o0, o1) == (0, 4)
        assert a + b == rows_all and not set(a) & set(b)
    assert [p for p, _, _ in single][4:6] == [DataPosition(0, 4), DataPosition(1, 0)]
    resumed = list(islice(s.stream(DataPosition(1, 0)), 2))
    assert [r for _, r, _ in resumed] == [r for _, r, _ in single[5:7]]
    assert s.advance(DataPosition(0, 4)) == DataPosition(1, 0)
    assert s.advance(DataPosition(0, 3), 7) == DataPosition(2, 0)


def test_batches_are_fp16_on_disk_and_fp32_on_device(synth_dir):
    data = open_training_data(synth_dir, eval_fraction=0.0)
    reader = BatchReader(data.reader, data.keys)
    batch = reader[(DataPosition(0, 3), [5, 17, 40], 8)]
    assert batch.clip.dtype == torch.float16 and batch.position == DataPosition(0, 3)
    on_device = batch.to(torch.device("cpu"))
    clip, eva = make_pairs(41, grid=2, clip_dim=8, eva_dim=12, seed=0)
    assert on_device.eva.dtype == torch.float32 and batch.offset == 8
    assert torch.equal(on_device.eva, eva[[5, 17, 40]].half().float())
    assert torch.equal(on_device.clip, clip[[5, 17, 40]].half().float())
    ids, c, e = load_rows(data.reader, [1, 2], data.keys)
    assert ids == [1, 2] and c.dtype == torch.float32 and torch.equal(e, eva[[1, 2]].half().float())
    norm = target_norm(data.reader, list(range(41)))
    assert norm == pytest.approx(eva.half().float().norm(dim=-1).mean().item(), rel=1e-5)


def test_nan_or_inf_samples_are_skipped_with_their_key(tmp_path):
    write_synthetic_shards(tmp_path, 8, grid=2, clip_dim=4, eva_dim=4, shard_size=8)
    path = tmp_path / "shard-00000.safetensors"
    t = load_file(str(path))
    t["eva"][2, 0, 0], t["clip"][5, 1, 1] = float("nan"), float("inf")
    save_file(t, str(path))
    reader = shards.ShardReader(tmp_path)
    keys = reader.keys()
    batch = read_batch(reader, [1, 2, 5, 6], keys)
    assert batch.valid.tolist() == [True, False, False, True]
    assert len(batch.bad) == 2 and keys[2] in batch.bad[0] and "NaN/Inf" in batch.bad[0]
    assert torch.isfinite(batch.eva).all() and torch.isfinite(batch.clip).all()
    ids, clip, eva = load_rows(reader, [1, 2, 5, 6], keys)
    assert ids == [1, 6] and clip.shape[0] == eva.shape[0] == 2


def test_bad_data_directories_give_one_line_errors(tmp_path, synth_dir, one_line_error):
    one_line_error(lambda: open_training_data(tmp_path / "nope"), "does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: open_training_data(tmp_path / "empty"), "holds no shards")
    # checksum mismatch: a shard changed after the manifest was written
    bad = tmp_path / "corrupt"
    write_synthetic_shards(bad, 20, grid=2, clip_dim=4, eva_dim=4, shard_size=10)
    t = load_file(str(bad / "shard-00001.safetensors"))
    t["eva"][0] += 1
    save_file(t, str(bad / "shard-00001.safetensors"))
    msg = one_line_error(lambda: open_training_data(bad), "sha256")
    assert "shard-00001" in msg
    open_training_data(bad, verify_checksums=False)  # opt-out still opens it
    # shards with different dims in one directory
    mixed = tmp_path / "mixed"
    c, e = make_pairs(4, grid=2, clip_dim=4, eva_dim=4)
    shards.write_shard(mixed, 0, c, e, [f"a{i}" for i in range(4)])
    c2, e2 = make_pairs(4, grid=2, clip_dim=4, eva_dim=6)
    shards.write_shard(mixed, 1, c2, e2, [f"b{i}" for i in range(4)])
    shards.write_manifest(mixed, {"grid": 2, "include_cls": False})
    msg = one_line_error(lambda: open_training_data(mixed), "same encoders")
    assert "shard-00001" in msg
    # ... or different dtypes
    mixed_dtype = tmp_path / "mixed_dtype"
    shards.write_shard(mixed_dtype, 0, c, e, [f"a{i}" for i in range(4)], dtype="float16")
    shards.write_shard(mixed_dtype, 1, c, e, [f"b{i}" for i in range(4)], dtype="float32")
    shards.write_manifest(mixed_dtype, {"grid": 2, "include_cls": False})
    one_line_error(lambda: open_training_data(mixed_dtype), "dtypes")
    # batch larger than the data
    data = open_training_data(synth_dir, eval_fraction=0.5, max_samples=10)
    one_line_error(lambda: _schedule(data.train_rows, global_batch=64), "larger than")
    one_line_error(lambda: open_training_data(synth_dir, eval_fraction=1.5), "eval_fraction")
    one_line_error(lambda: open_training_data(synth_dir, max_samples=0), "max_samples")


def test_manifest_with_wrong_sample_count_is_rejected(tmp_path, one_line_error):
    write_synthetic_shards(tmp_path, 8, grid=2, clip_dim=4, eva_dim=4, shard_size=8)
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["shards"][0]["num_samples"] = 9
    m["num_samples"] = 9
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    one_line_error(lambda: open_training_data(tmp_path, verify_checksums=False), "shape")


def test_condition_whitening_whitens_the_training_conditions_only(tmp_path):
    """Anisotropic conditions (one direction 30x the others): with a tiny shrinkage the whitened,
    RMS-normalised training tokens have identity covariance; the default shrinkage amplifies no
    direction more than sqrt(2); held-out rows do not move the statistics."""
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(64, 4, 6, generator=g) * torch.tensor([30.0, 1, 1, 1, 0.5, 0.1]) + 2.0
    shards.write_shard(tmp_path, 0, clip, torch.randn(64, 4, 3, generator=g),
                       [f"k{i}" for i in range(64)], dtype="float32")
    shards.write_manifest(tmp_path, {"grid": 2, "include_cls": False})
    reader = shards.ShardReader(tmp_path)
    train = list(range(48))
    mean, matrix = condition_whitening(reader, train, shrink=1e-6)
    x = clip[:48].double()
    x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).reshape(-1, 6)
    z = (x - mean.double()) @ matrix.double()
    torch.testing.assert_close(torch.cov(z.T), torch.eye(6, dtype=torch.float64), atol=2e-3,
                               rtol=0)
    _, shrunk = condition_whitening(reader, train, shrink=1.0)
    gains = torch.linalg.svdvals(shrunk.double()) * torch.linalg.svdvals(torch.cov(x.T)).sqrt().flip(0)
    assert gains.max() <= 2 ** 0.5 + 1e-3
    held_out_changed = clip.clone()
    held_out_changed[48:] *= -5
    shards.write_shard(tmp_path, 0, held_out_changed, torch.randn(64, 4, 3, generator=g),
                       [f"k{i}" for i in range(64)], dtype="float32")
    again = condition_whitening(shards.ShardReader(tmp_path), train, shrink=1e-6)
    assert torch.equal(again[0], mean) and torch.equal(again[1], matrix)

