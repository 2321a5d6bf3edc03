"""Counter-based random numbers: every value is a hash of (a row's key, the value's index).

    mix_seed(*parts) -> int                 a 63-bit key from several parts
    uniform(keys, n) -> [B, n]              in the open interval (0, 1), 2**23 levels
    normal(keys, shape) -> [B, *shape]      N(0, 1), the inverse normal CDF of `uniform`

A row's values depend on its key only, never on the other rows drawn with it, so one call draws a
whole batch and a row draws the same values in any batch, on any rank, after any resume, and on
CPU and CUDA alike (the hash is integer arithmetic; only the final erfinv is floating point).

The hash is SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
OOPSLA 2014; the generator of Java's SplittableRandom): value pair j of key k is
finalise(finalise(k) + (j + 1) * GAMMA), and its low and high bits give two uniforms. Two rows'
streams can overlap only when their finalised keys differ by a small multiple of GAMMA, which
for random keys has probability about (values per row) / 2**64.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

BITS = 23  # per uniform: (k + 0.5) / 2**23 and 2u - 1 are exact in float32, so erfinv stays finite


def _int64(value: int) -> int:
    """A 64-bit constant as the signed int64 that holds the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


GAMMA = _int64(0x9E3779B97F4A7C15)
MUL1 = _int64(0xBF58476D1CE4E5B9)
MUL2 = _int64(0x94D049BB133111EB)


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several parts; unlike `seed + epoch` nearby inputs do not collide."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


def _finalise(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 bit patterns, in place (every pass is memory-bound);
    torch's int64 arithmetic wraps on overflow like uint64, and `>>` is arithmetic, hence the mask
    that makes it a logical shift."""
    shifted = torch.empty_like(z)
    for bits, multiplier in ((30, MUL1), (27, MUL2), (31, 1)):
        torch.bitwise_right_shift(z, bits, out=shifted).bitwise_and_((1 << (64 - bits)) - 1)
        z.bitwise_xor_(shifted).mul_(multiplier)
    return z


def uniform(keys: torch.Tensor | Sequence[int], n: int) -> torch.Tensor:
    """[len(keys), n] float32 uniforms in (0, 1); row i depends on keys[i] only. The result is on
    the device of `keys` (a tensor) or the CPU (a sequence of ints)."""
    keys = torch.as_tensor(keys, dtype=torch.int64)
    pairs = (n + 1) // 2
    counters = torch.arange(1, pairs + 1, dtype=torch.int64, device=keys.device) * GAMMA
    z = _finalise(_finalise(keys.clone())[:, None] + counters)
    levels = torch.empty(len(keys), pairs, 2, device=keys.device)
    levels[..., 0] = z & ((1 << BITS) - 1)  # the low bits
    levels[..., 1] = z.bitwise_right_shift_(64 - BITS).bitwise_and_((1 << BITS) - 1)  # the high
    return levels.view(len(keys), 2 * pairs)[:, :n].add_(0.5).mul_(2.0**-BITS)


def normal_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """The standard normal quantile of u in (0, 1)."""
    return torch.erfinv(2 * u - 1).mul_(math.sqrt(2.0))


def normal(keys: torch.Tensor | Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """[len(keys), *shape] standard normals; row i depends on keys[i] only."""
    u = uniform(keys, math.prod(shape))
    return normal_from_uniform(u).view(u.shape[0], *shape)
