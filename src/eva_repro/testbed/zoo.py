"""The bug zoo: bugs people make in DiTs, each planted in the pure BLIP3-o / Lumina-Next head
(`model.dit`, `VARIANTS["blip3o"]`), so that `eva-repro check` can be shown to catch them.

Each mutant is a plugin factory (`--backbone eva_repro.testbed.zoo:NAME`); the ones that live in
a training pipeline rather than in the network also patch the trainer while their card runs
(`pipeline`). `correct` is the unmodified head, the reference every mutant is compared with.

    eva-repro zoo --output_dir zoo [--mutant NAME ...] [--reference BACKBONE ...]   # zoo.json, zoo.md

`--reference` judges correct implementations beside the mutants (every one must pass): the
built-in backbones, examples/*.py:build, any plugin.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

from eva_repro.data import layout
from eva_repro.flow import transport
from eva_repro.model.dit import (
    ROPE_THETA,
    VARIANTS,
    Block,
    DiT,
    DiTConfig,
    apply_rope,
    rope_angles,
    sincos_embedding,
)
from eva_repro.testbed.card import BUDGETS, run_card
from eva_repro.testbed.runs import JOBS_HELP
from eva_repro.training import optim
from eva_repro.training import train as train_mod
from eva_repro.utils.files import atomic_write_bytes, atomic_write_json
from eva_repro.utils.lockfile import refuse_a_file


def head(target_dim: int, cond_dim: int, tokens: int, hidden: int = 384, depth: int = 6,
         n_heads: int = 6, n_kv_heads: int = 2, head: str = "blip3o", **_: Any) -> DiT:
    """The Next-DiT head a mutant starts from: the pure one, or with `head="eva-repro"` the
    default head (aligned condition, linear path, x-prediction)."""
    return DiT(DiTConfig(target_dim=target_dim, cond_dim=cond_dim, tokens=tokens, hidden=hidden,
                         depth=depth, n_heads=n_heads, n_kv_heads=n_kv_heads, **VARIANTS[head]))


class Wrapped(nn.Module):
    """A head as a plugin that declares the head's prediction type and returns its raw
    prediction (the host maps it to the velocity with the true x_t and t), its inputs
    optionally changed on the way in (`edit(x, t, cond, drop, training)`)."""

    def __init__(self, net: DiT, edit: Callable | None = None):
        super().__init__()
        self.net, self.edit, self.prediction = net, edit, net.config.prediction

    @property
    def blocks(self) -> nn.ModuleList:
        return self.net.blocks

    def forward(self, x, t, cond, drop_cond=None):
        inputs = (x, t, cond, drop_cond)
        if self.edit is not None:
            inputs = self.edit(*inputs, self.training)
        return self.net(*inputs)


def correct(**kw) -> nn.Module:
    """The head, unmodified."""
    return Wrapped(head(**kw))


def t_ignored(**kw) -> nn.Module:
    """The network is always shown t = 0 (a timestep never passed through)."""
    return Wrapped(head(**kw), lambda x, t, c, d, tr: (x, torch.zeros_like(t), c, d))


class TimeReversedSampler(Wrapped):
    """Outside training the network is read in the other convention: shown 1 - t and its
    velocity negated (t = 1 noise, v = x0 - x1), as a sampler written for it would."""

    def forward(self, x, t, cond, drop_cond=None):
        if self.training:
            return super().forward(x, t, cond, drop_cond)
        v = -transport.velocity(self.net, x, 1 - t, cond, drop_cond)  # the velocity, read the other way
        return transport.prediction_from_velocity(v, x, t, self.prediction)


def sampler_time_reversed(**kw) -> nn.Module:
    """Trained with t = 0 noise, sampled with t = 1 noise (the public reference's)."""
    return TimeReversedSampler(head(**kw))


def x_t_ignored(**kw) -> nn.Module:
    """The network never sees its noisy input."""
    return Wrapped(head(**kw), lambda x, t, c, d, tr: (torch.zeros_like(x), t, c, d))


def null_condition_always(**kw) -> nn.Module:
    """The guidance drop mask inverted to all-true: the condition never reaches the network."""
    return Wrapped(head(**kw), lambda x, t, c, d, tr: (
        x, t, c, torch.ones(x.shape[0], dtype=torch.bool, device=x.device)))


def cross_attention_dead(**kw) -> nn.Module:
    """The cross-attention output is discarded (its gate held at zero)."""
    net = head(**kw)
    for block in net.blocks:
        block.attn.cond_gate.requires_grad_(False)
    return Wrapped(net)


def _block_unmodulated(self, x, c, ada, rope_x, rope_c):
    return Block.forward(self, x, c, torch.zeros_like(ada), rope_x, rope_c)


def _final_unmodulated(self, ada):
    return nn.Sequential.forward(self, torch.zeros_like(ada))


def adaln_dropped(**kw) -> nn.Module:
    """The adaLN modulation never applied: every block and the final layer see a zero adaLN input."""
    net = head(**kw)  # bound methods, not closures: a deep copy must rebind them to itself
    for block in net.blocks:
        block.forward = types.MethodType(_block_unmodulated, block)
    net.final_ada.forward = types.MethodType(_final_unmodulated, net.final_ada)
    return Wrapped(net)


def rope_1d(**kw) -> nn.Module:
    """"3D RoPE" that is 1D: every token at its flat index on one axis (the public reference's)."""
    net = head(**kw)
    cfg = net.config

    def positions(self, tokens, grid_tokens, device):
        pos = torch.zeros(tokens, 3)
        pos[:, 2] = torch.arange(tokens) * (grid_tokens / tokens)
        ang = rope_angles(pos, cfg.rope_axes, ROPE_THETA)
        embed = None
        if cfg.abs_pos_embed:  # the default head's absolute embedding, from the same positions
            embed = sincos_embedding(pos, tuple(a * cfg.n_heads for a in cfg.rope_axes),
                                     ROPE_THETA).float().to(device)
        return ang.cos().float().to(device), ang.sin().float().to(device), embed

    net.positions = types.MethodType(positions, net)
    return Wrapped(net)


def _attention_forward(self, x, c, rope_x, rope_c, *, causal=False, cond_rope=True, bad_heads=False):
    """dit.Attention.forward with one bug switched on."""
    B, T, _ = x.shape
    hd, kvd = self.head_dim, self.n_kv_heads * self.head_dim

    def heads(y: torch.Tensor, n: int) -> torch.Tensor:  # [B, S, n*hd] -> [B, S, n, hd]
        if bad_heads:  # reshaped as if heads came first, without the transpose
            return y.reshape(B, -1, y.shape[1], hd).transpose(1, 2)
        return y.view(B, y.shape[1], -1, hd)

    q, k, v = self.wqkv(x).split([self.n_heads * hd, kvd, kvd], dim=-1)
    q = apply_rope(self.q_norm(heads(q, self.n_heads)), *rope_x)
    k = apply_rope(self.k_norm(heads(k, self.n_kv_heads)), *rope_x)
    kc, vc = (heads(y, self.n_kv_heads) for y in self.wkv_cond(c).chunk(2, dim=-1))
    kc = self.k_cond_norm(kc)
    if cond_rope:
        kc = apply_rope(kc, *rope_c)
    rep = self.n_heads // self.n_kv_heads
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), heads(v, self.n_kv_heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh.repeat_interleave(rep, 1), vh.repeat_interleave(rep, 1),
                                         is_causal=causal)
    out_cond = F.scaled_dot_product_attention(qh, kc.transpose(1, 2).repeat_interleave(rep, 1),
                                              vc.transpose(1, 2).repeat_interleave(rep, 1))
    out = out + torch.tanh(self.cond_gate).view(1, -1, 1, 1) * out_cond
    return self.wo(out.transpose(1, 2).reshape(B, T, -1))


def _with_attention(**switch) -> Callable[..., nn.Module]:
    def factory(**kw) -> nn.Module:
        net = head(**kw)
        for block in net.blocks:
            block.attn.forward = types.MethodType(functools.partial(_attention_forward, **switch),
                                                  block.attn)
        return Wrapped(net)
    return factory


causal_mask = _with_attention(causal=True)
causal_mask.__doc__ = "A causal mask copied from an LLM in the self-attention."
condition_keys_without_positions = _with_attention(cond_rope=False)
condition_keys_without_positions.__doc__ = "RoPE on the patch tokens only, none on the condition keys."
heads_reshaped_wrongly = _with_attention(bad_heads=True)
heads_reshaped_wrongly.__doc__ = "[B, T, H*hd] viewed as [B, H, T, hd] (tokens and heads mixed)."


# -- bugs of the training pipeline, planted by patching the trainer while the card runs -------


@contextlib.contextmanager
def _unit_norm_noise() -> Iterator[None]:
    draw = train_mod.draw_noise

    def unit(*args, **kwargs):
        x0, t, drop = draw(*args, **kwargs)
        return x0 / x0.flatten(1).norm(dim=1).view(-1, 1, 1), t, drop

    with mock.patch.object(train_mod, "draw_noise", unit):
        yield


@contextlib.contextmanager
def _target_leak() -> Iterator[None]:
    loss = transport.velocity_loss

    def leaking(model, target, cond, *args, **kwargs):
        g = torch.Generator().manual_seed(0)
        proj = torch.randn(target.shape[-1], cond.shape[-1], generator=g).to(cond) / target.shape[-1] ** 0.5
        leak = transport.normalize_target(target) @ proj  # on the condition's grid when it has its own
        return loss(model, target, cond + layout.align_condition(leak, cond.shape[1], False),
                    *args, **kwargs)

    with mock.patch.object(transport, "velocity_loss", leaking):
        yield


@contextlib.contextmanager
def _ema_frozen() -> Iterator[None]:
    with mock.patch.object(optim, "ema_update", lambda *a, **k: None):
        yield


@dataclass(frozen=True)
class Mutant:
    name: str
    factory: str  # the --backbone the card builds
    what: str
    pipeline: Callable[[], contextlib.AbstractContextManager] | None = None


HERE = "eva_repro.testbed.zoo"
MUTANTS = {m.name: m for m in [
    Mutant("correct", f"{HERE}:correct", "the head the bugs are planted in, unmodified (must "
           "pass)"),
    Mutant("rope_1d", f"{HERE}:rope_1d", rope_1d.__doc__),
    Mutant("sampler_time_reversed", f"{HERE}:sampler_time_reversed", sampler_time_reversed.__doc__),
    Mutant("unit_norm_noise", f"{HERE}:correct", "training noise scaled to unit norm per sample "
           "(the public reference's); sampling from N(0, I)", _unit_norm_noise),
    Mutant("target_leak", f"{HERE}:correct", "the training condition carries a projection of the "
           "target (the public reference's); held-out conditions do not", _target_leak),
    Mutant("ema_never_updated", f"{HERE}:correct", "the EMA copy is never updated (stays at init)",
           _ema_frozen),
    Mutant("t_ignored", f"{HERE}:t_ignored", t_ignored.__doc__),
    Mutant("cross_attention_dead", f"{HERE}:cross_attention_dead", cross_attention_dead.__doc__),
    Mutant("condition_keys_without_positions", f"{HERE}:condition_keys_without_positions",
           condition_keys_without_positions.__doc__),
    Mutant("x_t_ignored", f"{HERE}:x_t_ignored", x_t_ignored.__doc__),
    Mutant("adaln_dropped", f"{HERE}:adaln_dropped", adaln_dropped.__doc__),
    Mutant("causal_mask", f"{HERE}:causal_mask", causal_mask.__doc__),
    Mutant("heads_reshaped_wrongly", f"{HERE}:heads_reshaped_wrongly", heads_reshaped_wrongly.__doc__),
    Mutant("null_condition_always", f"{HERE}:null_condition_always", null_condition_always.__doc__),
]}


def judge(mutant: Mutant, output_dir: Path, budget: str, device: str = "auto",
          head: str = "blip3o", say: Callable[[str], None] = print, reuse: bool = False,
          jobs: int | str = 1) -> dict[str, Any]:
    """The card of one mutant of `head` (its pipeline patch active while each run trains)."""
    b = BUDGETS[budget]
    if head != "blip3o" and mutant.factory.startswith(HERE):
        b = replace(b, extra_hints=(("head", head),))
    return run_card(mutant.factory, output_dir, b, device, say=say, reuse=reuse, jobs=jobs,
                    around=mutant.pipeline)


def table(cards: dict[str, dict[str, Any]]) -> str:
    """One row per card, markdown: its verdict, and which checks failed (caught the bug)."""
    lines = ["| DiT | verdict | failed checks |", "|---|---|---|"]
    for name, card in cards.items():
        failed = [c["name"].replace("_", " ") for c in card["checks"] if c["passed"] is False]
        expected = card.get("must_pass", name == "correct")
        verdict = ("passes" if card["passed"] else "FAILS") + ("" if card["passed"] == expected
                                                               else " (unexpected)")
        lines.append(f"| {name} | {verdict} | {', '.join(failed) or '-'} |")
    return "\n".join(lines) + "\n"


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output_dir", required=True, help="one card per mutant, zoo.json, zoo.md")
    p.add_argument("--mutant", action="append", choices=sorted(MUTANTS),
                   help="judge only these (repeatable); default: all, unless --reference is given")
    p.add_argument("--reference", action="append", default=[], metavar="BACKBONE",
                   help="also judge this correct implementation (a --backbone; repeatable)")
    p.add_argument("--budget", default="quick", choices=list(BUDGETS),
                   help="quick: minutes per card on a CPU; full: a GPU; toy: the test suite's")
    p.add_argument("--device", default="auto")
    p.add_argument("--jobs", default="auto", help=JOBS_HELP)
    p.add_argument("--reuse", action="store_true", help="judge the finished runs already under "
                   "--output_dir (same settings) instead of training them again")
    p.add_argument("--head", default="blip3o", choices=sorted(VARIANTS),
                   help="the Next-DiT head the bugs are planted in: the pure BLIP3-o one, or the "
                   "default eva-repro head (what its score depends on)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.output_dir)
    refuse_a_file(out)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((out / "zoo.json").read_text()) if (out / "zoo.json").exists() else {}
    jobs = [(name, MUTANTS[name]) for name in args.mutant or ([] if args.reference else MUTANTS)]
    jobs += [(spec, Mutant(spec, spec, "reference implementation (must pass)")) for spec in args.reference]
    for name, mutant in jobs:
        start = time.time()
        card = judge(mutant, out / _slug(name), args.budget, args.device, args.head,
                     reuse=args.reuse, jobs=args.jobs)
        results[name] = {"what": mutant.what, "wall_s": round(time.time() - start, 1),
                         "must_pass": name == "correct" or name in args.reference,
                         **{k: card[k] for k in ("passed", "summary", "checks", "scores")}}
        atomic_write_json(out / "zoo.json", results)  # after each card: a crash keeps the rest
        atomic_write_bytes(out / "zoo.md", table(results).encode())
    wrong = [n for n, r in results.items() if r["passed"] != r.get("must_pass", n == "correct")]
    print(table(results))
    return 1 if wrong else 0


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name.split("/")[-1])
