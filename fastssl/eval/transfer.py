"""Linear transfer to the 11 datasets of MIRA's Table 5 (the protocol of Ericsson et al. 2021).

What the protocol is (Ericsson et al., "How well do self-supervised models transfer?",
CVPR 2021, their linear.py; MIRA Sec. 4.2 "Transfer learning"):

- frozen backbone in eval mode, pooled features (2048-d for ResNet-50) of images resized to
  224 (bicubic, shorter side) and centre-cropped to 224, ImageNet normalisation;
- multinomial logistic regression with an L2 penalty (scikit-learn's objective:
  C * sum of losses + ||W||^2 / 2, intercept not penalised), the penalty wd = 1 / C searched
  over logspace(-6, 5, 45) on a validation split: the dataset's own where it has one
  (Aircraft, DTD, Flowers, VOC2007), else 20 % of the training set held out (numpy seed 0,
  shuffled indices, the first 20 % are validation: Ericsson's split exactly);
- refit with the best wd on train + val, scored on test;
- metrics: top-1 (Food, CIFAR-10/100, SUN397, Cars, DTD), mean-per-class accuracy
  (Aircraft, Pets, Caltech-101, Flowers), 11-point mAP (VOC2007; one binary classifier per
  class, as Ericsson).

How: the splits and features in `transfer_data.py`, the two solvers (scikit-learn's lbfgs and a
batched PyTorch L-BFGS) in `transfer_solvers.py`; the grid search, metrics and table here.

Where this differs from Ericsson's code, on purpose or by necessity (README says so too):
both solvers run to convergence (tolerance 1e-4, up to 1000 iterations) where Ericsson ran
scikit-learn's default 100 iterations with warm starts along the grid; the 11-point AP is
the VOC devkit's (max precision at recall >= t over the ranked list) without the extra
(recall 0, precision 1) point that scikit-learn's precision_recall_curve appends; VOC
images whose only objects of a class are "difficult" are ignored for that class when
scoring (devkit rule) and count as negatives in training; torchvision's Caltech101 has
101 categories (no BACKGROUND_Google), split 30 training images per class (seeded), the
rest test; SUN397 uses the official partition 01 (Training_01.txt / Testing_01.txt); a
binary problem (each VOC class) is fitted as one binary logistic regression, where Ericsson's
`multi_class="multinomial"` fitted a 2-class softmax, which is the same model with C doubled:
our grid's best wd sits at half of theirs (0.3 of a decade, the grid's step is 0.25), and the
search over the grid absorbs it (scikit-learn >= 1.7 no longer has `multi_class`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fastssl.eval.classifier import progress_bar
from fastssl.eval.errors import EvalError
from fastssl.eval.transfer_solvers import fit_scores

METRICS = {"top1": "top-1 accuracy", "mean_per_class": "mean-per-class accuracy", "map11": "11-point mAP"}
# Ericsson's grid: wd in logspace(-6, 5, 45), C = 1 / wd.
DEFAULT_WD_VALUES = 45
MAX_WD_VALUES = 1000  # a fit per value and dataset: 1e8 of them ran for minutes without a word


@dataclass(frozen=True)
class Spec:
    """One column of Table 5: its title, metric, torchvision class and where that class looks."""

    title: str
    metric: str
    torchvision_class: str
    layout: str  # what torchvision expects under --data-root (for the error message)
    has_val: bool


# In the paper's column order (Table 5).
DATASETS: dict[str, Spec] = {
    "aircraft": Spec("Aircraft", "mean_per_class", "FGVCAircraft", "fgvc-aircraft-2013b/", True),
    "caltech101": Spec("Caltech101", "mean_per_class", "Caltech101", "caltech101/101_ObjectCategories/", False),
    "cars": Spec("Cars", "top1", "StanfordCars", "stanford_cars/ (devkit/, cars_train/, cars_test/, "
                 "cars_test_annos_withlabels.mat)", False),
    "cifar10": Spec("CIFAR10", "top1", "CIFAR10", "cifar-10-batches-py/", False),
    "cifar100": Spec("CIFAR100", "top1", "CIFAR100", "cifar-100-python/", False),
    "dtd": Spec("DTD", "top1", "DTD", "dtd/dtd/ (images/, labels/)", True),
    "flowers": Spec("Flowers", "mean_per_class", "Flowers102", "flowers-102/ (jpg/, imagelabels.mat, setid.mat)",
                    True),
    "food": Spec("Food", "top1", "Food101", "food-101/ (images/, meta/)", False),
    "pets": Spec("Pets", "mean_per_class", "OxfordIIITPet", "oxford-iiit-pet/ (images/, annotations/)", False),
    "sun397": Spec("SUN397", "top1", "SUN397", "SUN397/ (ClassName.txt, Training_01.txt, Testing_01.txt, a/...)",
                   False),
    "voc2007": Spec("VOC2007", "map11", "VOCDetection", "VOCdevkit/VOC2007/ (trainval and test extracted together)",
                    True),
}


def spec_of(name: str) -> Spec:
    """The Table 5 dataset's spec, or that of a user's own ImageNet-layout dataset (top-1)."""
    return DATASETS.get(name) or Spec(name, "top1", "", "", False)


def parse_dataset_names(text: str) -> list[str]:
    """'all' or a comma-separated subset of DATASETS, returned in the paper's column order."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return list(DATASETS)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise EvalError(f"unknown dataset {unknown[0]!r}; choose from {', '.join(DATASETS)} (or all)")
    return [n for n in DATASETS if n in names]


def penalty_grid(n: int = DEFAULT_WD_VALUES) -> list[float]:
    """Ericsson's weight-decay grid wd = logspace(-6, 5, n) (C = 1 / wd), in float64."""
    return [float(w) for w in np.logspace(-6, 5, n)]


# --------------------------------------------------------------------------- metrics


def top1_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Percent of rows whose highest score is the label."""
    return 100.0 * float(np.mean(np.asarray(scores).argmax(1) == np.asarray(labels)))


def mean_per_class_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in `labels` of the per-class recall, in percent
    (the diagonal of the confusion matrix over its row sums, averaged, as Ericsson)."""
    pred, labels = np.asarray(scores).argmax(1), np.asarray(labels)
    classes = np.unique(labels)
    return 100.0 * float(np.mean([np.mean(pred[labels == c] == c) for c in classes]))


def voc11_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """PASCAL VOC 2007's 11-point interpolated AP of one class.

    `targets`: 1 positive, 0 negative, -1 ignored (an image with only "difficult" objects of
    the class). The ranked list is cut at every distinct score (tied scores enter together);
    for each recall level t in 0, 0.1, ..., 1 the largest precision at recall >= t counts,
    0 when that recall is never reached; the AP is their mean.
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    keep = targets >= 0
    scores, positive = scores[keep], targets[keep] > 0
    n_pos = int(positive.sum())
    if n_pos == 0:
        raise ValueError("the AP of a class without positives is undefined")
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    tp, fp = np.cumsum(positive), np.cumsum(~positive)
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # a threshold takes all tied scores
    recall, precision = tp[last_of_tie] / n_pos, tp[last_of_tie] / (tp + fp)[last_of_tie]
    points = [precision[recall >= t].max() if np.any(recall >= t) else 0.0 for t in np.linspace(0, 1, 11)]
    return float(np.mean(points))


def voc11_map(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes (columns) of `voc11_average_precision`, in percent."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    return 100.0 * float(np.mean([voc11_average_precision(scores[:, c], targets[:, c])
                                  for c in range(targets.shape[1])]))


def score(metric: str, scores: np.ndarray, targets: np.ndarray) -> float:
    """The dataset's metric (a key of METRICS) of decision scores against targets."""
    if metric == "top1":
        return top1_accuracy(scores, targets)
    if metric == "mean_per_class":
        return mean_per_class_accuracy(scores, targets)
    if metric == "map11":
        return voc11_map(scores, targets)
    raise ValueError(f"unknown metric {metric!r}")


# --------------------------------------------------------------------------- solvers


def search_and_test(features: dict[str, np.ndarray], targets: dict[str, np.ndarray], metric: str, num_classes: int,
                    solver: str, wds: Sequence[float], device: torch.device | str = "cpu", max_iter: int = 1000,
                    tol: float = 1e-4, progress: bool = False, desc: str = "") -> dict:
    """The protocol's fit: the grid on train -> val, the best wd (first of the ties) refitted on
    train + val, scored on test. `features` / `targets` have keys train, val, test. `progress`:
    a bar counting the fits (one per wd, then the refit; minutes on a CPU)."""
    cs = [1.0 / w for w in wds]
    bar = progress_bar(len(cs) + 1, f"{desc} fits".strip(), progress, unit="fit")
    on_fitted = bar.update if bar is not None else None
    start = time.perf_counter()
    try:
        val_scores = [score(metric, s, targets["val"]) for s in
                      fit_scores(solver, features["train"], targets["train"], features["val"], cs, num_classes,
                                 max_iter=max_iter, tol=tol, device=device, on_fitted=on_fitted)]
        best = int(np.argmax(val_scores))
        search_s = time.perf_counter() - start
        x_all = np.concatenate([features["train"], features["val"]])
        y_all = np.concatenate([targets["train"], targets["val"]])
        (test_scores,) = fit_scores(solver, x_all, y_all, features["test"], [cs[best]], num_classes,
                                    max_iter=max_iter, tol=tol, device=device, on_fitted=on_fitted)
    finally:
        if bar is not None:
            bar.close()
    return {"score": round(score(metric, test_scores, targets["test"]), 3), "best_wd": wds[best], "best_C": cs[best],
            "val_score": round(val_scores[best], 3), "val_scores": [round(v, 3) for v in val_scores],
            "seconds": {"search": round(search_s, 2), "refit": round(time.perf_counter() - start - search_s, 2)}}


# --------------------------------------------------------------------------- data


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    """Table 5's layout: one row per model, the 11 columns in the paper's order and avg.;
    '–' for a dataset not evaluated; avg. over the evaluated ones of the 11 (of all 11 only
    when complete). A user's own datasets (--folder NAME=DIR) come after avg., outside it."""
    cols = list(DATASETS)
    extra = sorted({n for scores in rows.values() for n in scores if n not in DATASETS})
    header = "| model | " + " | ".join(DATASETS[c].title for c in cols) + " | avg. |"
    header += "".join(f" {n} |" for n in extra)
    lines = [header, "|" + "---|" * (len(cols) + 2 + len(extra))]
    for model, scores in rows.items():
        values = [scores.get(c) for c in cols]
        done = [v for v in values if v is not None]
        avg = f"{sum(done) / len(done):.2f}" if done else "–"
        if done and len(done) < len(cols):
            avg += f" ({len(done)} of {len(cols)})"
        cells = [f"{v:.2f}" if v is not None else "–" for v in values]
        own = "".join(f" {scores[n]:.2f} |" if n in scores else " – |" for n in extra)
        lines.append(f"| {model} | " + " | ".join(cells) + f" | {avg} |" + own)
    return "\n".join(lines) + "\n"


def metric_note() -> str:
    """The metric of each column, as Table 5's caption."""
    by = {m: [DATASETS[n].title for n in DATASETS if DATASETS[n].metric == m] for m in METRICS}
    return "; ".join(f"{METRICS[m]}: {', '.join(v)}" for m, v in by.items()) + "."
