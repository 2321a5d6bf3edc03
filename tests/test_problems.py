"""The known-answer problems: p(y | c) is what the docstring says, and the shards carry it."""

import pytest
import torch

from eva_repro.data.shards import ShardReader, check_shapes, read_manifest
from eva_repro.flow import transport
from eva_repro.flow.transport import token_cosine
from eva_repro.testbed.problems import problems


def test_draws_scatter_around_the_conditional_mean_in_a_rank_r_subspace():
    p = problems(16, 8)["grid"]
    clip = p.condition(0, 4)
    draws = torch.stack([p.draw_target(clip, [4 * s + i for i in range(4)]) for s in range(400)])
    mean = p.mean_target(clip)
    torch.testing.assert_close(draws.mean(0), mean, atol=0.15, rtol=0)  # 6 sigma of 400 draws
    spread = (draws - mean).reshape(-1, p.eva_dim)
    assert torch.linalg.matrix_rank(spread.T @ spread, rtol=1e-4) == 4
    assert not torch.equal(p.draw_target(clip, [1] * 4), p.draw_target(clip, [2] * 4))


def test_the_neighbour_problem_reads_the_neighbours_and_the_grid_one_does_not():
    fams = problems(16, 8)
    clip = fams["grid"].condition(0, 2)
    for name, reads in (("grid", False), ("neighbour", True)):
        p = fams[name]
        moved = clip.clone()
        moved[:, 1] += 1.0  # change token 1 only: token 0 is its neighbour
        changed = not torch.allclose(p.mean_target(moved)[:, 0], p.mean_target(clip)[:, 0])
        assert changed == reads, name


def test_an_oracle_draw_scores_above_the_mean_and_below_the_conditional_mean():
    p = problems(32, 64)["grid"]
    clip, target = p.pairs(0, 64)
    y = transport.normalize_target(target)
    score = lambda pred: float(token_cosine(pred, y).mean())  # noqa: E731
    mean = y.mean(0, keepdim=True).expand_as(y)
    oracle = transport.normalize_target(p.draw_target(clip, range(1000, 1064)))
    assert score(mean) < score(oracle) < score(transport.normalize_target(p.mean_target(clip)))


def test_written_shards_hold_the_pairs(tmp_path):
    p = problems(16, 40)["global"]
    out = p.write(tmp_path / "global", shard_size=16)
    manifest = read_manifest(out)
    assert (manifest.tokens, manifest.clip_dim, manifest.eva_dim, manifest.num_samples) == (1, 32, 16, 40)
    clip, eva = p.pairs(0, 40)  # one call equals the shard-sized chunks
    got = ShardReader(manifest).gather(list(range(40)))
    torch.testing.assert_close(got["clip"], clip)
    torch.testing.assert_close(got["eva"], eva)


@pytest.mark.parametrize("name", ["global", "grid", "neighbour", "wide", "regrid"])
def test_each_family_is_the_documented_size(name):
    p = problems(48, 10)[name]
    assert p.tokens == (1 if name == "global" else 16)
    assert p.clip_tokens == (64 if name == "regrid" else p.tokens)
    assert p.eva_dim == (4 * 48 if name == "wide" else 48)


def test_the_regrid_target_reads_the_condition_block_under_it_not_the_same_flat_index(tmp_path):
    p = problems(16, 12)["regrid"]
    clip = p.condition(0, 2)  # [2, 8 x 8, 32]; the target is on 4 x 4
    target0 = p.mean_target(clip)[:, 0]
    for token, reads in ((9, True), (1, True), (2, False)):  # (1, 1), (0, 1): block 0; (0, 2): not
        moved = clip.clone()
        moved[:, token] += 1.0
        assert (not torch.allclose(p.mean_target(moved)[:, 0], target0)) == reads, token
    manifest = read_manifest(p.write(tmp_path / "regrid", shard_size=5))
    assert (manifest.clip_tokens, manifest.tokens, manifest.grid) == (64, 16, 4)
    reader = ShardReader(manifest)
    check_shapes(reader)  # the manifest's two token counts are what the shards hold
    got = reader.gather([0, 11])
    assert got["clip"].shape == (2, 64, 32) and got["eva"].shape == (2, 16, 16)
