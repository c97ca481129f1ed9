"""ML-CPC in the authors' MoCo-v2 CIFAR-10 setting: 32-px crops, CIFAR ResNet stem, key queue.

    python recipes/mlcpc_moco_cifar.py --data.train /data/cifar10/train --data.val /data/cifar10/test

The data must already be on disk in ImageNet layout (`train/<class>/<image>.png`, one folder
per class; nothing is downloaded). Everything of `recipes/mlcpc_moco.py` (the authors' setting:
one-way ML-CPC, shuffle-BN, moco head with `--moco-dim 128`, weight decay on every parameter,
per-epoch cosine lr, jitter (0.4, 0.4, 0.4, 0.1), T 0.07, alpha 10 -> 0.1 per epoch; see its
docstring for the sources), with what the authors' CIFAR runs change:
- 32-px images and the CIFAR ResNet stem (`model.stem cifar`: 3x3 stride-1 conv1, no max-pool).
  The exported backbone loads into `torchvision.models.resnet18()` after the same two changes
  (`fastssl.models.backbone.cifar_stem`); our eval tools detect the stem from conv1's shape.
- ResNet-18, so the moco head is Linear(512, 512)-ReLU-Linear(512, 128) (MoCo's `--mlp`
  keeps the backbone width). ResNet-18 is our assumption: the paper does not name the CIFAR
  backbone.
- Queue: the authors use 65,536 keys, more than CIFAR-10's 50,000 images, so stale copies of
  an image are scored as its own negatives; we refuse a queue that is not smaller than the
  dataset and use 16,384 here (a known difference).
- 8 shuffle-BN groups on one process (MoCo's single-GPU CIFAR demo's SplitBatchNorm(8)).
- No Gaussian blur at 32 px (our assumption, as MoCo's CIFAR demos).
- CIFAR-10's mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010), the authors'
  (`representation-learning/main_moco_cifar.py`), for training and, as every run, evaluation.
- lr 0.03 x batch/256, wd 1e-4, batch 256, 200 epochs: MoCo-v2's values (Table 3 of the paper
  reports 200, 500 and 1000 epochs); not checked against the authors' CIFAR script.
- Crops: resized bilinearly, as the authors (from `recipes/mlcpc_moco.py`).
- Evaluation (the loop's k-NN, and the tools that read this run): val images whole, as
  the authors' CIFAR test transform (ToTensor + Normalize): `eval.crop_fraction` 1.0, not
  ImageNet's resize 37 + centre crop 32, which would cut 2-3 px off each side.
"""

import importlib.util
from pathlib import Path

from fastssl.cli import run
from fastssl.config import Config


def _imagenet_recipe():
    """recipes/mlcpc_moco.py, loaded by path (recipes are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("mlcpc_moco", Path(__file__).with_name("mlcpc_moco.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config() -> Config:
    cfg = _imagenet_recipe().config()
    cfg.model.arch, cfg.model.stem = "resnet18", "cifar"
    cfg.model.proj_hidden_dim, cfg.model.proj_dim = 512, 128
    cfg.aug.global_size = 32
    cfg.aug.blur_p = (0.0, 0.0, 0.0)
    cfg.aug.mean, cfg.aug.std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    cfg.critic.queue_size = 16384
    cfg.eval.crop_fraction = 1.0
    cfg.train.run_dir = "runs/mlcpc_moco_cifar"
    return cfg


if __name__ == "__main__":
    run(config())
