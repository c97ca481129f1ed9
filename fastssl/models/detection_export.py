"""The EMA teacher's backbone as detection frameworks load it.

Two targets, because users fine-tune detectors in both (solo-learn and VISSL ship the same
two converters):

- torchvision: `fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).backbone.body`
  is an `IntermediateLayerGetter` over a ResNet without avgpool / fc whose BatchNorms are
  `FrozenBatchNorm2d` (weight, bias, running_mean, running_var; no num_batches_tracked), so
  the export is our backbone's state dict without `num_batches_tracked` (and without fc,
  which the backbone never has): it loads with strict=True.
- detectron2: the pickle its `DetectionCheckpointer` reads for a backbone ({"model": {name:
  numpy array}, "__author__": ..., "matching_heuristics": True}), with detectron2's ResNet
  names: stem.conv1.*, stem.conv1.norm.*, resK.B.convI(.norm).*, resK.B.shortcut(.norm).*
  for torchvision's layer{K-1} (the renaming of detectron2's
  tools/convert-torchvision-to-d2.py; detectron2 itself is not needed). Its config must say
  RESNETS.STRIDE_IN_1X1 False, INPUT.FORMAT "RGB" and torchvision's pixel mean / std
  (README, "Detection-ready weights").
"""

from __future__ import annotations

import re

import numpy as np
import torch

D2_CONFIG_NOTE = ("MODEL.PIXEL_MEAN [123.675, 116.28, 103.53], MODEL.PIXEL_STD [58.395, 57.12, 57.375], "
                  "MODEL.RESNETS.STRIDE_IN_1X1 False, INPUT.FORMAT RGB")
# detectron2's basic-block ResNets need their depth and a 64-channel res2 (its default: 256).
D2_BASIC_BLOCK_DEPTHS = {"resnet18": 18}


def d2_config_note(arch: str) -> str:
    """The detectron2 config keys a backbone of `arch` needs besides MODEL.WEIGHTS."""
    depth = D2_BASIC_BLOCK_DEPTHS.get(arch)
    if depth is None:
        return D2_CONFIG_NOTE
    return f"{D2_CONFIG_NOTE}, MODEL.RESNETS.DEPTH {depth}, MODEL.RESNETS.RES2_OUT_CHANNELS 64"


class ExportError(ValueError):
    """A backbone that the detection frameworks cannot take (say why and what to use)."""


def check_detection_ready(state: dict[str, torch.Tensor]) -> None:
    """The detectors' ResNets have the ImageNet stem (7x7 stride-2 conv1 + max-pool)."""
    if state["conv1.weight"].shape[-1] != 7:
        raise ExportError(f"this backbone has the CIFAR stem (conv1 {tuple(state['conv1.weight'].shape)}), which the "
                          "detectors' ResNets do not have; export a backbone trained with the ImageNet stem")


def torchvision_detection_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a detection model's `backbone.body` (FrozenBatchNorm2d: no num_batches_tracked)."""
    check_detection_ready(state)
    return {k: v.detach().clone().contiguous() for k, v in state.items()
            if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}


def detectron2_name(key: str) -> str:
    """A torchvision ResNet key under detectron2's names (convert-torchvision-to-d2.py's renaming)."""
    m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", key)
    if m is None:  # conv1 / bn1 of the stem
        rest = re.sub(r"^bn1\.", "conv1.norm.", key)
        return f"stem.{rest}"
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn([1-3])\.", r"conv\1.norm.", rest)
    rest = re.sub(r"^downsample\.0\.", "shortcut.", rest)
    rest = re.sub(r"^downsample\.1\.", "shortcut.norm.", rest)
    return f"res{stage}.{block}.{rest}"


def detectron2_checkpoint(state: dict[str, torch.Tensor], author: str = "fastssl") -> dict:
    """detectron2's backbone checkpoint layout: every tensor of the torchvision-style export,
    renamed once, as float32 numpy arrays (num_batches_tracked has no detectron2 counterpart)."""
    body = torchvision_detection_state(state)
    model: dict[str, np.ndarray] = {}
    for key, value in body.items():
        name = detectron2_name(key)
        if name in model:
            raise ExportError(f"two tensors map to detectron2's {name!r}")
        model[name] = value.float().cpu().numpy()
    return {"model": model, "__author__": author, "matching_heuristics": True}
