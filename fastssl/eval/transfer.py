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

Two solvers give the same answer (tests/test_eval_transfer.py holds them to each other):
scikit-learn's lbfgs (the reference), and `batched_lbfgs`, a PyTorch L-BFGS that fits the
whole grid of penalties at once (one matrix product per step for all of them), on the GPU
for the big datasets (Food-101: 75k x 2048 features, 101 classes, 45 penalties).

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
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision import transforms as T

from fastssl.eval.errors import EvalError
from fastssl.eval.classifier import batches_loader, extract, progress_bar
from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD
from pipelines.eval import LabelledImages
from pipelines.folder import DataLayoutError, scan_image_folder
from pipelines.images import UNREADABLE

METRICS = {"top1": "top-1 accuracy", "mean_per_class": "mean-per-class accuracy", "map11": "11-point mAP"}
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
# Ericsson's grid: wd in logspace(-6, 5, 45), C = 1 / wd.
DEFAULT_WD_VALUES = 45
HELD_OUT = 0.2  # fraction of train held out for validation where a dataset has no val split
CALTECH_TRAIN_PER_CLASS = 30


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


def _binary_columns(targets: np.ndarray, num_classes: int) -> np.ndarray | None:
    """The 0/1 columns of the independent binary problems, or None for one multinomial one.

    Multi-label targets (N x K, VOC) give K binary problems (-1, ignored, counts as 0);
    two classes give one binary problem (scikit-learn fits one weight vector there, not two).
    """
    if targets.ndim == 2:
        return (targets > 0).astype(np.float64)
    if num_classes == 2:
        return (targets == 1).astype(np.float64)[:, None]
    return None


def _as_class_scores(raw: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Binary decision values of a two-class problem as per-class scores [0, s] (argmax = class)."""
    if targets.ndim == 1 and num_classes == 2:
        return np.concatenate([np.zeros_like(raw), raw], axis=1)
    return raw


def sklearn_scores(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, cs: Sequence[float],
                   num_classes: int, max_iter: int = 1000, tol: float = 1e-4,
                   on_fitted: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Decision scores on `x_eval` of scikit-learn's L2 logistic regression, one array per C
    (`on_fitted(1)` after each C: a progress bar).

    Warm-started along the grid (as Ericsson), which changes only how fast each fit converges.
    """
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:
        raise EvalError("scikit-learn is not installed; pip install scikit-learn (the [all] extra), "
                        "or use --solver lbfgs") from err
    import warnings

    columns = _binary_columns(y_fit, num_classes)
    problems = [y_fit] if columns is None else [columns[:, k] for k in range(columns.shape[1])]
    models = [LogisticRegression(C=1.0, max_iter=max_iter, tol=tol, warm_start=True) for _ in problems]
    out = []
    for c in cs:
        raw = []
        for model, y in zip(models, problems):
            model.set_params(C=float(c))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x_fit, y)
            d = model.decision_function(x_eval)
            raw.append(d if d.ndim == 2 else d[:, None])
        out.append(_as_class_scores(np.concatenate(raw, axis=1), y_fit, num_classes))
        if on_fitted is not None:
            on_fitted(1)
    return out


def batched_lbfgs(objective: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, max_iter: int = 1000,
                  tol: float = 1e-4, history: int = 10, ftol: float = 64 * np.finfo(float).eps
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS on G independent problems at once: rows of `x0` (G x P); `objective` maps them
    to their G values. Returns (solutions, iterations of each).

    Why not torch.optim.LBFGS on the sum: one line search and one curvature history for
    problems whose penalties differ by 11 orders of magnitude converges as slowly as the
    worst of them. Here every problem has its own history, step (backtracking Armijo) and
    stopping rule, scipy's as scikit-learn uses it: max |gradient| <= tol, or a relative
    decrease of the value below ftol; the arithmetic is batched over problems.
    """

    def value_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            v = objective(x)
            (g,) = torch.autograd.grad(v.sum(), x)
        return v.detach(), g.detach()

    x = x0.detach().clone()
    v, g = value_grad(x)
    n_prob, dim = x.shape
    s_hist = x.new_zeros(n_prob, history, dim)
    y_hist = x.new_zeros(n_prob, history, dim)
    rho = x.new_zeros(n_prob, history)
    gamma = 1.0 / g.norm(dim=1).clamp_min(1.0)  # the first step: at most unit length
    active = g.abs().amax(1) > tol
    iters = torch.zeros(n_prob, dtype=torch.long)
    for k in range(max_iter):
        if not bool(active.any()):
            break
        q, alphas = g.clone(), []
        newest_first = [(k - 1 - j) % history for j in range(min(k, history))]
        for j in newest_first:
            a = rho[:, j] * (s_hist[:, j] * q).sum(1)
            q -= a[:, None] * y_hist[:, j]
            alphas.append(a)
        r = gamma[:, None] * q
        for j, a in zip(reversed(newest_first), reversed(alphas)):
            b = rho[:, j] * (y_hist[:, j] * r).sum(1)
            r += (a - b)[:, None] * s_hist[:, j]
        d = -r
        slope = (g * d).sum(1)
        uphill = slope >= 0  # cannot happen for a convex objective but for rounding: fall back to -g
        d[uphill] = -g[uphill] * gamma[uphill, None]
        slope = (g * d).sum(1)
        d[~active] = 0
        step = torch.ones_like(v)
        done = ~active
        x_new, v_new, g_new = x.clone(), v.clone(), g.clone()
        for _ in range(60):
            trial = x + step[:, None] * d
            vt, gt = value_grad(trial)
            ok = ~done & torch.isfinite(vt) & (vt <= v + 1e-4 * step * slope)
            x_new[ok], v_new[ok], g_new[ok] = trial[ok], vt[ok], gt[ok]
            done |= ok
            if bool(done.all()):
                break
            step = torch.where(done, step, step * 0.5)
        moved = done & active
        s, y = x_new - x, g_new - g
        sy = (s * y).sum(1)
        good = moved & (sy > 1e-10 * s.norm(dim=1) * y.norm(dim=1))
        slot = k % history
        s_hist[:, slot] = torch.where(good[:, None], s, 0.0)
        y_hist[:, slot] = torch.where(good[:, None], y, 0.0)
        rho[:, slot] = torch.where(good, 1.0 / sy.where(good, torch.ones_like(sy)), 0.0)
        gamma = torch.where(good, sy / (y * y).sum(1).clamp_min(1e-300), gamma)
        decrease = (v - v_new) / torch.maximum(torch.maximum(v.abs(), v_new.abs()), torch.ones_like(v))
        iters += active.long().cpu()
        x, v, g = x_new, v_new, g_new
        active = active & moved & (g.abs().amax(1) > tol) & (decrease > ftol)
    return x, iters


def _logistic_objective(x: torch.Tensor, y: torch.Tensor, binary: bool, l2: torch.Tensor, num_out: int
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """scikit-learn's objective divided by C * n (same minimiser, same scaled gradient that
    its tolerance applies to): mean loss + ||W||^2 / (2 C n), intercepts unpenalised. The
    parameters of problem g are the row params[g] = [W (num_out x D), b (num_out)] flattened."""
    n, dim = x.shape

    def objective(params: torch.Tensor) -> torch.Tensor:
        w = params[:, : num_out * dim].view(-1, num_out, dim)
        b = params[:, num_out * dim :]
        logits = torch.einsum("nd,gkd->gnk", x, w) + b[:, None, :]
        if binary:
            data = F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none").sum(2).mean(1)
        else:
            data = F.cross_entropy(logits.transpose(1, 2), y.expand(logits.shape[0], n), reduction="none").mean(1)
        return data + 0.5 * l2 * (w * w).sum((1, 2))

    return objective


def lbfgs_scores(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, cs: Sequence[float], num_classes: int,
                 max_iter: int = 1000, tol: float = 1e-4, device: torch.device | str = "cpu",
                 memory_bytes: float = 2e9, on_fitted: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """`sklearn_scores` computed by `batched_lbfgs` in float64 on `device`: the grid of C is
    fitted in chunks of as many problems as fit in about `memory_bytes` of logits and grads
    (`on_fitted(n)` after each chunk of n)."""
    device = torch.device(device)
    columns = _binary_columns(y_fit, num_classes)
    binary = columns is not None
    num_out = columns.shape[1] if binary else num_classes
    x = torch.as_tensor(x_fit, dtype=torch.float64, device=device)
    y = (torch.as_tensor(columns, dtype=torch.float64, device=device) if binary
         else torch.as_tensor(y_fit, dtype=torch.long, device=device))
    xe = torch.as_tensor(x_eval, dtype=torch.float64, device=device)
    n, dim = x.shape
    per_problem = 8 * 6 * n * num_out  # logits, probabilities and their grads, float64
    chunk = max(1, min(len(cs), int(memory_bytes // per_problem)))
    out: list[np.ndarray] = []
    for start in range(0, len(cs), chunk):
        part = torch.tensor([1.0 / (float(c) * n) for c in cs[start : start + chunk]], dtype=torch.float64,
                            device=device)
        objective = _logistic_objective(x, y, binary, part, num_out)
        params, _ = batched_lbfgs(objective, x.new_zeros(len(part), num_out * (dim + 1)), max_iter, tol)
        w = params[:, : num_out * dim].view(-1, num_out, dim)
        raw = torch.einsum("nd,gkd->gnk", xe, w) + params[:, num_out * dim :][:, None, :]
        out.extend(_as_class_scores(r, y_fit, num_classes) for r in raw.cpu().numpy())
        if on_fitted is not None:
            on_fitted(len(part))
    return out


def fit_scores(solver: str, *args, device: torch.device | str = "cpu", **kwargs) -> list[np.ndarray]:
    """Decision scores per C of the chosen solver ("sklearn" or "lbfgs")."""
    if solver == "sklearn":
        return sklearn_scores(*args, **kwargs)
    if solver == "lbfgs":
        return lbfgs_scores(*args, device=device, **kwargs)
    raise ValueError(f"unknown solver {solver!r}")


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


def transfer_transform(size: int = 224) -> T.Compose:
    """Ericsson's transform: shorter side to `size` (bicubic), centre crop, ImageNet normalisation."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class Indexed(Dataset):
    """Images `indices` of a torchvision dataset, as (image, position, position).

    The position stands in for the label (extraction then returns the positions that were
    readable; the targets are looked up by position, which also serves VOC's multi-label ones).
    """

    def __init__(self, base, indices: Sequence[int], transform):
        self.base, self.indices, self.transform = base, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        try:
            image = self.base[self.indices[j]][0]
            return self.transform(image.convert("RGB")), j, j
        except UNREADABLE as err:
            import warnings

            warnings.warn(f"skipping unreadable image {j} of {type(self.base).__name__}: {err}", stacklevel=1)
            return None


@dataclass
class Split:
    """A split's images (a Dataset of (image, position, position)) and its targets by position."""

    images: Dataset
    targets: np.ndarray


def held_out(n: int, seed: int, fraction: float = HELD_OUT) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions: Ericsson's split (np.random.seed(seed); shuffle; the first
    floor(fraction * n) are validation)."""
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    cut = int(np.floor(fraction * n))
    return order[cut:], order[:cut]


def _labels_of(ds) -> np.ndarray:
    """Class indices of a torchvision classification dataset without decoding its images."""
    for attr in ("_labels", "targets", "y"):
        if isinstance(getattr(ds, attr, None), list):
            return np.asarray(getattr(ds, attr), dtype=np.int64)
    if hasattr(ds, "_samples"):  # StanfordCars
        return np.asarray([c for _, c in ds._samples], dtype=np.int64)
    return np.asarray([ds[i][1] for i in range(len(ds))], dtype=np.int64)  # slow: decodes every image


def voc_targets(ds) -> np.ndarray:
    """N x 20 targets of a VOCDetection split: 1 a non-difficult object of the class, -1 only
    difficult ones (ignored when scoring), 0 none."""
    out = np.zeros((len(ds), len(VOC_CLASSES)), dtype=np.int64)
    for i, path in enumerate(ds.annotations):
        for obj in ET.parse(path).getroot().iter("object"):
            c = VOC_CLASSES.index(obj.findtext("name").strip())
            difficult = (obj.findtext("difficult") or "0").strip() == "1"
            if not difficult:
                out[i, c] = 1
            elif out[i, c] == 0:
                out[i, c] = -1
    return out


def _open(name: str, root: str, **kwargs):
    """The torchvision dataset, download=False; 'not found' becomes an EvalError naming the layout."""
    import torchvision.datasets as tvd

    spec = DATASETS[name]
    try:
        return getattr(tvd, spec.torchvision_class)(root, download=False, **kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        said = str(err).split(". You can use download")[0]  # download=True is not what this tool does
        raise EvalError(f"{name}: torchvision's {spec.torchvision_class} found no usable dataset under {root!r} "
                        f"({said}); "
                        f"put it there in torchvision's layout ({root}/{spec.layout}), or pass "
                        f"--folder {name}=DIR with DIR/train and DIR/test in ImageNet layout") from err


def _sun397_partition(ds, root: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the official partition 01 (Training_01.txt / Testing_01.txt) in torchvision's SUN397."""
    data_dir = Path(ds._data_dir)
    where = {"/" + p.relative_to(data_dir).as_posix(): i for i, p in enumerate(ds._image_files)}
    parts = []
    for fname in ("Training_01.txt", "Testing_01.txt"):
        path = data_dir / fname
        if not path.is_file():
            raise EvalError(f"sun397: no {path} (the official partitions); unpack Partitions.zip into {data_dir}")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        missing = [line for line in lines if line not in where]
        if missing:
            raise EvalError(f"sun397: {len(missing)} images of {fname} are not under {data_dir}, e.g. {missing[0]}")
        parts.append(np.asarray([where[line] for line in lines]))
    return parts[0], parts[1]


def _caltech_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """30 training images per class (seeded), the rest test."""
    rng = np.random.RandomState(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        train.extend(idx[:CALTECH_TRAIN_PER_CLASS])
        test.extend(idx[CALTECH_TRAIN_PER_CLASS:])
    return np.sort(train), np.sort(test)


def torchvision_splits(name: str, root: str, transform, seed: int = 0) -> tuple[dict[str, Split], int, str]:
    """(train / val / test splits, number of classes, where val came from) of one of the 11 datasets
    read by its torchvision class from `root` (download=False)."""

    def take(ds, idx, targets):
        return Split(Indexed(ds, idx, transform), targets[np.asarray(idx, dtype=np.int64)])

    def from_train(ds, labels, test_ds, test_labels):
        tr, va = held_out(len(ds), seed)
        return {"train": take(ds, tr, labels), "val": take(ds, va, labels),
                "test": take(test_ds, range(len(test_ds)), test_labels)}

    val_from = f"{HELD_OUT:.0%} of train held out (seed {seed})"
    if name in ("aircraft", "dtd", "flowers", "voc2007"):
        extra = {"aircraft": {"annotation_level": "variant"}, "voc2007": {"year": "2007"}}.get(name, {})
        key = "image_set" if name == "voc2007" else "split"
        sets = {s: _open(name, root, **{key: s}, **extra) for s in ("train", "val", "test")}
        labels = {s: (voc_targets(ds) if name == "voc2007" else _labels_of(ds)) for s, ds in sets.items()}
        splits = {s: take(ds, range(len(ds)), labels[s]) for s, ds in sets.items()}
        classes = len(VOC_CLASSES) if name == "voc2007" else len(sets["train"].classes)
        return splits, classes, "official val split"
    if name in ("cifar10", "cifar100"):
        train, test = _open(name, root, train=True), _open(name, root, train=False)
        return from_train(train, _labels_of(train), test, _labels_of(test)), len(train.classes), val_from
    if name in ("cars", "food", "pets"):
        first = "trainval" if name == "pets" else "train"
        train, test = _open(name, root, split=first), _open(name, root, split="test")
        return from_train(train, _labels_of(train), test, _labels_of(test)), len(train.classes), val_from
    if name == "caltech101":
        ds = _open(name, root, target_type="category")
        labels = _labels_of(ds)
        train_all, test = _caltech_split(labels, seed)
        tr, va = held_out(len(train_all), seed)
        return ({"train": take(ds, train_all[tr], labels), "val": take(ds, train_all[va], labels),
                 "test": take(ds, test, labels)}, len(ds.categories),
                f"{CALTECH_TRAIN_PER_CLASS} train images per class (seed {seed}), {val_from}")
    if name == "sun397":
        ds = _open(name, root)
        labels = _labels_of(ds)
        train_all, test = _sun397_partition(ds, root)
        tr, va = held_out(len(train_all), seed)
        return ({"train": take(ds, train_all[tr], labels), "val": take(ds, train_all[va], labels),
                 "test": take(ds, test, labels)}, len(ds.classes), f"partition 01, {val_from}")
    raise EvalError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")


def folder_splits(name: str, root: str, transform, seed: int = 0) -> tuple[dict[str, Split], int, str]:
    """The same from ImageNet-layout folders ROOT/train, ROOT/test and, if present, ROOT/val
    (else 20 % of train held out). Single-label only (VOC2007's multi-label needs torchvision's VOC)."""
    if spec_of(name).metric == "map11":
        raise EvalError(f"{name} is multi-label: the folder layout cannot hold it; pass --data-root with "
                        f"torchvision's {DATASETS[name].layout}")
    base = Path(root)
    try:
        train, classes = scan_image_folder(base / "train")
        test, test_classes = scan_image_folder(base / "test")
        val, val_classes = scan_image_folder(base / "val") if (base / "val").is_dir() else (None, classes)
    except DataLayoutError as err:
        raise EvalError(f"{name}: {err} (--folder {name}=DIR needs DIR/train and DIR/test, optionally DIR/val, "
                        "in ImageNet layout)") from err
    for other, split in ((test_classes, "test"), (val_classes, "val")):
        if other != classes:
            raise EvalError(f"{name}: {root}/{split} has other class folders than {root}/train "
                            f"({len(other)} vs {len(classes)}); the same classes are needed in every split")

    def make(samples):
        return Split(LabelledImages([(p, i) for i, (p, _) in enumerate(samples)], transform),
                     np.asarray([c for _, c in samples], dtype=np.int64))

    if val is None:
        tr, va = held_out(len(train), seed)
        return ({"train": make([train[i] for i in tr]), "val": make([train[i] for i in va]), "test": make(test)},
                len(classes), f"{HELD_OUT:.0%} of train held out (seed {seed})")
    return {"train": make(train), "val": make(val), "test": make(test)}, len(classes), "val folder"


def extract_split(backbone: torch.nn.Module, split: Split, batch_size: int, num_workers: int, device: torch.device,
                  progress: bool, desc: str, precision: str = "bf16") -> tuple[np.ndarray, np.ndarray]:
    """(features, targets) of a split's readable images through the frozen backbone (eval mode),
    with a progress bar: the package's `extract`, fed positions as labels."""
    n = len(split.images)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    bar = progress_bar(n, desc, progress, unit="img")
    feats, positions, valid = extract(backbone, batches_loader(split.images, batches, num_workers), n, device, bar,
                                      precision)
    if bar is not None:
        bar.close()
    return feats[valid].numpy(), split.targets[positions[valid].numpy()]


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

