"""The bug zoo: each mutant is the bug it names, and the pipeline ones plant it where it lives."""

import pytest
import torch

from eva_repro.data.loader import Batch, DataPosition
from eva_repro.flow import transport
from eva_repro.model import build_model, model_config
from eva_repro.testbed import zoo
from eva_repro.testbed.card import run_card
from eva_repro.training import optim
from eva_repro.training import train as train_mod

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = dict(hidden=32, depth=1, n_heads=2, n_kv_heads=1)


def _net(name: str, **extra):
    torch.manual_seed(0)
    return build_model(model_config(zoo.MUTANTS[name].factory, "tiny", target_dim=8, cond_dim=8,
                                    tokens=16, **SIZE, **extra)).eval()


@pytest.mark.parametrize("head", ["blip3o", "eva-repro"])
def test_every_network_mutant_computes_something_else_than_its_head(head):
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    t = torch.rand(3, generator=g)
    reference = _net("correct", head=head)
    with torch.no_grad():
        for p in reference.parameters():  # open the zero-initialised paths
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        state = reference.state_dict()
        want = reference(x, t, cond)
        for name, mutant in zoo.MUTANTS.items():
            if mutant.pipeline is not None or name == "correct":
                continue
            net = _net(name, head=head)
            if name == "cross_attention_dead":  # the same function at equal weights, never trained
                gates = [b.attn.cond_gate for b in net.net.net.blocks]
                assert gates and not any(g.requires_grad for g in gates) and not any(g.any() for g in gates)
                continue
            net.load_state_dict(state)
            net.train(name == "sampler_time_reversed")  # that one differs only when sampling
            if name == "sampler_time_reversed":
                torch.testing.assert_close(net(x, t, cond), want)
                net.eval()
            assert not torch.allclose(net(x, t, cond), want, atol=1e-5), name


def test_the_pipeline_mutants_plant_their_bug_in_the_trainer():
    batch = Batch(torch.zeros(2, 4, 3), torch.zeros(2, 4, 5), torch.ones(2, dtype=torch.bool),
                  DataPosition(0, 0), 0, [])
    with zoo._unit_norm_noise():
        x0, _, _ = train_mod.draw_noise(batch, (2, 4, 5), transport.FlowConfig(), 0, 2, torch.device("cpu"))
    torch.testing.assert_close(x0.flatten(1).norm(dim=1), torch.ones(2))
    seen = []
    model = lambda x, t, c, drop_cond=None: seen.append(c) or x  # noqa: E731
    args = (torch.randn(2, 4, 5), torch.zeros(2), None)
    cond = torch.randn(2, 4, 3)
    transport.velocity_loss(model, torch.randn(2, 4, 5), cond, *args, prediction="v")
    with zoo._target_leak():
        transport.velocity_loss(model, torch.randn(2, 4, 5), cond, *args, prediction="v")
    assert torch.equal(seen[0], cond) and not torch.allclose(seen[1], cond)
    with zoo._target_leak():  # a condition on a finer grid than the target (the regrid problem)
        transport.velocity_loss(model, torch.randn(2, 4, 5), torch.randn(2, 16, 3), *args, prediction="v")
    assert seen[2].shape == (2, 16, 3)
    ema, raw = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = ema.weight.clone()
    with zoo._ema_frozen():
        optim.ema_update(ema, raw, 100, 0.5)
    assert torch.equal(ema.weight, before)
    optim.ema_update(ema, raw, 100, 0.5)
    assert not torch.equal(ema.weight, before)


def test_a_frozen_ema_fails_the_card_at_toy_size(tmp_path):
    """The one pipeline mutant CI trains: the run learns, its exported EMA model does not."""
    with zoo._ema_frozen():
        card = run_card("next-dit", tmp_path / "card", "toy", "cpu", say=lambda _: None)
    failed = {c["name"] for c in card["checks"] if c["passed"] is False}
    assert not card["passed"] and {"learns_global", "learns_grid", "learns_neighbour"} <= failed


def test_the_table_lists_what_caught_each_mutant():
    cards = {"correct": {"passed": True, "checks": [{"name": "uses_t", "passed": True}]},
             "t_ignored": {"passed": False, "checks": [{"name": "uses_t", "passed": False}]}}
    assert zoo.table(cards).splitlines()[2:] == ["| correct | passes | - |", "| t_ignored | FAILS | uses t |"]
    cards["t_ignored"] = {"passed": True, "checks": [{"name": "uses_t", "passed": True}]}  # flagged
    assert zoo.table(cards).splitlines()[3] == "| t_ignored | passes (unexpected) | - |"
