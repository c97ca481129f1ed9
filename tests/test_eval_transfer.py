"""tools/eval_transfer.py (MIRA Table 5's linear transfer): the metrics against hand-computed
cases, the PyTorch L-BFGS against scikit-learn, CIFAR-10 read by torchvision's own class from
its own on-disk format, the ImageNet-layout route, and bad input."""

from __future__ import annotations

import hashlib
import json
import pickle
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import load_tool
from fastssl.eval.transfer import (DATASETS, mean_per_class_accuracy, search_and_test, top1_accuracy,
                                   voc11_average_precision, voc11_map)
from fastssl.eval.transfer_data import held_out
from fastssl.eval.transfer_solvers import lbfgs_scores, sklearn_scores
from fastssl.models.backbone import build_backbone

pytest.importorskip("sklearn")

# Ten well-separated class colours (RGB), for images a random-init ResNet maps apart.
COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30], [230, 30, 230], [30, 230, 230],
                    [240, 240, 240], [20, 20, 20], [130, 130, 130], [230, 130, 30]])


@pytest.fixture(scope="module")
def tool():
    return load_tool("eval_transfer")


@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    """Small problems on a shared 2-core box: one thread for torch and for scikit-learn's BLAS
    (contending BLAS threads made a 776-iteration fit 50x slower: 25 s instead of 0.5 s)."""
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- metrics


def test_top1_and_mean_per_class_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2])
    scores = np.eye(3)[pred]
    assert top1_accuracy(scores, labels) == pytest.approx(100 * 5 / 7)
    # class 0: 3 of 4, class 1: 1 of 2, class 2: 1 of 1 -> (0.75 + 0.5 + 1) / 3; not 5 / 7
    assert mean_per_class_accuracy(scores, labels) == pytest.approx(100 * 0.75)


def test_voc_11_point_ap_by_hand():
    # ranked: + - + - +  -> recall 1/3 1/3 2/3 2/3 1, precision 1 1/2 2/3 1/2 3/5
    # t = 0 .. 0.3: 1 (4 points); t = 0.4 .. 0.6: 2/3 (3 points); t = 0.7 .. 1: 3/5 (4 points)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    targets = np.array([1, 0, 1, 0, 1])
    want = (4 * 1 + 3 * 2 / 3 + 4 * 0.6) / 11
    assert voc11_average_precision(scores, targets) == pytest.approx(want)
    # a "difficult" image (-1) is ignored, wherever it ranks
    assert voc11_average_precision(np.r_[0.95, scores], np.r_[-1, targets]) == pytest.approx(want)
    # tied scores enter the ranked list together: one threshold with recall 1, precision 1/2
    assert voc11_average_precision(np.array([0.9, 0.9]), np.array([1, 0])) == pytest.approx(0.5)
    # a negative on top: precision 1/2 at every recall level (the devkit; no extra (0, 1) point)
    assert voc11_average_precision(np.array([0.9, 0.8]), np.array([0, 1])) == pytest.approx(0.5)
    both = np.stack([scores, -scores], 1), np.stack([targets, 1 - targets], 1)
    # second column, ranked - + - + -: precision 1/2 at recall 1/2 and 1 -> AP 1/2; the mean of the two
    assert voc11_map(*both) == pytest.approx(100 * (want + 0.5) / 2)


def test_held_out_split_is_ericssons():
    """Ericsson's linear.py: np.random.seed(0); np.random.shuffle(indices); val = the first 20 %."""
    train, val = held_out(53, seed=0)
    np.random.seed(0)
    indices = list(range(53))
    np.random.shuffle(indices)
    assert val.tolist() == indices[:10] and train.tolist() == indices[10:]


# --------------------------------------------------------------------------- solvers


def blobs(n: int, dim: int, k: int, seed: int, spread: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    y = rng.integers(0, k, n)
    return centres[y] + spread * rng.normal(size=(n, dim)), y


@pytest.mark.parametrize("kind", ["multinomial", "two_classes", "multi_label"])
def test_lbfgs_equals_sklearn(kind):
    """The batched PyTorch L-BFGS reaches scikit-learn's optimum at every C of the grid at once
    (penalties 6 orders of magnitude apart), for each of the three problem shapes."""
    x, y = blobs(120, 12, 4, seed=1)
    x_eval = np.random.default_rng(2).normal(size=(25, 12))
    k = 4
    if kind == "two_classes":
        y, k = y % 2, 2
    elif kind == "multi_label":
        rng = np.random.default_rng(3)
        y = (x[:, :3] + rng.normal(size=(120, 3)) > 0).astype(np.int64)
        y[rng.random((120, 3)) < 0.1] = -1  # "difficult": a negative in training
        k = 3
    cs = [1e-3, 1e-1, 10.0, 1e3]
    ref = sklearn_scores(x, y, x_eval, cs, k, max_iter=5000, tol=1e-10)
    got = lbfgs_scores(x, y, x_eval, cs, k, max_iter=5000, tol=1e-10)
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        # multinomial scores are defined up to a constant per row (softmax); compare centred
        r, g = (r - r.mean(1, keepdims=True), g - g.mean(1, keepdims=True)) if kind == "multinomial" else (r, g)
        np.testing.assert_allclose(g, r, atol=1e-4 * max(1.0, np.abs(r).max()))


def test_search_and_test_agree_between_solvers(capsys):
    """The whole protocol (grid on val, refit on train + val, test) picks the same penalty and
    the same test score with either solver; its progress bar counts every fit."""
    x, y = blobs(200, 10, 5, seed=4, spread=2.5)
    feats = {"train": x[:120], "val": x[120:160], "test": x[160:]}
    targets = {"train": y[:120], "val": y[120:160], "test": y[160:]}
    wds = list(np.logspace(-6, 5, 12))
    a = search_and_test(feats, targets, "mean_per_class", 5, "sklearn", wds, max_iter=5000, tol=1e-9,
                        progress=True, desc="blobs")
    b = search_and_test(feats, targets, "mean_per_class", 5, "lbfgs", wds, max_iter=5000, tol=1e-9,
                        progress=True, desc="blobs")
    bars = capsys.readouterr().err.strip().split("\n")  # one line per bar, its last state after the last \r
    assert len(bars) == 2 and all(b.split("\r")[-1].startswith("blobs fits: 100%") and "13/13" in b for b in bars), bars
    assert a["val_scores"] == b["val_scores"] and a["best_wd"] == b["best_wd"] and a["score"] == b["score"]
    assert len(set(a["val_scores"])) > 1  # the grid matters on this problem (a strong penalty underfits)


# --------------------------------------------------------------------------- datasets, end to end


def coloured(labels: np.ndarray, seed: int) -> np.ndarray:
    """N x 32 x 32 x 3 uint8 images of the labels' colours with a little noise."""
    rng = np.random.default_rng(seed)
    base = COLOURS[labels][:, None, None, :].astype(np.int64)
    return np.clip(base + rng.integers(-12, 13, size=(len(labels), 32, 32, 3)), 0, 255).astype(np.uint8)


def write_cifar10(root: Path, per_class_train: int = 10, per_class_test: int = 4) -> dict[str, str]:
    """cifar-10-batches-py as torchvision's CIFAR10 reads it: five pickled training batches,
    test_batch (data N x 3072 uint8 in CHW order, labels list) and batches.meta; returns their md5s."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_labels = rng.permutation(np.repeat(np.arange(10), per_class_train))
    test_labels = np.repeat(np.arange(10), per_class_test)

    def dump(name: str, obj) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)

    for b, part in enumerate(np.array_split(np.arange(len(train_labels)), 5)):
        images = coloured(train_labels[part], seed=10 + b)
        dump(f"data_batch_{b + 1}", {"data": images.transpose(0, 3, 1, 2).reshape(len(part), -1),
                                     "labels": train_labels[part].tolist()})
    dump("test_batch", {"data": coloured(test_labels, 20).transpose(0, 3, 1, 2).reshape(len(test_labels), -1),
                        "labels": test_labels.tolist()})
    dump("batches.meta", {"label_names": [f"class{c}" for c in range(10)]})
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("transfer") / "backbone_resnet18.pth"
    torch.save(build_backbone("resnet18").state_dict(), path)
    return path


@pytest.fixture
def cifar_md5s(monkeypatch):
    """torchvision checks its files' md5s against the real CIFAR-10's; this points its lists at
    the generated files' md5s, so the unmodified integrity check and reader run on them."""

    def use(md5s: dict[str, str]) -> None:
        cls = torchvision.datasets.CIFAR10
        monkeypatch.setattr(cls, "train_list", [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)])
        monkeypatch.setattr(cls, "test_list", [["test_batch", md5s["test_batch"]]])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5s["batches.meta"]})

    return use


FAST = ["--image-size", "32", "--batch-size", "50", "--no-progress", "--device", "cpu", "--wd-values", "12"]


def test_cifar10_from_torchvision_format(tool, tmp_path, backbone_file, cifar_md5s):
    data = tmp_path / "data"
    cifar_md5s(write_cifar10(data))
    out = tmp_path / "transfer.json"
    report = tool.main([str(backbone_file), "--data-root", str(data), "--datasets", "cifar10", "--json", str(out),
                        *FAST])
    r = report["datasets"]["cifar10"]
    assert (r["num_train"], r["num_val"], r["num_test"], r["num_classes"]) == (80, 20, 40, 10)  # 20 % held out
    assert r["metric"] == "top1" and r["source"] == "torchvision" and "held out" in r["val_split"]
    assert r["score"] >= 90.0  # separable colours: labels that reached the classifier scrambled would give ~10
    assert report["solver"] == "sklearn" and len(report["wd_grid"]) == 12 and report["feature_dim"] == 512
    assert json.loads(out.read_text())["datasets"]["cifar10"]["score"] == r["score"]
    table = out.with_suffix(".md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| model"))
    row = next(line for line in table if line.startswith(f"| {backbone_file}"))
    titles = [c.strip() for c in header.split("|")[2:-1]]
    assert titles == [s.title for s in DATASETS.values()] + ["avg."]  # the paper's column order
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells[titles.index("CIFAR10")] == f"{r['score']:.2f}" and cells[titles.index("Aircraft")] == "–"


def write_folder(root: Path, per_class: int, seed: int, classes: int = 3) -> None:
    labels = np.repeat(np.arange(classes), per_class)
    for i, (label, image) in enumerate(zip(labels, coloured(labels, seed))):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img_{i:03d}.png")


def test_imagenet_layout_route(tool, tmp_path, backbone_file):
    pets = tmp_path / "pets"
    write_folder(pets / "train", 8, seed=1)
    write_folder(pets / "val", 3, seed=2)
    write_folder(pets / "test", 4, seed=3)
    mine = tmp_path / "mine"  # a user's own dataset: no val folder, so 20 % of train is held out
    write_folder(mine / "train", 5, seed=4, classes=2)
    write_folder(mine / "test", 3, seed=5, classes=2)
    report = tool.main([str(backbone_file), "--folder", f"pets={pets}", "--folder", f"mine={mine}",
                        "--json", str(tmp_path / "t.json"), *FAST])
    r = report["datasets"]["pets"]
    assert (r["num_train"], r["num_val"], r["num_test"], r["num_classes"]) == (24, 9, 12, 3)
    assert r["metric"] == "mean_per_class" and r["source"] == "folder" and r["val_split"] == "val folder"
    assert r["score"] == 100.0
    own = report["datasets"]["mine"]
    assert (own["num_train"], own["num_val"], own["num_test"], own["metric"]) == (8, 2, 6, "top1")
    assert own["score"] == 100.0  # two classes: one binary classifier, its scores turned into two columns
    assert list(report["datasets"]) == ["pets", "mine"]
    header, _, row = report["table"].splitlines()[:3]
    assert header.endswith("| avg. | mine |") and row.endswith("| 100.00 (1 of 11) | 100.00 |")


def test_bad_input_exits_2(tool, tmp_path, backbone_file, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["--data-root", str(tmp_path / "empty"), "--datasets", "cifar10"], "cifar-10-batches-py"),
        (["--data-root", str(tmp_path), "--datasets", "imagenet"], "unknown dataset 'imagenet'"),
        (["--folder", f"pets={tmp_path / 'nowhere'}"], "pets"),
        (["--folder", f"voc2007={tmp_path}"], "multi-label"),
        ([], "no dataset to evaluate"),
        (["--folder", f"my pets={tmp_path}"], "plain name"),
        (["--folder", f"pets={tmp_path}", "--folder", f"pets={tmp_path / 'empty'}"], "names 'pets' twice"),
        (["--folder", f"pets={tmp_path}", "--json", str(tmp_path / "t.md")], "ends in .md"),
    ]
    for extra, says in cases:
        with pytest.raises(SystemExit) as exit_info:
            tool.main([str(backbone_file), *extra, *FAST])
        assert exit_info.value.code == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and err.count("\n") == 1, err
    assert not list(backbone_file.parent.glob("*eval_transfer*"))  # nothing written


def write_voc2007(root: Path, per_class: int = 2) -> None:
    """VOCdevkit/VOC2007 as torchvision's VOCDetection reads it: JPEGImages/, Annotations/*.xml,
    ImageSets/Main/{train,val,test}.txt. Image i of class c shows c's colour and has one object
    of c; every third image also has a "difficult" object of class c + 1."""
    from fastssl.eval.transfer_data import VOC_CLASSES

    voc = root / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    levels = (30, 130, 230)
    colours = np.array([[a, b, c] for a in levels for b in levels for c in levels][:20])
    for s, split in enumerate(("train", "val", "test")):
        labels = np.repeat(np.arange(20), per_class)
        rng = np.random.default_rng(s)
        images = np.clip(colours[labels][:, None, None, :] + rng.integers(-12, 13, (len(labels), 32, 32, 3)), 0, 255)
        ids = []
        for i, (c, image) in enumerate(zip(labels, images.astype(np.uint8))):
            ident = f"{split}{i:04d}"
            ids.append(ident)
            Image.fromarray(image).save(voc / "JPEGImages" / f"{ident}.jpg", quality=95)
            objects = [(VOC_CLASSES[c], 0)] + ([(VOC_CLASSES[(c + 1) % 20], 1)] if i % 3 == 0 else [])
            xml = "".join(f"<object><name>{n}</name><difficult>{d}</difficult></object>" for n, d in objects)
            (voc / "Annotations" / f"{ident}.xml").write_text(f"<annotation><filename>{ident}.jpg</filename>{xml}"
                                                              "</annotation>")
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")


def test_voc2007_from_torchvision_format(tool, tmp_path, backbone_file):
    from fastssl.eval.transfer_data import voc_targets

    data = tmp_path / "data"
    write_voc2007(data)
    test_split = torchvision.datasets.VOCDetection(data, year="2007", image_set="test", download=False)
    targets = voc_targets(test_split)
    assert targets.shape == (40, 20) and (targets[0, :2] == [1, -1]).all() and (targets[1, :3] == [1, 0, 0]).all()
    report = tool.main([str(backbone_file), "--data-root", str(data), "--datasets", "voc2007",
                        "--json", str(tmp_path / "voc.json"), *FAST, "--solver", "lbfgs", "--wd-values", "6"])
    r = report["datasets"]["voc2007"]
    assert (r["num_train"], r["num_val"], r["num_test"], r["num_classes"]) == (40, 40, 40, 20)
    assert r["metric"] == "map11" and r["val_split"] == "official val split"
    assert r["score"] >= 90.0  # one colour per class: a scrambled target matrix would score near chance
    assert report["solver"] == "lbfgs"  # the PyTorch path end to end (20 binary problems x 6 penalties at once)


@pytest.mark.parametrize("flag, value, says", [("--tol", "-1", "argument --tol: must be a finite number in [0, inf), got -1"),
                                               ("--tol", "nan", "argument --tol: must be a finite number in [0, inf), got nan"),
                                               ("--tol", "inf", "argument --tol: must be a finite number in [0, inf), got inf"),
                                               ("--num-workers", "-2", "argument --num-workers: must be between -1 and 512, got -2"),
                                               ("--wd-values", "100000000",
                                                "argument --wd-values: must be between 1 and 1000, got 100000000"),
                                               ("--image-size", "100000",
                                                "argument --image-size: must be between 1 and 1024, got 100000")])
def test_solver_and_loader_settings_are_checked_before_any_work(tool, backbone_file, tmp_path, capsys, flag, value,
                                                                says):
    """scikit-learn would refuse --tol -1 only after every feature was extracted, with its own traceback."""
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(backbone_file), "--folder", f"mine={tmp_path}", flag, value])
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_a_stopped_table_goes_on_with_the_next_dataset(tool, tmp_path, backbone_file, monkeypatch, capsys):
    """Stopped (SIGHUP, as Ctrl-C) while fitting its second dataset, the same command reuses the first one's
    saved column, fits only the second, and reports what an uninterrupted run reports."""
    pets, mine = tmp_path / "pets", tmp_path / "mine"
    write_folder(pets / "train", 6, seed=1)
    write_folder(pets / "test", 3, seed=3)
    write_folder(mine / "train", 5, seed=4, classes=2)
    write_folder(mine / "test", 3, seed=5, classes=2)
    argv = [str(backbone_file), "--folder", f"pets={pets}", "--folder", f"mine={mine}", *FAST]
    whole = tool.main(argv + ["--json", str(tmp_path / "whole.json")])
    out, partial = tmp_path / "t.json", tmp_path / ".t.json.partial.pt"
    real, fitted = tool.search_and_test, []

    def fit(*args, stop_at=None, **kwargs):
        fitted.append(kwargs["desc"])
        if len(fitted) == stop_at:  # a closed terminal's SIGHUP: said as a Ctrl-C is
            signal.raise_signal(signal.SIGHUP)
        return real(*args, **kwargs)

    monkeypatch.setattr(tool, "search_and_test", lambda *a, **k: fit(*a, stop_at=2, **k))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        tool.main(argv + ["--json", str(out)])
    assert stopped.value.code == 128 + signal.SIGHUP and not out.exists()
    said = capsys.readouterr().err
    assert f"interrupted by SIGHUP; the datasets done are kept in {partial}: the same command goes on" in said
    fitted.clear()
    monkeypatch.setattr(tool, "search_and_test", fit)
    again = tool.main(argv + ["--json", str(out)])
    said = capsys.readouterr()
    assert fitted == ["mine"] and f"resuming the transfer evaluation from {partial}: pets done" in said.err
    assert "(saved by the earlier run)" in said.out
    assert list(again["datasets"]) == ["pets", "mine"] and again["table"] == whole["table"]
    for name in ("pets", "mine"):
        assert again["datasets"][name]["val_scores"] == whole["datasets"][name]["val_scores"]
    assert not partial.exists()


def test_indexed_raises_a_transforms_error_and_skips_only_unreadable_images():
    """Any ValueError in the transform was taken for an unreadable image: a bug skipped every image."""
    import io

    from fastssl.eval.transfer_data import Indexed

    good = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    whole = png_bytes(good)
    cut = Image.open(io.BytesIO(whole[: len(whole) // 2]))  # lazy, as torchvision's datasets open files

    def broken(image: Image.Image) -> None:
        raise ValueError("a transform's bug")

    with pytest.raises(ValueError, match="a transform's bug"):
        Indexed([(good, 0)], [0], broken)[0]
    with pytest.warns(UserWarning, match="skipping unreadable image 0 of list"):
        assert Indexed([(cut, 0)], [0], broken)[0] is None


def png_bytes(image) -> bytes:
    import io

    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
