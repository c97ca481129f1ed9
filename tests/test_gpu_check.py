"""tools/gpu_check.py: the guard, the time budget and the reports (fast, in process), and the
script itself run as a subprocess in dry-run mode on the CPU (every stage, in the slow test), so
that it is proven before any GPU minute is spent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, load_tool

from fastssl.gpu_check.end_to_end import read_run_logs
from fastssl.gpu_check.fused import per_iteration_us
from fastssl.gpu_check.goals import goal
from fastssl.gpu_check.gpu_tests import count_pytest_outcomes, gpu_test_files, parse_pytest_summary
from fastssl.gpu_check.loaders import LOADER_VARIANTS
from fastssl.gpu_check.runner import Context, Stage, StageSkipped, allotment

gc = load_tool("gpu_check")


def read(out: Path) -> tuple[dict, str]:
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def run_main(tmp_path: Path, stages, *extra: str) -> tuple[int, dict, str]:
    out = tmp_path / "out"
    rc = gc.main(["--out", str(out), "--scratch", str(tmp_path / "scratch"), "--dry-run", *extra], stages=stages)
    return (rc, *read(out))


def test_a_failing_stage_records_its_traceback_and_the_next_stage_runs(tmp_path):
    seen = {}

    def boom(ctx):
        raise RuntimeError("kaboom in stage one")

    def second(ctx):
        # the report on disk was rewritten after the failed stage and when this one started
        seen["report"], _ = read(ctx.out)
        return {"results": {"value": 42}, "goals": [goal("answer", 42.0, 40.0, "", True)],
                "summary": ["second ran"]}

    def skipper(ctx):
        raise StageSkipped("nothing to do here")

    stages = [Stage("one", "raises", 30, boom, needs_cuda=False), Stage("two", "runs", 30, second, False),
              Stage("three", "skips", 30, skipper, False)]
    rc, report, md = run_main(tmp_path, stages)
    assert rc == 0
    on_disk = seen["report"]["stages"]
    assert [s["status"] for s in on_disk] == ["failed", "running"]
    assert "kaboom in stage one" in on_disk[0]["traceback"] and "RuntimeError" in on_disk[0]["error"]
    one, two, three = report["stages"]
    assert one["status"] == "failed" and "Traceback" in one["traceback"] and "kaboom" in one["traceback"]
    assert two["status"] == "ok" and two["results"] == {"value": 42}
    assert three["status"] == "skipped" and three["reason"] == "skipped: nothing to do here"
    assert report["goals"] == [{"stage": "two", **goal("answer", 42.0, 40.0, "", True)}]
    assert report["goals"][0]["met"] is True
    assert "kaboom in stage one" in md and "second ran" in md and "| two | answer |" in md
    # a stage skipped for a reason of its own is not rerun; the failed one needs a fix first
    assert report["next"] == ["failed: one; read their errors below, fix them on CPU (with a test where one can "
                              "catch it), then rerun them: --stages one"]
    assert "## Next\n\n- failed: one;" in md


def test_a_command_past_its_budget_is_killed_and_later_stages_are_skipped(tmp_path):
    """--budget bounds the run: a stage's command is killed at the stage's share of it (with its
    child), the stage is marked timeout; once the budget is spent a stage is skipped, not started."""
    code = ("import subprocess, sys, time\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print('started', flush=True); time.sleep(120)\n")

    def slow(ctx):
        c = ctx.run("sleeper", [sys.executable, "-c", code])
        return {"results": {"timed_out": c.timed_out, "seconds": c.seconds}}

    def overrun(ctx):
        time.sleep(ctx.left() + 4)  # in-process work the runner cannot cut short
        return {}

    def later(ctx):
        return {"results": {"ran": True}}

    stages = [Stage("slow", "sleeps", 300, slow, needs_cuda=False),
              Stage("overrun", "overruns", 300, overrun, needs_cuda=False),
              Stage("later", "after", 300, later, needs_cuda=False)]
    start = time.monotonic()
    rc, report, _ = run_main(tmp_path, stages, "--budget", "6")
    assert time.monotonic() - start < 40
    slow_entry, _, later_entry = report["stages"]
    assert slow_entry["status"] == "timeout" and slow_entry["results"]["timed_out"]
    assert slow_entry["results"]["seconds"] < 15  # a third of the budget, plus the kill
    assert "started" in (tmp_path / "out" / "logs" / "sleeper.log").read_text()
    assert later_entry["status"] == "skipped" and "out of time" in later_entry["reason"]
    # what ran out of time, with the command that reruns it at once (each stage's own cap as budget)
    assert report["next"] == ["ran out of time or never ran: slow, later; rerun them at once, on the warm machine: "
                              "`python3 tools/gpu_check.py --out $OUT --stages slow,later --budget 420 --dry-run`"]


def test_a_signal_to_gpu_check_kills_the_running_command_and_keeps_the_report(tmp_path):
    """SIGTERM mid-command (as a device run's timeout would send): the command's process group
    is killed, the stage is recorded as interrupted, the exit status is 128 + 15."""
    pid_file = tmp_path / "child.pid"
    code = ("import os, signal, time\n"
            f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            "os.kill(os.getppid(), signal.SIGTERM); time.sleep(120)\n")

    def stage(ctx):
        ctx.run("victim", [sys.executable, "-c", code], timeout=60)
        return {}

    def never(ctx):
        raise AssertionError("a stage after the interruption ran")

    start = time.monotonic()
    rc, report, md = run_main(tmp_path, [Stage("one", "interrupted", 300, stage, False),
                                         Stage("two", "never", 300, never, False)])
    assert rc == 128 + 15 and time.monotonic() - start < 40
    assert [s["status"] for s in report["stages"]] == ["interrupted"]
    assert "SIGTERM" in report["stages"][0]["reason"] and "interrupted" in md
    assert "--stages one,two --budget 420 --dry-run`" in report["next"][0]  # cut short, and never started
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_allotment_scales_caps_to_the_budget_left():
    ctx = Context(out=Path("."), scratch=Path("."), dry_run=False, cuda=True, deadline=time.monotonic() + 100)
    stages = [Stage(n, n, cap, lambda c: {}) for n, cap in (("a", 100), ("b", 100))]
    assert allotment(stages, ctx) == pytest.approx(50, abs=1)  # 200 s of caps, 100 s left
    assert allotment(stages[:1], ctx) == pytest.approx(100, abs=1)
    ctx.deadline = time.monotonic() + 1000
    assert allotment(stages, ctx) == 100  # enough time: each stage gets its own cap


@pytest.mark.parametrize("args,message", [
    (["--stages", "env,warp"], "unknown stage 'warp'"),
    (["--stages", ","], "--stages ',' names no stage"),
    (["--stages", ""], "--stages '' names no stage"),  # not every stage: that is --stages left out
    (["--budget", "0"], "argument --budget: must be a finite number in (0, inf), got 0"),
    (["--budget", "nan"], "argument --budget: must be a finite number in (0, inf), got nan"),  # every stage skipped
    (["--budget", "abc"], "argument --budget: expected a number, got 'abc'"),
    (["--scratch", str(REPO / "data" / "x")], "inside the checkout"),
    (["--scratch", "FILE/x"], "cannot write in "),  # checked before any stage, not a traceback in one
    ([], "--out DIR is required"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "FILE").write_text("a file where a folder should be")
    argv = (["--out", str(tmp_path / "o")] if args else []) + [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    try:
        assert gc.main(argv) == 2
    except SystemExit as exited:  # argparse's own checks
        assert exited.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (REPO / "data" / "x").exists()


def test_stages_select_by_name_or_number_in_canonical_order():
    assert [s.name for s in gc.select_stages("8,env,fused")] == ["env", "fused", "gpu_tests"]
    assert [s.name for s in gc.select_stages(None)] == [s.name for s in gc.STAGES]


def test_pytest_summary_and_run_logs_are_read(tmp_path):
    assert parse_pytest_summary("...\n3 passed, 1 failed, 37 skipped, 12 deselected in 4.10s\n") == \
        {"passed": 3, "failed": 1, "skipped": 37, "deselected": 12}
    assert parse_pytest_summary("== 2 errors in 1.0s ==") == {"errors": 2}
    killed = ("tests/a.py::test_x[nvrtc-64] PASSED    [ 10%]\ntests/a.py::test_y SKIPPED (needs nvcc)  [ 20%]\n"
              "tests/b.py::test_z[2-bf16] FAILED    [ 30%]\ntests/b.py::test_w PASSED\nsome output PASSED\n")
    assert parse_pytest_summary(killed) == {}
    assert count_pytest_outcomes(killed) == ({"passed": 2, "skipped": 1, "failed": 1},
                                                ["tests/b.py::test_z[2-bf16]"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "epochs.csv").write_text("epoch,step,images_per_s,data_wait_share,peak_memory_mb,device_used_mb\n"
                                    "0,20,100.0,0.5,5000,9000\n1,40,1000.0,0.1,6000,9500\n2,60,1200.0,0.3,5500,9400\n")
    (run / "train_log.csv").write_text("epoch,step,images_per_s,data_wait_share\n0,5,90,0.9\n0,10,95,0.8\n"
                                       "1,25,500,0.6\n1,30,1300,0.1\n1,35,1100,0.3\n2,45,700,0.5\n2,50,1200,0.2\n")
    logs = read_run_logs(run)
    assert logs["images_per_s"] == pytest.approx(1100.0)  # epochs 2..3: the first is start-up
    assert logs["data_wait_share"] == pytest.approx(0.2)
    assert logs["peak_memory_mb"] == 6000 and logs["device_used_mb"] == 9500 and logs["steps"] == 60 and logs["log_images_per_s"][:2] == [90.0, 95.0]
    assert logs["per_epoch_device_used_mb"] == [9000, 9500, 9400] and logs["device_used_growth_mb"] == 400
    # within epochs: epochs 1..2 without each one's first window (500 and 700)
    assert logs["within_epochs_images_per_s"] == pytest.approx((1300 + 1100 + 1200) / 3)
    assert logs["within_epochs_data_wait_share"] == pytest.approx(0.2)


def test_bench_mira_opt_in_implementations_record_errors_instead_of_failing(tmp_path):
    out = tmp_path / "m.json"
    records = load_tool("bench_mira").main(["--sizes", "8x20", "--device", "cpu", "--repeats", "1", "--warmup", "0",
                                            "--impls", "solve_views,fused,fused_graph", "--views", "1",
                                            "--dtype", "bf16", "--json", str(out)])
    by = {r["implementation"]: r for r in records}
    assert by["solve_views"]["median_us"] > 0 and by["solve_views"]["views"] == 1
    assert by["solve_views"]["dtype"] == "bf16"
    assert "needs a CUDA device" in by["fused"]["error"] and "median_us" not in by["fused_graph"]
    assert len(json.loads(out.read_text())["records"]) == 3


def test_bench_loaders_variants_name_real_loader_settings():
    import dataclasses

    from pipelines import DataConfig, MultiCropRecipe

    bl = load_tool("bench_loaders")
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    recipe_fields = {f.name for f in dataclasses.fields(MultiCropRecipe)}
    assert set(LOADER_VARIANTS) <= set(bl.ALL_BACKENDS) | set(bl.VARIANTS)
    for name in LOADER_VARIANTS:
        backend, overrides, recipe_overrides = bl.variant(name)
        assert backend in bl.ALL_BACKENDS and set(overrides) <= fields and set(recipe_overrides) <= recipe_fields
    assert bl.VARIANTS["dali-hw1"][1] == {"dali_hw_decoder_load": 1.0}
    assert bl.variant("dali-fixed-order")[2] == {"jitter_order": "fixed"}
    assert bl.parse_args(["--backends", ",".join(LOADER_VARIANTS)]).backends


def dry_run(tmp_path: Path, timeout: int) -> tuple[dict, str]:
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "gpu_check.py"), "--dry-run", "--out", str(out),
           "--scratch", str(tmp_path / "scratch"), "--budget", str(timeout - 30)]
    # One OpenMP thread per child, as the suite's other started processes: two threads each beside the
    # suite's second worker (make test) left both cores' time to OpenMP's waits.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read(out)


def check_fused_stage(report: dict, md: str, out: Path) -> None:
    """The fused stage of a dry run: the whole equality grid, the timings at 30 and 0 iterations
    (the kernel itself errs on a CPU), its three goals measured, its bench_mira log kept."""
    stage = next(s for s in report["stages"] if s["name"] == "fused")
    eq = stage["results"]["equality"]
    assert eq["complete"] and eq["cases_done"] == 48 and eq["max_abs_err"] < 1e-4
    impls = {r["implementation"]: r for r in stage["results"]["timings"]["2views"]}
    assert impls["views"]["median_us"] > 0 and "error" in impls["fused_graph"]
    zero = {r["implementation"]: r for r in stage["results"]["timings"]["2views-iters0"]}
    assert zero["views"]["iters"] == 0 and zero["views"]["median_us"] > 0 and "error" in zero["fused"]
    assert set(stage["results"]["per_iteration_us"]) == {"views"}
    fused_goals = report["goals"][:3]
    assert [g["goal"] for g in fused_goals][:1] == ["fused assignment, 2 views x 512 x 3000 x 30 iters"]
    assert all(g["measured"] is not None for g in fused_goals)
    assert "DRY RUN" in md and "| fused | ok |" in md
    assert (out / "logs" / "bench_mira-2views.log").exists()


def test_per_iteration_cost_is_the_difference_over_the_iterations():
    rec = lambda impl, b, us: {"implementation": impl, "B": b, "K": 3000, "median_us": us}  # noqa: E731
    timings = {"2views": [rec("views", 512, 400.0), rec("fused", 512, 130.0), rec("fused", 64, 50.0),
                          rec("fused_graph", 512, None)],
               "2views-iters0": [rec("views", 512, 100.0), rec("fused", 512, 10.0), rec("fused_graph", 512, 8.0)]}
    assert per_iteration_us(timings, 512, 3000) == {"views": 10.0, "fused": 4.0}
    assert per_iteration_us({"2views": timings["2views"]}, 512, 3000) == {}


@pytest.mark.slow
def test_dry_run_of_every_stage_in_a_subprocess(tmp_path):
    """The whole script on CPU at tiny sizes: every stage runs its tools and reads their output."""
    report, md = dry_run(tmp_path, timeout=600)
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert status == {s.name: "ok" for s in gc.STAGES}, [(s["name"], s.get("error"), s.get("errors"))
                                                        for s in report["stages"]]
    assert report["dry_run"] and report["next"] == ["every stage ran to its end: nothing to rerun"]
    check_fused_stage(report, md, tmp_path / "out")
    st = {s["name"]: s for s in report["stages"]}
    assert st["env"]["results"]["torch"] and "nvcc" in st["env"]["results"]
    assert st["compile"]["results"]["graph_break_count"] == 0
    assert st["model_step"]["results"]["eager"]["images_per_s"] > 0
    assert set(st["loaders"]["results"]["backends"]) >= {"torchvision", "torchvision-device-augment"}
    assert not set(st["loaders"]["results"]["backends"]) & {"dali-hw0", "dali-hw1"}  # no hardware decoder on a CPU
    e2e = st["end_to_end"]["results"]
    assert set(e2e) == {"synthetic", "torchvision", "dali", "ffcv"}
    ran = [r for r in e2e.values() if "skipped" not in r]
    assert len(ran) >= 2 and all(r["steps"] == 2 and r["images_per_s"] > 0 for r in ran)
    assert st["gpu_tests"]["results"]["counts"].get("skipped", 0) > 0
    data = st["loaders"]["results"]["data"]  # generated outside the checkout, under --scratch
    assert Path(data["train"]).is_relative_to(tmp_path)
    assert data["count"] == len(list(Path(data["train"]).rglob("*.JPEG")))


def test_the_gpu_tests_run_the_nvcc_kernel_file_last():
    """Its cold nvcc build comes last, so a deadline stops it, not the two-process GPU tests."""
    files = gpu_test_files()
    assert files[-1] == "tests/test_mira_cuda.py"
    assert sorted(files) == sorted(str(f.relative_to(REPO)) for f in (REPO / "tests").glob("test_*.py"))


def test_device_rehearsal_refuses_a_bad_argument_before_installing_anything():
    proc = subprocess.run(["bash", str(REPO / "tools" / "device_rehearsal.sh"), "--test"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--test'" in proc.stderr and proc.stdout == ""
