"""tools/convert_imagenet_to_ffcv.py: labels as ImageFolder, bad files reported, atomic output that
a stopped conversion continues."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, alive, descendants, kill_tree, load_tool, make_image_folder, requires_ffcv
from pipelines.beton import summary_path

pytestmark = requires_ffcv
TOOL = str(REPO / "tools" / "convert_imagenet_to_ffcv.py")


@pytest.fixture(scope="module")
def conv():
    """The conversion the tool runs (pipelines/beton_convert.py); the command line is tested through TOOL."""
    import pipelines.beton_convert

    return pipelines.beton_convert


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
                          "--max-resolution", "32"], capture_output=True, text=True, timeout=300)
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
    labels.write_text("v0.JPEG class_02\nonly_one_field\n")  # the user's file is wrong: a usage error (exit 2)
    with pytest.raises(conv.UsageError, match=r"val_labels.txt:2: expected `<file name> <class>`"):
        conv.convert(val, tmp_path / "other.beton", labels=labels, classes_from=train, progress=False)
    labels.write_text("v0.JPEG class_02\nv1.JPEG class_00\n# v0 again\nv0.JPEG class_01\n")  # one image, 2 classes
    with pytest.raises(conv.UsageError, match=r"val_labels.txt:4: v0.JPEG is listed again \(first on line 1\)"):
        conv.convert(val, tmp_path / "other.beton", labels=labels, classes_from=train, progress=False)
    assert not (tmp_path / "other.beton").exists()


def test_class_folders_with_classes_from_keep_the_training_splits_labels(conv, tmp_path):
    """A val split in class folders holding only some of train's classes: labels are places in train's list
    (ImageFolder's mapping of the val split alone would shift them)."""
    train, val = tmp_path / "train", tmp_path / "val"
    make_image_folder(train, num_classes=3, per_class=1)
    make_image_folder(val, num_classes=3, per_class=2)
    shutil.rmtree(val / "class_00")
    summary = conv.convert(val, tmp_path / "val.beton", classes_from=train, num_workers=1, progress=False)
    assert summary["classes"] == ["class_00", "class_01", "class_02"]
    assert read_beton(tmp_path / "val.beton")[0] == [1, 1, 2, 2]
    (val / "class_09").mkdir()  # a class train does not have: no label to give it
    with pytest.raises(conv.UsageError, match="has class folders that --classes-from does not: class_09"):
        conv.convert(val, tmp_path / "val2.beton", classes_from=train, num_workers=1, progress=False)
    with pytest.raises(conv.UsageError, match="--classes-from .* is not a folder"):
        conv.convert(val, tmp_path / "val2.beton", classes_from=tmp_path / "nowhere", num_workers=1, progress=False)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(conv.UsageError, match="labels file .* is not a text file"):
        conv.convert(tmp_path, tmp_path / "val2.beton", labels=tmp_path / "binary.txt", num_workers=1, progress=False)


def test_failures_exit_1_usage_errors_exit_2_and_neither_leaves_a_file(conv, tmp_path):
    out = tmp_path / "x.beton"
    run = subprocess.run([sys.executable, TOOL, str(tmp_path / "missing"), str(out)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "does not exist" in run.stderr and "Traceback" not in run.stderr
    flat = tmp_path / "flat"
    flat.mkdir()
    (tmp_path / "empty.txt").write_text("# nothing listed\n")
    (tmp_path / "one.txt").write_text("a.JPEG c0\n")
    for extra, needle in ((["--labels", str(tmp_path / "empty.txt")], "lists no images"),
                          (["--labels", str(tmp_path / "one.txt"), "--classes-from", str(tmp_path / "nowhere")],
                           "--classes-from '" + str(tmp_path / "nowhere") + "' is not a folder"),
                          ([], "has no class folders")):
        run = subprocess.run([sys.executable, TOOL, str(flat), str(out), *extra], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 2 and needle in run.stderr and "Traceback" not in run.stderr, (extra, run.stderr)
    src = tmp_path / "train" / "c0"
    src.mkdir(parents=True)
    (src / "a.JPEG").write_bytes(b"junk" * 20)
    with pytest.raises(conv.ConversionError, match=r"no readable images .*\(1 skipped, e\.g\. .*a\.JPEG: "):
        conv.convert(tmp_path / "train", out, num_workers=1, progress=False)  # the cause, not only a count
    (tmp_path / "a_folder.beton").mkdir()  # --force replaces a file: a folder failed only after the whole conversion
    with pytest.raises(conv.UsageError, match="is a folder; name the .beton file to write"):
        conv.convert(tmp_path / "train", tmp_path / "a_folder.beton", num_workers=1, progress=False, force=True)
    (tmp_path / "a_folder.beton").rmdir()
    with pytest.raises(conv.UsageError, match="output folder .* is a file, not a folder"):
        conv.convert(tmp_path / "train", tmp_path / "empty.txt" / "x.beton", num_workers=1, progress=False)
    with pytest.raises(conv.UsageError, match="output folder .* does not exist; create it first \\(mkdir -p "):
        conv.convert(tmp_path / "train", tmp_path / "no" / "x.beton", num_workers=1, progress=False)
    assert list(tmp_path.glob("*.beton*")) == [] and list(tmp_path.glob(".x.beton*")) == []
    run = subprocess.run([sys.executable, TOOL, str(tmp_path / "train"), str(tmp_path / "x.zip")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "should end in .beton" in run.stderr


def test_loader_names_the_converter_for_a_missing_or_foreign_file(tmp_path):
    from pipelines.beton import BetonError, check_beton

    with pytest.raises(BetonError, match="convert_imagenet_to_ffcv"):
        check_beton(tmp_path / "nope.beton")
    (tmp_path / "junk.beton").write_bytes(b"\x00" * 1000)
    with pytest.raises(BetonError, match="convert_imagenet_to_ffcv"):
        check_beton(tmp_path / "junk.beton")


def test_a_beton_cut_short_is_named_before_training(conv, tmp_path):
    """A .beton missing its last 100 bytes passed the header check; FFCV's reader thread then died on it
    mid-epoch and the training loop waited for it forever (deaf to SIGTERM). Every cut is now named."""
    from pipelines.beton import BetonError, check_beton

    src = tmp_path / "train"
    make_image_folder(src, num_classes=2, per_class=4)
    whole = tmp_path / "whole.beton"
    conv.convert(src, whole, num_workers=1, progress=False)
    assert check_beton(whole) == (["class_00", "class_01"], 8)
    data = whole.read_bytes()
    for cut in (1, 16, 24, 100, 1000):  # into the allocation table's last entry, a whole entry, more
        short = tmp_path / f"cut{cut}.beton"
        short.write_bytes(data[:-cut])
        with pytest.raises(BetonError, match=rf"cut{cut}.beton' is (damaged|not a readable .beton)"):
            check_beton(short)


def test_images_zeroed_or_overwritten_in_a_beton_are_named_before_training(conv, tmp_path):
    """A .beton whose image bytes were zeroed (a copy to a failing disk, a sparse file) has a sound layout
    and trained without a word; the stored JPEGs' markers and the raw images' sizes now tell."""
    from ffcv.reader import Reader

    from pipelines.beton import BetonError, check_beton

    src = tmp_path / "train"
    make_image_folder(src, num_classes=2, per_class=4)
    whole = tmp_path / "whole.beton"
    conv.convert(src, whole, num_workers=1, progress=False, write_mode="proportion", compress_probability=0.5)
    image = Reader(str(whole)).metadata["f0"]
    assert check_beton(whole).num_images == 8 and 0 < int((image["mode"] == 0).sum()) < 8  # JPEG and raw both
    data = bytearray(whole.read_bytes())
    first_jpeg = int(np.flatnonzero(image["mode"] == 0)[0])
    start = int(image["data_ptr"][first_jpeg])
    for name, offset in (("head", start), ("tail", None)):
        damaged = bytearray(data)
        if offset is None:  # every image's bytes zeroed, as a sparse copy reads
            images_end = int(Reader(str(whole)).header["alloc_table_ptr"])
            damaged[int(image["data_ptr"].min()):images_end] = bytes(images_end - int(image["data_ptr"].min()))
        else:
            damaged[offset:offset + 2] = b"\x00\x00"
        bad = tmp_path / f"{name}.beton"
        bad.write_bytes(bytes(damaged))
        with pytest.raises(BetonError, match=rf"{name}.beton' is damaged: image \d+'s stored JPEG lacks"):
            check_beton(bad)


def test_image_damage_names_a_raw_image_of_the_wrong_size_and_a_stray_pointer(conv, tmp_path):
    import types

    from ffcv.reader import Reader

    from pipelines.beton import image_damage

    src = tmp_path / "train"
    make_image_folder(src, num_classes=2, per_class=2)
    path = tmp_path / "raw.beton"
    conv.convert(src, path, num_workers=1, progress=False, write_mode="raw")
    reader = Reader(str(path))
    assert image_damage(reader, path) == ""

    def edited(field: str, change: int) -> types.SimpleNamespace:
        metadata = reader.metadata.copy()
        metadata["f0"][field][2] += change
        return types.SimpleNamespace(metadata=metadata, handlers=reader.handlers, alloc_table=reader.alloc_table)

    height, width = (int(reader.metadata["f0"][side][2]) for side in ("height", "width"))
    assert image_damage(edited("width", 1), path) == (f"image 2 is stored raw as {height * width * 3} bytes, "
                                                      f"not {height} x {width + 1} x 3")
    assert image_damage(edited("data_ptr", 1), path) == "image 2's data is not where the allocation table says"


def test_a_beton_whose_image_field_is_not_an_rgb_image_field_is_named(tmp_path):
    from ffcv.fields import BytesField, IntField
    from ffcv.writer import DatasetWriter

    from pipelines.beton import BetonError, check_beton

    class Bytes:
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
            return np.frombuffer(b"abcd", dtype=np.uint8), i

    path = tmp_path / "bytes.beton"
    DatasetWriter(str(path), {"image": BytesField(), "label": IntField()}, num_workers=1).from_indexed_dataset(Bytes())
    with pytest.raises(BetonError, match="stores its 'image' field as BytesField, not the RGBImageField"):
        check_beton(path)


def test_a_dead_ffcv_reader_thread_ends_the_epoch_with_an_error_not_a_wait():
    """FFCV's __next__ waits on its queue with no timeout: a reader thread that died left the loop waiting."""
    import queue
    import types

    from pipelines.beton import BetonError
    from pipelines.ffcv import _delivered

    def reader(items: list, alive: bool) -> types.SimpleNamespace:
        q = queue.Queue()
        for item in items:
            q.put(item)
        return types.SimpleNamespace(output_queue=q, is_alive=lambda: alive, close=lambda: None)

    assert list(_delivered(reader([(0, "a"), (1, "b"), None], alive=True), "x.beton")) == ["a", "b"]
    assert list(_delivered(reader([(0, "a"), None], alive=False), "x.beton")) == ["a"]  # ended after its last put
    with pytest.raises(BetonError, match="FFCV's reader of 'x.beton' stopped mid-epoch"):
        list(_delivered(reader([(0, "a")], alive=False), "x.beton"))


# --------------------------------------------------------------------------- never hangs, nothing left behind


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory) -> Path:
    """Enough images that a conversion with 2 workers runs for a few seconds."""
    root = tmp_path_factory.mktemp("big") / "train"
    make_image_folder(root, num_classes=4, per_class=600, size=128)
    return root


class Converter:
    """The converter tool in a child process of its own session, its output in files. Its workers
    (from its fork server) would hold a pipe open after it died, so a test reading pipes could wait
    on them for good; `stop` kills every process of the session whatever the test left."""

    def __init__(self, src: Path, out: Path, *extra: str, logs: Path):
        self.out_log, self.err_log = logs / "stdout.txt", logs / "stderr.txt"
        with self.out_log.open("w") as out_sink, self.err_log.open("w") as err_sink:
            self.proc = subprocess.Popen([sys.executable, TOOL, str(src), str(out), "--num-workers", "2",
                                          "--no-progress", "--write-mode", "jpg", *extra],
                                         stdout=out_sink, stderr=err_sink, text=True, start_new_session=True)
        self.pid = self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once it ends; subprocess.TimeoutExpired after `timeout` s."""
        code = self.proc.wait(timeout=timeout)
        return code, self.out_log.read_text(), self.err_log.read_text()

    def stop(self) -> None:
        kill_tree(self.proc)  # the converter, its fork server, its workers
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def start_converter(tmp_path_factory):
    """`start_converter(src, out, *extra)` -> a running `Converter`; every one is stopped after the test."""
    started: list[Converter] = []

    def start(src: Path, out: Path, *extra: str) -> Converter:
        started.append(Converter(src, out, *extra, logs=tmp_path_factory.mktemp("converter")))
        return started[-1]

    yield start
    for converter in started:
        converter.stop()


def wait_for_workers(proc: Converter, out: Path, writing: bool, limit: float = 120) -> dict[int, int]:
    """Once the converter's workers (grandchildren: they come from its fork server) run, and,
    with `writing`, the .beton's header is written: all its descendants."""
    deadline = time.monotonic() + limit
    partial = out.parent / f".{out.name}.partial" / "data"
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the converter ended early: {proc.finish(timeout=30)}"
        below = descendants(proc.pid)
        workers = [c for c, p in below.items() if p != proc.pid]
        try:
            started = not writing or partial.stat().st_size > 0
        except FileNotFoundError:
            started = False
        if workers and started:
            return below
        time.sleep(0.02)
    raise AssertionError("the converter's workers never started")


def saved_images(out: Path) -> int:
    """How many images the progress of an interrupted conversion into `out` holds (0 if none)."""
    try:
        with np.load(out.parent / f".{out.name}.partial" / "progress.npz") as saved:
            return len(saved["sample_ids"])
    except (OSError, ValueError, KeyError):
        return 0


def stored_content(path: Path) -> tuple[list, dict]:
    """Every sample's metadata (mode, width, height, label) and stored bytes, by sample id: what a
    reader gets, whatever page each sample landed in."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    data = np.fromfile(path, dtype=np.uint8)
    stored: dict[int, list[bytes]] = {}
    for sid, ptr, size in reader.alloc_table[["sample_id", "ptr", "size"]].tolist():
        stored.setdefault(sid, []).append(data[ptr:ptr + size].tobytes())
    image, label = reader.metadata["f0"], reader.metadata["f1"]
    rows = list(zip(image["mode"].tolist(), image["width"].tolist(), image["height"].tolist(), label.tolist()))
    return rows, stored


def assert_nothing_left_or_kept(folder: Path, out: Path, err: str) -> None:
    """After a failed or stopped conversion: no output, and a partial folder only when it holds
    saved images and the message says where (the same command continues from there)."""
    partial = out.parent / f".{out.name}.partial"
    assert not out.exists()
    if partial.exists():
        assert saved_images(out) > 0 and f"kept in '{partial}'" in err and "the same command continues" in err, err
        assert sorted(p.name for p in folder.iterdir() if p != partial) == []
    else:
        assert list(folder.iterdir()) == [] and "kept in" not in err, err


def test_kill_9_leaves_no_worker_and_the_same_command_continues_to_the_same_beton(big_folder, tmp_path,
                                                                                   start_converter, conv):
    """Progress saved every 0.1 s; killed (SIGKILL: nothing runs after it) once some images are
    saved. The rerun continues from them, and its .beton holds exactly what an uninterrupted
    conversion stores."""
    out = tmp_path / "x.beton"
    proc = start_converter(big_folder, out, "--checkpoint-every", "0.1", "--write-mode", "raw")  # many pages
    below = set(wait_for_workers(proc, out, writing=True))
    while proc.poll() is None and not saved_images(out):
        time.sleep(0.005)
    saved = saved_images(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.finish(timeout=30)
    assert not out.exists() and saved, "the conversion finished before the kill: make big_folder bigger"
    deadline = time.monotonic() + 10
    while alive(below) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(below), f"processes of the killed converter still run: {alive(below)}"
    rerun = subprocess.run([sys.executable, TOOL, str(big_folder), str(out), "--num-workers", "2",
                            "--write-mode", "raw"], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming the interrupted conversion in {tmp_path / '.x.beton.partial'}: " in rerun.stderr
    assert "of them by an earlier run" in rerun.stdout, rerun.stdout
    assert json.loads(summary_path(out).read_text())["resumed"] >= saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.beton", "x.beton.json"]
    fresh = tmp_path / "fresh" / "x.beton"
    fresh.parent.mkdir()
    conv.convert(big_folder, fresh, num_workers=2, write_mode="raw", progress=False)  # the same, uninterrupted
    assert stored_content(out) == stored_content(fresh)


def test_sigterm_saves_progress_and_stops_the_workers(big_folder, tmp_path, start_converter):
    out = tmp_path / "x.beton"
    proc = start_converter(big_folder, out)
    below = set(wait_for_workers(proc, out, writing=True))
    os.kill(proc.pid, signal.SIGTERM)
    try:
        code, _, err = proc.finish(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError("the converter did not stop within 15 s of SIGTERM") from None
    assert code == 128 + signal.SIGTERM and "Traceback" not in err and "interrupted by SIGTERM" in err, err
    assert_nothing_left_or_kept(tmp_path, out, err)
    deadline = time.monotonic() + 10
    while alive(below) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(below)


def test_a_worker_killed_fails_the_conversion_within_seconds(big_folder, tmp_path, start_converter):
    out = tmp_path / "x.beton"
    proc = start_converter(big_folder, out)
    below = wait_for_workers(proc, out, writing=True)
    victim = min(c for c, p in below.items() if p != proc.pid)  # a worker, not the fork server
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    try:
        code, _, err = proc.finish(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the converter still waits {time.monotonic() - killed:.0f} s after a worker died") \
            from None
    assert code == 1 and "worker" in err and "died" in err, err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert_nothing_left_or_kept(tmp_path, out, err)
    deadline = time.monotonic() + 10
    while alive(set(below)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(set(below))


def test_a_failing_worker_reports_its_error_and_keeps_only_saved_images(conv, tmp_path, monkeypatch):
    """A worker's error (here: a label FFCV cannot store) fails the conversion at once, with the
    worker's message; FFCV's own writer waited forever for such a worker."""
    src = tmp_path / "train"
    make_image_folder(src, num_classes=2, per_class=3)
    listed = conv.scan(src, None, None, 0)
    listed.samples[4] = (listed.samples[4][0], "not a label")
    monkeypatch.setattr(conv, "scan", lambda *args: listed)
    out = tmp_path / "out" / "x.beton"
    out.parent.mkdir()
    start = time.monotonic()
    with pytest.raises(conv.ConversionError, match="writing worker failed: ValueError") as failed:
        conv.convert(src, out, num_workers=2, progress=False)
    assert time.monotonic() - start < 60
    assert_nothing_left_or_kept(tmp_path / "out", out, str(failed.value))


def test_an_image_gone_before_its_write_is_skipped_and_listed(conv, tmp_path, monkeypatch):
    """The files are listed first and read as they are written: one deleted in between is skipped
    like any unreadable file, and the others are written."""
    src = tmp_path / "train"
    paths = make_image_folder(src, num_classes=2, per_class=3)
    real = conv.check_space

    def check_then_delete(*args, **kwargs):
        paths[4].unlink()
        return real(*args, **kwargs)

    monkeypatch.setattr(conv, "check_space", check_then_delete)
    summary = conv.convert(src, tmp_path / "x.beton", num_workers=2, progress=False)
    assert summary["written"] == 5 and [s["path"] for s in summary["skipped"]] == [str(paths[4])]
    assert summary["skipped"][0]["reason"].startswith("unreadable: ") and "No such file" in summary["skipped"][0]["reason"]


def test_skipped_images_leave_no_trace_in_the_beton(conv, tmp_path):
    """Bad images among good ones, found as the workers write: the .beton equals the conversion of
    the good ones alone (raw storage: no random choice), sample for sample, and its header counts them."""
    src, clean = tmp_path / "train", tmp_path / "clean"
    paths = make_image_folder(src, num_classes=2, per_class=5)
    make_image_folder(clean, num_classes=2, per_class=5)
    for k in (0, 3, 9):  # the first, one inside, the last
        data = paths[k].read_bytes()
        paths[k].write_bytes(data[: len(data) // 2])  # truncated
        (clean / paths[k].relative_to(src)).unlink()
    summary = conv.convert(src, tmp_path / "x.beton", num_workers=2, progress=False, write_mode="raw")
    assert summary["written"] == 7 and sorted(s["path"] for s in summary["skipped"]) == sorted(
        str(paths[k]) for k in (0, 3, 9))
    conv.convert(clean, tmp_path / "clean.beton", num_workers=2, progress=False, write_mode="raw")
    assert stored_content(tmp_path / "x.beton") == stored_content(tmp_path / "clean.beton")
    labels, _ = read_beton(tmp_path / "x.beton")
    assert labels == [0] * 3 + [1] * 4


def test_an_image_thinner_than_a_pixel_at_the_stored_size_is_kept(conv, tmp_path):
    """FFCV's resize truncates each side: a 2000 x 3 banner at --max-resolution 500 would be 0
    pixels high, and OpenCV failed the whole conversion. It is stored 500 x 1."""
    src = tmp_path / "train"
    make_image_folder(src, num_classes=1, per_class=2)
    Image.fromarray(np.full((3, 2000, 3), 200, np.uint8)).save(src / "class_00" / "banner.JPEG")
    summary = conv.convert(src, tmp_path / "x.beton", num_workers=1, progress=False, max_resolution=500)
    assert summary["written"] == 3 and summary["skipped"] == []
    assert sorted(read_beton(tmp_path / "x.beton")[1])[0] == (1, 500)  # (height, width)


def test_a_full_disk_keeps_the_images_written_and_the_same_call_finishes_later(conv, tmp_path, monkeypatch, capsys):
    """ENOSPC as the allocation table is written (every image already on disk): the message says
    so and where they are kept; once there is space, the same call finishes from them; other
    options start over."""
    from ffcv.writer import DatasetWriter

    real = DatasetWriter.finalize

    def full(self, allocations):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(DatasetWriter, "finalize", full)
    src = tmp_path / "train"
    make_image_folder(src, num_classes=2, per_class=2)
    out = tmp_path / "out" / "x.beton"
    out.parent.mkdir()
    with pytest.raises(conv.ConversionError, match=f"^no space left on {out.parent}; .*; the 4 of 4 images written "
                                                   rf"so far are kept in '{out.parent}/\.x\.beton\.partial' "):
        conv.convert(src, out, num_workers=1, progress=False)
    assert not out.exists() and saved_images(out) == 4
    runs = ((50, "starting over: "), (90, "starting over: "), (90, "resuming the interrupted conversion"))
    for quality, said in runs:
        capsys.readouterr()
        with pytest.raises(conv.ConversionError, match="no space left"):  # each run keeps its images
            conv.convert(src, out, num_workers=1, progress=False, jpeg_quality=quality)
        assert said in capsys.readouterr().err
    monkeypatch.setattr(DatasetWriter, "finalize", real)
    summary = conv.convert(src, out, num_workers=1, progress=False, jpeg_quality=90)
    assert "resuming the interrupted conversion" in capsys.readouterr().err and summary["resumed"] == 4
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.beton", "x.beton.json"]
    fresh = conv.convert(src, tmp_path / "fresh.beton", num_workers=1, progress=False, jpeg_quality=90)
    assert fresh["resumed"] == 0 and stored_content(out) == stored_content(tmp_path / "fresh.beton")


def stopped_by_a_full_disk(conv, monkeypatch, tmp_path: Path, **options) -> tuple[Path, Path]:
    """A conversion of 4 images into tmp_path/x.beton that fails with ENOSPC as its allocation table
    is written: every image is saved in the partial folder. Returns (source, output)."""
    from ffcv.writer import DatasetWriter

    def full(self, allocations):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    src = tmp_path / "train"
    make_image_folder(src, num_classes=2, per_class=2)
    out = tmp_path / "x.beton"
    with monkeypatch.context() as patch:
        patch.setattr(DatasetWriter, "finalize", full)
        with pytest.raises(conv.ConversionError, match="no space left"):
            conv.convert(src, out, num_workers=1, progress=False, **options)
    assert saved_images(out) == 4
    return src, out


def test_saved_progress_whose_file_was_damaged_is_not_trusted(conv, tmp_path, monkeypatch, capsys):
    """A data file cut short behind the converter's back: the next run starts over (saying so)
    and still writes the right .beton, and no shared memory is left behind."""
    from ffcv.writer import DatasetWriter

    from multiprocessing import shared_memory

    src, out = stopped_by_a_full_disk(conv, monkeypatch, tmp_path)
    data = tmp_path / ".x.beton.partial" / "data"
    os.truncate(data, data.stat().st_size // 2)
    capsys.readouterr()
    real_prepare, real_shared = DatasetWriter.prepare, shared_memory.SharedMemory.__init__
    stale_record, created = [], []

    def shared(self, *args, **kwargs):  # the segments this process creates (not another test worker's)
        real_shared(self, *args, **kwargs)
        if kwargs.get("create") or (len(args) > 1 and args[1]):
            created.append(Path("/dev/shm") / self.name)

    def prepare(self):  # the file is rewritten from its start here: no record of the old one may remain
        stale_record.append((tmp_path / ".x.beton.partial" / "progress.npz").exists())
        return real_prepare(self)

    monkeypatch.setattr(DatasetWriter, "prepare", prepare)
    monkeypatch.setattr(shared_memory.SharedMemory, "__init__", shared)
    summary = conv.convert(src, out, num_workers=1, progress=False)
    assert f"starting over: {data} cannot be continued (the saved file is shorter" in capsys.readouterr().err
    assert stale_record[-1] is False, stale_record
    assert summary["resumed"] == 0 and created and not any(p.exists() for p in created), created
    conv.convert(src, tmp_path / "fresh.beton", num_workers=1, progress=False)
    assert stored_content(out) == stored_content(tmp_path / "fresh.beton")


def test_a_conversion_saved_by_an_earlier_converter_starts_over(conv, tmp_path, monkeypatch, capsys):
    """Earlier converters numbered the images that passed their check pass, not the source's list:
    their saved images cannot be continued by sample id, so they are discarded, saying so."""
    src, out = stopped_by_a_full_disk(conv, monkeypatch, tmp_path)
    job_file = tmp_path / ".x.beton.partial" / "job.json"
    job = json.loads(job_file.read_text())
    job.pop("sample_ids")
    job_file.write_text(json.dumps(job))
    capsys.readouterr()
    summary = conv.convert(src, out, num_workers=1, progress=False)
    assert "under an earlier version of this converter" in capsys.readouterr().err and summary["resumed"] == 0


def test_a_stop_before_a_run_takes_over_leaves_the_earlier_conversion_as_it_was(conv, tmp_path, monkeypatch):
    """Saved images of other options: a run stopped before it takes the folder over (while it lists
    its files) neither claims them (the same command would not continue them) nor removes them;
    their own command resumes."""
    src, out = stopped_by_a_full_disk(conv, monkeypatch, tmp_path, jpeg_quality=50)
    job = (tmp_path / ".x.beton.partial" / "job.json").read_text()

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(conv, "scan", stopped)
        with pytest.raises(KeyboardInterrupt):
            conv.convert(src, out, num_workers=1, progress=False, jpeg_quality=90)
    assert saved_images(out) == 4 and (tmp_path / ".x.beton.partial" / "job.json").read_text() == job
    assert conv.convert(src, out, num_workers=1, progress=False, jpeg_quality=50)["resumed"] == 4


def test_a_filesystem_without_flock_converts_unguarded_with_a_warning(conv, tmp_path, monkeypatch, capsys):
    """Lustre mounted without flock, NFS without lockd: the lock is an aid, not a requirement."""
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    src = tmp_path / "train"
    make_image_folder(src, num_classes=2, per_class=2)
    conv.convert(src, tmp_path / "x.beton", num_workers=1, progress=False)
    assert "cannot be locked here (Function not implemented); run one converter per output" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train", "x.beton", "x.beton.json"]


def test_a_second_converter_into_the_same_output_is_refused_until_the_first_ends(conv, tmp_path):
    from pipelines.beton_resume import PartialConversion

    src = tmp_path / "train"
    make_image_folder(src, num_classes=2, per_class=2)
    out = tmp_path / "x.beton"
    first = PartialConversion(out)
    first.acquire()
    with pytest.raises(conv.ConversionError, match=rf"another converter \(PID {os.getpid()}\) is writing '{out}' now"):
        conv.convert(src, out, num_workers=1, progress=False)
    assert first.dir.is_dir()  # the refused call leaves the first one's folder alone
    first.release()
    conv.convert(src, out, num_workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train", "x.beton", "x.beton.json"]


def test_a_sample_is_saved_only_when_all_its_bytes_lie_in_written_pages():
    from ffcv.types import ALLOC_TABLE_TYPE

    from pipelines.beton_resume import durable_samples

    received = np.array([True, True, True, False, True])
    table = np.array([(0, 100, 50), (1, 150, 50), (2, 190, 20), (2, 90, 5), (3, 0, 10), (4, 200, 0)],
                     dtype=ALLOC_TABLE_TYPE)
    # Written up to offset 200: sample 2's second piece ends at 210; 3 is not finished; 4 holds no bytes past 200.
    assert durable_samples(received, table, 200).tolist() == [True, True, False, False, True]
    assert durable_samples(received, table, 210).tolist() == [True, True, True, False, True]
    assert durable_samples(received, table, 150).tolist() == [True, False, False, False, False]


def noise_folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """Noisy JPEGs (q90) of the given (width, height), in 2 classes: raw storage is exact, JPEG is not."""
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        folder = root / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (np.cumsum(rng.integers(0, 9, (h, w, 3)), axis=1) % 256).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.JPEG", quality=90)
    return root


def test_the_size_estimate_follows_the_written_file(conv, tmp_path):
    """Raw storage is width x height x 3 after the resize (never up); FFCV's pages add a little;
    compressed images are estimated at the source's bytes per pixel, which errs high."""
    from pipelines.beton_size import stored_bytes

    assert stored_bytes(800, 600, 10_000, max_resolution=500, write_mode="raw", compress_probability=0.5) == 500 * 375 * 3
    assert stored_bytes(300, 200, 9_000, max_resolution=500, write_mode="jpg", compress_probability=0.5) == 9_000
    assert stored_bytes(1000, 500, 8_000, max_resolution=500, write_mode="proportion",
                        compress_probability=0.25) == 0.25 * 8_000 / 4 + 0.75 * 500 * 250 * 3
    sizes = [(int(w), int(h)) for w, h in np.random.default_rng(1).integers(150, 700, (48, 2))]  # a third > 500
    src = noise_folder(tmp_path / "train", sizes)
    for mode, low, high in (("raw", 1.0, 1.2), ("proportion", 1.0, 1.5)):
        summary = conv.convert(src, tmp_path / f"{mode}.beton", write_mode=mode, num_workers=1, progress=False)
        assert low <= summary["estimated_bytes"] / summary["bytes"] <= high, (mode, summary["estimated_bytes"],
                                                                              summary["bytes"])


def test_a_disk_too_small_for_the_estimate_is_refused_before_writing(conv, tmp_path, monkeypatch):
    from collections import namedtuple

    src = tmp_path / "train"
    make_image_folder(src, num_classes=2, per_class=2)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    with pytest.raises(conv.ConversionError, match=r"would take about \d+ MB \(from 4 sampled images\) and "
                                                   rf"'{tmp_path}' has 1 kB free; .*--max-resolution 256"):
        conv.convert(src, tmp_path / "x.beton", num_workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # no partial, no summary
    from pipelines.beton_size import size_text  # a small set's sizes were said as "0.0 GB"

    assert [size_text(b) for b in (999, 1000, 45_600, 2.4e6, 1.25e11)] == ["999 bytes", "1 kB", "46 kB", "2 MB",
                                                                           "125.0 GB"]


def test_unwritable_output_folder_is_a_usage_error_in_one_line(tmp_path):
    """Tests run as root, whom chmod does not stop; sysfs refuses new files even to root."""
    folder = Path("/sys")
    probe = folder / f"fastssl-probe-{os.getpid()}"
    try:
        probe.touch()
    except OSError:
        pass
    else:
        probe.unlink()
        pytest.skip("/sys accepts new files here")
    src = tmp_path / "train"
    make_image_folder(src, num_classes=2, per_class=2)
    run = subprocess.run([sys.executable, TOOL, str(src), str(folder / "x.beton"), "--num-workers", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write in /sys: "), run.stderr
    assert any(cause in lines[0] for cause in ("permission denied", "read-only file system", "operation not permitted"))


def test_stale_partials_of_dead_converters_are_removed_live_ones_kept(conv, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, timeout=300).stdout.strip()
    out = tmp_path / "x.beton"
    stale = [tmp_path / f".x.beton.partial-{dead}", tmp_path / f".x.beton.json.partial-{dead}"]
    live = tmp_path / f".x.beton.partial-{os.getpid()}"
    other = tmp_path / f".y.beton.partial-{dead}"
    for p in [*stale, live, other]:
        p.write_bytes(b"x")
    assert sorted(conv.remove_stale_partials(out)) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
    assert f"removed {stale[0]}: left by an interrupted conversion (PID {dead} is gone)" in capsys.readouterr().err


def test_the_parent_of_the_splits_is_a_usage_error_naming_the_split(tmp_path):
    root = tmp_path / "imagenet"
    make_image_folder(root / "train", num_classes=2, per_class=2)
    make_image_folder(root / "val", num_classes=2, per_class=1)
    out = tmp_path / "x.beton"
    run = subprocess.run([sys.executable, TOOL, str(root), str(out), "--num-workers", "1"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and f"pass one split, e.g. '{root / 'train'}'" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenet"]


def test_beton_errors_are_user_errors_in_the_cli_and_bench_loaders(tmp_path, image_folder, capsys):
    """A folder or a missing file for the ffcv backend: `error: ...`, exit 2, no traceback."""
    from fastssl.cli import run
    from test_engine import tiny_config

    cfg = tiny_config(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run(cfg, ["--data.backend", "ffcv", "--data.knn_train", str(image_folder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a folder" in err and "convert_imagenet_to_ffcv" in err
    bench = load_tool("bench_loaders")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--data", str(image_folder), "--backends", "ffcv", "--beton", str(tmp_path / "nope.beton"),
                    "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err


def test_an_option_the_write_mode_does_not_read_is_said(conv, capsys):
    """--jpeg-quality with raw storage, --compress-probability outside 'proportion': a note, not silence;
    an option left out takes the converter's default."""
    tool = load_tool("convert_imagenet_to_ffcv")
    args = tool.parse_args(["src", "out.beton", "--write-mode", "raw", "--jpeg-quality", "80",
                            "--compress-probability", "0.2"])
    assert capsys.readouterr().err == ("note: --jpeg-quality and --compress-probability have no effect with "
                                       "--write-mode raw\n")
    assert (args.jpeg_quality, args.compress_probability) == (80, 0.2)
    args = tool.parse_args(["src", "out.beton", "--write-mode", "jpg", "--jpeg-quality", "80"])
    assert capsys.readouterr().err == "" and args.compress_probability == conv.DEFAULT_COMPRESS_PROBABILITY
    tool.parse_args(["src", "out.beton", "--write-mode", "smart", "--compress-probability", "0.9"])
    assert capsys.readouterr().err == "note: --compress-probability has no effect with --write-mode smart\n"
    args = tool.parse_args(["src", "out.beton"])
    assert capsys.readouterr().err == "" and args.jpeg_quality == conv.DEFAULT_JPEG_QUALITY
