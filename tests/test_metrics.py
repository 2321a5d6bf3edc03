"""Metric functions against values computed by hand."""

import math

import pytest
import torch

from eva_repro import flow, metrics


def test_token_cosine_hand_values_and_scale_invariance():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[1.0, 1.0], [0.0, -2.0]]])
    cos = flow.token_cosine(a, b)
    assert cos.shape == (1, 2)
    assert torch.allclose(cos, torch.tensor([[1 / math.sqrt(2), -1.0]]))
    assert torch.allclose(flow.token_cosine(7.0 * a, 0.1 * b), cos)  # after L2 norm
    with pytest.raises(ValueError, match="differ"):
        flow.token_cosine(a, b[:, :1])


def test_cosine_summary_hand_values():
    cos = torch.tensor([[0.1, 0.5], [0.9, 0.7]])  # per image: 0.3, 0.8
    s = metrics.cosine_summary(cos, pooled_cos=torch.tensor([0.2, 0.4]))
    assert s["token_mean"] == pytest.approx(0.55)
    assert s["token_median"] == pytest.approx(0.6)  # sorted 0.1 0.5 0.7 0.9, linear
    assert s["token_p10"] == pytest.approx(0.1 + 0.3 * 0.4)  # position 0.3 between 0.1 and 0.5
    assert s["image_mean"] == pytest.approx(0.55)
    assert s["image_min"] == pytest.approx(0.3)
    assert s["global_mean"] == pytest.approx(0.3)
    assert s["band"] == "moderate"
    # 0.3 is poor; 0.8 is above 0.7 but not above 0.8: high
    assert s["bands"] == pytest.approx({"poor": 0.5, "moderate": 0.0, "high": 0.5,
                                        "very high": 0.0, "excellent": 0.0})
    assert s["above"] == pytest.approx({"0.4": 0.5, "0.7": 0.5, "0.8": 0.0, "0.9": 0.0})


def test_band_names_use_the_seed_words_with_strict_edges():
    assert [metrics.band_name(x) for x in (0.1, 0.4, 0.5, 0.7, 0.75, 0.85, 0.95)] == [
        "poor", "poor", "moderate", "moderate", "high", "very high", "excellent"]
    fractions = metrics.band_fractions(torch.tensor([0.95, 0.85, 0.75, 0.5, 0.2]))
    assert fractions == pytest.approx({k: 0.2 for k in fractions})
    assert sum(fractions.values()) == pytest.approx(1.0)


def test_quantile_matches_torch():
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert metrics.quantile(x, q) == pytest.approx(torch.quantile(x, q).item(), abs=1e-6)


def test_pooled_cosine_hand_value():
    pred = torch.tensor([[[2.0, 0.0], [0.0, 3.0]]])  # normalised mean: (0.5, 0.5)
    target = torch.tensor([[[1.0, 0.0], [5.0, 0.0]]])  # (1, 0)
    assert metrics.pooled_cosine(pred, target).item() == pytest.approx(1 / math.sqrt(2))


def test_retrieval_recall_hand_values():
    targets = torch.eye(3)
    queries = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 0.0, 1.0]])
    # query 1 scores target 0 (0.995) above its own target 1 (0.0995): rank 2
    r = metrics.retrieval_recall(queries, targets, ks=(1, 2, 5))
    assert r == pytest.approx({"recall_at_1": 2 / 3, "recall_at_2": 1.0, "recall_at_5": 1.0})
    # pools of one image: every query is trivially right
    assert metrics.retrieval_recall(queries, targets, pool_size=1)["recall_at_1"] == 1.0
    # pools [0, 1] and [2]: the same miss
    assert metrics.retrieval_recall(queries, targets, pool_size=2)["recall_at_1"] == pytest.approx(2 / 3)


def test_diversity_of_identical_and_opposite_samples():
    a = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0))
    assert metrics.diversity(a, 3 * a) == pytest.approx(1.0)
    assert metrics.diversity(a, -a) == pytest.approx(-1.0)


def test_velocity_cosine_of_the_exact_field_is_one():
    target = 5 * torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0))
    x1 = flow.normalize_target(target)

    def exact(x, t):  # on the straight path x_t = (1-t) x0 + t x1: v = (x1 - x_t) / (1 - t)
        return (x1 - x) / (1 - t).view(-1, 1, 1)

    noise = flow.sample_noise(range(3), 4, 8, seed=1)
    out = metrics.velocity_cosine(exact, target, (0.1, 0.5, 0.9), noise)
    assert out == pytest.approx({"0.1": 1.0, "0.5": 1.0, "0.9": 1.0}, abs=1e-5)
    flipped = metrics.velocity_cosine(lambda x, t: -exact(x, t), target, (0.5,), noise)
    assert flipped["0.5"] == pytest.approx(-1.0, abs=1e-5)


def test_paired_difference_interval_is_exact_for_a_constant_gap_and_right_sized_for_noise():
    a = torch.rand(50)
    gap = metrics.paired_difference(a + 0.01, a)
    assert gap["mean"] == pytest.approx(0.01) and gap["n"] == 50
    assert gap["low"] == pytest.approx(0.01) and gap["high"] == pytest.approx(0.01)
    noise = torch.randn(400, generator=torch.Generator().manual_seed(1)) * 0.02
    gap = metrics.paired_difference(noise, torch.zeros(400))
    half_width = 1.96 * 0.02 / math.sqrt(400)  # the normal-theory 95% half width
    assert gap["high"] - gap["low"] == pytest.approx(2 * half_width, rel=0.15)
    assert gap["low"] < gap["mean"] < gap["high"]
    assert metrics.paired_difference(noise, torch.zeros(400)) == gap  # seeded: the same twice
