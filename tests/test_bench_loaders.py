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
                         (["--device", "nope"], "unknown device 'nope'")):
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
