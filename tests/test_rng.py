"""Counter-based random numbers: SplitMix64 bit for bit, rows independent of their batch, and
the distributions the trainer and the samplers rely on."""

import math

import torch

from eva_repro.utils import rng

MASK = (1 << 64) - 1


def splitmix64(key: int, index: int) -> int:
    """The reference in Python integers: value pair `index` of `key` (rng's module docstring)."""

    def finalise(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    return finalise((finalise(key & MASK) + (index + 1) * 0x9E3779B97F4A7C15) & MASK)


def test_uniforms_are_splitmix64_bit_for_bit():
    keys = [0, 1, 2**62 + 12345, rng.mix_seed("noise", 0, 3)]
    u = rng.uniform(keys, 7)
    levels = 1 << rng.BITS
    for row, key in enumerate(keys):
        for j in range(7):
            z = splitmix64(key, j // 2)
            bits = z & (levels - 1) if j % 2 == 0 else z >> (64 - rng.BITS)
            assert u[row, j].item() == (bits + 0.5) / levels


def test_a_row_draws_the_same_values_in_any_batch_and_any_length():
    keys = torch.arange(6, dtype=torch.int64) ^ rng.mix_seed("x", 1)
    whole = rng.normal(keys, (3, 5))
    assert torch.equal(rng.normal(keys[2:4], (3, 5)), whole[2:4])
    assert torch.equal(rng.uniform(keys, 9)[:, :4], rng.uniform(keys, 4))
    assert not torch.equal(whole[0], whole[1])


def test_normals_are_standard_and_rows_of_adjacent_keys_uncorrelated():
    z = rng.normal(torch.arange(64, dtype=torch.int64), (4096,))
    assert torch.isfinite(z).all()
    assert abs(z.mean().item()) < 0.005 and abs(z.std().item() - 1) < 0.005
    assert abs(z.pow(4).mean().item() - 3) < 0.05  # a normal's kurtosis
    assert abs((z < -1.959964).float().mean().item() - 0.025) < 0.002  # its tail
    corr = torch.corrcoef(z)
    assert (corr - torch.eye(64)).abs().max() < 0.07  # 4096 values: |r| ~ 1 / 64 by chance
    within = torch.corrcoef(torch.stack([z[:, :-1].flatten(), z[:, 1:].flatten()]))[0, 1]
    assert abs(within) < 0.01


def test_the_extreme_levels_stay_finite():
    u = torch.tensor([0.5, 2**rng.BITS - 0.5]) / 2**rng.BITS
    z = rng.normal_from_uniform(u)
    assert torch.isfinite(z).all() and z[0] == -z[1] and z[1] > 5
    assert math.isclose(rng.normal_from_uniform(torch.tensor(0.975)).item(), 1.959964, rel_tol=1e-5)
