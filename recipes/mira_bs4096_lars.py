"""MIRA, the paper's main setting: global batch 4096, LARS, 400 epochs, multi-crop, EMA.

    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 ... recipes/mira_bs4096_lars.py \
        --data.train /data/imagenet/train --data.val /data/imagenet/val

LARS (eta 0.001, momentum 0.9; BN and bias excluded), wd 1e-6, lr 0.3 x batch/256,
10 warm-up epochs from the authors' `warm_up_start_lr` 0.3 (not batch-scaled) to 4.8, then
per-step cosine (Sec. 4.1 and the authors' code). 75.6% linear top-1 in the paper.
"""

from fastssl.cli import run
from fastssl.config import Config


def config() -> Config:
    cfg = Config()
    cfg.model.arch = "resnet50"
    cfg.optim.name = "lars"
    cfg.optim.base_lr = 0.3
    cfg.optim.weight_decay = 1e-6
    cfg.optim.lars_eta = 0.001
    cfg.optim.warmup_epochs = 10
    cfg.optim.warmup_start_lr = 0.3
    cfg.train.epochs = 400
    cfg.train.global_batch_size = 4096
    cfg.train.run_dir = "runs/mira_bs4096_lars"
    cfg.eval.knn_every = 20
    return cfg


if __name__ == "__main__":
    run(config())
