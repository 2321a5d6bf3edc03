"""Metric functions against values computed by hand."""

import math

import pytest
import torch

from eva_repro.evaluation import metrics
from eva_repro.flow import sampling, transport
from eva_repro.flow.transport import token_cosine


def test_token_cosine_hand_values_and_scale_invariance():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[1.0, 1.0], [0.0, -2.0]]])
    cos = token_cosine(a, b)
    assert cos.shape == (1, 2)
    assert torch.allclose(cos, torch.tensor([[1 / math.sqrt(2), -1.0]]))
    assert torch.allclose(token_cosine(7.0 * a, 0.1 * b), cos)  # after L2 norm
    with pytest.raises(ValueError, match="differ"):
        token_cosine(a, b[:, :1])


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
    x1 = transport.normalize_target(target)

    def exact(x, t):  # on the straight path x_t = (1-t) x0 + t x1: v = (x1 - x_t) / (1 - t)
        return (x1 - x) / (1 - t).view(-1, 1, 1)

    noise = sampling.sample_noise(range(3), 4, 8, seed=1)
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


# -- distribution metrics ----------------------------------------------------------------------


def _exact_gaussian(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n rows whose sample mean and (unbiased) covariance are exactly `mean` and `cov`."""
    z = torch.randn(n, mean.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # whitened: cov I
    return mean + z @ torch.linalg.cholesky(cov).T


def test_frechet_distance_of_a_set_with_itself_is_zero_and_it_is_symmetric():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g) @ torch.randn(16, 16, generator=g)
    b = torch.randn(200, 16, generator=g) * 2 + 0.5
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    ab, ba = metrics.frechet_distance(a, b), metrics.frechet_distance(b, a)
    assert ab > 1.0 and ab == pytest.approx(ba, rel=1e-9)
    # the streamed moments (two batches) give the same distance as the whole set
    streamed = metrics.Moments().add(a[:100]).add(a[100:])
    assert metrics.frechet_from_moments(streamed, metrics.Moments().add(b)) == pytest.approx(ab, rel=1e-9)


def test_frechet_distance_of_unit_gaussians_one_apart_is_the_dimension():
    g = torch.Generator().manual_seed(0)
    d = 8  # ||mu_a - mu_b||^2 = d, equal covariances: FD = d
    a, b = torch.randn(20_000, d, generator=g), torch.randn(20_000, d, generator=g) + 1
    assert metrics.frechet_distance(a, b) == pytest.approx(d, abs=0.3)


def test_frechet_distance_matches_the_closed_form_for_known_covariances():
    # non-commuting 2 x 2 covariances: Tr (S_a S_b)^(1/2) = sqrt(Tr(S_a S_b) + 2 sqrt(det(S_a S_b)))
    # (the eigenvalues of S_a S_b are >= 0); sqrt(S_a) sqrt(S_b) would give another value
    s_a = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    s_b = torch.tensor([[1.0, -0.3], [-0.3, 0.5]], dtype=torch.float64)
    mu_a, mu_b = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, -1.0], dtype=torch.float64)
    p = s_a @ s_b
    tr_root = math.sqrt(p.trace().item() + 2 * math.sqrt(torch.linalg.det(p).item()))
    expected = 5.0 + 3.0 + 1.5 - 2 * tr_root
    a, b = _exact_gaussian(50, mu_a, s_a, seed=1), _exact_gaussian(80, mu_b, s_b, seed=2)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, abs=1e-9)
    # sampled diagonal covariances, std 1 vs 2 in 4 dims: FD = sum (1 - 2)^2 = 4
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(20_000, 4, generator=g), 2 * torch.randn(20_000, 4, generator=g)
    assert metrics.frechet_distance(a, b) == pytest.approx(4.0, abs=0.2)


def test_frechet_distance_refuses_what_it_cannot_estimate():
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="same D"):
        metrics.frechet_distance(torch.zeros(4, 3), torch.zeros(4, 2))


def test_knn_precision_recall_of_identical_collapsed_and_far_sets():
    real = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert metrics.knn_precision_recall(real, real.clone()) == {"precision": 1.0, "recall": 1.0}
    # every fake the mean: inside the real manifold, but its balls have radius 0
    collapsed = real.mean(0).expand(200, -1)
    pr = metrics.knn_precision_recall(real, collapsed)
    assert pr["precision"] == pytest.approx(1.0) and pr["recall"] == pytest.approx(0.0, abs=0.01)
    assert metrics.knn_precision_recall(real, real + 100.0) == {"precision": 0.0, "recall": 0.0}
    # half the fakes far away: precision halves, the kept half still covers part of the reals
    half = torch.cat([real[:100], real[100:] + 100.0])
    pr = metrics.knn_precision_recall(real, half, k=3)
    assert pr["precision"] == pytest.approx(0.5) and 0.3 < pr["recall"] < 0.9
    with pytest.raises(ValueError, match="more than 3 samples"):
        metrics.knn_precision_recall(real[:3], real)


def test_knn_precision_recall_hand_values():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # k=1: every radius 1, union [-1, 4]
    fake = torch.tensor([[4.0], [10.0], [11.0], [12.0]])  # radii 6 (4 to 10), 1, 1, 1
    # 4 is on the boundary of the ball around 3 (inside: <=); the ball B(4, 6) holds every real
    assert metrics.knn_precision_recall(real, fake, k=1) == {"precision": 0.25, "recall": 1.0}
    # k=2: real radii 2, 1, 1, 2 (union [-2, 5]); fake radii 7, 2, 1, 2: B(4, 7) still holds all
    assert metrics.knn_precision_recall(real, fake, k=2) == {"precision": 0.25, "recall": 1.0}


def test_distribution_scores_tell_a_regressor_from_a_generator():
    g = torch.Generator().manual_seed(0)
    offset = 2 * torch.randn(4, 16, generator=g)  # per position, as the synthetic data's
    target = offset + torch.randn(200, 4, 16, generator=g)
    sample = offset + torch.randn(200, 4, 16, generator=g)  # another draw from the same law
    regressed = offset + 0.2 * (target - offset)  # towards the mean: a fifth of the spread
    gen, reg = metrics.distribution_scores(sample, target), metrics.distribution_scores(regressed, target)
    assert gen["samples"] == 200 and gen["tokens"] == 800
    assert gen["fd_pooled"] < reg["fd_pooled"] and gen["fd_token"] < reg["fd_token"]
    assert gen["recall"] > 0.6 and reg["recall"] < 0.1 and reg["precision"] == 1.0
    same = metrics.distribution_scores(3.0 * target, target)  # token norms do not enter fd_token
    assert same["fd_token"] == pytest.approx(0.0, abs=1e-6) and same["recall"] == 1.0
