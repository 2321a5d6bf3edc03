"""`check`'s interface checks: every correct reference passes them, and each one fails on a
network with the bug it names (zoo mutants and `broken_nets`)."""

from pathlib import Path

import pytest
import torch

from eva_repro.model import build_model, model_config
from eva_repro.testbed.interface import interface_checks

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIZE = dict(hidden=32, depth=2, n_heads=2, n_kv_heads=1)


def _build(backbone: str, variant: str = "eva-repro", tokens: int = 16):
    torch.manual_seed(0)
    return build_model(model_config(backbone, "tiny", variant, target_dim=24, cond_dim=16,
                                    tokens=tokens, **SIZE))


def _verdicts(backbone: str, **kw) -> dict:
    model = _build(backbone, **kw)
    return {c.name: c for c in interface_checks(model, model.config.tokens)}


@pytest.mark.parametrize("backbone, variant", [
    ("eva_repro.testbed.zoo:correct", "eva-repro"),
    ("next-dit", "eva-repro"),
    ("next-dit", "blip3o"),
    (f"{ROOT / 'examples' / 'plain_dit.py'}:build", "eva-repro"),
])
def test_correct_references_pass_every_interface_check(backbone, variant):
    verdicts = _verdicts(backbone, variant=variant)
    assert len(verdicts) == 11
    assert all(c.passed for c in verdicts.values()), [c for c in verdicts.values() if not c.passed]


def test_a_condition_read_as_a_set_is_reported_as_the_design_it_is():
    verdicts = _verdicts("lumina-next")  # diffusers' keys carry no position; it declares so
    assert verdicts["uses_condition_positions"].passed is None
    assert "as a set" in verdicts["uses_condition_positions"].meaning
    assert all(c.passed for name, c in verdicts.items() if name != "uses_condition_positions")


def test_one_token_skips_the_checks_that_need_two():
    verdicts = _verdicts("next-dit", variant="blip3o", tokens=1)
    assert verdicts["uses_condition_positions"].passed is None and "attention_bidirectional" not in verdicts
    assert all(c.passed for c in verdicts.values() if c.passed is not None)


BROKEN = f"{HERE / 'broken_nets.py'}"
ZOO = "eva_repro.testbed.zoo"


@pytest.mark.parametrize("backbone, failing", [
    (f"{BROKEN}:wrong_shape", {"output_shape"}),
    (f"{BROKEN}:divides_by_t", {"finite"}),
    # noise in eval mode also makes two batches, or two loads, disagree
    (f"{BROKEN}:dropout_in_eval", {"deterministic_in_eval", "batch_independent", "save_load_round_trip"}),
    (f"{BROKEN}:normalised_over_the_batch", {"batch_independent"}),
    (f"{BROKEN}:unsaved_state", {"save_load_round_trip"}),
    (f"{ZOO}:x_t_ignored", {"uses_x_t", "attention_bidirectional", "gradients_reach_every_parameter"}),
    (f"{ZOO}:null_condition_always", {"uses_condition", "uses_condition_positions",
                                      "gradients_reach_every_parameter"}),
    (f"{ZOO}:t_ignored", {"uses_t"}),
    (f"{ZOO}:adaln_dropped", {"uses_t", "gradients_reach_every_parameter"}),
    (f"{ZOO}:condition_keys_without_positions", {"uses_condition_positions"}),
    (f"{ZOO}:causal_mask", {"attention_bidirectional"}),
    (f"{ZOO}:cross_attention_dead", {"uses_condition_positions", "gradients_reach_every_parameter"}),
])
def test_each_interface_check_fails_on_the_bug_it_names(backbone, failing):
    verdicts = _verdicts(backbone)
    failed = {name for name, c in verdicts.items() if c.passed is False}
    if "output_shape" in failing:  # a wrong shape breaks every check that calls forward
        assert "output_shape" in failed and "forward returned (4, 15, 24)" in verdicts["output_shape"].detail
        return
    assert failed == failing, {n: verdicts[n].detail for n in failed}


def test_the_default_head_passes_with_its_condition_keys_unpositioned():
    """A property of the default head, not a bug: its aligned condition and absolute position
    embedding place the condition, so keys without RoPE change nothing the interface can see."""
    verdicts = _verdicts("eva_repro.testbed.zoo:condition_keys_without_positions",
                         variant="eva-repro")
    assert verdicts["uses_condition_positions"].passed is False  # built on the pure head
    model = build_model(model_config("eva_repro.testbed.zoo:condition_keys_without_positions",
                                     "tiny", target_dim=24, cond_dim=16, tokens=16,
                                     head="eva-repro", **SIZE))
    assert all(c.passed for c in interface_checks(model, 16))
