"""ML-CPC in the authors' MoCo-v2 setting (Song & Ermon 2020, Sec. 5.3): a key queue, T 0.07, alpha 10 -> 0.1.

    accelerate launch --multi_gpu --num_processes 8 recipes/mlcpc_moco.py \
        --data.train /data/imagenet/train --data.val /data/imagenet/val

Each choice and its source (paper = Song & Ermon, "Multi-label Contrastive Predictive Coding",
NeurIPS 2020; code = the authors' representation-learning/main_moco_cifar.py and
moco_builder.py; MoCo-v2 = its ImageNet recipe):
- loss: minus the alpha-ML-CPC bound divided by alpha, the whole N x (1 + Q) score matrix in
  ONE denominator (paper Eq. 6; code), per process as in the code (N = this GPU's rows:
  32 of the 256 on 8 GPUs); geometric curriculum alpha 10 -> 0.1, moved once per
  epoch (paper Sec. 5.3).
- ONE direction (`critic.direction one_way`): query = student on view 0, key = EMA key
  encoder on view 1, B keys enqueued per step (code). Our `mira+mlcpc` default is symmetric.
- shuffle-BN in the key encoder (`critic.shuffle_bn`; code / MoCo): across processes each
  process normalises its slice of a globally shuffled batch; on one process, 8 BN groups of
  the shuffled batch (MoCo's single-GPU CIFAR demo's SplitBatchNorm).
- critic: scores q.k / T with T = 0.07, queue of 65,536 keys gathered from all ranks (code).
  Keep the queue smaller than the dataset (the code's 65,536 > CIFAR's 50,000 would score
  stale copies of an image as its own negatives; we refuse that).
- head: Linear(2048, 2048)-ReLU-Linear(2048, 128) with biases, no BN (`model.head moco`;
  MoCo-v2's `--mlp` with its default `--moco-dim 128`: the authors' ImageNet code is not public,
  their CIFAR command uses 2048, recipes/mlcpc_moco_cifar.py).
- optimiser: SGD momentum 0.9, lr 0.03 x batch/256, weight decay 1e-4 on EVERY parameter,
  BN and bias included (`optim.decay_bn_bias`; code: plain torch SGD over all parameters),
  cosine lr set once per epoch with no warm-up (`optim.cosine_per epoch`; code's
  adjust_learning_rate), batch 256, 200 epochs (MoCo-v2).
- key encoder momentum 0.999, constant (MoCo-v2).
- augmentation: 2 x 224 crops at scale (0.2, 1), no local crops, colour jitter
  (0.4, 0.4, 0.4, 0.1) with p 0.8, grayscale 0.2, blur p 0.5, no solarize (MoCo-v2 / code).
  Crops resized bilinearly (`aug.interpolation bilinear`; code: torchvision's RandomResizedCrop
  default; MIRA's recipes keep bicubic). FFCV resizes with INTER_AREA whatever the recipe says.
- BatchNorm of the student (query encoder): per-view statistics (`model.bn_stats per_view`, as
  separate query/key forwards), over each process's own images (`model.sync_bn false`): MoCo's
  query encoder uses plain per-GPU BatchNorm (MIRA's recipes synchronise theirs).
- initialisation: torchvision's ResNet as MoCo builds it, residual branches not zeroed
  (`model.zero_init_residual false`; MIRA's recipes zero them, as its authors).
- evaluation: the query encoder (the student) is exported and scored by the k-NN
  (`model.export student`; code: main_lincls_cifar.py keeps `module.encoder_q`), where MIRA's
  recipes export the EMA teacher.
- not here: the paper's Table 4 (ImageNet, ResNet-18, 30 epochs) is not this recipe's setting
  (`--model.arch resnet18 --train.epochs 30`); MoCo-v2's ImageNet T is 0.2, the authors' 0.07
  comes from their CIFAR command. With one process, N (this process's rows) and the query
  encoder's BatchNorm batch are the whole 256, where the authors' per-GPU share depends on their
  GPU count (not stated).
"""

from fastssl.cli import run
from fastssl.config import Config


def config() -> Config:
    cfg = Config()
    cfg.method.objective = "mlcpc"
    cfg.critic.direction = "one_way"
    cfg.critic.shuffle_bn, cfg.critic.shuffle_bn_splits = True, 8
    cfg.critic.queue_size = 65536
    cfg.critic.temperature = 0.07
    cfg.critic.alpha_start, cfg.critic.alpha_end, cfg.critic.alpha_per = 10.0, 0.1, "epoch"
    cfg.model.arch = "resnet50"
    cfg.model.head = "moco"
    cfg.model.proj_hidden_dim, cfg.model.proj_dim = 2048, 128
    cfg.model.sync_bn = False
    cfg.model.export = "student"
    cfg.model.zero_init_residual = False
    cfg.aug.num_local = 0
    cfg.aug.global_scale = (0.2, 1.0)
    cfg.aug.jitter = (0.4, 0.4, 0.4, 0.1)
    cfg.aug.interpolation = "bilinear"
    cfg.aug.blur_p = (0.5, 0.5, 0.5)
    cfg.aug.solarize_p = (0.0, 0.0, 0.0)
    cfg.method.ema_momentum_start = cfg.method.ema_momentum_end = 0.999
    cfg.method.freeze_prototypes_epochs = 0
    cfg.optim.name, cfg.optim.base_lr, cfg.optim.weight_decay, cfg.optim.warmup_epochs = "sgd", 0.03, 1e-4, 0
    cfg.optim.decay_bn_bias = True
    cfg.optim.cosine_per = "epoch"
    cfg.train.epochs = 200
    cfg.train.global_batch_size = 256
    cfg.train.run_dir = "runs/mlcpc_moco"
    cfg.eval.knn_every = 10
    return cfg


if __name__ == "__main__":
    run(config())
