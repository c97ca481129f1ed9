"""Faults end in a clear message with nothing lost: full disk, cut checkpoints, divergence,
restarts' logs, the demo without k-NN, and messages that name the run directory to continue."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from test_engine import read_csv, tiny_config
import fastssl.agreement as agreement
import fastssl.engine as engine
import fastssl.recovery as recovery
import fastssl.relaunch as relaunch
import fastssl.run_dir as run_dir_module
from fastssl import checkpoint as ckpt
from fastssl.cli import run
from fastssl.config import Config, ConfigError

REPO = Path(__file__).resolve().parents[1]
Usage = namedtuple("Usage", "total used free")


def quick_config(tmp_path: Path, epochs: int = 2):
    """tiny_config without k-NN: 3 steps per epoch, a log row per step, a checkpoint per epoch."""
    cfg = tiny_config(tmp_path, epochs=epochs)
    cfg.eval.knn_every, cfg.eval.knn_at_start = -1, False
    return cfg


def saved_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]["step"]


def leftovers(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("*.tmp"))


def tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    """The steps TensorBoard shows for `tag`, after it applies the purges of restarts."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def exit_of(cfg, argv: list[str], capsys, prog: str = "recipes/tiny.py") -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        run(cfg, argv, prog=prog)
    out, err = capsys.readouterr()
    return info.value.code, out, err


# ---- full disk ----------------------------------------------------------------------------------------------------

def test_a_killed_saves_leftover_is_removed_before_the_free_space_check(tmp_path, monkeypatch):
    """A kill during a save leaves checkpoint.pt.tmp; counted against the free space, it would fail
    every later save for a disk it fills itself."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    leftover = run_dir / "checkpoint.pt.tmp"
    leftover.write_bytes(b"x" * 4096)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: Usage(2**40, 2**40, 2**20 if leftover.exists() else 2**40))
    _save_tiny(run_dir, step=3, rank=0, world_size=1)
    assert saved_step(run_dir) == 3 and not leftovers(run_dir)


def test_full_disk_is_refused_before_writing_and_exits_2(tmp_path, monkeypatch, capsys):
    cfg = quick_config(tmp_path, epochs=1)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    code, _, err = exit_of(cfg, [], capsys)
    run_dir = Path(cfg.train.run_dir)
    assert code == 2, err
    assert err.startswith("error: not enough free space") and err.count("\n") == 1, err
    assert "disk full" in err and "MiB free" in err and str(run_dir) in err
    assert f"--train.run_dir {run_dir}" in err  # how to start again once there is room
    assert "Traceback" not in err
    assert not (run_dir / "checkpoint.pt").exists() and not leftovers(run_dir)


def test_the_free_space_asked_at_start_counts_momentum_only_where_the_optimiser_keeps_it(tmp_path, monkeypatch):
    """SGD keeps no momentum buffer at momentum 0; LARS always does (zeros at momentum 0)."""
    from types import SimpleNamespace

    net = torch.nn.Module()
    net.backbone = torch.nn.Linear(100, 100)
    parts = SimpleNamespace(student=net, teacher=net, objective=SimpleNamespace(state=None))
    asked = {}
    monkeypatch.setattr(ckpt, "check_free_space", lambda folder, needed, what: asked.__setitem__("bytes", needed))

    def needed(name: str, momentum: float) -> int:
        cfg = quick_config(tmp_path)
        cfg.optim.name, cfg.optim.momentum = name, momentum
        engine.check_room_for_a_save(cfg, tmp_path, parts)
        return asked["bytes"]

    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    extra = weights * (1 + ckpt.SPACE_MARGIN_SHARE)
    assert needed("sgd", 0.9) - needed("sgd", 0.0) == pytest.approx(extra, abs=1)
    assert needed("lars", 0.0) == needed("sgd", 0.9)


@pytest.mark.parametrize("failure", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4246"),
], ids=["ENOSPC", "pytorch-writer"])
def test_failed_save_removes_its_tmp_keeps_the_previous_checkpoint_and_resumes(tmp_path, monkeypatch, failure):
    """The second epoch's save fails half-way (as on a full disk); the first checkpoint survives,
    the disk gets its room back, and the resumed run logs every step once (CSV and TensorBoard)."""
    cfg = quick_config(tmp_path, epochs=2)
    run_dir = Path(cfg.train.run_dir)
    real_save, calls = torch.save, []

    def failing_save(obj, path, *args, **kwargs):
        if "state" in obj and isinstance(obj["state"], dict) and obj["state"]["step"] > 3:
            Path(path).write_bytes(b"x" * 4096)  # what a writer leaves when the disk fills up
            raise failure
        calls.append(path)
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(ckpt.CheckpointError) as info:
        engine.train(cfg)
    message = str(info.value)
    assert f"could not write {run_dir / 'checkpoint.pt'}" in message
    assert "full" in message and "previous file is kept" in message
    assert f"continue from the checkpoint of step 3 with: <your command> --resume --train.run_dir {run_dir}" in message
    assert not leftovers(run_dir)
    assert saved_step(run_dir) == 3
    torch.load(run_dir / "backbone_resnet18.pth")  # the previous backbone is whole too
    monkeypatch.setattr(torch, "save", real_save)

    engine.train(cfg, resume=True)
    assert saved_step(run_dir) == 6
    assert [int(r["step"]) for r in read_csv(run_dir / "train_log.csv")] == [1, 2, 3, 4, 5, 6]
    assert [int(r["epoch"]) for r in read_csv(run_dir / "epochs.csv")] == [0, 1]
    # the checkpoint's own step (3) stays in TensorBoard; the failed attempt's 4..6 are replaced
    assert tensorboard_steps(run_dir, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert tensorboard_steps(run_dir, "epoch/loss") == [3, 6]


def test_free_space_estimate_covers_the_payload_and_the_file_it_replaces(tmp_path):
    obj = {"w": torch.zeros(1000, 1000), "opt": [torch.zeros(10, dtype=torch.float64)]}
    assert ckpt.tensor_bytes(obj) == 4_000_000 + 80
    assert ckpt.bytes_needed(obj, tmp_path / "a.pt") > 4_000_080
    big = tmp_path / "b.pt"
    big.write_bytes(b"\0" * (30 * 2**20))
    assert ckpt.bytes_needed(obj, big) >= 30 * 2**20


@pytest.mark.parametrize("where", ["run_dir", "parent"])
def test_a_file_where_the_run_directory_should_be_is_named_and_exits_2(tmp_path, capsys, where):
    """`--train.run_dir` naming a file (or a folder under a file) ended in FileExistsError's traceback."""
    cfg = quick_config(tmp_path, epochs=1)
    blocker = tmp_path / "taken"
    blocker.write_text("a user's file")
    cfg.train.run_dir = str(blocker if where == "run_dir" else blocker / "run")
    code, _, err = exit_of(cfg, [], capsys)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert f"error: could not write {cfg.train.run_dir}: {blocker} is a file where a folder should be; " in err
    assert "move it away or choose another --train.run_dir" in err
    assert blocker.read_text() == "a user's file"


@pytest.mark.parametrize("code, cause, fix", [
    (errno.ENOSPC, "the disk is full", "free space on that disk"),
    (errno.EROFS, "the file system is read-only", "choose a --train.run_dir on a writable disk"),
    (errno.EACCES, "permission denied", "make {folder} writable for this user"),
    (errno.EISDIR, "a folder stands where this file should be", "move that folder away"),
    (errno.EIO, "OSError: Input/output error", "check that disk and the permissions of {folder}"),
])
def test_a_failed_write_names_the_file_its_cause_and_the_fix(tmp_path, code, cause, fix):
    path = tmp_path / "run" / "results.json"
    with pytest.raises(ckpt.CheckpointError) as info, ckpt.writing(tmp_path / "run"):
        raise OSError(code, os.strerror(code), str(path))
    assert str(info.value) == f"could not write {path}: {cause}; " + fix.format(folder=path.parent) + (
        " (e.g. delete old runs) or move the run directory to a larger disk" if code == errno.ENOSPC else
        " or choose another --train.run_dir" if code == errno.EACCES else "")


def test_a_log_write_on_a_full_disk_stops_the_run_with_the_command_that_continues_it(tmp_path, monkeypatch, capsys):
    """The disk fills between checkpoints: appending a log row fails (ENOSPC). The run stops with one
    line naming the file and the resume command; once there is room, the resume logs each step once."""
    cfg = quick_config(tmp_path, epochs=2)
    run_dir = Path(cfg.train.run_dir)
    real_open, appends = Path.open, []

    def open_until_full(path, mode="r", *args, **kwargs):
        if path.name == "train_log.csv" and mode == "a":
            appends.append(path)
            if len(appends) == 5:  # step 5's row
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_until_full)
    code, _, err = exit_of(cfg, [], capsys)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith(f"error: could not write {run_dir / 'train_log.csv'}: the disk is full; free space")
    assert err.rstrip().endswith(f"then continue from the checkpoint of step 3 with: python recipes/tiny.py "
                                 f"--resume --train.run_dir {run_dir}")
    monkeypatch.undo()
    with (run_dir / "train_log.csv").open("ab") as f:
        f.write(b"0,\xff\xfe")  # and the crash left bytes that are not UTF-8
    engine.train(cfg, resume=True)
    assert [int(r["step"]) for r in read_csv(run_dir / "train_log.csv")] == [1, 2, 3, 4, 5, 6]
    assert saved_step(run_dir) == 6 and not leftovers(run_dir)


def test_a_failed_json_or_csv_rewrite_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from fastssl.run_log import CsvLog, write_run_json

    results, log = tmp_path / "results.json", tmp_path / "log.csv"
    results.write_text('{"knn": []}')
    log.write_text("epoch,step\n0,1\n")

    def full(self, *args, **kwargs):
        with open(self, "wb") as f:  # what a writer leaves when the disk fills up
            f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(ckpt.CheckpointError, match="could not write .*results.json.tmp: the disk is full"):
        write_run_json(results, {"knn": [1]})
    monkeypatch.undo()
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, mode="r", *a, **k: full(self) if "w" in mode
                        else real_open(self, mode, *a, **k))
    with pytest.raises(ckpt.CheckpointError, match="the disk is full"):
        CsvLog(log, ["epoch", "step"], keep_until_step=0)
    assert results.read_text() == '{"knn": []}' and log.read_text() == "epoch,step\n0,1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "results.json"]


# ---- unreadable checkpoints ---------------------------------------------------------------------------------------

def test_a_resume_that_changes_what_is_computed_names_each_field_with_both_values(tmp_path, capsys):
    """A field that changes what is computed is refused on resume, naming the run's value and this
    command's (an `auto` may resolve to another backend on another machine than the run's)."""
    cfg = quick_config(tmp_path, epochs=1)
    engine.train(cfg)
    run_dir = Path(cfg.train.run_dir)
    config = (run_dir / "config.json").read_bytes()
    code, _, err = exit_of(cfg, ["--resume", "--optim.momentum", "0.5", "--train.seed", "7"], capsys)
    assert code == 2 and "Traceback" not in err, err
    assert (f"error: --resume: these fields differ from the run being resumed in {run_dir}: optim.momentum (0.9 in "
            f"the run, 0.5 now), train.seed (0 in the run, 7 now); resume with the run's values (--optim.momentum "
            f"0.9 --train.seed 0: drop your overrides of them, or pass them where a default changed since the run)") \
        in err
    assert (run_dir / "config.json").read_bytes() == config


def test_truncated_checkpoint_is_named_with_the_fix_and_exits_2(tmp_path, capsys):
    cfg = quick_config(tmp_path, epochs=1)
    engine.train(cfg)
    path = Path(cfg.train.run_dir) / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for resume in (True, False):  # load_checkpoint's and saved_config's reads
        with pytest.raises(ckpt.CheckpointError, match="corrupt or truncated") as info:
            engine.train(cfg, resume=resume)
        assert str(path) in str(info.value)
        assert "restore the file from a backup" in str(info.value) and "--train.run_dir" in str(info.value)
    code, _, err = exit_of(cfg, ["--resume"], capsys)
    assert code == 2 and err.startswith(f"error: {path} is corrupt or truncated") and "Traceback" not in err
    torch.save({"conv1.weight": torch.zeros(1)}, path)  # a readable file of another kind: not "corrupt"
    for resume in (True, False):
        with pytest.raises(ckpt.CheckpointError, match="can be read but is not a training checkpoint"):
            engine.train(cfg, resume=resume)


@pytest.mark.parametrize("name, holds", [("results.json", "the run's evaluation history"),
                                         ("run_info.json", "the run's record (machines, software, recipe)")])
def test_a_damaged_results_or_run_info_file_is_named_on_resume_and_exits_2(tmp_path, capsys, monkeypatch, name,
                                                                            holds):
    """results.json holds the k-NN history a resume continues, run_info.json the machines it ran on:
    a damaged one is named, not replaced, and the refused resume leaves the run's record
    (config.json, run_info.json) as it was, even with a field a resume may change (it would
    otherwise be recorded as the run's config)."""
    cfg = quick_config(tmp_path, epochs=2)
    StopAt.counter[0], StopAt.step = 0, 2
    with monkeypatch.context() as patched:  # stopped at step 2 of 6: a resume has work left, and reads the records
        patched.setattr(engine, "GracefulStop", StopAt)
        patched.setattr(engine, "train_step", counting(engine.train_step))
        engine.train(cfg)
    run_dir = Path(cfg.train.run_dir)
    path = run_dir / name
    path.write_text("x")
    record = {name: (run_dir / name).read_bytes() for name in ("config.json", "run_info.json", "results.json")}
    cfg.optim.base_lr *= 2  # in RESUMABLE_WITH_WARNING
    code, _, err = exit_of(cfg, ["--resume"], capsys)
    assert code == 2 and f"error: {path} cannot be read (" in err and "Traceback" not in err
    assert f"it holds {holds}" in err and "restore it, or delete it to resume without it" in err
    assert {name: (run_dir / name).read_bytes() for name in record} == record  # nothing overwritten


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts this process's reads in /proc/self/io")
def test_reading_the_saved_config_does_not_read_the_weights(tmp_path):
    """A resume checks the saved config before it loads the checkpoint: mapping the tensors keeps
    that check from reading every process's copy of the weights a second time."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"config": {"train": {"epochs": 3}}, "student": {"w": torch.randn(4_000_000)}},
               run_dir / "checkpoint.pt")  # 16 MB of weights

    def bytes_read() -> int:
        return int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["rchar"])

    before = bytes_read()
    assert ckpt.saved_config(run_dir) == {"train": {"epochs": 3}}
    assert bytes_read() - before < 2**20


def test_a_checkpoint_that_cannot_be_mapped_is_read_whole(tmp_path):
    """torch's legacy (non-zip) format cannot be mapped: it is a good checkpoint all the same."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"config": {"train": {"epochs": 2}}, "student": {"w": torch.ones(3)}}, run_dir / "checkpoint.pt",
               _use_new_zipfile_serialization=False)
    with pytest.raises(RuntimeError):
        torch.load(run_dir / "checkpoint.pt", mmap=True, weights_only=False)
    assert ckpt.saved_config(run_dir) == {"train": {"epochs": 2}}


def test_a_corrupt_rng_file_is_named_and_the_run_resumes_without_it(tmp_path, capsys):
    """rng/rank0.pt holds only this process's random generators and loader position: cut short by
    a crash, it is named and the run continues from the checkpoint with fresh ones."""
    cfg = quick_config(tmp_path, epochs=2)
    StopAt.counter[0], StopAt.step = 0, 3
    with pytest.MonkeyPatch.context() as m:
        m.setattr(engine, "GracefulStop", StopAt)
        m.setattr(engine, "train_step", counting(engine.train_step))
        engine.train(cfg)
    rng = Path(cfg.train.run_dir) / "rng" / "rank0.pt"
    rng.write_bytes(rng.read_bytes()[:100])
    capsys.readouterr()
    engine.train(cfg, resume=True)
    err = capsys.readouterr().err
    assert "were not restored (rank 0: rng/rank0.pt cannot be read (" in err, err
    assert saved_step(Path(cfg.train.run_dir)) == 6


def _save_tiny(run_dir: Path, step: int, rank: int, world_size: int, is_main: bool = True) -> dict:
    net = torch.nn.Linear(2, 2)
    ckpt.save_checkpoint(run_dir, student=net, teacher=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                         scaler=None, state=ckpt.TrainState(step=step), config={}, rank=rank, is_main=is_main,
                         world_size=world_size, loader_state={"at": step})
    return torch.load(ckpt.rank_state_path(run_dir, rank), weights_only=False)


def _load_tiny(run_dir: Path, rank: int, world_size: int):
    net, loader = torch.nn.Linear(2, 2), type("Loader", (), {"load_state_dict": lambda self, s: restored.append(s)})()
    restored: list = []
    state, missed = ckpt.load_checkpoint(run_dir, student=net, teacher=net, optimizer=torch.optim.SGD(
        net.parameters(), lr=0.1), scaler=None, rank=rank, loader=loader, world_size=world_size)
    return state, missed, restored


def test_a_process_state_of_another_step_or_process_count_is_not_restored(tmp_path):
    """Per-process files carry their step and process count: a save that failed on the main process
    after the others wrote theirs, or a resume on more or fewer processes, restores none of them (and
    says why), rather than states meant for another step or another shard."""
    run_dir = tmp_path / "run"
    _save_tiny(run_dir, step=3, rank=0, world_size=2)
    saved = _save_tiny(run_dir, step=3, rank=1, world_size=2, is_main=False)
    assert (saved["step"], saved["world_size"]) == (3, 2)
    random.seed(123)
    state, missed, restored = _load_tiny(run_dir, rank=1, world_size=2)
    assert (state.step, missed, restored) == (3, None, [{"at": 3}])  # same step, same count: restored
    assert random.getstate() == saved["python"]

    _save_tiny(run_dir, step=6, rank=1, world_size=2, is_main=False)  # rank 0's save of step 6 failed
    random.seed(123)
    before = random.getstate()
    state, missed, restored = _load_tiny(run_dir, rank=1, world_size=2)
    assert state.step == 3 and restored == [] and random.getstate() == before
    assert missed == "rng/rank1.pt was written at step 6 by 2 process(es); the checkpoint is of step 3, resumed on 2"

    _, missed, restored = _load_tiny(run_dir, rank=0, world_size=4)  # resumed on 4 processes
    assert restored == [] and "by 2 process(es)" in missed and "resumed on 4" in missed
    _, missed, _ = _load_tiny(run_dir, rank=3, world_size=4)
    assert missed == "rng/rank3.pt does not exist"

    _save_tiny(run_dir, step=9, rank=0, world_size=1)  # the main process's save drops the files of ranks >= 1
    assert sorted(p.name for p in (run_dir / "rng").iterdir()) == ["rank0.pt"]


def test_a_resume_on_another_process_count_says_so_once(tmp_path, monkeypatch, capsys):
    cfg = quick_config(tmp_path, epochs=2)
    StopAt.counter[0], StopAt.step = 0, 3  # stopped (with its checkpoint) after epoch 1
    with monkeypatch.context() as patch:
        patch.setattr(engine, "GracefulStop", StopAt)
        patch.setattr(engine, "train_step", counting(engine.train_step))
        engine.train(cfg)
    state = torch.load(ckpt.rank_state_path(Path(cfg.train.run_dir), 0), weights_only=False)
    state["world_size"] = 2  # as if the run had been on 2 processes
    torch.save(state, ckpt.rank_state_path(Path(cfg.train.run_dir), 0))
    capsys.readouterr()
    engine.train(cfg, resume=True)
    err = capsys.readouterr().err
    assert err.count("warning: --resume: the random generators and loader positions of 1 of 1 process(es) "
                     "were not restored (rank 0: rng/rank0.pt was written at step 3 by 2 process(es)") == 1, err
    info = json.loads((Path(cfg.train.run_dir) / "run_info.json").read_text())
    assert info["resumed"][-1]["processes"] == 1


@pytest.mark.parametrize("resume, says", [(True, "holds no checkpoint to resume"), (False, "already holds a run")])
def test_the_run_directory_is_refused_before_the_data_is_listed(tmp_path, monkeypatch, resume, says):
    """Listing ImageNet takes minutes on network storage: a wrong run directory is said first."""
    cfg = quick_config(tmp_path, epochs=1)
    if not resume:
        engine.train(cfg)  # a run already there

    def no_listing(*args, **kwargs):
        raise AssertionError("the data was listed before the run directory was checked")

    monkeypatch.setattr(engine, "build_loader", no_listing)
    with pytest.raises(ConfigError, match=says):
        engine.train(cfg, resume=resume)


def test_a_fresh_start_over_files_no_run_wrote_is_refused_and_keeps_them(tmp_path):
    """A run directory that is a project folder (its own config.json, a results.json) was a run's to
    overwrite; a start killed before its first checkpoint leaves a trainer's config.json, and restarts
    (test_fresh_start_after_a_kill_before_the_first_checkpoint_logs_each_step_once)."""
    cfg = quick_config(tmp_path, epochs=1)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text('{"mine": 1}')
    for config in (None, '{"model": "the project\'s own"}', "not json"):
        if config is not None:
            (run_dir / "config.json").write_text(config)
        names = "results.json" if config is None else "config.json, results.json"
        with pytest.raises(ConfigError, match=rf"{run_dir} holds {names}, not a fastssl run's \(no trainer's "
                                              rf"config.json is there\): a run there would replace them"):
            engine.train(cfg)
    assert (run_dir / "results.json").read_text() == '{"mine": 1}' and (run_dir / "config.json").read_text() == "not json"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "results.json"]


def test_resuming_a_finished_run_says_so_and_trains_nothing(tmp_path, capsys):
    """A requeue after the end (--resume auto) or a repeated command: one line; the checkpoint, logs,
    results and records stay as they were. A resume with a changed lr trained nothing but rewrote
    config.json with the new lr and added the change to run_info.json, as if it had run."""
    import copy

    cfg = quick_config(tmp_path, epochs=1)
    first = engine.train(cfg)
    run_dir = Path(cfg.train.run_dir)
    kept = ("checkpoint.pt", "train_log.csv", "epochs.csv", "results.json", "config.json", "run_info.json")
    before = {name: (run_dir / name).read_bytes() for name in kept}
    capsys.readouterr()
    again = engine.train(cfg, resume="auto")
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"the run in {run_dir} has finished its 1 epoch (step 3): nothing to do"), out
    assert {name: (run_dir / name).read_bytes() for name in kept} == before
    assert again == json.loads(json.dumps(first))
    changed = copy.deepcopy(cfg)
    changed.optim.base_lr /= 2
    engine.train(changed, resume=True)
    assert capsys.readouterr().out.rstrip().endswith("nothing to do")
    assert {name: (run_dir / name).read_bytes() for name in kept} == before


def test_a_resume_of_the_other_trainers_run_names_it(tmp_path):
    """A distillation run's directory resumed by a self-supervised recipe listed about 20 "fields that
    differ" with this recipe's defaults as the run's values; it is now named for what it is."""
    from fastssl.distill.config import DistillConfig, to_dict as distill_dict

    cfg = quick_config(tmp_path, epochs=1)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True)
    torch.save({"config": distill_dict(DistillConfig())}, run_dir / "checkpoint.pt")  # the config it keeps
    with pytest.raises(ConfigError, match=r"holds a run of another trainer \(its saved config has the sections "
                                          r"loss, .*resume it with the recipe that started it") as info:
        engine.train(cfg, resume=True)
    assert "differ" not in str(info.value)
    with pytest.raises(ConfigError, match=r"already holds a run of another trainer \(its saved config has the "
                                          r"sections loss\): continue it with the recipe that started it") as info:
        engine.train(cfg)  # a fresh start was told to continue it with this recipe's --resume, which is refused
    assert "--resume" not in str(info.value)


def test_a_resume_of_a_run_directory_named_by_its_start_time_is_refused(tmp_path):
    """`runs/demo/{time}` names a new directory at every start: `--resume auto` (a SLURM requeue) started
    afresh in a new one each time, from step 0, and `--resume` could never find its checkpoint."""
    cfg = quick_config(tmp_path, epochs=1)
    cfg.train.run_dir = str(tmp_path / "runs" / "{time}")
    for resume in ("auto", True):
        with pytest.raises(ConfigError, match=r"train.run_dir: .*\{time\} is the start time\), so --resume"):
            engine.train(cfg, resume=resume)
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "20261207-101500").mkdir(parents=True)  # an earlier start, with its checkpoint
    (tmp_path / "runs" / "20261207-101500" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"to continue the latest run in .*runs: python recipes/mira_demo.py "
                                          r"--resume --train.run_dir .*runs/20261207-101500$"):
        engine.train(cfg, resume="auto", command=["python", "recipes/mira_demo.py", "--resume", "auto"])


# ---- out of device memory ---------------------------------------------------------------------------------------

ALLOCATION_FAILURES = {  # what a failed allocation raises: the GPU's, torch's CPU allocator's, Python's
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                           "capacity of 79.19 GiB of which 1.02 GiB is free."),
    "host": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                 "memory: you tried to allocate 4096000000 bytes. Error code 12"),
    "python": MemoryError,
}


def out_of_memory_at(step: int, kind: str = "cuda"):
    """A train_step that fails as an allocation of `kind` would, at its `step`-th call."""
    real, count = engine.train_step, [0]

    def step_fn(*args, **kwargs):
        count[0] += 1
        if count[0] == step:
            raise ALLOCATION_FAILURES[kind]()
        return real(*args, **kwargs)
    return step_fn


@pytest.mark.parametrize("fails_at, saved, kind", [(2, None, "cuda"), (5, 3, "cuda"), (2, None, "host"),
                                                   (5, 3, "python")])
def test_out_of_device_memory_exits_2_with_the_batch_per_process_and_the_command(tmp_path, monkeypatch, capsys,
                                                                                 fails_at, saved, kind):
    """A batch too large for the GPU (or, on a CPU, for the host: a traceback until now) is a setting to
    change: one line naming the images per process and the fixes, then the command that goes on (from
    the checkpoint kept on disk, if any)."""
    cfg = quick_config(tmp_path, epochs=2)  # 3 steps per epoch, a checkpoint per epoch
    run_dir = Path(cfg.train.run_dir)
    monkeypatch.setattr(engine, "train_step", out_of_memory_at(fails_at, kind))
    code, _, err = exit_of(cfg, [], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    per_process = cfg.train.global_batch_size
    assert err.startswith(f"error: out of memory on cpu at step {fails_at - 1}, with {per_process} training images "
                          f"per process (--train.global_batch_size {per_process} over 1 process)"), err
    assert "--train.micro_batch_size" in err and "--train.precision bf16" in err  # MIRA; fp32 on a CPU
    assert "k-NN" not in err  # quick_config runs none
    if saved is None:
        assert not (run_dir / "checkpoint.pt").exists()
        assert err.rstrip().endswith(f"start again with: python recipes/tiny.py --train.run_dir {run_dir}"), err
    else:
        assert saved_step(run_dir) == saved
        assert err.rstrip().endswith(f"The checkpoint of step {saved} is kept and continues on any number of "
                                     f"processes: python recipes/tiny.py --resume --train.run_dir {run_dir}"), err


def test_out_of_memory_advice_leaves_out_what_the_run_cannot_use(tmp_path):
    """No gradient accumulation for ML-CPC (each row is scored against the whole batch), no mixed
    precision when it is on; the per-process count is the global batch over the processes."""
    from types import SimpleNamespace

    cfg = quick_config(tmp_path)
    cfg.method.objective, cfg.train.global_batch_size = "mira+mlcpc", 512
    accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=8, mixed_precision="bf16")
    advice = recovery.out_of_memory_advice(cfg, accelerator, 7, ["python", "r.py"], tmp_path / "run", None)
    assert "with 64 training images per process (--train.global_batch_size 512 over 8 processes)" in advice
    assert "micro_batch_size" not in advice and "--train.precision" not in advice
    assert "a smaller --train.global_batch_size" in advice
    assert f"and {cfg.eval.batch_size} per k-NN batch (--eval.batch_size)" in advice


# ---- divergence ---------------------------------------------------------------------------------------------------

def test_exploding_learning_rate_is_caught_and_exits_2_with_a_command(tmp_path, capsys):
    """--optim.base_lr 1e6 used to run to the end, weights at 1e29, loss bounded by construction."""
    cfg = quick_config(tmp_path, epochs=2)
    code, _, err = exit_of(cfg, ["--optim.base_lr", "1e6"], capsys)
    run_dir = Path(cfg.train.run_dir)
    assert code == 2, err
    assert err.startswith("error: training diverged at step") and "Traceback" not in err
    assert (f"start again with a lower --optim.base_lr: python recipes/tiny.py --train.run_dir {run_dir} "
            f"--optim.base_lr 100000") in err
    assert not (run_dir / "checkpoint.pt").exists()  # never a checkpoint of diverged weights


def poison_at(step: int):
    """A train_step that, from `step` on, makes the student's weights non-finite (a divergence)."""
    real, count = engine.train_step, [0]

    def step_fn(parts, *args, **kwargs):
        loss = real(parts, *args, **kwargs)
        count[0] += 1
        if count[0] >= step:
            with torch.no_grad():
                next(iter(parts.student.parameters())).fill_(float("nan"))
        return loss
    return step_fn


def test_an_error_in_an_epoch_is_printed_after_its_progress_bar_is_closed(tmp_path, monkeypatch, capsys):
    """The bar, left open, would redraw itself after the error, burying it on the terminal."""
    cfg = quick_config(tmp_path, epochs=2)
    cfg.train.progress = True
    monkeypatch.setattr(engine, "train_step", poison_at(2))
    code, _, err = exit_of(cfg, [], capsys)
    assert code == 2 and "epoch 1/2" in err, err
    bar, _, message = err.rpartition("\nerror: ")
    assert message.startswith("training diverged at step 2") and "\r" not in message and "epoch 1/2" in bar, err


def test_divergence_advice_resumes_the_last_good_checkpoint_with_a_lower_lr(tmp_path, monkeypatch, capsys):
    cfg = quick_config(tmp_path, epochs=2)
    run_dir = Path(cfg.train.run_dir)
    monkeypatch.setattr(engine, "train_step", poison_at(5))
    with pytest.raises(recovery.TrainingDiverged) as info:
        engine.train(cfg, command=["python", "recipes/tiny.py", "--optim.base_lr", "0.03"])
    message = str(info.value)
    assert "training diverged at step 5: the weights are no longer finite" in message
    assert ("continue from the last good one (step 3) with a lower --optim.base_lr: python recipes/tiny.py --resume "
            f"--train.run_dir {run_dir} --optim.base_lr 0.003") in message
    assert saved_step(run_dir) == 3
    monkeypatch.undo()

    cfg.optim.base_lr = 0.003  # the advised command: --resume accepts the lower learning rate, with a warning
    engine.train(cfg, resume=True)
    assert "warning: --resume with optim.base_lr changed from 0.03 to 0.003" in capsys.readouterr().err
    assert saved_step(run_dir) == 6
    assert [int(r["step"]) for r in read_csv(run_dir / "train_log.csv")] == [1, 2, 3, 4, 5, 6]
    info_json = json.loads((run_dir / "run_info.json").read_text())
    assert info_json["resumed"][-1]["changed"] == {"optim.base_lr": [0.03, 0.003]}
    cfg.optim.momentum = 0.5  # other fields stay refused
    with pytest.raises(ConfigError, match="optim.momentum"):
        engine.train(cfg, resume=True)


def loss_not_finite_at(steps: set[int]):
    """A train_step whose loss is nan at the given steps (1-based), its weights left as they are."""
    real, count = engine.train_step, [0]

    def step_fn(parts, *args, **kwargs):
        loss, metrics = real(parts, *args, **kwargs)
        count[0] += 1
        return (loss * float("nan") if count[0] in steps else loss), metrics
    return step_fn


@pytest.mark.parametrize("bad_steps,first", [({1}, True), ({2}, False)])
def test_a_first_loss_that_is_not_finite_names_its_causes_not_the_learning_rate(tmp_path, monkeypatch, bad_steps,
                                                                               first):
    """The run's very first loss comes from the initial weights, before any update: a lower learning rate
    cannot help it. A later one, in the same log window, keeps the lower-lr advice."""
    cfg = quick_config(tmp_path)
    cfg.train.log_every = 2
    monkeypatch.setattr(engine, "train_step", loss_not_finite_at(bad_steps))
    with pytest.raises(recovery.TrainingDiverged) as info:
        engine.train(cfg, command=["python", "recipes/tiny.py"])
    message = str(info.value)
    assert message.startswith("training diverged at step 2: the loss is nan; ")
    causes = ("no update had been made yet, so the learning rate is not the cause: check the loss's temperatures "
              "(--method.tau_student, --method.tau_teacher) and the images; then start again with: "
              f"python recipes/tiny.py --train.run_dir {cfg.train.run_dir}")
    assert (causes in message) == first and ("a lower --optim.base_lr" in message) != first, message


def test_the_first_loss_causes_follow_the_objective_and_the_precision(tmp_path):
    from types import SimpleNamespace

    cfg = quick_config(tmp_path)
    cfg.method.objective = "mlcpc"
    assert recovery.first_loss_causes(cfg, SimpleNamespace(mixed_precision="fp16")) == (
        "the loss's temperatures (--critic.temperature), --train.precision fp16 (its range overflows: bf16 or no) "
        "and the images")
    cfg.method.objective = "mira+mlcpc"
    assert "(--method.tau_student, --method.tau_teacher, --critic.temperature) and the images" in \
        recovery.first_loss_causes(cfg, SimpleNamespace(mixed_precision="bf16"))


def test_divergence_advice_names_a_start_or_end_lr_above_the_peak(tmp_path):
    """`--optim.final_lr 1e30` diverged, and the advice was a 10x lower base_lr (the lr that was not the
    cause) on a resume; the schedule's ends cannot change on a resume either."""
    from types import SimpleNamespace

    cfg = quick_config(tmp_path)
    cfg.optim.final_lr = 1e30
    advice = recovery.continue_advice(cfg, ["python", "r.py"], Path(cfg.train.run_dir), 3,
                                      SimpleNamespace(mixed_precision="no"))
    assert advice.startswith("--optim.final_lr 1e+30 lies above the schedule's peak lr (") and "--resume" not in advice
    assert "a resume cannot change them: start a new run (another --train.run_dir) with lower values" in advice
    cfg.optim.final_lr = 0.0
    assert "a lower --optim.base_lr" in recovery.continue_advice(cfg, ["python", "r.py"], Path(cfg.train.run_dir), 3,
                                                                 SimpleNamespace(mixed_precision="no"))


class StopAt:
    """Replaces GracefulStop: asks to stop once `step` steps ran (as a SIGINT would)."""

    counter = [0]

    def __init__(self):
        self.signal_name = ""

    @property
    def requested(self) -> bool:
        return self.counter[0] >= self.step

    def agreed(self, accelerator) -> bool:
        return self.requested

    def close(self) -> None:
        pass


def counting(step_fn):
    def wrapped(*args, **kwargs):
        StopAt.counter[0] += 1
        return step_fn(*args, **kwargs)
    return wrapped


def test_no_checkpoint_of_non_finite_weights_even_on_a_stop(tmp_path, monkeypatch):
    """A stop mid-epoch saves without a log row; the save itself refuses diverged weights."""
    cfg = quick_config(tmp_path, epochs=2)
    cfg.train.log_every = 100  # step 5 is no log step: only the save's own check can see it
    StopAt.counter[0], StopAt.step = 0, 5
    monkeypatch.setattr(engine, "GracefulStop", StopAt)
    monkeypatch.setattr(engine, "train_step", counting(poison_at(5)))
    with pytest.raises(recovery.TrainingDiverged, match="step 5: the weights are no longer finite"):
        engine.train(cfg)
    assert saved_step(Path(cfg.train.run_dir)) == 3


# ---- logs after restarts ------------------------------------------------------------------------------------------

def test_fresh_start_after_a_kill_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    """SLURM's requeue (--resume auto) of a job killed between its first backbone and checkpoint writes: it
    starts over (the same command without `auto` refuses to replace that backbone: test_engine)."""
    cfg = quick_config(tmp_path, epochs=1)
    run_dir = Path(cfg.train.run_dir)
    engine.train(cfg)
    for name in ("checkpoint.pt", "results.json"):  # as if killed just before its first checkpoint
        (run_dir / name).unlink()
    engine.train(cfg, resume="auto")
    assert [int(r["step"]) for r in read_csv(run_dir / "train_log.csv")] == [1, 2, 3]
    assert [int(r["epoch"]) for r in read_csv(run_dir / "epochs.csv")] == [0]
    assert tensorboard_steps(run_dir, "train/loss") == [1, 2, 3]
    assert tensorboard_steps(run_dir, "epoch/loss") == [3]


class Killed(BaseException):
    """A kill -9 at a chosen point: nothing after it runs (no handler catches a BaseException)."""


def test_a_kill_just_before_the_checkpoint_loses_no_knn_row_and_no_backbone(tmp_path, monkeypatch):
    """results.json and the backbone are written before the epoch's checkpoint: a kill between them
    (a multi-GB save, where SLURM's kill lands) leaves them ahead of it, and the resume ends with
    the k-NN history and backbone of an uninterrupted run."""
    once = tiny_config(tmp_path / "once", epochs=2)
    engine.train(once)
    cfg = tiny_config(tmp_path / "killed", epochs=2)
    real_save = ckpt.atomic_save

    def killed_at_the_last_checkpoint(obj, path):
        if Path(path).name == "checkpoint.pt" and obj["state"]["epoch"] == 2:
            raise Killed
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "atomic_save", killed_at_the_last_checkpoint)
    with pytest.raises(Killed):
        engine.train(cfg)
    monkeypatch.undo()
    engine.train(cfg, resume=True)
    results = [json.loads((Path(c.train.run_dir) / "results.json").read_text()) for c in (once, cfg)]
    assert [r["epoch"] for r in results[1]["knn"]] == [1, 2] and results[1] == results[0]
    backbones = [torch.load(Path(c.train.run_dir) / "backbone_resnet18.pth") for c in (once, cfg)]
    assert all(torch.equal(backbones[0][k], backbones[1][k]) for k in backbones[0])


def test_a_stop_at_a_capped_epochs_last_step_resumes_to_the_same_steps(tmp_path, monkeypatch):
    """--train.steps_per_epoch below the loader's length: a stop at the epoch's last step saves its
    end; the resume must not train one more batch of that epoch."""
    once = quick_config(tmp_path / "once", epochs=2)
    once.train.steps_per_epoch = 2  # of 3
    engine.train(once)
    cfg = quick_config(tmp_path / "stopped", epochs=2)
    cfg.train.steps_per_epoch = 2
    StopAt.counter[0], StopAt.step = 0, 2
    with monkeypatch.context() as m:
        m.setattr(engine, "GracefulStop", StopAt)
        m.setattr(engine, "train_step", counting(engine.train_step))
        assert engine.train(cfg)["interrupted"]
    engine.train(cfg, resume=True)
    logs = [read_csv(Path(c.train.run_dir) / "train_log.csv") for c in (once, cfg)]
    assert [int(r["step"]) for r in logs[1]] == [1, 2, 3, 4]
    assert [(r["lr"], r["loss"]) for r in logs[1]] == [(r["lr"], r["loss"]) for r in logs[0]]


def test_csv_log_drops_a_row_cut_by_a_kill(tmp_path):
    from fastssl.run_log import CsvLog

    path = tmp_path / "log.csv"
    path.write_text("epoch,step,loss\n0,1,2.5\n0,2,2.4\n0,")
    CsvLog(path, ["epoch", "step", "loss"], keep_until_step=5)
    assert read_csv(path) == [{"epoch": "0", "step": "1", "loss": "2.5"}, {"epoch": "0", "step": "2", "loss": "2.4"}]


# ---- messages that name the run directory -------------------------------------------------------------------------

def test_stop_message_names_the_run_directory(tmp_path, monkeypatch, capsys):
    cfg = quick_config(tmp_path, epochs=2)
    StopAt.counter[0], StopAt.step = 0, 2
    monkeypatch.setattr(engine, "GracefulStop", StopAt)
    monkeypatch.setattr(engine, "train_step", counting(engine.train_step))
    code, out, _ = exit_of(cfg, ["--train.epochs", "2"], capsys)
    run_dir = Path(cfg.train.run_dir)
    assert code == 130
    assert f"continue with: python recipes/tiny.py --train.epochs 2 --resume --train.run_dir {run_dir}" in out
    assert saved_step(run_dir) == 2


def test_resume_without_checkpoint_points_at_the_latest_run(tmp_path):
    cfg = quick_config(tmp_path, epochs=1)
    runs = tmp_path / "runs"
    (runs / "20250101-000000").mkdir(parents=True)
    (runs / "20250101-000000" / "checkpoint.pt").write_bytes(b"")
    cfg.train.run_dir = str(runs / "20250102-000000")  # the demo's new timestamp
    with pytest.raises(ConfigError, match="holds no checkpoint") as info:
        engine.train(cfg, resume=True, command=["python", "recipes/mira_demo.py", "--resume"])
    assert (f"continue the latest run in {runs}: python recipes/mira_demo.py --resume "
            f"--train.run_dir {runs / '20250101-000000'}") in str(info.value)


def test_rerun_command_replaces_fields_in_both_spellings():
    cmd = ["python", "r.py", "--resume", "--train.run_dir=a b", "--optim.base_lr", "1", "--data.val="]
    assert (relaunch.rerun_command(cmd, Path("runs/x"), overrides={"optim.base_lr": "0.1"})
            == "python r.py --data.val= --resume --train.run_dir runs/x --optim.base_lr 0.1")
    assert relaunch.rerun_command(None, Path("d"), resume=False) == "<your command> --train.run_dir d"


def test_rerun_command_of_several_processes_names_their_launcher(monkeypatch):
    """The recorded command is `python script ...` whatever launched it: followed literally after an
    8-GPU run it would resume on one process (the whole batch on one GPU)."""
    cmd = ["python", "recipes/mira_bs512.py", "--train.seed", "3"]
    assert (relaunch.rerun_command(cmd, Path("runs/x"), processes=(8, 8))
            == "accelerate launch --multi_gpu --num_processes 8 recipes/mira_bs512.py --train.seed 3 --resume "
               "--train.run_dir runs/x")
    two_nodes = relaunch.rerun_command(cmd, Path("runs/x"), processes=(16, 8))
    assert two_nodes.startswith("python recipes/mira_bs512.py --train.seed 3 --resume --train.run_dir runs/x")
    assert two_nodes.endswith("(with the same launcher and process count as before: 16 processes on 2 machines, "
                              "one launch on each)")
    monkeypatch.setenv("WORLD_SIZE", "4")  # read from the launcher's environment when not given
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert relaunch.rerun_command(cmd, Path("d")).startswith("accelerate launch --multi_gpu --num_processes 4 ")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert relaunch.rerun_command(cmd, Path("d")).startswith("python recipes/mira_bs512.py")


@pytest.mark.parametrize("checkpoint", [False, True])
def test_a_ctrl_c_in_set_up_exits_130_with_one_line_saying_how_to_go_on(tmp_path, capsys, checkpoint):
    """Set-up (listing an ImageNet folder takes minutes) runs before the loop turns SIGINT into a
    checkpoint: a Ctrl-C there printed a traceback. The run directory decides the advice."""
    from fastssl.cli import command_line

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if checkpoint:
        (run_dir / ckpt.CHECKPOINT_NAME).write_bytes(b"")

    def start(cfg, resume, command):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exited:
        command_line(Config(), ["--train.run_dir", str(run_dir)], "recipes/x.py", check=lambda cfg: None,
                     dump=str, start=start, user_errors=lambda: ())
    assert exited.value.code == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    if checkpoint:
        assert err == (f"interrupted; the checkpoint in {run_dir} is kept, continue from it with: "
                       f"python recipes/x.py --resume --train.run_dir {run_dir}")
    else:
        assert err == (f"interrupted before a checkpoint was written in {run_dir}; nothing to resume: "
                       f"start again with: python recipes/x.py --train.run_dir {run_dir}")


def test_the_tools_stop_signals_raise_where_they_land_and_are_put_back():
    """Inside `stop_signals_interrupt` SIGTERM and SIGHUP raise StopSignal (a KeyboardInterrupt, so the
    tools' Ctrl-C lines cover them) with the shell's status; outside, the handlers it found are back.
    Off the main thread (no handlers there) it changes nothing."""
    import signal
    import threading

    from fastssl.cli import StopSignal, interrupt_exit_status, interrupted_by, stop_signals_interrupt

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig in before:
        with pytest.raises(KeyboardInterrupt) as caught, stop_signals_interrupt():
            signal.raise_signal(sig)
        assert isinstance(caught.value, StopSignal) and caught.value.signum == sig
        assert interrupt_exit_status(caught.value) == 128 + sig
        assert interrupted_by(caught.value) == f"interrupted by {signal.Signals(sig).name}"
        assert {s: signal.getsignal(s) for s in before} == before
    assert (interrupt_exit_status(KeyboardInterrupt()), interrupted_by(KeyboardInterrupt())) == (130, "interrupted")
    seen = []

    def off_the_main_thread():
        with stop_signals_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    worker = threading.Thread(target=off_the_main_thread)
    worker.start()
    worker.join()
    assert seen == [before[signal.SIGTERM]]


def test_a_tools_failed_write_is_told_to_free_space_only_when_the_disk_is_full():
    """A read-only or forbidden folder was told "free space there": only a full disk (or torch.save's
    writer stopping short, its RuntimeError) gains from room; anything else needs another place."""
    from fastssl.cli import write_fix

    full = [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded"),
            RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 64 vs 0")]
    elsewhere = [OSError(errno.EROFS, "Read-only file system"), OSError(errno.EACCES, "Permission denied"),
                 OSError(errno.ENOENT, "No such file or directory")]
    assert {write_fix(err, "--json") for err in full} == {"free space there, or pass --json with another folder"}
    assert {write_fix(err, "--out") for err in elsewhere} == {"pass --out with a folder you can write to"}


def test_a_ctrl_c_while_torch_is_imported_exits_130_with_one_line(tmp_path):
    """A Ctrl-C in the first second lands inside `import torch`: the advice must not import a half-loaded
    torch again (it crashed with a second traceback, or a segfault)."""
    probe = (
        "import importlib.abc, runpy, sys\n"
        "class CtrlC(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch.nn':  # torch/__init__ is half run: torch._C and others are loaded\n"
        "            sys.meta_path.remove(self)\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, CtrlC())\n"
        f"sys.argv = ['recipes/mira_bs512.py', '--data.train', {str(tmp_path)!r}, '--train.run_dir', "
        f"{str(tmp_path / 'run')!r}]\n"
        f"runpy.run_path({str(REPO / 'recipes' / 'mira_bs512.py')!r}, run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 130, out.stderr
    assert out.stderr.strip().startswith("interrupted before a checkpoint was written") and "Traceback" not in out.stderr


# ---- the demo without k-NN ----------------------------------------------------------------------------------------

def test_demo_without_knn_prints_what_it_can(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("mira_demo", REPO / "recipes" / "mira_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    cfg = quick_config(tmp_path)
    run_dir = tmp_path / "demo_run"
    demo.main(["--data.train", cfg.data.train, "--data.val=", "--data.num_workers", "0", "--train.epochs", "1",
               "--train.run_dir", str(run_dir), "--train.global_batch_size", "8", "--train.progress", "false",
               "--model.proj_hidden_dim", "32", "--model.proj_dim", "16", "--model.num_prototypes", "12",
               "--aug.global_size", "16", "--aug.local_size", "8"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("demo: k-NN off")
    assert json.loads((run_dir / "demo.json").read_text())["knn_top1_trained"] is None
    figures, line = demo.summary({"knn": [], "knn_random_init": {"top1": 12.5}})
    assert line == "demo: knn_top1 trained=off random_init=12.5"


def test_demo_reports_from_one_process_of_a_launch(tmp_path, monkeypatch, capsys):
    """Under `accelerate launch` every process returns the results: rank 0 alone prints and writes them."""
    spec = importlib.util.spec_from_file_location("mira_demo", REPO / "recipes" / "mira_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    def trained(cfg, argv):
        cfg.train.run_dir = str(tmp_path / "run")
        return {"knn": [{"top1": 20.0}], "knn_random_init": {"top1": 10.0}}

    monkeypatch.setattr(demo, "run", trained)
    for main_process in (False, True):
        monkeypatch.setattr(demo, "main_process", lambda: main_process)
        demo.main([])
        said = capsys.readouterr().out
        assert ("demo: knn_top1 trained=20.0 random_init=10.0" in said) is main_process, said
        assert (tmp_path / "run" / "demo.json").exists() is main_process


def _one_rank_finds_its_buffers_diverged(rank: int, world_size: int, run_dir: str, where: str) -> tuple[str, bool]:
    """(message, whether another process of this node prints it) of the divergence the guard raised."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from fastssl.runtime import said_by_another_process

    accelerator = Accelerator(cpu=True)
    student, teacher = torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)  # a teacher with local buffers
    state = ckpt.TrainState()
    guard = recovery.DivergenceGuard(student, teacher, state, accelerator)
    if rank == 1:  # shuffle-BN's statistics are each process's own: here only rank 1's blew up
        teacher.running_var.fill_(float("inf"))
    parts = SimpleNamespace(accelerator=accelerator, teacher=teacher)
    try:
        if where == "save":
            engine.save(tiny_config(Path(run_dir)), Path(run_dir), parts, state, guard)
        elif where == "log step":  # the loss (reduced, so the same everywhere) is fine
            guard.check(1.0, step=7)
        else:  # a loss every process finds diverged
            teacher.running_var.fill_(1.0)
            guard.check(float("nan"), step=7)
    except recovery.TrainingDiverged as err:
        return str(err), said_by_another_process(err)
    return "went on", False


@pytest.mark.parametrize("where, step", [("save", 0), ("log step", 7)])
def test_weights_one_process_finds_diverged_fail_every_process_together(tmp_path, where, step):
    """Not one rank raising while the others wait for it in the next collective (for good on NCCL); the
    node's log says it once: the process that found it (rank 0 here relays it silently)."""
    import socket

    from dist_utils import run_distributed

    outs = run_distributed(_one_rank_finds_its_buffers_diverged, world_size=2, args=(str(tmp_path), where),
                           timeout=90)
    message = f"training diverged at step {step}: the weights are no longer finite"
    assert outs == [(f"rank 1 on {socket.gethostname()}: {message}", True), (message, False)]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_loss_every_process_finds_diverged_is_said_once_per_node(tmp_path):
    from dist_utils import run_distributed

    outs = run_distributed(_one_rank_finds_its_buffers_diverged, world_size=2, args=(str(tmp_path), "loss"),
                           timeout=90)
    assert outs == [("training diverged at step 7: the loss is nan", False),
                    ("training diverged at step 7: the loss is nan", True)]


def _train_on_this_ranks_view(rank: int, world_size: int, roots: list[str], run_dirs: list[str],
                              resume: bool | str = "auto") -> str:
    """engine.train on 2 processes where each may see its own data folder and run directory; the error's
    message ends with SAID_ELSEWHERE where another process of the node prints it."""
    from fastssl.config import ConfigError
    from fastssl.runtime import said_by_another_process
    from pipelines.folder import DataLayoutError

    # Each rank's own run directory stands for one path whose content differs per node (a node-local disk):
    # on one machine the paths must differ, so the check that every node names the same path is told so.
    agreement.PER_NODE_FIELDS = agreement.PER_NODE_FIELDS | {"train.run_dir"}
    agreement.SHARED_CHECK_WAIT_S = 1.0  # how long a node looks for rank 0's file in the run directory
    missing = Path(roots[rank]).name == "missing"  # this node has no copy of the data
    cfg = quick_config(Path(roots[0] if missing else roots[rank]), epochs=1)
    cfg.data.train = str(Path(roots[rank]) / "data" / "train") if missing else cfg.data.train
    cfg.train.run_dir = run_dirs[rank]
    try:
        engine.train(cfg, resume=resume)
    except (DataLayoutError, ckpt.CheckpointError, ConfigError, FileNotFoundError) as err:
        return f"{type(err).__name__}: {err}" + (SAID_ELSEWHERE if said_by_another_process(err) else "")
    return "trained"


SAID_ELSEWHERE = " [printed by another process of this node]"


def test_a_process_that_fails_its_set_up_alone_fails_every_process(tmp_path):
    """One node's copy of the data missing, or its view of the run directory without the checkpoint that an
    explicit --resume asks for: that process's error on it, the same error naming it on the others (not a
    wait in their next collective, for good on NCCL)."""
    import socket

    from dist_utils import run_distributed

    quick_config(tmp_path / "node0")
    run = str(tmp_path / "run")
    outs = run_distributed(_train_on_this_ranks_view, world_size=2,
                           args=([str(tmp_path / "node0"), str(tmp_path / "missing")], [run, run]), timeout=180)
    kind, message = outs[1].split(": ", 1)
    assert "does not exist" in message, outs[1]
    assert outs[0] == f"{kind}: rank 1 on {socket.gethostname()}: {message}{SAID_ELSEWHERE}"

    cfg = quick_config(tmp_path / "node0", epochs=1)
    engine.train(cfg)  # node 0's run directory holds a checkpoint; node 1's is empty
    outs = run_distributed(_train_on_this_ranks_view, world_size=2,
                           args=([str(tmp_path / "node0")] * 2, [cfg.train.run_dir, str(tmp_path / "node1_run")], True),
                           timeout=180)
    assert outs[1].startswith("ConfigError: --resume: ") and "holds no checkpoint" in outs[1], outs[1]
    assert not outs[1].endswith(SAID_ELSEWHERE), outs[1]
    assert outs[0].startswith("ConfigError: rank 1 on ") and outs[0].endswith(SAID_ELSEWHERE), outs[0]


def _train_while_the_main_process_cannot_write(rank: int, world_size: int, root: str, file: str) -> str:
    """engine.train on 2 processes whose main process fails to write `file` (a full disk) at its second write."""
    from fastssl import run_log

    cfg = quick_config(Path(root), epochs=2)
    writes = {"train_log.csv": (run_log.RunLog, "step"), "epochs.csv": (run_log.RunLog, "epoch"),
              "results.json": (engine, "write_run_json")}
    owner, name = writes[file]
    real, calls = getattr(owner, name), []

    def full_disk(*args, **kwargs):
        if owner is engine and Path(args[0]).name != file:  # config.json, run_info.json
            return real(*args, **kwargs)
        calls.append(0)
        if rank == 0 and len(calls) == 2:
            raise ckpt.CheckpointError(f"writing {file} failed: no space left on device")
        return real(*args, **kwargs)

    setattr(owner, name, full_disk)
    try:
        engine.train(cfg)
    except ckpt.CheckpointError as err:
        return str(err)
    return "trained"


@pytest.mark.parametrize("file", ["train_log.csv", "epochs.csv", "results.json"])
def test_a_file_the_main_process_cannot_write_stops_every_process(tmp_path, file):
    """Only the main process writes the logs and results.json: when it cannot, the others hear of it at once
    (not in their next collective, which waits for good on NCCL)."""
    import socket

    from dist_utils import run_distributed

    quick_config(tmp_path)  # the data, made once
    outs = run_distributed(_train_while_the_main_process_cannot_write, world_size=2, args=(str(tmp_path), file),
                           timeout=180)
    assert outs[0].startswith(f"writing {file} failed: no space left on device"), outs
    assert outs[1].startswith(f"rank 0 on {socket.gethostname()}: writing {file} failed"), outs


def _train_while_rank_1_cannot_save(rank: int, world_size: int, root: str) -> tuple[str, bool]:
    """engine.train on 2 processes whose rank 1 cannot write its part of the checkpoint (a full disk):
    (the message, whether another process of this node prints it)."""
    import errno

    from fastssl.runtime import said_by_another_process

    real = ckpt.save_checkpoint

    def full_disk(*args, **kwargs):
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device", "rng/rank1.pt")
        return real(*args, **kwargs)

    ckpt.save_checkpoint = full_disk
    try:
        engine.train(quick_config(Path(root), epochs=1))
    except ckpt.CheckpointError as err:
        return str(err), said_by_another_process(err)
    return "trained", False


def test_a_checkpoint_one_process_cannot_write_is_said_once_with_its_reason(tmp_path):
    """Rank 1's full disk: its own message on rank 1, and rank 0 (same node) stops silently with it, so the
    node's log says why once (it used to add "another process could not write its part" per process)."""
    import socket

    from dist_utils import run_distributed

    quick_config(tmp_path)  # the data, made once
    outs = run_distributed(_train_while_rank_1_cannot_save, world_size=2, args=(str(tmp_path),), timeout=180)
    reason = "could not write rng/rank1.pt: the disk is full"
    assert outs[1][0].startswith(reason) and not outs[1][1], outs
    assert outs[0][0].startswith(f"rank 1 on {socket.gethostname()}: {reason}") and outs[0][1], outs
    assert all("; then start again with: " in message for message, _ in outs), outs  # the loop's advice


def _fail_in_a_block_on(rank: int, world_size: int, failing: list[int]) -> tuple[str, bool, bool] | None:
    """(message, whether another process of this node prints it, ... when wrapped with advice) after
    `failing_together`, on a block that fails on the ranks in `failing`."""
    from accelerate import Accelerator

    from fastssl.config import ConfigError
    from fastssl.runtime import failing_together, said_by_another_process

    accelerator = Accelerator(cpu=True)
    try:
        with failing_together(accelerator):
            if rank in failing:
                raise ConfigError("the data folder /data/train does not exist")
    except ConfigError as err:
        try:  # as train_epochs adds how to go on
            raise ckpt.CheckpointError(f"{err}; continue with ...") from err
        except ckpt.CheckpointError as wrapped:
            return str(err), said_by_another_process(err), said_by_another_process(wrapped)
    return None


def test_an_error_the_processes_agree_on_is_said_once_per_node():
    """Processes meeting the same error print one line per node, not one each; the failing process's own
    message wins (2 processes here: 8 GPUs of a node the same way)."""
    import socket

    from dist_utils import run_distributed

    message = "the data folder /data/train does not exist"
    outs = run_distributed(_fail_in_a_block_on, world_size=2, args=([0, 1],), timeout=90)
    assert outs == [(message, False, False), (message, True, True)]  # the same error: rank 0 says it
    outs = run_distributed(_fail_in_a_block_on, world_size=2, args=([1],), timeout=90)
    # rank 1 says its own; rank 0, on the same node, relays it silently
    relayed = f"rank 1 on {socket.gethostname()}: {message}"
    assert outs == [(relayed, True, True), (message, False, False)]
    # two nodes of one process each that report the same host name (containers): each node's log says it
    outs = run_distributed(_fail_in_a_block_on, world_size=2, args=([1],), env={"LOCAL_RANK": "0",
                                                                               "LOCAL_WORLD_SIZE": "1"}, timeout=90)
    assert outs == [(relayed, False, False), (message, False, False)]


def test_an_error_another_process_prints_exits_2_without_a_line(capsys):
    """The command lines and tools end every user error through `exit_with`: silent where the error (or the
    one it was raised from) is marked as printed by another process of this node."""
    from fastssl.cli import exit_with
    from fastssl.config import ConfigError

    for marked in (False, True):
        cause = ConfigError("the data folder /data/train does not exist")
        cause.said_elsewhere = marked
        try:
            raise ckpt.CheckpointError(f"{cause}; continue with ...") from cause
        except ckpt.CheckpointError as err:
            with pytest.raises(SystemExit) as exited:
                exit_with(err)
        assert exited.value.code == 2
        said = capsys.readouterr().err
        assert said == ("" if marked else f"error: {cause}; continue with ...\n"), said


def _train_with_this_ranks_setting(rank: int, world_size: int, root: str, field: str, values: list) -> str:
    from fastssl.config import ConfigError
    from fastssl.overrides import set_field
    from fastssl.runtime import said_by_another_process

    cfg = quick_config(Path(root), epochs=1)
    set_field(cfg, field, str(values[rank]))
    cfg.data.num_workers = rank  # may differ per node
    try:
        engine.train(cfg)
    except ConfigError as err:
        return f"ConfigError: {err}" + (SAID_ELSEWHERE if said_by_another_process(err) else "")
    return "trained"


@pytest.mark.parametrize("field, values, shown", [
    ("optim.base_lr", [0.5, 5.0], "optim.base_lr (rank 0: 0.5, rank 1: 5.0)"),
    ("data.val", ["VAL", ""], "data.val (rank 0: True, rank 1: False)")])  # a path may differ, being set may not
def test_processes_started_with_different_settings_refuse_to_start(tmp_path, field, values, shown):
    """One node's command missing an override: replicas that would drift apart silently (each applies
    its own update to averaged gradients), or a k-NN (and its collectives) on some processes only."""
    from dist_utils import run_distributed

    values = [str(tmp_path / "data" / "val") if v == "VAL" else v for v in values]
    outs = run_distributed(_train_with_this_ranks_setting, world_size=2, args=(str(tmp_path), field, values),
                           timeout=180)
    for out in outs:
        assert out.startswith("ConfigError: the processes were started with different settings: "
                              f"{shown}; start every node with the same command"), out
    assert [out.endswith(SAID_ELSEWHERE) for out in outs] == [False, True]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("failure, message", [
    (PermissionError(13, "Permission denied", "rng/rank0.pt"),
     "could not write rng/rank0.pt: permission denied; make rng writable for this user"),
    (ValueError("a state that cannot be pickled"), "writing the checkpoint in .* failed: ValueError"),
], ids=["OSError", "other"])
def test_any_failure_to_write_a_checkpoint_is_a_checkpoint_error(tmp_path, monkeypatch, failure, message):
    """Not only the errors checkpoint.py names: any failure there stops every process together (as a
    CheckpointError, agreed in `engine.save`), where another exception would leave the others waiting."""
    def refuse(*args, **kwargs):
        raise failure

    monkeypatch.setattr(ckpt, "save_checkpoint", refuse)
    with pytest.raises(ckpt.CheckpointError, match=message):
        engine.train(quick_config(tmp_path, epochs=1))


def test_processes_that_see_different_data_refuse_to_start(tmp_path):
    """Node-local copies of the data that differ: a clear error on every process, not a hang later."""
    from dist_utils import run_distributed

    roots = [tmp_path / "node0", tmp_path / "node1"]
    for root in roots:
        quick_config(root)  # 24 images each ...
    for path in sorted((roots[1] / "data" / "train").rglob("*.JPEG"))[::3]:
        path.unlink()  # ... but node 1 lost 8, from every class
    run = str(tmp_path / "run")
    outs = run_distributed(_train_on_this_ranks_view, world_size=2, args=([str(r) for r in roots], [run, run]),
                           timeout=180)
    for out in outs:
        assert out.startswith("DataLayoutError: the processes see different numbers of training images "
                              "(rank 0: 24, rank 1: 16)"), out
    assert [out.endswith(SAID_ELSEWHERE) for out in outs] == [False, True]  # every process: one line per node


@pytest.mark.parametrize("checkpointed", [False, True], ids=["fresh start", "resume"])
def test_a_run_directory_only_node_0_sees_refuses_to_start(tmp_path, checkpointed):
    """A node-local run directory: at a resume node 1 would start afresh while node 0 continues; at a
    fresh start (every process at step 0) it is refused too, not a whole job later at its first resume."""
    from dist_utils import run_distributed

    cfg = quick_config(tmp_path, epochs=1)
    if checkpointed:
        engine.train(cfg)  # node 0's checkpoint of step 3
    outs = run_distributed(_train_on_this_ranks_view, world_size=2,
                           args=([str(tmp_path)] * 2, [cfg.train.run_dir, str(tmp_path / "node1_run")]), timeout=180)
    for out in outs:
        assert out.startswith("CheckpointError: process 1 does not see the run directory "), out
        assert "that rank 0 writes its checkpoints to" in out and "a filesystem all nodes share" in out
    assert [out.endswith(SAID_ELSEWHERE) for out in outs] == [False, True]
    assert [p.name for p in Path(cfg.train.run_dir).iterdir() if p.name.startswith(".shared-check")] == []


# ---- a run directory named by its start time ----------------------------------------------------------------------

def _stamp_with_a_clock_a_second_apart(rank: int, world_size: int) -> str:
    from types import SimpleNamespace

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    run_dir_module.time.strftime = lambda fmt: f"20261206-10000{rank}"  # this child's own clock, a second apart
    train_cfg = SimpleNamespace(run_dir="runs/demo/{time}")
    run_dir_module.stamp_run_dir(train_cfg, accelerator)
    return train_cfg.run_dir


def test_a_start_time_in_the_run_directory_is_rank_0s_on_every_process():
    """The demo's runs/demo/{time}: each process stamping its own clock could straddle a second,
    and the launch was then refused for run directories that differ."""
    import re
    from types import SimpleNamespace

    from dist_utils import run_distributed

    outs = run_distributed(_stamp_with_a_clock_a_second_apart, world_size=2, timeout=90)
    assert outs == ["runs/demo/20261206-100000"] * 2
    one = SimpleNamespace(run_dir="runs/x/{time}/y")
    run_dir_module.stamp_run_dir(one, SimpleNamespace(num_processes=1))
    assert re.fullmatch(r"runs/x/\d{8}-\d{6}/y", one.run_dir), one.run_dir
    kept = SimpleNamespace(run_dir="runs/plain")
    assert run_dir_module.stamp_run_dir(kept, SimpleNamespace(num_processes=1)) == "runs/plain"
