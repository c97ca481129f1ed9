"""A stop mid-epoch then a resume reproduces every logged loss of an uninterrupted run, per loader.

The torchvision loader draws each image's augmentation from (seed, epoch, image), so any
resume is exact (tests/test_engine.py). DALI draws from per-pipeline generators that advance
batch by batch, so the resumed epoch's pipeline must be rebuilt from DALI's own checkpoint
of the interrupted one (`DaliLoader.state_dict`, kept per rank in rng/rank<r>.pt).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import requires_dali
from fastssl import engine
from test_engine import read_csv
from test_faults import StopAt, counting, quick_config


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r["loss"])) for r in read_csv(run_dir / "train_log.csv")]


@requires_dali
def test_dali_stop_mid_epoch_then_resume_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = quick_config(tmp_path, epochs=2)  # 3 steps per epoch
    cfg.data.backend = "dali"
    cfg.train.run_dir = str(tmp_path / "reference")
    engine.train(cfg)
    reference = losses(Path(cfg.train.run_dir))

    cfg.train.run_dir = str(tmp_path / "stopped")
    StopAt.counter[0], StopAt.step = 0, 4  # one batch into the second epoch, DALI prefetching ahead
    with monkeypatch.context() as m:
        m.setattr(engine, "GracefulStop", StopAt)
        m.setattr(engine, "train_step", counting(engine.train_step))
        engine.train(cfg)
    run_dir = Path(cfg.train.run_dir)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)["state"]
    assert (saved["epoch"], saved["batch_in_epoch"], saved["step"]) == (1, 1, 4)
    loader_state = torch.load(run_dir / "rng" / "rank0.pt", weights_only=False)["loader"]
    assert (loader_state["epoch"], loader_state["batch"]) == (1, 1)
    engine.train(cfg, resume=True)

    got = losses(run_dir)
    assert [s for s, _ in got] == [s for s, _ in reference] == list(range(1, 7))
    assert [v for _, v in got] == pytest.approx([v for _, v in reference], rel=1e-5, abs=1e-6)
