"""layout: the one home of the CLS / patch token layout."""

import pytest
import torch

from eva_repro import layout


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
