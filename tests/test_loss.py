"""The multi-crop swapped-prediction loss against a hand computation."""

import math

import pytest
import torch

from fastssl.losses import swapped_prediction_loss


def hand_loss(student, targets, tau):
    """Plain Python loops in float64, straight from Eq. 8 and the multi-crop rule (each global view's
    targets against every other view, averaged)."""
    def ce(u, z):
        total = 0.0
        for i in range(len(u)):
            logq = [zj / tau - math.log(sum(math.exp(zk / tau) for zk in z[i])) for zj in z[i]]
            total -= sum(uj * lj for uj, lj in zip(u[i], logq))
        return total / len(u)

    halves = []
    for t, u in enumerate(targets):
        terms = [ce(u, s) for v, s in enumerate(student) if v != t]
        halves.append(sum(terms) / len(terms))
    return sum(halves) / len(halves)


@pytest.mark.parametrize("num_targets", [1, 2])
@pytest.mark.parametrize("num_views", [2, 4])
def test_matches_hand_computation(num_views, num_targets):
    """One target too: the halves' mean and the terms' mean are not interchangeable with sums then."""
    g = torch.Generator().manual_seed(num_views)
    student = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(num_views)]
    targets = [torch.softmax(torch.randn(3, 4, generator=g, dtype=torch.float64), 1) for _ in range(num_targets)]
    got = swapped_prediction_loss(student, targets, tau_student=0.1)
    want = hand_loss([s.tolist() for s in student], [t.tolist() for t in targets], 0.1)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_two_views_is_half_of_eq8():
    g = torch.Generator().manual_seed(1)
    q1, q2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    u1, u2 = torch.softmax(torch.randn(5, 7, generator=g), 1), torch.softmax(torch.randn(5, 7, generator=g), 1)
    eq8 = (-(u1 * torch.log_softmax(q2 / 0.1, 1)).sum(1).mean() - (u2 * torch.log_softmax(q1 / 0.1, 1)).sum(1).mean())
    assert swapped_prediction_loss([q1, q2], [u1, u2], 0.1).item() == pytest.approx(eq8.item() / 2, rel=1e-6)


def test_target_never_supervises_its_own_view():
    g = torch.Generator().manual_seed(2)
    student = [torch.randn(2, 3, generator=g) for _ in range(3)]
    target0 = torch.softmax(torch.randn(2, 3, generator=g), 1)
    base = swapped_prediction_loss(student, [target0], 0.1)
    moved = [student[0] + 5 * torch.randn(2, 3, generator=g)] + student[1:]
    # the half of target 0 ignores student view 0 entirely ...
    assert swapped_prediction_loss(moved, [target0], 0.1).item() == pytest.approx(base.item(), rel=1e-7)
    # ... but not student view 1
    moved = [student[0], student[1] + 5 * torch.randn(2, 3, generator=g), student[2]]
    assert abs(swapped_prediction_loss(moved, [target0], 0.1).item() - base.item()) > 1e-3


def test_one_log_softmax_for_every_view_and_views_of_one_shape(monkeypatch):
    """Batched: a handful of kernels per step on a GPU, not T x (V - 1) cross-entropies."""
    import fastssl.losses.swapped as swapped

    calls = []
    real = swapped.F.log_softmax
    monkeypatch.setattr(swapped.F, "log_softmax", lambda *a, **k: calls.append(1) or real(*a, **k))
    student = [torch.randn(4, 5) for _ in range(8)]
    targets = [torch.softmax(torch.randn(4, 5), 1) for _ in range(2)]
    swapped_prediction_loss(student, targets, 0.1)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="views of one shape"):
        swapped_prediction_loss([*student[:-1], torch.randn(3, 5)], targets, 0.1)


def test_the_loss_is_float32_or_better_under_autocast():
    """Its contraction is a matrix product, which autocast would run in bf16: it is kept out of autocast."""
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(6, 50, generator=g) for _ in range(4)]
    targets = [torch.softmax(torch.randn(6, 50, generator=g), 1) for _ in range(2)]
    plain = swapped_prediction_loss(student, targets, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = swapped_prediction_loss(student, targets, 0.1)
    assert under.dtype == torch.float32 and abs(under.item() - plain.item()) <= 1e-6 * abs(plain.item())
