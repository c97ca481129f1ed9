"""A stop mid-epoch then a resume reproduces every logged loss of an uninterrupted run, per loader.

The torchvision loader draws each image's augmentation from (seed, epoch, image), so any
resume is exact (tests/test_engine.py). DALI draws from per-pipeline generators that advance
batch by batch, so the resumed epoch's pipeline must be rebuilt from DALI's own checkpoint
of the interrupted one (`DaliLoader.state_dict`, kept per rank in rng/rank<r>.pt). FFCV's
decoder reseeds numba's per-thread generator before each image from (seed, epoch, image),
like torchvision, so it needs no loader state: the epoch and batch the loop passes to
`set_epoch` are enough, with the shared sampler's order (the default) and with FFCV's own
orders, which are functions of (seed, epoch) as well. Two real processes (`accelerate launch`,
gloo) stop and resume DALI and FFCV (the sampler's order and FFCV's random one), where each
rank keeps its own shard, its own generators and, for DALI, its own state file; what those do
not cover runs on one process: FFCV's quasi-random order, and DALI cropping only with
`device_augment` (its photometric draws from each batch's own seed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import data_path, requires_dali, requires_ffcv
from fastssl import engine
from fastssl.config import to_dict
from pipelines import DataConfig, LoaderSpec, MultiCropRecipe, build_train_loader
from test_engine import accelerate_2proc, read_csv
from test_faults import StopAt, counting, quick_config


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["loss"])) for r in read_csv(run_dir / "train_log.csv")]


def stop_then_resume(cfg, tmp_path: Path, monkeypatch) -> tuple[list, list, dict | None]:
    """The uninterrupted run's losses, those of a run stopped one batch into epoch 1 and resumed,
    and the loader state that the stop saved (rng/rank0.pt)."""
    cfg.train.run_dir = str(tmp_path / "reference")
    engine.train(cfg)
    reference = losses(Path(cfg.train.run_dir))

    cfg.train.run_dir = str(tmp_path / "stopped")
    StopAt.counter[0], StopAt.step = 0, 4  # one batch into the second epoch, the loader prefetching ahead
    with monkeypatch.context() as m:
        m.setattr(engine, "GracefulStop", StopAt)
        m.setattr(engine, "train_step", counting(engine.train_step))
        engine.train(cfg)
    run_dir = Path(cfg.train.run_dir)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]
    assert (saved["epoch"], saved["batch_in_epoch"], saved["step"]) == (1, 1, 4)
    loader_state = torch.load(run_dir / "rng" / "rank0.pt", weights_only=False).get("loader")
    engine.train(cfg, resume=True)
    return reference, losses(run_dir), loader_state


@requires_dali
def test_dali_with_device_augment_stop_mid_epoch_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """DALI's checkpoint restores its crops; the photometric draws are the batch's own seed's."""
    cfg = quick_config(tmp_path, epochs=2)  # 3 steps per epoch
    cfg.data.backend, cfg.data.device_augment = "dali", True
    reference, got, loader_state = stop_then_resume(cfg, tmp_path, monkeypatch)
    assert (loader_state["epoch"], loader_state["batch"]) == (1, 1)
    assert [s for s, _ in got] == [s for s, _ in reference] == list(range(1, 7))
    assert [v for _, v in got] == pytest.approx([v for _, v in reference], rel=1e-5, abs=1e-6)


@requires_dali
def test_dali_drops_an_epochs_pipeline_when_the_next_epoch_starts(tmp_path):
    """An epoch cut short (--train.steps_per_epoch) keeps its pipeline, which a checkpoint may save,
    until the next epoch starts: then it is dropped and collected, nvJPEG and prefetch memory with it."""
    import gc

    from nvidia.dali import Pipeline

    def pipelines_alive() -> int:
        gc.collect()
        # type(), not isinstance(): isinstance also reads `__class__`, which a dead weak proxy refuses and
        # deprecated torch objects warn on
        return sum(issubclass(type(o), Pipeline) for o in gc.get_objects())

    before = pipelines_alive()
    cfg = quick_config(tmp_path, epochs=2)
    loader = build_train_loader(LoaderSpec(data=DataConfig(backend="dali", train=cfg.data.train, num_workers=1),
                                           recipe=MultiCropRecipe(global_size=16, local_size=8, num_local=2),
                                           batch_size=4, seed=0, num_workers=1))
    loader.set_epoch(0)
    for _ in loader:  # one step of several
        break
    assert loader.state_dict() is not None and pipelines_alive() == before + 1
    loader.set_epoch(1)
    assert loader.state_dict() is None and pipelines_alive() == before


@requires_ffcv
def test_ffcv_quasi_random_stop_mid_epoch_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """On CPU every draw of the FFCV loader but the order happens in its decoder's threads; FFCV's
    quasi-random order shuffles its page table in place, which the loader restores per epoch."""
    cfg = quick_config(tmp_path, epochs=2)  # 3 steps per epoch; FFCV decodes up to 3 batches ahead
    cfg.data.backend, cfg.data.knn_train, cfg.data.ffcv_order = "ffcv", cfg.data.train, "quasi_random"
    cfg.data.train = data_path("ffcv", Path(cfg.data.train), write_mode="jpg")
    reference, got, loader_state = stop_then_resume(cfg, tmp_path, monkeypatch)
    assert loader_state is None  # nothing beyond the checkpoint's (epoch, batch)
    assert [s for s, _ in got] == [s for s, _ in reference] == list(range(1, 7))
    assert [v for _, v in got] == pytest.approx([v for _, v in reference], rel=1e-5, abs=1e-6)


def textured_folder(root: Path, count: int = 16, size: tuple[int, int] = (40, 52)) -> Path:
    """Noise images (2 classes): unlike flat colours, every crop box gives other pixels."""
    rng = np.random.default_rng(0)
    for k in range(count):
        folder = root / f"c{k % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"img{k:03d}.png")
    return root


def ffcv_epoch(path: str, threads: int, epoch: int, start_batch: int = 0) -> dict[int, list[torch.Tensor]]:
    """Every view of every image a fresh FFCV loader yields for (seed 4, epoch), by dataset index."""
    recipe = MultiCropRecipe(global_size=16, local_size=8, num_local=2)  # every photometric step on
    loader = build_train_loader(LoaderSpec(data=DataConfig(backend="ffcv", train=path), recipe=recipe,
                                           batch_size=4, seed=4, num_workers=threads))
    loader.set_epoch(epoch, start_batch)
    views = {}
    for batch in loader:
        for row, index in enumerate(batch.index.tolist()):
            views[index] = [v[row].clone() for v in batch.views]
    return views


@requires_ffcv
def test_ffcv_draws_repeat_whatever_the_start_batch_and_threads(tmp_path):
    path = data_path("ffcv", textured_folder(tmp_path / "noise"))
    whole = ffcv_epoch(path, threads=1, epoch=1)
    assert len(whole) == 16
    runs = {"2 threads": ffcv_epoch(path, threads=2, epoch=1),
            "from batch 2": ffcv_epoch(path, threads=1, epoch=1, start_batch=2),
            "from batch 3, 2 threads": ffcv_epoch(path, threads=2, epoch=1, start_batch=3)}
    for name, run in runs.items():
        assert run and set(run) <= set(whole), name
        for index, views in run.items():
            for v, (a, b) in enumerate(zip(views, whole[index])):
                assert torch.equal(a, b), f"{name}: image {index}, view {v}"
    following = ffcv_epoch(path, threads=1, epoch=2)
    for index, views in following.items():  # another epoch: other crops for every image and view
        assert all(not torch.equal(a, b) for a, b in zip(views, whole[index])), index
    for index, views in whole.items():  # one image's views stay draws of their own
        assert not torch.equal(views[0], views[1]) and not torch.equal(views[2], views[3]), index


# Run by both processes of one `accelerate launch`, for each config file it is given: the uninterrupted run,
# then a run stopped one batch into epoch 1 (every rank stops at that step, as a signal agreed by all ranks
# would) and its resume. Several configs share a launch: its processes' start-up is paid once.
TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from fastssl import engine
    from fastssl.config import from_dict
    from test_faults import StopAt, counting

    for config in sys.argv[1:]:
        cfg = from_dict(json.loads(Path(config).read_text()))
        root = Path(cfg.train.run_dir)
        cfg.train.run_dir = str(root / "reference")
        engine.train(cfg)
        cfg.train.run_dir = str(root / "stopped")
        StopAt.counter[0], StopAt.step = 0, 4
        real_stop, real_step = engine.GracefulStop, engine.train_step
        engine.GracefulStop, engine.train_step = StopAt, counting(engine.train_step)
        engine.train(cfg)
        engine.GracefulStop, engine.train_step = real_stop, real_step
        state = torch.load(root / "stopped" / "checkpoint.pt", weights_only=False)["state"]
        rank = dist.get_rank()
        loader = torch.load(root / "stopped" / "rng" / f"rank{{rank}}.pt", weights_only=False).get("loader")
        engine.train(cfg, resume=True)
        Path(root / f"rank{{rank}}.json").write_text(json.dumps({{
            "world": dist.get_world_size(), "stopped_at": [state["epoch"], state["batch_in_epoch"], state["step"]],
            "loader_state": None if loader is None else [loader["epoch"], loader["batch"]]}}))
    # As the command line ends a run: a rank that exits while its peer is still in the last collective
    # aborts that peer's gloo thread ("terminate called without an active exception", exit -6).
    from fastssl.runtime import end_process_group
    end_process_group()
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend,orders", [pytest.param("dali", ["sampler"], marks=requires_dali),
                                            pytest.param("ffcv", ["sampler", "random"], marks=requires_ffcv)],
                         ids=["dali", "ffcv"])
def test_two_processes_stop_mid_epoch_then_resume_equals_uninterrupted(tmp_path, backend, orders):
    """Two ranks of 4 images a step, 3 steps an epoch, textured images (every crop box shows other
    pixels): the resumed run logs the uninterrupted run's losses, so every rank resumed its own shard
    with its own draws. FFCV in both orders: "sampler" (ours) and "random", FFCV's own, which FFCV
    deals to the ranks itself."""
    folder = textured_folder(tmp_path / "noise", count=24)
    configs = []
    for order in orders:
        cfg = quick_config(tmp_path / order, epochs=2)
        cfg.data.backend, cfg.data.ffcv_order, cfg.data.knn_train = backend, order, str(folder)
        cfg.data.train = data_path(backend, folder, write_mode="jpg")
        cfg.train.run_dir = str(tmp_path / order / "runs")
        configs.append(tmp_path / order / "config.json")
        configs[-1].write_text(json.dumps(to_dict(cfg)))
    script = tmp_path / "stop_resume.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, *accelerate_2proc(), str(script), *map(str, configs)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    for order in orders:
        runs = tmp_path / order / "runs"
        for rank in (0, 1):
            report = json.loads((runs / f"rank{rank}.json").read_text())
            assert report["world"] == 2 and report["stopped_at"] == [1, 1, 4], (order, report)
            assert report["loader_state"] == ([1, 1] if backend == "dali" else None), (order, report)
        reference, got = losses(runs / "reference"), losses(runs / "stopped")
        assert [s for s, _ in got] == [s for s, _ in reference] == list(range(1, 7)), order
        assert [v for _, v in got] == pytest.approx([v for _, v in reference], rel=1e-5, abs=1e-6), order
