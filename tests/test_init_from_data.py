"""init_from_data: what a new model takes from its training rows (whitening, the neighbour-mix
decision, the ridge start of its linear path), and nothing from the rows it was not given."""

import pytest
import torch
import torch.nn.functional as F

from eva_repro.baselines import ridge_linear_path
from eva_repro.data import condition_whitening
from eva_repro.init_from_data import fit_to_training_data
from eva_repro.model import DiT, DiTConfig
from eva_repro.shards import ShardReader
from eva_repro.synth import write_synthetic_shards

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(cond_dim: int, target_dim: int, tokens: int) -> DiT:
    return DiT(DiTConfig(hidden=32, depth=1, n_heads=2, n_kv_heads=1, cond_dim=cond_dim,
                         target_dim=target_dim, tokens=tokens, cond_local=True))


def test_the_mix_is_off_where_neighbours_carry_nothing_and_the_rest_is_fitted(token_only_data):
    reader = ShardReader(token_only_data)
    rows = list(range(0, 240, 2))  # the odd rows stand for a held-out split
    messages: list[str] = []
    model = _model(32, 48, 16)
    fitted = fit_to_training_data(model, reader, rows, False, 0.05, "ridge", messages.append)
    record = fitted["neighbour_mix"]
    assert record["trained"] is False and abs(record["ridge_error_cut"]) < 0.05
    assert record["min_gain"] == 0.05 and record["samples"] > 0
    assert float(model.local_gate) == 0.0
    mean, matrix = condition_whitening(reader, rows, model.config.cond_whiten)
    assert torch.equal(model.cond_mean, mean) and torch.equal(model.cond_white, matrix)
    weight, bias, _, _ = ridge_linear_path(reader, rows, False)
    c = reader.read(1)["clip"][None].float()  # a held-out row: the linear path is ridge's map
    with torch.no_grad():
        path = model.linear_cond(model.aligned_condition(c, 16)) + model.linear_bias
    ridge = F.rms_norm(c, (32,), eps=model.config.norm_eps) @ weight + bias
    torch.testing.assert_close(path, ridge, atol=1e-4, rtol=1e-4)
    assert any("neighbour mix off" in m for m in messages)
    assert any("linear path initialised by ridge" in m for m in messages)


def test_the_mix_is_on_where_neighbours_carry_the_target_and_untested_at_zero(tmp_path):
    write_synthetic_shards(tmp_path, 120, grid=4, clip_dim=16, eva_dim=24, seed=0)
    reader = ShardReader(tmp_path)
    model = _model(16, 24, 16)
    fitted = fit_to_training_data(model, reader, list(range(100)), False, 0.05, "zero", print)
    assert fitted["neighbour_mix"]["trained"] is True and float(model.local_gate) == 1.0
    assert torch.equal(model.linear_cond.weight, torch.zeros(24, 16))  # no ridge start asked
    untested = _model(16, 24, 16)
    assert fit_to_training_data(untested, reader, list(range(100)), False, 0.0, "zero", print) == {}
    assert float(untested.local_gate) == 1.0
