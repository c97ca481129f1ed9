"""Networks: torchvision backbone, projector, cosine prototypes, EMA teacher."""

from fastssl.models.backbone import build_backbone
from fastssl.models.ema import ema_update, make_teacher, unwrap
from fastssl.models.heads import CosinePrototypes, build_projector
from fastssl.models.network import MiraNetwork

__all__ = ["MiraNetwork", "CosinePrototypes", "build_backbone", "build_projector", "make_teacher", "ema_update", "unwrap"]
