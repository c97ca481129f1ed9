"""Knowledge distillation with alpha-ML-CPC on CIFAR-100 (Song & Ermon 2020, Sec. 5.2, Table 1):
resnet32x4 teacher -> resnet8x4 student, CRD's setting (Tian et al. 2020) with CRD's NCE
objective replaced by the alpha-ML-CPC bound J_alpha at a fixed alpha.

    # 1. the teacher: labels only (writes runs/teacher_resnet32x4/classifier.pt)
    python recipes/distill_mlcpc_cifar100.py --data.root /data/cifar --model.student resnet32x4 \
        --loss.kd_weight 0 --loss.mi_weight 0 --train.run_dir runs/teacher_resnet32x4
    # 2. the student: CE + ML-CPC (add --loss.kd_weight 1 for CRD's "CRD+KD" variant)
    python recipes/distill_mlcpc_cifar100.py --data.root /data/cifar \
        --model.teacher runs/teacher_resnet32x4/classifier.pt

CIFAR-100 is read from torchvision's on-disk format (/data/cifar/cifar-100-python/; nothing is
downloaded), or from ImageNet-layout folders with --data.source folder --data.train DIR --data.val DIR.
Values (fastssl.distill.config's defaults; sources there): CRD's train_student.py -- batch 64,
240 epochs, SGD lr 0.05 (x0.1 at 150, 180, 210), momentum 0.9, wd 5e-4, embedding dim 128,
CRD's memory with 16,384 negatives of other classes per query (the authors' ContrastMemory;
--loss.negatives queue for FIFO queues), tau 0.07, KD T 4 -- and CRD's own weights -r 1 -a 0 -b 0.8 (CE 1, no KD,
bound 0.8): the paper replaces CRD's objective, and its tables' CRD rows are CRD without KD.
alpha 0.05: ML-CPC Table 1's J_0.05 (75.50% on this pair; Fig. 4's best alphas are 0.01-0.05,
around alpha_min(64, 16384) ~ 0.0156). --loss.kd_weight 1 adds Hinton's KD (CRD's "CRD+KD").
"""

from fastssl.distill.config import DistillConfig
from fastssl.distill.command import run


def config() -> DistillConfig:
    cfg = DistillConfig()
    cfg.data.source = "cifar100"
    cfg.model.student = "resnet8x4"
    cfg.train.run_dir = "runs/distill_mlcpc_cifar100"
    return cfg


if __name__ == "__main__":
    run(config())
