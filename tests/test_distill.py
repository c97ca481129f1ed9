"""Knowledge distillation with ML-CPC (fastssl.distill): the math, the models, the loop, the CLI."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastssl import checkpoint as ckpt
from fastssl.critic import MlCpcCritic
from fastssl.distill.config import DistillConfig
from fastssl.distill.data import build_datasets
from fastssl.distill.losses import kd_loss, mi_bound
from fastssl.distill.objective import DistillObjective
from fastssl.distill.command import run
from fastssl.distill.classifier_file import CLASSIFIER_NAME, save_classifier
from fastssl.losses import cpc_bound, ml_cpc_bound
from fastssl.models.cifar_resnet import build_classifier
from pipelines.folder import DataLayoutError
from test_engine import child_processes

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "distill_mlcpc_cifar100.py"


# --------------------------------------------------------------------------- the math


@pytest.mark.parametrize("a,T", [(3.0, 4.0), (-8.0, 2.0), (0.5, 1.0)])
def test_kd_loss_closed_form(a: float, T: float) -> None:
    """Two classes, student logits equal, teacher (a, 0): KL(p_t || uniform) = log 2 - H(p_t), times T^2."""
    p = 1 / (1 + math.exp(-a / T))  # teacher softmax at temperature T
    expected = T ** 2 * (math.log(2) + p * math.log(p) + (1 - p) * math.log(1 - p))
    s = torch.zeros(3, 2, dtype=torch.float64)
    t = torch.tensor([[a, 0.0]] * 3, dtype=torch.float64)
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-12)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-12)  # same predictions: nothing to distil


def test_kd_loss_gradient_is_scaled_softmax_difference() -> None:
    """d KD / d z_s = T (p_s - p_t) / n (Hinton et al. 2015, Eq. 2 times T^2 / n)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 5, generator=g, dtype=torch.float64)
    T = 4.0
    kd_loss(s, t, T).backward()
    expected = T * (F.softmax(s.detach() / T, 1) - F.softmax(t / T, 1)) / 4
    torch.testing.assert_close(s.grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bound,fn", [("mlcpc", ml_cpc_bound), ("cpc", cpc_bound)])
def test_objective_equals_bound_functions_float64(bound, fn) -> None:
    """The distillation term is Eq. 6 (Eq. 4) of ML-CPC on <s, t>/tau scores against the queue, in float64."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g, dtype=torch.float64)
    queue = torch.randn(10, 8, generator=g, dtype=torch.float64)
    tau, alpha = 0.07, 0.05
    sn, tn, qn = (x / x.norm(dim=1, keepdim=True) for x in (s, t, queue))
    pos, neg = (sn * tn).sum(1) / tau, sn @ qn.T / tau
    expected = fn(pos, neg, alpha)
    got = mi_bound(s, t, queue, alpha, tau, bound)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected.item(), rel=1e-13, abs=1e-13)
    # Eq. 6 written out: one denominator over all n m pairs
    m, n = neg.shape[1] + 1, 6
    if bound == "mlcpc":
        den = alpha * pos.exp().sum() + (m - alpha) / (m - 1) * neg.exp().sum()
        assert got.item() == pytest.approx((torch.log(n * m * pos.exp() / den)).mean().item(), rel=1e-12)


def test_objective_weights_and_queue_order() -> None:
    """loss = gamma CE + a KD - beta (J(s -> t) + J(t -> s)); keys enter the queues only after scoring."""
    torch.manual_seed(0)
    critic, student_critic = (MlCpcCritic(queue_size=16, dim=8, temperature=0.07, direction="one_way")
                              for _ in range(2))
    obj = DistillObjective(ce_weight=1.0, kd_weight=0.9, mi_weight=0.8, kd_temperature=4.0, alpha=0.05,
                           bound="mlcpc", critic=critic, student_critic=student_critic)
    ls, lt, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    es, et = torch.randn(4, 8), torch.randn(4, 8)
    teacher_queue, student_queue = critic.queue.keys.clone(), student_critic.queue.keys.clone()
    terms = obj(ls, y, lt, es, et)
    j_s, j_t = mi_bound(es, et, teacher_queue, 0.05, 0.07), mi_bound(et, es, student_queue, 0.05, 0.07)
    expected = F.cross_entropy(ls, y) + 0.9 * kd_loss(ls, lt, 4.0) - 0.8 * (j_s + j_t)
    assert terms.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert (terms.mi_nats.item(), terms.mi_t_nats.item()) == pytest.approx((j_s.item(), j_t.item()), rel=1e-6)
    assert torch.equal(critic.queue.keys, teacher_queue)  # scoring does not enqueue
    obj.finish_step(es, et)
    torch.testing.assert_close(critic.queue.ordered()[-4:], F.normalize(et, dim=1))
    torch.testing.assert_close(student_critic.queue.ordered()[-4:], F.normalize(es, dim=1))
    assert set(obj.state.state_dict()) == {"teacher_keys.queue.keys", "teacher_keys.queue.ptr",
                                           "student_keys.queue.keys", "student_keys.queue.ptr"}


def test_cifar_resnets_match_crd_sizes() -> None:
    """resnet8x4 / resnet32x4: 1.23M / 7.43M parameters on CIFAR-100 (CRD, Tian et al. 2020, Table 1's models),
    256-d features, 100 logits from 32-px images."""
    for arch, millions in (("resnet8x4", 1.23), ("resnet32x4", 7.43)):
        net = build_classifier(arch, 100)
        assert round(sum(p.numel() for p in net.parameters()) / 1e6, 2) == millions
        logits, feats = net(torch.randn(2, 3, 32, 32))
        assert logits.shape == (2, 100) and feats.shape == (2, 256)


def test_the_recipe_trains_crds_objective_with_ml_cpc_in_place_of_its_nce() -> None:
    """ML-CPC Sec. 5.2 replaces CRD's objective keeping CRD's hyper-parameters; the CRD rows of its Tables 1-2
    (75.48 / 75.51 ...) are CRD without KD (-r 1 -a 0 -b 0.8). The recipe's default had added KD (-a 1)."""
    from conftest import load_recipe

    loss = load_recipe("distill_mlcpc_cifar100").loss
    assert (loss.ce_weight, loss.kd_weight, loss.mi_weight) == (1.0, 0.0, 0.8)
    assert (loss.bound, loss.alpha, loss.temperature, loss.queue_size) == ("mlcpc", 0.05, 0.07, 16384)


# --------------------------------------------------------------------------- data


def make_folder(root: Path, classes: int = 4, per_class: int = 24, size: int = 16) -> None:
    """Images whose class is their colour, each with its own smooth random pattern (so the
    teacher's embeddings tell the images apart, and the student has something to match)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 8)):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            colour = np.array([(c * 70) % 256, (c * 130 + 40) % 256, (255 - c * 60) % 256])
            for i in range(n):
                pattern = np.kron(rng.normal(0, 60, (4, 4, 3)), np.ones((size // 4, size // 4, 1)))
                img = np.clip(colour + pattern + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")


def test_cifar100_on_disk_format(tmp_path: Path, monkeypatch) -> None:
    """torchvision's own cifar-100-python files (written here) are read with download=False.

    Only torchvision's md5 check of the official files is bypassed; its reader runs as is."""
    import torchvision

    cfg = DistillConfig().data
    cfg.root = str(tmp_path)
    with pytest.raises(DataLayoutError, match="no readable cifar-100-python"):
        build_datasets(cfg)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 4)):
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": list(range(n)), "coarse_labels": [0] * n}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"k{i}" for i in range(100)], "coarse_label_names": ["a"] * 20}, f)
    train, test, classes = build_datasets(cfg)
    x, y = train[3]
    assert (len(train), len(test), classes, tuple(x.shape), y) == (6, 4, 100, (3, 32, 32), 3)


# --------------------------------------------------------------------------- the loop


def tiny_args(tmp_path: Path, run: str, *extra: str) -> list[str]:
    return ["--data.source", "folder", "--data.train", str(tmp_path / "data" / "train"),
            "--data.val", str(tmp_path / "data" / "val"), "--data.image_size", "16", "--data.num_workers", "0",
            "--model.student", "resnet8", "--train.batch_size", "16", "--train.log_every", "1",
            "--train.run_dir", str(tmp_path / run), "--train.cpu", "true", "--optim.lr", "0.05",
            "--loss.queue_size", "48", *extra]


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    """Data and a (random) resnet8 teacher in the teacher format."""
    make_folder(tmp_path / "data")
    torch.manual_seed(123)
    path = tmp_path / "teacher.pt"
    save_classifier(build_classifier("resnet8", 4), "resnet8", 4, "cifar", path)
    return path


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_distillation_mi_rises_loss_falls(tmp_path: Path, teacher: Path) -> None:
    """CE + KD + ML-CPC on generated data: once the queues hold real embeddings (from epoch 2: the
    first epoch starts on MoCo's random unit-vector queue, an easy negative set), the ML-CPC estimate
    between student and teacher embeddings rises and the loss falls; the student is written in the
    teacher format."""
    results = run(DistillConfig(), tiny_args(tmp_path, "run", "--model.teacher", str(teacher),
                                             "--train.epochs", "10"), prog="distill")
    rows = read_rows(tmp_path / "run" / "epochs.csv")
    assert len(rows) == 10
    second, last = rows[1], rows[-1]
    assert float(last["mi_nats"]) > float(second["mi_nats"]) + 0.1
    assert float(last["mi_t_nats"]) > min(float(r["mi_t_nats"]) for r in rows[1:]) + 0.05  # the other direction
    assert float(last["loss"]) < float(second["loss"]) - 0.1
    assert 0 <= results["final_top1"] <= 100
    saved = torch.load(tmp_path / "run" / CLASSIFIER_NAME, weights_only=False)
    assert (saved["arch"], saved["num_classes"]) == ("resnet8", 4)


def test_unreadable_images_are_skipped_with_a_warning_not_the_end_of_the_run(tmp_path: Path, teacher: Path) -> None:
    """One 0-byte JPEG in train and one in val ended the run with PIL's traceback; now a training image is
    replaced by the next readable one (batches keep their size), and evaluation leaves the bad one out."""
    from fastssl.distill.data import SeededItems

    (tmp_path / "data" / "train" / "c0" / "0.png").write_bytes(b"")
    (tmp_path / "data" / "val" / "c1" / "0.png").write_bytes(b"")
    train_set, _, _ = build_datasets(DistillConfig(data=dataclasses.replace(
        DistillConfig().data, source="folder", train=str(tmp_path / "data" / "train"),
        val=str(tmp_path / "data" / "val"), image_size=16)).data)
    bad = [p for p, _ in train_set.samples].index(str(tmp_path / "data" / "train" / "c0" / "0.png"))
    with pytest.warns(UserWarning, match="skipping unreadable image .*0.png"):
        x, y, used = SeededItems(train_set, 0)[(0, bad)]
    assert used == bad + 1 and y == train_set.samples[bad + 1][1] and x.shape == (3, 16, 16)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        results = run(DistillConfig(), tiny_args(tmp_path, "run", "--model.teacher", str(teacher),
                                                 "--train.epochs", "1"), prog="distill")
    assert 0 <= results["final_top1"] <= 100


def test_a_folder_of_one_class_is_refused_in_the_distillation_trainers_own_terms(tmp_path: Path) -> None:
    """The refusal named the self-supervised recipes' k-NN flags, which this trainer has not."""
    from fastssl.config import ConfigError

    make_folder(tmp_path / "data", classes=1)
    cfg = DistillConfig(data=dataclasses.replace(DistillConfig().data, source="folder",
                                                  train=str(tmp_path / "data" / "train"),
                                                  val=str(tmp_path / "data" / "val"), image_size=16))
    with pytest.raises((DataLayoutError, ConfigError)) as info:
        build_datasets(cfg.data)
    assert "the distillation trainer's classifier and its top-1 need labelled images in at least 2 class" \
        in str(info.value) and "--eval.knn_every" not in str(info.value), info.value


def test_a_transforms_error_is_raised_not_taken_for_an_unreadable_image(tmp_path: Path) -> None:
    """Any ValueError in an item's transform was taken for an unreadable file: every image was passed over."""
    from fastssl.distill.data import SeededItems

    make_folder(tmp_path / "data")
    train_set, _, _ = build_datasets(DistillConfig(data=dataclasses.replace(
        DistillConfig().data, source="folder", train=str(tmp_path / "data" / "train"),
        val=str(tmp_path / "data" / "val"), image_size=16)).data)

    def broken(image: object) -> None:
        raise ValueError("a transform's bug")

    train_set.transform = broken
    with pytest.raises(ValueError, match="a transform's bug"):
        SeededItems(train_set, 0)[(0, 0)]


def test_a_val_split_with_no_readable_image_keeps_the_epoch_and_exits_2(tmp_path: Path, teacher: Path,
                                                                        capsys) -> None:
    """Its top-1 was 0 %, as if the student had learned nothing; now the epoch is saved first, one
    line says why and how to go on, and that command (once the images are fixed) ends the run."""
    val = tmp_path / "data" / "val"
    kept = {p: p.read_bytes() for p in val.rglob("*.png")}
    for p in kept:
        p.write_bytes(b"not an image")
    args = tiny_args(tmp_path, "run", "--model.teacher", str(teacher), "--train.epochs", "2",
                     "--train.steps_per_epoch", "2", "--train.eval_every", "1")
    with pytest.raises(SystemExit) as exc, pytest.warns(UserWarning, match="skipping unreadable image"):
        run(DistillConfig(), args, prog="distill.py")
    err = capsys.readouterr().err
    run_dir = tmp_path / "run"
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: data.val: none of its {len(kept)} images could be read"), err
    assert "epoch 1 is saved: once the folder is fixed, continue with python distill.py " in err, err
    assert [r["epoch"] for r in read_rows(run_dir / "epochs.csv")] == ["1"] and ckpt.saved_config(run_dir)
    for p, data in kept.items():
        p.write_bytes(data)
    results = run(DistillConfig(), err.split("continue with python distill.py ", 1)[1].split(), prog="distill.py")
    assert [r["epoch"] for r in results["top1"]] == [2] and (run_dir / CLASSIFIER_NAME).is_file()
    for p in kept:  # unreadable at the last epoch: a resume would find the run finished, so that is said
        p.write_bytes(b"not an image")
    with pytest.raises(SystemExit), pytest.warns(UserWarning, match="skipping unreadable image"):
        run(DistillConfig(), tiny_args(tmp_path, "last", "--model.teacher", str(teacher), "--train.epochs", "1",
                                       "--train.steps_per_epoch", "2"), prog="distill.py")
    err = capsys.readouterr().err
    assert (f"every epoch (1) is trained and saved, so a resume has nothing left to do; the student is in "
            f"{tmp_path / 'last' / CLASSIFIER_NAME}, its top-1 not measured") in err, err


@pytest.mark.parametrize("negatives", ["memory", "queue"])
def test_resume_matches_uninterrupted(tmp_path: Path, teacher: Path, negatives: str) -> None:
    """2 epochs in one go == 1 epoch, then --resume to 2 (memory or queues, optimiser, RNG and data order
    restored)."""
    common = ["--model.teacher", str(teacher), "--train.steps_per_epoch", "3", "--loss.negatives", negatives]
    run(DistillConfig(), tiny_args(tmp_path, "once", *common, "--train.epochs", "2"))
    run(DistillConfig(), tiny_args(tmp_path, "first", *common, "--train.epochs", "1"))
    (tmp_path / "first").rename(tmp_path / "twice")  # a run directory moved (or restored) elsewhere resumes
    run(DistillConfig(), tiny_args(tmp_path, "twice", *common, "--train.epochs", "2") + ["--resume"])
    a = torch.load(tmp_path / "once" / CLASSIFIER_NAME, weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "twice" / CLASSIFIER_NAME, weights_only=False)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    q1 = torch.load(tmp_path / "once" / "checkpoint.pt", weights_only=False)["critic"]
    q2 = torch.load(tmp_path / "twice" / "checkpoint.pt", weights_only=False)["critic"]
    assert q1.keys() == q2.keys() and all(torch.equal(q1[k], q2[k]) for k in q1)
    assert {k.split(".")[0] for k in q1} == ({"memory"} if negatives == "memory" else {"teacher_keys", "student_keys"})
    assert [r["step"] for r in read_rows(tmp_path / "twice" / "train_log.csv")] == [str(i) for i in range(1, 7)]


def test_a_run_saved_before_the_memory_existed_resumes_with_its_queues(tmp_path: Path, teacher: Path,
                                                                        capsys) -> None:
    """A run's config from before `loss.negatives` (and the kd_weight default of 1) lacks the field; it used
    queues. Its resume met a traceback (the memory's keys missing from the checkpoint), and with
    `--loss.negatives queue` a refusal that said the run had used the memory. The refusal now names the
    flags that resume it, and they do."""
    import json

    common = ["--model.teacher", str(teacher), "--train.steps_per_epoch", "2", "--loss.kd_weight", "1"]
    run(DistillConfig(), tiny_args(tmp_path, "old", *common, "--loss.negatives", "queue", "--train.epochs", "1"))
    run_dir = tmp_path / "old"
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    del state["config"]["loss"]["negatives"]  # as written before the field existed
    torch.save(state, run_dir / "checkpoint.pt")
    config = json.loads((run_dir / "config.json").read_text())
    del config["loss"]["negatives"]
    (run_dir / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    plain = tiny_args(tmp_path, "old", "--model.teacher", str(teacher), "--train.steps_per_epoch", "2",
                      "--train.epochs", "2", "--resume")
    with pytest.raises(SystemExit) as exc:
        run(DistillConfig(), plain)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err
    assert ("loss.kd_weight (1.0 in the run, 0.0 now), loss.negatives ('queue' in the run, 'memory' now); resume "
            "with the run's values (--loss.kd_weight 1.0 --loss.negatives queue: ") in err, err
    results = run(DistillConfig(), plain + ["--loss.kd_weight", "1.0", "--loss.negatives", "queue"])
    assert [r["epoch"] for r in results["top1"]] == [1, 2]


def test_resuming_a_finished_run_says_so_and_trains_nothing(tmp_path: Path, teacher: Path, capsys) -> None:
    """A requeue after the end (--resume auto) or a repeated command: one line; the classifier,
    checkpoint, logs and results stay as they were."""
    args = tiny_args(tmp_path, "run", "--model.teacher", str(teacher), "--train.epochs", "1",
                     "--train.steps_per_epoch", "2")
    first = run(DistillConfig(), args)
    run_dir = tmp_path / "run"
    kept = (CLASSIFIER_NAME, "checkpoint.pt", "train_log.csv", "epochs.csv", "results.json", "config.json")
    before = {name: (run_dir / name).read_bytes() for name in kept}
    capsys.readouterr()
    again = run(DistillConfig(), args + ["--resume", "auto"])
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"the run in {run_dir} has finished its 1 epoch (step 2): nothing to do", out
    assert {name: (run_dir / name).read_bytes() for name in kept} == before
    assert again == first
    run(DistillConfig(), args + ["--resume", "--optim.lr", "0.001"])  # config.json took the new lr, as if it ran
    assert "nothing to do" in capsys.readouterr().out
    assert {name: (run_dir / name).read_bytes() for name in kept} == before


@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigterm_mid_epoch_then_resume_matches_uninterrupted(tmp_path: Path, teacher: Path, monkeypatch, capsys,
                                                             workers: str) -> None:
    """A real SIGTERM after step 4 (the first of epoch 2's three): GracefulStop lets the step finish,
    the loop checkpoints mid-epoch and exits 143; --resume then logs the same steps, losses and
    epoch means, and ends with the same weights and queues, as the uninterrupted run (with and
    without DataLoader workers: each image's augmentation is drawn from its own seed).

    A terminal's Ctrl-C or SLURM's scancel sends the signal to the trainer's whole process group;
    a worker still in it would die of it and fail the trainer, so the workers must have left it."""
    common = ["--model.teacher", str(teacher), "--train.steps_per_epoch", "3", "--train.epochs", "2",
              "--data.num_workers", workers]
    run(DistillConfig(), tiny_args(tmp_path, "once", *common))
    steps, finish_step, me = [0], DistillObjective.finish_step, os.getpid()
    earlier = set(child_processes(me))  # the suite's own (a converter's fork server): not the run's

    def finish_then_sigterm(self, *args):
        finish_step(self, *args)
        steps[0] += 1
        if steps[0] == 4:
            workers_now = set(child_processes(me)) - earlier
            assert len(workers_now) == int(workers)  # mid-epoch: the epoch's workers live
            assert all(os.getpgid(c) != os.getpgid(me) for c in workers_now)  # out of the group's signals
            os.kill(me, signal.SIGTERM)

    monkeypatch.setattr(DistillObjective, "finish_step", finish_then_sigterm)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run(DistillConfig(), tiny_args(tmp_path, "stopped", *common))
    assert exc.value.code == 128 + signal.SIGTERM.value
    out = capsys.readouterr().out
    assert f"stopped by SIGTERM at epoch 1 step 4: checkpoint saved in {tmp_path / 'stopped'}" in out
    assert "--resume" in out.split("continue with:")[1]
    state = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)["state"]
    assert (state["epoch"], state["step"], state["batch_in_epoch"], state["epoch_loss_steps"]) == (1, 4, 1, 1)
    monkeypatch.undo()
    run(DistillConfig(), tiny_args(tmp_path, "stopped", *common) + ["--resume"])

    def logged(run_dir: str, name: str, timing: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k != timing} for r in read_rows(tmp_path / run_dir / name)]

    assert [r["step"] for r in logged("stopped", "train_log.csv", "images_per_s")] == [str(i) for i in range(1, 7)]
    assert logged("stopped", "train_log.csv", "images_per_s") == logged("once", "train_log.csv", "images_per_s")
    assert logged("stopped", "epochs.csv", "seconds") == logged("once", "epochs.csv", "seconds")
    a = torch.load(tmp_path / "once" / CLASSIFIER_NAME, weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "stopped" / CLASSIFIER_NAME, weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    q1 = torch.load(tmp_path / "once" / "checkpoint.pt", weights_only=False)["critic"]
    q2 = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)["critic"]
    assert all(torch.equal(q1[k], q2[k]) for k in q1)


def test_existing_run_is_not_overwritten(tmp_path: Path, teacher: Path, capsys) -> None:
    args = tiny_args(tmp_path, "run", "--model.teacher", str(teacher), "--train.epochs", "1",
                     "--train.steps_per_epoch", "1")
    run(DistillConfig(), args)
    with pytest.raises(SystemExit) as exc:
        run(DistillConfig(), args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "already holds a run; continue it with: " in err
    assert " --resume" in err.split("continue it with: ")[1]  # the command that continues it, not just the flag
    with pytest.raises(SystemExit) as exc:  # said before the data is read
        run(DistillConfig(), args + ["--data.train", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "already holds a run" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a start refused for its data leaves no run directory behind
        run(DistillConfig(), tiny_args(tmp_path, "new", "--model.teacher", str(teacher), "--data.train",
                                       str(tmp_path / "nowhere")))
    assert exc.value.code == 2 and "nowhere" in capsys.readouterr().err and not (tmp_path / "new").exists()
    (tmp_path / "run" / "checkpoint.pt").rename(tmp_path / "kept.pt")  # deleted to save space
    with pytest.raises(SystemExit) as exc:  # the trained classifier stays
        run(DistillConfig(), args)
    assert exc.value.code == 2 and f"holds {CLASSIFIER_NAME} of an earlier run" in capsys.readouterr().err
    (tmp_path / "kept.pt").rename(tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(SystemExit) as exc:  # a resume that would compute something else names both values
        run(DistillConfig(), args + ["--resume", "--loss.alpha", "0.01"])
    assert exc.value.code == 2 and ("these fields differ from the run being resumed in "
                                    f"{tmp_path / 'run'}: loss.alpha (0.05 in the run, 0.01 now); resume with the "
                                    "run's values") in capsys.readouterr().err
    from fastssl.config import Config, to_dict as ssl_dict

    path = tmp_path / "run" / "checkpoint.pt"  # as if a MIRA run's directory: one line, not a field-by-field list
    torch.save({**torch.load(path, weights_only=False), "config": ssl_dict(Config())}, path)
    with pytest.raises(SystemExit) as exc:
        run(DistillConfig(), args + ["--resume"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "holds a run of another recipe" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:  # a fresh start is not told to --resume what it cannot
        run(DistillConfig(), args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "already holds a run of another trainer (its saved config has the sections " \
        "aug, critic, eval, method): continue it with the recipe that started it" in err and "--resume" not in err


def two_epochs_that_fail(tmp_path: Path, teacher: Path, capsys, *extra: str) -> str:
    """`python distill.py` for 2 epochs of 3 steps in tmp_path/run (`extra`: more flags), which must exit 2
    with one line and no traceback; that line."""
    args = tiny_args(tmp_path, "run", "--model.teacher", str(teacher), "--train.epochs", "2",
                     "--train.steps_per_epoch", "3", *extra)
    with pytest.raises(SystemExit) as exc:
        run(DistillConfig(), args, prog="distill.py")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_a_loss_that_stops_being_finite_exits_2_and_its_advice_resumes_with_a_lower_lr(tmp_path: Path, teacher: Path,
                                                                                        monkeypatch, capsys) -> None:
    """The advice is a command that runs: --resume with a lower --optim.lr (accepted, with a warning)."""
    real, calls = DistillObjective.__call__, [0]

    def nan_at_step_5(self, *args, **kwargs):
        terms = real(self, *args, **kwargs)
        calls[0] += 1
        return dataclasses.replace(terms, loss=terms.loss * math.nan) if calls[0] == 5 else terms

    monkeypatch.setattr(DistillObjective, "__call__", nan_at_step_5)
    err = two_epochs_that_fail(tmp_path, teacher, capsys)
    run_dir = tmp_path / "run"
    assert err.startswith("error: training diverged at epoch 2 step 5: the loss is nan; no checkpoint was written "
                          "after it, so continue from the last good one (step 3) with a lower --optim.lr: "
                          "python distill.py "), err
    assert err.rstrip().endswith(f"--resume --train.run_dir {run_dir} --optim.lr 0.005"), err
    monkeypatch.undo()
    advised = err.rstrip().split(": python distill.py ", 1)[1].split()
    results = run(DistillConfig(), advised, prog="distill.py")
    out, err = capsys.readouterr()
    assert "warning: --resume with optim.lr changed from 0.05 to 0.005" in err
    assert re.search(r"^epoch 2/2: loss \d+\.\d{4}, top-1 \d+\.\d\d% \(\d+\.\d s\)$", out, re.M), out  # a line per epoch
    assert len(results["top1"]) == 1 and [r["step"] for r in read_rows(run_dir / "train_log.csv")] == \
        [str(i) for i in range(1, 7)]


def test_a_loss_not_finite_before_any_update_names_its_causes_not_the_lr(tmp_path: Path, teacher: Path,
                                                                          capsys) -> None:
    """A temperature so small that the logits overflow gave NaN at the first step, and the advice was a
    lower lr, which had not acted yet; the advice now names the loss's settings and starts again."""
    err = two_epochs_that_fail(tmp_path, teacher, capsys, "--loss.temperature", "1e-300")
    assert re.match(r"error: training diverged at epoch 1 step 1: the loss is (nan|inf); no update had been made "
                    r"yet, so the learning rate is not the cause: check the loss's temperatures "
                    r"\(--loss.temperature, --loss.kd_temperature\)", err), err
    assert "--optim.lr 0.005" not in err and "--resume" not in err and err.rstrip().endswith(
        f"--train.run_dir {tmp_path / 'run'}"), err


def test_a_teacher_whose_weights_are_not_finite_is_refused_before_training(tmp_path: Path, teacher: Path,
                                                                          capsys) -> None:
    data = torch.load(teacher, weights_only=False)
    name = next(k for k, v in data["state_dict"].items() if v.is_floating_point())
    data["state_dict"][name] = data["state_dict"][name] * math.nan
    torch.save(data, teacher)
    with pytest.raises(SystemExit) as exc:
        run(DistillConfig(), tiny_args(tmp_path, "run", "--model.teacher", str(teacher)), prog="distill.py")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith(f"error: model.teacher: {str(teacher)!r} holds weights that are not "
                                                  f"finite ({name}): a diverged run's?"), err
    assert not (tmp_path / "run").exists()


def test_a_full_disk_at_a_save_exits_2_keeps_the_last_checkpoint_and_its_advice_continues(tmp_path: Path,
                                                                                        teacher: Path, monkeypatch,
                                                                                        capsys) -> None:
    """Epoch 1's checkpoint is written; the disk is full at epoch 2's: one line naming the cause and
    the command that continues from step 3, which then ends the run."""
    import shutil
    from collections import namedtuple

    usage, real_usage, saves = namedtuple("usage", "total used free"), shutil.disk_usage, []
    real_save = ckpt.save_checkpoint

    def count_saves(*args, **kwargs):
        saves.append(kwargs["state"].step)
        return real_save(*args, **kwargs)

    def full_after_the_first_save(path):
        return usage(2**40, 2**40 - 2**20, 2**20) if saves[1:] else real_usage(path)

    monkeypatch.setattr(ckpt, "save_checkpoint", count_saves)
    monkeypatch.setattr(shutil, "disk_usage", full_after_the_first_save)
    err = two_epochs_that_fail(tmp_path, teacher, capsys)
    run_dir = tmp_path / "run"
    assert err.startswith("error: not enough free space") and "then continue from the checkpoint of step 3 with: " \
        "python distill.py " in err and err.rstrip().endswith(f"--resume --train.run_dir {run_dir}"), err
    assert ckpt.saved_config(run_dir) is not None and not (run_dir / CLASSIFIER_NAME).exists()
    monkeypatch.undo()
    results = run(DistillConfig(), err.rstrip().split(": python distill.py ", 1)[1].split(), prog="distill.py")
    assert [r["epoch"] for r in results["top1"]] == [2] and (run_dir / CLASSIFIER_NAME).is_file()


def test_a_full_disk_at_the_start_exits_2_before_any_record_is_written(tmp_path: Path, teacher: Path, monkeypatch,
                                                                        capsys) -> None:
    """The room for one save (checkpoint and classifier) is checked before config.json and the logs: a
    full disk had been found only at the first checkpoint, an epoch of training later."""
    import shutil
    from collections import namedtuple

    usage, asked = namedtuple("usage", "total used free"), {}
    real_check = ckpt.check_free_space

    def asking(folder: Path, needed: int, what: str) -> None:
        asked[what] = needed
        real_check(folder, needed, what)

    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    monkeypatch.setattr(ckpt, "check_free_space", asking)
    err = two_epochs_that_fail(tmp_path, teacher, capsys)
    assert err.startswith(f"error: not enough free space to save a checkpoint and {CLASSIFIER_NAME} in "), err
    assert "so it stopped before writing" in err, err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == []  # no config.json, no logs, no checkpoint
    student = build_classifier("resnet8", 4)
    weights = sum(t.numel() * t.element_size() for t in student.state_dict().values())
    assert asked[f"a checkpoint and {CLASSIFIER_NAME}"] > 3 * weights  # the student, its momentum, the export
    assert list(asked) == [f"a checkpoint and {CLASSIFIER_NAME}"]  # refused at the start, before any step


def test_a_fresh_start_over_a_folder_with_its_own_config_json_is_refused(tmp_path: Path, teacher: Path,
                                                                          capsys) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"mine": true}')
    with pytest.raises(SystemExit) as exc:
        run(DistillConfig(), tiny_args(tmp_path, "run", "--model.teacher", str(teacher)), prog="distill.py")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "holds config.json, not a fastssl run's" in err, err
    assert (run_dir / "config.json").read_text() == '{"mine": true}' and len(list(run_dir.iterdir())) == 1


def test_a_damaged_results_file_is_named_on_resume_and_nothing_is_rewritten(tmp_path: Path, teacher: Path,
                                                                              capsys) -> None:
    """results.json holds the top-1 history a resume continues: a damaged one is named (exit 2), and
    the refused resume leaves the file and config.json as they were."""
    args = tiny_args(tmp_path, "run", "--model.teacher", str(teacher), "--train.steps_per_epoch", "1")
    run(DistillConfig(), args + ["--train.epochs", "1"])
    run_dir = tmp_path / "run"
    (run_dir / "results.json").write_text("[1, 2]")
    config = (run_dir / "config.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run(DistillConfig(), args + ["--train.epochs", "2", "--resume"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "results.json holds no JSON object" in err and "Traceback" not in err
    assert (run_dir / "results.json").read_text() == "[1, 2]" and (run_dir / "config.json").read_bytes() == config


def test_missing_teacher_checkpoint_exits_2(tmp_path: Path) -> None:
    """The recipe from the command line: a missing teacher is one `error:` line and exit code 2."""
    make_folder(tmp_path / "data", classes=2, per_class=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(RECIPE), *tiny_args(tmp_path, "run", "--model.teacher",
                                                                    str(tmp_path / "nope.pt"))],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model.teacher: no teacher checkpoint at"), proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_teacher_run_directory_is_read_for_its_classifier(tmp_path: Path, teacher: Path) -> None:
    """The teacher run's directory (as the eval tools take a run directory) is its classifier.pt; a folder
    without one is named as such, not as "no teacher checkpoint at" a path that exists."""
    from fastssl.distill.classifier_file import load_teacher

    run_dir = tmp_path / "teacher_run"
    run_dir.mkdir()
    (run_dir / CLASSIFIER_NAME).write_bytes(teacher.read_bytes())
    from_file, arch = load_teacher(str(teacher), 4)
    from_dir, arch_of_dir = load_teacher(str(run_dir), 4)
    assert arch == arch_of_dir == "resnet8"
    assert all(torch.equal(a, b) for a, b in zip(from_file.state_dict().values(), from_dir.state_dict().values()))
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path / 'data'}' is a folder without a {CLASSIFIER_NAME}"):
        load_teacher(str(tmp_path / "data"), 4)


def test_bad_teacher_and_kd_without_teacher_exit_2(tmp_path: Path, capsys) -> None:
    make_folder(tmp_path / "data", classes=2, per_class=2)
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}}, bad)
    wrong = tmp_path / "wrong.pt"
    save_classifier(build_classifier("resnet8", 2), "resnet20", 2, "cifar", wrong)  # weights of another arch
    counts = {}  # a teacher file whose class count is missing (a KeyError) or text ("the teacher predicts 2
    for name, value in (("no_count", None), ("text_count", "2")):  # classes, the data has 2")
        data = torch.load(wrong, weights_only=False)
        data.pop("num_classes") if value is None else data.update(num_classes=value)
        counts[name] = tmp_path / f"{name}.pt"
        torch.save(data, counts[name])
    for extra, message in ((["--model.teacher", str(bad)], "is not a teacher checkpoint"),
                           (["--model.teacher", str(wrong)], "does not hold a resnet20 for 2 classes"),
                           (["--model.teacher", str(counts["no_count"])], "records None as its number of classes"),
                           (["--model.teacher", str(counts["text_count"])], "records '2' as its number of classes"),
                           ([], "KD and the ML-CPC term need a teacher")):
        with pytest.raises(SystemExit) as exc:
            run(DistillConfig(), tiny_args(tmp_path, "run", *extra))
        assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("kd_temperature", math.inf), ("temperature", math.nan),
                                          ("temperature", 0.0)])
def test_a_temperature_that_is_not_a_positive_finite_number_is_named(field: str, value: float) -> None:
    """`--loss.temperature inf` parsed as a float and passed a `> 0` check; the loss became nan."""
    from fastssl.config import ConfigError
    from fastssl.distill.config import validate

    cfg = DistillConfig()
    cfg.model.teacher = "t.pt"
    setattr(cfg.loss, field, value)
    with pytest.raises(ConfigError, match=f"loss.{field}: temperatures must be positive and finite, got {value}"):
        validate(cfg)


@pytest.mark.parametrize("section, field, value, message", [
    ("train", "seed", -1, r"train.seed: must lie in \[0, 4294967295\], got -1"),  # was NumPy's ValueError
    ("train", "seed", 10**23, r"train.seed: must lie in \[0, 4294967295\]"),
    ("optim", "momentum", 1.0, r"optim.momentum: must lie in \[0, 1\), got 1.0"),
    ("model", "embed_dim", 10**20, r"model.embed_dim: must lie in \[1, 65536\]"),  # a torch traceback
    ("data", "image_size", 100_000, r"data.image_size: must lie in \[8, 4096\] pixels"),  # a MemoryError
    ("loss", "negatives", "bank", r"loss.negatives: unknown 'bank'; choose one of memory, queue$"),
])
def test_a_value_out_of_range_is_named(section: str, field: str, value: float, message: str) -> None:
    from fastssl.config import ConfigError
    from fastssl.distill.config import validate

    cfg = DistillConfig()
    cfg.model.teacher = "t.pt"
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_several_launched_processes_are_refused(tmp_path: Path, teacher: Path, monkeypatch, capsys) -> None:
    """`accelerate launch` with 8 processes would start 8 copies racing on one run directory."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(SystemExit) as info:
        run(DistillConfig(), tiny_args(tmp_path, "run", "--model.teacher", str(teacher)), prog="distill")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "runs as one process, and this is one of 8" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_distill_keys_get_no_gradient() -> None:
    """The bound's keys are constants (its docstring): in the teacher-to-student direction they are the
    student's own embeddings, which must get no gradient through them."""
    from fastssl.distill.losses import mi_bound

    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    mi_bound(q, k, torch.randn(6, 8), 0.5, 0.07).backward()
    assert q.grad is not None and k.grad is None
