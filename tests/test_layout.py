"""layout: the one home of the CLS / patch token layout."""

import pytest
import torch

from eva_repro.data import layout


def test_modes_and_their_names():
    assert layout.TOKEN_MODES == ("patch_only", "cls_patch")
    assert layout.mode_of(True) == "cls_patch" and layout.mode_of(False) == "patch_only"
    assert layout.has_cls("cls_patch") and not layout.has_cls("patch_only")
    with pytest.raises(ValueError, match="token_mode must be one of"):
        layout.has_cls("cls_only")


def test_select_and_drop_keep_the_grid_in_order():
    tokens = torch.arange(2 * 5 * 3.0).reshape(2, 5, 3)  # CLS + 2x2 grid
    assert torch.equal(layout.select_tokens(tokens, "cls_patch"), tokens)
    assert torch.equal(layout.select_tokens(tokens, "patch_only"), tokens[:, 1:])
    assert torch.equal(layout.drop_cls(tokens), tokens[:, 1:])
    clip, eva = layout.pairs_for_model(tokens, tokens + 1, dropping_cls=True)
    assert torch.equal(clip, tokens[:, 1:]) and torch.equal(eva, tokens[:, 1:] + 1)
    assert layout.pairs_for_model(tokens, eva, dropping_cls=False)[0] is tokens
    with pytest.raises(ValueError, match="training_mode must be one of"):
        layout.select_tokens(tokens, "patches")


def test_grid_conv_and_neighbour_mean_on_a_hand_grid():
    grid = torch.arange(9.0).view(1, 9, 1)  # 3x3 grid, one channel: 0 1 2 / 3 4 5 / 6 7 8
    mean = layout.neighbour_mean(grid).flatten()
    assert mean[4] == (1 + 3 + 5 + 7) / 4 and mean[0] == (1 + 3) / 4  # zero padded at the corner
    shift = torch.zeros(3, 3)
    shift[1, 2] = 1.0  # each token takes its right-hand neighbour
    two = torch.cat([grid, -grid], dim=-1)  # the same kernel on every channel
    right = layout.grid_conv(two, shift)
    assert right[0, :, 0].tolist() == [1, 2, 0, 4, 5, 0, 7, 8, 0]
    assert torch.equal(right[..., 1], -right[..., 0])


def test_only_a_patch_only_model_drops_the_cls_row_of_cls_shards():
    assert layout.drops_cls(True, "patch_only")
    assert not layout.drops_cls(True, "cls_patch") and not layout.drops_cls(False, "patch_only")
    tokens = torch.arange(2 * 5 * 3.0).view(2, 5, 3)  # CLS + a 2 x 2 grid
    assert torch.equal(layout.tokens_for_model(tokens, True), tokens[:, 1:])
    assert layout.tokens_for_model(tokens, False) is tokens


def test_align_condition_resamples_the_grid_and_keeps_cls_first():
    cond = torch.randn(2, 1 + 16 * 16, 4)
    out = layout.align_condition(cond, 1 + 8 * 8, cls_first=True)
    grid = cond[:, 1:].reshape(2, 8, 2, 8, 2, 4).mean(dim=(2, 4)).reshape(2, 64, 4)
    assert torch.equal(out[:, 0], cond[:, 0]) and torch.allclose(out[:, 1:], grid, atol=1e-6)
    assert layout.align_condition(cond, cond.shape[1], cls_first=True) is cond
    up = layout.align_condition(torch.randn(2, 4, 4), 16, cls_first=False)
    assert up.shape == (2, 16, 4)
