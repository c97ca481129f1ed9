"""tools/bench_loaders.py: every requested backend measured, its JSON report written, bad input named."""

from __future__ import annotations

import json

import pytest

from conftest import _installed, load_tool

SMALL = ["--batch-size", "4", "--batches", "2", "--warmup", "1", "--repeats", "2", "--workers", "1",
         "--global-size", "16", "--local-size", "8", "--num-local", "2"]


def test_every_backend_is_measured_and_written(image_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the .beton for ffcv is converted under ./data/bench
    bench = load_tool("bench_loaders")
    wanted = ["torchvision", "synthetic"] + [b for b in ("dali", "dali-gpu-graph", "ffcv")
                                             if _installed("ffcv" if b == "ffcv" else "nvidia.dali")]
    out = tmp_path / "bench.json"
    report = bench.main(["--data", str(image_folder), "--backends", ",".join(wanted), "--json", str(out), *SMALL])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(report))
    assert set(written["backends"]) == set(wanted)
    for name, r in written["backends"].items():
        assert len(r["runs"]) == 2 and r["min"] <= r["images_per_s"] <= r["max"] and r["images_per_s"] > 0, name
        assert r["vs_torchvision"] == pytest.approx(r["images_per_s"] / written["backends"]["torchvision"]["images_per_s"])
        assert r["device_used_mb"] is None and r["device_added_mb"] is None  # CPU: no device memory to report
        assert len(r["epoch_start_runs"]) == 2 and r["epoch_start_s"] > 0, name
    assert written["config"]["views"] == 4 and written["machine"]["cpus"] >= 1


def test_bad_arguments_are_named(image_folder, tmp_path, capsys):
    bench = load_tool("bench_loaders")
    with pytest.raises(SystemExit):
        bench.main(["--backends", "torchvision,nope"])
    assert "argument --backends: unknown 'nope'; choose from torchvision, dali, ffcv" in capsys.readouterr().err
    beton = tmp_path / "train.beton"
    beton.write_bytes(b"")
    for args, needle in ((["--data", str(tmp_path / "missing")], "does not exist"),
                         (["--data", str(beton)], f"{beton} is a file (give a .beton with --beton"),
                         (["--photo-like", "0"], "argument --photo-like: must be >= 1, got 0"),
                         (["--data", str(image_folder), "--backends", "torchvision", "--batch-size", "16",
                           "--batches", "5"], "batches per epoch, need"),
                         (["--data", str(image_folder), "--backends", "torchvision", "--batch-size", "512"],
                          "fewer than one global batch of 512"),
                         (["--device", "nope"], "unknown device 'nope'"),
                         (["--workers", "100000"], "argument --workers: must be between 1 and 512, got 100000")):
        with pytest.raises(SystemExit) as exit_:
            bench.main(args)
        assert exit_.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.skipif(not _installed("nvidia.dali"), reason="DALI is not installed")
def test_file_reads_are_measured_per_thread_count_and_bad_input_exits_2(image_folder, tmp_path, capsys):
    """tools/bench_file_reads.py: every file of the folder read once per repetition and thread count."""
    bench = load_tool("bench_file_reads")
    out = tmp_path / "reads.json"
    report = bench.main(["--data", str(image_folder), "--threads", "1,3", "--batch-size", "4", "--repeats", "2",
                         "--json", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(report)) and set(written["threads"]) == {"1", "3"}
    assert written["config"]["files"] == 18  # the whole folder: fewer than --files
    for r in written["threads"].values():
        assert len(r["runs"]) == 2 and r["min"] <= r["files_per_s"] <= r["max"] and r["files_per_s"] > 0
    for args, needle in ((["--threads", "1,x"], "argument --threads: expected an integer, got 'x'"),
                         (["--threads", "2,2"], "argument --threads: '2' is given twice"),
                         (["--data", str(tmp_path / "missing")], "does not exist")):
        with pytest.raises(SystemExit) as exit_:
            bench.main(args)
        assert exit_.value.code == 2 and needle in capsys.readouterr().err


def test_device_memory_is_read_while_each_timed_epoch_lives_and_its_maximum_kept(monkeypatch):
    """A GPU decoder's buffers live with the epoch's pipeline: the reading comes after the timed
    batches and before the epoch is closed; over the repeats a loader keeps its largest."""
    import torch

    from fastssl.bench import loaders as bench

    events: list[str] = []

    class Batch:
        batch_size = 2

    class Loader:
        def __init__(self, name: str):
            self.name = name

        def set_epoch(self, epoch: int) -> None:
            pass

        def __iter__(self):
            def batches():
                try:
                    while True:
                        events.append(f"{self.name} batch")
                        yield Batch()
                finally:
                    events.append(f"{self.name} closed")
            return batches()

    # Warm-up: before/after a's first batch, then b's; then a, b, a, b at the end of each timed pass.
    readings = iter([10.0, 60.0, 60.0, 160.0, 100.0, 300.0, 250.0, 200.0])
    monkeypatch.setattr(bench, "device_used_mb", lambda device: (events.append("read"), next(readings))[1])
    memory: dict = {}
    runs = bench.interleaved_rates({"a": Loader("a"), "b": Loader("b")}, repeats=2, warmup=0, batches=1,
                                   device=torch.device("cpu"), memory=memory)
    assert memory == {"a": {"added_mb": 50.0, "used_mb": 250.0}, "b": {"added_mb": 100.0, "used_mb": 300.0}}
    assert len(runs["a"]) == len(runs["b"]) == 2
    assert events[:8] == ["read", "a batch", "a closed", "read", "read", "b batch", "b closed", "read"], events
    timed = events[8:]
    assert timed[:3] == ["a batch", "read", "a closed"], timed  # read while the timed epoch lives


def test_an_epochs_start_is_timed_apart_from_its_rate(monkeypatch):
    """The seconds to an epoch's first batch (a DALI pipeline built, workers spawned) are reported
    on their own, and the rate counts only the batches after the warm-up. A fake clock that the
    loader advances: 5 s to start an epoch, 1 s per batch after."""
    import torch

    from fastssl.bench import loaders as bench

    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    class Batch:
        batch_size = 4

    class Loader:
        def set_epoch(self, epoch: int) -> None:
            pass

        def __iter__(self):
            clock[0] += 5.0
            while True:
                yield Batch()
                clock[0] += 1.0

    timing = bench.time_epoch(Loader(), 0, warmup=2, batches=3, device=torch.device("cpu"))
    # timed: the batches 3 to 5 (the 1 s before each), 12 images in 3 s
    assert timing == bench.EpochTiming(images_per_s=4.0, start_s=5.0)
    assert bench.time_epoch(Loader(), 0, warmup=0, batches=3, device=torch.device("cpu")).start_s is None
    starts: dict = {}
    bench.interleaved_rates({"a": Loader()}, repeats=3, warmup=1, batches=1, device=torch.device("cpu"), starts=starts)
    assert starts == {"a": [5.0, 5.0, 5.0]}


def test_the_ffcv_beton_is_converted_again_when_the_folder_changes(image_folder, tmp_path, monkeypatch):
    """The .beton made for ffcv is named by the folder's files: the same folder is converted once, a folder
    regenerated in place (other images, the same names and count) gets a .beton of its own."""
    monkeypatch.chdir(tmp_path)
    bench = load_tool("bench_loaders")
    converted = []
    monkeypatch.setattr(bench, "convert", lambda src, out, **kw: (converted.append(out), out.write_bytes(b"beton")))
    first = bench.beton_for(image_folder)
    assert bench.beton_for(image_folder) == first and converted == [first]
    image = next(p for p in sorted(image_folder.rglob("*")) if p.is_file())
    image.write_bytes(image.read_bytes() + b"\0")  # the same name, other bytes
    second = bench.beton_for(image_folder)
    assert second != first and converted == [first, second] and second.parent == first.parent


@pytest.mark.skipif(not _installed("ffcv"), reason="FFCV is not installed")
def test_an_ffcv_folder_that_cannot_be_converted_is_one_line(image_folder, tmp_path, monkeypatch, capsys):
    """The converter's refusal (no readable image, a folder of splits) or data/bench/ unwritable: exit 2."""
    from pipelines.beton_convert import UsageError

    monkeypatch.chdir(tmp_path)
    bench = load_tool("bench_loaders")
    for failure, needle in ((UsageError("the folder holds the splits train, val"), "holds the splits train, val"),
                            (PermissionError(13, "Permission denied"), "run from a folder you can write to")):
        def refuse(src, out, **kw):
            raise failure

        monkeypatch.setattr(bench, "convert", refuse)
        with pytest.raises(SystemExit) as exit_:
            bench.main(["--data", str(image_folder), "--backends", "ffcv", *SMALL])
        said = capsys.readouterr().err
        assert exit_.value.code == 2 and said.startswith("error: ffcv: ") and needle in said, said
