"""tools/eval_knn.py reproduces the loop's online k-NN and rejects bad input clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, load_tool
from dist_utils import requires_gloo, run_distributed
from test_engine import tiny_config
from fastssl.engine import train
from pipelines.augment import IMAGENET_MEAN, IMAGENET_STD

TOOL = str(REPO / "tools" / "eval_knn.py")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("knn")
    cfg = tiny_config(tmp, epochs=1)
    cfg.eval.knn_k = 20
    results = train(cfg)
    return Path(cfg.train.run_dir), results


def test_reproduces_the_online_knn_of_the_loop(trained_run, tmp_path):
    run, results = trained_run
    report = load_tool("eval_knn").main([str(run), "--ks", "10,20,200", "--json", str(tmp_path / "k.json")])
    assert abs(report["k"]["20"]["top1"] - results["knn"][-1]["top1"]) <= 0.1
    assert abs(report["k"]["20"]["top5"] - results["knn"][-1]["top5"]) <= 0.1
    saved = json.loads((tmp_path / "k.json").read_text())
    assert set(saved["k"]) == {"10", "20", "200"} and saved["arch"] == "resnet18"


def test_a_subset_memory_bank_scores_as_a_folder_of_only_those_images(trained_run, tmp_path, capsys):
    """--subset (the paper's 1 % / 10 % k-NN): the bank is the named images, and only they."""
    import shutil

    from fastssl.reports.run_report import evaluations

    run, _ = trained_run
    train_root = Path(json.loads((run / "config.json").read_text())["data"]["train"])
    chosen = [sorted((train_root / c).iterdir())[:3] for c in sorted(p.name for p in train_root.iterdir())]
    lines = [f"{'./' if i % 2 else ''}{p.parent.name}/{p.name}" for group in chosen for i, p in enumerate(group)]
    (tmp_path / "bank.txt").write_text("# a subset\n" + "\n".join(lines) + "\n")
    for p in (p for group in chosen for p in group):
        (tmp_path / "bank" / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, tmp_path / "bank" / p.parent.name / p.name)
    tool = load_tool("eval_knn")
    subset = tool.main([str(run), "--ks", "1,5,9,20", "--subset", str(tmp_path / "bank.txt")])
    assert "k=  20  top1" in capsys.readouterr().out.split("(k > the bank: all 9 images vote)")[0]
    folder = tool.main([str(run), "--ks", "1,5,9,20", "--train", str(tmp_path / "bank"), "--json",
                        str(tmp_path / "f.json")])
    assert subset["images"] == folder["images"] == {"bank": 9, "queries": 9}
    # k = 20 > the 9 images: the whole bank votes, as k = 9; recorded as 9 neighbours
    assert [subset["k"][k]["neighbours"] for k in ("1", "9", "20")] == [1, 9, 9]
    assert {m: subset["k"]["20"][m] for m in ("top1", "top5")} == {m: subset["k"]["9"][m] for m in ("top1", "top5")}
    assert subset["k"] == folder["k"] and subset["subset"] == str(tmp_path / "bank.txt")
    assert (run / "eval_knn_bank.json").is_file()  # its own report: the whole bank's eval_knn.json is another figure
    try:
        assert evaluations(run, {})["eval_knn_bank"]["top1"] == subset["k"]["1"]["top1"]  # the run report lists it
    finally:
        (run / "eval_knn_bank.json").unlink()


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=300)


def test_bad_input_is_named(trained_run, tmp_path, capsys):
    """The command line once (exit status 2, one line, no traceback), then the same exits in-process."""
    run, _ = trained_run
    out = run_tool(str(tmp_path / "nope"))
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "odd.pth")
    for argv, says in [([str(run / "checkpoint.pt")], "not an exported backbone"),
                       ([str(run / "backbone_resnet18.pth"), "--arch", "resnet50"], "it is a resnet18's: pass --arch resnet18"),
                       ([str(tmp_path / "odd.pth")], "(damaged, or another network's): export it again")]:
        with pytest.raises(SystemExit) as exited:
            load_tool("eval_knn").main([*argv, "--train", "x", "--val", "y"])
        err = capsys.readouterr().err
        assert exited.value.code == 2 and says in err and err.count("\n") == 1, err


def test_a_run_with_relative_data_paths_evaluates_from_any_directory(tmp_path, monkeypatch):
    """Recipes store paths as typed (data/demo/train); the tools take them from where the run started."""
    project = tmp_path / "project"
    cfg = tiny_config(project, epochs=1)
    cfg.data.train, cfg.data.val, cfg.train.run_dir = "data/train", "data/val", "runs/r1"
    cfg.eval.knn_at_start, cfg.eval.knn_k = False, 5
    monkeypatch.chdir(project)
    results = train(cfg)
    assert json.loads((project / "runs/r1/run_info.json").read_text())["cwd"] == str(project)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report = load_tool("eval_knn").main([str(project / "runs/r1"), "--ks", "5"])
    assert report["train"] == str(project / "data/train") and report["val"] == str(project / "data/val")
    assert (project / "runs/r1/eval_knn.json").is_file()
    assert abs(report["k"]["5"]["top1"] - results["knn"][-1]["top1"]) <= 0.1  # the same data as the loop's


def test_start_directory_of_runs_that_predate_its_record(tmp_path):
    from fastssl.eval.targets import from_run, start_dir

    run = tmp_path / "runs" / "demo" / "x"
    run.mkdir(parents=True)
    (tmp_path / "data" / "train").mkdir(parents=True)
    cfg = {"train": {"run_dir": "runs/demo/x"}}
    assert start_dir(run, cfg) == tmp_path  # runs/demo/x found at tmp/runs/demo/x was started in tmp
    assert start_dir(run, {"train": {"run_dir": "other/x"}}) is None  # moved or renamed: cannot tell
    assert start_dir(run, {"train": {"run_dir": str(run)}}) is None  # absolute: nothing to recover
    (run / "run_info.json").write_text(json.dumps({"cwd": "/somewhere"}))
    assert start_dir(run, cfg) == Path("/somewhere")  # the record wins
    assert from_run("data/train", tmp_path) == str(tmp_path / "data/train")
    assert from_run("/abs/train", tmp_path) == "/abs/train"
    assert from_run("data/val", None) == "data/val"


def eval_steps(loader):
    """The steps of an `EvalLoader`'s transform: resize, centre crop, to-tensor, normalise."""
    return loader.dataset.transform.transforms


def test_the_eval_view_is_the_runs_unless_overridden(trained_run, tmp_path):
    """eval.interpolation, eval.crop_fraction and the training normalisation (aug.mean / aug.std) reach the loop's
    k-NN and are the tools' defaults; flags win; a bare backbone file gets ImageNet's."""
    from accelerate import Accelerator

    from fastssl.engine import build_knn
    from fastssl.eval.targets import resolve_target

    cifar_mean, cifar_std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    run, _ = trained_run
    cfg = tiny_config(tmp_path, epochs=1)
    cfg.eval.interpolation, cfg.eval.crop_fraction = "bicubic", 1.0
    cfg.aug.mean, cfg.aug.std = cifar_mean, cifar_std
    knn = build_knn(cfg, Accelerator(cpu=True), workers=0)
    for loader in (knn.bank, knn.queries):
        resize, _, _, normalize = eval_steps(loader)
        assert resize.interpolation.value == "bicubic"
        assert resize.size == cfg.aug.global_size  # not round(16 / 0.875) = 18
        assert (tuple(normalize.mean), tuple(normalize.std)) == (cifar_mean, cifar_std)

    saved = json.loads((run / "config.json").read_text())
    copy = tmp_path / "bicubic_run"
    copy.mkdir()
    (copy / "backbone_resnet18.pth").write_bytes((run / "backbone_resnet18.pth").read_bytes())
    (copy / "config.json").write_text(json.dumps({
        **saved, "eval": {**saved["eval"], "interpolation": "bicubic", "crop_fraction": 1.0},
        "aug": {**saved["aug"], "mean": list(cifar_mean), "std": list(cifar_std)}}))
    view = resolve_target(copy, tool="t")["view"]
    assert (view.interpolation, view.crop_fraction, view.mean, view.std) == ("bicubic", 1.0, cifar_mean, cifar_std)
    flags = resolve_target(copy, tool="t", interpolation="bilinear", crop_fraction=0.5, mean=(0.5, 0.5, 0.5),
                           std=(0.25, 0.25, 0.25))["view"]
    assert (flags.interpolation, flags.crop_fraction) == ("bilinear", 0.5)
    assert (flags.mean, flags.std) == ((0.5,) * 3, (0.25,) * 3)
    legacy = {k: v for k, v in saved["eval"].items() if k not in ("interpolation", "crop_fraction")}  # older runs
    (copy / "config.json").write_text(json.dumps({**saved, "eval": legacy}))
    view = resolve_target(copy, tool="t")["view"]
    assert (view.interpolation, view.crop_fraction) == ("bilinear", 0.875)
    bare = resolve_target(copy / "backbone_resnet18.pth", tool="t", train="x", val="y")["view"]
    assert (bare.interpolation, bare.crop_fraction, bare.mean, bare.std) == ("bilinear", 0.875, IMAGENET_MEAN,
                                                                              IMAGENET_STD)

    report = load_tool("eval_knn").main([str(run), "--ks", "5", "--interpolation", "bicubic", "--crop-fraction", "1",
                                         "--mean", "0.5", "0.5", "0.5", "--no-progress", "--json",
                                         str(tmp_path / "k.json")])
    assert report["interpolation"] == "bicubic" and report["crop_fraction"] == 1.0
    assert report["mean"] == [0.5] * 3 and report["std"] == list(IMAGENET_STD)  # the tiny run's own std
    assert json.loads((tmp_path / "k.json").read_text())["interpolation"] == "bicubic"


def _knn_on_two_processes(rank: int, world_size: int, run: str, out: str) -> dict:
    return load_tool("eval_knn").main([run, "--ks", "5,20", "--json", out, "--no-progress", "--num-workers", "0"])


@requires_gloo
def test_two_processes_share_the_splits_and_score_as_one(trained_run, tmp_path):
    """Under `accelerate launch` each process embeds half of each split: the same scores as one process
    (not every image counted twice in the memory bank), and one JSON."""
    run, _ = trained_run
    one = load_tool("eval_knn").main([str(run), "--ks", "5,20", "--json", str(tmp_path / "one.json"), "--no-progress",
                                      "--num-workers", "0"])
    outs = run_distributed(_knn_on_two_processes, world_size=2, args=(str(run), str(tmp_path / "two.json")),
                           timeout=240)
    assert one["images"] == {"bank": 24, "queries": 9}  # tiny_config's folders
    for report in outs:
        assert report["images"] == one["images"]
        for k in ("5", "20"):
            assert report["k"][k]["top1"] == pytest.approx(one["k"][k]["top1"], abs=1e-6), k
            assert report["k"][k]["top5"] == pytest.approx(one["k"][k]["top5"], abs=1e-6), k
    assert json.loads((tmp_path / "two.json").read_text())["k"] == outs[0]["k"]


@pytest.mark.parametrize("flag, value, bound", [
    ("--batch-size", "0", ">= 1"), ("--batch-size", "-1", ">= 1"), ("--image-size", "-5", "between 1 and 1024"),
    ("--image-size", "100000", "between 1 and 1024"), ("--num-workers", "-2", "between -1 and 512"),
])
def test_sizes_and_worker_counts_are_checked_when_parsed(tmp_path, capsys, flag, value, bound):
    """A usage error naming the flag, not a ValueError from range() or the DataLoader after the backbone loaded."""
    with pytest.raises(SystemExit) as exit_info:
        load_tool("eval_knn").main([str(tmp_path), flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: must be {bound}, got {value}" in capsys.readouterr().err


def test_num_workers_defaults_to_this_process_share_of_the_cores(monkeypatch):
    """-1 (the default) divides the machine's cores among a launcher's processes on the node; 0 and N as given."""
    import argparse
    import os

    from fastssl.eval.classifier import add_run_arguments
    from fastssl.arg_types import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert (loader_workers("-1"), loader_workers("0"), loader_workers("3")) == (4, 0, 3)
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    ap = argparse.ArgumentParser()
    add_run_arguments(ap, "reader")
    assert ap.parse_args([]).num_workers == 16


def test_the_target_is_named_before_missing_data_or_backbone(tmp_path, capsys):
    """checkpoint.pt without --train/--val is refused as the wrong file (the more useful refusal); a run
    without its backbone yet is said to be one, not "checkpoint ... does not exist; pass a run directory"."""
    from test_eval_linear import make_toy_run

    torch.save({"epoch": 3, "model": {"w": torch.zeros(1)}}, tmp_path / "checkpoint.pt")
    run = make_toy_run(tmp_path)
    (run / "backbone_resnet18.pth").unlink()
    for target, says in ((tmp_path / "checkpoint.pt", "is not an exported backbone"),
                         (run, f"run directory {str(run)!r} has no exported backbone yet (backbone_resnet18.pth): "
                               "training writes it with every checkpoint")):
        with pytest.raises(SystemExit) as exit_info:
            load_tool("eval_knn").main([str(target)])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and says in err and "no data" not in err, err
