"""Pick DALI's build (CUDA 12 or CUDA 13) for the installed torch: the selection step of `make setup`.

Why: DALI ships one wheel per CUDA major version (nvidia-dali-cuda120, nvidia-dali-cuda130), and
its GPU decode must load the CUDA libraries of the torch it hands tensors to. pyproject names
the CUDA 12 build `dali` (the design's default) and the CUDA 13 build `dali-cuda13`; `all` and
`all-cuda13` carry one or the other. `make setup` installs the package (torch included) first,
then asks this script which extras to install:

    python tools/dali_extra.py [--cuda auto|12|13] [--remove-other] EXTRAS   ->   prints the extras

`auto` follows `torch.version.cuda` (a CPU-only torch, or a CUDA major without a DALI extra here,
keeps the default, CUDA 12); 12 or 13 choose by hand (`make setup DALI_CUDA=13`).
`--remove-other` uninstalls the other build when it is installed (the two share the
`nvidia.dali` package folder, so they must never be installed together). A name pyproject does
not declare is refused (exit 2): pip would only warn and install without it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

DALI_DIST = {"12": "nvidia-dali-cuda120", "13": "nvidia-dali-cuda130"}
DEFAULT_CUDA = "12"  # the design's default build
CUDA13_NAME = {"dali": "dali-cuda13", "all": "all-cuda13"}  # the generic extras and their CUDA 13 names
GENERIC_NAME = {v: k for k, v in CUDA13_NAME.items()}
CHOICES = ("auto", "12", "13")


def dali_cuda_for(torch_cuda: Optional[str]) -> str:
    """DALI's CUDA major ('12' or '13') for a torch built with CUDA `torch_cuda` ('13.0'; None: CPU-only)."""
    if not torch_cuda:
        return DEFAULT_CUDA
    major = str(torch_cuda).split(".", 1)[0].strip()
    return major if major in DALI_DIST else DEFAULT_CUDA


def select_extras(extras: str, cuda: str, explicit: bool = False) -> str:
    """The comma-separated `extras` with their DALI build set to `cuda` ('12' or '13').

    The generic names (`dali`, `all`) follow `cuda`; a name that already says CUDA 13 makes the
    whole set CUDA 13 unless `explicit` (a choice by hand), which rewrites it instead. Other
    extras pass unchanged.
    """
    names = [e.strip() for e in extras.split(",")]
    if not explicit and set(names) & set(GENERIC_NAME):
        cuda = "13"  # a CUDA 13 name given by the user wins over `auto` (never both builds)
    out = []
    for name in names:
        if not name:
            continue
        if cuda == "13":
            name = CUDA13_NAME.get(name, name)
        elif explicit:
            name = GENERIC_NAME.get(name, name)
        if name not in out:
            out.append(name)
    return ",".join(out)


def dali_build_of(extras: str) -> Optional[str]:
    """'12' or '13': the DALI build the extras install; None when they install no DALI."""
    names = {e.strip() for e in extras.split(",")}
    if names & set(GENERIC_NAME):
        return "13"
    if names & set(CUDA13_NAME):
        return "12"
    return None


def to_remove(extras: str, installed: Iterable[str]) -> list[str]:
    """Installed DALI builds that the extras' build replaces (none if the extras bring no DALI)."""
    build = dali_build_of(extras)
    if build is None:
        return []
    return [dist for cuda, dist in DALI_DIST.items() if cuda != build and dist in set(installed)]


def declared_extras(pyproject: Path = Path(__file__).resolve().parents[1] / "pyproject.toml") -> Optional[set[str]]:
    """The extras pyproject declares; None where it cannot be read (Python < 3.11 has no tomllib),
    and then the names are left for pip to judge."""
    try:
        import tomllib
        return set(tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"])
    except (ImportError, OSError, KeyError, ValueError):
        return None


def torch_cuda_version() -> Optional[str]:
    """`torch.version.cuda` of the installed torch; None for a CPU-only build or no torch."""
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda


def installed_dali() -> list[str]:
    found = []
    for dist in DALI_DIST.values():
        try:
            importlib.metadata.version(dist)
            found.append(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("extras", help="comma-separated extras, e.g. all")
    parser.add_argument("--cuda", default="auto", help="auto (from torch), 12 or 13")
    parser.add_argument("--remove-other", action="store_true",
                        help="uninstall the other DALI build if it is installed")
    args = parser.parse_args(argv)
    choice = args.cuda.strip().lower()
    if choice not in CHOICES:
        print(f"error: DALI_CUDA / --cuda must be one of {', '.join(CHOICES)}, got {args.cuda!r}; "
              f"e.g. make setup DALI_CUDA=13", file=sys.stderr)
        return 2
    declared = declared_extras()
    unknown = sorted({e.strip() for e in args.extras.split(",") if e.strip()} - (declared or set()))
    if declared is not None and unknown:  # pip would only warn, and install without them
        print(f"error: EXTRAS names {', '.join(unknown)}, which pyproject.toml does not declare; choose from "
              f"{', '.join(sorted(declared))}, e.g. make setup EXTRAS=all", file=sys.stderr)
        return 2
    torch_cuda = torch_cuda_version() if choice == "auto" else None
    cuda = dali_cuda_for(torch_cuda) if choice == "auto" else choice
    extras = select_extras(args.extras, cuda, explicit=choice != "auto")
    build = dali_build_of(extras)
    if build is not None:
        why = f"torch's CUDA is {torch_cuda or 'none (CPU-only)'}" if choice == "auto" else "chosen by hand"
        print(f"setup: DALI's CUDA {build} build ({DALI_DIST[build]}): {why}; choose with DALI_CUDA=12|13",
              file=sys.stderr)
    if args.remove_other:
        drop = to_remove(extras, installed_dali())
        if drop:
            print(f"setup: removing {' '.join(drop)} (replaced by {DALI_DIST[build]})", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "--quiet", "-y", *drop], check=True,
                           stdout=sys.stderr)
    print(extras)
    return 0


if __name__ == "__main__":
    sys.exit(main())
