"""MIRA + the ML-CPC critic in the Table 8 setting (batch 512, 8 GPUs x 64, SGD, 100 epochs).

    accelerate launch --multi_gpu --num_processes 8 recipes/mira_mlcpc_bs512.py \
        --data.train /data/imagenet/train --data.val /data/imagenet/val

Everything of `mira_bs512.py`, plus the queue-based alpha-ML-CPC critic on the projector
embeddings of the two global views (teacher keys from the EMA teacher, queue 65,536,
T 0.07, alpha 10 -> 0.1 per epoch), added to the swapped-prediction loss with weight
`method.mlcpc_weight` (1.0 here: not tuned on ImageNet).
"""

import importlib.util
from pathlib import Path

from fastssl.cli import run
from fastssl.config import Config


def config() -> Config:
    spec = importlib.util.spec_from_file_location("mira_bs512", Path(__file__).with_name("mira_bs512.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    cfg = base.config()
    cfg.method.objective = "mira+mlcpc"
    cfg.method.mlcpc_weight = 1.0
    cfg.critic.queue_size = 65536
    cfg.critic.temperature = 0.07
    cfg.critic.alpha_start, cfg.critic.alpha_end, cfg.critic.alpha_per = 10.0, 0.1, "epoch"
    cfg.train.run_dir = "runs/mira_mlcpc_bs512"
    return cfg


if __name__ == "__main__":
    run(config())
