"""Tests for fastssl.ops.mira_assign against an independent float64 reference (NumPy,
probability space, the authors' algorithm written out literally), the optimality conditions
of the paper (Eq. 4-6), robustness cases and a real 2-process gloo run.

MIRA: Lee et al. 2022, Sec. 3.1-3.2. Notation: P = softmax(z / tau / (1 - beta)),
a = beta / (1 - beta), u^(0) = (colmean P)^(1-beta), Eq. 7 update, Eq. 5 target.
"""

from __future__ import annotations


import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastssl.ops import mira_assign

try:
    from dist_utils import requires_gloo, run_distributed
except ImportError:  # tests/ imported as a package
    from tests.dist_utils import requires_gloo, run_distributed

TAU = 0.225
BETA = 2 / 3


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- references
def _ref_start(logits, tau: float, beta: float):
    """P = softmax(z / tau / (1 - beta)), the exponent a = beta / (1 - beta), and u^(0), in float64."""
    z = np.asarray(logits, dtype=np.float64) / tau / (1.0 - beta)
    z = z - z.max(axis=1, keepdims=True)
    P = np.exp(z)
    P = P / P.sum(axis=1, keepdims=True)
    return P, beta / (1.0 - beta), P.mean(axis=0) ** (1.0 - beta)


def ref_mira_np(logits, tau: float, beta: float, num_iters: int) -> np.ndarray:
    """The authors' assignment, literally, in float64 probability space (no log tricks)."""
    P, a, u = _ref_start(logits, tau, beta)
    for _ in range(num_iters):
        T = P / (P * u ** (-a)).sum(axis=1, keepdims=True)
        u = T.mean(axis=0) ** (1.0 - beta)
    W = P * u ** (-a)
    return W / W.sum(axis=1, keepdims=True)


def ref_mira_np_snapshots(logits, tau: float, beta: float, iters: list[int]) -> dict[int, np.ndarray]:
    """Same as ref_mira_np, returning the target after each n in ``iters`` from one run."""
    P, a, u = _ref_start(logits, tau, beta)
    out = {}
    for n in range(max(iters) + 1):
        if n in iters:
            W = P * u ** (-a)
            out[n] = W / W.sum(axis=1, keepdims=True)
        T = P / (P * u ** (-a)).sum(axis=1, keepdims=True)
        u = T.mean(axis=0) ** (1.0 - beta)
    return out


def ref_mira_converged(logits, tau: float, beta: float, max_iters: int = 20000) -> np.ndarray:
    """Eq. 7 iterated to its fixed point (|du| < 1e-14) in float64; asserts convergence."""
    P, a, u = _ref_start(logits, tau, beta)
    for _ in range(max_iters):
        T = P / (P * u ** (-a)).sum(axis=1, keepdims=True)
        u_new = T.mean(axis=0) ** (1.0 - beta)
        done = np.abs(u_new - u).max() < 1e-14
        u = u_new
        if done:
            break
    else:
        raise AssertionError("float64 reference did not converge")
    W = P * u ** (-a)
    return W / W.sum(axis=1, keepdims=True)


def objective_eq4(W: np.ndarray, logits, tau: float, beta: float) -> float:
    """Eq. 4: -1/B sum w log p + (1-beta)/B sum w log w + beta sum wbar log wbar, p = softmax(z/tau)."""
    z = np.asarray(logits, dtype=np.float64) / tau
    log_p = z - z.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    B = W.shape[0]
    wlogw = np.where(W > 0, W * np.log(np.where(W > 0, W, 1.0)), 0.0)
    wbar = W.mean(axis=0)
    wbar_log = np.where(wbar > 0, wbar * np.log(np.where(wbar > 0, wbar, 1.0)), 0.0)
    return float(-(W * log_p).sum() / B + (1 - beta) * wlogw.sum() / B + beta * wbar_log.sum())


def cosine_logits(B: int, K: int, seed: int, dim: int = 16, scale: float = 1.0) -> torch.Tensor:
    """Logits like the real ones (cosine similarities of embeddings and prototypes), float32."""
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.randn(B, dim, generator=g), dim=1)
    c = F.normalize(torch.randn(K, dim, generator=g), dim=1)
    return (e @ c.T) * scale


def assert_rows_are_distributions(W: torch.Tensor, atol: float = 1e-5) -> None:
    assert torch.isfinite(W).all(), "non-finite targets"
    assert (W >= 0).all(), "negative targets"
    torch.testing.assert_close(W.sum(dim=1).double(), torch.ones(W.shape[0], dtype=torch.float64),
                               atol=atol, rtol=0)


# ------------------------------------------------------------------ same-iteration agreement
@pytest.mark.parametrize("B,K,beta", [
    (7, 3, BETA), (7, 3000, BETA), (64, 100, BETA), (512, 3, BETA), (512, 3000, BETA),
    (64, 100, 0.0), (64, 100, 0.5), (64, 100, 0.9), (7, 3000, 0.9), (512, 3, 0.3),
])
def test_matches_reference_iteration_by_iteration(B, K, beta):
    x = cosine_logits(B, K, seed=B * 7919 + K, scale=2.0)
    iters = [0, 1, 5, 30]
    refs = ref_mira_np_snapshots(x.numpy(), TAU, beta, iters)
    for n in iters:
        W = mira_assign(x, tau=TAU, beta=beta, num_iters=n)
        assert W.dtype == torch.float32 and W.shape == (B, K)
        err = np.abs(W.double().numpy() - refs[n]).max()
        assert err < 1e-5, f"B={B} K={K} beta={beta} n={n}: max abs err {err:.3g}"


@pytest.mark.parametrize("n", [0, 3, 30])
def test_float64_input_is_float64_exact(n):
    x = cosine_logits(64, 100, seed=1, scale=3.0).double()
    W = mira_assign(x, num_iters=n)
    assert W.dtype == torch.float64
    err = np.abs(W.numpy() - ref_mira_np(x.numpy(), TAU, BETA, n)).max()
    assert err < 1e-12, err


def test_beta_zero_gives_model_probabilities():
    # beta = 0 removes the MI term of Eq. 1: the target is p = softmax(z / tau) itself.
    x = cosine_logits(32, 10, seed=2, scale=3.0)
    torch.testing.assert_close(mira_assign(x, beta=0.0), torch.softmax(x / TAU, dim=1), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- convergence & optimality
@pytest.mark.parametrize("B,K,beta,scale", [(64, 100, BETA, 1.0), (64, 100, 0.75, 3.0),
                                            (128, 300, BETA, 3.0), (50, 20, 0.9, 3.0)])
def test_converges_to_fixed_point(B, K, beta, scale):
    x = cosine_logits(B, K, seed=K + B, scale=scale)
    W_star = ref_mira_converged(x.numpy(), TAU, beta)
    err_long = np.abs(mira_assign(x, beta=beta, num_iters=1000).double().numpy() - W_star).max()
    err_30 = np.abs(mira_assign(x, beta=beta).double().numpy() - W_star).max()
    err_30_f64 = np.abs(mira_assign(x.double(), beta=beta).numpy() - W_star).max()
    print(f"\n[mira] B={B} K={K} beta={beta:.3f} scale={scale}: max|W_30 - W*| = {err_30:.3g} "
          f"(float32), {err_30_f64:.3g} (float64); max|W_1000 - W*| = {err_long:.3g}")
    assert err_long < 1e-5
    assert err_30 < 0.05  # loose sanity bound: 30 steps are (close to) converged


@pytest.mark.slow
def test_converges_to_fixed_point_full_size():
    x = cosine_logits(512, 3000, seed=5, scale=3.0)
    W_star = ref_mira_converged(x.numpy(), TAU, BETA)
    err_30 = np.abs(mira_assign(x).double().numpy() - W_star).max()
    err_long = np.abs(mira_assign(x, num_iters=300).double().numpy() - W_star).max()
    print(f"\n[mira] B=512 K=3000: max|W_30 - W*| = {err_30:.3g}, max|W_300 - W*| = {err_long:.3g}")
    assert err_long < 1e-5 and err_30 < 0.05


@pytest.mark.parametrize("beta", [0.5, BETA, 0.8])
def test_fixed_point_satisfies_eq5(beta):
    """At convergence W* = rownorm(p^(1/(1-beta)) * wbar^(-beta/(1-beta))) with wbar = colmean W*,
    p = softmax(z / tau) (Eq. 5), and wbar satisfies Eq. 6."""
    x = cosine_logits(40, 12, seed=3, scale=3.0).double()
    W = mira_assign(x, beta=beta, num_iters=3000).numpy()
    z = x.numpy() / TAU
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    wbar = W.mean(axis=0)
    a = beta / (1 - beta)
    rhs = p ** (1 / (1 - beta)) * wbar ** (-a)
    rhs /= rhs.sum(1, keepdims=True)
    assert np.abs(W - rhs).max() < 1e-10  # Eq. 5
    inner = (p ** (1 / (1 - beta)) / (p ** (1 / (1 - beta)) * wbar ** (-a)).sum(1, keepdims=True)).mean(0)
    assert np.abs(wbar - inner ** (1 - beta)).max() < 1e-10  # Eq. 6


@pytest.mark.parametrize("beta", [0.3, BETA, 0.9])
def test_fixed_point_minimises_eq4(beta):
    """Eq. 4 is strictly convex (Prop. 1): every feasible perturbation of W* has a larger value."""
    x = cosine_logits(24, 8, seed=4, scale=3.0).double()
    W = mira_assign(x, beta=beta, num_iters=5000).numpy()
    f_star = objective_eq4(W, x.numpy(), TAU, beta)
    rng = np.random.default_rng(0)
    for t in [1e-3, 1e-2, 0.1, 0.5]:
        for _ in range(25):
            R = rng.dirichlet(np.ones(W.shape[1]), size=W.shape[0])  # random rows on the simplex
            W2 = (1 - t) * W + t * R  # convex combination: still feasible
            assert objective_eq4(W2, x.numpy(), TAU, beta) > f_star, (t, beta)
            W3 = W * np.exp(t * rng.standard_normal(W.shape))  # multiplicative, renormalised
            W3 /= W3.sum(1, keepdims=True)
            assert objective_eq4(W3, x.numpy(), TAU, beta) > f_star, (t, beta)
    # and the MI term matters: W* is not simply p (the beta = 0 optimum) for beta > 0
    p = torch.softmax(x / TAU, dim=1).numpy()
    assert objective_eq4(p, x.numpy(), TAU, beta) > f_star + 1e-6


# --------------------------------------------------------------------------- robustness
def test_huge_logits_are_finite():
    g = torch.Generator().manual_seed(0)
    x = torch.where(torch.rand(64, 50, generator=g) < 0.5, -1e4, 1e4)
    x[:, 7] = -1e4  # and one cluster nobody wants
    W = mira_assign(x)
    assert_rows_are_distributions(W)
    # mass only where the logit is maximal in its row
    assert (W[x < 0] < 1e-6).all()


def test_empty_cluster_matches_float64_and_beats_naive_float32():
    """A cluster no sample likes: P underflows to 0 in float32, the authors' u^(-a) is inf and the
    targets NaN; the log-space op is finite and equals the float64 probability-space result."""
    x = cosine_logits(64, 20, seed=6, scale=1.0)
    x[:, 3] = -40.0  # P_i3 ~ exp(-40 / 0.075): 0 in float32, ~1e-232 in float64
    # the naive float32 computation really breaks here (so this test has teeth)
    P = torch.softmax(x / TAU / (1 - BETA), dim=1)
    u = P.mean(0) ** (1 - BETA)
    naive = P * u ** (-BETA / (1 - BETA))
    assert not torch.isfinite(naive / naive.sum(1, keepdim=True)).all()

    for n in [0, 30]:
        W = mira_assign(x, num_iters=n)
        assert_rows_are_distributions(W)
        assert np.abs(W.double().numpy() - ref_mira_np(x.numpy(), TAU, BETA, n)).max() < 1e-5


def test_minus_inf_logits_get_zero_mass():
    x = cosine_logits(16, 6, seed=7, scale=2.0)
    x[:, 2] = float("-inf")  # a masked-out prototype
    x[0, 4] = float("-inf")
    W = mira_assign(x)
    assert_rows_are_distributions(W)
    assert (W[:, 2] == 0).all() and W[0, 4] == 0
    keep = [0, 1, 3, 4, 5]
    x_kept = x[:, keep].clone()
    x_kept = np.where(np.isinf(x_kept.numpy()), -1e300, x_kept.numpy().astype(np.float64))
    ref = ref_mira_np(x_kept, TAU, BETA, 30)
    assert np.abs(W[:, keep].double().numpy() - ref).max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input(dtype):
    x = cosine_logits(128, 300, seed=8, scale=3.0).to(dtype)
    W = mira_assign(x)
    assert W.dtype == torch.float32
    assert_rows_are_distributions(W)
    # computed in float32 from the (rounded) input: identical to passing it as float32
    torch.testing.assert_close(W, mira_assign(x.float()), atol=0, rtol=0)
    big = (torch.randn(32, 40, generator=torch.Generator().manual_seed(0)) * 3e4).clamp(-6e4, 6e4).to(dtype)
    assert_rows_are_distributions(mira_assign(big))


@pytest.mark.parametrize("K", [1, 5, 3000])
def test_single_sample(K):
    x = cosine_logits(1, K, seed=9, scale=3.0)
    W = mira_assign(x)
    assert W.shape == (1, K)
    assert_rows_are_distributions(W)
    assert np.abs(W.double().numpy() - ref_mira_np(x.numpy(), TAU, BETA, 30)).max() < 1e-5


def test_empty_batch_and_no_grad():
    assert mira_assign(torch.zeros(0, 5)).shape == (0, 5)
    x = cosine_logits(8, 5, seed=10).requires_grad_(True)
    W = mira_assign(x)
    assert not W.requires_grad and W.grad_fn is None


# ------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("kwargs,name", [
    (dict(logits=torch.zeros(5)), "logits"),
    (dict(logits=torch.zeros(2, 3, 4)), "logits"),
    (dict(logits=[[0.0, 1.0]]), "logits"),
    (dict(logits=torch.zeros(3, 0)), "logits"),
    (dict(tau=0.0), "tau"),
    (dict(tau=-0.1), "tau"),
    (dict(tau=float("nan")), "tau"),
    (dict(tau=float("inf")), "tau"),
    (dict(beta=-0.01), "beta"),
    (dict(beta=1.0), "beta"),
    (dict(beta=float("nan")), "beta"),
    (dict(num_iters=-1), "num_iters"),
    (dict(num_iters=2.5), "num_iters"),
    (dict(num_iters=True), "num_iters"),
])
def test_bad_arguments(kwargs, name):
    args = dict(logits=torch.zeros(4, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        mira_assign(**args)


# ------------------------------------------------------------------------- distributed
# (B, K, rows per rank, num_iters, beta)
DIST_CASES = [
    (64, 100, [32, 32], 30, BETA),
    (8, 10, [5, 3], 30, BETA),
    (8, 10, [5, 3], 0, 0.75),
    (6, 4, [0, 6], 30, BETA),   # a rank with no rows at all
    (64, 100, [40, 24], 7, 0.9),
]


def dist_logits(B: int, K: int, seed: int) -> torch.Tensor:
    """Logits whose first and second halves prefer different clusters, so a marginal taken
    over one rank's rows differs clearly from the global one."""
    x = cosine_logits(B, K, seed=seed, scale=2.0)
    x[: B // 2, : K // 2] += 1.0
    return x


def _mira_worker(rank: int, world_size: int, cases) -> list[torch.Tensor]:
    import torch.distributed as dist

    sub = dist.new_group(list(range(world_size)))  # an explicit group must work like None
    outs = []
    for i, (B, K, splits, n, beta) in enumerate(cases):
        x = dist_logits(B, K, seed=i)
        mine = torch.split(x, splits)[rank]
        outs.append(mira_assign(mine, beta=beta, num_iters=n, group=sub if i % 2 else None))
    return outs


@requires_gloo
def test_two_processes_match_single_process():
    per_rank = run_distributed(_mira_worker, world_size=2, args=(DIST_CASES,), timeout=120)
    for i, (B, K, splits, n, beta) in enumerate(DIST_CASES):
        x = dist_logits(B, K, seed=i)
        full = mira_assign(x, beta=beta, num_iters=n)
        got = torch.cat([per_rank[r][i] for r in range(2)])
        assert got.shape == (B, K)
        err = (got - full).abs().max().item()
        assert err < 1e-6, f"case {i}: {err:.3g}"
        # the test has power: the per-rank (local-marginal) answer is clearly different
        if min(splits) > 0:
            local = torch.cat([mira_assign(part, beta=beta, num_iters=n) for part in torch.split(x, splits)])
            assert (local - full).abs().max().item() > 1e-3


def test_pseudo_label_mi_meets_its_closed_forms():
    """Eq. 2: 0 for identical rows (whatever they are) and for uniform ones; log B for one-hot rows on
    B distinct clusters; log(B / 2) for pairs of rows that share a cluster; never negative."""
    from fastssl.ops import pseudo_label_mi

    g = torch.Generator().manual_seed(0)
    row = torch.softmax(torch.randn(1, 12, generator=g), dim=1)
    assert pseudo_label_mi(row.expand(8, 12)).item() == pytest.approx(0.0, abs=1e-6)
    assert pseudo_label_mi(torch.full((8, 12), 1 / 12)).item() == pytest.approx(0.0, abs=1e-6)
    assert pseudo_label_mi(torch.eye(12)[:8]).item() == pytest.approx(math.log(8), rel=1e-6)
    assert pseudo_label_mi(torch.eye(12)[[0, 0, 1, 1, 2, 2, 3, 3]]).item() == pytest.approx(math.log(4), rel=1e-6)
    soft = torch.softmax(torch.randn(64, 12, generator=g) * 3, dim=1)
    assert 0 < pseudo_label_mi(soft).item() < math.log(12)

