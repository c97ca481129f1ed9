"""Nothing forked after DALI ran in the same process ever hangs.

The hang these tests guard against: a DALI pipeline sits in reference cycles, so when a
process drops one it stays as garbage until the cycle collector runs. A process forked
meanwhile inherits it, and when the child's collector runs `nvidia.dali.Pipeline.__del__`,
DALI waits there for threads that do not exist after a fork: the child hangs (or segfaults),
and the parent waits for it forever. It happened in `make test` to the FFCV converter's
forked workers after DALI ran in the pytest process, and it would happen to the k-NN's
DataLoader workers right after a DALI training epoch. That depended on when the collector
ran, so each scenario makes it certain: the collector is paused in the parent, and every
forked child collects at once. Registered fork hooks cannot be removed, so each scenario
runs in its own interpreter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

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


def run_scenario(text: str, tmp_path: Path) -> str:
    """Run a scenario's script in its own interpreter and session; its output. Killed, with
    every process it forked, after 6 minutes."""
    script = tmp_path / "scenario.py"
    script.write_text(text)
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
    assert proc.returncode == 0, f"status {proc.returncode}:\n{out[-4000:]}"
    return out


def test_converter_after_dali_with_collecting_forks_never_hangs(tmp_path):
    out = run_scenario(SCENARIO.format(tests=str(REPO / "tests")), tmp_path)
    assert "all converted" in out, out[-4000:]
    assert sorted(p.name for p in tmp_path.glob("*.beton")) == [f"out{i}.beton" for i in range(5)]
    assert not list(tmp_path.glob(".*partial*"))


# Two DALI training epochs (consumed as the training loop does) and a DALI k-NN pass, then the torchvision k-NN loader's forked workers
# (the default `eval.loader` of a `--data.backend dali` run), whose collectors run at once.
AFTER_DALI_EPOCH = textwrap.dedent("""
    import faulthandler, gc, os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from conftest import make_image_folder
    from pipelines import DataConfig, LoaderSpec, MultiCropRecipe, build_train_loader
    from pipelines.augment import EvalView
    from pipelines.eval import build_eval_loader

    if __name__ == "__main__":  # workers may import the main script: nothing may run then
        root = Path(sys.argv[1]) / "train"
        make_image_folder(root, num_classes=2, per_class=8, size=40)
        gc.disable()  # what the loaders drop stays until they free it themselves
        os.register_at_fork(after_in_child=gc.collect)  # ... and every forked child collects it
        recipe = MultiCropRecipe(global_size=16, local_size=8, num_local=2)
        train = build_train_loader(LoaderSpec(data=DataConfig(backend="dali", train=str(root)), recipe=recipe,
                                              batch_size=4, seed=0, num_workers=1))
        for epoch in range(2):  # as fastssl.engine.run_epoch: it breaks out after the last step
            train.set_epoch(epoch)
            steps = 0
            for _ in train:
                steps += 1
                if steps == len(train):
                    break
            print(f"dali epoch {{epoch}}: {{steps}} batches, pipeline kept: {{train.state_dict() is not None}}",
                  flush=True)
        knn_dali = build_eval_loader("dali", str(root), view=EvalView(16), batch_size=4, num_workers=1)
        print(f"dali k-NN pass: {{sum(1 for _ in knn_dali)}} batches", flush=True)
        faulthandler.dump_traceback_later(60, exit=True)  # a hang fails, with its stack
        for p in range(2):
            knn = build_eval_loader("torchvision", str(root), view=EvalView(16), batch_size=4, num_workers=2)
            print(f"torchvision k-NN pass {{p}}: {{sum(1 for _ in knn)}} batches", flush=True)
        faulthandler.cancel_dump_traceback_later()
        gc.enable()
        print("all passes done")
""")


def test_dataloader_workers_after_a_dali_epoch_never_hang(tmp_path):
    """Fails on loaders that leave their pipelines as garbage: the first worker's collector hangs."""
    out = run_scenario(AFTER_DALI_EPOCH.format(tests=str(REPO / "tests")), tmp_path)
    assert "torchvision k-NN pass 1: 4 batches" in out and "all passes done" in out, out[-4000:]
    assert "dali epoch 1: 4 batches, pipeline kept: False" in out, out[-4000:]


def test_every_test_runs_under_a_timeout_with_faulthandler(pytestconfig):
    """`make test` fails a hung test (with its traceback) instead of hanging: pytest-timeout is
    in the test extra the Makefile installs, and the limit is set for every test."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert any(req.startswith("pytest-timeout") for req in project["project"]["optional-dependencies"]["test"])
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert 0 < float(pytestconfig.getini("timeout")) <= 1800
    assert 0 < float(pytestconfig.getini("faulthandler_timeout")) < float(pytestconfig.getini("timeout"))
