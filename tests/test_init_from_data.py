"""init_from_data: what a new model takes from its training rows (the condition whitening), and
nothing from the rows it was not given."""

import pytest
import torch

from eva_repro.data.loader import condition_whitening
from eva_repro.data.shards import ShardReader
from eva_repro.model import DiT, DiTConfig
from eva_repro.training.init_from_data import fit_to_training_data

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(cond_dim: int, target_dim: int, tokens: int, **kw) -> DiT:
    return DiT(DiTConfig(hidden=32, depth=1, n_heads=2, n_kv_heads=1, cond_dim=cond_dim,
                         target_dim=target_dim, tokens=tokens, **kw))


def test_the_whitening_is_fitted_on_the_given_rows_only(token_only_data):
    reader = ShardReader(token_only_data)
    rows = list(range(0, 240, 2))  # the odd rows stand for a held-out split
    messages: list[str] = []
    model = _model(32, 48, 16)
    fit_to_training_data(model, reader, rows, False, messages.append)
    mean, matrix = condition_whitening(reader, rows, model.config.cond_whiten)
    assert torch.equal(model.cond_mean, mean) and torch.equal(model.cond_white, matrix)
    assert any("aligned condition whitened" in m for m in messages)
    plain = _model(32, 48, 16, cond_whiten=None)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    fit_to_training_data(plain, reader, rows, False, messages.append)  # nothing to fit
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before.items())
