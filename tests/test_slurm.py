"""SLURM: the stop before the time limit (SIGUSR1), the requeue, and `--resume auto`, on CPU.

A SLURM job is here: tools/slurm/requeue.sh's `run_requeueable` around tools/slurm/node_launch.sh
(the job step `srun` would start on each node) with a stub `scontrol` that records the requeue;
the test sends SIGUSR1 to the batch shell as `#SBATCH --signal=B:USR1@<s>` does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fastssl.cli import parse
from fastssl.config import Config, ConfigError
from fastssl.relaunch import rerun_command

from conftest import kill_tree
from dist_utils import free_port, tiny_synthetic_recipe

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "tools" / "slurm"
BATCH_SCRIPTS = sorted(SLURM.glob("*.sbatch"))
TIMEOUT_S = 240  # per training subprocess; each takes 10-30 s on 2 loaded cores

TINY = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_engine import tiny_config
    from fastssl.cli import run
    cfg = tiny_config(Path({tmp!r}), epochs=3)
    cfg.eval.knn_every, cfg.eval.knn_at_start = -1, False
    run(cfg, sys.argv[1:])
""")

SYNTHETIC = tiny_synthetic_recipe(epochs=3)


def read_steps(run: Path) -> list[int]:
    lines = (run / "train_log.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[1]) for line in lines]


def wait_for_rows(proc: subprocess.Popen, run: Path, rows: int) -> None:
    """Until the run has logged `rows` steps (its training loop is running)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(read_steps(run)) >= rows:
                return
        except (FileNotFoundError, IndexError, ValueError):
            pass
        time.sleep(0.05)
    code = proc.poll()
    pytest.fail(f"the run logged no {rows} steps (exit {code}): {killed_output(proc)[-3000:]}")


def finish(proc: subprocess.Popen) -> str:
    """Its output, after it ended; killed with its whole session past the timeout."""
    try:
        return proc.communicate(timeout=TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {TIMEOUT_S} s:\n{killed_output(proc)[-3000:]}")


def killed_output(proc: subprocess.Popen) -> str:
    """Its output so far, after killing its whole session (the batch shell, the launcher, the trainers:
    a trainer left alive would hold the pipe, and reading it would wait for good)."""
    kill_tree(proc)
    try:
        return proc.communicate(timeout=30)[0]
    except subprocess.TimeoutExpired:
        return "(no output: a process outside the session still holds the pipe)"


def popen(cmd: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


# --- the command line -------------------------------------------------------------------------------------------

def test_resume_flag_parses_auto_and_refuses_other_values():
    assert parse(Config(), ["--resume", "auto", "--train.seed", "3"])[1]["resume"] == "auto"
    assert parse(Config(), ["--resume=auto"])[1]["resume"] == "auto"
    cfg, flags = parse(Config(), ["--resume", "--train.seed", "3"])
    assert flags["resume"] is True and cfg.train.seed == 3
    assert parse(Config(), [])[1]["resume"] is False
    with pytest.raises(ConfigError, match="--resume takes no value or 'auto'"):
        parse(Config(), ["--resume", "yes"])
    for typo, meant in (("--resum", "--resume"), ("--print-configg", "--print-config"), ("--hepl", "--help")):
        with pytest.raises(ConfigError, match=f"^unknown flag {typo}; did you mean {meant}\\?$"):
            parse(Config(), ["--train.seed", "3", typo])
    with pytest.raises(ConfigError, match=r"^--resume=yes: --resume takes no value \(or --resume auto\)$"):
        parse(Config(), ["--resume=yes"])
    with pytest.raises(ConfigError, match="^--print-config=1: --print-config takes no value$"):
        parse(Config(), ["--print-config=1"])
    with pytest.raises(ConfigError, match="--data.train"):  # a field's name without its section: the field's hint
        parse(Config(), ["--train", "/x"])
    # the printed continue-command replaces `--resume auto` by --resume, not "auto --resume"
    cmd = rerun_command(["python", "r.py", "--resume", "auto", "--train.seed", "3"], Path("/runs/x"))
    assert cmd == "python r.py --train.seed 3 --resume --train.run_dir /runs/x"


def test_a_stop_signal_echoed_by_the_launcher_is_ignored_and_one_sent_later_is_not(monkeypatch):
    """Under SLURM and after a Ctrl-C, a worker gets SIGTERM/SIGINT twice, directly and forwarded by
    torchrun: the echo must not kill it before its checkpoint. The same signal sent again after
    the window is the user meaning it: the earlier behaviour (SIGINT: KeyboardInterrupt). The stop's
    clock is the test's, so a loaded machine's pauses cannot move a signal across the window."""
    from types import SimpleNamespace

    import fastssl.runtime as runtime
    from fastssl.runtime import GracefulStop

    now = [100.0]
    monkeypatch.setattr(runtime, "time", SimpleNamespace(monotonic=lambda: now[0]))
    stop = GracefulStop()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the launcher's copy
        time.sleep(0.1)  # the handler runs between bytecodes
        assert stop.requested and stop.signal_name == "SIGINT"
        now[0] += stop.REPEAT_WINDOW_S + 1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs between bytecodes
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_auto_starts_an_empty_run_dir_afresh_then_continues_it(tmp_path, capsys):
    from fastssl.cli import run
    from test_engine import read_csv, tiny_config

    cfg = tiny_config(tmp_path, epochs=1)
    cfg.eval.knn_every, cfg.eval.knn_at_start = -1, False
    run_dir = tmp_path / "run"
    run(cfg, ["--resume", "auto", "--train.run_dir", str(run_dir)])  # nothing there: a fresh start
    assert "--resume auto: no checkpoint, starting the run" in capsys.readouterr().out
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]["step"] == 3
    # the same command again (a requeue after the end): continues, refuses nothing, logs nothing twice
    before = (run_dir / "checkpoint.pt").stat().st_mtime_ns
    run(cfg, ["--resume", "auto", "--train.run_dir", str(run_dir)])
    assert "--resume auto: continuing from step 3" in capsys.readouterr().out
    assert [int(r["step"]) for r in read_csv(run_dir / "train_log.csv")] == [1, 2, 3]
    assert (run_dir / "checkpoint.pt").stat().st_mtime_ns == before  # nothing left to train, nothing rewritten


# --- the signal on a training process ---------------------------------------------------------------------------

@pytest.mark.slow
def test_sigusr1_checkpoints_exits_138_and_resume_auto_finishes(tmp_path):
    script, run = tmp_path / "tiny.py", tmp_path / "run"
    script.write_text(TINY.format(tests=str(REPO / "tests"), tmp=str(tmp_path)))
    cmd = [sys.executable, str(script), "--resume", "auto", "--train.run_dir", str(run)]
    proc = popen(cmd, tmp_path)
    wait_for_rows(proc, run, 2)
    proc.send_signal(signal.SIGUSR1)
    out = finish(proc)
    assert proc.returncode == 138, out  # 128 + SIGUSR1, after the checkpoint
    assert "--resume auto: no checkpoint, starting the run" in out
    assert "stopped by SIGUSR1 at epoch" in out and f"--resume --train.run_dir {run}" in out
    stopped = torch.load(run / "checkpoint.pt", weights_only=False)["state"]["step"]
    assert 2 <= stopped < 9
    assert json.loads((run / "results.json").read_text())["interrupted"] == "SIGUSR1"
    assert read_steps(run) == list(range(1, stopped + 1))

    again = popen(cmd, tmp_path)  # the very same command continues
    out = finish(again)
    assert again.returncode == 0, out
    assert f"--resume auto: continuing from step {stopped}" in out
    assert read_steps(run) == list(range(1, 10))  # 24 images / 8 = 3 steps x 3 epochs, each logged once
    assert torch.load(run / "checkpoint.pt", weights_only=False)["state"]["step"] == 9
    assert "interrupted" not in json.loads((run / "results.json").read_text())


def test_the_time_limit_warning_during_set_up_ends_in_a_checkpoint(tmp_path):
    """SIGUSR1 while the data is listed: not the signal's default action (death, no checkpoint, so
    requeue.sh would not requeue the job), but a checkpoint at the loop's first step and exit 138;
    the k-NN of the initial network is skipped (on ImageNet it can outlast the warning)."""
    script, run = tmp_path / "tiny.py", tmp_path / "run"
    script.write_text(textwrap.dedent("""
        import os, signal
        from fastssl import engine
        real = engine.build_loader

        def build_loader(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning, while set-up lists the data
            return real(*args, **kwargs)

        engine.build_loader = build_loader
    """) + TINY.format(tests=str(REPO / "tests"), tmp=str(tmp_path)))
    proc = popen([sys.executable, str(script), "--resume", "auto", "--train.run_dir", str(run),
                  "--eval.knn_at_start", "true", "--eval.knn_every", "3"], tmp_path)
    out = finish(proc)
    assert proc.returncode == 138, out
    assert "stopped by SIGUSR1 at epoch 0 step 1" in out, out
    assert "randomly initialised" not in out and "knn_random_init" not in json.loads((run / "results.json").read_text())
    assert torch.load(run / "checkpoint.pt", weights_only=False)["state"]["step"] == 1
    assert read_steps(run) == [1]


# --- the batch scripts ------------------------------------------------------------------------------------------

def test_batch_scripts_parse_and_ask_for_the_signal_and_the_requeue():
    assert {p.name for p in BATCH_SCRIPTS} == {"mira_bs512_1node.sbatch", "mira_multinode.sbatch"}
    for path in [*BATCH_SCRIPTS, SLURM / "node_launch.sh", SLURM / "requeue.sh"]:
        check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"{path.name}: {check.stderr}"
    for path in BATCH_SCRIPTS:
        text = path.read_text()
        lead = int(re.search(r"^#SBATCH --signal=B:USR1@(\d+)$", text, re.M).group(1))
        grace = int(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", text).group(1))
        assert grace + 60 <= lead, path.name  # the launcher gives up before SLURM's limit (signal +-60 s)
        assert re.search(r"^#SBATCH --requeue$", text, re.M) and "--open-mode=append" in text
        assert "srun --ntasks-per-node=1" in text and "tools/slurm/node_launch.sh" in text
        assert '--train.run_dir "$RUN_DIR" --resume auto' in text
        assert text.index('refuse_run_dir_override "$@"') < text.index("run_requeueable")
    assert "recipes/mira_bs512.py" in (SLURM / "mira_bs512_1node.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=8" in (SLURM / "mira_bs512_1node.sbatch").read_text()


def readme_multinode_command() -> str:
    """README's command for several nodes, with its shell variables (set on the line before it) as written."""
    block = re.search(r"```bash\n[A-Z_]+=[^\n]*\n(accelerate launch [^`]*--num_machines[^`]*)```",
                      (REPO / "README.md").read_text())
    return " ".join(block.group(1).replace("\\\n", " ").split())


def dry_run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SLURM / "node_launch.sh"), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "FASTSSL_SLURM_DRY_RUN": "1", **env})


def test_node_launcher_runs_readmes_multinode_command():
    recipe_args = ["recipes/mira_bs512.py", "--data.train", "/data/imagenet/train", "--data.val",
                   "/data/imagenet/val", "--train.run_dir", "/shared/runs/mira_bs512"]
    out = dry_run(*recipe_args, SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1", MASTER_ADDR="node0",
                  MASTER_PORT="23456", GPUS_PER_NODE="8")
    assert out.returncode == 0, out.stderr
    readme = readme_multinode_command()
    ours = f"--config_file {SLURM / 'accelerate.yaml'}"  # found beside the script, from any directory
    for variable, value in (("$NODE_RANK", "1"), ("$MAIN_ADDR", "node0"), ("$MAIN_PORT", "23456"),
                            ("--config_file tools/slurm/accelerate.yaml", ours)):
        assert variable in readme
        readme = readme.replace(variable, value)
    assert out.stdout.strip() == readme
    one = dry_run("recipes/mira_bs512.py", SLURM_JOB_NUM_NODES="1", MASTER_PORT="23456")
    assert one.stdout.split() == ["accelerate", "launch", *ours.split(), "--multi_gpu", "--num_processes", "8",
                                  "--num_machines", "1", "--main_process_port", "23456", "recipes/mira_bs512.py"]
    spaced = dry_run("recipes/mira_bs512.py", "--data.train", "/data/my images/train", SLURM_JOB_NUM_NODES="1")
    assert spaced.stdout.rstrip().endswith(r"--data.train /data/my\ images/train"), spaced.stdout
    on_four = dry_run("recipes/mira_bs512.py", SLURM_GPUS_ON_NODE="4", GPUS_PER_NODE="")  # sbatch --gpus-per-node 4
    assert "--num_processes 4 " in on_four.stdout
    none = dry_run()
    assert none.returncode == 2 and none.stderr.startswith("error: no recipe given")


USERS_OWN_ACCELERATE_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
mixed_precision: fp16
gpu_ids: 0,1
num_machines: 2
num_processes: 8
machine_rank: 0
main_process_ip: 10.0.0.1
main_process_port: 1234
same_network: true
dynamo_config:
  dynamo_backend: INDUCTOR
use_cpu: false
"""


def test_the_node_launcher_ignores_the_users_own_accelerate_config(tmp_path):
    """`accelerate config` made for another project (2 machines, GPUs 0 and 1, a dynamo backend):
    read by `accelerate launch` for every flag not given, it would make a one-node job wait for a
    second node that never comes, hide GPUs from some processes and compile the model."""
    (tmp_path / "hf" / "accelerate").mkdir(parents=True)
    (tmp_path / "hf" / "accelerate" / "default_config.yaml").write_text(USERS_OWN_ACCELERATE_CONFIG)
    probe = tmp_path / "probe.py"
    probe.write_text("import json, os\nos.write(1, ('probe ' + json.dumps({k: os.environ.get(k) for k in ("
                     "'WORLD_SIZE', 'CUDA_VISIBLE_DEVICES', 'ACCELERATE_DYNAMO_BACKEND')}) + '\\n').encode())\n")
    # one write per process: the two processes share the pipe, and print's pieces interleave
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(HF_HOME=str(tmp_path / "hf"), ACCELERATE_USE_CPU="true", SLURM_JOB_NUM_NODES="1", GPUS_PER_NODE="2",
               MASTER_PORT=str(free_port()), LAUNCH=f"{sys.executable} -m accelerate.commands.launch")
    done = subprocess.run(["bash", str(SLURM / "node_launch.sh"), str(probe)], capture_output=True, text=True,
                          timeout=90, env=env, cwd=tmp_path)
    rows = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("probe ")]
    assert done.returncode == 0 and len(rows) == 2, done.stdout + done.stderr
    assert all(r == {"WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": None, "ACCELERATE_DYNAMO_BACKEND": "NO"}
               for r in rows), rows


def shell(tmp_path: Path, step: str, run_dir: Path) -> list[str]:
    """A batch shell as the sbatch scripts run it: requeue.sh around `step`, with a stub scontrol."""
    stub = tmp_path / "scontrol"
    stub.write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path / 'scontrol.calls'}\n")
    stub.chmod(0o755)
    body = f"set -euo pipefail\nsource {SLURM / 'requeue.sh'}\nrun_requeueable {run_dir} {step}\n"
    return ["bash", "-c", body]


def signalled_job(tmp_path: Path, step: str, run_dir: Path, env: dict) -> tuple[int, str]:
    """Run the batch shell around `step`, send it SIGUSR1 once the step runs; its status and output."""
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    proc = popen(shell(tmp_path, step, run_dir), tmp_path, **env)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out = finish(proc)
    return proc.returncode, out


def test_requeue_only_after_the_signal_and_a_checkpoint_of_this_job(tmp_path):
    """Steps that end on their own keep their status; a signalled step is requeued only when it saved."""
    env = {"SCONTROL": str(tmp_path / "scontrol"), "SLURM_JOB_ID": "42"}
    calls, run_dir = tmp_path / "scontrol.calls", tmp_path / "run"
    run_dir.mkdir()
    for status in (0, 3):
        done = subprocess.run(shell(tmp_path, f"bash -c 'exit {status}'", run_dir), capture_output=True, text=True,
                              timeout=30, env={**os.environ, **env})
        assert done.returncode == status and f"job step exited with status {status}" in done.stdout
    # signalled; the checkpoint there is an earlier job's: not requeued (it would repeat forever)
    (run_dir / "checkpoint.pt").write_bytes(b"old")
    os.utime(run_dir / "checkpoint.pt", (time.time() - 3600,) * 2)
    code, out = signalled_job(tmp_path, f"bash -c 'touch {tmp_path}/ready; exec sleep 30'", run_dir, env)
    assert code == 128 + signal.SIGUSR1 and "SIGUSR1 (time limit near)" in out, out
    assert "not requeued: the run wrote no checkpoint" in out and not calls.exists()
    # signalled; the step saves and stops (as the loop does): requeued, the job itself ends well
    step = tmp_path / "step.sh"
    step.write_text(f"sleep 30 & trap 'echo new > {run_dir}/checkpoint.pt; kill $!; exit 138' USR1\n"
                    f"touch {tmp_path}/ready\nwait\n")
    code, out = signalled_job(tmp_path, f"bash {step}", run_dir, env)
    assert code == 0 and "job step exited with status 138" in out, out
    assert calls.read_text() == "requeue 42\n"
    # signalled during the run's last moments; it saves and finishes (0): not requeued
    step.write_text(f"sleep 30 & trap 'echo new > {run_dir}/checkpoint.pt; kill $!; exit 0' USR1\n"
                    f"touch {tmp_path}/ready\nwait\n")
    code, out = signalled_job(tmp_path, f"bash {step}", run_dir, env)
    assert code == 0 and "not requeued: the run finished" in out, out
    assert calls.read_text() == "requeue 42\n"
    # signalled, saved, and scontrol refuses the requeue: the job fails, saying how to go on
    step.write_text(f"sleep 30 & trap 'echo new > {run_dir}/checkpoint.pt; kill $!; exit 138' USR1\n"
                    f"touch {tmp_path}/ready\nwait\n")
    refusing = tmp_path / "scontrol_refuses"
    refusing.write_text("#!/bin/bash\necho 'scontrol: error: Job is not requeueable' >&2\nexit 1\n")
    refusing.chmod(0o755)
    code, out = signalled_job(tmp_path, f"bash {step}", run_dir, {**env, "SCONTROL": str(refusing)})
    assert code == 1 and "Job is not requeueable" in out and "submit the same sbatch command again" in out, out


@pytest.mark.parametrize("override", [["--train.run_dir", "/elsewhere"], ["--train.run_dir=/elsewhere"]])
def test_batch_scripts_refuse_a_run_dir_override(override):
    """Requeueing watches RUN_DIR: a --train.run_dir override would run elsewhere and end the requeueing."""
    body = f"source {SLURM / 'requeue.sh'}\nrefuse_run_dir_override \"$@\"\necho went on\n"
    done = subprocess.run(["bash", "-c", body, "sbatch", "--train.seed", "3", *override], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and done.stdout == "" and "as RUN_DIR=... before sbatch" in done.stderr
    fine = subprocess.run(["bash", "-c", body, "sbatch", "--train.seed", "3"], capture_output=True, text=True,
                          timeout=30)
    assert fine.returncode == 0 and fine.stdout == "went on\n"
    timed = subprocess.run(["bash", "-c", body, "sbatch"], capture_output=True, text=True, timeout=30,
                           env={**os.environ, "RUN_DIR": "runs/mira/{time}"})
    assert timed.returncode == 2 and timed.stdout == "" and "names a new folder at every start" in timed.stderr


@pytest.mark.slow
def test_batch_shell_signal_checkpoints_through_the_launcher_and_requeues(tmp_path):
    """The SLURM path on CPU: SIGUSR1 to the batch shell -> launcher (two processes) -> checkpoint ->
    `scontrol requeue`; the requeued job's same command continues with --resume auto and finishes."""
    script, run = tmp_path / "synthetic.py", tmp_path / "run"
    script.write_text(SYNTHETIC)
    step = (f"{SLURM / 'node_launch.sh'} {script} --train.run_dir {run} --resume auto")
    env = {"SCONTROL": str(tmp_path / "scontrol"), "SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "1",
           "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port()), "ACCELERATE_USE_CPU": "true",
           "LAUNCH": f"{sys.executable} -m accelerate.commands.launch", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
    job = popen(shell(tmp_path, step, run), tmp_path, **env)
    wait_for_rows(job, run, 2)
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@<s>` does
    out = finish(job)
    assert job.returncode == 0, out
    assert "stopped by SIGUSR1" in out  # the training processes got it from the launcher
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 42\n"
    stopped = torch.load(run / "checkpoint.pt", weights_only=False)["state"]["step"]
    assert 2 <= stopped < 12 and (run / "rng" / "rank1.pt").is_file()

    requeued = popen(shell(tmp_path, step, run), tmp_path, **{**env, "MASTER_PORT": str(free_port())})
    out = finish(requeued)
    assert requeued.returncode == 0 and "job step exited with status 0" in out, out
    assert f"--resume auto: continuing from step {stopped}" in out
    assert read_steps(run) == list(range(1, 13))  # 32 images / 8 = 4 steps x 3 epochs, each logged once
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 42\n"  # finished: not requeued again
