"""The projector and the weight-normalised prototypes (MIRA Sec. 4.1 and the authors' code)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def build_projector(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(no bias)-BN-ReLU-Linear(no bias)-BN-ReLU-Linear, as the authors' head.

    The L2 normalisation of the output happens in `MiraNetwork.head`, so that the
    projector's output can also serve other objectives (ML-CPC keys).
    """
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim, bias=False),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def build_moco_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear(bias)-ReLU-Linear(bias), no BN: MoCo-v2's MLP head (`--mlp`, `--moco-dim`),
    which the ML-CPC authors' MoCo code uses. Also L2-normalised in `MiraNetwork.head`."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class CosinePrototypes(nn.Module):
    """Weight-normalised Linear(d, K, no bias) with the norm fixed at 1.

    Identical to `weight_norm(Linear)` with `weight_g` frozen at 1: each prototype is
    used as a unit vector, so logits are cosine similarities in [-1, 1] and the
    temperatures (0.1, 0.225) have a fixed meaning.
    """

    def __init__(self, dim: int, num_prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_prototypes, dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's default init

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Cosines in float32, even under autocast: in bf16 the cosines near 1 are 0.004 apart,
        0.04 after the student's 1 / tau_s (0.0005 in the authors' fp16). The matmul is small
        (d = 256) next to the backbone."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            return F.linear(at_least_float32(z), F.normalize(at_least_float32(self.weight), dim=1))


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """bf16 / fp16 (autocast's) as float32; float32 and float64 as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
