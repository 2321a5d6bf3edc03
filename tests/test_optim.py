"""The optimiser groups, the warmup-cosine schedule and the EMA."""

import pytest
import torch
from torch import nn

from eva_repro.model import DiT, DiTConfig
from eva_repro.training import optim


def test_weight_decay_falls_on_matrices_only():
    model = DiT(DiTConfig.preset("tiny", depth=1, target_dim=8, cond_dim=8))
    decay, no_decay = optim.param_groups(model, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    gates = [model.blocks[0].attn.cond_gate, model.blocks[0].attn_norm1.weight]
    assert all(any(g is p for p in no_decay["params"]) for g in gates)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n_params


def test_schedule_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    total, warmup, floor = 100, 10, 0.1
    lrs = [optim.lr_multiplier(s, total, warmup, floor) for s in range(total + 5)]
    assert lrs[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert lrs[warmup] == pytest.approx(1.0)
    assert lrs[warmup + 45] == pytest.approx(floor + (1 - floor) * 0.5)  # half way: the mean
    assert lrs[total] == pytest.approx(floor) and lrs[-1] == pytest.approx(floor)
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:], strict=False))
    assert optim.default_warmup(100) == 5 and optim.default_warmup(10 ** 6) == 1000
    assert optim.default_warmup(3) == 1


def test_ema_follows_early_and_averages_late():
    model, ema = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
        ema.weight.zero_()
    optim.ema_update(ema, model, step=0, decay=0.999)  # d = 1/10: mostly the new weights
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.9))
    ema.weight.data.zero_()
    optim.ema_update(ema, model, step=10 ** 6, decay=0.999)  # d = the decay itself
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.001))


def test_the_cpu_optimiser_steps_all_parameters_at_once_with_the_loop_s_values():
    """On the CPU the trainer's AdamW is the multi-tensor one (fewer ops a step), and it moves
    the weights exactly as the per-parameter loop does: a card measured before it still holds."""
    from eva_repro.flow import transport

    def five_steps(make):
        torch.manual_seed(0)
        model = DiT(DiTConfig.preset("tiny", depth=1, target_dim=8, cond_dim=6, hidden=32,
                                     n_heads=2, n_kv_heads=1))
        start = {k: v.clone() for k, v in model.state_dict().items()}
        opt = make(model)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            x1, c = torch.randn(4, 4, 8, generator=g), torch.randn(4, 4, 6, generator=g)
            opt.zero_grad()
            transport.flow_loss(model, x1, c, generator=g).loss.backward()
            opt.step()
        return opt, start, model.state_dict()

    opt, start, built = five_steps(
        lambda m: optim.build_optimizer(m, 1e-3, 0.05, (0.9, 0.95), fused=False))
    assert all(g["foreach"] is True and not g["fused"] for g in opt.param_groups)
    _, _, loop = five_steps(lambda m: torch.optim.AdamW(optim.param_groups(m, 0.05), lr=1e-3,
                                                        betas=(0.9, 0.95), foreach=False))
    assert sum(not torch.equal(start[k], built[k]) for k in built) > len(built) // 2
    assert all(torch.equal(built[k], loop[k]) for k in built)
