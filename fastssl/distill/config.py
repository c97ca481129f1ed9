"""Typed configuration of a distillation run; same conventions as `fastssl.config`.

Every field is overridable as `--section.field VALUE` (parsed by `fastssl.overrides.apply_overrides`,
help from the comment beside each field via `fastssl.cli.usage`); `config_errors` lists every
invalid value before any work starts. Defaults are CRD's CIFAR-100 setting (Tian et al. 2020,
train_student.py of their RepDistiller code and its README), which ML-CPC Sec. 5.2 keeps
"identical to the CRD ones" while replacing CRD's NCE objective by alpha-(ML-)CPC.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from fastssl.arg_types import MAX_SEED
from fastssl.config import MAX_WIDTH, STEMS, ConfigError, non_finite_errors, positive_number
from pipelines.augment import MAX_CROP, MIN_CROP

SOURCES = ("cifar100", "cifar10", "folder")
NEGATIVES = ("memory", "queue")  # DistillLossConfig.negatives


@dataclass
class DistillDataConfig:
    """Labelled images: torchvision's CIFAR on-disk format (never downloaded) or ImageNet-layout folders."""

    source: str = "cifar100"  # cifar100 | cifar10 (torchvision's files under data.root) | folder (data.train/val)
    root: str = ""  # cifar: the folder holding cifar-100-python/ (or cifar-10-batches-py/); nothing is downloaded
    train: str = ""  # folder: ImageNet layout train/<class>/<image>
    val: str = ""  # folder: same layout, same classes; the top-1 is measured on it
    image_size: int = 32  # folder: images resized to this (CIFAR: 32 already)
    num_workers: int = 2  # DataLoader worker processes (0 = load in the main process)


@dataclass
class DistillModelConfig:
    """Student, frozen teacher and the linear embedding heads (CRD's Embed: Linear, then L2 norm)."""

    # student architecture: resnet8x4 | resnet32x4 | resnet8 ... resnet110 (CIFAR) | resnet18 | resnet50
    student: str = "resnet8x4"
    teacher: str = ""  # teacher: the classifier.pt of a run of this trainer, or its run dir; "" = none (CE only)
    embed_dim: int = 128  # width of both linear embedding heads (CRD's feat_dim)
    stem: str = "cifar"  # torchvision ResNets only: cifar (3x3 stem, 32 px) | imagenet


@dataclass
class DistillLossConfig:
    """gamma CE + alpha_KD KD - beta J_alpha: weights are CRD's own objective (-r 1 -a 0 -b 0.8), whose
    NCE ML-CPC replaces: the CRD rows of ML-CPC's Tables 1-2 are CRD's without KD (its "CRD+KD" run,
    -a 1, is `--loss.kd_weight 1`)."""

    ce_weight: float = 1.0  # gamma: cross-entropy with the labels (CRD -r 1)
    kd_weight: float = 0.0  # Hinton KD weight (CRD -a 0; CRD+KD -a 1; CRD's plain KD run: -r 0.1 -a 0.9); 0 = off
    kd_temperature: float = 4.0  # KD softmax temperature T (CRD kd_T 4)
    mi_weight: float = 0.8  # beta: weight of -J_alpha, the (ML-)CPC bound (CRD -b 0.8); 0 = off
    bound: str = "mlcpc"  # mlcpc (alpha-ML-CPC, J_alpha, Eq. 6) | cpc (alpha-CPC, L_alpha, Eq. 4)
    alpha: float = 0.05  # fixed alpha (ML-CPC Table 1: J_0.05 / J_0.01; alpha_min(64, 16384) ~ 0.0156)
    temperature: float = 0.07  # critic temperature tau of <s, t> / tau (CRD nce_t 0.07)
    # memory (CRD's, the authors': each image's own entry of the other network's memory is the positive,
    # queue_size entries of other classes the negatives) | queue (FIFO queues of the latest embeddings)
    negatives: str = "memory"
    queue_size: int = 16384  # negatives per query (CRD nce_k 16384): memory draws, or the queue's length


@dataclass
class DistillOptimConfig:
    """SGD with step decay (CRD: lr 0.05, x0.1 at epochs 150, 180, 210 of 240, wd 5e-4, momentum 0.9)."""

    lr: float = 0.05  # learning rate (CRD: 0.05; 0.01 for ShuffleNet / MobileNet students)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 weight decay on every parameter (as CRD)
    decay_epochs: str = "150,180,210"  # comma-separated epochs at which lr is multiplied by decay_rate ("" = none)
    decay_rate: float = 0.1  # lr factor at each decay epoch


@dataclass
class DistillTrainConfig:
    """The loop: batch, length, device, checkpoints, logs."""

    run_dir: str = "runs/distill"  # logs, checkpoint.pt and classifier.pt (the student, teacher format)
    epochs: int = 240  # training epochs (CRD: 240)
    batch_size: int = 64  # images per step (CRD: 64, so n = 64 and m = 16385 in ML-CPC's alpha_min)
    seed: int = 0  # random seed (initialisation, data order, augmentations)
    cpu: bool = False  # force the CPU even when a GPU is present
    steps_per_epoch: int = 0  # cap steps per epoch (smoke tests); 0 = the whole epoch
    log_every: int = 50  # steps between train_log.csv rows
    checkpoint_every: int = 1  # epochs between resumable checkpoints
    eval_every: int = 10  # epochs between top-1 evaluations on the val/test split (the last epoch always)


@dataclass
class DistillConfig:
    """The whole distillation (or, without a teacher, supervised) run."""

    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    model: DistillModelConfig = field(default_factory=DistillModelConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    optim: DistillOptimConfig = field(default_factory=DistillOptimConfig)
    train: DistillTrainConfig = field(default_factory=DistillTrainConfig)


def decay_epochs(text: str) -> list[int]:
    """"150,180,210" -> [150, 180, 210]; raises ConfigError on anything else."""
    try:
        return sorted(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"optim.decay_epochs: cannot read {text!r}; give comma-separated epochs, "
                          f"e.g. 150,180,210") from None


def config_errors(cfg: DistillConfig) -> list[str]:
    """Every invalid value as `section.field: problem; fix`. Pure: touches no files."""
    from fastssl.losses import BOUNDS  # registries beside torch code: imported here, not for `--help`
    from fastssl.models.cifar_resnet import CLASSIFIER_ARCHS

    e: list[str] = []
    d, m, lo, o, t = cfg.data, cfg.model, cfg.loss, cfg.optim, cfg.train
    if d.source not in SOURCES:
        e.append(f"data.source: unknown {d.source!r}; choose one of {', '.join(SOURCES)}")
    if d.source.startswith("cifar") and not d.root:
        e.append(f"data.root: no CIFAR folder given; pass --data.root /path/holding/"
                 f"{'cifar-100-python' if d.source == 'cifar100' else 'cifar-10-batches-py'}")
    if d.source == "folder" and not (d.train and d.val):
        e.append("data.train/data.val: the folder source needs both; pass --data.train DIR --data.val DIR "
                 "(ImageNet layout: <class>/<image>)")
    if not MIN_CROP <= d.image_size <= MAX_CROP:
        e.append(f"data.image_size: must lie in [{MIN_CROP}, {MAX_CROP}] pixels, got {d.image_size}")
    if d.num_workers < 0:
        e.append(f"data.num_workers: must be >= 0 (0: load in the main process), got {d.num_workers}")
    for name in ("student",):
        if getattr(m, name) not in CLASSIFIER_ARCHS:
            e.append(f"model.{name}: unknown {getattr(m, name)!r}; choose one of {', '.join(CLASSIFIER_ARCHS)}")
    if m.stem not in STEMS:
        e.append(f"model.stem: unknown {m.stem!r}; choose one of {', '.join(STEMS)}")
    if not 1 <= m.embed_dim <= MAX_WIDTH:
        e.append(f"model.embed_dim: must lie in [1, {MAX_WIDTH}], got {m.embed_dim}")
    for name in ("ce_weight", "kd_weight", "mi_weight"):
        value = getattr(lo, name)
        if not (math.isfinite(value) and value >= 0):
            e.append(f"loss.{name}: must be a finite number >= 0, got {value}")
    if (lo.kd_weight > 0 or lo.mi_weight > 0) and not m.teacher:
        e.append("model.teacher: KD and the ML-CPC term need a teacher; pass --model.teacher "
                 "RUN/classifier.pt, or set --loss.kd_weight 0 --loss.mi_weight 0 to train with labels only")
    if lo.ce_weight + lo.kd_weight + lo.mi_weight == 0:
        e.append("loss.*_weight: all weights are 0, nothing would be trained; set at least one > 0")
    for name in ("kd_temperature", "temperature"):
        if not positive_number(getattr(lo, name)):
            e.append(f"loss.{name}: temperatures must be positive and finite, got {getattr(lo, name)}")
    if lo.bound not in BOUNDS:
        e.append(f"loss.bound: unknown {lo.bound!r}; choose one of {', '.join(BOUNDS)}")
    if lo.negatives not in NEGATIVES:
        e.append(f"loss.negatives: unknown {lo.negatives!r}; choose one of {', '.join(NEGATIVES)}")
    if lo.queue_size < 1:
        e.append(f"loss.queue_size: must be positive, got {lo.queue_size}")
    elif not 0 < lo.alpha <= lo.queue_size + 1:
        e.append(f"loss.alpha: must lie in (0, m] with m = queue_size + 1 = {lo.queue_size + 1}, got {lo.alpha}")
    for name in ("lr", "momentum", "weight_decay", "decay_rate"):
        value = getattr(o, name)
        if not (math.isfinite(value) and value >= 0):
            e.append(f"optim.{name}: must be a finite number >= 0, got {value}")
    if math.isfinite(o.momentum) and o.momentum >= 1:  # a velocity that never decays: the updates grow
        e.append(f"optim.momentum: must lie in [0, 1), got {o.momentum}; CRD's is 0.9")
    try:
        decay_epochs(o.decay_epochs)
    except ConfigError as err:
        e.append(str(err))
    if t.batch_size < 2:
        e.append(f"train.batch_size: must be >= 2, got {t.batch_size}")
    if not 0 <= t.seed <= MAX_SEED:
        e.append(f"train.seed: must lie in [0, {MAX_SEED}], got {t.seed}")
    if t.steps_per_epoch < 0:
        e.append(f"train.steps_per_epoch: must be >= 0 (0: the whole epoch), got {t.steps_per_epoch}")
    for name in ("epochs", "log_every", "checkpoint_every", "eval_every"):
        if getattr(t, name) < 1:
            e.append(f"train.{name}: must be >= 1, got {getattr(t, name)}")
    if not t.run_dir:
        e.append("train.run_dir: must name a directory for logs and checkpoints")
    return e + non_finite_errors(cfg, e)


def validate(cfg: DistillConfig) -> None:
    errors = config_errors(cfg)
    if errors:
        raise ConfigError(" | ".join(errors))  # one line: `error: <what>; <fix>` per setting


def to_dict(cfg: DistillConfig) -> dict:
    return dataclasses.asdict(cfg)
