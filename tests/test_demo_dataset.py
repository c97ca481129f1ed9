"""Tests for the embedded default dataset: `pipelines/demo_data.py` (the generator) and
`tools/make_demo_dataset.py` (its command line).

Besides layout and reproducibility, these check the property the demo relies
on: the label is carried by shape/texture, not by colour.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, kill_tree, load_tool
from pipelines import demo_data, demo_images

# The command line only; the worker pool pickles functions of `pipelines.demo_data`, a package module,
# so loading the tool here (or again in another test file) cannot break it.
tool = load_tool("make_demo_dataset")
TOOL = REPO / "tools" / "make_demo_dataset.py"

TINY = dict(num_classes=3, train_per_class=4, val_per_class=2, image_size=40, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    out = tmp_path / "demo"
    demo_data.make_demo_dataset(out, progress=False, workers=1, **TINY)
    return out


# --------------------------------------------------------------------------- determinism


def test_byte_identical_across_runs_and_worker_counts(tmp_path: Path) -> None:
    a = demo_data.make_demo_dataset(tmp_path / "a", progress=False, workers=1, **TINY)
    b = demo_data.make_demo_dataset(tmp_path / "b", progress=False, workers=2, **TINY)
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert files_a == files_b
    assert a["sha256"] == b["sha256"] == demo_data.content_hash(tmp_path / "a")


def test_seed_changes_content(tmp_path: Path) -> None:
    a = demo_data.make_demo_dataset(tmp_path / "a", progress=False, workers=1, **TINY)
    b = demo_data.make_demo_dataset(tmp_path / "b", progress=False, workers=1, **{**TINY, "seed": 4})
    assert a["sha256"] != b["sha256"]


def test_render_is_independent_of_generation_order() -> None:
    # Per-image seeding: rendering image 5 alone equals rendering it after others.
    rng = lambda: demo_data.image_rng(0, "train", 1, 5)  # noqa: E731
    first = demo_images.render_image("star", "dots", 48, rng())
    demo_images.render_image("ring", "checker", 48, demo_data.image_rng(0, "train", 0, 0))
    assert np.array_equal(first, demo_images.render_image("star", "dots", 48, rng()))


# --------------------------------------------------------------------------- layout


def test_layout_counts_and_images(tiny: Path) -> None:
    names = demo_images.class_names(TINY["num_classes"])
    assert names == sorted(names), "sorted folder order must equal label order"
    assert len(set(demo_images.class_specs(10))) == 10
    for split, per_class in (("train", TINY["train_per_class"]), ("val", TINY["val_per_class"])):
        assert sorted(p.name for p in (tiny / split).iterdir()) == names
        for name in names:
            files = sorted((tiny / split / name).iterdir())
            assert len(files) == per_class
            for f in files:
                assert f.suffix == ".JPEG"
                with Image.open(f) as im:
                    assert im.format == "JPEG" and im.mode == "RGB"
                    assert im.size == (TINY["image_size"], TINY["image_size"])
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert manifest["classes"] == names
    assert manifest["counts"] == {"train": 12, "val": 6}
    assert manifest["arguments"]["seed"] == TINY["seed"]
    assert manifest["sha256"] == demo_data.content_hash(tiny)
    assert sorted(p.name for p in tiny.parent.iterdir()) == ["demo"], "no temporary directory left behind"


def test_default_classes_differ_in_shape_and_in_texture() -> None:
    specs = demo_images.class_specs(demo_data.DEFAULT_NUM_CLASSES)
    shapes = [s for s, _ in specs]
    textures = [t for _, t in specs]
    # Every default class has its own shape and its own texture; beyond that, reuse is even.
    assert len(set(shapes)) == len(specs) == len(set(textures))
    more = demo_images.class_specs(demo_images.MAX_CLASSES)
    assert len(set(more)) == demo_images.MAX_CLASSES
    assert all(name.split("_", 1)[1] == f"{s}_{t}" for name, (s, t) in zip(demo_images.class_names(10), specs))


# --------------------------------------------------------------------------- idempotence / refusal


def test_second_run_is_a_noop(tiny: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny.rglob("*")}
    result = demo_data.make_demo_dataset(tiny, progress=False, **TINY)
    assert result["status"] == "exists"
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*")} == before


def test_other_arguments_refused_then_forced(tiny: Path) -> None:
    other = {**TINY, "val_per_class": 3}
    with pytest.raises(demo_data.DatasetExistsError, match="different arguments.*--force"):
        demo_data.make_demo_dataset(tiny, progress=False, **other)
    result = demo_data.make_demo_dataset(tiny, progress=False, force=True, workers=1, **other)
    assert result["status"] == "created"
    assert json.loads((tiny / "manifest.json").read_text())["counts"]["val"] == 9
    assert sorted(p.name for p in tiny.parent.iterdir()) == ["demo"]


def test_missing_images_refused_then_forced(tiny: Path) -> None:
    next((tiny / "val").rglob("*.JPEG")).unlink()
    with pytest.raises(demo_data.DatasetExistsError, match="incomplete demo dataset.*--force"):
        demo_data.make_demo_dataset(tiny, progress=False, **TINY)
    assert demo_data.make_demo_dataset(tiny, progress=False, force=True, workers=1, **TINY)["status"] == "created"


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_or_file_that_is_no_demo_dataset_is_never_replaced(tmp_path: Path, force: bool) -> None:
    """`data` typed for `data/demo`: the user's own files survive, --force or not."""
    folder = tmp_path / "data"
    (folder / "imagenet").mkdir(parents=True)
    (folder / "imagenet" / "notes.txt").write_text("mine")
    lone_file = tmp_path / "notes.txt"
    lone_file.write_text("mine too")
    for out, what in ((folder, "a folder that is not a demo dataset"), (lone_file, "a file")):
        with pytest.raises(demo_data.DatasetExistsError, match=f"is {what}.*--force replaces only a demo dataset"):
            demo_data.make_demo_dataset(out, progress=False, force=force, workers=1, **TINY)
    assert (folder / "imagenet" / "notes.txt").read_text() == "mine" and lone_file.read_text() == "mine too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "notes.txt"]  # no temporary folder left


def test_a_demo_folder_without_its_manifest_is_refused(tiny: Path) -> None:
    (tiny / "manifest.json").unlink()
    with pytest.raises(demo_data.DatasetExistsError, match="not a demo dataset"):
        demo_data.make_demo_dataset(tiny, progress=False, force=True, **TINY)


@pytest.mark.parametrize("failing", ["aside", "into place"])
def test_a_replacement_that_cannot_take_the_place_keeps_the_old_dataset(tiny: Path, monkeypatch, failing) -> None:
    """--force onto a mount point or a protected folder: a rename fails (EBUSY, EPERM), moving the
    old tree aside or the new one into its place; the old dataset stays (is put back) and the error
    says why, as a refusal (exit 2), not a traceback."""
    import errno
    import os

    before = _files(tiny)
    real, calls = os.replace, []

    def busy(src, dst):
        calls.append((Path(src), Path(dst)))
        if len(calls) == {"aside": 1, "into place": 2}[failing]:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        return real(src, dst)

    monkeypatch.setattr(demo_data.os, "replace", busy)
    other = {**TINY, "val_per_class": 3}
    with pytest.raises(demo_data.OutputDirError, match=f"cannot put the dataset at {tiny}: Device or resource busy"):
        demo_data.make_demo_dataset(tiny, progress=False, force=True, workers=1, **other)
    assert calls[0][0] == tiny and len(calls) == {"aside": 1, "into place": 3}[failing]
    assert _files(tiny) == before and sorted(p.name for p in tiny.parent.iterdir()) == ["demo"]


def test_empty_directory_is_filled(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    assert demo_data.make_demo_dataset(tmp_path / "demo", progress=False, workers=1, **TINY)["status"] == "created"


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = demo_data.render_image

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(demo_data, "render_image", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        demo_data.make_demo_dataset(tmp_path / "demo", progress=False, workers=1, **TINY)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- CLI / validation


def test_cli_creates_then_reports_up_to_date(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = [str(tmp_path / "d"), "--num-classes", "2", "--train-per-class", "2", "--val-per-class", "1",
            "--image-size", "32", "--no-progress", "--workers", "1"]
    assert tool.main(argv) == 0
    assert "wrote 4 train / 2 val" in capsys.readouterr().out
    assert tool.main(argv) == 0
    assert "already up to date" in capsys.readouterr().out
    assert tool.main(argv[:-2] + ["--seed", "1"]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value",
    [("--train-per-class", "0"), ("--val-per-class", "-1"), ("--image-size", "31"),
     ("--num-classes", "1"), ("--num-classes", str(demo_images.MAX_CLASSES + 1)), ("--seed", "x")],
)
def test_cli_rejects_bad_values(tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        tool.main([str(tmp_path / "d"), flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "kwargs",
    [{"train_per_class": 0}, {"val_per_class": -2}, {"image_size": 16}, {"num_classes": 1}, {"seed": -1}],
)
def test_function_rejects_bad_values(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        demo_data.make_demo_dataset(tmp_path / "d", progress=False, **{**TINY, **kwargs})


# --------------------------------------------------------------------------- the label is shape, not colour


def _load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for label, folder in enumerate(sorted((root / split).iterdir())):
        for f in sorted(folder.iterdir()):
            with Image.open(f) as im:
                images.append(np.asarray(im, dtype=np.float32) / 255.0)
            labels.append(label)
    return np.stack(images), np.array(labels)


def _mean_rgb(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=(1, 2))


def _polar_spectrum(x: np.ndarray, rbins: int = 8, orders: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 10)) -> np.ndarray:
    """Colour-blind, translation- and rotation-invariant shape/texture features.

    Power spectrum of the contrast-normalised grayscale image (translation
    invariant), pooled in radial bands (texture frequency) plus the magnitudes
    of its angular Fourier modes (n-fold symmetry of edges: rotation invariant).
    """
    g = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    g = g - g.mean(axis=(1, 2), keepdims=True)
    g = g / (g.std(axis=(1, 2), keepdims=True) + 1e-6)
    power = (np.abs(np.fft.fft2(g)) ** 2).reshape(len(g), -1)
    f = np.fft.fftfreq(g.shape[1])
    fx, fy = np.meshgrid(f, f)
    band = np.minimum((np.hypot(fx, fy) / 0.5 * rbins).astype(int), rbins).reshape(-1)
    onehot = np.stack([band == b for b in range(rbins)]).astype(np.float64).T  # HW x B (corners dropped)
    radial = power @ onehot
    feats = [np.log(radial / radial.sum(1, keepdims=True) + 1e-8)]
    angle = np.arctan2(fy, fx).reshape(-1)
    for m in orders:
        feats.append(np.abs((power * np.exp(1j * m * angle)) @ onehot) / (radial + 1e-8))
    return np.concatenate(feats, axis=1)


def _nearest_mean_accuracy(ftr, ytr, fva, yva) -> float:
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-8
    ftr, fva = (ftr - mu) / sd, (fva - mu) / sd
    means = np.stack([ftr[ytr == c].mean(0) for c in range(ytr.max() + 1)])
    pred = ((fva[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    return float((pred == yva).mean())


def _logistic_accuracy(ftr, ytr, fva, yva) -> float:
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-8
    a = torch.tensor((ftr - mu) / sd, dtype=torch.float32)
    b = torch.tensor((fva - mu) / sd, dtype=torch.float32)
    y = torch.tensor(ytr)
    torch.manual_seed(0)
    model = torch.nn.Linear(a.shape[1], int(ytr.max()) + 1)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=300)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(a), y) + 1e-3 * model.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((model(b).argmax(1).numpy() == yva).mean())


@pytest.fixture(scope="module")
def stats_split(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("stats") / "demo"
    demo_data.make_demo_dataset(out, num_classes=10, train_per_class=60, val_per_class=20, image_size=64, seed=1,
                                progress=False)
    return _load_split(out, "train"), _load_split(out, "val")


def test_mean_colour_does_not_separate_classes(stats_split) -> None:
    (xtr, ytr), (xva, yva) = stats_split
    ftr, fva = _mean_rgb(xtr), _mean_rgb(xva)
    # Chance is 10%; 200 queries -> std ~2 points.
    assert _nearest_mean_accuracy(ftr, ytr, fva, yva) < 0.22
    assert _logistic_accuracy(ftr, ytr, fva, yva) < 0.22


def test_colour_blind_shape_features_do(stats_split) -> None:
    (xtr, ytr), (xva, yva) = stats_split
    ftr, fva = _polar_spectrum(xtr), _polar_spectrum(xva)
    assert _logistic_accuracy(ftr, ytr, fva, yva) > 0.33  # > 3x chance


def test_cli_refuses_an_output_it_cannot_create(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """OUT under a file, or in a folder that takes no new folders (/proc): one line, exit 2, no traceback."""
    (tmp_path / "a_file").write_text("x")
    tiny = ["--num-classes", "2", "--train-per-class", "1", "--val-per-class", "1", "--image-size", "32",
            "--no-progress", "--workers", "1"]
    assert tool.main([str(tmp_path / "a_file" / "demo"), *tiny]) == 2
    where = tmp_path.resolve() / "a_file"  # the tool names resolved paths
    assert f"cannot create {where / 'demo'}: {where} is a file" in capsys.readouterr().err
    if Path("/proc/self").is_dir():  # Linux
        assert tool.main(["/proc/fastssl_demo", *tiny]) == 2
        assert "cannot create /proc/fastssl_demo: /proc takes no new folders" in capsys.readouterr().err


@pytest.mark.parametrize("stop", ["ctrl-c", "SIGTERM"])
def test_a_stopped_cli_says_so_in_one_line_and_removes_its_unfinished_dataset(tmp_path: Path, stop: str) -> None:
    """Ctrl-C (to the whole process group, as a terminal sends it, pool workers included) or a `kill`
    mid-render: one line and the shell's status for it; no worker tracebacks, no folder left behind."""
    out = tmp_path / "demo"
    err_log = tmp_path / "stderr.txt"
    with err_log.open("w") as err_sink:
        proc = subprocess.Popen([sys.executable, str(TOOL), str(out), "--num-classes", "4", "--train-per-class",
                                 "400", "--val-per-class", "1", "--image-size", "128", "--workers", "2",
                                 "--no-progress"], stdout=subprocess.DEVNULL, stderr=err_sink,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not any(tmp_path.glob(".demo.tmp-*/train/*/*.JPEG")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no image was written in 120 s"
            time.sleep(0.05)
        assert proc.poll() is None, "the dataset was finished before the stop: make it larger"
        if stop == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        kill_tree(proc)
    said = err_log.read_text()
    expected, first = (130, "interrupted;") if stop == "ctrl-c" else (128 + signal.SIGTERM, "interrupted by SIGTERM;")
    assert code == expected and said.startswith(first) and "Traceback" not in said, said
    assert said.count("\n") == 1 and "run the command again" in said, said
    assert list(tmp_path.iterdir()) == [err_log]


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path: Path, capsys) -> None:
    """kill -9 leaves the temporary folder; the next run removes it (its PID is gone), not a live run's."""
    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    stale, live = tmp_path / f".demo.tmp-{gone.pid}", tmp_path / f".demo.tmp-{os.getppid()}"
    for folder in (stale, live):
        (folder / "train").mkdir(parents=True)
    demo_data.make_demo_dataset(tmp_path / "demo", progress=False, workers=1, **TINY)
    assert not stale.exists() and live.exists()
    assert f"removed {stale}: left by an interrupted run (PID {gone.pid} is gone)" in capsys.readouterr().err


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    def no_room(pixels):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(demo_data, "encode_jpeg", no_room)
    assert tool.main([str(tmp_path / "demo"), "--num-classes", "2", "--train-per-class", "1", "--val-per-class", "1",
                      "--image-size", "32", "--no-progress", "--workers", "1"]) == 2
    said = capsys.readouterr().err
    assert "No space left on device" in said and "free space there" in said and "Traceback" not in said
    assert list(tmp_path.iterdir()) == []
