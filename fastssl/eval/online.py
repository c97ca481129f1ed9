"""Online k-NN during training: features of the exported backbone (`model.export`: the EMA teacher by
default) for train (bank) and val (queries).

DINO protocol: L2-normalised features, cosine similarity, k = 20, votes weighted by
exp(sim / 0.07). Each rank embeds its share of each split. The queries are gathered; the
memory bank is not (1.28M x 2048 floats on ImageNet, 10.5 GB on every GPU): each rank finds
its share's nearest neighbours of every query, and one all-gather per chunk of queries lets
every rank pick the nearest of all shares, so every rank computes the same accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from fastssl.collectives import all_gather_padded_rows, all_gather_rows
from fastssl.eval.knn import Merge, knn_accuracies
from fastssl.runtime import per_process, rank0_buffers, said_once_per_node
from pipelines.augment import EvalView
from pipelines.eval import build_eval_loader
from pipelines.folder import DataLayoutError, Listing
from pipelines.spec import DataConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

    from pipelines.dali_eval import DaliEvalLoader
    from pipelines.eval import EvalLoader


@torch.no_grad()
def embed(backbone: torch.nn.Module, loader: Iterable, accelerator: Accelerator, progress: bool = False,
          desc: str = "k-NN features", gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of the whole split, in dataset order, on every rank; with `gather=False`,
    of this rank's share only, in the order loaded.

    `progress` shows a bar (images of this rank) on the local main process: a split of
    ImageNet takes minutes, and silence that long looks like a hang.
    """
    feats, labels, index = [], [], []
    was_training = backbone.training
    backbone.eval()
    bar = tqdm(total=len(getattr(loader, "indices", ())) or None, desc=desc, unit="img", dynamic_ncols=True,
               leave=False, disable=not (progress and accelerator.is_local_main_process))
    for images, y, i in loader:
        with accelerator.autocast():
            feats.append(backbone(images).float())
        labels.append(y)  # kept on the host until the end: a copy of pageable memory to the GPU
        index.append(i)   # would wait for the queued forwards at every batch
        bar.update(len(y))
    bar.close()
    backbone.train(was_training)
    # A rank with no images (a split smaller than the ranks) still gathers rows of the features' width.
    feats_t = torch.cat(feats) if feats else torch.zeros(0, backbone.feature_dim, device=accelerator.device)
    del feats  # an ImageNet bank is 1.28M x 2048 floats (10.5 GB): no copy of it lives longer than it must
    labels_t = (torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)).to(accelerator.device)
    if not gather:
        return feats_t, labels_t
    index_t = (torch.cat(index) if index else torch.zeros(0, dtype=torch.long)).to(accelerator.device)
    if accelerator.num_processes > 1:
        feats_t, labels_t, index_t = (all_gather_padded_rows(t, -1) for t in (feats_t, labels_t, index_t))
    return in_dataset_order(feats_t, labels_t, index_t)


def in_dataset_order(feats: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(features, labels) in ascending dataset index; rows of index -1 (padding) dropped. Indices may
    have gaps (unreadable images the loader passed over).

    One copy of the features (written in place), where masking then sorting made two: at ImageNet
    scale each is 10.5 GB on every GPU."""
    keep = index >= 0
    present = index[keep].sort().values
    count = present.numel()
    # each row's place among the present indices; padding rows all land in one spare row, cut off below
    slot = torch.where(keep, torch.searchsorted(present, index.clamp_min(0)), count)
    out = feats.new_empty(count + 1, feats.shape[1]).index_copy_(0, slot, feats)
    out_labels = labels.new_empty(count + 1).index_copy_(0, slot, labels)
    return out[:count], out_labels[:count]


def gather_neighbours(accelerator: Accelerator) -> Merge | None:
    """`knn_predict`'s merge across the processes (None on one): every rank's nearest neighbours
    of a chunk of queries, side by side (one all-gather of the similarities, one of the labels)."""
    if accelerator.num_processes == 1:
        return None
    world = accelerator.num_processes

    def merge(sims: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for t in (sims, labels):
            every = all_gather_rows(t)  # (world x q, k), rank-major
            out.append(every.view(world, -1, t.shape[1]).transpose(0, 1).reshape(t.shape[0], -1))
        return out[0], out[1]

    return merge


def knn_scores(backbone: torch.nn.Module, bank_loader: EvalLoader | DaliEvalLoader,
               query_loader: EvalLoader | DaliEvalLoader, accelerator: Accelerator, ks: list[int],
               temperature: float, progress: bool = False, what: str = "k-NN") -> tuple[dict[int, dict], int, int]:
    """Top-1/top-5 for each k in `ks`, each rank holding only its share of the memory bank; and the
    sizes of the bank and of the queries (whole splits). Every rank embeds with rank 0's BatchNorm
    statistics (`rank0_buffers`): one network, the exported one, for the whole split."""
    rank0_buffers(backbone, accelerator)
    bank_x, bank_y = embed(backbone, bank_loader, accelerator, progress, f"{what} memory bank".strip(),
                           gather=False)
    query_x, query_y = embed(backbone, query_loader, accelerator, progress, f"{what} queries".strip())
    bank_size = sum(n for (n,) in per_process(accelerator, [len(bank_y)]))
    for split, size in (("memory bank (train)", bank_size), ("queries (val)", len(query_y))):
        if size == 0:  # every process knows both sizes: they raise together
            raise said_once_per_node(DataLayoutError(
                f"the k-NN's {split} has no readable image: each was skipped with a warning above; replace those "
                f"files, or point the k-NN at another folder"), accelerator)
    merge = gather_neighbours(accelerator)
    clamped = {k: min(k, bank_size) for k in ks}
    found = knn_accuracies(bank_x, bank_y, query_x, query_y, num_classes=len(bank_loader.classes),
                           ks=sorted(set(clamped.values())), temperature=temperature, merge=merge)
    return {k: found[clamped[k]] for k in ks}, bank_size, len(query_y)


def knn_loaders(backend: str, train_root: str, val_root: str, bank_listing: Listing | None = None,
                **common: Any) -> tuple[EvalLoader | DaliEvalLoader, EvalLoader | DaliEvalLoader]:
    """The memory-bank (train) and query (val) eval loaders, which must have the same classes.

    Shared by the loop's online k-NN and tools/eval_knn.py. A bad folder, or two folders
    with different classes, raise `DataLayoutError`: a user error that the recipes' command
    line and the tool report in one line (exit 2), before any work. `bank_listing`: the
    train folder's images when the bank is a subset of it (`tools/eval_knn.py --subset`).
    """
    bank = build_eval_loader(backend, train_root, listing=bank_listing, **common)
    queries = build_eval_loader(backend, val_root, **common)
    if bank.classes != queries.classes:
        differ = sorted(set(bank.classes) ^ set(queries.classes))
        example = f", e.g. {differ[:3]} in only one of them" if differ else " (in another order)"
        raise DataLayoutError(f"the k-NN needs the same class folders in train ({train_root!r}) and val "
                              f"({val_root!r}); found {len(bank.classes)} and {len(queries.classes)} classes"
                              f"{example}; pass a val folder with the train folder's classes")
    return bank, queries


def split_size(loader: EvalLoader | DaliEvalLoader) -> int:
    """Images in the whole split (all ranks) of an eval loader (`EvalLoader` or `DaliEvalLoader`)."""
    return len(loader.dataset) if hasattr(loader, "dataset") else len(loader.samples)


class OnlineKnn:
    """Builds the two eval loaders once (so a bad val path, or a missing DALI, fails before training).

    `loader` is the eval backend (`pipelines.spec.EVAL_BACKENDS`, config `eval.loader`); `data`
    the run's data configuration, whose DALI options the DALI eval loader shares with training.
    """

    def __init__(self, train_root: str, val_root: str, view: EvalView, batch_size: int, accelerator: Accelerator,
                 num_workers: int, k: int = 20, temperature: float = 0.07, loader: str = "torchvision",
                 progress: bool = False, data: DataConfig | None = None):
        common = dict(view=view, batch_size=batch_size, rank=accelerator.process_index,
                      world_size=accelerator.num_processes, num_workers=num_workers, device=accelerator.device,
                      data=data)
        self.bank, self.queries = knn_loaders(loader, train_root, val_root, **common)
        self.accelerator, self.k, self.temperature, self.progress = accelerator, k, temperature, progress

    def __call__(self, backbone: torch.nn.Module, what: str = "the teacher") -> dict:
        """Top-1/top-5 of `backbone`, announced by one line (a split can take minutes); bars with `progress`."""
        bank, queries = split_size(self.bank), split_size(self.queries)
        self.accelerator.print(f"k-NN of {what} on {bank + queries} images ({bank} memory bank, {queries} queries): "
                               "extracting features...", flush=True)
        scores, _, _ = knn_scores(backbone, self.bank, self.queries, self.accelerator, [self.k], self.temperature,
                                  self.progress)
        return scores[self.k]
