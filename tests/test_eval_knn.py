"""tools/eval_knn.py reproduces the loop's online k-NN and rejects bad input clearly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, load_tool
from test_engine import tiny_config
from fastssl.engine import train

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


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, timeout=300)


def test_bad_input_is_named(trained_run, tmp_path):
    run, _ = trained_run
    out = run_tool(str(tmp_path / "nope"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    out = run_tool(str(run / "checkpoint.pt"), "--train", "x", "--val", "y")
    assert out.returncode == 2 and "not an exported backbone" in out.stderr
    out = run_tool(str(run / "backbone_resnet18.pth"), "--arch", "resnet50", "--train", "x", "--val", "y")
    assert out.returncode == 2 and "another architecture" in out.stderr
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "odd.pth")
    out = run_tool(str(tmp_path / "odd.pth"), "--train", "x", "--val", "y")
    assert out.returncode == 2 and "another architecture" in out.stderr


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
