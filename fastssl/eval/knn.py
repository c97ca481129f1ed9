"""Weighted k-NN classifier on frozen features (DINO evaluation protocol).

Why this protocol: it needs no training (so it is cheap enough to run during
pretraining) and is the number papers report, so ours must match DINO's
``knn_classifier`` exactly: L2-normalised features, cosine similarity, the
top-k neighbours from the training bank vote for their label with weight
``exp(sim / T)``, and the class scores are the summed votes.

On several processes each holds a shard of the bank (an ImageNet bank is 1.28M x 2048
floats, 10.5 GB, too much to copy to every GPU): each finds its shard's k nearest of every
query, and `merge` (all-gather) lets every process pick the k nearest of all shards, which
are the k nearest of the whole bank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["knn_predict", "knn_accuracy", "knn_accuracies", "Merge"]

# (similarities, labels) of this shard's k nearest (q x k) -> every shard's, side by side (q x k*shards).
Merge = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _validate(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    chunk_size: int,
    sharded: bool = False,
) -> None:
    """Fail early with a readable message instead of a shape error deep in topk/scatter."""
    if train_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError(
            "train_features and query_features must be 2-D (N x D), got shapes "
            f"{tuple(train_features.shape)} and {tuple(query_features.shape)}"
        )
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"feature dimensions differ: train {train_features.shape[1]} vs query {query_features.shape[1]}"
        )
    if train_features.shape[0] == 0 and not sharded:
        raise ValueError("the training bank is empty")
    if train_labels.ndim != 1 or train_labels.shape[0] != train_features.shape[0]:
        raise ValueError(
            f"train_labels must be 1-D with one label per training feature "
            f"({train_features.shape[0]}), got shape {tuple(train_labels.shape)}"
        )
    if train_labels.dtype.is_floating_point or train_labels.dtype.is_complex or train_labels.dtype == torch.bool:
        raise ValueError(f"train_labels must be an integer tensor, got {train_labels.dtype}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if train_labels.numel() and (int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes):
        raise ValueError(
            f"train_labels must lie in [0, {num_classes}), got range "
            f"[{int(train_labels.min())}, {int(train_labels.max())}]"
        )
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def _nearest(train_features: Tensor, train_labels: Tensor, query_features: Tensor, k: int, chunk_size: int,
             merge: Merge | None) -> Iterator[tuple[Tensor, Tensor]]:
    """For each chunk of queries: the similarities (largest first) and labels of its `k` nearest bank
    rows (of the whole bank with `merge`), in `_score_dtype`, on the bank's device."""
    dtype = _score_dtype(train_features, query_features)
    # The bank is not copied (an ImageNet bank is 10.5 GB): each similarity is divided by its
    # bank row's norm instead, which equals normalising the bank first.
    bank = train_features.to(dtype)
    inverse_norms = 1.0 / torch.linalg.vector_norm(bank, dim=1).clamp_min(1e-12)  # F.normalize's eps
    queries = torch.nn.functional.normalize(query_features.to(device=bank.device, dtype=dtype), dim=1)
    labels = train_labels.to(device=bank.device, dtype=torch.long)
    for chunk in queries.split(chunk_size):
        sims, idx = (chunk @ bank.T).mul_(inverse_norms).topk(min(k, bank.shape[0]), dim=1)  # (q, k), largest first
        nearest = labels[idx]
        if merge is not None:  # every shard's k nearest, then the k nearest of those
            short = k - sims.shape[1]  # a shard smaller than k: padded with neighbours that never win
            sims = torch.nn.functional.pad(sims, (0, short), value=-torch.inf)
            nearest = torch.nn.functional.pad(nearest, (0, short), value=0)
            sims, nearest = merge(sims, nearest)
            sims, pick = sims.topk(k, dim=1)
            nearest = nearest.gather(1, pick)
        yield sims, nearest


def _score_dtype(train_features: Tensor, query_features: Tensor) -> torch.dtype:
    """The features' promoted dtype; the default float dtype for integer features."""
    dtype = torch.promote_types(train_features.dtype, query_features.dtype)
    return dtype if dtype.is_floating_point else torch.get_default_dtype()


def _votes(sims: Tensor, nearest: Tensor, k: int, temperature: float, num_classes: int) -> Tensor:
    """Class scores from the first `k` of the (largest-first) neighbours: sum of exp(sim / T) per label."""
    votes = torch.zeros(sims.shape[0], num_classes, dtype=sims.dtype, device=sims.device)
    return votes.scatter_add_(1, nearest[:, :k], (sims[:, :k] / temperature).exp())


@torch.no_grad()
def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
    merge: Merge | None = None,
) -> Tensor:
    """Class scores (Q x C) of each query from its k nearest training features.

    Features are L2-normalised here (callers need not), so similarity is
    cosine.  Queries are processed ``chunk_size`` at a time so the Q x N
    similarity matrix never has to fit in memory at once (256 x an ImageNet
    bank: 1.3 GB in float32); results do not depend on ``chunk_size``.
    ``k`` larger than the bank is clamped to the bank size.  Scores are in the
    dtype of the (promoted) features, on their device.  With ``merge``, the
    training features are this process's shard of the bank (possibly empty),
    ``k`` is at most the whole bank's size, and every process passes the same
    queries.
    """
    _validate(train_features, train_labels, query_features, num_classes, k, temperature, chunk_size,
              sharded=merge is not None)
    if merge is None:
        k = min(k, train_features.shape[0])
    scores = [_votes(sims, nearest, k, temperature, num_classes)
              for sims, nearest in _nearest(train_features, train_labels, query_features, k, chunk_size, merge)]
    if not scores:
        return torch.zeros(0, num_classes, dtype=_score_dtype(train_features, query_features),
                           device=train_features.device)
    return torch.cat(scores)


@torch.no_grad()
def knn_accuracies(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    query_labels: Tensor,
    num_classes: int,
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
    chunk_size: int = 256,
    merge: Merge | None = None,
) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 accuracy in percent of the weighted k-NN classifier for each k in ``ks``
    (``merge``: a sharded bank, as in `knn_predict`).

    One neighbour search serves every k: the nearest max(ks) rows, largest first, of which
    each k takes its first k. The similarities are the cost (50,000 ImageNet queries x 1.28M
    bank rows x 2048), so eval_knn's four k values cost one search, not four. With fewer
    than 5 classes, top-5 is computed over all classes (=100%).
    """
    if query_labels.ndim != 1 or query_labels.shape[0] != query_features.shape[0]:
        raise ValueError(
            f"query_labels must be 1-D with one label per query ({query_features.shape[0]}), "
            f"got shape {tuple(query_labels.shape)}"
        )
    if query_features.shape[0] == 0:
        raise ValueError("no queries to evaluate")
    if not ks:
        raise ValueError("ks must name at least one k")
    for k in ks:
        _validate(train_features, train_labels, query_features, num_classes, k, temperature, chunk_size,
                  sharded=merge is not None)
    bank_rows = train_features.shape[0]
    clamped = {k: k if merge is not None else min(k, bank_rows) for k in ks}
    top1 = dict.fromkeys(ks, 0)
    top5 = dict.fromkeys(ks, 0)
    targets = query_labels.to(train_features.device, torch.long)[:, None].split(chunk_size)
    search = _nearest(train_features, train_labels, query_features, max(clamped.values()), chunk_size, merge)
    for (sims, nearest), target in zip(search, targets):
        target = target.to(sims.device)
        for k in ks:
            ranked = _votes(sims, nearest, clamped[k], temperature, num_classes).topk(min(5, num_classes), dim=1).indices
            correct = ranked == target
            top1[k] += int(correct[:, :1].any(dim=1).sum())
            top5[k] += int(correct.any(dim=1).sum())
    n = float(query_labels.shape[0])
    return {k: {"top1": 100.0 * top1[k] / n, "top5": 100.0 * top5[k] / n} for k in ks}


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    query_labels: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    merge: Merge | None = None,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy in percent for one k: see `knn_accuracies`."""
    return knn_accuracies(train_features, train_labels, query_features, query_labels, num_classes, (k,),
                          temperature, merge=merge)[k]
