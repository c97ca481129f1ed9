"""`mira_assign_views`: the one-collective custom-op path equals the per-iteration reference,
traces under torch.compile without graph breaks, and gathers correctly across 2 real ranks."""

from __future__ import annotations

import pytest
import torch

from dist_utils import DEVICES, on_device, requires_gloo, run_distributed
from fastssl.ops import mira_assign, mira_assign_views

SHAPES = [(64, 3000), (512, 3000), (64, 100)]


def logits(b: int, k: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(b, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("b,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_float64_reference(one_thread, b, k, dtype):
    views = [logits(b, k, 1).to(dtype), logits(b, k, 2).to(dtype)]
    got = mira_assign_views(views, tau=0.225, beta=0.7, num_iters=30)
    for v, g in zip(views, got):
        ref = mira_assign(v.double(), tau=0.225, beta=0.7, num_iters=30)  # same iterations, same start
        assert g.dtype == torch.float32 and g.shape == (b, k)
        torch.testing.assert_close(g.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("num_iters", [0, 1, 5])
def test_one_iteration_behind_both_paths(one_thread, num_iters):
    """`mira_assign` (all-reduced sums) and `solve_views` (gathered rows) run the same iteration,
    step for step: equal at every iteration count, not only near the fixed point."""
    from fastssl.ops.mira import mira_fixed_point
    from fastssl.ops.mira_fused import solve_views

    x = torch.stack([logits(32, 40, 6), logits(32, 40, 7)]).double()
    got = solve_views(x, 0.225, 0.7, num_iters)
    torch.testing.assert_close(got, mira_fixed_point(x, 0.225, 0.7, num_iters), atol=0, rtol=0)
    for v in range(2):
        torch.testing.assert_close(got[v], mira_assign(x[v], tau=0.225, beta=0.7, num_iters=num_iters),
                                   atol=1e-12, rtol=0)


def test_extreme_logits_and_empty_clusters(one_thread):
    x = logits(32, 50, 3, scale=1e4)
    x[:, :10] = float("-inf")  # clusters no sample can take
    got, = mira_assign_views([x], num_iters=30)
    assert torch.isfinite(got).all()
    assert (got[:, :10] == 0).all()
    torch.testing.assert_close(got.sum(1), torch.ones(32))
    torch.testing.assert_close(got.double(), mira_assign(x.double(), num_iters=30), atol=1e-5, rtol=0)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="equal-shape"):
        mira_assign_views([torch.randn(4, 5), torch.randn(3, 5)])
    with pytest.raises(ValueError, match="beta"):
        mira_assign_views([torch.randn(4, 5)], beta=1.0)


def test_compiled_loss_step_has_no_graph_break(one_thread):
    """The custom op is opaque to dynamo: a whole loss step traces as one graph."""
    proj = torch.nn.Linear(16, 20)

    def loss_step(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        t0, t1 = mira_assign_views([proj(x0).detach(), proj(x1).detach()], tau=0.225, beta=0.7, num_iters=5)
        s0, s1 = torch.log_softmax(proj(x0) / 0.1, 1), torch.log_softmax(proj(x1) / 0.1, 1)
        return -0.5 * ((t0 * s1).sum(1).mean() + (t1 * s0).sum(1).mean())

    x0, x1 = torch.randn(8, 16), torch.randn(8, 16)
    explained = torch._dynamo.explain(loss_step)(x0, x1)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(loss_step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x0, x1), loss_step(x0, x1))


def _two_rank_views(rank: int, world_size: int, full: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    rows, on = full[0].shape[0] // world_size, on_device(device)
    return mira_assign_views([v[rank * rows:(rank + 1) * rows].to(on) for v in full], tau=0.225, beta=0.7,
                             num_iters=30)


@requires_gloo
@pytest.mark.parametrize("device", DEVICES)
def test_two_ranks_equal_one_process(device):
    """On CUDA the gathered logits go through the fused kernel (when it is built): its 1e-5 goal."""
    full = [logits(16, 30, 4), logits(16, 30, 5)]
    r0, r1 = run_distributed(_two_rank_views, world_size=2, args=(full, device))
    single = mira_assign_views(full, tau=0.225, beta=0.7, num_iters=30)
    for v in range(2):
        torch.testing.assert_close(torch.cat([r0[v], r1[v]]), single[v], atol=1e-6 if device == "cpu" else 1e-5,
                                   rtol=0)


def test_bench_mira_writes_one_record_per_implementation_and_size(tmp_path):
    from conftest import load_tool

    out = tmp_path / "mira.json"
    records = load_tool("bench_mira").main(["--sizes", "8x20,16x30", "--device", "cpu", "--repeats", "2",
                                            "--warmup", "1", "--json", str(out)])
    assert len(records) == 6 and {r["implementation"] for r in records} == {"reference", "views", "sinkhorn"}
    assert all(r["median_us"] > 0 for r in records)
    assert len(__import__("json").loads(out.read_text())["records"]) == 6


def test_bench_mira_keeps_the_sizes_it_finished_when_stopped(tmp_path, monkeypatch):
    """gpu_check stops it at a deadline: the JSON is written after every size, so the first
    size's timings (the goal's, 512 x 3000, on a GPU) survive."""
    import json

    from conftest import load_tool

    bench, out = load_tool("bench_mira"), tmp_path / "mira.json"
    timed = []

    def time_call(fn, views, device, warmup, repeats):
        if views[0].shape[0] == 16:  # the second size: the deadline
            raise KeyboardInterrupt
        timed.append(views[0].shape)
        return 1.0

    monkeypatch.setattr(bench, "time_call", time_call)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--sizes", "8x20,16x30", "--device", "cpu", "--impls", "reference,views", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [(r["B"], r["implementation"]) for r in saved["records"]] == [(8, "reference"), (8, "views")]
    assert saved["complete"] is False
