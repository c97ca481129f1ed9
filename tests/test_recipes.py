"""Recipes build the settings they promise; the command line fails early and clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_recipe
from fastssl.config import validate

REPO = Path(__file__).resolve().parents[1]


def test_table8_recipe():
    cfg = load_recipe("mira_bs512")
    assert (cfg.train.global_batch_size, cfg.train.epochs) == (512, 100)
    assert (cfg.optim.name, cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.momentum) == ("sgd", 0.03, 1e-4, 0.9)
    assert (cfg.aug.global_size, cfg.aug.local_size, cfg.aug.num_local) == (224, 96, 6)
    assert cfg.method.ema and cfg.model.arch == "resnet50" and cfg.model.num_prototypes == 3000
    assert (cfg.method.tau_student, cfg.method.tau_teacher, cfg.method.num_iters) == (0.1, 0.225, 30)
    cfg.data.train = "/imagenet/train"
    validate(cfg, num_processes=8)
    assert cfg.train.global_batch_size // 8 == 64


def test_lars_recipe():
    cfg = load_recipe("mira_bs4096_lars")
    assert (cfg.optim.name, cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.warmup_epochs) == ("lars", 0.3, 1e-6, 10)
    assert (cfg.train.global_batch_size, cfg.train.epochs) == (4096, 400)


def test_demo_recipe_is_cpu_sized():
    cfg = load_recipe("mira_demo")
    assert cfg.model.arch == "resnet18" and cfg.aug.global_size <= 64
    assert cfg.eval.knn_at_start and cfg.data.val
    validate(cfg)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "recipes" / "mira_bs512.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_help_lists_every_field():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "--data.train" in out.stdout and "--method.beta_end" in out.stdout
    assert "ImageNet-layout folder" in out.stdout  # each field's help, beside the recipe's value


@pytest.mark.parametrize("recipe", ["mira_bs512", "distill_mlcpc_cifar100"])
@pytest.mark.parametrize("args", [["--help"], ["--optim.lrr", "1"]])
def test_help_and_a_misspelt_field_answer_without_importing_torch(recipe, args):
    """A user's first commands answer at once (about 0.1 s, not the 3 s of importing torch and the models)."""
    probe = ("import runpy, sys\n"
             f"sys.argv = ['{recipe}.py', *{args!r}]\n"
             "try:\n"
             f"    runpy.run_path({str(REPO / 'recipes' / f'{recipe}.py')!r}, run_name='__main__')\n"
             "except SystemExit as exit:\n"
             "    print('exit', exit.code, 'torch' in sys.modules, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    code = 0 if args == ["--help"] else 2
    assert out.stderr.splitlines()[-1] == f"exit {code} False", out.stderr


@pytest.mark.parametrize("args, needle", [
    (["--optim.lrr", "1", "--data.train", "/x"], "optim.lrr: unknown recipe field"),
    (["--method.beta_start", "1.5", "--data.train", "/x"], "beta must lie in [0, 1)"),
    (["--method.tau_teacher", "0", "--data.train", "/x"], "temperatures must be positive"),
    ([], "no training data given"),
])
def test_cli_errors_exit_2_with_the_field(args, needle):
    out = run_cli(*args)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_data_path_creates_no_run_directory(tmp_path):
    out = run_cli("--data.train", str(tmp_path / "missing"), "--train.run_dir", str(tmp_path / "run"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert not (tmp_path / "run").exists()


def test_mlcpc_recipes():
    moco = load_recipe("mlcpc_moco")
    assert moco.method.objective == "mlcpc" and moco.aug.num_local == 0
    assert (moco.critic.queue_size, moco.critic.temperature) == (65536, 0.07)
    assert (moco.critic.alpha_start, moco.critic.alpha_end) == (10.0, 0.1)
    both = load_recipe("mira_mlcpc_bs512")
    table8 = load_recipe("mira_bs512")
    assert both.method.objective == "mira+mlcpc"
    assert (both.train.global_batch_size, both.optim.base_lr, both.aug.num_local) == (
        table8.train.global_batch_size, table8.optim.base_lr, table8.aug.num_local)
    for cfg in (moco, both):
        cfg.data.train = "/imagenet/train"
        validate(cfg, num_processes=8)


def test_mlcpc_moco_recipes_are_the_authors_setting():
    for name in ("mlcpc_moco", "mlcpc_moco_cifar"):
        cfg = load_recipe(name)
        assert (cfg.critic.direction, cfg.critic.shuffle_bn, cfg.model.head) == ("one_way", True, "moco")
        assert cfg.aug.jitter == (0.4, 0.4, 0.4, 0.1) and cfg.model.export == "student"  # encoder_q is evaluated
        assert not cfg.model.zero_init_residual  # MoCo's torchvision ResNet
        assert (cfg.optim.decay_bn_bias, cfg.optim.cosine_per, cfg.optim.warmup_epochs) == (True, "epoch", 0)
        assert cfg.critic.temperature == 0.07 and cfg.method.objective == "mlcpc"
        assert cfg.aug.interpolation == "bilinear"  # the authors' crops; MIRA's recipes keep bicubic
        assert not cfg.model.sync_bn  # MoCo's query encoder normalises per GPU (MIRA's recipes sync)
        cfg.data.train = "/data/train"
        validate(cfg, num_processes=1)
    assert load_recipe("mlcpc_moco").model.proj_dim == 128  # MoCo-v2's --moco-dim
    cifar = load_recipe("mlcpc_moco_cifar")
    # the authors' CIFAR command: -a resnet50 --lr 0.3 --mlp --moco-dim 2048, batch 256, RandomResizedCrop(32)
    assert (cifar.model.stem, cifar.aug.global_size, cifar.model.arch) == ("cifar", 32, "resnet50")
    assert (cifar.model.proj_hidden_dim, cifar.model.proj_dim, cifar.optim.base_lr) == (2048, 2048, 0.3)
    assert (cifar.train.global_batch_size, cifar.aug.global_scale) == (256, (0.08, 1.0))
    assert cifar.critic.queue_size < 50_000  # smaller than CIFAR-10's train set
    assert load_recipe("mlcpc_moco").model.stem == "imagenet"
