"""Baselines: closed-form values, streamed statistics == one-shot ones, fitted on training rows."""

import pytest
import torch
import torch.nn.functional as F

from eva_repro.data import shards
from eva_repro.data.layout import align_condition
from eva_repro.data.shards import ShardReader, split_indices
from eva_repro.evaluation.baselines import (
    ALPHAS,
    MeanAccumulator,
    RidgeAccumulator,
    RidgeBaseline,
    fit_baselines,
    rms_normalize,
)
from eva_repro.flow.transport import token_cosine


@pytest.fixture(scope="module")
def synth_dir(synth_shards):
    return synth_shards(300, grid=4, clip_dim=16, eva_dim=24, seed=0, shard_size=128)


def test_mean_baseline_hand_value():
    eva = torch.tensor([[[3.0, 0.0]], [[0.0, 0.5]]])  # one position, two images
    acc = MeanAccumulator()
    acc.update(eva[:1])
    acc.update(eva[1:])
    mean = acc.result()
    assert torch.allclose(mean.mean, torch.tensor([[0.5, 0.5]]))  # mean of unit tokens
    assert mean.predict(torch.zeros(4, 1, 7)).shape == (4, 1, 2)


def _augmented(clip, eva, groups):
    x = rms_normalize(clip)
    y = F.normalize(eva, dim=-1)
    n, t, _ = x.shape
    onehot = torch.eye(groups)[torch.arange(t) % groups].expand(n, t, groups)
    return x.reshape(n * t, -1).double(), onehot.reshape(n * t, -1).double(), y.reshape(n * t, -1).double()


@pytest.mark.parametrize("position_bias", [True, False])
def test_streamed_ridge_equals_the_direct_closed_form(position_bias):
    g = torch.Generator().manual_seed(0)
    clip, eva = torch.randn(40, 4, 6, generator=g), torch.randn(40, 4, 5, generator=g)
    acc = RidgeAccumulator(6, 5, 4, position_bias)
    for s in range(0, 40, 7):  # uneven batches
        acc.update(clip[s:s + 7], eva[s:s + 7])
    x, p, y = _augmented(clip, eva, 4 if position_bias else 1)
    xa = torch.cat([x, p], dim=1)
    lam = 0.1 * x.shape[0]
    reg = torch.diag(torch.cat([torch.full((6,), lam), torch.zeros(p.shape[1])])).double()
    direct = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y)
    w = acc.solve(0.1)
    assert torch.allclose(w, direct, atol=1e-6)
    # closed-form validation error == the error of actual predictions
    assert acc.mse(w) == pytest.approx(((xa @ w - y) ** 2).sum().item() / x.shape[0], rel=1e-6)


def test_ridge_recovers_an_exactly_linear_map():
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(200, 4, 6, generator=g)
    # an orthogonal map keeps the RMS-normalised token's norm, so the unit-norm target stays linear
    w, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    target = 3.0 * rms_normalize(clip) @ w
    acc = RidgeAccumulator(6, 6, 4, position_bias=True)
    acc.update(clip, target)
    coef = acc.solve(1e-9).float()
    pred = rms_normalize(clip) @ coef[:6] + coef[6:]
    assert token_cosine(pred, target).min().item() > 0.9999
    assert coef[6:].abs().max().item() < 1e-4  # no offsets in this map


def test_ridge_aligns_a_condition_on_a_finer_grid_onto_the_target_grid():
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(300, 16, 6, generator=g)  # 4 x 4 condition, 2 x 2 target
    w, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))  # orthogonal: unit targets stay linear
    target = rms_normalize(align_condition(clip, 4, cls_first=False)) @ w
    acc = RidgeAccumulator(6, 6, 4, position_bias=True)
    acc.update(clip, target)
    coef = acc.solve(1e-9).float()
    ridge = RidgeBaseline(coef[:6], coef[6:], alpha=1e-9, tokens=4)
    assert token_cosine(ridge.predict(clip), target).min().item() > 0.9999
    flat = rms_normalize(clip[:, :4]) @ coef[:6] + coef[6:]  # the first 4 tokens: one grid row
    assert token_cosine(flat, target).mean().item() < 0.9


def test_fit_baselines_on_training_rows_only_and_ridge_beats_mean(synth_dir):
    reader = ShardReader(synth_dir)
    train, heldout = split_indices(reader.keys(), 0.2)
    mean_b, ridge_b = fit_baselines(reader, train, batch_size=50, progress=False)
    # the mean baseline is exactly the mean of the training rows' unit tokens
    eva_train = torch.stack([reader.read(i)["eva"].float() for i in train])
    assert torch.allclose(mean_b.mean, F.normalize(eva_train, dim=-1).mean(0), atol=1e-6)
    assert ridge_b.alpha in ALPHAS and len(ridge_b.info["validation_mse"]) == len(ALPHAS)
    assert ridge_b.info["num_train_samples"] == len(train)
    rows = torch.stack([reader.read(i)["clip"].float() for i in heldout])
    eva = torch.stack([reader.read(i)["eva"].float() for i in heldout])
    mean_cos = token_cosine(mean_b.predict(rows), eva).mean().item()
    ridge_cos = token_cosine(ridge_b.predict(rows), eva).mean().item()
    # synthetic target = nonlinear map of the token and its neighbours + position offset
    assert 0.4 < mean_cos < 0.7
    assert ridge_cos > mean_cos + 0.2


def test_baselines_for_a_patch_only_model_are_fitted_without_the_cls_row(tmp_path):
    """fit_baselines(drop_cls=True) on CLS shards = the same fit on the shards' patch tokens."""
    g = torch.Generator().manual_seed(0)
    clip = torch.randn(60, 17, 8, generator=g)
    eva = torch.tanh(clip @ torch.randn(8, 12, generator=g))
    eva[:, 0] = torch.randn(60, 12, generator=g)  # a CLS row unlike the patches
    keys = [f"k{i:03d}" for i in range(60)]
    for name, c, e, cls in (("cls", clip, eva, True), ("patches", clip[:, 1:], eva[:, 1:], False)):
        shards.write_shard(tmp_path / name, 0, c, e, keys, dtype="float32")
        shards.write_manifest(tmp_path / name, {"grid": 4, "include_cls": cls})
    rows = list(range(50))
    mean_d, ridge_d = fit_baselines(ShardReader(tmp_path / "cls"), rows, progress=False,
                                    drop_cls=True)
    mean_p, ridge_p = fit_baselines(ShardReader(tmp_path / "patches"), rows, progress=False)
    assert ridge_d.alpha == ridge_p.alpha and ridge_d.info["cls_dropped"]
    torch.testing.assert_close(ridge_d.weight, ridge_p.weight)
    torch.testing.assert_close(ridge_d.bias, ridge_p.bias)
    torch.testing.assert_close(mean_d.mean, mean_p.mean)
    _, with_cls = fit_baselines(ShardReader(tmp_path / "cls"), rows, progress=False)
    assert with_cls.bias.shape[0] == 17 and not torch.allclose(with_cls.weight, ridge_p.weight)


def test_fit_baselines_needs_training_rows(synth_dir):
    with pytest.raises(ValueError, match="no training samples"):
        fit_baselines(ShardReader(synth_dir), [], progress=False)
