"""ML-CPC in the authors' MoCo-v2 CIFAR-10 setting: 32-px crops, CIFAR ResNet-50, key queue.

    python recipes/mlcpc_moco_cifar.py --data.train /data/cifar10/train --data.val /data/cifar10/test

The data must already be on disk in ImageNet layout (`train/<class>/<image>.png`, one folder
per class; nothing is downloaded). Everything of `recipes/mlcpc_moco.py` (the authors' setting:
one-way ML-CPC, shuffle-BN, moco head, weight decay on every parameter, per-epoch cosine lr,
jitter (0.4, 0.4, 0.4, 0.1), T 0.07, alpha 10 -> 0.1 per epoch, the query encoder exported;
see its docstring for the sources), with what the authors' CIFAR command changes
(`representation-learning/README.md`: `main_moco_cifar.py -a resnet50 --lr 0.3 --moco-t 0.07
--mlp --epochs 200 --batch-size 256 --moco-dim 2048 --aug-plus --cos`):
- 32-px images and a CIFAR ResNet-50 (`model.stem cifar`: 3x3 stride-1 conv1, no max-pool;
  their resnet_cifar.resnet50). The exported backbone loads into `torchvision.models.resnet50()`
  after the same two changes (`fastssl.models.backbone.cifar_stem`); our eval tools detect the
  stem from conv1's shape. Their CIFAR ResNet keeps PyTorch's default initialisation, ours
  torchvision's (Kaiming-normal convolutions), residual branches not zeroed in either.
- head Linear(2048, 2048)-ReLU-Linear(2048, 2048) (`--mlp --moco-dim 2048`).
- lr 0.3 x batch/256 (0.3 at their batch 256), wd 1e-4, 200 epochs (Table 3 of the paper also
  reports 500 and 1000).
- crops: RandomResizedCrop(32) at torchvision's default scale (0.08, 1), resized bilinearly; no
  Gaussian blur (their CIFAR augmentation has none).
- CIFAR-10's mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010), theirs, for
  training and, as every run, evaluation. For CIFAR-100 use theirs: `--aug.mean 0.5071,0.4867,0.4408
  --aug.std 0.2675,0.2565,0.2761`.
- Queue: the authors use 65,536 keys, more than CIFAR-10's 50,000 images, so stale copies of
  an image are scored as its own negatives; we refuse a queue that is not smaller than the
  dataset and use 16,384 here (a known difference).
- 8 shuffle-BN groups on one process (MoCo's single-GPU CIFAR demo's SplitBatchNorm(8)).
- Evaluation (the loop's k-NN, and the tools that read this run): val images whole, as
  the authors' CIFAR test transform (ToTensor + Normalize): `eval.crop_fraction` 1.0, not
  ImageNet's resize 37 + centre crop 32, which would cut 2-3 px off each side. Their linear
  evaluation (main_lincls_cifar.py: lr 3, steps at epochs 60 and 80, 100 epochs, batch 256,
  RandomCrop(32, padding 4) + flip) is `tools/eval_linear.py RUN --protocol mlcpc-cifar`.
"""

import importlib.util
from pathlib import Path
from types import ModuleType

from fastssl.cli import run
from fastssl.config import Config


def _imagenet_recipe() -> ModuleType:
    """recipes/mlcpc_moco.py, loaded by path (recipes are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("mlcpc_moco", Path(__file__).with_name("mlcpc_moco.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config() -> Config:
    cfg = _imagenet_recipe().config()
    cfg.model.arch, cfg.model.stem = "resnet50", "cifar"
    cfg.model.proj_hidden_dim, cfg.model.proj_dim = 2048, 2048
    cfg.optim.base_lr = 0.3
    cfg.aug.global_size = 32
    cfg.aug.global_scale = (0.08, 1.0)
    cfg.aug.blur_p = (0.0, 0.0, 0.0)
    cfg.aug.mean, cfg.aug.std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    cfg.critic.queue_size = 16384
    cfg.eval.crop_fraction = 1.0
    cfg.train.run_dir = "runs/mlcpc_moco_cifar"
    return cfg


if __name__ == "__main__":
    run(config())
