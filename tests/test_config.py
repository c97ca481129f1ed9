"""Config overrides and up-front validation: every bad value named with its fix."""

import math
import re

import pytest

from fastssl.config import Config, ConfigError, batch_errors, config_errors, from_dict, to_dict, validate
from fastssl.overrides import apply_overrides


def valid() -> Config:
    cfg = Config()
    cfg.data.train = "/some/train"
    return cfg


def test_overrides_are_typed():
    cfg = apply_overrides(valid(), ["--optim.base_lr", "0.05", "--train.epochs=3", "--method.beta_end", "2/3",
                                    "--aug.global_scale", "0.2,0.9", "--method.ema", "false"])
    assert cfg.optim.base_lr == 0.05 and cfg.train.epochs == 3
    assert cfg.method.beta_end == pytest.approx(2 / 3)
    assert cfg.aug.global_scale == (0.2, 0.9)
    assert cfg.method.ema is False


@pytest.mark.parametrize("args, needle", [
    (["--optim.lrr", "1"], "optim.lrr: unknown recipe field"),
    (["--nosuch.field", "1"], "unknown recipe field"),
    (["--train.epochs", "three"], "cannot read 'three' as int"),
    (["--train.cpu", "maybe"], "cannot read 'maybe' as bool .write true or false; also yes/no, on/off, 1/0"),
    (["--aug.global_scale", "0.2"], "expected 2 comma-separated values"),
    (["--train.epochs"], "missing value"),
    (["positional"], "unexpected argument"),
])
def test_bad_overrides(args, needle):
    with pytest.raises(ConfigError, match=needle):
        apply_overrides(valid(), args)


def test_unknown_field_suggests_close_names():
    with pytest.raises(ConfigError, match="--data.train"):
        apply_overrides(valid(), ["--train", "/x"])


@pytest.mark.parametrize("field, value, needle", [
    ("method.beta_start", 1.0, "beta must lie in \\[0, 1\\)"),
    ("method.beta_end", -0.1, "beta must lie in \\[0, 1\\)"),
    ("method.tau_student", 0.0, "temperatures must be positive"),
    ("method.tau_teacher", -1.0, "temperatures must be positive"),
    ("eval.knn_temperature", 0.0, "temperatures must be positive"),
    ("data.backend", "nope", "unknown backend"),
    ("model.arch", "vit", "unknown architecture"),
    ("train.precision", "fp8", "train.precision: unknown 'fp8'; choose one of auto, bf16, fp16, no$"),
    ("method.assignment", "greedy", "method.assignment: unknown 'greedy'; choose one of mira, sinkhorn$"),
    ("optim.warmup_epochs", 200.0, "longer than train.epochs"),
    ("aug.flip_p", 1.5, "probability must lie in \\[0, 1\\]"),
    ("aug.interpolation", "nearest", "aug.interpolation: unknown interpolation 'nearest'; choose one of bicubic"),
    ("eval.interpolation", "area", "eval.interpolation: unknown interpolation 'area'"),
    ("eval.crop_fraction", 0.0, "eval.crop_fraction: the centre crop.s share of the resized shorter side must lie in \\(0, 1\\]"),
    ("eval.crop_fraction", 1.5, "eval.crop_fraction: the centre crop.s share of the resized shorter side must lie in \\(0, 1\\]"),
    ("aug.jitter", (0.4, 0.4, 0.2, 0.6), "hue <= 0.5"),
    ("aug.jitter", (-0.1, 0.4, 0.2, 0.1), "values >= 0"),
    ("model.head", "byol", "model.head: unknown 'byol'; choose one of mira, moco$"),
    ("model.stem", "tiny", "model.stem: unknown 'tiny'; choose one of imagenet, cifar$"),
    ("model.bn_stats", "sync", "model.bn_stats: unknown 'sync'; choose one of per_view, per_forward$"),
    ("model.export", "both", "model.export: unknown 'both'; choose one of teacher, student$"),
    ("method.objective", "swav", "method.objective: unknown 'swav'; choose one of mira, mlcpc, "),
    ("critic.bound", "nce", "critic.bound: unknown 'nce'; choose one of mlcpc, cpc$"),
    ("critic.direction", "both", "critic.direction: unknown 'both'; choose one of symmetric, one_way$"),
    ("critic.shuffle_bn_splits", 0, "must be >= 1"),
    ("critic.shuffle_bn", True, "only for method.objective mlcpc"),
    ("optim.cosine_per", "iter", "choose epoch or step"),
    ("data.dali_read_threads", 0, "dali_read_threads: at least 1"),
    ("train.collective_timeout_min", 0.0, r"collective_timeout_min: must be a finite number of minutes in \(0, 100000\]"),
    ("train.collective_timeout_min", float("inf"), r"collective_timeout_min: must be a finite number of minutes in \(0, 100000\]"),
    ("train.collective_timeout_min", float("nan"), r"collective_timeout_min: must be a finite number of minutes in \(0, 100000\]"),
    ("method.tau_teacher", float("nan"), "temperatures must be positive and finite"),
    ("critic.temperature", float("inf"), "temperatures must be positive and finite"),
    ("method.mlcpc_weight", float("nan"), "must be a finite number > 0"),
    ("method.sinkhorn_iters", 0, "method.sinkhorn_iters: Sinkhorn-Knopp needs 1 to 100000 iterations"),
    ("method.num_iters", -1, r"method.num_iters: must lie in \[0, 100000\]"),
    # Values past any machine, which failed with a traceback (or forked or allocated until killed):
    ("method.num_iters", 10**20, r"method.num_iters: must lie in \[0, 100000\]"),
    ("train.collective_timeout_min", 1e30, "collective_timeout_min: must be a finite number of minutes in"),
    ("data.num_workers", 10**20, r"data.num_workers: loader workers per process \(0: load in the training process, at most 1024\)"),
    ("aug.global_size", 10**20, r"aug.global_size: must lie in \[8, 4096\] pixels"),
    ("aug.num_local", 10**20, r"aug.num_local: must lie in \[0, 64\]"),
    ("aug.blur_sigma", (1e30, 1e30), "aug.blur_sigma: at most 1000 pixels"),
    ("eval.image_size", 100_000, r"eval.image_size: must lie in \[0, 4096\]"),
    ("model.num_prototypes", 10**9, r"model.num_prototypes: must lie in \[1, 1000000\]"),
    ("model.proj_dim", 10**20, r"model.proj_dim: must lie in \[1, 65536\]"),
    ("train.seed", -1, r"train.seed: must lie in \[0, 4294967295\], got -1"),
    ("train.seed", 10**23, r"train.seed: must lie in \[0, 4294967295\]"),  # was an overflow in torch.manual_seed
    ("optim.momentum", 50.0, r"optim.momentum: must lie in \[0, 1\), got 50.0"),
    ("aug.jitter", (float("nan"), 0.4, 0.4, 0.1), r"aug.jitter: must be a finite number, got \(nan, "),
    ("aug.ratio", (0.75, float("inf")), r"aug.ratio: must be a finite number, got \(0.75, inf\)"),
    ("aug.blur_sigma", (0.1, float("inf")), r"aug.blur_sigma: at most 1000 pixels, got \(0.1, inf\)"),
    ("eval.knn_every", -2, "eval.knn_every: epochs between k-NN evaluations"),
    ("data.num_workers", -5, "data.num_workers: loader workers per process"),
])
def test_invalid_values_are_named(field, value, needle):
    cfg = valid()
    section, name = field.split(".")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError, match=needle) as err:
        validate(cfg)
    assert field.split(".")[0] in str(err.value)


def test_a_file_list_with_the_online_knn_needs_a_folder_for_its_bank():
    cfg = valid()
    cfg.data.train, cfg.data.val = "/data/train_list.txt", "/data/val"
    with pytest.raises(ConfigError, match="knn_train: --data.train is a file list .* pass --data.knn_train"):
        validate(cfg)
    cfg.data.knn_train = "/data/train"
    validate(cfg)
    cfg.data.knn_train, cfg.eval.knn_every = "", -1  # no online k-NN: nothing to read a folder for
    validate(cfg)


def test_missing_train_path_says_layout():
    with pytest.raises(ConfigError, match="ImageNet layout"):
        validate(Config())


def test_synthetic_needs_no_path():
    cfg = Config()
    assert any(e.startswith("data.train: no training data given") for e in config_errors(cfg))
    cfg.data.backend = "synthetic"
    assert config_errors(cfg) == []
    validate(cfg)


def test_batch_divisibility():
    cfg = valid()
    cfg.train.global_batch_size = 510
    assert batch_errors(cfg, 1) == []
    (msg,) = batch_errors(cfg, 4)
    assert "not divisible by the 4 processes" in msg and "multiple of 4" in msg
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 512, 48
    (msg,) = batch_errors(cfg, 8)
    assert "does not divide the per-process batch 64" in msg
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 8, 0
    assert batch_errors(cfg, 8) == []  # one image per process: synced BatchNorm sees the 8
    cfg.model.sync_bn = False
    (msg,) = batch_errors(cfg, 8)  # ... unsynced, one
    assert "BatchNorm in training would see 1 image per view" in msg and "--model.sync_bn true" in msg
    cfg.train.micro_batch_size = 1
    (msg,) = batch_errors(cfg, 1)
    assert msg.startswith("train.micro_batch_size 1: BatchNorm in training would see 1 image per view")
    cfg.model.sync_bn = True
    assert batch_errors(cfg, 1) and not batch_errors(cfg, 2)
    # torch's SyncBatchNorm (bn_stats per_forward) is used on GPUs only: on CPU processes each
    # BatchNorm sees its own image; per-view BatchNorm gathers its statistics on both
    cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.model.bn_stats = 8, 0, "per_forward"
    assert batch_errors(cfg, 8, "cuda") == []
    (msg,) = batch_errors(cfg, 8, "cpu")
    assert "would see 1 image per view" in msg and "--model.bn_stats per_view" in msg, msg
    cfg.model.bn_stats = "per_view"
    assert batch_errors(cfg, 8, "cpu") == []


def test_all_errors_reported_at_once():
    cfg = Config()
    cfg.method.beta_start, cfg.method.tau_student = 2.0, 0.0
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    assert "data.train" in text and "method.beta_start" in text and "method.tau_student" in text


def test_dict_round_trip():
    cfg = apply_overrides(valid(), ["--aug.local_scale", "0.06,0.2", "--train.seed", "7"])
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)


def test_misspelt_field_gets_suggestions():
    with pytest.raises(ConfigError, match="Did you mean --train.epochs"):
        apply_overrides(valid(), ["--train.epoch", "3"])
    with pytest.raises(ConfigError, match="--optim.base_lr"):
        apply_overrides(valid(), ["--optim.lr", "0.1"])


# ------------------------------------------------------------------ --help: what each field means
def test_every_field_has_a_one_line_help():
    from fastssl.overrides import field_help, field_names

    helps = field_help(Config())
    assert sorted(helps) == sorted(field_names(Config()))
    missing = [name for name, text in helps.items() if not text.strip()]
    assert not missing, f"fields without a comment beside them in their dataclass: {missing}"
    assert all("\n" not in text for text in helps.values())
    assert helps["data.backend"].endswith("torchvision | synthetic | dali | ffcv | auto (dali on a GPU if installed)")
    assert helps["aug.blur_p"].startswith("Blur probability for global view 0")  # the comment line above the field


def test_help_is_the_comment_beside_the_field_or_above_it():
    import dataclasses

    from fastssl.overrides import _comment_help

    @dataclasses.dataclass
    class Section:
        plain: int = 1  # the comment on its line
        # the comment above,
        # over two lines
        above: str = "#not a comment"
        bare: float = 0.5
        both: int = 2  # its own line wins  # even with a second hash

    assert _comment_help(Section) == {"plain": "the comment on its line", "above": "the comment above, over two lines",
                                      "bare": "", "both": "its own line wins  # even with a second hash"}


def test_usage_shows_each_field_with_the_recipe_value_and_its_help():
    from fastssl.cli import usage
    from fastssl.overrides import field_help, field_names

    cfg = valid()
    cfg.optim.base_lr = 0.125
    lines = usage(cfg, "recipe.py").splitlines()
    helps = field_help(cfg)
    for name in field_names(cfg):
        i = next(i for i, line in enumerate(lines) if line.startswith(f"  --{name} = "))
        assert lines[i + 1].strip() == helps[name]
    assert "  --optim.base_lr = 0.125" in lines
    assert "  --data.train = '/some/train'" in lines


def test_shuffle_bn_needs_per_view_bn_and_a_dividing_split():
    cfg = valid()
    cfg.method.objective, cfg.critic.shuffle_bn = "mlcpc", True
    validate(cfg)
    cfg.model.bn_stats, cfg.critic.shuffle_bn_splits = "per_forward", 7
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "needs --model.bn_stats per_view" in str(err.value) and "does not divide" in str(err.value)
    cfg.model.bn_stats, cfg.critic.shuffle_bn_splits = "per_view", cfg.train.global_batch_size  # groups of 1
    with pytest.raises(ConfigError, match="fewer than 2 images per BatchNorm group"):
        validate(cfg)


def test_lars_needs_a_positive_trust_coefficient():
    """LARS refused eta 0 only when the optimiser was built, with a traceback mid-setup."""
    cfg = valid()
    cfg.optim.name, cfg.optim.lars_eta = "lars", 0.0
    with pytest.raises(ConfigError, match="optim.lars_eta: LARS needs a trust coefficient > 0"):
        validate(cfg)
    cfg.optim.name = "sgd"  # unused by SGD
    validate(cfg)


@pytest.mark.parametrize("objective", ["mlcpc", "mira+mlcpc"])
def test_micro_batches_are_refused_where_the_loss_couples_every_row(objective):
    """ML-CPC scores each row against the whole batch: per-chunk denominators optimise another bound."""
    cfg = valid()
    cfg.method.objective, cfg.train.micro_batch_size = objective, 8
    with pytest.raises(ConfigError, match=re.escape(f"train.micro_batch_size: method.objective {objective} scores")):
        validate(cfg)
    cfg.train.micro_batch_size = 0
    validate(cfg)
    cfg.method.objective, cfg.train.micro_batch_size = "mira", 8  # MIRA's targets stay whole-batch
    validate(cfg)


def test_backend_and_eval_loader_names_come_from_pipelines(monkeypatch):
    """The names are declared once, in `pipelines.spec`: registering a loader there is enough for the config."""
    import pipelines.spec

    cfg = valid()
    cfg.data.backend, cfg.eval.loader = "mine", "mine_eval"
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert "data.backend: unknown backend 'mine'" in str(err.value)
    assert "eval.loader: unknown 'mine_eval'; choose one of torchvision, dali" in str(err.value)
    monkeypatch.setitem(pipelines.spec.BACKENDS, "mine", "my_module:MyLoader")
    monkeypatch.setitem(pipelines.spec.EVAL_BACKENDS, "mine_eval", "my_module:MyEvalLoader")
    validate(cfg)
    cfg.data.ffcv_order = "shuffled"
    with pytest.raises(ConfigError, match="data.ffcv_order: unknown 'shuffled'; choose sampler, random, "
                                          "quasi_random or sequential"):
        validate(cfg)


def test_auto_precision_follows_this_ranks_gpu_without_touching_gpu_0(monkeypatch):
    """bf16 where the rank's GPU has it natively (8.0+), fp16 with a scaler before; never torch's probe,
    which counts emulated bf16 and allocates on GPU 0 before Accelerate sets each rank's device."""
    import torch

    from fastssl.runtime import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: pytest.fail("probed through GPU 0"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    asked = []

    def capability(gpu: int) -> tuple[int, int]:
        asked.append(gpu)
        return (7, 0) if gpu == 3 else (9, 0)  # GPU 3 is a V100

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert resolve_precision("auto", use_cuda=True) == "bf16"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_precision("auto", use_cuda=True) == "fp16"
    assert asked == [5, 3]
    assert resolve_precision("auto", use_cuda=False) == "no"
    assert resolve_precision("fp16", use_cuda=True) == "fp16"


def test_a_tools_device_is_checked_when_parsed():
    """`--device` of the eval and benchmark tools: auto and cpu pass; an unknown name, or CUDA where there is
    none, is a usage error naming the choices (argparse: one line, exit 2) instead of torch's traceback later."""
    import argparse

    import torch

    from fastssl.runtime import device_arg

    assert device_arg("auto") == "auto" and device_arg("cpu") == "cpu"
    for bad, needle in (("nope", "unknown device 'nope'"), ("mps", "is not supported")):
        with pytest.raises(argparse.ArgumentTypeError, match=needle):
            device_arg(bad)
    if torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="CUDA device"):
            device_arg(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(argparse.ArgumentTypeError, match="no CUDA device is visible here"):
            device_arg("cuda")


def test_alpha_is_checked_against_the_ml_cpc_bounds_m():
    """alpha-ML-CPC takes alpha in (0, m], m = queue_size + 1 (Song & Ermon, Sec. 3.2); the loss
    refused any other alpha at the first step, after set-up. Now the config names it and the fix."""
    cfg = valid()
    cfg.critic.queue_size, cfg.critic.alpha_start, cfg.critic.alpha_end = 99, 100.0, 0.1  # alpha = m: allowed
    validate(cfg)
    cfg.critic.alpha_start = 150.0
    with pytest.raises(ConfigError, match=re.escape(
            "critic.alpha_start: ML-CPC's alpha must lie in (0, m] with m = --critic.queue_size + 1 = 100, got 150.0; "
            "set --critic.alpha_start to at most 100 or --critic.queue_size to at least 149")):
        validate(cfg)
    cfg.critic.alpha_start, cfg.critic.alpha_end = 10.0, float("nan")
    with pytest.raises(ConfigError, match=re.escape("critic.alpha_end: ML-CPC's alpha must lie in (0, m]")) as err:
        validate(cfg)
    assert "set --critic.alpha_end to a number in (0, 100]" in str(err.value)


def test_shuffled_batchnorm_with_zero_splits_is_named_not_a_division_by_zero():
    cfg = valid()
    cfg.method.objective, cfg.critic.shuffle_bn, cfg.critic.shuffle_bn_splits = "mlcpc", True, 0
    with pytest.raises(ConfigError, match="critic.shuffle_bn_splits: must be >= 1, got 0"):
        validate(cfg)


def distill_valid():
    from fastssl.distill.config import DistillConfig

    cfg = DistillConfig()
    cfg.data.root = "/some/cifar"
    return cfg


@pytest.mark.parametrize("make", [valid, distill_valid], ids=["ssl", "distill"])
def test_no_combination_of_bad_values_raises_anything_but_the_list_of_errors(make):
    """2,000 configs, each with 1 to 6 fields set to edge values (0, negatives, nan, inf, empty and
    wrong names): `config_errors` names each as `section.field: problem`; it never fails itself (a
    division by a 0 it had just named did). Seeded: a failure reproduces."""
    import dataclasses
    import importlib
    import random

    errors_of = importlib.import_module(type(make()).__module__).config_errors
    edges = {int: [-5, -1, 0, 1, 2, 3, 7, 512], bool: [True, False],
             float: [-1.0, 0.0, 0.5, 1.0, 1.5, 200.0, float("nan"), float("inf"), float("-inf")],
             str: ["", "x", "mira", "mlcpc", "lars", "epoch", "step", "per_view", "ffcv", "/a/train.txt", "bf16",
                   "folder", "resnet8", "0,x"]}
    for trial in range(2000):
        rng, cfg = random.Random(trial), make()
        for _ in range(rng.randint(1, 6)):
            section = getattr(cfg, rng.choice([f.name for f in dataclasses.fields(cfg)]))
            name = rng.choice([f.name for f in dataclasses.fields(section)])
            if type(getattr(section, name)) in edges:
                setattr(section, name, rng.choice(edges[type(getattr(section, name))]))
        errors = errors_of(cfg)
        assert isinstance(errors, list) and all(re.match(r"[a-z_]+\.[a-z_*]+(/[a-z_.]+)?: ", e) for e in errors), \
            (trial, errors)


@pytest.mark.parametrize("make", [valid, distill_valid], ids=["ssl", "distill"])
def test_any_text_for_any_field_is_set_or_named_never_a_traceback(make):
    """Every field from the command line with edge texts (a fraction over 0 was a ZeroDivisionError),
    then the config checked: a ConfigError or nothing, never another exception."""
    import importlib

    from fastssl.overrides import field_names, set_field

    validate_of = importlib.import_module(type(make()).__module__).validate
    texts = ["0", "-1", "nan", "inf", "-inf", "", "x", "1e400", "2/0", "0/0", "1/3", "1,2", "0,0", "-1,2", "true",
             "a,b,c,d", "nan,nan,nan,nan", "0.5,inf", "nan,0.4,0.4,0.1"]
    for name in field_names(make()):
        for text in texts:
            cfg = make()
            try:
                set_field(cfg, name, text)
            except ConfigError as err:
                assert str(err), (name, text)
                continue
            section, field = name.split(".")
            value = getattr(getattr(cfg, section), field)
            non_finite = any(isinstance(v, float) and not math.isfinite(v)
                             for v in (value if isinstance(value, (tuple, list)) else (value,)))
            try:
                validate_of(cfg)
            except ConfigError as err:
                assert str(err), (name, text)
                continue
            # A NaN or an infinity that reached a run failed far from the command line, or trained on it.
            assert not non_finite, (name, text, value)
            if make is valid:
                with pytest.raises(ConfigError):  # the valid config's batch does not split over 3 processes
                    validate(cfg, 3, "cuda")
    with pytest.raises(ConfigError, match=r"--optim.base_lr: cannot read '2/0' as float \(a fraction over 0\)"):
        set_field(valid(), "optim.base_lr", "2/0")


@pytest.mark.parametrize("saved, message", [
    ([1], "a saved config is an object of sections, not list"),
    ({"train": 5}, "train: a saved config's section is an object of fields, not int"),
    ({"train": {"epochs": "x"}}, "train.epochs: the saved config holds 'x', not a value of type int"),
    ({"train": {"epochs": True}}, "train.epochs: the saved config holds True, not a value of type int"),
    ({"aug": {"mean": [1, 2]}}, r"aug.mean: the saved config holds \[1, 2\], not a value of type tuple\[float, "),
    ({"optim": {"base_lr": "0.1"}}, "optim.base_lr: the saved config holds '0.1', not a value of type float"),
    ({"__class__": {}}, "__class__: unknown config section"),
])
def test_a_saved_config_that_does_not_fit_is_named(saved, message):
    """config.json edited by hand or written by another program: a ConfigError (tools/report.py
    says it in one line), not an AttributeError from deep inside."""
    with pytest.raises(ConfigError, match=message):
        from_dict(saved)
    assert from_dict({"optim": {"base_lr": 1}, "aug": {"mean": [0, 0.5, 1]}}).aug.mean == (0.0, 0.5, 1.0)
