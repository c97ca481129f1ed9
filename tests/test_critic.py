"""The ML-CPC critic: key queue (FIFO, wrap-around, 2-rank gather), self-exclusion, curriculum."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_utils import DEVICES, on_device, requires_gloo, run_distributed
from fastssl.critic import KeyQueue, MlCpcCritic
from fastssl.losses import ml_cpc_bound
from fastssl.objectives import MlCpc, TeacherOutput, critic_loss
from fastssl.schedules import StepSchedule, alpha_schedule


def unit(n: int, d: int = 4, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_queue_is_fifo_and_wraps_around():
    q = KeyQueue(size=5, dim=4)
    a, b, c = unit(3, seed=1), unit(3, seed=2), unit(1, seed=3)
    q.push(a)
    q.push(b)  # 6 keys into 5 slots: a[0] is overwritten
    torch.testing.assert_close(q.ordered(), torch.cat([a[1:], b]))
    q.push(c)
    torch.testing.assert_close(q.ordered(), torch.cat([a[2:], b, c]))
    assert int(q.ptr) == 2
    big = unit(7, seed=4)  # more keys than slots: the newest 5 survive, in order
    q.push(big)
    torch.testing.assert_close(q.ordered(), big[2:])


def test_queue_longer_than_dataset_is_an_error_that_says_so():
    with pytest.raises(ValueError, match="not smaller than the dataset"):
        KeyQueue(size=100, dim=4, dataset_size=100)


def test_keys_are_scored_before_they_are_enqueued():
    """Through the objective, as a step runs it: the loss of every micro-batch, then the queue push."""
    critic = MlCpcCritic(queue_size=8, dim=4, temperature=0.5, direction="one_way")
    objective = MlCpc(critic)
    queue_before = critic.queue.keys.clone()
    q, k = unit(3, seed=5), unit(3, seed=6)
    sched = StepSchedule(lr=0.1, beta=0.7, ema_momentum=0.99, freeze_prototypes=False, alpha=1.0)
    keys = objective.targets(TeacherOutput(logits=[], z=[unit(3, seed=9), k]), sched)
    loss, metrics = objective.loss([], [q, unit(3, seed=10)], keys, slice(0, 3), sched)
    torch.testing.assert_close(critic.queue.keys, queue_before)  # scoring alone enqueues nothing
    objective.finish_step(keys)
    pos = (q * k).sum(1) / 0.5
    neg = q @ queue_before.t() / 0.5  # the queue as it was: no key of this step among the negatives
    torch.testing.assert_close(metrics["mi_nats"], ml_cpc_bound(pos, neg, 1.0))
    torch.testing.assert_close(loss, -ml_cpc_bound(pos, neg, 1.0))
    torch.testing.assert_close(critic.queue.ordered()[-3:], k)
    assert metrics["mi_ceiling_nats"] == pytest.approx(math.log(9 / 1.0))
    assert metrics["alpha"] == 1.0
    # The loss is -bound / alpha and has a gradient for the queries only.
    q2 = unit(3, seed=7).requires_grad_()
    out = critic(q2, unit(3, seed=8).requires_grad_(), alpha=0.25)
    torch.testing.assert_close(out.loss, -out.mi_nats / 0.25)
    out.loss.backward()
    assert q2.grad is not None and torch.isfinite(q2.grad).all()


def test_alpha_curriculum_is_geometric():
    assert alpha_schedule(0.0, 10, 0.1) == pytest.approx(10)
    assert alpha_schedule(0.5, 10, 0.1) == pytest.approx(1.0)
    assert alpha_schedule(1.0, 10, 0.1) == pytest.approx(0.1)
    assert alpha_schedule(0.25, 10, 0.1) == pytest.approx(10**0.5)
    with pytest.raises(ValueError):
        alpha_schedule(0.5, 0.0, 1.0)


@pytest.mark.parametrize("start, end", [(10.0, 0.1), (0.1, 10.0), (4097.0, 0.3), (3.0, 3.0)])
def test_alpha_curriculum_returns_its_endpoints_exactly_and_never_leaves_them(start, end):
    """exp(log 10) is 10.000000000000002: an alpha_start equal to ML-CPC's m = queue_size + 1 would
    leave (0, m] by one ulp and the loss would refuse it. Checked against float64 math, not a copy."""
    assert alpha_schedule(0.0, start, end) == start and alpha_schedule(1.0, end=end, start=start) == end
    assert alpha_schedule(-0.5, start, end) == start and alpha_schedule(1.5, start, end) == end
    for p in torch.linspace(0, 1, 1001, dtype=torch.float64).tolist():
        alpha = alpha_schedule(p, start, end)
        assert min(start, end) <= alpha <= max(start, end)
        assert alpha == pytest.approx(start * (end / start) ** p, rel=1e-12)
    m = int(max(start, end))
    if m == max(start, end) and m > 1:  # alpha = m is scored: the positives alone, negatives weighted 0
        pos, neg = torch.randn(4, dtype=torch.float64), torch.randn(4, m - 1, dtype=torch.float64)
        assert torch.isfinite(ml_cpc_bound(pos, neg, alpha_schedule(0.0 if start > end else 1.0, start, end)))


def _push_two_ranks(rank: int, world_size: int, device: str) -> torch.Tensor:
    on = on_device(device)
    q = KeyQueue(size=6, dim=4).to(on)
    q.push(unit(2, seed=10 + rank).to(on))
    q.push(unit(2, seed=20 + rank).to(on))
    return q.ordered()


@requires_gloo
@pytest.mark.parametrize("device", DEVICES)
def test_two_ranks_write_the_same_gathered_keys(device):
    r0, r1 = run_distributed(_push_two_ranks, world_size=2, args=(device,))
    torch.testing.assert_close(r0, r1)
    # Step 1: rank 0's keys then rank 1's; step 2 the same, wrapping over step 1's first keys.
    expected = torch.cat([unit(2, seed=11), unit(2, seed=20), unit(2, seed=21)])
    torch.testing.assert_close(r0, expected)


def _authors_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float, alpha: float) -> torch.Tensor:
    """The authors' loss re-derived from Eq. 6 and their code, in float64: logits = [q.k+ | q.queue] / T,
    log(alpha) added to positives, log((m - alpha)/(m - 1)) to negatives, ONE logsumexp over
    all n*m entries, bound = mean(pos) + log(n m) - lse, loss = -bound / alpha."""
    q, k, queue = (F.normalize(x.double(), dim=1) for x in (q, k, queue))
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1) / t
    n, m = logits.shape
    weighted = torch.cat([logits[:, :1] + math.log(alpha), logits[:, 1:] + math.log((m - alpha) / (m - 1))], dim=1)
    bound = logits[:, 0].mean() + math.log(n * m) - torch.logsumexp(weighted.reshape(-1), dim=0)
    return -bound / alpha


@pytest.mark.parametrize("alpha", [10.0, 1.0, 0.1])
def test_one_way_direction_is_the_authors_formula(alpha):
    critic = MlCpcCritic(queue_size=16, dim=4, temperature=0.07, direction="one_way")
    g = torch.Generator().manual_seed(3)
    student = [torch.randn(5, 4, generator=g) for _ in range(2)]
    teacher = [torch.randn(5, 4, generator=g) for _ in range(2)]
    out = critic_loss(critic, student, teacher, alpha)
    expected = _authors_loss(student[0], teacher[1], critic.queue.keys, 0.07, alpha)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-5)
    # B keys (view 1's) go to the queue, not 2B.
    torch.testing.assert_close(critic.keys_to_enqueue(teacher), teacher[1])
    # Ours (symmetric) scores both directions in one denominator: another number.
    sym = MlCpcCritic(queue_size=16, dim=4, temperature=0.07)
    sym.queue.keys.copy_(critic.queue.keys)
    sym_out = critic_loss(sym, student, teacher, alpha)
    expected_sym = _authors_loss(torch.cat(student), torch.cat(teacher[::-1]), critic.queue.keys, 0.07, alpha)
    torch.testing.assert_close(sym_out.loss.double(), expected_sym, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sym_out.loss.double(), expected, atol=1e-4)
    assert sym.keys_to_enqueue(teacher).shape[0] == 10


def test_unknown_direction_is_refused():
    with pytest.raises(ValueError, match="one_way"):
        MlCpcCritic(queue_size=4, dim=4, direction="both")


def test_the_cpc_bound_at_alpha_1_is_the_authors_infonce_loss():
    """critic.bound cpc at alpha 1 is the authors' `--loss cpc` baseline (main_moco_cifar.py: CrossEntropyLoss over
    each row's [positive | queue] logits, target 0), up to the constant log m; the objective passes the switch."""
    from fastssl.config import Config
    from fastssl.losses import cpc_bound

    torch.manual_seed(0)
    critic = MlCpcCritic(queue_size=50, dim=8, temperature=0.07, direction="one_way", bound="cpc")
    q, k = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    out = critic(q, k, alpha=1.0)
    pos, neg = critic.scores(q, k)
    authors = F.cross_entropy(torch.cat([pos[:, None], neg], 1), torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(out.loss, authors - math.log(51), rtol=0, atol=1e-5)
    ml = MlCpcCritic(queue_size=50, dim=8, temperature=0.07, direction="one_way")
    ml.queue.keys.copy_(critic.queue.keys)
    assert abs(float(ml(q, k, alpha=1.0).loss - out.loss)) > 1e-3  # one denominator: another number
    cfg = Config()
    cfg.method.objective, cfg.critic.bound, cfg.critic.queue_size, cfg.model.proj_dim = "mlcpc", "cpc", 50, 8
    assert MlCpc.from_config(cfg).critic.bound is cpc_bound


def test_the_configs_bound_names_are_the_bounds():
    from fastssl.config import CRITIC_BOUNDS
    from fastssl.losses import BOUNDS

    assert CRITIC_BOUNDS == tuple(BOUNDS)
