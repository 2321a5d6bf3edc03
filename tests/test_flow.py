"""The flow: time convention, target scaling, loss, samplers (orders of accuracy), CFG, learning."""

import math

import pytest
import torch
import torch.nn.functional as F

from eva_repro.data.synth import make_pairs
from eva_repro.flow import sampling, transport
from eva_repro.model import VARIANTS, DiT, DiTConfig


def test_interpolation_convention_t0_noise_t1_data():
    x0, x1 = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    assert torch.equal(transport.interpolate(x0, x1, torch.zeros(3)), x0)
    assert torch.equal(transport.interpolate(x0, x1, torch.ones(3)), x1)
    t = torch.tensor([0.25, 0.5, 0.75])
    xt = transport.interpolate(x0, x1, t)
    assert torch.allclose(xt[1], 0.5 * (x0[1] + x1[1]), atol=1e-6)  # lerp rounds differently
    # v is dx_t/dt: a finite difference along the path recovers it
    dt = 1e-3
    fd = (transport.interpolate(x0, x1, t + dt) - xt) / dt
    assert torch.allclose(fd, transport.target_velocity(x0, x1), atol=1e-3)


def test_normalize_target_gives_unit_variance_elements_and_inverts():
    x = torch.randn(2, 16, 4096) * 7.0 + 0.3
    y = transport.normalize_target(x)
    assert torch.allclose(y.norm(dim=-1), torch.full((2, 16), 64.0), atol=1e-3)
    assert abs(y.pow(2).mean().item() - 1.0) < 1e-4  # same second moment as N(0, I) noise
    back = transport.denormalize_target(y, norm=5.0)
    assert torch.allclose(back.norm(dim=-1), torch.full((2, 16), 5.0), atol=1e-4)
    assert torch.allclose(F.cosine_similarity(back, x, dim=-1), torch.ones(2, 16), atol=1e-5)


def test_shift_time_properties():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(transport.shift_time(t, 1.0), t)
    s = transport.shift_time(t, 3.0)
    assert s[0].item() == 0.0 and abs(s[-1].item() - 1.0) < 1e-7
    assert torch.all(s[1:-1] < t[1:-1])  # shift > 1 spends more of the schedule near noise
    assert torch.all(s[1:] > s[:-1])  # monotone
    assert abs(transport.shift_time(torch.tensor(0.5), 3.0).item() - 0.25) < 1e-7  # 1 - 1.5/2


def test_sample_time_schemes():
    g = torch.Generator().manual_seed(0)
    u = transport.sample_time(20000, "uniform", generator=g)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    ln = transport.sample_time(20000, "logit_normal", mean=0.0, std=1.0, generator=g)
    assert abs(ln.median().item() - 0.5) < 0.02 and ln.std() < u.std()  # mass in the middle
    shifted = transport.sample_time(20000, "logit_normal", shift=3.0, generator=g)
    assert shifted.median() < 0.3
    with pytest.raises(ValueError, match="unknown time scheme"):
        transport.sample_time(2, "cosine")


# -- samplers on fields with closed-form solutions --------------------------------------------


def _field(x, t):  # dx/dt = (1 + t) x  =>  x(1) = x(0) * exp(1.5)
    return (1 + t).view(-1, 1) * x


X0 = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
EXACT = X0 * math.exp(1.5)


def _error(method, steps, shift=1.0, tol=1e-5):
    x1, nfe = sampling.sample_ode(_field, X0, steps=steps, method=method, shift=shift, atol=tol,
                              rtol=tol)
    return (x1 - EXACT).abs().max().item(), nfe


def test_euler_is_first_order_and_heun_second_order():
    e_euler = [_error("euler", n)[0] for n in (16, 32, 64)]
    e_heun = [_error("heun", n)[0] for n in (16, 32, 64)]
    for a, b in zip(e_euler, e_euler[1:], strict=False):
        assert 1.8 < a / b < 2.2  # halving h halves the error
    for a, b in zip(e_heun, e_heun[1:], strict=False):
        assert 3.6 < a / b < 4.4  # halving h quarters the error
    assert _error("euler", 10)[1] == 10 and _error("heun", 10)[1] == 19  # Euler onto t = 1


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_dopri5_matches_closed_form(shift):
    err, nfe = _error("dopri5", 0, shift=shift, tol=1e-7)
    assert err < 1e-4 and 0 < nfe < 500
    coarse, coarse_nfe = _error("dopri5", 0, shift=shift, tol=1e-3)
    assert coarse < 0.05 and coarse_nfe < nfe  # looser tolerance, fewer evaluations
    # shifted grids integrate the same ODE (512 steps: the Euler step onto t = 1 is the largest)
    assert _error("heun", 512, shift=shift)[0] < 2e-3


def test_sampler_lands_on_the_data_point_of_a_known_flow():
    """For data = one point x1*, the flow's field is v(x, t) = (x1* - x) / (1 - t): integrating it
    forward from noise at t=0 must land on x1* at t=1 (a reversed time direction would not)."""
    target = torch.tensor([[3.0, -1.0, 2.0]], dtype=torch.float64)
    noise = torch.randn(1, 3, dtype=torch.float64)
    field = lambda x, t: (target - x) / (1 - t).view(-1, 1)  # noqa: E731
    x1, _ = sampling.sample_ode(field, noise, steps=7, method="euler", shift=2.0)
    assert torch.allclose(x1, target, atol=1e-9)


def test_unknown_sampler_is_rejected():
    with pytest.raises(ValueError, match="unknown sampler"):
        sampling.sample_ode(_field, X0, steps=2, method="rk4")


# -- loss and guidance on the real model --------------------------------------------------------


def _small_model(**kw):
    torch.manual_seed(0)
    return DiT(DiTConfig(target_dim=32, cond_dim=16, hidden=64, depth=2, n_heads=4, n_kv_heads=2,
                         **kw))


def test_flow_loss_at_init_and_reproducibility():
    model = _small_model(**VARIANTS["blip3o"])  # v-prediction: the velocity starts at 0
    cond, target = torch.randn(64, 16, 16), torch.randn(64, 16, 32) * 9.0
    plain = transport.FlowConfig(loss_weight="velocity")
    out = transport.flow_loss(model, target, cond, plain, generator=torch.Generator().manual_seed(0))
    # zero-init model predicts v = 0, so the loss is E|x1 - x0|^2 per element = 1 + 1
    assert abs(out.loss.item() - 2.0) < 0.05 and out.cosine.item() == 0.0
    again = transport.flow_loss(model, target, cond, plain, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.per_example, again.per_example)
    other = transport.flow_loss(model, target, cond, plain, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(out.t, other.t)  # fresh t (and noise) per call
    data = transport.flow_loss(model, target, cond, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(data.per_example, out.per_example * (1 - out.t).square())


def test_data_loss_weight_is_the_clean_target_error():
    """(1 - t)^2 |v_hat - v|^2 = |x1_hat - x1|^2 for an x-predicting network, away from the clamp."""
    torch.manual_seed(0)
    x1, x0, x1_hat = torch.randn(3, 5, 4, 8).unbind(0)
    t = torch.tensor([0.0, 0.3, 0.6, 0.9, 0.99])
    x_t = transport.interpolate(x0, x1, t)
    v_err = transport.velocity_from_data(x1_hat, x_t, t) - transport.target_velocity(x0, x1)
    weighted = v_err.square().mean(dim=(1, 2)) * transport.loss_weight(t, "data")
    assert torch.allclose(weighted[:4], (x1_hat - x1).square().mean(dim=(1, 2))[:4], atol=1e-5)
    assert transport.loss_weight(t, "data")[4].item() == pytest.approx(transport.DATA_EPS ** 2)  # clamped
    assert torch.equal(transport.loss_weight(t, "velocity"), torch.ones(5))
    with pytest.raises(ValueError, match="loss weight"):
        transport.loss_weight(t, "snr")


def test_velocity_loss_mask_leaves_padded_examples_out():
    model = _small_model()
    for p in model.parameters():  # leave the zero init so the loss differs per example
        p.data.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    cond, target = torch.randn(4, 16, 16, generator=g), torch.randn(4, 16, 32, generator=g)
    x0, t = torch.randn(4, 16, 32, generator=g), torch.rand(4, generator=g)
    mask = torch.tensor([True, False, True, False])
    with torch.no_grad():
        full = transport.velocity_loss(model, target, cond, x0, t, mask=mask)
        kept = transport.velocity_loss(model, target[mask], cond[mask], x0[mask], t[mask])
        garbage = target.clone()
        garbage[~mask] = float("nan")  # a masked example's NaN cannot leak into the mean
        masked = transport.velocity_loss(model, garbage, cond, x0, t, mask=mask)
    assert torch.allclose(full.loss, kept.loss) and torch.allclose(full.cosine, kept.cosine)
    assert not torch.allclose(full.loss, full.per_example.mean())
    assert torch.allclose(masked.loss, kept.loss)


def test_velocity_maps_the_declared_prediction_also_behind_a_wrapper():
    """The network returns its raw prediction; transport.velocity maps it by the type its config
    declares, or by the type given for a wrapper that hides the config (DDP)."""
    model = _small_model()  # x-prediction
    for p in model.parameters():  # leave the zero init so the output depends on the inputs
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, cond = torch.randn(3, 16, 32), torch.rand(3), torch.randn(3, 16, 16)
    with torch.no_grad():
        v = transport.velocity(model, x, t, cond)
        torch.testing.assert_close(v, transport.velocity_from_data(model(x, t, cond), x, t))
        wrapper = lambda *args, **kwargs: model(*args, **kwargs)  # noqa: E731  (no .config)
        torch.testing.assert_close(transport.velocity(wrapper, x, t, cond, prediction="x"), v)


def test_guided_velocity_combines_conditional_and_null():
    model = _small_model()
    for p in model.parameters():  # leave the zero init so outputs differ per condition
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, cond = torch.randn(3, 16, 32), torch.rand(3), torch.randn(3, 16, 16)
    v_c = transport.velocity(model, x, t, cond)
    v_u = transport.velocity(model, x, t, cond, drop_cond=torch.ones(3, dtype=torch.bool))
    assert torch.allclose(sampling.guided_velocity(model, cond, 1.0)(x, t), v_c)
    guided = sampling.guided_velocity(model, cond, 2.5)(x, t)
    assert torch.allclose(guided, v_u + 2.5 * (v_c - v_u), atol=1e-5)


def test_tiny_dit_learns_synthetic_conditional_problem():
    """End to end: the flow trains a small DiT; sampled targets for held-out conditions match."""
    torch.manual_seed(0)
    clip, eva = make_pairs(1088, grid=4, clip_dim=64, eva_dim=128, seed=0)
    train_c, train_e, test_c, test_e = clip[:1024], eva[:1024], clip[1024:], eva[1024:]
    model = DiT(DiTConfig(target_dim=128, cond_dim=64, hidden=192, depth=3, n_heads=4,
                          n_kv_heads=2))
    steps, lr = 800, 3e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(0)
    cfg = transport.FlowConfig(time_scheme="uniform", cfg_dropout=0.1)
    first = None
    for _ in range(steps):
        idx = torch.randint(0, 1024, (32,), generator=g)
        out = transport.flow_loss(model, train_e[idx], train_c[idx], cfg, generator=g)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        first = first if first is not None else out.loss.item()
    model.eval()
    x1, nfe = sampling.sample(model, test_c, steps=10, method="heun", seed=1)
    cosine = F.cosine_similarity(x1, test_e, dim=-1).mean().item()
    assert out.loss.item() < 0.4 * first
    assert cosine > 0.9, cosine
    assert nfe == 19  # heun: 2 per step, Euler onto t = 1
