"""tools/finetune_semi.py (fastssl/eval/finetune.py) fine-tunes to 100% on a separable toy set
from a labelled subset, and names bad subset files (missing, empty, unmatched or ambiguous lines)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import load_tool
from fastssl.eval.errors import EvalError
from fastssl.eval.subsets import match_subset
from test_eval_linear import make_toy_run


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    return make_toy_run(tmp_path_factory.mktemp("semi"))


@pytest.fixture(scope="module")
def tool():
    return load_tool("finetune_semi")


def train_images(run: Path) -> list[Path]:
    return sorted((run.parent / "data" / "train").glob("*/*.JPEG"))


def write_subset(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_finetuning_on_a_subset_is_exact(tool, toy_run, tmp_path):
    images = train_images(toy_run)
    picked = [p for p in images if p.stem.endswith(("000", "001", "002", "003"))]  # 4 of 6 per class
    # SimCLR-style bare file names, one train-relative path, a comment, a repeat and a blank line.
    lines = ["# toy subset", *[p.name for p in picked[1:]], f"{picked[0].parent.name}/{picked[0].name}",
             picked[1].name, ""]
    subset = write_subset(tmp_path / "subset.txt", lines)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = tool.main([str(toy_run), "--subset", str(subset), "--epochs", "10", "--batch-size", "6",
                            "--milestones", "6,8", "--no-progress"])
    finally:
        torch.set_num_threads(n)
    assert report["top1"] == 100.0 and report["top5"] == 100.0
    assert report["loss_per_epoch"][-1] < report["loss_per_epoch"][0]
    assert report["num_subset"] == 12 and report["num_train"] == 18
    assert report["labels_perc_preset"] == "10"  # 12 / 18 of the train folder: the 10% preset
    assert report["lr_backbone"] == pytest.approx(0.01 * 6 / 256) and report["lr_head"] == pytest.approx(0.2 * 6 / 256)
    saved = json.loads((toy_run / f"finetune_semi_{subset.stem}.json").read_text())  # one report per subset
    assert saved["top1"] == 100.0 and saved["subset"] == str(subset)


def error_of(tool, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_subsets_are_named(tool, toy_run, tmp_path, capsys):
    run = str(toy_run)
    err = error_of(tool, [run, "--subset", str(tmp_path / "1percent.txt")], capsys)
    assert "subset file" in err and "does not exist" in err
    assert "is a folder" in error_of(tool, [run, "--subset", str(tmp_path)], capsys)
    empty = write_subset(tmp_path / "empty.txt", ["", "# nothing here", "   "])
    assert "is empty" in error_of(tool, [run, "--subset", str(empty)], capsys)
    name = train_images(toy_run)[0].name
    bad = write_subset(tmp_path / "bad.txt", [name, "n01440764_10026.JPEG", "c0_red/missing.JPEG",
                                              f"train/c0_red/{name}"])
    err = error_of(tool, [run, "--subset", str(bad)], capsys)
    assert "3 of 4 subset lines match no image" in err and "n01440764_10026.JPEG" in err
    assert "c0_red/missing.JPEG" in err
    assert "does not exist" in error_of(tool, [str(tmp_path / "no_run"), "--subset", str(bad)], capsys)
    err = error_of(tool, [str(toy_run / "backbone_resnet18.pth"), "--arch", "resnet50", "--subset", str(bad),
                          "--train", "x", "--val", "y"], capsys)
    assert "it is a resnet18's: pass --arch resnet18" in err


def test_the_same_file_name_in_two_classes_is_ambiguous(tool, toy_run, tmp_path, capsys):
    root = tmp_path / "train"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        (root / cls / "same.JPEG").write_bytes(b"")
    samples = [(str(root / "a" / "same.JPEG"), 0), (str(root / "b" / "same.JPEG"), 1)]
    with pytest.raises(EvalError, match="several class folders"):
        match_subset(["same.JPEG"], samples, str(root))
    assert match_subset(["b/same.JPEG"], samples, str(root)) == [samples[1]]
    assert match_subset(["b/same.JPEG"], samples, str(root) + "/") == [samples[1]]  # however the root is spelled
    assert match_subset(["b/same.JPEG"], samples, os.path.relpath(root)) == [samples[1]]


def test_a_checkpoint_without_data_is_refused_as_the_wrong_file(tool, tmp_path, capsys):
    torch.save({"epoch": 3, "model": {"w": torch.zeros(1)}}, tmp_path / "checkpoint.pt")
    err = error_of(tool, [str(tmp_path / "checkpoint.pt"), "--subset", str(tmp_path / "s.txt")], capsys)
    assert "is not an exported backbone" in err and "no data" not in err


def test_the_heads_start_as_their_protocols_do():
    """Linear probe: N(0, 0.01), zero bias (the MIRA authors' eval_linear.py). Fine-tuning: a new nn.Linear
    as SwAV's eval_semisup.py builds it (PyTorch's initialisation), drawn from the tool's seed."""
    from fastssl.eval.classifier import new_head

    torch.manual_seed(7)
    torch_default = torch.nn.Linear(512, 10)
    semi = new_head(512, 10, seed=7, init="default")
    torch.testing.assert_close(semi.weight, torch_default.weight, rtol=0, atol=0)
    torch.testing.assert_close(semi.bias, torch_default.bias, rtol=0, atol=0)
    probe = new_head(2048, 1000, seed=7)
    assert probe.bias.abs().max() == 0
    assert abs(probe.weight.std().item() - 0.01) < 1e-4 and abs(probe.weight.mean().item()) < 1e-4  # 2M draws



def test_a_stopped_finetuning_goes_on_from_its_last_epoch_and_ends_as_an_uninterrupted_one(tool, toy_run, tmp_path,
                                                                                          monkeypatch, capsys):
    """Stopped (Ctrl-C) in its 3rd epoch of 4, the same command resumes after 2 epochs, takes only
    the last 2 epochs' steps and ends with the losses, figures and weights of an uninterrupted run."""
    from fastssl.eval import finetune

    subset = write_subset(tmp_path / "subset.txt", [p.name for p in train_images(toy_run)][::2])  # 9 images
    argv = [str(toy_run), "--subset", str(subset), "--epochs", "4", "--batch-size", "4", "--milestones", "2,3",
            "--no-progress"]
    models, evaluate = [], finetune.evaluate_head

    def evaluate_and_keep(backbone, head, *args, **kwargs):
        models.append(torch.cat([t.detach().flatten().float() for t in [*backbone.state_dict().values(),
                                                                          *head.state_dict().values()]]))
        return evaluate(backbone, head, *args, **kwargs)

    monkeypatch.setattr(finetune, "evaluate_head", evaluate_and_keep)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = tool.main(argv + ["--json", str(tmp_path / "whole.json")])
        out, partial = tmp_path / "t.json", tmp_path / ".t.json.partial.pt"
        real, taken = finetune.sgd_step, [0]

        def counted(*args, stop_at=None, **kwargs):
            taken[0] += 1
            if taken[0] == stop_at:  # a `kill` (or a scheduler's time limit): not silence, as Ctrl-C's line
                signal.raise_signal(signal.SIGTERM)
            return real(*args, **kwargs)

        monkeypatch.setattr(finetune, "sgd_step", lambda *a, **k: counted(*a, stop_at=2 * 2 + 1, **k))  # 2 a epoch
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            tool.main(argv + ["--json", str(out)])
        assert stopped.value.code == 128 + signal.SIGTERM and partial.exists() and not out.exists()
        assert f"interrupted by SIGTERM; the epochs done are kept in {partial}" in capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the tool's handler is gone with it
        taken[0] = 0
        monkeypatch.setattr(finetune, "sgd_step", counted)
        resumed = tool.main(argv + ["--json", str(out)])
    finally:
        torch.set_num_threads(n)
    assert f"resuming the fine-tuning from {partial}: 2 epochs done" in capsys.readouterr().err
    assert taken[0] == 2 * 2 and resumed["loss_per_epoch"] == whole["loss_per_epoch"]
    assert (resumed["top1"], resumed["top5"]) == (whole["top1"], whole["top5"])
    assert torch.equal(models[-1], models[0]) and not partial.exists()  # the same weights, to the bit
