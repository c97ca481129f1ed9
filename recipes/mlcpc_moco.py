"""ML-CPC in the MoCo-v2 setting (Song & Ermon 2020, Sec. 5.3): a key queue, T 0.07, alpha 10 -> 0.1.

    accelerate launch --multi_gpu --num_processes 8 recipes/mlcpc_moco.py \
        --data.train /data/imagenet/train --data.val /data/imagenet/val

MoCo-v2's recipe: ResNet-50, 2 x 224 crops at scale (0.2, 1) (no local crops), blur p 0.5,
no solarize, a 2048-128 projection head, SGD lr 0.03 x batch/256, wd 1e-4, batch 256,
200 epochs, cosine lr, momentum key encoder 0.999, a queue of 65,536 keys. The loss is
minus the alpha-ML-CPC bound divided by alpha, with the geometric curriculum 10 -> 0.1
(alpha = 1 at half of training), moved once per epoch as in the paper.
"""

from fastssl.cli import run
from fastssl.config import Config


def config() -> Config:
    cfg = Config()
    cfg.method.objective = "mlcpc"
    cfg.critic.queue_size = 65536
    cfg.critic.temperature = 0.07
    cfg.critic.alpha_start, cfg.critic.alpha_end, cfg.critic.alpha_per = 10.0, 0.1, "epoch"
    cfg.model.arch = "resnet50"
    cfg.model.proj_hidden_dim, cfg.model.proj_dim = 2048, 128
    cfg.aug.num_local = 0
    cfg.aug.global_scale = (0.2, 1.0)
    cfg.aug.blur_p = (0.5, 0.5, 0.5)
    cfg.aug.solarize_p = (0.0, 0.0, 0.0)
    cfg.method.ema_momentum_start = cfg.method.ema_momentum_end = 0.999
    cfg.method.freeze_prototypes_epochs = 0
    cfg.optim.name, cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.warmup_epochs = "sgd", 0.03, 1e-4, 0
    cfg.train.epochs = 200
    cfg.train.global_batch_size = 256
    cfg.train.run_dir = "runs/mlcpc_moco"
    cfg.eval.knn_every = 10
    return cfg


if __name__ == "__main__":
    run(config())
