"""torchvision ResNet backbones whose state dicts stay torchvision-compatible.

The classifier is replaced by `Identity`, so the exported state dict has exactly the
torchvision keys minus `fc.*` and loads into `torchvision.models.resnet50()` with
`strict=False` reporting only the `fc` weights as missing.

The "cifar" stem (for 32-px images, as the ML-CPC authors' CIFAR runs) replaces `conv1` by
a 3x3 stride-1 convolution and `maxpool` by `Identity`: the keys do not change, only
`conv1.weight`'s shape (64 x 3 x 3 x 3), so the export loads into a torchvision ResNet
given the same two changes (`cifar_stem(torchvision.models.resnet18())`).
"""

from __future__ import annotations

import torchvision
from torch import nn

FEATURE_DIMS = {"resnet18": 512, "resnet50": 2048}


def cifar_stem(net: nn.Module) -> nn.Module:
    """3x3 stride-1 conv1 and no max-pool: 32-px images keep a 32 x 32 map into layer1."""
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def build_backbone(arch: str, stem: str = "imagenet", zero_init_residual: bool = True) -> nn.Module:
    """A randomly initialised ResNet, by default with zero-init residual branches (MIRA's authors';
    MoCo's and ML-CPC's code keep torchvision's / PyTorch's default, `zero_init_residual=False`).

    `arch` and `stem` come validated (model.arch/stem in the config, --arch choices in the
    tools); the lookups still fail loudly on any other name.
    """
    feature_dim, change_stem = FEATURE_DIMS[arch], {"imagenet": None, "cifar": cifar_stem}[stem]
    net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual)
    if change_stem is not None:
        change_stem(net)
    net.fc = nn.Identity()
    net.feature_dim = feature_dim
    return net
