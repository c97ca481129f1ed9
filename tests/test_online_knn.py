"""The online k-NN says what it is doing: before epoch 1 it can take minutes without a step logged."""

from __future__ import annotations

import pytest
import torch

from dist_utils import requires_gloo, run_distributed
from test_engine import tiny_config
from fastssl.engine import train
from pipelines.augment import EvalView


def test_knn_before_the_first_epoch_announces_itself_and_shows_progress(tmp_path, capsys):
    cfg = tiny_config(tmp_path, epochs=1)
    cfg.train.progress, cfg.eval.knn_every = True, 0
    train(cfg)
    out, err = capsys.readouterr()
    # 3 classes x 8 train + 3 classes x 3 val images (tiny_config)
    assert "k-NN of the randomly initialised network on 33 images (24 memory bank, 9 queries)" in out
    assert "k-NN of the teacher on 33 images" in out
    assert out.index("randomly initialised") < out.index("of the teacher")
    assert "k-NN memory bank" in err and "k-NN queries" in err  # the tqdm bars (stderr)
    assert "/24 " in err and "/9 " in err  # counted in images of each split


def test_no_knn_bars_without_progress(tmp_path, capsys):
    from fastssl.eval.online import OnlineKnn
    from fastssl.models.backbone import build_backbone
    from fastssl.runtime import build_accelerator

    cfg = tiny_config(tmp_path, epochs=1)
    accelerator = build_accelerator(cfg.train)
    knn = OnlineKnn(cfg.data.train, cfg.data.val, EvalView(16), 16, accelerator, 0, progress=False)
    scores = knn(build_backbone("resnet18"), "a test network")
    out, err = capsys.readouterr()
    assert "k-NN of a test network on 33 images" in out  # the line stays: it is one line per evaluation
    assert "k-NN memory bank" not in err
    assert scores["top1"] * 9 / 100 == pytest.approx(round(scores["top1"] * 9 / 100))  # a count of the 9 queries
    assert scores["top5"] == 100.0  # 3 classes: all within the top 5


def _embed_with_an_empty_rank(rank: int, world_size: int, images: torch.Tensor):
    from accelerate import Accelerator

    from fastssl.eval.online import embed

    accelerator = Accelerator(cpu=True)  # joins the group run_distributed started (gloo)
    torch.manual_seed(0)  # the same weights on both ranks
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    backbone.feature_dim = 5
    # rank 0 holds the whole split (3 images, dataset order 2, 0, 1); rank 1 none (a split smaller
    # than the ranks, or a rank whose images were all unreadable)
    batches = [(images, torch.tensor([7, 8, 9]), torch.tensor([2, 0, 1]))] if rank == 0 else []
    return embed(backbone, batches, accelerator), backbone(images)


@requires_gloo
def test_a_rank_without_images_still_gathers_the_split():
    images = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    outs = run_distributed(_embed_with_an_empty_rank, world_size=2, args=(images,))
    ref = outs[0][1]
    for (feats, labels), _ in outs:  # every rank: the split's features and labels, in dataset order
        torch.testing.assert_close(feats, ref[[1, 2, 0]])
        assert labels.tolist() == [8, 9, 7]


def test_gathered_rows_are_put_in_dataset_order_without_padding_or_gaps():
    """Padding rows (index -1) dropped; indices with gaps (images the loader passed over) kept in order."""
    from fastssl.eval.online import in_dataset_order

    index = torch.tensor([5, -1, 2, 9, -1, 0])
    feats = torch.arange(12.0).reshape(6, 2) + 100 * index[:, None]
    labels = index * 10
    got_feats, got_labels = in_dataset_order(feats, labels, index)
    order = [5, 2, 0, 3]  # the rows holding dataset images 0, 2, 5, 9
    torch.testing.assert_close(got_feats, feats[order])
    assert got_labels.tolist() == labels[order].tolist() == [0, 20, 50, 90]


class _Batches(list):
    """A loader stand-in: its batches, and the split's classes (what `knn_scores` reads of a loader)."""

    classes = ["a", "b", "c"]


def _knn_with_per_rank_bn_statistics(rank: int, world_size: int, bank: torch.Tensor, queries: torch.Tensor,
                                     bank_y: torch.Tensor, query_y: torch.Tensor):
    from accelerate import Accelerator

    from fastssl.eval.online import knn_scores

    accelerator = Accelerator(cpu=True)  # joins the group run_distributed started (gloo)
    torch.manual_seed(0)  # the same weights on both ranks ...
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(12), torch.nn.Linear(12, 5))
    backbone.feature_dim = 5
    with torch.no_grad():  # ... but each rank's own running statistics, as a shuffle-BN key encoder has
        backbone[1].running_mean.fill_(rank)
        backbone[1].running_var.fill_(1 + 3 * rank)
    share = slice(rank, None, world_size)
    loader = lambda x, y: _Batches([(x[share], y[share], torch.arange(len(y))[share])])  # noqa: E731
    scores, _, _ = knn_scores(backbone, loader(bank, bank_y), loader(queries, query_y), accelerator, [1, 3], 0.07)
    return scores, backbone[1].running_var.tolist()


@requires_gloo
def test_every_rank_embeds_the_split_with_rank_0s_batchnorm_statistics():
    """A k-NN over ranks evaluates ONE network, the one the checkpoint exports (rank 0's)."""
    from fastssl.eval.knn import knn_accuracies

    g = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(12, 3, 2, 2, generator=g) * 3, torch.randn(6, 3, 2, 2, generator=g) * 3
    bank_y, query_y = torch.arange(12) % 3, torch.arange(6) % 3
    outs = run_distributed(_knn_with_per_rank_bn_statistics, world_size=2, args=(bank, queries, bank_y, query_y))
    torch.manual_seed(0)
    rank0 = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(12), torch.nn.Linear(12, 5)).eval()
    with torch.no_grad():
        rank0[1].running_mean.fill_(0)
        rank0[1].running_var.fill_(1)
        expected = knn_accuracies(torch.nn.functional.normalize(rank0(bank), dim=1), bank_y,
                                  torch.nn.functional.normalize(rank0(queries), dim=1), query_y, 3, ks=[1, 3])
    for scores, running_var in outs:
        assert running_var == [1.0] * 12
        assert scores == expected
