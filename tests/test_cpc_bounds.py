"""alpha-CPC / alpha-ML-CPC: the paper's Example 1 in closed form, lower-bound checks with the
optimal critic on Gaussians, ceilings, and numerical edge cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastssl.losses import alpha_min, cpc_bound, ml_cpc_bound

NEG_INF = float("-inf")


def example1(bound, alpha: float) -> float:
    """E[bound] for X = Y a fair bit, g = 1 on a match and 0 otherwise, n = m = 3, by exact
    enumeration of the 2^6 match patterns of the 6 negatives (each matches with prob. 1/2).

    Positives always match (log g = 0); a negative is log g = 0 if it matches, else -inf."""
    total = 0.0
    for pattern in itertools.product([0.0, NEG_INF], repeat=6):
        neg = torch.tensor(pattern, dtype=torch.float64).view(3, 2)
        total += float(bound(torch.zeros(3, dtype=torch.float64), neg, alpha)) / 2**6
    return total


def test_example_1_closed_form():
    # alpha-CPC at alpha 0.5 exceeds I(X;Y) = log 2: not a bound. alpha-ML-CPC stays below.
    assert example1(cpc_bound, 0.5) == pytest.approx(0.7174, abs=1e-4)
    assert example1(ml_cpc_bound, 0.5) == pytest.approx(0.5879, abs=1e-4)
    assert example1(cpc_bound, 0.5) > math.log(2) > example1(ml_cpc_bound, 0.5)
    assert alpha_min(3, 3) == pytest.approx(3 / 7)


def test_matches_the_float64_formula_in_probability_space():
    g = torch.Generator().manual_seed(0)
    n, m, alpha = 5, 7, 0.3
    pos, neg = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, m - 1, generator=g, dtype=torch.float64)
    w = (m - alpha) / (m - 1)
    gp, gn = pos.exp(), neg.exp()
    cpc = torch.log(m * gp / (alpha * gp + w * gn.sum(1))).mean()
    ml = torch.log(n * m * gp / (alpha * gp.sum() + w * gn.sum())).mean()
    torch.testing.assert_close(cpc_bound(pos, neg, alpha), cpc, rtol=0, atol=1e-12)
    torch.testing.assert_close(ml_cpc_bound(pos, neg, alpha), ml, rtol=0, atol=1e-12)


def test_alpha_equal_to_m_gives_the_negatives_weight_zero():
    """At alpha = m the negatives' weight (m - alpha) / (m - 1) is 0 (Eq. 6), so the bound is
    mean(pos) + log(n m) - log(sum_j m g(x_j, y_j)) whatever the negatives are: float64 by hand, 1e-12."""
    g = torch.Generator().manual_seed(0)
    n, m = 5, 7
    pos = torch.randn(n, generator=g, dtype=torch.float64)
    expected = float(pos.mean()) + math.log(n * m) - math.log(m * sum(math.exp(p) for p in pos.tolist()))
    for fill in (None, 30.0, NEG_INF):  # random, dominating and absent negatives
        neg = torch.randn(n, m - 1, generator=g, dtype=torch.float64) if fill is None else \
            torch.full((n, m - 1), fill, dtype=torch.float64)
        assert float(ml_cpc_bound(pos, neg, alpha=m)) == pytest.approx(expected, rel=0, abs=1e-12)


@pytest.mark.parametrize("alpha", [1.0, 0.2, 0.01])
def test_perfect_critic_reaches_the_ceilings(alpha):
    n, m = 4, 9
    pos, neg = torch.zeros(n), torch.full((n, m - 1), NEG_INF)
    assert float(ml_cpc_bound(pos, neg, alpha)) == pytest.approx(math.log(m / alpha), abs=1e-6)
    assert float(cpc_bound(pos, neg, 1.0)) == pytest.approx(math.log(m), abs=1e-6)


def test_edge_cases_are_finite_or_exactly_minus_inf():
    # Huge scores, n = 1, m = 1, bf16 input, -inf positives.
    big = torch.tensor([1e4, -1e4]), torch.tensor([[1e4, -1e4], [3.0, 1e4]])
    assert torch.isfinite(ml_cpc_bound(*big)) and torch.isfinite(cpc_bound(*big))
    one = ml_cpc_bound(torch.tensor([2.0]), torch.tensor([[0.5, -1.0]]), 0.5)
    assert torch.isfinite(one)
    assert float(cpc_bound(torch.tensor([1.0, 2.0]), torch.empty(2, 0), 0.5)) == pytest.approx(math.log(1 / 0.5))
    half = ml_cpc_bound(torch.randn(4).bfloat16(), torch.randn(4, 3).bfloat16())
    assert half.dtype == torch.float32
    assert float(ml_cpc_bound(torch.tensor([NEG_INF, 0.0]), torch.zeros(2, 2))) == NEG_INF
    with pytest.raises(ValueError, match="alpha"):
        ml_cpc_bound(torch.zeros(2), torch.zeros(2, 2), alpha=0.0)


def gaussian_log_ratio(x: torch.Tensor, y: torch.Tensor, rho: float) -> torch.Tensor:
    """log p(x, y) / (p(x) p(y)) for unit-variance pairs correlated rho per dimension (summed)."""
    s = 1 - rho**2
    return (-0.5 * math.log(s) - (x**2 + y**2 - 2 * rho * x * y) / (2 * s) + (x**2 + y**2) / 2).sum(-1)


@pytest.mark.parametrize("mi", [2.0, 6.0])
@pytest.mark.parametrize("n,m", [(16, 16), (64, 8), (8, 64)])
def test_optimal_critic_ml_cpc_stays_below_the_true_mi(one_thread, mi, n, m):
    d, reps = 20, 300
    rho = math.sqrt(1 - math.exp(-2 * mi / d))  # I = -d/2 log(1 - rho^2)
    g = torch.Generator().manual_seed(int(mi * 100 + n))
    x = torch.randn(reps, n, d, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(reps, n, d, generator=g, dtype=torch.float64)
    y_neg = torch.randn(reps, n, m - 1, d, generator=g, dtype=torch.float64)  # from p(y)
    pos = gaussian_log_ratio(x, y, rho)
    neg = gaussian_log_ratio(x.unsqueeze(2), y_neg, rho)
    for alpha in (1.0, alpha_min(n, m)):
        est = torch.stack([ml_cpc_bound(pos[r], neg[r], alpha) for r in range(reps)])
        assert est.mean() <= mi + 3 * est.std() / math.sqrt(reps), (alpha, float(est.mean()))
    cpc = torch.stack([cpc_bound(pos[r], neg[r]) for r in range(reps)])
    assert cpc.max() <= math.log(m) + 1e-9
