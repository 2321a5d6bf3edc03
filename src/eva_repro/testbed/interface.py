"""Interface checks: what any DiT must get right before it learns anything, on random inputs.

Run on a copy of the network with every parameter perturbed (DiT-style zero init makes the
output exactly zero and cuts most gradients at step 0, which would hide every bug). Every
check reads what forward returns, the network's raw prediction (the velocity, or the clean
target of an x-predicting network), so the x -> v mapping's own use of t and x_t, which lives in
`flow`, never counts as the network's.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable

import torch
from torch import nn

from eva_repro.model import from_pretrained
from eva_repro.testbed.verdict import Check

PERTURB = 0.02  # parameter noise: enough to open every zero-initialised path
DEPENDS = 1e-4  # relative output change below which an input counts as unused
SAME = 1e-4  # relative difference below which two outputs count as equal


def declared(model: nn.Module, name: str) -> bool:
    """A design property the network declares (`noise_unconditional`, `condition_as_set`)."""
    return bool(getattr(model.config, name, False) or getattr(model, name, False))


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():  # frozen parameters stay as they are in training
            if p.requires_grad and p.dtype.is_floating_point:
                p.add_(torch.randn(p.shape, generator=g).to(p) * PERTURB)
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def interface_checks(model: nn.Module, tokens: int, batch: int = 4, seed: int = 0) -> list[Check]:
    """Every interface check on `model` (built for `tokens` target tokens, condition on the same
    grid), in eval mode unless a check needs training mode."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, cfg.target_dim, generator=g)
    cond = torch.randn(batch, tokens, cfg.cond_dim, generator=g)
    t = torch.rand(batch, generator=g) * 0.8 + 0.1
    net = perturbed(model, seed).eval()
    checks: list[Check] = []

    def add(name: str, passed: bool | None, value: float | None, threshold: str, meaning: str,
            detail: str = "") -> None:
        checks.append(Check(name, "interface", passed, value, threshold, meaning, detail))

    def guarded(name: str, threshold: str, meaning: str, fn: Callable[[], tuple]) -> None:
        try:
            passed, value, detail = fn()
        except Exception as e:  # a crash is this check's failure, not the card's
            passed, value, detail = False, None, f"{type(e).__name__}: {e}"
        add(name, passed, value, threshold, meaning, detail)

    with torch.no_grad():
        guarded("output_shape", "== x_t's shape", "forward must return one prediction per input token",
                lambda: _shape(net, x, t, cond))
        guarded("finite", "all finite at t = 0, 0.5, 1", "the network produces NaN/inf at some t "
                "(a division by t or 1 - t, or an overflow)", lambda: _finite(net, x, cond))
        guarded("deterministic_in_eval", f"relative difference < {SAME:g}", "two eval-mode calls on "
                "the same input differ: dropout or noise left on outside training",
                lambda: _deterministic(net, x, t, cond))
        guarded("batch_independent", f"relative difference < {SAME:g}", "a sample's output depends on "
                "the other samples in its batch (a norm over the batch, or a wrong reshape)",
                lambda: _batch_independent(net, x, t, cond))
        guarded("uses_x_t", f"relative change > {DEPENDS:g}", "the output ignores the noisy input "
                "x_t: the network cannot denoise", lambda: _depends(net, x, t, cond, "x"))
        guarded("uses_condition", f"relative change > {DEPENDS:g}", "the output ignores the condition",
                lambda: _depends(net, x, t, cond, "cond"))
        if declared(net, "noise_unconditional"):
            add("uses_t", None, None, "declared noise-unconditional", "the design does not read t "
                "(declared by the plugin)")
        else:
            guarded("uses_t", f"relative change > {DEPENDS:g}", "the output ignores t: a DiT must know "
                    "how noisy its input is (declare noise_unconditional if that is the design)",
                    lambda: _depends(net, x, t, cond, "t"))
        if tokens < 2:
            add("uses_condition_positions", None, None, "needs >= 2 tokens", "")
        elif declared(net, "condition_as_set"):
            add("uses_condition_positions", None, None, "declared condition_as_set", "the design "
                "reads the condition as a set: its grid checks are not applicable")
        else:
            guarded("uses_condition_positions", f"relative change > {DEPENDS:g}", "permuting the "
                    "condition tokens within an image leaves the output unchanged: the condition "
                    "keys carry no position (declare condition_as_set if that is the design)",
                    lambda: _depends(net, x, t, cond, "cond_order"))
        if tokens >= 2:
            guarded("attention_bidirectional", f"both directions > {DEPENDS:g}", "the first token does "
                    "not see the last one, or the reverse (a causal mask copied from an LLM)",
                    lambda: _bidirectional(net, x, t, cond))
        guarded("save_load_round_trip", f"relative difference < {SAME:g}", "save_pretrained then "
                "loading gives a different network", lambda: _round_trip(net, x, t, cond))
    guarded("gradients_reach_every_parameter", "every trainable parameter has a nonzero gradient",
            "some parameters never train (a detached branch, an unused module, a frozen gate)",
            lambda: _gradients(perturbed(model, seed).train(), x, t, cond))
    return checks


def _shape(net, x, t, cond):
    out = net(x, t, cond)
    return tuple(out.shape) == tuple(x.shape), None, f"got {tuple(out.shape)}, want {tuple(x.shape)}"


def _finite(net, x, cond):
    bad = [s for s in (0.0, 0.5, 1.0) if not torch.isfinite(net(x, torch.full((x.shape[0],), s), cond)).all()]
    return not bad, None, f"non-finite at t = {bad}" if bad else ""


def _deterministic(net, x, t, cond):
    d = relative(net(x, t, cond), net(x, t, cond))
    return d < SAME, d, ""


def _batch_independent(net, x, t, cond):
    alone = net(x[:1], t[:1], cond[:1])
    d = relative(net(x, t, cond)[:1], alone)
    return d < SAME, d, ""


def _depends(net, x, t, cond, what: str):
    base = net(x, t, cond)
    if what == "x":
        other = net(x + torch.randn_like(x), t, cond)
    elif what == "cond":
        other = net(x, t, cond.roll(1, dims=0))
    elif what == "t":
        other = net(x, (t + 0.35) % 0.8 + 0.1, cond)
    else:  # the condition's tokens in another order, the target's untouched
        perm = torch.randperm(cond.shape[1], generator=torch.Generator().manual_seed(1))
        other = net(x, t, cond[:, perm])
    d = relative(other, base)
    return d > DEPENDS, d, ""


def _bidirectional(net, x, t, cond):
    base = net(x, t, cond)
    first, last = x.clone(), x.clone()
    first[:, 0] += 1.0
    last[:, -1] += 1.0
    to_last = relative(net(first, t, cond)[:, -1], base[:, -1])
    to_first = relative(net(last, t, cond)[:, 0], base[:, 0])
    return min(to_first, to_last) > DEPENDS, min(to_first, to_last), (
        f"first -> last {to_last:.3g}, last -> first {to_first:.3g}")


def _round_trip(net, x, t, cond):
    with tempfile.TemporaryDirectory() as d:
        net.save_pretrained(d)
        back = from_pretrained(d).eval()
    diff = relative(back(x, t, cond), net(x, t, cond))
    return diff < SAME, diff, ""


def _gradients(net, x, t, cond):
    drop = torch.arange(x.shape[0]) == 0  # one dropped row: the null condition trains too
    net(x, t, cond, drop_cond=drop).float().square().mean().backward()
    dead = [n for n, p in net.named_parameters()
            if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    total = sum(p.requires_grad for p in net.parameters())
    return not dead, float(total - len(dead)), (
        f"{len(dead)} of {total} without gradient: {dead[:4]}" if dead else f"{total} parameters")
