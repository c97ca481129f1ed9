"""The loop end to end on tiny data: outputs, refusals, resume, k-NN, two real processes."""

from __future__ import annotations

import csv
import json
import math
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

from conftest import data_path, make_image_folder, requires_dali, requires_ffcv
from dist_utils import RECORD_THE_GROUP, free_port, tiny_synthetic_recipe
from fastssl.config import Config, ConfigError, to_dict
from fastssl.engine import train

REPO = Path(__file__).resolve().parents[1]


def tiny_config(tmp_path: Path, epochs: int = 2) -> Config:
    train_dir, val_dir = tmp_path / "data" / "train", tmp_path / "data" / "val"
    if not train_dir.exists():
        make_image_folder(train_dir, num_classes=3, per_class=8, size=24)
        make_image_folder(val_dir, num_classes=3, per_class=3, size=24)
    cfg = Config()
    cfg.data.train, cfg.data.val, cfg.data.num_workers = str(train_dir), str(val_dir), 0
    cfg.model.arch, cfg.model.proj_hidden_dim, cfg.model.proj_dim, cfg.model.num_prototypes = "resnet18", 32, 16, 12
    cfg.aug.global_size, cfg.aug.local_size, cfg.aug.num_local = 16, 8, 2
    cfg.train.epochs, cfg.train.global_batch_size, cfg.train.log_every = epochs, 8, 1
    cfg.train.run_dir, cfg.train.progress = str(tmp_path / "run"), False
    cfg.optim.warmup_epochs = 1
    cfg.eval.knn_every, cfg.eval.knn_at_start, cfg.eval.batch_size = 1, True, 16
    return cfg


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_run_writes_every_output(tmp_path, capsys, monkeypatch):
    import pipelines.folder as folder

    cfg = tiny_config(tmp_path)
    listed = []
    walk = folder.walk_files
    monkeypatch.setattr(folder, "walk_files", lambda path: listed.append(str(path)) or walk(path))
    results = train(cfg)
    # The loader and the k-NN's memory bank (the same folder) list it once: a minute or more on network storage
    assert sorted(listed) == sorted({*listed}) and len(listed) == 6, listed  # 3 train + 3 val class folders
    folder.scan_image_folder(cfg.data.train)  # after the run's start, a scan lists anew
    assert len(listed) == 9
    said = capsys.readouterr().out  # what it lists, before listing it (minutes on network storage), then the count
    assert f"listing the training images in {cfg.data.train} ...\ntorchvision: 24 training images, 3 steps per " \
           "epoch of 8 images (1 process) (listed in " in said
    run = Path(cfg.train.run_dir)
    for name in ("config.json", "checkpoint.pt", "backbone_resnet18.pth", "results.json", "train_log.csv",
                 "epochs.csv"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    steps, epochs = read_csv(run / "train_log.csv"), read_csv(run / "epochs.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 7))  # 24 images / 8 = 3 steps x 2 epochs
    assert [int(r["epoch"]) for r in epochs] == [0, 1]
    assert all(0 < float(r["data_wait_share"]) < 1 for r in steps)  # num_workers 0: decoding is waited for
    assert all(r["knn_top1"] != "" for r in epochs)
    assert all(float(r["peak_memory_mb"]) == float(r["device_used_mb"]) == 0 for r in epochs)  # CPU: not tracked
    assert [k["epoch"] for k in results["knn"]] == [1, 2]
    for scores in (results["knn_random_init"], *results["knn"]):  # over the 9 images of 3 classes:
        assert scores["top5"] == 100.0  # every class ranks in the top 5
        assert scores["top1"] * 9 / 100 == pytest.approx(round(scores["top1"] * 9 / 100))  # a count of images
    assert [float(r["knn_top1"]) for r in epochs] == pytest.approx([k["top1"] for k in results["knn"]], rel=1e-5)
    assert json.loads((run / "results.json").read_text()) == json.loads(json.dumps(results))


def test_refuses_to_overwrite_and_checks_resume(tmp_path, capsys):
    cfg = tiny_config(tmp_path, epochs=1)
    cfg.eval.knn_every = -1
    cfg.data.backend = "auto"  # on this CPU: torchvision, recorded as such
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        train(cfg, resume=True)
    train(cfg)
    assert "--data.backend auto: torchvision (no CUDA device" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["backend"] == "torchvision"
    cfg.data.backend = "auto"  # (the run resolved it in place)
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg)
    cfg.data.backend = "auto"  # resolves as the saved run did: not a change
    cfg.optim.momentum = 0.5  # (optim.base_lr may change, with a warning: tests/test_faults.py)
    with pytest.raises(ConfigError, match="optim.momentum") as refused:
        train(cfg, resume=True)
    assert "data.backend" not in str(refused.value)
    # A run directory moved (or restored from a backup) and named with a trailing slash resumes.
    cfg.optim.momentum = Config().optim.momentum
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    cfg.train.run_dir = f"{moved}/"
    record = (moved / "config.json").read_bytes()
    train(cfg, resume=True)  # the run is finished: nothing to do, and its record is left as it was
    assert (moved / "config.json").read_bytes() == record
    # Its checkpoint deleted to save space: a new run there would replace the trained backbone at its first save
    (moved / "checkpoint.pt").unlink()
    weights = (moved / "backbone_resnet18.pth").read_bytes()
    with pytest.raises(ConfigError, match=r"holds backbone_resnet18\.pth of an earlier run \(without its checkpoint"):
        train(cfg)
    assert (moved / "backbone_resnet18.pth").read_bytes() == weights
    train(cfg, resume="auto")  # a SLURM job's requeue after a kill between its first backbone and checkpoint
    assert (moved / "checkpoint.pt").is_file()


@pytest.mark.parametrize("on", [True, False])
def test_cudnn_autotuner_follows_the_config(on, monkeypatch):
    from fastssl.config import TrainConfig
    from fastssl.runtime import build_accelerator

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", not on)  # restored afterwards
    build_accelerator(TrainConfig(cudnn_benchmark=on))
    assert torch.backends.cudnn.benchmark is on


def test_accelerates_own_dynamo_setting_is_not_used_and_says_so(monkeypatch, capsys):
    """`accelerate launch` passes a user's `accelerate config` dynamo backend in the environment;
    Accelerate would compile the model in `prepare` whatever --train.compile says."""
    from fastssl.config import TrainConfig
    from fastssl.runtime import build_accelerator

    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    accelerator = build_accelerator(TrainConfig(cpu=True))
    assert accelerator.state.dynamo_plugin.backend.value == "NO"
    assert "dynamo_backend INDUCTOR (from `accelerate config`" in capsys.readouterr().err


def test_fp16_on_the_cpu_is_refused_naming_what_works_there():
    """fp16's grad scaler is CUDA's: on the CPU the run failed at the first convolution (a dtype
    traceback after set-up)."""
    from fastssl.config import ConfigError, TrainConfig
    from fastssl.runtime import build_accelerator

    with pytest.raises(ConfigError, match=re.escape(
            "train.precision: fp16 (with its grad scaler) needs a CUDA GPU and this run is on the CPU "
            "(--train.cpu true); use --train.precision no (fp32) or bf16")):
        build_accelerator(TrainConfig(cpu=True, precision="fp16"))
    assert build_accelerator(TrainConfig(cpu=True, precision="no")).mixed_precision == "no"


def test_auto_settings_become_what_this_process_runs():
    """`auto` precision and backend are resolved into the config before the processes compare it
    (`check_same_config`): nodes whose GPUs resolve them differently are refused instead of training
    in different precisions, and config.json names what ran."""
    from fastssl import runtime
    from fastssl.engine import resolve_auto_settings

    cfg = Config()
    cfg.train.cpu, cfg.data.backend = True, "auto"
    assert cfg.train.precision == "auto"
    accelerator = runtime.build_accelerator(cfg.train)
    resolve_auto_settings(cfg, accelerator)
    assert (cfg.train.precision, accelerator.mixed_precision) == ("no", "no")  # a GPU's would say bf16 or fp16
    assert cfg.data.backend not in ("auto", "")


def test_config_changes_treat_fields_a_run_predates_as_defaults():
    """A run saved before a field existed resumes, unless the new value differs from the default."""
    from fastssl.run_dir import config_changes

    new, default = to_dict(Config()), to_dict(Config())
    old = to_dict(Config())  # as checkpoint.pt stores it
    del old["data"]["dali_cpu_fast"], old["eval"]["loader"]
    assert config_changes(old, new, default) == set()
    new["data"]["dali_cpu_fast"] = not new["data"]["dali_cpu_fast"]
    assert config_changes(old, new, default) == {"data.dali_cpu_fast"}


def test_bad_data_fails_before_work(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg.data.train = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="does not exist"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_prototypes_frozen_in_first_epoch(tmp_path, monkeypatch):
    """MIRA's first epoch trains everything but the prototypes (`method.freeze_prototypes_epochs` 1);
    the second moves them too. The student is read at each epoch's checkpoint."""
    from fastssl import engine
    from fastssl.models import MiraNetwork, unwrap

    cfg = tiny_config(tmp_path, epochs=2)
    cfg.eval.knn_every = -1
    cfg.train.checkpoint_every = 1
    saved = []

    def save_and_record(cfg, run_dir, parts, *args, **kwargs):
        saved.append({name: t.detach().clone() for name, t in unwrap(parts.student).state_dict().items()})
        return real_save(cfg, run_dir, parts, *args, **kwargs)

    real_save = engine.save
    monkeypatch.setattr(engine, "save", save_and_record)
    torch.manual_seed(cfg.train.seed)  # the student train() builds: the same seed, the same first draws
    initial = MiraNetwork("resnet18", 32, 16, 12).state_dict()
    train(cfg)
    assert len(saved) == 2
    after_one, after_two = saved
    torch.testing.assert_close(after_one["prototypes.weight"], initial["prototypes.weight"], rtol=0, atol=0)
    assert not torch.allclose(after_one["projector.0.weight"], initial["projector.0.weight"])  # the rest trained
    assert not torch.allclose(after_two["prototypes.weight"], initial["prototypes.weight"])


def test_logged_losses_are_the_means_of_their_steps(tmp_path, one_thread):
    """train_log.csv's loss with log_every 2 is the mean of the epoch's last 2 step losses (those of a
    log_every 1 run of the same seed), and epochs.csv's loss the mean of all the epoch's steps."""
    per_step, pairs = tiny_config(tmp_path / "a"), tiny_config(tmp_path / "b")
    per_step.eval.knn_every = pairs.eval.knn_every = -1
    per_step.eval.knn_at_start = pairs.eval.knn_at_start = False
    pairs.train.log_every = 2
    train(per_step)
    train(pairs)
    step_loss = {int(r["step"]): float(r["loss"]) for r in read_csv(Path(per_step.train.run_dir) / "train_log.csv")}
    epochs = read_csv(Path(per_step.train.run_dir) / "epochs.csv")
    per_epoch = len(step_loss) // len(epochs)
    assert len(epochs) == 2 and per_epoch > 2 and sorted(step_loss) == list(range(1, 2 * per_epoch + 1))

    def epoch_of(step: int) -> int:
        return (step - 1) // per_epoch

    logged = read_csv(Path(pairs.train.run_dir) / "train_log.csv")
    assert [int(r["step"]) for r in logged] == [s for s in step_loss if s % 2 == 0 or s % per_epoch == 0]
    for row in logged:
        s = int(row["step"])
        window = [step_loss[t] for t in (s - 1, s) if t >= 1 and epoch_of(t) == epoch_of(s)]
        assert float(row["loss"]) == pytest.approx(sum(window) / len(window), rel=1e-4), (s, window)
    for e, row in enumerate(epochs):
        steps = [v for t, v in step_loss.items() if epoch_of(t) == e]
        assert float(row["loss"]) == pytest.approx(sum(steps) / len(steps), rel=1e-4), e


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_engine import tiny_config
    from fastssl.cli import run
    cfg = tiny_config(Path({tmp!r}), epochs=5)
    cfg.eval.knn_every = -1
    run(cfg, sys.argv[1:])
""")


def launch(tmp_path: Path, *args: str, own_group: bool = False) -> subprocess.Popen:
    """The tiny run in a subprocess; `own_group`: in a process group of its own, as torchrun starts
    each trainer (and then forwards a signal to the whole group)."""
    script = tmp_path / "run_tiny.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests"), tmp=str(tmp_path)))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(script), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=own_group)


CRITIC_ARGS = ["--method.objective", "mira+mlcpc", "--critic.queue_size", "20"]


def child_processes(pid: int) -> list[int]:
    """The process's children (Linux /proc; DataLoader workers are children of the trainer)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
@pytest.mark.parametrize("objective_args", [[], CRITIC_ARGS], ids=["mira", "mira+mlcpc"])
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, objective_args):
    """With the critic, equal losses after the resume also prove the key queue was restored.
    The stopped run reads with 2 loader workers and gets the SIGTERM as torchrun forwards it, to
    its whole process group: the workers must not die of it before the checkpoint."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    # the uninterrupted reference, run beside the one that is killed with SIGTERM once the first
    # epoch is in its log and then resumed (side by side: the suite's 2 cores spend much of each
    # run importing, one thread each)
    ref = launch(a, "--train.run_dir", str(a / "run"), *objective_args)
    workers = ["--data.num_workers", "2"]
    proc = launch(b, "--train.run_dir", str(b / "run"), *objective_args, *workers, own_group=True)
    epochs_csv = b / "run" / "epochs.csv"
    deadline = time.time() + 600
    while time.time() < deadline and (not epochs_csv.exists() or len(read_csv(epochs_csv)) < 1
                                      or len(child_processes(proc.pid)) < 2):  # mid-epoch: its workers live
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 143, out
    assert f"--resume --train.run_dir {b / 'run'}" in out
    stopped_at = torch.load(b / "run" / "checkpoint.pt", weights_only=False)["state"]["step"]
    assert 3 <= stopped_at < 15
    resumed = launch(b, "--train.run_dir", str(b / "run"), "--resume", *objective_args, *workers)
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    assert ref.wait(timeout=600) == 0, ref.stdout.read()

    ref_steps, got_steps = read_csv(a / "run" / "train_log.csv"), read_csv(b / "run" / "train_log.csv")
    assert [r["step"] for r in got_steps] == [r["step"] for r in ref_steps]
    for r, g in zip(ref_steps, got_steps):
        assert float(g["loss"]) == pytest.approx(float(r["loss"]), rel=1e-5, abs=1e-6), r["step"]
        assert float(g["lr"]) == pytest.approx(float(r["lr"]), rel=1e-9)
    ref_epochs, got_epochs = read_csv(a / "run" / "epochs.csv"), read_csv(b / "run" / "epochs.csv")
    assert [float(r["loss"]) for r in got_epochs] == pytest.approx([float(r["loss"]) for r in ref_epochs], rel=1e-5)
    ref_w = torch.load(a / "run" / "backbone_resnet18.pth")
    got_w = torch.load(b / "run" / "backbone_resnet18.pth")
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], rtol=1e-5, atol=1e-6)


def accelerate_2proc() -> list[str]:
    """`python -m accelerate.commands.launch` of two CPU processes, on a port free now: not the launcher's
    default 29500, which a launch in another test process running beside this one (pytest-xdist) holds."""
    return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]

# Each process's host waits in its steps after the first two (test_method_step.host_waits), in waits<RANK>.json:
# the distributed routes (the gathered logits, per-view BatchNorm's global statistics, the critic's queue).
WATCH_THE_STEPS = f"""
    import json, os, sys
    sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
    import fastssl.engine as engine
    from test_method_step import host_waits
    _step, _watch = engine.train_step, {{"steps": 0, "watched": 0, "waits": []}}

    def _watched_step(*args, **kwargs):
        _watch["steps"] += 1
        if _watch["steps"] <= 2:  # the first steps make buffers and may read a value once
            return _step(*args, **kwargs)
        with host_waits() as seen:
            out = _step(*args, **kwargs)
        _watch["watched"] += 1
        _watch["waits"] += seen
        Path(f"waits{{os.environ['RANK']}}.json").write_text(json.dumps(_watch))
        return out

    engine.train_step = _watched_step
"""
# Ends by asserting what the run left: its process group released.
DIST_SCRIPT = tiny_synthetic_recipe(epochs=1, before=RECORD_THE_GROUP + WATCH_THE_STEPS, log_every=10, after="""
    import torch.distributed as dist
    assert not dist.is_initialized()
""")


@pytest.mark.slow
@pytest.mark.parametrize("objective_args", [[], CRITIC_ARGS], ids=["mira", "mira+mlcpc"])
def test_two_real_processes_with_accelerate_launch(tmp_path, objective_args):
    script = tmp_path / "dist_run.py"
    script.write_text(DIST_SCRIPT)
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    ok = subprocess.run([sys.executable, *accelerate_2proc(), str(script), "--train.run_dir", str(tmp_path / "run"),
                         "--train.collective_timeout_min", "7.5", *objective_args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for rank in (0, 1):  # both processes ran in one world of 2, whose collectives wait 7.5 minutes, then released it
        group = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert (group["world"], group["timeout_s"]) == (2, 450.0)
    # 32 images, global batch 8 (4 per process): 4 steps in the one epoch
    steps = read_csv(tmp_path / "run" / "train_log.csv")
    assert [r["step"] for r in steps] == ["4"]
    for rank in (0, 1):  # steps 3 and 4 of each process: nothing in them waits for the device
        watch = json.loads((tmp_path / f"waits{rank}.json").read_text())
        assert (watch["watched"], watch["waits"]) == (2, []), watch
    if objective_args:  # the critic's queue was gathered from both processes: 4 steps x 2 views x 8 keys
        assert math.isfinite(float(steps[0]["mi_nats"]))
        queue = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["critic"]
        assert int(queue["queue.ptr"]) == (4 * 2 * 8) % 20  # 64 keys written into 20 slots
    if objective_args:
        return
    bad = subprocess.run([sys.executable, *accelerate_2proc(), str(script), "--train.run_dir", str(tmp_path / "run2"),
                          "--train.global_batch_size", "9"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert bad.returncode != 0
    assert "not divisible by the 2 processes" in bad.stderr
    # a value the command line alone makes wrong: both processes exit 2, the node's first one says why
    value = subprocess.run([sys.executable, *accelerate_2proc(), str(script), "--train.run_dir", str(tmp_path / "run3"),
                            "--optim.base_lr", "-1"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert value.returncode != 0, value.stderr
    assert value.stderr.count("optim.base_lr: must be a finite number >= 0") == 1, value.stderr
    assert "exitcode  : 2" in value.stderr, value.stderr  # torch's launcher reports the failed process's status
    # a user error once the group exists (a resume with no checkpoint, agreed on in set-up): both processes exit 2
    # and release the group together; a process that left while its peer was in the last collective aborted it
    for rank in (0, 1):
        (tmp_path / f"rank{rank}.json").unlink()
    resume = subprocess.run([sys.executable, *accelerate_2proc(), str(script), "--train.run_dir",
                             str(tmp_path / "run4"), "--resume"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert "exitcode  : 2" in resume.stderr and "exitcode  : -6" not in resume.stderr, resume.stderr
    assert resume.stderr.count("no checkpoint") == 1, resume.stderr  # both met it: one line for the node
    assert all((tmp_path / f"rank{rank}.json").exists() for rank in (0, 1)), resume.stderr


def _loader_health_of_this_rank(rank: int, world_size: int) -> dict:
    from accelerate import Accelerator

    from fastssl.engine import loader_health

    timing = {"images_per_s": 100.0, "data_wait_share": [0.1, 0.7][rank], "step_time_s": 0.5}
    return loader_health(Accelerator(cpu=True), timing, skipped=[2, 3][rank])


def test_logged_data_wait_is_the_slowest_process_and_skips_are_summed():
    """A node on slow storage holds the others back in the all-reduce, where they count it as compute:
    the log shows the process that waited most, on every rank, and every process's skipped images."""
    from dist_utils import run_distributed

    outs = run_distributed(_loader_health_of_this_rank, world_size=2, timeout=120)
    for out in outs:
        assert out == {"images_per_s": 100.0, "data_wait_share": pytest.approx(0.7), "step_time_s": 0.5,
                       "skipped_images": 5}


@pytest.mark.parametrize("minutes", [10.0, 30.0, 0.5])
def test_the_collective_timeout_reaches_the_process_group_whatever_its_value(minutes):
    """Accelerate drops handler fields equal to its defaults (10 minutes): ours always passes."""
    from datetime import timedelta

    from fastssl.runtime import process_group_timeout

    assert process_group_timeout(minutes).to_kwargs() == {"timeout": timedelta(minutes=minutes)}


def _leave(rank: int, world_size: int, absent_rank: int) -> tuple[bool, float]:
    """Ends a trivial command line, except on `absent_rank`: (group still up, seconds it waited)."""
    import torch.distributed as dist

    from fastssl import runtime
    from fastssl.cli import command_line

    runtime.END_BARRIER_TIMEOUT_S = 0.5
    started = time.monotonic()
    if rank != absent_rank:
        command_line(Config(), [], "recipes/x.py", check=lambda cfg: None, dump=str,
                     start=lambda cfg, resume, command: {}, user_errors=())
    return dist.is_initialized(), time.monotonic() - started


def test_a_process_whose_peer_never_arrives_leaves_after_the_timeout():
    """At a run's end each process waits for the others before releasing the process group
    (the accelerate-launch test sees it released); a peer that never arrives (killed after the
    last collective) is waited for END_BARRIER_TIMEOUT_S, not the collective timeout."""
    from dist_utils import run_distributed

    alone = run_distributed(_leave, world_size=2, args=(1,), timeout=120)
    # rank 0 gave up after 0.5 s, not after the collective timeout (run_distributed's 120 s); the bound leaves
    # a loaded machine room. Its group is left to its exit.
    assert alone[0][0] and 0.5 <= alone[0][1] < 60


def test_micro_batches_split_rows():
    from fastssl.method import micro_batches

    assert micro_batches(8, 0) == [slice(0, 8)]
    assert micro_batches(8, 4) == [slice(0, 4), slice(4, 8)]


def test_gradient_accumulation_matches_the_unsplit_step(tmp_path, monkeypatch):
    """Split into micro-batches, a run takes the same steps as unsplit (method.py: the targets are
    solved on the whole batch; the micro-batch gradients add up to the batch's).

    The student's BatchNorm runs on its running statistics here: in training mode each
    micro-batch is normalised by its own statistics, which no accumulation can undo, and that
    would hide what this test checks (the targets, the loss weighting, the accumulated gradient).
    MIRA only: ML-CPC's one denominator is formed per micro-batch, so a split step differs.
    """
    import fastssl.engine as engine

    real = engine.train_step

    def rows_independent(first, *args, **kwargs):  # first: the student, or the step's parts holding it
        getattr(first, "student", first).eval()
        return real(first, *args, **kwargs)

    monkeypatch.setattr(engine, "train_step", rows_independent)
    runs = {}
    for micro in (0, 4):
        cfg = tiny_config(tmp_path, epochs=1)
        cfg.train.micro_batch_size, cfg.eval.knn_every, cfg.eval.knn_at_start = micro, -1, False
        cfg.train.run_dir = str(tmp_path / f"run_{micro}")
        train(cfg)
        run = Path(cfg.train.run_dir)
        runs[micro] = ([float(r["loss"]) for r in read_csv(run / "train_log.csv")],
                       torch.load(run / "checkpoint.pt", weights_only=False)["student"])
    (whole, whole_weights), (split, split_weights) = runs[0], runs[4]
    assert len(split) == 3 and all(math.isfinite(v) for v in split)
    assert split == pytest.approx(whole, rel=1e-5)  # the log keeps 6 significant digits
    assert whole_weights.keys() == split_weights.keys()
    for name, value in whole_weights.items():
        torch.testing.assert_close(split_weights[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_student_matches_eager(tmp_path, monkeypatch):
    """`--train.compile true` really runs torch.compile (inductor on CPU) and computes the same steps, from
    one graph of the student compiled once (a recompile would cost a ResNet-50 minutes of inductor).
    The student is a ResNet-10 (ResNet-18's blocks, one per stage, as `model.arch resnet18`): a cold
    build of ResNet-18's 54 C++ kernels took 126 CPU-seconds on 2 cores, ResNet-10's 77, and the graph,
    its one compilation and the loss are what is checked here. Inductor's C++ is scalar here: its
    vectorised kernels took a fifth more to build, and say nothing of the GPU's (Triton) kernels."""
    import torch._inductor.config as inductor_config
    import torchvision
    from torch._dynamo.utils import counters
    from torchvision.models.resnet import BasicBlock, ResNet

    monkeypatch.setattr(torchvision.models, "resnet18",
                        lambda weights=None, **kwargs: ResNet(BasicBlock, [1, 1, 1, 1], **kwargs))
    losses = {}
    for compiled in (False, True):
        cfg = tiny_config(tmp_path, epochs=1)
        cfg.train.compile, cfg.eval.knn_every = compiled, -1
        cfg.train.run_dir = str(tmp_path / f"run_{compiled}")
        counters.clear()
        with inductor_config.patch({"cpp.vec_isa_ok": False}):
            train(cfg)
        losses[compiled] = [float(r["loss"]) for r in read_csv(Path(cfg.train.run_dir) / "train_log.csv")]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert len(losses[True]) == 3
    # same first step; later steps drift by fused-kernel rounding (0.24% by step 3 seen here)
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-4)
    assert losses[True] == pytest.approx(losses[False], rel=1e-2)


@pytest.mark.parametrize("backend", [pytest.param("dali", marks=requires_dali), pytest.param("ffcv", marks=requires_ffcv)])
def test_fast_backends_train_through_the_unchanged_loop(tmp_path, backend):
    """Choosing the backend in the config is all it takes (the k-NN bank stays a JPEG folder)."""
    cfg = tiny_config(tmp_path, epochs=1)
    cfg.data.backend = backend
    if backend == "ffcv":
        cfg.data.knn_train = cfg.data.train
        cfg.data.train = data_path("ffcv", Path(cfg.data.train), write_mode="jpg")
    results = train(cfg)
    rows = read_csv(Path(cfg.train.run_dir) / "train_log.csv")
    assert len(rows) == 3 and all(math.isfinite(float(r["loss"])) for r in rows)
    top1 = results["knn"][-1]["top1"]  # a share of the 9 val images of 3 classes
    assert top1 * 9 / 100 == pytest.approx(round(top1 * 9 / 100)) and results["knn"][-1]["top5"] == 100.0


def test_ffcv_without_a_knn_folder_is_a_config_error(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    cfg.data.backend = "ffcv"
    with pytest.raises(ConfigError, match="data.knn_train"):
        train(cfg)


@pytest.mark.parametrize("objective", ["mira", "mlcpc", "mira+mlcpc"])
def test_each_objective_trains_and_its_loss_falls(tmp_path, objective):
    cfg = tiny_config(tmp_path, epochs=4)
    cfg.method.objective = objective
    cfg.critic.queue_size, cfg.critic.alpha_start, cfg.critic.alpha_end = 16, 1.0, 1.0  # fixed alpha: comparable losses
    cfg.eval.knn_every, cfg.eval.knn_at_start = -1, False
    cfg.optim.base_lr = 0.5
    train(cfg)
    run = Path(cfg.train.run_dir)
    epochs = read_csv(run / "epochs.csv")
    losses = [float(r["loss"]) for r in epochs]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    steps = read_csv(run / "train_log.csv")
    saved = torch.load(run / "checkpoint.pt", weights_only=False)
    # MIRA's pseudo-labels' mutual information (Eq. 2) over a process's 8 rows: within [0, log 8]
    label_mi = [float(r["label_mi_nats"]) for r in steps if r["label_mi_nats"] != ""]
    assert len(label_mi) == (len(steps) if "mira" in objective else 0)
    assert all(0 <= v <= math.log(8) + 1e-5 for v in label_mi) and (len(set(label_mi)) > 1 or not label_mi)
    if objective == "mira":
        assert steps[0]["mi_nats"] == "" and saved["critic"] is None
    else:  # the estimate and its ceiling log((Q + 1) / alpha) are logged; the queue is checkpointed
        assert all(math.isfinite(float(r["mi_nats"])) for r in steps)
        assert float(steps[0]["mi_ceiling_nats"]) == pytest.approx(math.log(17), rel=1e-5)
        assert all(float(r["mi_nats"]) <= float(r["mi_ceiling_nats"]) + 1e-6 for r in steps)
        assert saved["critic"]["queue.keys"].shape == (16, cfg.model.proj_dim)


def test_queue_as_long_as_the_dataset_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, epochs=1)
    cfg.method.objective, cfg.critic.queue_size = "mlcpc", 24
    with pytest.raises(ConfigError, match="critic.queue_size: 24 is not smaller than the dataset"):
        train(cfg)
    assert not Path(cfg.train.run_dir).exists(), "refused before any output"


def test_a_collapse_is_warned_about_once_from_the_second_epoch(tmp_path):
    """A teacher temperature of 100 makes every image's pseudo-labels alike (what a collapsed network
    gives): MIRA's label_mi_nats (Eq. 2) stays near 0, and the run says so once, after epoch 2 (the first
    epoch starts from a random network)."""
    import warnings

    from fastssl.recovery import COLLAPSED_LABEL_MI_NATS, collapse_warning

    cfg = tiny_config(tmp_path, epochs=3)
    cfg.eval.knn_every, cfg.eval.knn_at_start, cfg.method.tau_teacher = -1, False, 100.0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    said = [str(w.message) for w in caught if "pseudo-labels carry" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("epoch 2: MIRA's pseudo-labels carry "), said
    assert "the representation has likely collapsed" in said[0] and "--method.tau_teacher" in said[0]
    assert f"log K = {math.log(12):.4g}" in said[0]
    steps = read_csv(Path(cfg.train.run_dir) / "train_log.csv")
    assert max(float(r["label_mi_nats"]) for r in steps) < COLLAPSED_LABEL_MI_NATS
    collapsed = {"epoch": 1, "label_mi_nats": 0.01, "loss": math.log(12)}
    assert collapse_warning(collapsed, 12) is not None
    assert collapse_warning({**collapsed, "epoch": 0}, 12) is None  # the first epoch: never
    assert collapse_warning({**collapsed, "label_mi_nats": COLLAPSED_LABEL_MI_NATS}, 12) is None
    assert collapse_warning({**collapsed, "loss": 0.9 * math.log(12)}, 12) is None  # the student learns
    assert collapse_warning({"epoch": 5, "loss": 9.0}, 12) is None  # no MIRA: no pseudo-labels
