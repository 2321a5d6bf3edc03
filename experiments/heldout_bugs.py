"""Held-out bugs: DiT bugs that `eva-repro check` was never calibrated on, each a plugin.

The bug zoo (`eva_repro.testbed.zoo`) is what the card's checks and thresholds were built
against, all in the pure Next-DiT head. These are other bugs, half of them planted in another
network (`examples/plain_dit.py`: absolute sin-cos positions, adaLN-Zero, PixArt's
cross-attention) and half in the pure Next-DiT head, to measure whether the card catches bugs it
was not tuned on, and passes the two rewrites that change nothing (`*_equivalent`).

    eva-repro check --backbone experiments/heldout_bugs.py:NAME --output_dir OUT --budget quick
    python experiments/heldout_bugs.py [OUT] [BUDGET] [NAME ...] [--reuse]   # docs/testbed.md

runs that command for every factory in `FACTORIES` (or the NAMEs), one card after another
(`--reuse`: judges the finished runs under OUT again, as `check --reuse` does), and writes
OUT/heldout.json and heldout.md (at the quick budget, the default, also under
experiments/results/testbed/). Set OMP_NUM_THREADS=1: each card trains one run per core.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from eva_repro import cli
from eva_repro.model.dit import DiT, apply_rope
from eva_repro.testbed import zoo
from eva_repro.testbed.zoo import Wrapped, head
from eva_repro.utils.files import atomic_write_bytes, atomic_write_json

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("plain_dit", HERE.parent / "examples" / "plain_dit.py")
plain_dit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plain_dit)


# -- bugs in the plain DiT (examples/plain_dit.py) ---------------------------------------------


def plain_correct(**kw) -> nn.Module:
    """The plain DiT, unmodified (must pass)."""
    return plain_dit.build(**kw)


class PlainConditionInOwnUnits(plain_dit.PlainDiT):
    """PlainDiT.forward with the condition's sin-cos table counted on its own grid (0 .. gc - 1)
    instead of placed on the target grid."""

    def forward(self, x_t, t, cond, drop_cond=None):
        g, gc = plain_dit.grid_side(x_t.shape[1], "target"), plain_dit.grid_side(cond.shape[1], "c")
        hidden = self.config.hidden
        if drop_cond is not None:
            cond = torch.where(drop_cond.view(-1, 1, 1), self.null.to(cond.dtype), cond)
        h = self.x_in(x_t) + plain_dit.sincos_2d(hidden, g, g, x_t.device).to(x_t.dtype)
        k = self.c_in(self.c_norm(cond)) + plain_dit.sincos_2d(hidden, gc, gc, cond.device).to(x_t.dtype)
        e = self.t_mlp(plain_dit.timestep_features(t, self.config.freq_dim).to(x_t.dtype))
        for block in self.blocks:
            h = block(h, e, k)
        shift, scale = self.ada_out(e).chunk(2, dim=-1)
        return self.out(plain_dit.modulate(self.norm_out(h), shift, scale))


def plain_condition_in_own_units(**kw) -> nn.Module:
    """Each grid's positions in its own units (the condition's table not mapped onto the target grid)."""
    return _plain(PlainConditionInOwnUnits, **kw)


class PlainTimestepScaledTwice(plain_dit.PlainDiT):
    """t multiplied by 1000 before the embedder, which multiplies by 1000 again."""

    def forward(self, x_t, t, cond, drop_cond=None):
        return super().forward(x_t, 1000.0 * t, cond, drop_cond)


def plain_timestep_scaled_twice(**kw) -> nn.Module:
    """The timestep scaled to [0, 1000] twice: the embedder sees 10^6 t."""
    return _plain(PlainTimestepScaledTwice, **kw)


class PlainPairsShiftedInTraining(plain_dit.PlainDiT):
    """In training, each sample gets the next sample's condition (a loader that zips two lists
    shuffled apart); sampling uses the right one."""

    def forward(self, x_t, t, cond, drop_cond=None):
        if self.training:
            cond = cond.roll(1, dims=0)
        return super().forward(x_t, t, cond, drop_cond)


def plain_pairs_shifted_in_training(**kw) -> nn.Module:
    """Training pairs every target with another image's condition."""
    return _plain(PlainPairsShiftedInTraining, **kw)


class PlainDropIgnored(plain_dit.PlainDiT):
    def forward(self, x_t, t, cond, drop_cond=None):
        return super().forward(x_t, t, cond, None)


def plain_drop_cond_ignored(**kw) -> nn.Module:
    """`drop_cond` accepted and never applied: guidance's null condition is the condition."""
    return _plain(PlainDropIgnored, **kw)


def plain_shift_scale_swapped_equivalent(**kw) -> nn.Module:
    """adaLN's shift and scale read from each other's chunk: both are learned from zero, so this
    is the same family of functions (must pass)."""
    net = plain_dit.build(**kw)
    for block in net.blocks:
        block.forward = types.MethodType(_block_shift_scale_swapped, block)
    return net


def _block_shift_scale_swapped(self, h, e, k):
    s1, b1, a1, s2, b2, a2 = self.ada(e).chunk(6, dim=-1)
    x = plain_dit.modulate(self.norm1(h), b1, s1)
    h = h + a1[:, None] * self.attn(x, x)
    h = h + self.cross(h, k)
    return h + a2[:, None] * self.mlp(plain_dit.modulate(self.norm2(h), b2, s2))


def _plain(cls: type, **kw) -> nn.Module:
    sizes = {k: kw[k] for k in ("hidden", "depth", "n_heads") if kw.get(k) is not None}
    return cls(plain_dit.PlainDiTConfig(kw["target_dim"], kw["cond_dim"], kw["tokens"], **sizes))


# -- bugs in the pure Next-DiT head (BLIP3-o / Lumina-Next) -------------------------------------


head_correct = zoo.correct  # the pure Next-DiT head, unmodified (must pass)


def _attention(self, x, c, rope_x, rope_c, *, rope_keys=True, tile_kv=False, untransposed=False,
               batch_rms=False):
    """dit.Attention.forward, written out, with one bug switched on."""
    B, T, _ = x.shape
    hd, kvd = self.head_dim, self.n_kv_heads * self.head_dim
    q, k, v = self.wqkv(x).split([self.n_heads * hd, kvd, kvd], dim=-1)
    if batch_rms:  # queries scaled by their RMS over the batch, not over the channels
        q = q / q.pow(2).mean(dim=0, keepdim=True).add(1e-6).sqrt()
    q = apply_rope(self.q_norm(q.view(B, T, -1, hd)), *rope_x)
    k = self.k_norm(k.view(B, T, -1, hd))
    kc, vc = self.wkv_cond(c).view(B, c.shape[1], 2, -1, hd).unbind(2)
    kc = self.k_cond_norm(kc)
    if rope_keys:
        k, kc = apply_rope(k, *rope_x), apply_rope(kc, *rope_c)
    rep = self.n_heads // self.n_kv_heads

    def expand(y):  # [B, S, KV, hd] -> [B, H, S, hd]
        y = y.transpose(1, 2)
        return y.repeat(1, rep, 1, 1) if tile_kv else y.repeat_interleave(rep, dim=1)

    qh = q.transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, expand(k), expand(v.view(B, T, -1, hd)))
    out_cond = F.scaled_dot_product_attention(qh, expand(kc), expand(vc))
    out = out + torch.tanh(self.cond_gate).view(1, -1, 1, 1) * out_cond
    out = out.reshape(B, T, -1) if untransposed else out.transpose(1, 2).reshape(B, T, -1)
    return self.wo(out)


def _with_attention(name: str, doc: str, **switch):
    def factory(**kw) -> nn.Module:
        net = head(**kw)
        for block in net.blocks:
            block.attn.forward = types.MethodType(functools.partial(_attention, **switch), block.attn)
        return Wrapped(net)
    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    return factory


head_rope_on_queries_only = _with_attention(
    "head_rope_on_queries_only",
    "RoPE rotates the queries only, never the keys (self- and cross-attention).", rope_keys=False)
head_output_heads_untransposed = _with_attention(
    "head_output_heads_untransposed",
    "The attention output [B, H, T, hd] reshaped to [B, T, H*hd] without the transpose.",
    untransposed=True)
head_queries_normalised_over_batch = _with_attention(
    "head_queries_normalised_over_batch",
    "The queries scaled by their RMS over the batch axis (dim=0 for dim=-1).", batch_rms=True)
head_gqa_tiled_equivalent = _with_attention(
    "head_gqa_tiled_equivalent",
    "GQA's key/value heads tiled (repeat) instead of interleaved: another grouping of the same "
    "heads, the same family of functions (must pass).", tile_kv=True)


class ConditionPositions(Wrapped):
    """The head with the condition's positions computed by `edit_positions(positions, tokens,
    grid_tokens, device)` instead of `positions(tokens, grid_tokens, device)`. DiT.forward asks `positions`
    for the target's first and the condition's second, with the same arguments when both lie on
    one grid, so the second call is the condition's."""

    def __init__(self, net: DiT, edit_positions):
        super().__init__(net)
        self.edit_positions = edit_positions

    def forward(self, x, t, cond, drop_cond=None):
        real, calls = self.net.positions, []

        def positions(tokens, grid_tokens, device):
            calls.append(tokens)
            if len(calls) == 1:
                return real(tokens, grid_tokens, device)
            return self.edit_positions(real, tokens, grid_tokens, device)

        self.net.positions = positions  # this call only
        try:
            return self.net(x, t, cond, drop_cond)
        finally:
            del self.net.positions


def _reordered(order_of):
    def edit(real, tokens, grid_tokens, device):
        cos, sin, embed = real(tokens, grid_tokens, device)
        order = order_of(tokens).to(cos.device)
        return cos[order], sin[order], embed
    return edit


def _transposed(tokens: int) -> torch.Tensor:
    g = int(round(tokens ** 0.5))  # the condition's (row, col) read as (col, row)
    return torch.arange(tokens).view(g, g).t().flatten()


def _shifted_one(tokens: int) -> torch.Tensor:
    # a CLS token stripped that is not there: each condition token takes its predecessor's
    # position (the first keeps its own)
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(tokens - 1)])


def _own_units(real, tokens, grid_tokens, device):
    return real(tokens, tokens, device)  # counted on its own grid, not mapped onto the target's


def head_condition_rows_cols_swapped(**kw) -> nn.Module:
    """The condition's patch grid read column-major (its rows and columns swapped); the target's
    row-major."""
    return ConditionPositions(head(**kw), _reordered(_transposed))


def head_condition_positions_off_by_one(**kw) -> nn.Module:
    """Every condition token at its predecessor's position (a CLS strip on tokens that have none)."""
    return ConditionPositions(head(**kw), _reordered(_shifted_one))


def head_condition_in_own_units(**kw) -> nn.Module:
    """The condition's RoPE positions counted on its own grid (0 .. gc - 1), not mapped onto the
    target grid: a finer condition grid's positions do not line up with the target's."""
    return ConditionPositions(head(**kw), _own_units)


# -- the table -------------------------------------------------------------------------------

FACTORIES = [
    plain_condition_in_own_units, plain_timestep_scaled_twice, plain_pairs_shifted_in_training,
    plain_drop_cond_ignored, plain_shift_scale_swapped_equivalent,
    head_rope_on_queries_only, head_output_heads_untransposed, head_queries_normalised_over_batch,
    head_condition_rows_cols_swapped, head_condition_positions_off_by_one,
    head_condition_in_own_units, head_gqa_tiled_equivalent,
]  # the unmodified networks' cards are the zoo's `correct` row and the plain DiT's reference card


def must_pass(name: str) -> bool:
    return name.endswith(("_correct", "_equivalent"))


def main(out: Path, budget: str = "quick", names: list[str] | None = None, reuse: bool = False
         ) -> dict[str, Any]:
    """One card per factory (`eva-repro check`), then the table of every card under `out`."""
    known = {f.__name__ for f in FACTORIES}
    if unknown := set(names or []) - known:
        raise SystemExit(f"heldout_bugs.py: no factory {sorted(unknown)}; known: {sorted(known)}")
    walls = out / "wall.json"
    for name in names or [f.__name__ for f in FACTORIES]:
        start = time.time()
        cli.main(["check", "--backbone", f"{Path(__file__).resolve()}:{name}", "--output_dir",
                  str(out / name), "--budget", budget, *(["--reuse"] if reuse else [])])
        if not reuse:  # exit 1 is a result too; a re-judged card keeps its training's wall time
            atomic_write_json(walls, {**(json.loads(walls.read_text()) if walls.exists() else {}),
                                      name: round(time.time() - start)})
    rows = collect(out)
    if budget == "quick":
        results = HERE / "results" / "testbed"
        results.mkdir(parents=True, exist_ok=True)
        for name in ("heldout.json", "heldout.md"):
            atomic_write_bytes(results / name, (out / name).read_bytes())
    return rows


def collect(out: Path) -> dict[str, Any]:
    """heldout.json / heldout.md from the cards under `out` (one directory per factory)."""
    rows = {}
    walls = json.loads((out / "wall.json").read_text()) if (out / "wall.json").exists() else {}
    for f in FACTORIES:
        path = out / f.__name__ / "check.json"
        if not path.exists():
            continue
        card = json.loads(path.read_text())
        rows[f.__name__] = {
            "what": " ".join(f.__doc__.split()), "must_pass": must_pass(f.__name__),
            "passed": card["passed"], "wall_s": walls.get(f.__name__),
            "failed": [c["name"] for c in card["checks"] if c["passed"] is False],
            "learning": {c["name"]: round(c["value"], 3) for c in card["checks"]
                         if c["group"] == "learning" and c["value"] is not None},
        }
    atomic_write_json(out / "heldout.json", rows)
    lines = ["| bug | host | verdict | failed checks |", "|---|---|---|---|"]
    for name, r in rows.items():
        verdict = {(True, True): "passes", (True, False): "FAILS: a false alarm",
                   (False, False): "FAILS: caught", (False, True): "passes: not caught"}[
            (r["must_pass"], r["passed"])]
        host = "plain DiT" if name.startswith("plain_") else "pure Next-DiT"
        lines.append(f"| {name} | {host} | {verdict} | {', '.join(r['failed']) or '-'} |")
    atomic_write_bytes(out / "heldout.md", ("\n".join(lines) + "\n").encode())
    return rows


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--reuse"]
    if any(a.startswith("-") for a in args):
        sys.exit("usage: python experiments/heldout_bugs.py [OUT] [BUDGET] [NAME ...] [--reuse]")
    out = Path(args[0] if args else "heldout")
    main(out, *(args[1:2] or ["quick"]), args[2:] or None, reuse="--reuse" in sys.argv)
    print((out / "heldout.md").read_text())
