"""torchvision ResNet backbones whose state dicts stay torchvision-compatible.

The classifier is replaced by `Identity`, so the exported state dict has exactly the
torchvision keys minus `fc.*` and loads into `torchvision.models.resnet50()` with
`strict=False` reporting only the `fc` weights as missing.
"""

from __future__ import annotations

import torchvision
from torch import nn

FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048}


def build_backbone(arch: str) -> nn.Module:
    """A randomly initialised ResNet with zero-init residual branches (as the authors)."""
    if arch not in FEATURE_DIMS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(FEATURE_DIMS)}")
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=True)
    net.fc = nn.Identity()
    net.feature_dim = FEATURE_DIMS[arch]
    return net
