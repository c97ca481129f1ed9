"""CRD's contrastive memory as the ML-CPC distillation critic (the authors' `ContrastMemory` + `MLCPCLoss`):
class-exclusive negatives, the memory's scores and update against float64 references, the objective's
bound on them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2

from fastssl.distill.losses import memory_scores, memory_update
from fastssl.distill.memory import ClassExclusiveSampler, ContrastMemory, step_generator
from fastssl.distill.objective import DistillObjective
from fastssl.losses import ml_cpc_bound


def test_negatives_come_uniformly_from_the_images_of_other_classes() -> None:
    """CRD's "exact" sampling: never the query's class, every other image equally likely (chi-square)."""
    labels = torch.tensor([2, 0, 1, 1, 2, 0, 0, 3, 1, 2, 2, 3])  # unequal classes, unsorted
    sampler = ClassExclusiveSampler(labels)
    for c in range(4):
        draws = sampler.draw(torch.full((400,), c), 50, torch.Generator().manual_seed(c)).flatten()
        assert not bool((labels[draws] == c).any())
        allowed = torch.nonzero(labels != c).flatten()
        counts = torch.bincount(draws, minlength=len(labels))[allowed].double()
        expected = draws.numel() / len(allowed)
        statistic = float(((counts - expected) ** 2 / expected).sum())
        assert statistic < chi2.ppf(0.999, len(allowed) - 1), (c, counts)


def test_a_single_class_has_no_negatives_to_draw() -> None:
    with pytest.raises(ValueError, match="same class"):
        ClassExclusiveSampler(torch.zeros(5, dtype=torch.long))


def test_scores_and_update_match_float64_references() -> None:
    torch.manual_seed(0)
    q, rows = torch.randn(6, 16), F.normalize(torch.randn(6, 9, 16), dim=2)
    pos, neg = memory_scores(q, rows, 0.07)
    qn = F.normalize(q.double(), dim=1)
    ref = torch.einsum("nd,nkd->nk", qn, rows.double()) / 0.07
    torch.testing.assert_close(pos.double(), ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(neg.double(), ref[:, 1:], rtol=1e-5, atol=1e-5)
    entries, emb = F.normalize(torch.randn(4, 16), dim=1), torch.randn(4, 16) * 3
    mixed = 0.5 * entries.double() + 0.5 * F.normalize(emb.double(), dim=1)
    torch.testing.assert_close(memory_update(entries, emb, 0.5).double(), mixed / mixed.norm(dim=1, keepdim=True))


def test_the_memory_starts_uniform_in_crds_range_and_draws_from_seed_and_step() -> None:
    labels = torch.arange(200) % 4
    memory = ContrastMemory(labels, 48, negatives=7, temperature=0.07, seed=3)
    bound = 1 / math.sqrt(48 / 3)
    for table in (memory.student, memory.teacher):
        assert float(table.abs().max()) <= bound and abs(float(table.mean())) < 0.01
        assert abs(float(table.var()) - bound ** 2 / 3) < 0.05 * bound ** 2 / 3  # uniform's variance
    idx = torch.tensor([5, 17, 42])
    rows = memory.rows(idx, labels[idx], step=11)
    assert rows.shape == (3, 8) and torch.equal(rows[:, 0], idx)
    assert not bool((labels[rows[:, 1:]] == labels[idx].unsqueeze(1)).any())
    assert torch.equal(rows, memory.rows(idx, labels[idx], step=11))  # a resume draws the same
    assert not torch.equal(rows, memory.rows(idx, labels[idx], step=12))
    assert step_generator(3, 11).initial_seed() != step_generator(4, 11).initial_seed()


def test_the_objective_scores_each_query_against_the_other_networks_memory_then_updates_it() -> None:
    """J(s -> t): student queries, teacher memory (its own image's entry the positive); J(t -> s) the
    reverse; both the alpha-ML-CPC bound; after the step only the batch's entries moved."""
    torch.manual_seed(1)
    labels = torch.arange(40) % 5
    memory = ContrastMemory(labels, 8, negatives=6, temperature=0.1, seed=0)
    obj = DistillObjective(ce_weight=1.0, kd_weight=0.0, mi_weight=0.8, kd_temperature=4.0, alpha=0.05,
                           bound="mlcpc", memory=memory)
    idx = torch.tensor([3, 9, 20, 31])
    y = labels[idx]
    es, et = torch.randn(4, 8), torch.randn(4, 8)
    before_s, before_t = memory.student.clone(), memory.teacher.clone()
    terms = obj(torch.randn(4, 5), y, torch.randn(4, 5), es, et, idx, step=7)
    rows = memory.rows(idx, y, step=7)
    qs, qt = F.normalize(es.double(), dim=1), F.normalize(et.double(), dim=1)
    ss = torch.einsum("nd,nkd->nk", qs, before_t.double()[rows]) / 0.1
    st = torch.einsum("nd,nkd->nk", qt, before_s.double()[rows]) / 0.1
    torch.testing.assert_close(terms.mi_nats.double(), ml_cpc_bound(ss[:, 0], ss[:, 1:], 0.05), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.mi_t_nats.double(), ml_cpc_bound(st[:, 0], st[:, 1:], 0.05), rtol=1e-5,
                               atol=1e-5)
    obj.finish_step(es, et, idx)
    moved = torch.zeros(40, dtype=torch.bool)
    moved[idx] = True
    assert torch.equal(memory.student[~moved], before_s[~moved]) and torch.equal(memory.teacher[~moved],
                                                                                 before_t[~moved])
    torch.testing.assert_close(memory.student[idx], memory_update(before_s[idx], es, 0.5))
    torch.testing.assert_close(memory.teacher[idx], memory_update(before_t[idx], et, 0.5))
    assert set(obj.state.state_dict()) == {"memory.student", "memory.teacher"}


def test_a_dataset_of_one_class_asks_for_the_queue() -> None:
    from fastssl.config import ConfigError
    from fastssl.distill.config import DistillConfig
    from fastssl.distill.trainer import build_objective

    cfg = DistillConfig()
    with pytest.raises(ConfigError, match="loss.negatives memory: every training image has the same class.*"
                                          "use --loss.negatives queue"):
        build_objective(cfg, [0] * 10)
    cfg.loss.negatives, cfg.loss.queue_size = "queue", 4
    assert build_objective(cfg, [0] * 10).memory is None
