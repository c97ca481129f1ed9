"""Tests for fastssl.eval.knn (weighted k-NN, DINO protocol)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastssl.eval.knn import knn_accuracy, knn_predict


def _brute_force(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, num_classes: int, k: int, t: float) -> np.ndarray:
    """Independent float64 reference: explicit loops, sorting instead of topk."""
    train = train.astype(np.float64)
    queries = queries.astype(np.float64)
    k = min(k, len(train))
    out = np.zeros((len(queries), num_classes))
    for qi, q in enumerate(queries):
        qn = q / np.linalg.norm(q)
        sims = [float(np.dot(qn, x / np.linalg.norm(x))) for x in train]
        order = sorted(range(len(train)), key=lambda j: -sims[j])[:k]
        for j in order:
            out[qi, labels[j]] += math.exp(sims[j] / t)
    return out


def _clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 5
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_separable_clusters_are_perfect() -> None:
    train, ytr = _clusters(30, 5, 16, 0.1, seed=0)
    g = torch.Generator().manual_seed(1)
    centres = train.view(5, 30, 16).mean(1)
    yq = torch.arange(5).repeat(10)
    queries = centres[yq] + 0.1 * torch.randn(len(yq), 16, generator=g)
    acc = knn_accuracy(train, ytr, queries, yq, num_classes=5)
    assert acc == {"top1": 100.0, "top5": 100.0}


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("k,t", [(1, 0.07), (20, 0.07), (7, 0.5)])
def test_matches_brute_force(dtype: torch.dtype, rtol: float, k: int, t: float) -> None:
    g = torch.Generator().manual_seed(k)
    train = torch.randn(120, 12, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 6, (120,), generator=g)
    queries = torch.randn(25, 12, generator=g, dtype=torch.float64)
    scores = knn_predict(train.to(dtype), labels, queries.to(dtype), 6, k=k, temperature=t)
    ref = _brute_force(train.numpy(), labels.numpy(), queries.numpy(), 6, k, t)
    assert scores.shape == (25, 6) and scores.dtype == dtype
    np.testing.assert_allclose(scores.double().numpy(), ref, rtol=rtol, atol=0)


def test_features_need_not_be_normalised() -> None:
    g = torch.Generator().manual_seed(0)
    train, labels, queries = torch.randn(50, 8, generator=g), torch.randint(0, 3, (50,), generator=g), torch.randn(9, 8, generator=g)
    scale = torch.rand(50, 1, generator=g) * 10 + 0.1
    torch.testing.assert_close(
        knn_predict(train * scale, labels, queries * 3, 3), knn_predict(train, labels, queries, 3), rtol=1e-5, atol=0
    )


def test_chunking_does_not_change_scores() -> None:
    g = torch.Generator().manual_seed(0)
    train, labels, queries = torch.randn(200, 16, generator=g), torch.randint(0, 10, (200,), generator=g), torch.randn(37, 16, generator=g)
    big = knn_predict(train, labels, queries, 10, chunk_size=4096)
    for chunk in (1, 5, 37):
        # Same neighbours and votes; only BLAS summation order may differ (last ulp,
        # amplified ~1/T by the exp).
        small = knn_predict(train, labels, queries, 10, chunk_size=chunk)
        assert torch.equal(small > 0, big > 0)
        torch.testing.assert_close(small, big, rtol=1e-5, atol=0)


def test_k_larger_than_bank_is_clamped() -> None:
    g = torch.Generator().manual_seed(0)
    train, labels, queries = torch.randn(7, 4, generator=g), torch.randint(0, 3, (7,), generator=g), torch.randn(5, 4, generator=g)
    torch.testing.assert_close(knn_predict(train, labels, queries, 3, k=100), knn_predict(train, labels, queries, 3, k=7))
    ref = _brute_force(train.numpy(), labels.numpy(), queries.numpy(), 3, 7, 0.07)
    np.testing.assert_allclose(knn_predict(train, labels, queries, 3, k=100).double().numpy(), ref, rtol=1e-5)


def test_ties_vote_with_equal_weight() -> None:
    # Every neighbour is the same point: each votes exp(1/T), so scores are counts * exp(1/T).
    train = torch.ones(5, 3)
    labels = torch.tensor([0, 0, 0, 2, 2])
    scores = knn_predict(train, labels, torch.ones(2, 3), num_classes=4, k=5, temperature=0.5)
    expected = torch.tensor([3.0, 0.0, 2.0, 0.0]) * math.exp(2.0)
    torch.testing.assert_close(scores, expected.expand(2, 4))


def test_single_neighbour_and_weighting() -> None:
    # Two opposite neighbours: with k=2 the closer one (sim 1) outweighs the other (sim -1)
    # by exp(2/T).
    train = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1])
    scores = knn_predict(train, labels, torch.tensor([[2.0, 0.0]]), 2, k=2, temperature=0.1)
    torch.testing.assert_close(scores[0, 0] / scores[0, 1], torch.tensor(math.exp(20.0)))
    assert knn_predict(train, labels, torch.tensor([[-1.0, 0.0]]), 2, k=1)[0].argmax() == 1


def test_accuracy_top5_clamped_with_few_classes() -> None:
    train, ytr = _clusters(10, 3, 8, 3.0, seed=0)
    acc = knn_accuracy(train, ytr, train, ytr, num_classes=3, k=5)
    assert acc["top5"] == 100.0
    assert acc["top1"] == 100.0  # the queries are the bank's own separated clusters
    wrong = knn_accuracy(train, ytr, train, (ytr + 1) % 3, num_classes=3, k=5)  # every label wrong
    assert wrong == {"top1": 0.0, "top5": 100.0}  # yet within the 3 classes ranked as the "top 5"


def test_accuracy_values() -> None:
    # Two classes on the x axis; query labels chosen so exactly 3 of 4 are right.
    train = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [-1.0, 0.1]])
    ytr = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [-1.0, 0.05], [2.0, 0.0], [-3.0, 0.0]])
    yq = torch.tensor([0, 1, 0, 0])
    acc = knn_accuracy(train, ytr, queries, yq, num_classes=2, k=2)
    assert acc == {"top1": 75.0, "top5": 100.0}


def _brute_force_accuracy(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    order = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    hits = order == labels[:, None]
    return {"top1": 100.0 * hits[:, 0].sum() / len(labels), "top5": 100.0 * hits.any(axis=1).sum() / len(labels)}


def test_one_search_scores_every_k(monkeypatch) -> None:
    """knn_accuracies searches the bank once for the largest k and scores each k from its first k
    neighbours: the same accuracies as the float64 brute force per k (k past the bank: the bank)."""
    import fastssl.eval.knn as knn

    g = torch.Generator().manual_seed(5)
    train, queries = torch.randn(90, 6, generator=g, dtype=torch.float64), torch.randn(41, 6, generator=g, dtype=torch.float64)
    ytr, yq = torch.randint(0, 7, (90,), generator=g), torch.randint(0, 7, (41,), generator=g)
    searches = []
    real = knn._nearest
    monkeypatch.setattr(knn, "_nearest", lambda *a: searches.append(a[3]) or real(*a))
    ks = (1, 4, 20, 500)
    got = knn.knn_accuracies(train, ytr, queries, yq, 7, ks=ks, temperature=0.1, chunk_size=16)
    assert searches == [90]  # one search, for the largest k clamped to the bank
    for k in ks:
        scores = _brute_force(train.numpy(), ytr.numpy(), queries.numpy(), 7, k, 0.1)
        want = _brute_force_accuracy(scores, yq.numpy())
        assert got[k]["top1"] == pytest.approx(want["top1"]), k
        if ((scores > 0).sum(axis=1) >= 5).all():  # else the top 5 holds tied zero scores, in any order
            assert got[k]["top5"] == pytest.approx(want["top5"]), k
    assert len({got[k]["top1"] for k in ks}) > 1  # the ks do differ on this data


def test_empty_queries_give_empty_scores() -> None:
    scores = knn_predict(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.zeros(0, 3), 2)
    assert scores.shape == (0, 2)


_T, _Y, _Q = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(3, 4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(train_features=torch.randn(6)), "2-D"),
        (dict(query_features=torch.randn(3, 5)), "dimensions differ"),
        (dict(train_labels=torch.tensor([0, 1, 2])), "one label per training feature"),
        (dict(train_labels=_Y.float()), "integer"),
        (dict(train_labels=torch.tensor([0, 1, 2, 0, 1, 3])), r"\[0, 3\)"),
        (dict(train_labels=torch.tensor([0, 1, 2, 0, 1, -1])), r"\[0, 3\)"),
        (dict(train_features=torch.zeros(0, 4), train_labels=torch.zeros(0, dtype=torch.long)), "empty"),
        (dict(k=0), "k must"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(num_classes=0), "num_classes"),
    ],
)
def test_bad_inputs_raise(kwargs: dict, match: str) -> None:
    args = dict(train_features=_T, train_labels=_Y, query_features=_Q, num_classes=3)
    with pytest.raises(ValueError, match=match):
        knn_predict(**{**args, **kwargs})


def test_accuracy_bad_query_labels_raise() -> None:
    with pytest.raises(ValueError, match="query_labels"):
        knn_accuracy(_T, _Y, _Q, torch.tensor([0, 1]), num_classes=3)


def _sharded_scores(rank: int, world_size: int, bank: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor,
                    k: int) -> torch.Tensor:
    from accelerate import Accelerator

    from fastssl.eval.online import gather_neighbours

    accelerator = Accelerator(cpu=True)  # joins run_distributed's gloo group
    share = slice(0, 5) if rank == 0 else slice(5, None)  # rank 0 holds fewer rows than k
    return knn_predict(bank[share], labels[share], queries, num_classes=4, k=k, temperature=0.07, chunk_size=7,
                       merge=gather_neighbours(accelerator))


def test_a_sharded_bank_scores_as_the_whole_bank_across_two_processes() -> None:
    """Each process holds a share of the bank and finds its k nearest; one all-gather per query
    chunk picks the k nearest of all shares: the whole bank's scores (float64 brute force)."""
    from dist_utils import run_distributed

    g = torch.Generator().manual_seed(3)
    bank = torch.randn(40, 8, generator=g, dtype=torch.float64)
    queries = torch.randn(17, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (40,), generator=g)
    for k in (12, 40):  # 40: every row of both shares votes
        outs = run_distributed(_sharded_scores, world_size=2, args=(bank, labels, queries, k))
        want = _brute_force(bank.numpy(), labels.numpy(), queries.numpy(), 4, k, 0.07)
        for got in outs:
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
