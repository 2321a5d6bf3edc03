"""The example backbone plugins in examples/ (loaded by file path: examples/ is no package) keep the plugin
contract: build(target_dim, cond_dim, tokens, **hints) -> module, forward(x_t, t, cond, drop_cond) -> v."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAMES = ["plain_dit", "diffusers_pixart", "diffusers_sd3"]
B, T, D, DC = 3, 16, 24, 16
SIZES = dict(hidden=32, depth=2, n_heads=2)


def load(name: str):
    # no sys.modules entry, as a minimal plugin loader would do: the examples must not need one
    spec = importlib.util.spec_from_file_location(f"eva_repro_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=NAMES)
def example(request):
    if request.param.startswith("diffusers"):
        pytest.importorskip("diffusers")
    return load(request.param)


def perturbed(module, tokens: int = T, **hints) -> torch.nn.Module:
    """The network with every parameter moved off its (partly zero) initialisation."""
    torch.manual_seed(0)
    net = module.build(D, DC, tokens, **{**SIZES, "unknown_hint": "ignored", **hints})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return net


def inputs(tokens: int = T, cond_tokens: int | None = None, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, tokens, D, generator=g)
    cond = torch.randn(B, cond_tokens or tokens, DC, generator=g)
    return x, torch.tensor([0.0, 0.5, 1.0]), cond, torch.tensor([True, False, False])


def test_shape_and_finite_at_every_time(example):
    net = perturbed(example)
    x, _, cond, drop = inputs()
    with torch.no_grad():
        for time in (0.0, 0.5, 1.0):
            for d in (None, drop):
                out = net(x, torch.full((B,), time), cond, d)
                assert out.shape == (B, T, D)
                assert torch.isfinite(out).all()


def test_every_trainable_parameter_gets_a_gradient(example):
    net = perturbed(example)
    net(*inputs()).square().mean().backward()  # row 0 takes the null condition
    missing = [n for n, p in net.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing
    assert hasattr(net, "blocks") and len(net.blocks) == SIZES["depth"]


def test_output_depends_on_condition_time_and_input(example):
    net = perturbed(example)
    x, t, cond, _ = inputs()
    with torch.no_grad():
        out = net(x, t, cond)
        for changed in (net(x, t, cond + torch.randn_like(cond)), net(x, (t + 0.25) % 1, cond),
                        net(x + torch.randn_like(x), t, cond)):
            assert (changed - out).abs().amax(dim=(1, 2)).min() > 1e-4  # every sample moves


def test_samples_are_independent_of_the_batch(example):
    net = perturbed(example)
    x, t, cond, drop = inputs()
    with torch.no_grad():
        for d in (None, drop):
            full = net(x, t, cond, d)
            alone = net(x[:1], t[:1], cond[:1], None if d is None else d[:1])
            torch.testing.assert_close(alone, full[:1], atol=1e-5, rtol=0)


def test_dropped_condition_ignores_the_condition(example):
    net = perturbed(example)
    x, t, cond, drop = inputs()
    with torch.no_grad():
        a, b = net(x, t, cond, drop), net(x, t, torch.randn_like(cond), drop)
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=0)
    assert not torch.allclose(a[1:], b[1:])


def test_condition_positions_are_used_or_declared_unused(example):
    """Permuting the condition tokens within an image changes the output of the plain DiT (it
    matches CLIP patch j with EVA patch j); diffusers' PixArt and SD3 read their condition as a
    set, as their captions, and declare it (`condition_as_set`)."""
    as_set = getattr(example.build(D, DC, T, **SIZES), "condition_as_set", False)
    assert as_set == (not example.__name__.endswith("plain_dit"))
    net = perturbed(example)
    x, t, cond, _ = inputs()
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        delta = (net(x, t, cond[:, perm]) - net(x, t, cond)).abs().amax(dim=(1, 2)).min()
    assert delta < 1e-5 if as_set else delta > 1e-4


def test_one_token_grid(example):
    net = perturbed(example, tokens=1)
    x, t, cond, drop = inputs(tokens=1)
    out = net(x, t, cond, drop)
    assert out.shape == (B, 1, D) and torch.isfinite(out).all()
    out.square().mean().backward()
    with torch.no_grad():
        assert not torch.allclose(net(x, t, torch.randn_like(cond)), net(x, t, cond))


def test_bad_sizes_are_value_errors(example):
    with pytest.raises(ValueError, match="square grid"):
        example.build(D, DC, 15, **SIZES)
    with pytest.raises(ValueError, match="n_heads"):
        example.build(D, DC, T, hidden=30, depth=1, n_heads=4)


def test_defaults_without_hints(example):
    net = example.build(D, DC, 4)
    assert net(*inputs(tokens=4)).shape == (B, 4, D)


def test_plain_dit_condition_grid_other_than_target_grid():
    net = perturbed(load("plain_dit"))
    x, t, cond, drop = inputs(cond_tokens=4)  # a 2x2 condition on the 4x4 target grid
    assert net(x, t, cond, drop).shape == (B, T, D)
    with torch.no_grad():
        assert not torch.allclose(net(x, t, cond.flip(1)), net(x, t, cond))


@pytest.mark.parametrize("name, timestep, sign", [("diffusers_pixart", lambda t: 1000 * t, 1.0),
                                                  ("diffusers_sd3", lambda t: 1000 * (1 - t), -1.0)])
def test_diffusers_time_mapping_and_layout(name, timestep, sign):
    """The wrapper hands diffusers its own timestep and reads its output as ours: with the network
    stubbed to return its input image, the wrapper returns +-x_t (so the token <-> pixel layout
    round-trips too)."""
    pytest.importorskip("diffusers")
    net = load(name).build(D, DC, T, **SIZES)
    seen = {}

    def echo(image, **kwargs):
        seen.update(kwargs)
        return (image,)

    net.net.forward = echo
    x, t, cond, drop = inputs()
    torch.testing.assert_close(net(x, t, cond, drop), sign * x)
    torch.testing.assert_close(seen["timestep"], timestep(t))
    assert seen["encoder_hidden_states"][0].abs().max() == 0  # the dropped row's condition is zeros
