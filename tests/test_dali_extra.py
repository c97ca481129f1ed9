"""tools/dali_extra.py: which DALI build (`make setup`'s selection step) for which torch.

Pure functions and the script's command line (with a fake torch), never pip: `make setup` itself
runs in CI's fresh clones.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, load_tool

sel = load_tool("dali_extra")


@pytest.mark.parametrize("torch_cuda,expected", [("13.0", "13"), ("13.2", "13"), ("12.8", "12"), ("12.4", "12"),
                                                 (None, "12"), ("", "12"), ("11.8", "12"), ("14.0", "12")])
def test_dali_build_follows_torchs_cuda_major(torch_cuda, expected):
    """CUDA 13 torch -> CUDA 13 DALI; CPU-only or a major without a DALI extra -> the default (12)."""
    assert sel.dali_cuda_for(torch_cuda) == expected


def test_extras_are_rewritten_for_the_build():
    assert sel.select_extras("all", "13") == "all-cuda13"
    assert sel.select_extras("dali,test", "13") == "dali-cuda13,test"
    assert sel.select_extras("all", "12") == "all"
    assert sel.select_extras("test,plots", "13") == "test,plots"  # no DALI asked for: nothing changes
    # a CUDA 13 name given by the user wins over auto; a choice by hand rewrites it
    assert sel.select_extras("dali,all-cuda13", "12") == "dali-cuda13,all-cuda13"
    assert sel.select_extras("all-cuda13", "12", explicit=True) == "all"


def test_the_other_build_is_removed_only_when_dali_is_installed_anew():
    both = ["nvidia-dali-cuda120", "nvidia-dali-cuda130"]
    assert sel.to_remove("all-cuda13", both) == ["nvidia-dali-cuda120"]
    assert sel.to_remove("dali,test", both) == ["nvidia-dali-cuda130"]
    assert sel.to_remove("all-cuda13", ["nvidia-dali-cuda130"]) == []
    assert sel.to_remove("test", both) == []  # these extras bring no DALI: leave what is there


def test_every_extra_the_script_names_exists_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for cuda in ("12", "13"):
        for name in sel.select_extras("all,dali", cuda, explicit=True).split(","):
            assert name in extras, name
    assert extras["dali"] == [f"{sel.DALI_DIST['12']}>=2.4,<3"]  # the design's default stays CUDA 12
    assert extras["dali-cuda13"] == [f"{sel.DALI_DIST['13']}>=2.4,<3"]
    assert extras["all-cuda13"] == [extras["all"][0].replace("[dali,", "[dali-cuda13,")]


def run_script(tmp_path, torch_cuda, *args):
    """The script in a fresh interpreter whose `torch` is a stub reporting CUDA `torch_cuda`."""
    (tmp_path / "torch").mkdir(exist_ok=True)
    (tmp_path / "torch" / "__init__.py").write_text(f"class version:\n    cuda = {torch_cuda!r}\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    return subprocess.run([sys.executable, str(REPO / "tools" / "dali_extra.py"), *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("torch_cuda,args,expected", [("13.0", ["all"], "all-cuda13"), (None, ["all"], "all"),
                                                      ("12.8", ["all"], "all"),
                                                      ("13.0", ["--cuda", "12", "all"], "all"),
                                                      (None, ["--cuda", "13", "dali,test"], "dali-cuda13,test")])
def test_the_command_line_prints_the_extras(tmp_path, torch_cuda, args, expected):
    out = run_script(tmp_path, torch_cuda, *args)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected  # stdout is only the extras: the Makefile installs them
    assert "DALI's CUDA" in out.stderr


def test_a_bad_choice_is_refused_in_one_line(tmp_path):
    out = run_script(tmp_path, "13.0", "--cuda", "11", "all")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: DALI_CUDA") and len(out.stderr.strip().splitlines()) == 1


def test_an_extra_pyproject_does_not_declare_is_refused_in_one_line(tmp_path):
    """pip itself only warns about an unknown extra, then installs without it."""
    pytest.importorskip("tomllib")
    out = run_script(tmp_path, None, "all,tset")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: EXTRAS names tset, which pyproject.toml does not declare; choose from ")
    assert "all-cuda13" in out.stderr and len(out.stderr.strip().splitlines()) == 1
