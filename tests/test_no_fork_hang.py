"""The FFCV converter called after DALI ran in the same process never hangs.

The hang it guards against: `make test` converted a folder to a .beton after DALI pipelines
had run in the pytest process. The converter's `multiprocessing.Pool` and FFCV's writer
forked workers from that process; a child's garbage collector ran `nvidia.dali.Pipeline.__del__`
on a pipeline whose threads do not exist after a fork, the child segfaulted, and the parent
waited forever. That depended on when the collector ran, so the scenario below makes it
certain: a DALI pipeline is left as garbage only the cycle collector can free, the collector
is paused, and every forked child collects at once. Registered fork hooks cannot be removed,
so the scenario runs in its own interpreter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, requires_dali, requires_ffcv

pytestmark = [requires_dali, requires_ffcv]

SCENARIO = textwrap.dedent("""
    import faulthandler, gc, os, sys, time
    from pathlib import Path

    sys.path.insert(0, {tests!r})
    from conftest import make_image_folder
    from nvidia.dali import fn, pipeline_def


    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def tiny():
        return fn.random.uniform(range=[0.0, 1.0], shape=[2])


    if __name__ == "__main__":  # workers may import the main script: nothing may run then
        pipe = tiny()
        pipe.build()
        pipe.run()
        gc.disable()
        cycle = [pipe]
        cycle.append(cycle)  # garbage that only the cycle collector frees ...
        del pipe, cycle
        os.register_at_fork(after_in_child=gc.collect)  # ... and every forked child collects it
        tmp = Path(sys.argv[1])
        make_image_folder(tmp / "train", num_classes=2, per_class=3)
        from pipelines.beton_convert import convert
        for i in range(5):
            faulthandler.dump_traceback_later(60, exit=True)  # a hang fails, with its stack
            start = time.perf_counter()
            convert(tmp / "train", tmp / f"out{{i}}.beton", num_workers=2, progress=False)
            faulthandler.cancel_dump_traceback_later()
            print(f"conversion {{i}}: {{time.perf_counter() - start:.1f}} s", flush=True)
        gc.enable()
        print("all converted")
""")


def test_converter_after_dali_with_collecting_forks_never_hangs(tmp_path):
    script = tmp_path / "scenario.py"
    script.write_text(SCENARIO.format(tests=str(REPO / "tests")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    log = tmp_path / "scenario.log"  # a file, not a pipe: orphaned workers of a hung run would hold a pipe open
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=5 * 60 + 60)
        except subprocess.TimeoutExpired:
            pass
        finally:  # its whole process group: workers of a hung run must not outlive the test
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    out = log.read_text()
    assert proc.returncode == 0 and "all converted" in out, f"status {proc.returncode}:\n{out[-4000:]}"
    assert sorted(p.name for p in tmp_path.glob("*.beton")) == [f"out{i}.beton" for i in range(5)]
    assert not list(tmp_path.glob(".*partial*"))


def test_every_test_runs_under_a_timeout_with_faulthandler(pytestconfig):
    """`make test` fails a hung test (with its traceback) instead of hanging: pytest-timeout is
    in the test extra the Makefile installs, and the limit is set for every test."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert any(req.startswith("pytest-timeout") for req in project["project"]["optional-dependencies"]["test"])
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert 0 < float(pytestconfig.getini("timeout")) <= 1800
    assert 0 < float(pytestconfig.getini("faulthandler_timeout")) < float(pytestconfig.getini("timeout"))
