"""The DiT: 3D RoPE, GQA, zero init, gradients, persistence, presets, token modes."""

import json

import pytest
import torch
import torch.nn.functional as F

from eva_repro.flow import sampling, transport
from eva_repro.model import PRESETS, VARIANTS, DiT, DiTConfig, estimate_flops
from eva_repro.model.dit import (
    NORM_EPS,
    Attention,
    apply_rope,
    rope_angles,
    sincos_embedding,
    token_positions,
)


def _score(q, k, pos_q, pos_k, axes=(8, 28, 28)):
    """q.k after rotating q at pos_q and k at pos_k (3-vectors of (slot, row, col))."""
    ang = rope_angles(torch.tensor([pos_q, pos_k], dtype=torch.float64), axes, 10000.0)
    x = torch.stack([q, k]).view(1, 2, 1, -1).double()
    r = apply_rope(x, ang.cos(), ang.sin())
    return (r[0, 0, 0] * r[0, 1, 0]).sum().item()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rope_score_depends_only_on_position_difference_per_axis(axis):
    torch.manual_seed(axis)
    q, k = torch.randn(64), torch.randn(64)
    base_q, base_k = [1.0, 2.0, 3.0], [1.0, 5.0, 1.0]
    ref = _score(q, k, base_q, base_k)
    for shift in (1.0, 4.0, -2.5):
        sq, sk = list(base_q), list(base_k)
        sq[axis] += shift
        sk[axis] += shift
        assert abs(_score(q, k, sq, sk) - ref) < 1e-9  # same difference, same score
    moved = list(base_k)
    moved[axis] += 1.0
    assert abs(_score(q, k, base_q, moved) - ref) > 1e-3  # this axis changes the score


def test_rope_is_a_rotation_and_preserves_norms():
    x = torch.randn(2, 10, 3, 64, dtype=torch.float64)
    ang = rope_angles(token_positions(10, cls_first=True), (8, 28, 28), 10000.0)
    y = apply_rope(x, ang.cos(), ang.sin())
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    assert torch.allclose(y[:, 0], x[:, 0])  # the CLS token sits at (0, 0, 0): no rotation


def test_token_positions_share_row_col_between_grids():
    pos = token_positions(17, cls_first=True)
    assert pos[0].tolist() == [0, 0, 0] and pos[1].tolist() == [1, 0, 0]
    assert pos[-1].tolist() == [1, 3, 3]
    # another grid is placed by patch centres: a coarse patch at the centre of the four fine
    # patches it covers, four fine patches around the coarse one they make up
    coarse = token_positions(4, cls_first=False, scale=2.0)
    assert coarse.tolist() == [[1, 0.5, 0.5], [1, 0.5, 2.5], [1, 2.5, 0.5], [1, 2.5, 2.5]]
    fine = token_positions(64, cls_first=False, scale=0.5).view(4, 2, 4, 2, 3)
    blocks = fine.permute(0, 2, 1, 3, 4).reshape(16, 4, 3).mean(1)
    torch.testing.assert_close(blocks, pos[1:])
    with pytest.raises(ValueError, match="not a square grid"):
        token_positions(15, cls_first=False)


def test_absolute_embedding_matches_across_grids_and_separates_positions():
    axes = (48, 168, 168)  # tiny preset: the RoPE split times 6 heads
    fine = sincos_embedding(token_positions(16, False), axes, 1e4)
    coarse = sincos_embedding(token_positions(4, False, scale=2.0), axes, 1e4)
    assert fine.shape == (16, 384)
    near = coarse[1] @ fine.T  # coarse (0, 1) covers fine (0, 2), (0, 3), (1, 2), (1, 3)
    covered = [2, 3, 6, 7]
    torch.testing.assert_close(near[covered], near[2].expand(4))
    assert near[covered].min() > near[[i for i in range(16) if i not in covered]].max()
    gram = fine @ fine.T / 192  # every entry is cos or sin: |e|^2 = 192
    assert torch.allclose(gram.diagonal(), torch.ones(16, dtype=gram.dtype))
    assert (gram - torch.eye(16)).max() < 0.99  # distinct positions are distinct directions
    assert gram[0, 1] > gram[0, 2] > gram[0, 3] > gram[0, 15]  # and closer ones are more alike


@pytest.mark.parametrize("abs_pos", [True, False])
def test_position_reaches_the_output_of_a_translation_invariant_input(abs_pos):
    """Identical noise and condition tokens at every position: RoPE alone sees only relative
    positions, so each token computes the same thing; the absolute embedding breaks the tie, which
    is what lets cross-attention at t ~ 0 read the condition patch at the same place."""
    torch.manual_seed(0)
    model = DiT(DiTConfig(hidden=64, depth=2, n_heads=2, n_kv_heads=1, target_dim=8, cond_dim=8,
                          abs_pos_embed=abs_pos)).eval()
    for p in model.parameters():  # leave zero init so the blocks and the output do something
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 1, 8).expand(1, 16, 8)
    c = torch.randn(1, 1, 8).expand(1, 16, 8)
    with torch.no_grad():
        v = model(x, torch.tensor([0.0]), c)
    spread = (v - v.mean(dim=1, keepdim=True)).abs().max().item()
    assert (spread > 0.1) if abs_pos else (spread < 1e-4)


def test_linear_path_needs_x_prediction():
    with pytest.raises(ValueError, match="prediction='x'"):
        DiTConfig(target_dim=8, cond_dim=8, prediction="v", cond_linear=True)
    with pytest.raises(ValueError, match="prediction must be one of"):
        DiTConfig(target_dim=8, cond_dim=8, prediction="eps")


def test_x_prediction_samples_land_on_the_linear_path():
    """With the network's output at its zero init, x1_hat is the linear path's W a_c + b, and the
    sampler must land exactly there from any noise (transport.velocity_from_data, Euler onto t = 1)."""
    torch.manual_seed(0)
    model = DiT(_cfg(tokens=16)).eval()
    w, b = torch.randn(24, 32), torch.randn(16, 32)
    with torch.no_grad():
        model.linear_cond.weight.copy_(w.T)
        model.linear_bias.copy_(b)
    c = torch.randn(3, 16, 24)
    expected = F.rms_norm(c, (24,), eps=NORM_EPS) @ w + b
    for method, steps in (("euler", 1), ("euler", 7), ("heun", 5)):
        x1, _ = sampling.sample(model, c, steps=steps, method=method, seed=steps)
        assert torch.allclose(x1, expected, atol=1e-4), method
    # a condition on another grid is resampled onto the target grid
    assert model(torch.randn(3, 16, 32), torch.rand(3), torch.randn(3, 64, 24)).shape == (3, 16, 32)


def test_gqa_equals_multi_head_attention_with_repeated_kv():
    torch.manual_seed(0)
    gqa_cfg = DiTConfig(hidden=128, n_heads=8, n_kv_heads=2, target_dim=8, cond_dim=8)
    mha_cfg = DiTConfig(hidden=128, n_heads=8, n_kv_heads=8, target_dim=8, cond_dim=8)
    gqa, mha = Attention(gqa_cfg), Attention(mha_cfg)
    hd, rep = 16, 4
    q_w, k_w, v_w = gqa.wqkv.weight.split([128, 32, 32])
    repeat = lambda w: w.view(2, hd, -1).repeat_interleave(rep, dim=0).reshape(-1, w.shape[1])  # noqa: E731
    ck, cv = gqa.wkv_cond.weight.chunk(2)
    with torch.no_grad():
        shared = {k: v for k, v in gqa.state_dict().items() if not k.startswith(("wqkv", "wkv"))}
        mha.load_state_dict(shared, strict=False)
        mha.wqkv.weight.copy_(torch.cat([q_w, repeat(k_w), repeat(v_w)]))
        mha.wkv_cond.weight.copy_(torch.cat([repeat(ck), repeat(cv)]))
        gqa.cond_gate.fill_(0.7)
        mha.cond_gate.fill_(0.7)
    x, c = torch.randn(2, 16, 128), torch.randn(2, 9, 128)
    rope_x = tuple(f(rope_angles(token_positions(16, False), gqa_cfg.rope_axes, 1e4)).float()
                   for f in (torch.cos, torch.sin))
    rope_c = tuple(f(rope_angles(token_positions(9, False, 4 / 3), gqa_cfg.rope_axes, 1e4)).float()
                   for f in (torch.cos, torch.sin))
    assert torch.allclose(gqa(x, c, rope_x, rope_c), mha(x, c, rope_x, rope_c), atol=1e-5)
    # the CPU path (expanded K/V) equals PyTorch's own grouped-query attention
    q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 7, 16), torch.randn(2, 2, 7, 16)
    ours = gqa._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert torch.allclose(ours, F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=1e-6)


def _cfg(**kw):
    base = dict(target_dim=32, cond_dim=24, hidden=64, depth=2, n_heads=4, n_kv_heads=2)
    return DiTConfig(**{**base, **kw})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_zero_init_gives_zero_output_and_every_parameter_learns(variant):
    torch.manual_seed(0)
    model = DiT(_cfg(**VARIANTS[variant], tokens=16))
    x, t, c = torch.randn(4, 16, 32), torch.rand(4), torch.randn(4, 16, 24)
    # the network's output starts at zero: v = 0, or x1_hat = 0 (v = -x_t / (1 - t))
    zero = transport.velocity_from_data(torch.zeros(4, 16, 32), x, t) if variant == "eva-repro" else 0 * x
    assert torch.equal(transport.velocity(model, x, t, c), zero)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    drop = torch.tensor([True, False, False, False])  # the null condition is trained too
    # Zero init opens in a chain, one link per optimiser step: the output layer, then the adaLN
    # gates, then the per-head cross-attention gates, then the cross K/V behind those gates.
    for _ in range(4):
        opt.zero_grad()
        loss = (transport.velocity(model, x, t, c, drop) - torch.randn(4, 16, 32)).pow(2).mean()
        loss.backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
        opt.step()
    assert dead == [], dead
    assert not torch.equal(transport.velocity(model, x, t, c), zero)


def test_save_pretrained_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    model = DiT(_cfg(token_mode="cls_patch", target_norm=3.5))
    for p in model.parameters():
        p.data.normal_()
    model.save_pretrained(tmp_path / "m")
    loaded = DiT.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    x, t, c = torch.randn(2, 17, 32), torch.rand(2), torch.randn(2, 17, 24)
    assert torch.equal(model(x, t, c), loaded(x, t, c))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["architecture"] == "eva-repro-dit"
    assert not list((tmp_path / "m").glob("*.tmp"))  # atomic writes leave no temp files


def test_from_pretrained_rejects_other_models(tmp_path):
    DiT(_cfg()).save_pretrained(tmp_path / "a")
    DiT(_cfg(hidden=128)).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "a" / "x")
    (tmp_path / "b" / "model.safetensors").replace(tmp_path / "a" / "model.safetensors")
    with pytest.raises(ValueError, match="do not fit"):
        DiT.from_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="not a saved eva-repro model"):
        DiT.from_pretrained(tmp_path / "b")


@pytest.mark.parametrize("grid", [8, 16, 24])
@pytest.mark.parametrize("mode", ["patch_only", "cls_patch"])
def test_any_grid_with_or_without_cls(grid, mode):
    model = DiT(_cfg(token_mode=mode, depth=1))
    tokens = grid * grid + (mode == "cls_patch")
    out = model(torch.randn(1, tokens, 32), torch.rand(1), torch.randn(1, tokens, 24))
    assert out.shape == (1, tokens, 32)


def test_condition_on_a_different_grid():
    model = DiT(_cfg(depth=1))
    out = model(torch.randn(2, 64, 32), torch.rand(2), torch.randn(2, 16, 24))
    assert out.shape == (2, 64, 32)


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = DiT(_cfg())
    for p in plain.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    ckpt = DiT(_cfg(grad_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t, c = torch.randn(2, 16, 32), torch.rand(2), torch.randn(2, 16, 24)
    for m in (plain, ckpt):
        m(x, t, c).square().sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        if n == "null_cond":  # unused without dropped conditions
            assert a.grad is None and b.grad is None
            continue
        assert torch.allclose(a.grad, b.grad, atol=1e-5), n


def test_presets_and_parameter_counts():
    sizes = {}
    for name, spec in PRESETS.items():
        cfg = DiTConfig.preset(name, target_dim=4096, cond_dim=1024)
        assert (cfg.hidden, cfg.depth, cfg.n_heads, cfg.n_kv_heads) == tuple(spec.values())
        assert cfg.ffn_dim % 256 == 0 and cfg.ffn_dim >= 8 * cfg.hidden / 3
        assert cfg.head_dim == 64 and sum(cfg.rope_axes) == 64
        with torch.device("meta"):
            sizes[name] = DiT(cfg).num_parameters()
    assert sizes["tiny"] < sizes["small"] < sizes["base"] < sizes["large"]
    assert 15e6 < sizes["tiny"] < 25e6  # 4096-d in/out projections dominate the tiny preset
    assert "params=" in repr(DiT(DiTConfig.preset("tiny", target_dim=8, cond_dim=8)))
    with pytest.raises(ValueError, match="unknown model preset"):
        DiTConfig.preset("huge")
    with pytest.raises(ValueError, match="token_mode"):
        DiTConfig(token_mode="cls_only")


def test_estimate_flops_matches_linear_layer_count():
    cfg = _cfg(depth=1)
    T, Tc = 16, 16
    linear = sum(2 * T * m.in_features * m.out_features
                 for name, m in DiT(cfg).named_modules()
                 if isinstance(m, torch.nn.Linear) and ("ada" not in name and "t_embed" not in name
                                                        and "cond_pool" not in name))
    attention = 4 * T * T * cfg.hidden + 4 * T * Tc * cfg.hidden
    whitening = 2 * T * cfg.cond_dim * cfg.cond_dim  # a matmul by a buffer, not a Linear
    # wkv_cond and cond_proj act on Tc tokens; here Tc == T so the count is the same
    assert estimate_flops(cfg, T, Tc) == pytest.approx(linear + attention + whitening, rel=1e-9)
    cfg = _cfg(depth=1, cond_whiten=None)
    assert estimate_flops(cfg, T, Tc) == pytest.approx(linear + attention, rel=1e-9)


def test_training_after_an_inference_mode_forward():
    model = DiT(_cfg(depth=1))
    x, t, c = torch.randn(2, 16, 32), torch.rand(2), torch.randn(2, 16, 24)
    with torch.inference_mode():
        model(x, t, c)
    model(x, t, c).square().sum().backward()  # RoPE tables cached above must not leak in
    assert model.out.weight.grad is not None


def test_whitening_is_the_identity_until_set_then_carries_the_linear_path_over(tmp_path):
    """An unfitted whitening leaves the model as it was; once set, the aligned condition is
    (RMSNorm(c) - mean) @ matrix, a map given in RMS-feature space still samples exactly once
    carried over to the whitened features, and the statistics are saved with the weights."""
    torch.manual_seed(0)
    model = DiT(_cfg(tokens=16, cond_whiten=1.0)).eval()
    plain = DiT(_cfg(tokens=16, cond_whiten=None)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    x, t, c = torch.randn(3, 16, 32), torch.rand(3), 3 * torch.randn(3, 16, 24)
    torch.testing.assert_close(model(x, t, c), plain(x, t, c))
    mean, q = 0.1 * torch.randn(24), torch.linalg.qr(torch.randn(24, 24))[0]
    matrix = q * torch.linspace(0.5, 2.0, 24)  # an invertible, anisotropic map
    model.init_whitening(mean, matrix)
    a = F.rms_norm(c, (24,), eps=NORM_EPS)
    torch.testing.assert_close(model.aligned_condition(c, 16), (a - mean) @ matrix)
    w, b = torch.randn(24, 32), torch.randn(16, 32)
    with torch.no_grad():  # x W + b = ((x - mu) A) (A^-1 W) + (mu W + b)
        model.linear_cond.weight.copy_(torch.linalg.solve(matrix.double(), w.double()).T)
        model.linear_bias.copy_(b.double() + mean.double() @ w.double())
    x1, _ = sampling.sample(model, c, steps=3, method="euler", seed=1)
    torch.testing.assert_close(x1, a @ w + b, atol=1e-4, rtol=1e-4)
    model.save_pretrained(tmp_path / "m")
    loaded = DiT.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.cond_white, matrix) and torch.equal(loaded.cond_mean, mean)
    with pytest.raises(ValueError, match="init_whitening needs"):
        plain.init_whitening(mean, matrix)
    with pytest.raises(ValueError, match="shrinkage"):
        _cfg(cond_whiten=0.0)
    assert _cfg(cond_align=False, cond_linear=False, prediction="v").cond_whiten is None
