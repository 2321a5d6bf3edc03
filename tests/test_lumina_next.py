"""diffusers' LuminaNextDiT2DModel as a backbone: the time mapping, CFG's null condition,
save/load through diffusers' own from_pretrained, and one-line refusals of bad configs."""

import sys

import pytest
import torch
from diffusers import LuminaNextDiT2DModel

from eva_repro.model import build_model, from_pretrained, model_config
from eva_repro.model.lumina_next import LuminaNextConfig, LuminaNextConfigError, LuminaNextDiT

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(hidden=64, depth=2, n_heads=2, n_kv_heads=1)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(model_config("lumina-next", "tiny", target_dim=24, cond_dim=12, tokens=16,
                                    **SMALL)).eval()


def _inputs(batch=3, tokens=16):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, tokens, 24, generator=g), torch.rand(batch, generator=g),
            torch.randn(batch, 7, 12, generator=g))


def test_factory_builds_the_unmodified_diffusers_network_with_the_presets_sizes(model):
    assert isinstance(model, LuminaNextDiT) and type(model.net) is LuminaNextDiT2DModel
    c = model.net.config
    assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.num_kv_heads) == (64, 2, 2, 1)
    assert (c.patch_size, c.in_channels, c.cross_attention_dim, c.learn_sigma) == (1, 24, 12, False)
    blip3o = LuminaNextConfig.preset("blip3o", target_dim=1792, cond_dim=1024, tokens=64)
    assert blip3o.diffusers_kwargs() | {"sample_size": 8} == blip3o.diffusers_kwargs()
    assert (blip3o.hidden, blip3o.depth, blip3o.n_heads, blip3o.n_kv_heads) == (1792, 24, 28, 28)


@torch.no_grad()
def test_our_time_is_lumina_nexts_timestep_and_blip3o_negates_for_the_scheduler(model):
    """eva-repro: t = 0 noise, output v = x1 - x0. BLIP3-o: diffusers' scheduler sigma = 1 - t
    (1 = noise), network timestep 1 - sigma, scheduler direction -output = x0 - x1."""
    x, t, c = _inputs()
    v = model(x, t, c)
    image = x.transpose(1, 2).reshape(3, 24, 4, 4)
    sigma = 1 - t
    blip3o = -model.net(hidden_states=image, timestep=1 - sigma, encoder_hidden_states=c,
                        encoder_mask=torch.ones(3, 7), image_rotary_emb=model.rotary(4, x.device),
                        cross_attention_kwargs={}).sample
    torch.testing.assert_close(-blip3o.flatten(2).transpose(1, 2), v, atol=1e-6, rtol=1e-6)
    assert v.shape == x.shape and torch.isfinite(v).all()
    # the network does depend on t: the time embedding reaches the blocks
    assert (model(x, torch.zeros(3), c) - model(x, torch.ones(3), c)).abs().max() > 1e-3


@torch.no_grad()
def test_a_dropped_condition_is_blip3os_zero_condition(model):
    x, t, c = _inputs()
    drop = torch.tensor([True, False, True])
    out = model(x, t, c, drop)
    zeroed = torch.where(drop.view(-1, 1, 1), 0.0, c)
    torch.testing.assert_close(out, model(x, t, zeroed))
    assert (out[1] - model(x, t, torch.zeros_like(c))[1]).abs().max() > 1e-4


def test_every_trainable_parameter_gets_a_gradient(model):
    """DDP (without find_unused_parameters) needs it; the never-read pad token is frozen."""
    x, t, c = _inputs()
    model.train()
    model(x, t, c, torch.tensor([True, False, False])).square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [] and not model.net.pad_token.requires_grad
    assert model.net.pad_token.abs().sum() == 0


@torch.no_grad()
def test_save_pretrained_holds_a_diffusers_directory_that_loads_as_it_is(model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    x, t, c = _inputs()
    plain = LuminaNextDiT2DModel.from_pretrained(tmp_path / "model" / "transformer")
    assert plain.config._class_name == "LuminaNextDiT2DModel"
    torch.testing.assert_close(LuminaNextDiT(model.config, plain.eval())(x, t, c), model(x, t, c))
    again = from_pretrained(tmp_path / "model")
    assert isinstance(again, LuminaNextDiT) and again.config == model.config
    torch.testing.assert_close(again.eval()(x, t, c), model(x, t, c))
    model.save_pretrained(tmp_path / "model")  # overwriting leaves no temporary folders behind
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "transformer"]


@pytest.mark.parametrize("fields, match", [
    (dict(token_mode="cls_patch"), "no CLS slot"),
    (dict(hidden=60, n_heads=2), "divide by 4"),
    (dict(hidden=64, n_heads=3), "must divide by n_heads"),
    (dict(tokens=10), "no square grid"),
    (dict(grad_checkpointing=True), "no gradient checkpointing"),
])
def test_bad_configs_are_refused_in_one_line(fields, match, one_line_error):
    one_line_error(lambda: LuminaNextConfig(**{**SMALL, **fields}), match, LuminaNextConfigError)


def test_without_diffusers_the_error_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(LuminaNextConfigError, match=r"pip install 'eva-repro\[diffusers\]'"):
        LuminaNextDiT(LuminaNextConfig(**SMALL))
