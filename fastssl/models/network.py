"""Backbone + projector + prototypes, with the multi-crop forward."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from fastssl.models.backbone import build_backbone
from fastssl.models.heads import CosinePrototypes, at_least_float32, build_moco_head, build_projector
from fastssl.models.per_view_bn import convert_to_per_view, set_rows_per_view


class MiraNetwork(nn.Module):
    """Encoder f, projector g and prototypes h: logits = h(normalize(g(f(x))))."""

    def __init__(self, arch: str, proj_hidden_dim: int = 2048, proj_dim: int = 256, num_prototypes: int = 3000,
                 bn_stats: str = "per_view", sync_bn: bool = True, head: str = "mira", stem: str = "imagenet",
                 zero_init_residual: bool = True):
        """`bn_stats`: "per_view" normalises every view with its own batch statistics, as the
        authors' one-forward-per-view code does (over the global batch when `sync_bn` and a
        process group exist); "per_forward" normalises all views of one forward together.
        `head`: "mira" (BN projector) or "moco" (Linear-ReLU-Linear with biases, no BN);
        `stem`: "imagenet" or "cifar" (3x3 stride-1 conv1, no max-pool); `zero_init_residual`: each
        residual branch's last BatchNorm starts at 0 (MIRA's authors) or 1 (MoCo's)."""
        super().__init__()
        # The names are validated with the config (model.*); a lookup still fails loudly on any other.
        per_view = {"per_view": True, "per_forward": False}[bn_stats]
        self.bn_stats = bn_stats
        self.backbone = build_backbone(arch, stem, zero_init_residual)
        build_head = {"mira": build_projector, "moco": build_moco_head}[head]
        self.projector = build_head(self.backbone.feature_dim, proj_hidden_dim, proj_dim)
        self.prototypes = CosinePrototypes(proj_dim, num_prototypes)
        if per_view:
            convert_to_per_view(self, sync=sync_bn)
        self._rows_per_view: int | None = None  # what the per-view BatchNorms were last told

    def encode(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Backbone features of all views, one forward per run of equal resolution.

        Two forwards instead of eight: with per-view BatchNorm each view is still
        normalised on its own, so this only saves launches and small-batch inefficiency.
        """
        feats = []
        for _, group in itertools.groupby(views, key=lambda v: tuple(v.shape[-2:])):
            feats.append(self.backbone(torch.cat(list(group))))
        return torch.cat(feats)

    def head(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2-normalised projection, prototype logits = cosine similarities), both in float32 or
        better (the projection as the projector computed it, normalised in float32 under autocast)."""
        z = F.normalize(at_least_float32(self.projector(feats)), dim=1)
        return z, self.prototypes(z)

    def forward(self, views: list[torch.Tensor], with_embeddings: bool = False
                ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Prototype logits per view, in the order of `views` (each B x K); with
        `with_embeddings`, also the L2-normalised projections per view (each B x d), which
        the ML-CPC critic scores. Every view must have the same batch size."""
        rows = views[0].shape[0]
        # Eagerly, the walk over every module (~0.2 ms of host time) runs once per batch size, not at every
        # forward; torch.compile traces it into the graph instead (a cached value read there would be guarded
        # on, and its first change would compile the whole network again).
        if self.bn_stats == "per_view" and (torch.compiler.is_compiling() or rows != self._rows_per_view):
            set_rows_per_view(self, rows)
            self._rows_per_view = rows
        z, logits = self.head(self.encode(views))
        if with_embeddings:
            return list(logits.chunk(len(views))), list(z.chunk(len(views)))
        return list(logits.chunk(len(views)))
