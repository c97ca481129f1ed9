"""Typed run configuration, as saved in a run, and its up-front validation.

A recipe is a Python file that builds a `Config`; every field can then be overridden
from the command line as `--section.field value` (e.g. `--data.train /imagenet/train
--optim.base_lr 0.05`; `fastssl.overrides` reads them). Every invalid value is reported
before any work starts, naming the field and how to fix it, so that a typo never costs
a GPU hour.

The `# comment` beside a field is its `--help` text (one line, with its choices or
range): every field needs one (tests/test_config.py checks).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from fastssl.arg_types import MAX_SEED
from pipelines.augment import (EVAL_CROP_FRACTION, EVAL_INTERPOLATION, MAX_CROP, EvalView, MultiCropRecipe,
                               crop_fraction_errors, interpolation_errors)
from pipelines.spec import DataConfig, eval_backend_errors

# `method.objective` -> "module:Class" of its objective: names here, so that checking a config imports
# no torch (a bad value is answered at once); `objective_class` imports the class.
OBJECTIVES = {"mira": "fastssl.objectives:Mira", "mlcpc": "fastssl.objectives:MlCpc",
              "mira+mlcpc": "fastssl.objectives:MiraPlusMlCpc"}
BN_STATS = ("per_view", "per_forward")  # ModelConfig.bn_stats
HEADS = ("mira", "moco")  # ModelConfig.head
STEMS = ("imagenet", "cifar")  # ModelConfig.stem
EXPORTS = ("teacher", "student")  # ModelConfig.export
ASSIGNMENTS = ("mira", "sinkhorn")  # MethodConfig.assignment
PRECISIONS = ("auto", "bf16", "fp16", "no")  # TrainConfig.precision
CRITIC_BOUNDS = ("mlcpc", "cpc")  # CriticConfig.bound: the names of fastssl.losses.BOUNDS (no torch here)
DIRECTIONS = ("symmetric", "one_way")  # CriticConfig.direction (read by fastssl.critic as well)
# Upper bounds past which a value can only be a typo: torch, PIL or the allocator would fail with a
# traceback far from the command line (a timeout past a C int, a weight matrix of terabytes).
MAX_WIDTH = 65_536  # the projector's widths (the paper's 2048 and 256)
MAX_PROTOTYPES = 1_000_000  # K (the paper's 3000)
MAX_ITERS = 100_000  # fixed-point or Sinkhorn iterations (the paper's 30; the fused kernel counts in int32)
MAX_TIMEOUT_MIN = 100_000.0  # minutes a collective may wait (about 69 days)


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


@dataclass
class ModelConfig:
    """Backbone, projector and prototypes (MIRA Sec. 4.1 and the authors' code)."""

    arch: str = "resnet50"  # backbone: resnet18 | resnet50
    proj_hidden_dim: int = 2048  # hidden width of the projector MLP
    proj_dim: int = 256  # output width of the projector (the embedding the prototypes score)
    num_prototypes: int = 3000  # K: prototypes, i.e. pseudo-label classes
    bn_stats: str = "per_view"  # per_view: each view normalised on its own (the authors'); per_forward: views pooled
    sync_bn: bool = True  # BN statistics over the global batch in distributed runs (per_view: gloo too)
    # each residual branch's last BatchNorm starts at 0 (MIRA's authors) or, false, at 1 (MoCo's and ML-CPC's code)
    zero_init_residual: bool = True
    # the encoder the run exports (backbone_<arch>.pth) and its k-NN scores: teacher (the EMA network, MIRA's
    # evaluation) | student (the query encoder, MoCo's and ML-CPC's linear evaluation)
    export: str = "teacher"
    head: str = "mira"  # projector: mira (Linear-BN-ReLU x2, Linear) | moco (Linear-ReLU-Linear with biases, no BN)
    stem: str = "imagenet"  # ResNet stem: imagenet (7x7 stride 2 + max-pool) | cifar (3x3 stride 1, no max-pool; 32 px)


@dataclass
class MiraConfig:
    """The pseudo-labelling method and its schedules."""

    objective: str = "mira"  # loss: mira | mlcpc | mira+mlcpc (the critic on the projector embeddings)
    mlcpc_weight: float = 1.0  # weight of the ML-CPC loss in mira+mlcpc
    # pseudo-labels: mira | sinkhorn (SwAV's equipartition; SwAV's baseline also needs ema false, README)
    assignment: str = "mira"
    tau_student: float = 0.1  # temperature of the student's softmax over the prototypes (> 0)
    tau_teacher: float = 0.225  # temperature of the teacher's logits fed to the assignment (> 0)
    beta_start: float = 0.75  # MIRA's mutual-information weight in [0, 1) at step 0; cosine to beta_end
    beta_end: float = 2 / 3  # beta at the last step, in [0, 1)
    num_iters: int = 30  # fixed-point steps of Eq. 7 per assignment
    sinkhorn_eps: float = 0.05  # entropy weight of the Sinkhorn baseline (assignment sinkhorn)
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations of the baseline
    ema: bool = True  # EMA teacher (backbone + projector); head copied each step
    ema_momentum_start: float = 0.99  # teacher EMA momentum in [0, 1] at step 0; cosine to ema_momentum_end
    ema_momentum_end: float = 1.0  # teacher EMA momentum at the last step
    freeze_prototypes_epochs: int = 1  # epochs at the start during which the prototypes are not updated


@dataclass
class CriticConfig:
    """The queue-based ML-CPC critic (Song & Ermon 2020), used by the mlcpc objectives."""

    queue_size: int = 65536  # keys of earlier steps, gathered from all ranks; < dataset size
    temperature: float = 0.07  # T of the separable critic q . k / T (> 0)
    alpha_start: float = 10.0  # ML-CPC alpha at the start; geometric curriculum to alpha_end (Sec. 5.3: 10 -> 0.1)
    alpha_end: float = 0.1  # alpha at the end of training (> 0)
    alpha_per: str = "epoch"  # epoch | step: how often alpha moves
    direction: str = "symmetric"  # symmetric (ours: both views, 2B keys/step) | one_way (authors': q view 0, k view 1)
    shuffle_bn: bool = False  # key encoder BN on shuffled sub-batches (MoCo's shuffle-BN); needs objective mlcpc, bn_stats per_view
    shuffle_bn_splits: int = 8  # one process: BN groups of the shuffled key batch (MoCo CIFAR demo: 8); else 1/process
    # mlcpc (alpha-ML-CPC, Eq. 6: one denominator) | cpc (alpha-CPC, Eq. 4, each row on its own; at alpha 1
    # InfoNCE, the authors' --loss cpc baseline: --critic.alpha_start 1 --critic.alpha_end 1)
    bound: str = "mlcpc"


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (linear scaling rule: lr = base_lr x batch/256)."""

    name: str = "sgd"  # optimiser: sgd | lars
    base_lr: float = 0.03  # learning rate per 256 images; the peak lr is base_lr x global_batch_size / 256
    final_lr: float = 0.0  # learning rate at the end of the cosine decay (per step or per epoch: cosine_per)
    warmup_epochs: float = 10.0  # linear warm-up from warmup_start_lr to the peak lr (fractions allowed)
    warmup_start_lr: float = 0.0  # lr at the start of the warm-up, NOT batch-scaled (the authors' LARS recipe: 0.3)
    momentum: float = 0.9  # SGD / LARS momentum
    weight_decay: float = 1e-4  # L2 weight decay
    lars_eta: float = 0.001  # LARS trust coefficient (optim.name lars only)
    decay_bn_bias: bool = False  # also weight-decay BN and bias parameters (MoCo's: every parameter); default: not
    cosine_per: str = "step"  # step | epoch: how often the cosine lr moves (MoCo: once per epoch)


@dataclass
class TrainConfig:
    """The loop: batch, length, precision, checkpoints, logs."""

    # where logs, checkpoints and the exported backbone go (one run per directory); {time} in it
    # becomes the start time (YYYYmmdd-HHMMSS), the same on every process
    run_dir: str = "runs/mira"
    epochs: int = 100  # training epochs
    global_batch_size: int = 512  # images per step over all processes (divisible by the process count)
    # per-process chunk for gradient accumulation; 0 = no split. BatchNorm statistics then cover
    # one chunk (MIRA's targets still see the whole batch); refused with ML-CPC (one denominator)
    micro_batch_size: int = 0
    seed: int = 0  # random seed (data order, augmentations, initialisation)
    precision: str = "auto"  # auto | bf16 | fp16 | no  (auto: bf16 on GPUs with native bf16, else fp16; CPU: no)
    compile: bool = False  # torch.compile the student
    channels_last: bool = True  # NHWC memory layout for the convolutions (faster on GPUs)
    cudnn_benchmark: bool = True  # cuDNN times its convolution algorithms once per shape and keeps the fastest
    cpu: bool = False  # force CPU even when a GPU is present
    steps_per_epoch: int = 0  # cap steps per epoch (smoke tests, profiling); 0 = the whole epoch
    log_every: int = 10  # steps between CSV/TensorBoard rows
    checkpoint_every: int = 1  # epochs between resumable checkpoints
    progress: bool = True  # progress bars (epochs, k-NN) on the main process
    # minutes a process waits in a collective (gradient all-reduce, barrier) for the others before the
    # run fails; generous by default, since the first step waits for every process's CUDA build and
    # torch.compile (NCCL's own default is 10)
    collective_timeout_min: float = 30.0


@dataclass
class EvalConfig:
    """Online k-NN on the val split (DINO protocol), with the features of the encoder the run exports
    (model.export: the EMA teacher by default); its images are normalised with the training crops'
    aug.mean / aug.std (`eval_view`)."""

    knn_every: int = 10  # epochs between online k-NN evaluations; 0 = only after the last epoch; -1 = never
    knn_at_start: bool = False  # also k-NN the randomly initialised network (a baseline; not after a set-up stop signal)
    knn_k: int = 20  # neighbours that vote (DINO: 20)
    knn_temperature: float = 0.07  # votes weighted by exp(cosine / T) (DINO: 0.07)
    batch_size: int = 256  # images per batch when extracting k-NN features
    image_size: int = 0  # k-NN centre-crop size in pixels; 0 = the recipe's global crop size
    loader: str = "torchvision"  # torchvision | dali: who reads the k-NN images (same transform)
    interpolation: str = EVAL_INTERPOLATION  # k-NN resize filter: bilinear (the MIRA authors' evaluation code) | bicubic
    crop_fraction: float = EVAL_CROP_FRACTION  # k-NN centre crop / resized short side: 0.875 (224 of 256) | 1.0 (CIFAR)


@dataclass
class Config:
    """The whole run. Recipes build one; `--section.field` overrides any field.

    The `data` and `aug` sections are declared in `pipelines` (`pipelines.spec.DataConfig`,
    `pipelines.augment.MultiCropRecipe`), beside the loaders that read them.
    """

    data: DataConfig = field(default_factory=DataConfig)
    aug: MultiCropRecipe = field(default_factory=MultiCropRecipe)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MiraConfig = field(default_factory=MiraConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def eval_view(cfg: Config) -> EvalView:
    """How the run's evaluations see an image: the eval section's geometry, the training normalisation."""
    return EvalView(cfg.eval.image_size or cfg.aug.global_size, cfg.eval.interpolation, cfg.eval.crop_fraction,
                    tuple(cfg.aug.mean), tuple(cfg.aug.std))


# --------------------------------------------------------------------------- saved configs


def field_types(section: Any) -> dict[str, Any]:
    """`field` -> its declared type, for a config section (a dataclass instance)."""
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a run directory's config.json); a ConfigError
    names whatever does not fit: an unknown section or field, a value of another type (a file
    edited by hand, or another program's)."""
    cfg = Config()
    if not isinstance(data, dict):
        raise ConfigError(f"a saved config is an object of sections, not {type(data).__name__}")
    sections = {f.name for f in dataclasses.fields(cfg)}
    for section_name, values in data.items():
        if section_name not in sections:
            raise ConfigError(f"{section_name}: unknown config section in saved config")
        if not isinstance(values, dict):
            raise ConfigError(f"{section_name}: a saved config's section is an object of fields, not "
                              f"{type(values).__name__}")
        section = getattr(cfg, section_name)
        types = field_types(section)
        for name, value in values.items():
            if name not in types:
                raise ConfigError(f"{section_name}.{name}: unknown field in saved config")
            setattr(section, name, _saved_value(value, types[name], f"{section_name}.{name}"))
    return cfg


def _saved_value(value: Any, typ: Any, name: str) -> Any:
    """`value` as JSON gives it back, as the field's declared type: a list becomes a tuple, a
    whole number a float where the field is one (JSON keeps no difference); anything else that
    is not of that type is a ConfigError."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(_saved_value(v, a, name) for v, a in zip(value, args))
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(typ, type) and isinstance(value, typ) and (typ is bool or not isinstance(value, bool)):
        return value
    type_name = typ.__name__ if isinstance(typ, type) else str(typ)
    raise ConfigError(f"{name}: the saved config holds {value!r}, not a value of type {type_name}")


def dumps(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


# --------------------------------------------------------------------------- validation


def positive_number(value: float) -> bool:
    """Whether `value` is a finite number > 0. `--x inf` and `--x nan` read as floats, and a check
    written as `value <= 0` passes nan (every comparison with nan is False) and inf, which then fail
    far from the command line (an OverflowError in the process-group timeout, a loss of nan)."""
    return math.isfinite(value) and value > 0


def mlcpc_keys(queue_size: int) -> int:
    """ML-CPC's m: the keys each query is scored against, its positive and the queue's negatives
    (`fastssl.critic.MlCpcCritic`: m = negatives + 1). alpha must lie in (0, m] (`fastssl.losses.cpc`)."""
    return queue_size + 1


def _alpha_errors(cr: CriticConfig) -> list[str]:
    """critic.alpha_start / alpha_end against (0, m]: ML-CPC refuses any other alpha, at the first step."""
    if cr.queue_size < 1:  # m is unknown; the queue's own error says so
        return [f"critic.{name}: alpha must be a finite number > 0, got {getattr(cr, name)}"
                for name in ("alpha_start", "alpha_end") if not positive_number(getattr(cr, name))]
    m = mlcpc_keys(cr.queue_size)
    errors = []
    for name in ("alpha_start", "alpha_end"):
        value = getattr(cr, name)
        if 0 < value <= m:
            continue
        fix = (f"set --critic.{name} to at most {m} or --critic.queue_size to at least {math.ceil(value - 1)}"
               if value > m and math.isfinite(value) else f"set --critic.{name} to a number in (0, {m}]")
        errors.append(f"critic.{name}: ML-CPC's alpha must lie in (0, m] with m = --critic.queue_size + 1 = {m}, "
                      f"got {value}; {fix}")
    return errors


def objective_class(name: str) -> type:
    """The objective class registered as `name` in OBJECTIVES, its module imported now."""
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def _unknown_choice(name: str, value: str, choices: Collection[str]) -> list[str]:
    """The error of a field that takes one of a few names, when `value` is none of them."""
    return [] if value in choices else [f"{name}: unknown {value!r}; choose one of {', '.join(choices)}"]


def config_errors(cfg: Config) -> list[str]:
    """Every invalid value, as `section.field: problem (fix)`. Pure: touches no files."""
    errors = ([f"data.{msg}" for msg in cfg.data.errors()] + [f"aug.{msg}" for msg in cfg.aug.errors()]
              + _model_errors(cfg.model) + _method_errors(cfg) + _critic_errors(cfg)
              + _optim_errors(cfg.optim, cfg.train) + _train_errors(cfg.train) + _eval_errors(cfg))
    return errors + non_finite_errors(cfg, errors)


def non_finite_errors(cfg: Any, said: list[str]) -> list[str]:
    """`section.field: must be a finite number, got nan` for each float of `cfg`'s sections (a field, or
    an item of a tuple field) that is NaN or infinite and that no message in `said` names yet. The
    command line reads `nan` and `inf` as floats, and a range check such as `lo <= hi` passes NaN
    (every comparison with it is False): this one covers every field, with those a section's own
    checks miss (`--aug.jitter nan,...` failed in torchvision's ColorJitter at the first batch)."""
    named = {msg.split(":", 1)[0].split("[", 1)[0] for msg in said}
    errors = []
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for f in dataclasses.fields(values):
            name, value = f"{section.name}.{f.name}", getattr(values, f.name)
            items = value if isinstance(value, (tuple, list)) else (value,)
            if name not in named and any(isinstance(v, float) and not math.isfinite(v) for v in items):
                errors.append(f"{name}: must be a finite number, got {value}")
    return errors


def _model_errors(m: ModelConfig) -> list[str]:
    e: list[str] = []
    if m.arch not in ("resnet18", "resnet50"):
        e.append(f"model.arch: unknown architecture {m.arch!r}; choose resnet18 or resnet50")
    for name, value, choices in (("model.bn_stats", m.bn_stats, BN_STATS), ("model.head", m.head, HEADS),
                                 ("model.stem", m.stem, STEMS), ("model.export", m.export, EXPORTS)):
        e += _unknown_choice(name, value, choices)
    for name, most in (("proj_hidden_dim", MAX_WIDTH), ("proj_dim", MAX_WIDTH), ("num_prototypes", MAX_PROTOTYPES)):
        if not 1 <= getattr(m, name) <= most:
            e.append(f"model.{name}: must lie in [1, {most}], got {getattr(m, name)}")
    return e


def _method_errors(cfg: Config) -> list[str]:
    e: list[str] = []
    mt = cfg.method
    if mt.objective not in OBJECTIVES:
        e += _unknown_choice("method.objective", mt.objective, OBJECTIVES)
    elif cfg.train.micro_batch_size and objective_class(mt.objective).couples_rows:
        e.append(f"train.micro_batch_size: method.objective {mt.objective} scores every row against the whole "
                 f"per-process batch (ML-CPC's one denominator), which gradient accumulation over chunks would change; "
                 f"set --train.micro_batch_size 0 (or lower --train.global_batch_size to fit memory)")
    if not positive_number(mt.mlcpc_weight):
        e.append(f"method.mlcpc_weight: must be a finite number > 0, got {mt.mlcpc_weight}")
    e += _unknown_choice("method.assignment", mt.assignment, ASSIGNMENTS)
    for name in ("tau_student", "tau_teacher", "sinkhorn_eps"):
        if not positive_number(getattr(mt, name)):
            e.append(f"method.{name}: temperatures must be positive and finite, got {getattr(mt, name)}")
    for name in ("beta_start", "beta_end"):
        if not 0 <= getattr(mt, name) < 1:
            e.append(f"method.{name}: beta must lie in [0, 1) (Proposition 1), got {getattr(mt, name)}")
    if not 0 <= mt.num_iters <= MAX_ITERS:
        e.append(f"method.num_iters: must lie in [0, {MAX_ITERS}] (0: the start point's targets), got {mt.num_iters}")
    if not 1 <= mt.sinkhorn_iters <= MAX_ITERS:
        e.append(f"method.sinkhorn_iters: Sinkhorn-Knopp needs 1 to {MAX_ITERS} iterations, got {mt.sinkhorn_iters}")
    for name in ("ema_momentum_start", "ema_momentum_end"):
        if not 0 <= getattr(mt, name) <= 1:
            e.append(f"method.{name}: EMA momentum must lie in [0, 1], got {getattr(mt, name)}")
    if mt.freeze_prototypes_epochs < 0:
        e.append("method.freeze_prototypes_epochs: must be >= 0")
    return e


def _critic_errors(cfg: Config) -> list[str]:
    """The ML-CPC critic's fields, and the shuffled BatchNorm's needs of the rest of the recipe."""
    e: list[str] = []
    cr, mt, m, t = cfg.critic, cfg.method, cfg.model, cfg.train
    if cr.queue_size < 1:
        e.append(f"critic.queue_size: must be positive, got {cr.queue_size}")
    if not positive_number(cr.temperature):
        e.append(f"critic.temperature: temperatures must be positive and finite, got {cr.temperature}")
    e += _alpha_errors(cr)
    if cr.alpha_per not in ("epoch", "step"):
        e.append(f"critic.alpha_per: choose epoch or step, got {cr.alpha_per!r}")
    e += _unknown_choice("critic.bound", cr.bound, CRITIC_BOUNDS) + _unknown_choice("critic.direction", cr.direction,
                                                                                   DIRECTIONS)
    if cr.shuffle_bn_splits < 1:
        e.append(f"critic.shuffle_bn_splits: must be >= 1, got {cr.shuffle_bn_splits}")
    if cr.shuffle_bn and mt.objective != "mlcpc":
        e.append(f"critic.shuffle_bn: only for method.objective mlcpc (the MIRA targets need the plain teacher), "
                 f"got {mt.objective!r}; set --critic.shuffle_bn false")
    if cr.shuffle_bn and m.bn_stats != "per_view":
        e.append("critic.shuffle_bn: needs --model.bn_stats per_view (pooled BN cannot keep the sub-batches apart)")
    if cr.shuffle_bn and cr.shuffle_bn_splits >= 1:  # (fewer is named above)
        if t.global_batch_size % cr.shuffle_bn_splits:
            e.append(f"critic.shuffle_bn_splits: {cr.shuffle_bn_splits} does not divide train.global_batch_size "
                     f"{t.global_batch_size}; pick a divisor")
        elif t.global_batch_size // cr.shuffle_bn_splits < 2:
            e.append(f"critic.shuffle_bn_splits: {cr.shuffle_bn_splits} groups of train.global_batch_size "
                     f"{t.global_batch_size} leave fewer than 2 images per BatchNorm group; use fewer splits")
    return e


def _optim_errors(o: OptimConfig, t: TrainConfig) -> list[str]:
    e: list[str] = []
    if o.cosine_per not in ("epoch", "step"):
        e.append(f"optim.cosine_per: choose epoch or step, got {o.cosine_per!r}")
    if o.name not in ("sgd", "lars"):
        e.append(f"optim.name: unknown optimiser {o.name!r}; choose sgd or lars")
    for name in ("base_lr", "final_lr", "warmup_epochs", "warmup_start_lr", "momentum", "weight_decay", "lars_eta"):
        value = getattr(o, name)
        if not (math.isfinite(value) and value >= 0):
            e.append(f"optim.{name}: must be a finite number >= 0, got {value}")
    if math.isfinite(o.momentum) and o.momentum >= 1:  # a velocity that never decays: the updates grow
        e.append(f"optim.momentum: must lie in [0, 1), got {o.momentum}; the authors' is 0.9")
    if o.name == "lars" and o.lars_eta == 0:  # LARS scales every update by eta: 0 would never move
        e.append("optim.lars_eta: LARS needs a trust coefficient > 0, got 0; e.g. --optim.lars_eta 0.001")
    if o.warmup_epochs > t.epochs:
        e.append(f"optim.warmup_epochs: {o.warmup_epochs} is longer than train.epochs={t.epochs}")
    return e


def _train_errors(t: TrainConfig) -> list[str]:
    e: list[str] = []
    if t.epochs < 1:
        e.append(f"train.epochs: must be >= 1, got {t.epochs}")
    if t.global_batch_size < 2:
        e.append(f"train.global_batch_size: must be >= 2, got {t.global_batch_size}")
    if t.micro_batch_size < 0:
        e.append("train.micro_batch_size: must be >= 0 (0 = no gradient accumulation)")
    if not 0 <= t.seed <= MAX_SEED:
        e.append(f"train.seed: must lie in [0, {MAX_SEED}], got {t.seed}")
    e += _unknown_choice("train.precision", t.precision, PRECISIONS)
    if not positive_number(t.collective_timeout_min) or t.collective_timeout_min > MAX_TIMEOUT_MIN:
        e.append(f"train.collective_timeout_min: must be a finite number of minutes in (0, {MAX_TIMEOUT_MIN:g}], got "
                 f"{t.collective_timeout_min}; e.g. --train.collective_timeout_min {TrainConfig.collective_timeout_min:g}")
    if t.steps_per_epoch < 0:
        e.append(f"train.steps_per_epoch: must be >= 0 (0: the whole epoch), got {t.steps_per_epoch}")
    for name in ("log_every", "checkpoint_every"):
        if getattr(t, name) < 1:
            e.append(f"train.{name}: must be >= 1, got {getattr(t, name)}")
    if not t.run_dir:
        e.append("train.run_dir: must name a directory for logs and checkpoints")
    return e


def _eval_errors(cfg: Config) -> list[str]:
    """The evaluation fields, and the online k-NN's need of JPEG folders."""
    e: list[str] = []
    d, ev = cfg.data, cfg.eval
    if (ev.knn_every >= 0 and d.val and not d.knn_train and d.backend not in ("ffcv", "synthetic")
            and d.train.lower().endswith(".txt")):
        e.append("data.knn_train: --data.train is a file list but the online k-NN reads JPEG folders; pass "
                 "--data.knn_train /path/to/imagenet/train, or turn the k-NN off (--data.val= or --eval.knn_every -1)")
    if ev.knn_every < -1:
        e.append(f"eval.knn_every: epochs between k-NN evaluations (>= 1), 0 (only after the last epoch) or "
                 f"-1 (never); got {ev.knn_every}")
    if ev.knn_k < 1:
        e.append(f"eval.knn_k: must be >= 1, got {ev.knn_k}")
    if not positive_number(ev.knn_temperature):
        e.append(f"eval.knn_temperature: temperatures must be positive and finite, got {ev.knn_temperature}")
    if ev.batch_size < 1:
        e.append(f"eval.batch_size: must be >= 1, got {ev.batch_size}")
    if not 0 <= ev.image_size <= MAX_CROP:
        e.append(f"eval.image_size: must lie in [0, {MAX_CROP}] (0: the recipe's global crop size), got {ev.image_size}")
    e += [f"eval.loader: {msg}" for msg in eval_backend_errors(ev.loader)]
    e += interpolation_errors("eval.interpolation", ev.interpolation)
    e += crop_fraction_errors("eval.crop_fraction", ev.crop_fraction)
    return e


def synced_batchnorm(model: ModelConfig, device_type: str) -> bool:
    """Whether BatchNorm's statistics cover every process's images (`model.sync_bn`): per-view
    BatchNorm gathers its own on any device; torch's SyncBatchNorm (bn_stats per_forward), which
    the loop swaps in, works on GPUs only."""
    return model.sync_bn and (model.bn_stats == "per_view" or device_type == "cuda")


def batch_errors(cfg: Config, num_processes: int, device_type: str = "cuda") -> list[str]:
    """Checks that need the process count and the device (known once Accelerate has started)."""
    t = cfg.train
    if t.global_batch_size % num_processes:
        return [f"train.global_batch_size: {t.global_batch_size} is not divisible by the "
                f"{num_processes} processes; pick a multiple of {num_processes} "
                f"(e.g. {num_processes * max(1, t.global_batch_size // num_processes)})"]
    per_process = t.global_batch_size // num_processes
    per_forward = t.micro_batch_size or per_process  # the images of one view in one forward, on this process
    global_bn = synced_batchnorm(cfg.model, device_type)  # BatchNorm's statistics gather them over the processes
    synced = num_processes if global_bn else 1
    if per_forward * synced < 2:
        where = (f"train.micro_batch_size {t.micro_batch_size}" if t.micro_batch_size else
                 f"train.global_batch_size {t.global_batch_size} over {num_processes} processes")
        return [f"{where}: BatchNorm in training would see {per_forward * synced} image per view, and it needs 2; "
                "use more images per forward" + ("" if global_bn or num_processes == 1 else
                                                  " or --model.sync_bn true" if not cfg.model.sync_bn else
                                                  " or --model.bn_stats per_view (its statistics are global on a CPU)")]
    if t.micro_batch_size and per_process % t.micro_batch_size:
        return [f"train.micro_batch_size: {t.micro_batch_size} does not divide the per-process "
                f"batch {per_process}; choose a divisor of {per_process}"]
    return []


def validate(cfg: Config, num_processes: int | None = None, device_type: str = "cuda") -> None:
    """Raise one ConfigError listing every problem, or return quietly."""
    errors = config_errors(cfg)
    if num_processes is not None:
        errors += batch_errors(cfg, num_processes, device_type)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
