"""tools/mi_estimation.py runs end to end (quick mode) and its estimates respect the ceilings."""

from __future__ import annotations

import importlib.util
import json
import math
import signal

import pytest

from conftest import load_tool


def test_quick_run_writes_json_within_the_ceilings(tmp_path, one_thread, capsys):
    tool = load_tool("mi_estimation")
    tool.main(["--quick", "--iters", "20", "--no-compile", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "mi_estimation.json").read_text())
    n = report["config"]["n"]
    assert (report["config"]["iters_per_level"], n) == (20, 16)  # --quick's n, and the --iters given
    assert set(report["families"]) == {"separable", "joint"}
    for family in report["families"].values():
        est = family["estimates"]
        assert len(est) == 8 and all(len(v) == 5 * report["config"]["iters_per_level"] for v in est.values())
        assert all(math.isfinite(x) for v in est.values() for x in v)
        # Whatever the critic: CPC at alpha = 1 never exceeds log m; ML-CPC never exceeds log(m / alpha).
        assert max(est["cpc alpha=1"]) <= math.log(n) + 1e-4
        ml_cpc = {name: alpha for name, alpha in family["alphas"].items() if name.startswith("ml_cpc")}
        assert len(ml_cpc) == 4  # one per alpha of the figure: the loop below cannot check nothing
        for name, alpha in ml_cpc.items():
            assert max(est[name]) <= math.log(n / alpha) + 1e-4
    png = tmp_path / "mi_estimation.png"
    if importlib.util.find_spec("matplotlib") is None:  # an optional extra: the tool says so and writes no PNG
        assert not png.exists() and "matplotlib is not installed" in capsys.readouterr().out
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_quick_does_not_hide_a_bad_iters(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as exit_info:  # --quick used to replace it with 100, silently
        load_tool("mi_estimation").main(["--quick", "--iters", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "argument --iters: must be >= 2, got 0" in capsys.readouterr().err
    for flag, value, says in (("--batch", str(10**8), "argument --batch: must be between 2 and 8192"),  # was killed
                              ("--seed", str(10**23), "argument --seed: must be between 0 and 4294967295"),
                              ("--critics", "joint,joint", "argument --critics: 'joint' is given twice"),
                              ("--critics", "separable,bilinear", "argument --critics: unknown 'bilinear'"),
                              ("--alphas", "1,0", "argument --alphas: must be "),
                              ("--alphas", "0.1,0.1", "argument --alphas: '0.1' is given twice"),
                              ("--alphas", "1,17", "argument --alphas: 17 above m = n = 16"),
                              ("--separable-layers", "0", "argument --separable-layers: must be between 1 and 16")):
        with pytest.raises(SystemExit) as exit_info:
            load_tool("mi_estimation").main(["--quick", flag, value, "--out", str(tmp_path)])
        assert exit_info.value.code == 2 and says in capsys.readouterr().err, flag


def test_an_out_that_is_a_file_is_refused_before_the_training(tmp_path, capsys):
    import pytest

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        load_tool("mi_estimation").main(["--quick", "--no-compile", "--out", str(tmp_path / "a_file")])
    assert exit_info.value.code == 2 and "is a file, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("stop", ["ctrl-c", "SIGTERM"])
def test_a_stopped_run_says_so_in_one_line(tmp_path, monkeypatch, capsys, stop):
    """Ctrl-C, or a `kill` mid-training: one line and the shell's status for it, not a traceback or silence."""
    tool = load_tool("mi_estimation")

    def stopped(*args, **kwargs):
        if stop == "ctrl-c":
            raise KeyboardInterrupt
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(tool, "run_family", stopped)
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--quick", "--no-compile", "--out", str(tmp_path / "out")])
    said = capsys.readouterr().err
    code, first = (130, "interrupted;") if stop == "ctrl-c" else (128 + signal.SIGTERM, "interrupted by SIGTERM;")
    assert exit_info.value.code == code and said.startswith(first) and "run the command again" in said, said
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not (tmp_path / "out" / "mi_estimation.json").exists()


def test_the_seed_makes_a_run_repeatable(one_thread):
    """The same --seed, the same estimates: the critics' initial weights come from it too, not only the data."""
    import pytest
    import torch

    from fastssl.mi_estimation import run_family

    runs = []
    for _ in range(2):
        torch.manual_seed(torch.seed())  # whatever the global generator held before
        runs.append(run_family("separable", iters_per_level=2, n=16, seed=7, compile_critics=False)["estimates"])
    assert runs[0] == runs[1]
    other = run_family("separable", iters_per_level=2, n=16, seed=8, compile_critics=False)["estimates"]
    assert other != runs[0]
    with pytest.raises(ValueError, match="unknown critic family 'joints'"):
        run_family("joints", iters_per_level=1, n=16, seed=7, compile_critics=False)


def test_the_alphas_and_the_separable_depth_are_the_runs_to_choose(one_thread):
    """The paper's figure goes down to alpha 1e-4, and the authors' separable MLPs are likely deeper than ours."""
    import torch

    from fastssl.mi_estimation import SeparableCritics, run_family

    result = run_family("separable", iters_per_level=2, n=16, seed=7, compile_critics=False,
                        alphas=["0.0001", "alpha_min"], separable_layers=3)
    assert list(result["estimates"]) == ["cpc alpha=0.0001", "cpc alpha=alpha_min", "ml_cpc alpha=0.0001",
                                         "ml_cpc alpha=alpha_min"]
    assert result["alphas"]["ml_cpc alpha=0.0001"] == 0.0001
    hidden = [m for m in SeparableCritics(2, layers=3).f if isinstance(m, torch.nn.ReLU)]
    assert len(hidden) == 3
