"""tools/eval_linear.py (fastssl/eval/linear.py) is exact on a separable toy set, its two
feeding modes agree, and bad input is named.

The toy set: uniformly coloured images whose class is the dominant colour channel (red,
green or blue), so every crop of an image is the same image and a fixed random-init
ResNet-18 (BatchNorm statistics fitted to the set) maps the classes to linearly separable
features.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import load_tool
from fastssl.eval.classifier import epoch_batches, step_decay
from fastssl.models.backbone import build_backbone
from fastssl.schedules import cosine
from pipelines.augment import EvalView
from pipelines.eval import eval_transform

TOY_SIZE = 32  # the fake run's crop size; the images are 40 x 47 px


def make_colour_folder(root: Path, per_class: int, seed: int) -> list[Path]:
    """root/<class>/<class>_<j>.JPEG, class c has channel c near 230 and the others near 40."""
    rng = np.random.default_rng(seed)
    paths = []
    for c, name in enumerate(("c0_red", "c1_green", "c2_blue")):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            colour = rng.integers(20, 60, size=3)
            colour[c] = rng.integers(210, 250)
            path = root / name / f"{name}_s{seed}_{j:03d}.JPEG"
            Image.fromarray(np.full((40, 47, 3), colour, np.uint8)).save(path, quality=95)
            paths.append(path)
    return paths


def fitted_backbone(arch: str, images: list[Path]) -> torch.nn.Module:
    """Random-init weights whose BatchNorm statistics are those of `images` (as a trained
    backbone's fit its data), so that fine-tuning with BatchNorm in training mode and testing
    in eval mode see the same normalisation even after a handful of steps."""
    torch.manual_seed(0)
    net = build_backbone(arch)
    batch = torch.stack([eval_transform(EvalView(TOY_SIZE))(Image.open(p).convert("RGB")) for p in images])
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the one batch: exactly its statistics
    with torch.no_grad():
        net.train()(batch)
    for m in norms:
        m.momentum = 0.1
    return net.eval()


def make_toy_run(root: Path, arch: str = "resnet18") -> Path:
    """A run directory as the loop leaves it (config.json + backbone_<arch>.pth) on the toy set."""
    train = make_colour_folder(root / "data" / "train", per_class=6, seed=1)
    make_colour_folder(root / "data" / "val", per_class=3, seed=2)
    run = root / "run"
    run.mkdir()
    torch.save(fitted_backbone(arch, train).state_dict(), run / f"backbone_{arch}.pth")
    data = {"train": str(root / "data" / "train"), "val": str(root / "data" / "val")}
    # eval.image_size wins over the global crop, as in eval_knn.
    config = {"model": {"arch": arch}, "data": data, "eval": {"image_size": TOY_SIZE}, "aug": {"global_size": 56}}
    (run / "config.json").write_text(json.dumps(config))
    return run


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    return make_toy_run(tmp_path_factory.mktemp("linear"))


@pytest.fixture(scope="module")
def tool():
    return load_tool("eval_linear")


TOY_ARGS = ["--epochs", "15", "--batch-size", "6", "--base-lr", "4.0", "--no-progress", "--extract-batch-size", "8"]


@pytest.fixture(scope="module")
def single_thread():
    """Small tensors on a shared 2-core box: one intra-op thread is faster and steadier."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def per_epoch_report(tool, toy_run, single_thread) -> dict:
    return tool.main([str(toy_run), *TOY_ARGS])


def test_linear_probe_is_exact_on_a_separable_set(per_epoch_report, toy_run):
    report = per_epoch_report
    assert report["top1"] == 100.0 and report["top5"] == 100.0
    assert report["features"] == "per-epoch augmentation" and report["image_size"] == TOY_SIZE
    assert report["lr"] == pytest.approx(4.0 * 6 / 256) and report["momentum"] == 0.9
    assert report["weight_decay"] == 0.0 and report["epochs"] == 15
    assert report["loss_per_epoch"][-1] < report["loss_per_epoch"][0]
    saved = json.loads((toy_run / "eval_linear.json").read_text())  # the run directory is the default place
    assert saved["top1"] == 100.0 and saved["num_train"] == 18 and saved["num_val"] == 9
    assert saved["precision"] == "fp32"  # --precision bf16 (the default) is bf16 autocast on a GPU only


def test_the_mlcpc_cifar_protocol_runs_and_says_so(tool, toy_run, single_thread, tmp_path):
    report = tool.main([str(toy_run), "--protocol", "mlcpc-cifar", "--epochs", "2", "--no-progress",
                        "--json", str(tmp_path / "l.json")])
    assert (report["protocol"], report["batch_size"], report["base_lr"], report["drop_last"]) == ("mlcpc-cifar", 18,
                                                                                               3.0, False)
    assert report["schedule"] == "x0.1 at epochs [60, 80]"
    assert report["train_augmentation"].startswith(f"RandomCrop({TOY_SIZE}, padding=4) + horizontal flip")


def test_precision_is_bf16_on_a_gpu_only_when_asked():
    from fastssl.eval.classifier import effective_precision

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert effective_precision(cuda, "bf16") == "bf16" and effective_precision(cuda, "fp32") == "fp32"
    assert effective_precision(cpu, "bf16") == effective_precision(cpu, "fp32") == "fp32"


def test_cached_features_agree_with_per_epoch_augmentation(tool, toy_run, per_epoch_report, tmp_path):
    """Every crop of a uniform image is the same image, so the cached copies equal the fresh
    crops and both modes must take the same steps (same order, same head initialisation)."""
    cached = tool.main([str(toy_run), *TOY_ARGS, "--cached-features", "--cached-views", "3",
                        "--json", str(tmp_path / "c.json")])
    assert cached["top1"] == 100.0 and cached["features"] == "cached" and cached["cached_views"] == 3
    assert "3 copies per image drawn once" in cached["train_augmentation"]
    np.testing.assert_allclose(cached["loss_per_epoch"], per_epoch_report["loss_per_epoch"], rtol=1e-4, atol=2e-5)
    centre = tool.main([str(toy_run), *TOY_ARGS, "--cached-features", "--cached-views", "0",
                        "--json", str(tmp_path / "c0.json")])
    np.testing.assert_allclose(centre["loss_per_epoch"], per_epoch_report["loss_per_epoch"], rtol=1e-4, atol=2e-5)


def error_of(tool, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_input_is_named(tool, toy_run, tmp_path, capsys):
    assert "does not exist" in error_of(tool, [str(tmp_path / "no_such_run")], capsys)
    (tmp_path / "not_a_run").mkdir()
    assert "not a run directory" in error_of(tool, [str(tmp_path / "not_a_run")], capsys)
    # the folder of the demo's timestamped runs: the newest run inside is named
    (tmp_path / "runs" / "older").mkdir(parents=True)
    (tmp_path / "runs" / "older" / "config.json").write_text("{}")
    os.utime(tmp_path / "runs" / "older" / "config.json", (1, 1))
    shutil.copytree(toy_run, tmp_path / "runs" / "newer")
    assert (f"it holds 2 runs, the newest {str(tmp_path / 'runs' / 'newer')!r}: pass that"
            in error_of(tool, [str(tmp_path / "runs")], capsys))
    backbone = str(toy_run / "backbone_resnet18.pth")
    assert "no data" in error_of(tool, [backbone], capsys)
    data = ["--train", str(toy_run.parent / "data" / "train"), "--val", str(toy_run.parent / "data" / "val")]
    assert "it is a resnet18's: pass --arch resnet18" in error_of(tool, [backbone, "--arch", "resnet50", *data], capsys)
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1)}, tmp_path / "odd.pth")
    assert "export it again" in error_of(tool, [str(tmp_path / "odd.pth"), *data], capsys)
    torch.save({"epoch": 3, "model": {"w": torch.zeros(1)}}, tmp_path / "checkpoint.pt")
    assert "not an exported backbone" in error_of(tool, [str(tmp_path / "checkpoint.pt"), *data], capsys)
    whole = (toy_run / "backbone_resnet18.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) // 2])  # a copy cut short: not "use the backbone file"
    err = error_of(tool, [str(tmp_path / "cut.pth"), *data], capsys)
    assert "cannot be read as a torch file" in err and "damaged or cut short" in err and "checkpoint.pt" not in err
    Image.new("RGB", (8, 8)).save(tmp_path / "an_image.JPEG")  # a file named by mistake: not "holds more than tensors"
    err = error_of(tool, [str(tmp_path / "an_image.JPEG"), *data], capsys)
    assert "is not a torch file (an image, a text or JSON file?)" in err, err
    for name in ("yak", "zebra"):  # two classes: a single class is refused before the classes are compared
        (tmp_path / "other_val" / name).mkdir(parents=True)
        Image.new("RGB", (40, 40)).save(tmp_path / "other_val" / name / "z.JPEG")
    err = error_of(tool, [backbone, "--train", data[1], "--val", str(tmp_path / "other_val")], capsys)
    assert "different class folders" in err
    assert "does not exist" in error_of(tool, [backbone, "--train", str(tmp_path / "nope"), "--val", data[3]], capsys)


def test_several_launched_processes_are_refused(tool, toy_run, capsys, monkeypatch):
    """`accelerate launch` with 8 processes would start 8 copies of the whole probe on one GPU, racing on one JSON."""
    report = toy_run / "eval_linear.json"
    before = report.read_bytes() if report.exists() else None  # the module's other tests may have written one
    monkeypatch.setenv("WORLD_SIZE", "8")
    err = error_of(tool, [str(toy_run)], capsys)
    assert "tools/eval_linear.py runs as one process, and this is one of 8" in err and "Traceback" not in err
    assert (report.read_bytes() if report.exists() else None) == before


def test_training_crops_are_a_function_of_seed_epoch_and_image_not_of_the_workers(tmp_path):
    """The linear probe's and the fine-tuning's random crops (a seeded LabelledImages) come out the same
    from the main process and from 2 workers, which draw from generators of their own; another epoch or
    seed crops anew."""
    from fastssl.eval.classifier import batches_loader, train_transform
    from pipelines.eval import LabelledImages

    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        path = tmp_path / f"noise_{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        samples.append((str(path), i % 2))
    view = EvalView(16)
    batches = [[0, 1, 2], [3, 4, 5]]

    def crops(seed: int, epoch: int, workers: int) -> torch.Tensor:
        dataset = LabelledImages(samples, train_transform(view), seed=seed)
        return torch.cat([images for images, _, _ in batches_loader(dataset, batches, workers, epoch)])

    alone = crops(0, 1, 0)
    torch.testing.assert_close(crops(0, 1, 2), alone, rtol=0, atol=0)
    assert not torch.equal(crops(0, 2, 0), alone) and not torch.equal(crops(1, 1, 0), alone)


def test_epoch_orders_are_seeded_permutations():
    a = epoch_batches(10, 4, torch.Generator().manual_seed(5))
    b = epoch_batches(10, 4, torch.Generator().manual_seed(5))
    assert a == b and [len(x) for x in a] == [4, 4, 2] and sorted(sum(a, [])) == list(range(10))
    assert [len(x) for x in epoch_batches(9, 4, torch.Generator(), drop_singleton=True)] == [4, 4]
    assert [len(x) for x in epoch_batches(10, 4, torch.Generator(), drop_singleton=True)] == [4, 4, 2]
    assert [len(x) for x in epoch_batches(10, 4, torch.Generator(), drop_short=True)] == [4, 4]
    assert [len(x) for x in epoch_batches(3, 4, torch.Generator(), drop_short=True)] == [3]  # the only batch


def test_linear_schedule_is_the_per_epoch_cosine():
    """The probe's lr at epoch e of E is peak * (1 + cos(pi e / E)) / 2 (the authors' schedule)."""
    for e in range(0, 100, 7):
        assert cosine(e, 100, 0.3, 0.0) == pytest.approx(0.3 * 0.5 * (1 + np.cos(np.pi * e / 100)))


def test_a_diverging_probe_stops_with_the_lr_to_lower_and_saves_no_nan_epoch():
    """An lr far too large made the loss NaN: the probe ran to the end and wrote NaN into the report with
    exit status 0. The first non-finite epoch now ends it with an EvalError (exit 2) that names the flag,
    before that epoch is saved for a resume."""
    import fastssl.eval.linear as linear
    from fastssl.eval.errors import EvalError

    feats, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    saved = []

    def source(epoch, batches):
        for batch in batches:
            yield feats[batch] * (math.inf if epoch == 1 else 1.0), labels[batch]

    args = argparse.Namespace(base_lr=0.075, batch_size=4, momentum=0.9, weight_decay=0.0, seed=0, epochs=4,
                              protocol="mira")
    with pytest.raises(EvalError, match=r"the mean loss of epoch 2 is nan; lower --base-lr \(now 0.075\)"):
        linear.fit_linear(torch.nn.Linear(4, 3), source, len(labels), args, save=saved.append)
    assert [state["epoch"] for state in saved] == [1]  # epoch 1 only: the NaN epoch was not saved


def lrs_of_fit_linear(monkeypatch, args: argparse.Namespace) -> list[tuple[int, float]]:
    """(epoch, lr) of every step `fit_linear` takes on 6 toy features (batches of args.batch_size)."""
    import fastssl.eval.linear as linear

    seen, real_step = [], linear.sgd_step

    def recording_step(opt, loss, bar=None, epoch=0):
        seen.append((epoch, opt.param_groups[0]["lr"]))
        return real_step(opt, loss, bar, epoch)

    monkeypatch.setattr(linear, "sgd_step", recording_step)
    feats, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])

    def source(epoch, batches):
        for batch in batches:
            yield feats[batch], labels[batch]

    linear.fit_linear(torch.nn.Linear(4, 3), source, len(labels), args)
    return seen


def test_fit_linear_steps_at_the_per_epoch_cosine(monkeypatch):
    """The lr the probe's optimiser holds at every step of epoch e of E is base_lr x batch / 256 x
    (1 + cos(pi e / E)) / 2, written out here (NOTES: lr 0.075 x batch/256, cosine per epoch to 0)."""
    args = argparse.Namespace(base_lr=0.075, batch_size=4, momentum=0.9, weight_decay=0.0, seed=0, epochs=5,
                              protocol="mira")
    seen = lrs_of_fit_linear(monkeypatch, args)
    expected = [(e, 0.075 * 4 / 256 * (1 + math.cos(math.pi * e / 5)) / 2) for e in range(5)]
    assert [e for e, _ in seen] == [e for e, _ in expected]  # 1 batch per epoch: the short 2 dropped (drop_last)
    assert [lr for _, lr in seen] == pytest.approx([lr for _, lr in expected], rel=1e-12)


def test_the_mlcpc_cifar_protocol_is_main_lincls_cifar(monkeypatch):
    """ML-CPC's CIFAR linear evaluation (main_lincls_cifar.py, their README's --lr 3): lr 3 at batch 256, x0.1 at
    epochs 60 and 80, 100 epochs, every batch kept; training crops RandomCrop(32, padding=4) + flip."""
    import fastssl.eval.linear as linear
    from torchvision import transforms as T

    from fastssl.eval.classifier import train_transform

    args = linear.apply_protocol(argparse.Namespace(protocol="mlcpc-cifar", epochs=None, batch_size=None,
                                                    base_lr=None))
    assert (args.epochs, args.batch_size, args.base_lr) == (100, 256, 3.0)
    assert linear.apply_protocol(argparse.Namespace(protocol="mira", epochs=7, batch_size=None,
                                                    base_lr=None)).epochs == 7  # a flag wins

    run = argparse.Namespace(protocol="mlcpc-cifar", base_lr=3.0, batch_size=4, momentum=0.9, weight_decay=0.0,
                             seed=0, epochs=100)
    seen = lrs_of_fit_linear(monkeypatch, run)
    authors = [(e, 3.0 * 4 / 256 * (0.1 if e >= 60 else 1) * (0.1 if e >= 80 else 1)) for e in range(100) for _ in "ab"]
    assert [e for e, _ in seen] == [e for e, _ in authors]  # 2 batches (4 + 2 images) per epoch: none dropped
    assert [lr for _, lr in seen] == pytest.approx([lr for _, lr in authors], rel=1e-12)

    view = EvalView(32, crop_fraction=1.0)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    theirs = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                        T.Normalize(view.mean, view.std)])
    for seed in range(5):
        torch.manual_seed(seed)
        ours = train_transform(view, "pad-4")(img)
        torch.manual_seed(seed)
        torch.testing.assert_close(ours, theirs(img), rtol=0, atol=0)


def test_step_decay_matches_its_closed_form():
    milestones, gamma = [12, 16], 0.2
    for epoch in range(20):
        expected = 0.01 * (1.0 if epoch < 12 else 0.2 if epoch < 16 else 0.04)
        assert step_decay(epoch, 0.01, milestones, gamma) == pytest.approx(expected)
    assert step_decay(5, 1.0, [], 0.1) == 1.0


def test_a_feature_cache_that_cannot_fit_is_refused_before_any_work(tool, toy_run, tmp_path, capsys, monkeypatch):
    """ImageNet x ResNet-50 x 10 views in float32 (115 GB at the peak) would be built for an hour, then killed."""
    import fastssl.eval.linear as linear

    n, d = 1_281_167, 2048
    assert linear.cache_bytes(n, d, 10, "float32") == n * d * (10 * 4 + 4)  # + one view's float32 while built
    assert linear.cache_bytes(n, d, 10, "float16") == n * d * (10 * 2 + 4)
    assert linear.cache_bytes(n, d, 0, "float32") == linear.cache_bytes(n, d, 1, "float32")  # one centre crop
    args = tool.parse_args(["run", "--cached-features"])
    linear.check_cache_fits(n, d, args, available=None)  # unknown: not refused
    linear.check_cache_fits(n, d, args, available=linear.cache_bytes(n, d, 10, "float32"))
    with pytest.raises(linear.EvalError, match=r"needs about 115\.4 GB .* 80\.0 GB is available; use "
                                                r"--cache-dtype float16 \(63\.0 GB\) or fewer --cached-views"):
        linear.check_cache_fits(n, d, args, available=80 * 10**9)
    with pytest.raises(linear.EvalError) as too_small:
        linear.check_cache_fits(n, d, args, available=10 * 10**9)
    assert "float16" not in str(too_small.value) and "no --cached-features" in str(too_small.value)

    monkeypatch.setattr(linear, "available_memory_bytes", lambda: 1000)  # the tool itself: exit 2, one line
    err = error_of(tool, [str(toy_run), *TOY_ARGS, "--cached-features", "--json", str(tmp_path / "x.json")], capsys)
    assert "--cached-features needs about" in err and "Traceback" not in err
    assert not (tmp_path / "x.json").exists()


def test_the_target_is_checked_before_the_data_and_the_runs_own_file_is_read(tool, toy_run, tmp_path, capsys):
    """checkpoint.pt alone is refused as the wrong file, not for its missing --train/--val; a run directory
    with another --arch loads the run's own backbone_<arch>.pth and says which arch fits; a run without its
    backbone yet is said to be one."""
    torch.save({"epoch": 3, "model": {"w": torch.zeros(1)}}, tmp_path / "checkpoint.pt")
    err = error_of(tool, [str(tmp_path / "checkpoint.pt")], capsys)
    assert "is not an exported backbone" in err and "no data" not in err
    err = error_of(tool, [str(toy_run), "--arch", "resnet50"], capsys)
    assert "it is a resnet18's: pass --arch resnet18" in err
    bare = tmp_path / "young_run"
    bare.mkdir()
    (bare / "config.json").write_text((toy_run / "config.json").read_text())
    assert "has no exported backbone yet (backbone_resnet18.pth)" in error_of(tool, [str(bare)], capsys)


@pytest.mark.parametrize("flag, value", [("--image-size", "0"), ("--num-workers", "-2"), ("--epochs", "0"),
                                         ("--cached-views", "-1")])
def test_the_shared_flags_are_checked_when_parsed(tool, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        tool.parse_args(["run", flag, value])
    assert exit_info.value.code == 2 and f"argument {flag}: must be " in capsys.readouterr().err


@pytest.mark.parametrize("tool_name, flag, value, says", [
    ("eval_linear", "--weight-decay", "-5", "argument --weight-decay: must be a finite number in [0, inf), got -5"),
    ("eval_linear", "--momentum", "nan", "argument --momentum: must be a finite number in [0, 1), got nan"),
    ("eval_linear", "--base-lr", "0", "argument --base-lr: must be a finite number in (0, 1e+06], got 0"),
    ("eval_linear", "--base-lr", "1e300", "argument --base-lr: must be a finite number in (0, 1e+06], got 1e300"),
    ("eval_linear", "--seed", str(10**23), f"argument --seed: must be between 0 and {2**32 - 1}, got {10**23}"),
    ("finetune_semi", "--lr", "-1", "argument --lr: must be a finite number in (0, 1e+06], got -1"),
    ("finetune_semi", "--gamma", "nan", "argument --gamma: must be a finite number in (0, 1], got nan"),
    ("finetune_semi", "--milestones", "12,-3", "argument --milestones: must be >= 1, got -3"),
    ("finetune_semi", "--milestones", "1,,1", "argument --milestones: an empty item in '1,,1'"),
    ("finetune_semi", "--milestones", "4,4", "argument --milestones: '4' is given twice in '4,4'"),
    ("finetune_semi", "--seed", "-1", f"argument --seed: must be between 0 and {2**32 - 1}, got -1"),
    ("eval_knn", "--temperature", "nan", "argument --temperature: must be a finite number in (0, inf), got nan"),
])
def test_optimiser_and_vote_settings_are_checked_before_any_work(tool_name, flag, value, says, capsys):
    """torch's SGD refused a negative weight decay only after the features were extracted (a traceback), and a NaN
    momentum or gamma ran to the end and wrote NaN into the JSON."""
    with pytest.raises(SystemExit) as exit_info:
        load_tool(tool_name).main(["no_such_run", "--subset", "s.txt", flag, value] if tool_name == "finetune_semi"
                                  else ["no_such_run", flag, value])
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_a_report_that_cannot_be_written_is_named_first_or_keeps_the_figures_on_screen(tool, toy_run, tmp_path,
                                                                                        capsys, monkeypatch):
    """--json naming a folder is refused before any work; a write that fails at the end (a full disk) exits 2
    with one line, after the figures were printed (they were lost with a traceback)."""
    import errno

    import fastssl.eval.targets as targets

    (tmp_path / "a_folder").mkdir()
    assert "is a directory; name a file" in error_of(tool, [str(toy_run), "--json", str(tmp_path / "a_folder")], capsys)

    def full_disk(path, report, sort_keys=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(targets, "write_json", full_disk)
    err = error_of(tool, [str(toy_run), *TOY_ARGS, "--epochs", "1", "--json", str(tmp_path / "r.json")], capsys)
    assert "could not be written to" in err and "No space left on device" in err and "Traceback" not in err


def test_the_figures_are_printed_before_the_report_is_written(tool, toy_run, tmp_path, capsys, monkeypatch):
    import fastssl.eval.targets as targets

    printed = []
    monkeypatch.setattr(targets, "write_json", lambda *a, **k: printed.append(capsys.readouterr().out))
    tool.main([str(toy_run), *TOY_ARGS, "--epochs", "1", "--json", str(tmp_path / "r.json")])
    assert len(printed) == 1 and "top1" in printed[0]


def test_a_report_that_replaces_an_earlier_one_says_so(tmp_path, capsys):
    """The default place holds one report per run and tool: a second evaluation overwrites the first."""
    import json

    from fastssl.eval.targets import write_report

    path = tmp_path / "eval_linear.json"
    write_report(path, {"top1": 1.0}, "| top1 |")
    first = capsys.readouterr().out
    write_report(path, {"top1": 2.0}, "| top1 |")
    second = capsys.readouterr().out
    assert first == f"wrote {path} and {path.with_suffix('.md')}\n"
    assert second == first.rstrip("\n") + " (replacing an earlier report there; pass --json elsewhere to keep both)\n"
    assert json.loads(path.read_text()) == {"top1": 2.0}


def test_a_stopped_probe_goes_on_from_its_last_epoch_and_ends_as_an_uninterrupted_one(tool, toy_run, single_thread,
                                                                                        tmp_path, monkeypatch, capsys):
    """Stopped in its 4th epoch of 6 (3 steps each), the same command says it resumes after 3
    epochs, takes only the last 9 steps, and ends with the losses and figures of a run that was
    never stopped (cached features too: their copies are drawn per epoch). The saved progress
    belongs to its settings only, and goes once the report is written."""
    from fastssl.eval import linear
    from fastssl.eval.progress_file import load_state

    heads, evaluate, real, taken = [], linear.evaluate_head, linear.sgd_step, [0]

    def evaluate_and_keep(backbone, head, *args, **kwargs):
        heads.append(torch.cat([head.weight.detach().flatten(), head.bias.detach()]).clone())
        return evaluate(backbone, head, *args, **kwargs)

    monkeypatch.setattr(linear, "evaluate_head", evaluate_and_keep)
    for name, mode in (("fresh", []), ("cached", ["--cached-features", "--cached-views", "2"])):
        argv = [str(toy_run), "--epochs", "6", "--batch-size", "6", "--base-lr", "0.5", "--no-progress",
                "--extract-batch-size", "8", *mode]
        whole = tool.main(argv + ["--json", str(tmp_path / f"{name}_whole.json")])
        out, partial = tmp_path / f"{name}.json", tmp_path / f".{name}.json.partial.pt"
        taken[0] = 0

        def counted(*args, stop_at=None, **kwargs):
            taken[0] += 1
            if taken[0] == stop_at:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(linear, "sgd_step", lambda *a, **k: counted(*a, stop_at=3 * 3 + 1, **k))
        with pytest.raises(SystemExit) as stopped:  # as by Ctrl-C
            tool.main(argv + ["--json", str(out)])
        assert stopped.value.code == 130 and partial.exists() and not out.exists()
        said = capsys.readouterr().err
        assert f"interrupted; the epochs done are kept in {partial}: the same command goes on" in said, said
        assert load_state(partial, "another probe's fingerprint", False, "the linear probe", str) is None
        assert "unfinished run of the linear probe with other settings, weights or data" in capsys.readouterr().err
        taken[0] = 0
        monkeypatch.setattr(linear, "sgd_step", counted)
        resumed = tool.main(argv + ["--json", str(out)])
        assert f"resuming the linear probe from {partial}: 3 epochs done" in capsys.readouterr().err
        assert taken[0] == 3 * 3
        assert resumed["loss_per_epoch"] == whole["loss_per_epoch"]
        assert (resumed["top1"], resumed["top5"]) == (whole["top1"], whole["top5"])
        assert torch.equal(heads[-1], heads[0]) and not partial.exists()  # the same head, to the bit
        heads.clear()
        monkeypatch.setattr(linear, "sgd_step", real)


def test_the_cached_copy_each_image_uses_depends_on_the_epoch_only():
    """A resumed probe starts at a later epoch: the copies it picks there must be those an
    uninterrupted probe picks after its earlier epochs (8 copies of 50 images, all distinct)."""
    from fastssl.eval.linear import cached_source

    feats = torch.arange(8 * 50 * 2, dtype=torch.float32).view(8, 50, 2)
    labels, valid = torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.bool)
    batches = [list(range(0, 25)), list(range(25, 50))]

    def picked(epochs: list[int]) -> list[torch.Tensor]:
        source = cached_source(feats, labels, valid, torch.device("cpu"), seed=3)
        return [torch.cat([f for f, _ in source(e, batches)]) for e in epochs][-1]

    assert torch.equal(picked([0, 1, 2]), picked([2]))
    assert not torch.equal(picked([1]), picked([2]))  # a new draw each epoch


def test_progress_that_cannot_be_read_or_removed_costs_only_the_head_start(tmp_path, capsys):
    """A damaged progress file starts over, saying so; a folder in its place is not written over
    (a warning), and its removal after the report only warns."""
    from fastssl.eval.progress_file import forget_state, load_state, save_state, state_path

    damaged = state_path(tmp_path / "a.json")
    damaged.write_bytes(b"not a torch file")
    assert load_state(damaged, "key", False, "the linear probe", str) is None
    assert "cannot be read (not a progress file this tool wrote); it will be replaced" in capsys.readouterr().err
    assert save_state(damaged, {"epoch": 1}, "key")
    assert load_state(damaged, "key", False, "the linear probe", lambda s: f"{s['epoch']} epochs done")["epoch"] == 1
    assert "resuming the linear probe from" in capsys.readouterr().err
    folder = state_path(tmp_path / "b.json")
    folder.mkdir()
    assert load_state(folder, "key", False, "the linear probe", str) is None
    assert not save_state(folder, {"epoch": 1}, "key") and folder.is_dir()
    forget_state(folder)
    assert "could not be removed" in capsys.readouterr().err
    # a --json into a folder not made yet (the report makes it at the end): the progress makes it first; it
    # was a FileNotFoundError traceback from the free-space check, after the first dataset's work
    fresh = state_path(tmp_path / "new" / "deeper" / "c.json")
    assert save_state(fresh, {"epoch": 2}, "key") and fresh.is_file()
    (tmp_path / "a_file").write_text("a file where the folder goes")
    under_a_file = state_path(tmp_path / "a_file" / "d.json")
    assert not save_state(under_a_file, {"epoch": 2}, "key")
    assert "warning: the progress was not saved" in capsys.readouterr().err


def test_the_runs_own_knn_is_read_for_the_report_and_a_damaged_results_json_costs_only_that_figure(tmp_path):
    """The probe's report shows the run's last online k-NN (results.json). A results.json cut short (a run
    killed while writing it) or edited was a JSONDecodeError traceback after the whole probe had trained,
    with no report written: now a warning, and the report without that one figure."""
    from fastssl.eval.targets import run_knn_figure

    results = tmp_path / "results.json"
    assert run_knn_figure(tmp_path) is None  # no results.json: no figure, no warning
    results.write_text(json.dumps({"knn": [{"epoch": 1, "top1": 20.0}, {"epoch": 2, "top1": 25.5}]}))
    assert run_knn_figure(tmp_path) == {"epoch": 2, "top1": 25.5}
    for damaged in ('{"knn": [', '{"knn": "x"}', '["knn"]', '{"knn": [3]}'):
        results.write_text(damaged)
        with pytest.warns(UserWarning, match="leaves out the run's own k-NN: .*results.json' cannot be read"):
            assert run_knn_figure(tmp_path) is None
