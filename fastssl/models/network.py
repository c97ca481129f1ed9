"""Backbone + projector + prototypes, with the multi-crop forward."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from fastssl.models.backbone import build_backbone
from fastssl.models.heads import CosinePrototypes, build_projector


class MiraNetwork(nn.Module):
    """Encoder f, projector g and prototypes h: logits = h(normalize(g(f(x))))."""

    def __init__(self, arch: str, proj_hidden_dim: int = 2048, proj_dim: int = 256, num_prototypes: int = 3000):
        super().__init__()
        self.backbone = build_backbone(arch)
        self.projector = build_projector(self.backbone.feature_dim, proj_hidden_dim, proj_dim)
        self.prototypes = CosinePrototypes(proj_dim, num_prototypes)

    def encode(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Backbone features of all views, one forward per run of equal resolution.

        Batching the 2 global views together and the 6 local views together keeps BN
        statistics over many samples and launches two forwards instead of eight.
        """
        feats = []
        for _, group in itertools.groupby(views, key=lambda v: tuple(v.shape[-2:])):
            feats.append(self.backbone(torch.cat(list(group))))
        return torch.cat(feats)

    def head(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2-normalised projection, prototype logits = cosine similarities)."""
        z = F.normalize(self.projector(feats), dim=1)
        return z, self.prototypes(z)

    def forward(self, views: list[torch.Tensor], with_embeddings: bool = False):
        """Prototype logits per view, in the order of `views` (each B x K); with
        `with_embeddings`, also the L2-normalised projections per view (each B x d), which
        the ML-CPC critic scores."""
        z, logits = self.head(self.encode(views))
        if with_embeddings:
            return list(logits.chunk(len(views))), list(z.chunk(len(views)))
        return list(logits.chunk(len(views)))
