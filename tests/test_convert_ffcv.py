"""tools/convert_imagenet_to_ffcv.py: labels as ImageFolder, bad files reported, atomic output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, load_tool, make_image_folder, requires_ffcv

pytestmark = requires_ffcv
TOOL = str(REPO / "tools" / "convert_imagenet_to_ffcv.py")


@pytest.fixture(scope="module")
def conv():
    return load_tool("convert_imagenet_to_ffcv")


def read_beton(path: Path) -> tuple[list[int], list[tuple[int, int]]]:
    """Labels and image sizes as stored (FFCV's reader, no decoding)."""
    from ffcv.reader import Reader

    r = Reader(str(path))
    return r.metadata["f1"].tolist(), list(zip(r.metadata["f0"]["height"].tolist(), r.metadata["f0"]["width"].tolist()))


def test_labels_match_imagefolder_and_summary_is_complete(conv, tmp_path):
    from torchvision.datasets import ImageFolder

    src = tmp_path / "train"
    make_image_folder(src, num_classes=3, per_class=4)
    (src / "class_01" / "img_000.JPEG").rename(src / "class_01" / "zz_last.JPEG")  # order within a class
    out = tmp_path / "train.beton"
    summary = conv.convert(src, out, num_workers=1, progress=False, write_mode="jpg")
    assert summary["classes"] == ImageFolder(str(src)).classes
    labels, _ = read_beton(out)
    assert labels == [label for _, label in ImageFolder(str(src)).samples]
    saved = json.loads((tmp_path / "train.beton.json").read_text())
    assert saved["written"] == 12 and saved["skipped"] == [] and saved["classes"] == summary["classes"]
    assert {"bytes", "seconds", "images_per_s"} <= set(saved)


def test_bad_files_are_skipped_and_reported_with_exit_0(tmp_path):
    src = tmp_path / "train"
    make_image_folder(src, num_classes=2, per_class=3)
    good = (src / "class_00" / "img_000.JPEG").read_bytes()
    (src / "class_00" / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (src / "class_00" / "notes.txt").write_text("not an image")
    (src / "class_01" / "garbage.JPEG").write_bytes(b"\x00" * 500)
    Image.new("CMYK", (50, 40), (1, 2, 3, 4)).save(src / "class_01" / "cmyk.JPEG")
    Image.new("L", (50, 40), 7).save(src / "class_01" / "gray.JPEG")
    Image.new("RGB", (50, 40)).save(src / "class_01" / "png_named.JPEG", format="PNG")
    (src / "class_02_empty").mkdir()
    out = tmp_path / "train.beton"
    run = subprocess.run([sys.executable, TOOL, str(src), str(out), "--num-workers", "1", "--no-progress",
                          "--max-resolution", "32"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    summary = json.loads(Path(f"{out}.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"truncated.JPEG", "notes.txt", "garbage.JPEG", "class_02_empty"}
    assert "truncated" in reasons["truncated.JPEG"] and "empty class folder" in reasons["class_02_empty"]
    assert summary["written"] == 6 + 3 and summary["classes"] == ["class_00", "class_01", "class_02_empty"]
    _, sizes = read_beton(out)
    assert max(max(s) for s in sizes) <= 32  # --max-resolution applied
    assert "skipped 4" in run.stdout


def test_flat_val_with_labels_file_and_subset(conv, tmp_path):
    train = tmp_path / "train"
    make_image_folder(train, num_classes=3, per_class=1)
    val = tmp_path / "val"
    val.mkdir()
    lines = []
    for k, cls in enumerate(["class_02", "class_00", "class_02", "class_02"]):
        Image.fromarray(np.full((20, 20, 3), 40 * k, np.uint8)).save(val / f"v{k}.JPEG")
        lines.append(f"v{k}.JPEG {cls}")
    labels = tmp_path / "val_labels.txt"
    labels.write_text("\n".join(lines) + "\n")
    out = tmp_path / "val.beton"
    summary = conv.convert(val, out, labels=labels, classes_from=train, subset_per_class=2, num_workers=1,
                           progress=False)
    assert summary["classes"] == ["class_00", "class_01", "class_02"]
    assert read_beton(out)[0] == [2, 0, 2]  # the third class_02 image is past the subset


def test_failures_exit_1_and_leave_no_file(conv, tmp_path):
    out = tmp_path / "x.beton"
    run = subprocess.run([sys.executable, TOOL, str(tmp_path / "missing"), str(out)], capture_output=True, text=True)
    assert run.returncode == 1 and "does not exist" in run.stderr
    src = tmp_path / "train" / "c0"
    src.mkdir(parents=True)
    (src / "a.JPEG").write_bytes(b"junk" * 20)
    with pytest.raises(conv.ConversionError, match="no readable images"):
        conv.convert(tmp_path / "train", out, num_workers=1, progress=False)
    assert list(tmp_path.glob("*.beton*")) == [] and list(tmp_path.glob(".x.beton*")) == []
    run = subprocess.run([sys.executable, TOOL, str(tmp_path / "train"), str(tmp_path / "x.zip")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "should end in .beton" in run.stderr


def test_loader_names_the_converter_for_a_missing_or_foreign_file(tmp_path):
    from pipelines.beton import BetonError, check_beton

    with pytest.raises(BetonError, match="convert_imagenet_to_ffcv"):
        check_beton(tmp_path / "nope.beton")
    (tmp_path / "junk.beton").write_bytes(b"\x00" * 1000)
    with pytest.raises(BetonError, match="convert_imagenet_to_ffcv"):
        check_beton(tmp_path / "junk.beton")
