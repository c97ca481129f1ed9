"""Tests for fastssl.ops.sinkhorn_assign (SwAV's Sinkhorn-Knopp) against an independent float64
reference written like SwAV's code (probability space, K x B), the equipartition property,
robustness cases and a real 2-process gloo run."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastssl.ops import sinkhorn_assign

try:
    from dist_utils import requires_gloo, run_distributed
except ImportError:  # tests/ imported as a package
    from tests.dist_utils import requires_gloo, run_distributed

EPS = 0.05


pytestmark = pytest.mark.usefixtures("one_thread")


def ref_sinkhorn_np(scores, eps: float, num_iters: int) -> np.ndarray:
    """SwAV's distributed_sinkhorn for one process, literally, in float64."""
    Q = np.exp(np.asarray(scores, dtype=np.float64) / eps).T  # K x B
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(num_iters):
        Q = Q / Q.sum(axis=1, keepdims=True)
        Q = Q / K
        Q = Q / Q.sum(axis=0, keepdims=True)
        Q = Q / B
    return (Q * B).T


def cosine_logits(B: int, K: int, seed: int, dim: int = 16) -> torch.Tensor:
    """Cosine similarities in [-1, 1], like SwAV's scores (so exp(score / 0.05) fits float64)."""
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.randn(B, dim, generator=g), dim=1)
    c = F.normalize(torch.randn(K, dim, generator=g), dim=1)
    return e @ c.T


def assert_rows_are_distributions(Q: torch.Tensor, atol: float = 1e-5) -> None:
    assert torch.isfinite(Q).all(), "non-finite targets"
    assert (Q >= 0).all()
    torch.testing.assert_close(Q.sum(dim=1).double(), torch.ones(Q.shape[0], dtype=torch.float64),
                               atol=atol, rtol=0)


@pytest.mark.parametrize("B,K", [(7, 3), (64, 100), (256, 3000), (512, 30)])
@pytest.mark.parametrize("n", [1, 3, 10])
def test_matches_swav_reference(B, K, n):
    x = cosine_logits(B, K, seed=B + K)
    Q = sinkhorn_assign(x, eps=EPS, num_iters=n)
    assert Q.dtype == torch.float32 and Q.shape == (B, K)
    assert_rows_are_distributions(Q)
    err = np.abs(Q.double().numpy() - ref_sinkhorn_np(x.numpy(), EPS, n)).max()
    assert err < 1e-5, f"B={B} K={K} n={n}: {err:.3g}"


def test_float64_exact_and_default_args():
    x = cosine_logits(40, 12, seed=1).double()
    Q = sinkhorn_assign(x)  # eps = 0.05, num_iters = 3 (SwAV's defaults)
    assert Q.dtype == torch.float64
    assert np.abs(Q.numpy() - ref_sinkhorn_np(x.numpy(), 0.05, 3)).max() < 1e-12


@pytest.mark.parametrize("B,K", [(96, 12), (300, 300), (64, 200), (256, 64)])
def test_converges_to_equipartition(B, K):
    """Many sweeps: every cluster gets B/K samples' worth of mass (SwAV's constraint), each
    sample is a distribution. (With K > B the constraint is still feasible for soft labels.)"""
    x = cosine_logits(B, K, seed=2)
    Q = sinkhorn_assign(x.double(), eps=EPS, num_iters=300)
    assert_rows_are_distributions(Q, atol=1e-10)
    cluster_mass = Q.sum(dim=0) / B
    assert (cluster_mass - 1.0 / K).abs().max().item() < 1e-9 / K
    # float32 input gets there too, to float32 precision
    Q32 = sinkhorn_assign(x, eps=EPS, num_iters=300)
    assert (Q32.sum(dim=0) / B - 1.0 / K).abs().max().item() < 1e-4 / K
    # while 1 sweep is visibly not there yet on the same data (the check has power)
    Q3 = sinkhorn_assign(x.double(), eps=EPS, num_iters=1)
    assert (Q3.sum(dim=0) / B - 1.0 / K).abs().max().item() > 1e-4 / K


def test_huge_logits_are_finite():
    g = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(64, 50, generator=g) < 0.5, -1e4, 1e4)
    x[:, 7] = -1e4  # a cluster nobody wants
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.isfinite(ref_sinkhorn_np(x.numpy(), EPS, 3)).all()  # naive overflows
    Q = sinkhorn_assign(x)
    assert_rows_are_distributions(Q)


def test_matches_reference_where_float32_exp_would_overflow():
    # scores of about +-6 -> exp(120) overflows float32 but not float64
    x = cosine_logits(32, 16, seed=3) * 10
    assert not torch.isfinite(torch.exp(x / EPS)).all()
    Q = sinkhorn_assign(x)
    assert np.abs(Q.double().numpy() - ref_sinkhorn_np(x.numpy(), EPS, 3)).max() < 1e-5


def test_minus_inf_column_gets_zero_mass():
    x = cosine_logits(16, 6, seed=4)
    x[:, 2] = float("-inf")
    Q = sinkhorn_assign(x)
    assert_rows_are_distributions(Q)
    assert (Q[:, 2] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input(dtype):
    x = cosine_logits(128, 300, seed=5).to(dtype)
    Q = sinkhorn_assign(x)
    assert Q.dtype == torch.float32
    assert_rows_are_distributions(Q)
    torch.testing.assert_close(Q, sinkhorn_assign(x.float()), atol=0, rtol=0)


@pytest.mark.parametrize("K", [1, 5, 3000])
def test_single_sample(K):
    x = cosine_logits(1, K, seed=6)
    Q = sinkhorn_assign(x)
    assert_rows_are_distributions(Q)
    assert np.abs(Q.double().numpy() - ref_sinkhorn_np(x.numpy(), EPS, 3)).max() < 1e-5


def test_no_grad():
    x = cosine_logits(8, 5, seed=7).requires_grad_(True)
    Q = sinkhorn_assign(x)
    assert not Q.requires_grad and Q.grad_fn is None


@pytest.mark.parametrize("kwargs,name", [
    (dict(logits=torch.zeros(5)), "logits"),
    (dict(logits=torch.zeros(2, 3, 4)), "logits"),
    (dict(eps=0.0), "eps"),
    (dict(eps=-1.0), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(num_iters=0), "num_iters"),
    (dict(num_iters=1.5), "num_iters"),
])
def test_bad_arguments(kwargs, name):
    args = dict(logits=torch.zeros(4, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        sinkhorn_assign(**args)


# ------------------------------------------------------------------------- distributed
DIST_CASES = [  # (B, K, rows per rank, num_iters)
    (64, 100, [32, 32], 3),
    (8, 10, [5, 3], 3),
    (8, 10, [3, 5], 50),
    (6, 4, [6, 0], 3),  # a rank with no rows
]


def dist_logits(B: int, K: int, seed: int) -> torch.Tensor:
    x = cosine_logits(B, K, seed=seed)
    x[: B // 2, : K // 2] += 0.5  # halves prefer different clusters: local != global
    return x


def _sinkhorn_worker(rank: int, world_size: int, cases) -> list[torch.Tensor]:
    outs = []
    for i, (B, K, splits, n) in enumerate(cases):
        mine = torch.split(dist_logits(B, K, seed=i), splits)[rank]
        outs.append(sinkhorn_assign(mine, num_iters=n))
    return outs


@requires_gloo
def test_two_processes_match_single_process():
    per_rank = run_distributed(_sinkhorn_worker, world_size=2, args=(DIST_CASES,), timeout=120)
    for i, (B, K, splits, n) in enumerate(DIST_CASES):
        x = dist_logits(B, K, seed=i)
        full = sinkhorn_assign(x, num_iters=n)
        got = torch.cat([per_rank[r][i] for r in range(2)])
        assert got.shape == (B, K)
        err = (got - full).abs().max().item()
        assert err < 1e-6, f"case {i}: {err:.3g}"
        if min(splits) > 0:
            local = torch.cat([sinkhorn_assign(p, num_iters=n) for p in torch.split(x, splits)])
            assert (local - full).abs().max().item() > 1e-3
