"""The teacher format: a trained classifier as one file, so that any distillation run (a CE-only
run is the supervised teacher trainer) can teach the next one.

`classifier.pt`, torch.save of a dict: {"format": "fastssl-classifier/1", "arch": str,
"num_classes": int, "stem": str, "state_dict": the Classifier's state dict}.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastssl import checkpoint as ckpt
from fastssl.config import ConfigError
from fastssl.models.cifar_resnet import CLASSIFIER_ARCHS, Classifier, build_classifier

CLASSIFIER_FORMAT = "fastssl-classifier/1"
CLASSIFIER_NAME = "classifier.pt"


def save_classifier(model: Classifier, arch: str, num_classes: int, stem: str, path: Path) -> None:
    """The teacher format, written atomically."""
    ckpt.atomic_save({"format": CLASSIFIER_FORMAT, "arch": arch, "num_classes": num_classes, "stem": stem,
                      "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


def load_teacher(path: str, num_classes: int) -> tuple[Classifier, str]:
    """The frozen teacher (eval mode, no gradients) and its arch; clear errors for bad files. `path` is
    the teacher's file or the run directory that wrote it (its CLASSIFIER_NAME)."""
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / CLASSIFIER_NAME).is_file():
            raise FileNotFoundError(f"model.teacher: {str(p)!r} is a folder without a {CLASSIFIER_NAME}; pass the "
                                    f"directory of a teacher run that finished an epoch, or the teacher's file")
        p = p / CLASSIFIER_NAME
    if not p.is_file():
        raise FileNotFoundError(f"model.teacher: no teacher checkpoint at {str(p)!r}; train one first (a run "
                                f"with --loss.kd_weight 0 --loss.mi_weight 0 writes RUN_DIR/{CLASSIFIER_NAME}) "
                                f"and pass its path")
    try:
        data = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as err:  # any unreadable file: the user's input, reported, not a traceback
        raise ConfigError(f"model.teacher: {str(p)!r} cannot be read ({type(err).__name__}); "
                          f"pass a {CLASSIFIER_NAME} written by this trainer") from None
    if (not isinstance(data, dict) or data.get("format") != CLASSIFIER_FORMAT
            or data.get("arch") not in CLASSIFIER_ARCHS):
        raise ConfigError(f"model.teacher: {str(p)!r} is not a teacher checkpoint (format {CLASSIFIER_FORMAT!r} "
                          f"with a known arch); pass a {CLASSIFIER_NAME} written by this trainer")
    classes = data.get("num_classes")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:  # a damaged or edited file
        raise ConfigError(f"model.teacher: {str(p)!r} records {classes!r} as its number of classes, not a count; "
                          f"pass a {CLASSIFIER_NAME} written by this trainer")
    if data["num_classes"] != num_classes:
        raise ConfigError(f"model.teacher: the teacher predicts {data['num_classes']} classes, the data has "
                          f"{num_classes}; use a teacher trained on the same dataset")
    teacher = build_classifier(data["arch"], data["num_classes"], data.get("stem", "cifar"))
    try:
        teacher.load_state_dict(data["state_dict"])
    except (RuntimeError, KeyError, TypeError) as err:  # keys or shapes do not fit the named arch
        raise ConfigError(f"model.teacher: {str(p)!r} does not hold a {data['arch']} for {num_classes} classes "
                          f"({str(err).splitlines()[0][:120]}); pass a {CLASSIFIER_NAME} written by this "
                          f"trainer") from None
    broken = [name for name, t in teacher.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if broken:  # every loss term it feeds would be NaN from the first step
        raise ConfigError(f"model.teacher: {str(p)!r} holds weights that are not finite ({broken[0]}"
                          f"{f' and {len(broken) - 1} more' if len(broken) > 1 else ''}): a diverged run's? "
                          f"Pass a teacher that trained well")
    teacher.eval().requires_grad_(False)
    return teacher, data["arch"]
