"""CIFAR-style ResNets (He et al. 2016, Sec. 4.2) as CRD's model zoo names them (resnet8x4, resnet32x4, ...).

Three stages of BasicBlocks on 32-px images: a 3x3 stem, then stages of n = (depth - 2) / 6
blocks at strides 1, 2, 2, global average pooling and a linear classifier. The "x4" models
widen every stage 4x: stem 32 channels, stages 64 / 128 / 256 (CRD's `resnet8x4` and
`resnet32x4`, the teacher-student pair of ML-CPC's Table 1); the plain ones use 16 / 16 / 32 / 64.
Written here from the architecture's description (not copied from CRD's code); the key
names are ours. `build_classifier` also serves torchvision's resnet18/50 (the `fastssl.models`
backbones) with a linear classifier on top, so a distillation run may mix both families.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

# arch -> (depth, (stem width, stage widths x3)); depth = 6 n + 2
CIFAR_RESNETS: dict[str, tuple[int, tuple[int, int, int, int]]] = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
TORCHVISION_ARCHS = ("resnet18", "resnet50")
CLASSIFIER_ARCHS = tuple(CIFAR_RESNETS) + TORCHVISION_ARCHS


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:  # the shape changes: project the shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """Backbone only: `forward` returns the pooled features (`feature_dim` wide)."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int]):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        blocks = (depth - 2) // 6
        stem, *stages = widths
        self.conv1 = nn.Conv2d(3, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        layers, in_ch = [], stem
        for i, width in enumerate(stages):
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(in_ch, width, 2 if (i > 0 and b == 0) else 1))
                in_ch = width
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)  # 8x8 at 32 px; adaptive, so other sizes work too
        self.feature_dim = in_ch
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.pool(x), 1)


class Classifier(nn.Module):
    """backbone + linear classifier; `forward` returns (logits, pooled features).

    The features are what distillation's embedding heads read (CRD's penultimate layer)."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.backbone(x)
        return self.fc(feats), feats


def build_classifier(arch: str, num_classes: int, stem: str = "cifar") -> Classifier:
    """A randomly initialised classifier; `stem` applies to the torchvision ResNets only."""
    if arch in CIFAR_RESNETS:
        depth, widths = CIFAR_RESNETS[arch]
        return Classifier(CifarResNet(depth, widths), num_classes)
    if arch in TORCHVISION_ARCHS:
        from fastssl.models.backbone import build_backbone

        return Classifier(build_backbone(arch, stem), num_classes)
    raise ValueError(f"unknown classifier architecture {arch!r}; choose one of {', '.join(CLASSIFIER_ARCHS)}")
