"""Shared fixtures: tiny image folders made on the fly (no downloads)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


# The suite's torch runs on one intra-op thread, and so does every process that imports this file (the
# training scripts the tests start import it through test_engine): on a 2-core CI box the tests' loader
# workers and process pairs take the cores, and OpenMP threads contending with them made elementwise ops
# on ~40k-element tensors 100x slower (a 2-worker training subprocess ran 3x slower on 2 threads).
torch.set_num_threads(1)
# The loaders' colour jitter on a CPU runs inductor's build of `jitter_step` (pipelines/device_augment.py),
# which a cold cache builds in about 30 s per process and session: the suite runs the eager step it is
# built from (processes started by the tests too), and test_device_augment holds the build to it.
os.environ.setdefault("FASTSSL_EAGER_AUGMENT", "1")


def _installed(module: str) -> bool:
    """Whether `module` is installed, found without importing it. Every process that imports this
    file pays for what it imports here: the two-process tests' children (spawned, they import the
    test module and so this file) and the training scripts the tests start. Importing FFCV (its
    numba dictionary compiles) and DALI cost each of them about 3.5 s on 2 cores. A package that
    is installed but cannot be imported fails its tests instead of skipping them."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package that is missing
        return False


requires_dali = pytest.mark.skipif(not _installed("nvidia.dali"), reason="DALI is not installed ([dali] extra)")
requires_ffcv = pytest.mark.skipif(not _installed("ffcv"), reason="FFCV is not installed ([ffcv] extra)")
# Backends that read a JPEG folder; each test parametrised over them runs once per backend.
FILE_BACKENDS = ["torchvision", pytest.param("dali", marks=requires_dali), pytest.param("ffcv", marks=requires_ffcv)]
REPO = Path(__file__).resolve().parents[1]


# The suite's peak use of the temporary folder, measured with pyproject's tmp_path retention
# ("failed"): 1.7 GB (the gpu_check dry run's 0.7 GB beside the module-scoped run directories).
SUITE_PEAK_GIB = 2.0


def temporary_space() -> tuple[str, bool]:
    """A line on the temporary folder's free space, and whether that is enough for the suite."""
    tmp = Path(tempfile.gettempdir())
    free = shutil.disk_usage(tmp).free / 2**30
    enough = free >= SUITE_PEAK_GIB
    verdict = "" if enough else "; NOT ENOUGH: free space there or point TMPDIR at a larger disk"
    return f"temporary files: {tmp}, {free:,.1f} GiB free (the suite needs about {SUITE_PEAK_GIB} GiB){verdict}", enough


def pytest_report_header(config) -> str:
    return temporary_space()[0]


def pytest_sessionstart(session) -> None:
    """Say so first thing, even under -q, when the disk is short: a disk that fills mid-suite fails tests far
    from the cause (a checkpoint refused as "disk full" in an unrelated test)."""
    line, enough = temporary_space()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not enough and reporter is not None:
        reporter.write_line(line, yellow=True, bold=True)


def load_tool(name: str):
    """Import tools/<name>.py as a module (tools/ is a folder of scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def load_recipe(name: str):
    """The Config that recipes/<name>.py builds (recipes are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.config()


def data_path(backend: str, folder: Path, write_mode: str = "raw") -> str:
    """What `backend` reads for this image folder: the folder, or a `.beton` converted from it
    (raw pixels by default, so that probe images reach the crops unchanged)."""
    if backend != "ffcv":
        return str(folder)
    out = folder.parent / f"{folder.name}-{write_mode}.beton"
    if not out.exists():
        from pipelines.beton_convert import convert

        convert(folder, out, write_mode=write_mode, num_workers=1, progress=False)
    return str(out)


def index_colour(i: int) -> tuple[int, int, int]:
    """A colour that encodes an integer < 4096 in steps of 16 per channel (robust to JPEG)."""
    return (16 * (i % 16) + 8, 16 * ((i // 16) % 16) + 8, 16 * ((i // 256) % 16) + 8)


def decode_index(rgb) -> int:
    r, g, b = (int(round((c - 8) / 16)) for c in rgb)
    return r + 16 * g + 256 * b


def make_image_folder(root: Path, num_classes: int = 3, per_class: int = 6, size: int = 40) -> list[Path]:
    """ImageNet layout of uniformly coloured JPEGs; image k (global order) has colour index_colour(k)."""
    paths, k = [], 0
    for c in range(num_classes):
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            path = folder / f"img_{j:03d}.JPEG"
            Image.fromarray(np.full((size, size + 7, 3), index_colour(k), np.uint8)).save(path, quality=95)
            paths.append(path)
            k += 1
    return paths


@pytest.fixture(scope="session", autouse=True)
def started_processes_keep_their_temporary_files_in_the_session(tmp_path_factory):
    """The processes the tests start write their temporary files under this session's folder, which pytest
    deletes when every test passed (pyproject's tmp_path_retention_policy). Processes that end without
    Python's exit handlers (killed on purpose, or the two-process tests' `os._exit`) left DALI's
    `__autograph_generated_file*.py`, torchrun's `torchelastic_*` and multiprocessing's `pymp-*` folders
    in /tmp: about 40 at every run. This process's own temporary folder is unchanged (it was read first)."""
    folder = tmp_path_factory.mktemp("tmp", numbered=False)
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before


@pytest.fixture(autouse=True)
def torch_globals_restored():
    """Every test starts from torch's default generator seeded 0 (a test that fails in the suite fails
    alone too, whatever ran before it) and leaves the process-wide settings as it found them: cuDNN's
    autotuner flag (the loop sets it) and the intra-op thread count (the suite's one thread)."""
    benchmark, threads = torch.backends.cudnn.benchmark, torch.get_num_threads()
    torch.manual_seed(0)
    yield
    torch.backends.cudnn.benchmark = benchmark
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """A math test's statement that it needs one intra-op thread (the whole suite runs on one already,
    set where this file is imported), so that it keeps it if the suite's default changes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    make_image_folder(root)
    return root


# --------------------------------------------------------------------------- process trees


def descendants(pid: int) -> dict[int, int]:
    """Every living process below `pid` (from /proc), mapped to its parent's PID."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    found: dict[int, int] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                found[child] = ppid
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` that still run (zombies count as gone: they hold nothing)."""
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            living.add(pid)
    return living


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a test's child `proc` (a subprocess.Popen started in its own session), everything below
    it and its process group: nothing it started is left holding a pipe the test reads, or the
    machine's cores. Processes that started a session of their own (torchrun's trainers) are found
    through /proc, while `proc` runs; once it has been reaped its PID may name another process, and
    only its group is killed (Linux reuses no PID that is still a group's ID)."""
    if proc.poll() is None:
        for victim in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(victim, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
