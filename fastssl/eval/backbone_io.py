"""Loading an exported backbone (`backbone_<arch>.pth`) for evaluation, checked key by key.

The evaluation tools take an exported backbone (or its torchvision detection export), never a
training checkpoint: this module refuses the wrong file (checkpoint.pt, the detectron2 export,
another architecture) with a message that says what to pass instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fastssl.eval.errors import EvalError
from fastssl.models.backbone import build_backbone

__all__ = ["infer_arch", "load_backbone"]

# The classifier layer of a whole torchvision ResNet's state_dict, which an exported backbone leaves out.
CLASSIFIER_KEYS = frozenset({"fc.weight", "fc.bias"})


def infer_arch(state: dict) -> str:
    """resnet50 has bottleneck blocks (conv3); resnet18 basic blocks."""
    return "resnet50" if "layer1.0.conv3.weight" in state else "resnet18"


def _read_state(path: Path) -> dict:
    """The tensors of an exported backbone; anything else is an EvalError naming the fix."""
    if not path.is_file():
        raise EvalError(f"checkpoint {str(path)!r} does not exist; pass a run directory or a backbone_<arch>.pth")
    if path.suffix == ".pkl":  # tools/export_backbone.py's detectron2 file: numpy arrays under detectron2's names
        raise EvalError(f"{str(path)!r} is a detectron2 export (for detectron2's MODEL.WEIGHTS); evaluate the "
                        "backbone_<arch>.pth it was exported from (or its *_tv_detection.pth)")
    with path.open("rb") as f:
        head = f.read(4)
    if len(head) == 4 and not head.startswith((b"PK\x03\x04", b"\x80")):  # neither torch's zip nor a pickle
        raise EvalError(f"{str(path)!r} is not a torch file (an image, a text or JSON file?); pass a run directory "
                        "or the backbone_<arch>.pth a run exported")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickled objects (checkpoint.pt), or a file cut short
        if "Weights only load failed" in str(err):  # it unpickles to more than tensors: a training checkpoint
            raise EvalError(f"{str(path)!r} is not an exported backbone (it holds more than tensors); use the "
                            "run's backbone_<arch>.pth, not checkpoint.pt") from None
        cause = (str(err).strip().splitlines() or [""])[0].split(". ")[0]  # torch's first sentence
        raise EvalError(f"{str(path)!r} cannot be read as a torch file ({type(err).__name__}: {cause}): it is "
                        "damaged or cut short (an interrupted copy, a disk that filled while it was written); "
                        "copy it again from where it was made (a run rewrites its backbone_<arch>.pth with "
                        "each checkpoint)") from None
    if not isinstance(state, dict) or "conv1.weight" not in state:
        raise EvalError(f"{str(path)!r} is not an exported backbone (no conv1.weight); use the run's "
                        "backbone_<arch>.pth, not checkpoint.pt")
    return state


def load_backbone(path: Path, arch: str | None) -> tuple[torch.nn.Module, str]:
    """An exported backbone (torchvision keys without fc.*), checked key by key; a whole torchvision
    classifier (with fc.*) is read too, its classifier left out with a note.

    Checked before `load_state_dict` so that a mismatch is reported as "another
    architecture: pass --arch X" instead of a 100-line PyTorch key dump.
    """
    state = _read_state(Path(path))
    arch = arch or infer_arch(state)
    net = build_backbone(arch, "cifar" if state["conv1.weight"].shape[-1] == 3 else "imagenet")  # stem from conv1
    expected = net.state_dict()
    # The torchvision detection export (*_tv_detection.pth) drops BatchNorm's step counters, which
    # no evaluation reads (the BatchNorm layers have a momentum): they keep their initial value.
    state = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or wrong) and unexpected and set(unexpected) <= CLASSIFIER_KEYS:
        # a whole torchvision classifier (a supervised baseline's weights): its backbone is all the tools read
        print(f"note: {str(path)!r} is a whole classifier: its {', '.join(unexpected)} are not read (the "
              "evaluation trains its own head)", file=sys.stderr)
        state = {k: v for k, v in state.items() if k not in CLASSIFIER_KEYS}
        unexpected = []
    if missing or unexpected or wrong:
        found = infer_arch(state)  # its blocks' kind: a file of the other architecture is told to name it
        fix = (f"it is a {found}'s: pass --arch {found}" if found != arch else
               f"its blocks are a {arch}'s but its layers are not (damaged, or another network's): export it again "
               "with tools/export_backbone.py")
        raise EvalError(f"{str(path)!r} does not fit a {arch} ({len(missing)} missing keys, {len(unexpected)} "
                        f"unexpected, {len(wrong)} of another shape, e.g. {(missing + unexpected + wrong)[:2]}); {fix}")
    net.load_state_dict(state)
    return net, arch
