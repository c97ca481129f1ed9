"""Two "nodes" on localhost: README's multi-node command, run for real, logs what one node logs.

Each node is its own `accelerate launch --num_machines 2 --machine_rank $NODE_RANK --main_process_ip
127.0.0.1 --main_process_port $MAIN_PORT` (the command README.md gives for several nodes), with one
CPU process over gloo; together they must train exactly as one node with two processes does
(same seed, same data order, same global batch), so every logged loss is equal.

The launchers run concurrently with a hard deadline, each in its own session, so a rank that
waits forever for its peer (a rendezvous or a collective nobody joins) is killed with its
whole process group instead of hanging the suite.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_image_folder, requires_ffcv
from dist_utils import RECORD_THE_GROUP, free_port, tiny_synthetic_recipe

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 240  # a run takes ~25 s on 2 loaded cores

# README.md's multi-node command, as the test runs it (N = 2 machines, 1 process each, on CPU).
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]

SCRIPT = tiny_synthetic_recipe(epochs=1, before=RECORD_THE_GROUP)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    """One launcher in its own session (so its workers can be killed with it)."""
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([*LAUNCH, *args], cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, Path]) -> None:
    """Every launcher exits 0 before the deadline; otherwise all are killed and the logs shown."""
    deadline = time.monotonic() + DEADLINE_S
    try:
        while any(p.poll() is None for p in procs.values()):
            failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        pending = [n for n, p in procs.items() if p.poll() is None]
        for p in procs.values():
            if p.poll() is None:
                kill_group(p)
    bad = {n: p.returncode for n, p in procs.items() if p.returncode != 0}
    if bad:
        shown = "\n".join(f"--- {n} ---\n{logs[n].read_text()[-3000:]}" for n in procs)
        pytest.fail(f"launchers failed or hung ({bad}; still running at the deadline: {pending}):\n{shown}")


@pytest.mark.slow
def test_two_nodes_log_the_losses_of_one_node_with_two_processes(tmp_path):
    script = tmp_path / "train_tiny.py"
    script.write_text(SCRIPT)
    two, one = tmp_path / "two_nodes", tmp_path / "one_node"
    two.mkdir(), one.mkdir()
    port = free_port()
    procs, logs = {}, {}
    for rank in (0, 1):  # README: the same command on each node, only --machine_rank differs
        logs[f"node{rank}"] = tmp_path / f"node{rank}.log"
        procs[f"node{rank}"] = start(["--num_processes", "2", "--num_machines", "2", "--machine_rank", str(rank),
                                      "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                                      str(script), "--train.run_dir", str(two / "run")],
                                     two, logs[f"node{rank}"])
    logs["one"] = tmp_path / "one.log"
    procs["one"] = start(["--num_processes", "2", "--num_machines", "1", "--main_process_port", str(free_port()),
                          str(script), "--train.run_dir", str(one / "run")], one, logs["one"])
    wait_all(procs, logs)

    # two nodes really: global ranks 0 and 1, each the only process (local rank 0) of its node
    ranks = [json.loads((two / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["world"], r["RANK"], r["LOCAL_RANK"], r["GROUP_RANK"]) for r in ranks] == [
        (2, "0", "0", "0"), (2, "1", "0", "1")]
    assert [json.loads((one / f"rank{r}.json").read_text())["GROUP_RANK"] for r in (0, 1)] == ["0", "0"]

    # 32 images, global batch 8: 4 steps, each logged
    got, ref = read_csv(two / "run" / "train_log.csv"), read_csv(one / "run" / "train_log.csv")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == ["1", "2", "3", "4"]
    assert [float(r["loss"]) for r in got] == pytest.approx([float(r["loss"]) for r in ref], rel=1e-6)
    assert len({r["loss"] for r in got}) > 1  # a real run, not a constant
    got_epoch, ref_epoch = read_csv(two / "run" / "epochs.csv"), read_csv(one / "run" / "epochs.csv")
    assert float(got_epoch[0]["loss"]) == pytest.approx(float(ref_epoch[0]["loss"]), rel=1e-6)
    assert (two / "run" / "rng" / "rank1.pt").is_file()  # the second node's rank wrote its RNG state


def test_loader_workers_share_a_nodes_cores_among_its_own_processes(monkeypatch):
    """`data.num_workers -1` on 8 nodes of 8 GPUs: a node's 64 cores go to its 8 processes, not to all 64."""
    from pipelines.cores import default_num_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # what the launcher sets on every node
    assert default_num_workers(-1, num_processes=64) == 8
    assert default_num_workers(3, num_processes=64) == 3  # asked for: kept
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # no launcher: the run's processes are all here
    assert default_num_workers(-1, num_processes=4) == 16


@requires_ffcv
def test_what_counts_cores_counts_the_jobs_not_the_machines(monkeypatch, tmp_path):
    """A SLURM job (a container, `taskset`) given 3 of a node's 64 cores: the converter's processes, the demo
    generator's, the loaders' share and the core count a report gives are 3, not 64 (a pool sized by the
    machine would put 64 processes on the job's 3 cores)."""
    import torch

    import pipelines.beton_convert as beton_convert
    from fastssl.reports.environment import describe_environment
    from pipelines import demo_data
    from pipelines.beton_convert import ConversionError, convert
    from pipelines.cores import default_num_workers, usable_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert usable_cores() == 3 and default_num_workers(-1, num_processes=1) == 3
    assert demo_data._default_workers() == 3
    assert describe_environment(torch.device("cpu"))["cpu_cores"] == 3
    asked = []

    def count_and_stop(partial, fields, dataset, num_workers, **kwargs):
        asked.append(num_workers)
        raise RuntimeError("stopped by the test before any worker starts")

    monkeypatch.setattr(beton_convert, "write_beton", count_and_stop)
    make_image_folder(tmp_path / "images", num_classes=2, per_class=4)
    with pytest.raises(ConversionError, match="stopped by the test"):  # --num-workers 0: the default
        convert(tmp_path / "images", tmp_path / "out.beton", num_workers=0, progress=False)
    assert asked == [3]


def test_dali_threads_for_num_workers_0_are_a_share_of_the_nodes_cores(monkeypatch):
    """`--data.num_workers 0` with DALI ("as many threads as cores"): this process's share of the cores the job
    may use, not every core of the node in each of its 8 processes."""
    import torch

    from pipelines.images import placement

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 256)  # the node's; the job may use 64 of them
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert placement(torch.device("cpu"), 0) == ("cpu", None, 8)
    assert placement(torch.device("cpu"), 5)[2] == 5
