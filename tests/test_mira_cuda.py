"""The fused CUDA MIRA kernel (`fastssl/ops/csrc/mira_fused.cu`) and its loader (`fastssl.ops._cuda_ext`).

- CPU, always: the loader's fallback (one clear warning, `load_fused()` is None), and an
  emulation of the kernel's decomposition (per-CTA row blocks, 8-row tiles, per-CTA column
  partials merged across CTAs as the kernel merges them, log2 units, the -inf guards) against
  the float64 reference, so the algorithm is tested where the kernel cannot run.
- slow, where nvcc exists: the extension compiles for sm_90 WITHOUT a GPU and imports.
- GPU (skipped without CUDA): the kernel itself, through each route (NVRTC, nvcc), vs float64
  `solve_views` on the benchmark grid, dtypes and edge cases, every output element written, and
  the custom op really dispatching to it with no graph break under torch.compile.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from fastssl.ops import _cuda_ext, mira_assign_views
from fastssl.ops.mira_fused import solve_views

REPO = Path(__file__).resolve().parents[1]
TAU, BETA = 0.225, 0.7
LOG2E = 1.0 / math.log(2.0)
NEG_INF = float("-inf")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")
requires_nvcc = pytest.mark.skipif(_cuda_ext.nvcc_path() is None,
                                   reason="nvcc not found (no CUDA toolkit): the extension cannot be compiled")


def random_views(v: int, b: int, k: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(v, b, k, generator=torch.Generator().manual_seed(seed))


def with_edge_cases(x: torch.Tensor) -> torch.Tensor:
    """-inf entries, a column -inf in every row, and an empty cluster (nobody likes it)."""
    x = x.clone()
    x[:, :, 7] = x.amin() - 50.0 * x.std()  # hugely negative log-marginal
    x[:, :, 0] = NEG_INF  # P = 0 exactly: u = 0, masked prior
    x[:, 1, 2:5] = NEG_INF  # a row with -inf entries
    return x


# ------------------------------------------------------------------------------ loader, CPU
@pytest.fixture
def fresh_loader():
    """A loader that has not tried to build yet (and is reset again afterwards)."""
    _cuda_ext._reset_for_tests()
    yield _cuda_ext
    _cuda_ext._reset_for_tests()


def test_disabled_by_env_warns_once_and_returns_none(fresh_loader, monkeypatch):
    monkeypatch.setenv("FASTSSL_FUSED_MIRA", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fresh_loader.load_fused() is None
        assert fresh_loader.load_fused() is None
        assert fresh_loader.fused_for(torch.device("cuda", 0)) is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "FASTSSL_FUSED_MIRA=0" in messages[0] and "reference implementation" in messages[0]
    assert fresh_loader.status()["loaded"] is False and "disabled" in fresh_loader.status()["reason"]


def test_missing_nvcc_warns_once_in_a_fresh_process(tmp_path):
    """CUDA_HOME pointing nowhere (read by torch at import): one warning naming nvcc, None."""
    code = ("import warnings\n"
            "warnings.simplefilter('always')\n"
            "from fastssl.ops import _cuda_ext\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    r = [_cuda_ext.load_fused(), _cuda_ext.load_fused()]\n"
            "msgs = [str(x.message) for x in w if issubclass(x.category, RuntimeWarning)]\n"
            "print(repr(r), len(msgs)); print(msgs[0] if msgs else '')\n")
    env = {**os.environ, "CUDA_HOME": str(tmp_path / "no-cuda"), "FASTSSL_EXT_DIR": str(tmp_path / "ext"),
           "TORCH_CUDA_ARCH_LIST": "9.0", "PYTHONPATH": str(REPO), "FASTSSL_FUSED_MIRA": "nvcc"}  # that route only
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    first, message = out.stdout.splitlines()[:2]
    assert first == "[None, None] 1"
    assert "nvcc not found" in message and "reference implementation" in message


def test_compile_error_reports_the_first_log_lines(fresh_loader, tmp_path, monkeypatch):
    """A source that does not compile: build() raises with nvcc's error line, load_fused warns."""
    if _cuda_ext.nvcc_path() is None:
        pytest.skip("nvcc not found: there is no compiler to fail")
    bad = tmp_path / "broken.cu"
    bad.write_text("this is not C++;\n")
    monkeypatch.setenv("FASTSSL_EXT_DIR", str(tmp_path / "ext"))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setenv("FASTSSL_FUSED_MIRA", "nvcc")  # the nvcc route only (NVRTC would load on a GPU)
    with pytest.raises(RuntimeError, match="error") as info:
        _cuda_ext.build(sources=[bad], headers=[])
    assert "broken.cu" in str(info.value)
    # torch skips a second build of unchanged sources in one process, so load a new broken one
    bad2 = tmp_path / "broken2.cu"
    bad2.write_text("neither is this;\n")
    monkeypatch.setattr(_cuda_ext.build, "__defaults__", (False, (bad2,), ()))
    with pytest.warns(RuntimeWarning, match="broken2.cu.*error") as caught:
        assert fresh_loader.load_fused() is None
    assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1


def test_extension_name_changes_with_the_source(tmp_path):
    src = tmp_path / "a.cu"
    src.write_text("// v1\n")
    first = _cuda_ext.extension_name([src], "9.0")
    assert _cuda_ext.extension_name([src], "9.0") == first
    assert _cuda_ext.extension_name([src], "8.0") != first
    assert _cuda_ext.extension_name([src], "9.0", "/usr/local/cuda-12.4") != first  # another node's toolkit
    src.write_text("// v2\n")
    assert _cuda_ext.extension_name([src], "9.0") != first


def test_cpu_op_does_not_touch_the_loader(fresh_loader):
    """CPU calls keep the reference and never build anything."""
    mira_assign_views([torch.randn(8, 10)], num_iters=2)
    assert fresh_loader.status()["attempted"] is False


# --------------------------------------------------------------------------- compile, no GPU
@pytest.mark.slow
@requires_nvcc
def test_extension_compiles_for_sm90_without_a_gpu(tmp_path, monkeypatch):
    """The real build (TORCH_CUDA_ARCH_LIST=9.0), into a cache dir; the .so imports with no GPU."""
    cache = Path(os.environ.get("FASTSSL_TEST_EXT_DIR", tmp_path / "ext"))
    monkeypatch.setenv("FASTSSL_EXT_DIR", str(cache))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    start = time.perf_counter()
    module = _cuda_ext.build()
    seconds = time.perf_counter() - start
    print(f"extension build (or cache load) took {seconds:.1f} s")
    assert callable(module.mira_assign_views_cuda)
    assert list(cache.glob("fastssl_mira_fused_*/*.so"))
    assert seconds < 300, f"building took {seconds:.0f} s"
    if not torch.cuda.is_available():  # the binding's checks run before any CUDA call
        with pytest.raises(RuntimeError, match="CUDA tensor"):
            module.mira_assign_views_cuda(torch.randn(1, 2, 3), TAU, BETA, 1)


# ------------------------------------------------------------------- kernel emulation, CPU
def _merge(m: torch.Tensor, s: torch.Tensor, m2: torch.Tensor, s2: torch.Tensor):
    """merge_lse of the kernel: two (max, sum) pairs; two -inf maxima leave (-inf, s)."""
    nm = torch.maximum(m, m2)
    dead = nm == NEG_INF
    safe = torch.where(dead, torch.zeros_like(nm), nm)
    merged = s * torch.exp2(m - safe) + s2 * torch.exp2(m2 - safe)
    return torch.where(dead, m, nm), torch.where(dead, s, merged)


def _column_partials(lp: torch.Tensor, r: torch.Tensor, cpv: int, tile: int) -> torch.Tensor:
    """V x B x K -> V x K x cpv x 2: each CTA's (max, sum) over its rows, online over 8-row chunks."""
    v, b, k = lp.shape
    out = []
    for c in range(cpv):
        r0, r1 = c * b // cpv, (c + 1) * b // cpv
        cm, cs = torch.full((v, k), NEG_INF), torch.zeros(v, k)
        for i0 in range(r0, r1, tile):
            w = lp[:, i0:min(i0 + tile, r1)] - r[:, i0:min(i0 + tile, r1)]
            tm = w.amax(1)
            nm = torch.maximum(cm, tm)
            dead = nm == NEG_INF  # every P so far is exactly 0: skip the chunk
            safe = torch.where(dead, torch.zeros_like(nm), nm)
            acc = torch.where(cm == NEG_INF, torch.zeros_like(cs), cs * torch.exp2(cm - safe))
            acc = acc + torch.exp2(w - safe.unsqueeze(1)).sum(1)
            cm, cs = torch.where(dead, cm, nm), torch.where(dead, cs, acc)
        out.append(torch.stack([cm, cs], -1))
    return torch.stack(out, 2)


def _merge_columns(partial: torch.Tensor, a: float, beta: float, log2_b: float) -> torch.Tensor:
    """V x K x cpv x 2 -> a log2 u (V x K): lanes take partials q, q+32, ..., then a butterfly."""
    v, k, cpv, _ = partial.shape
    m, s = torch.full((v, k, 32), NEG_INF), torch.zeros(v, k, 32)
    for q in range(cpv):
        lane = q % 32
        m[..., lane], s[..., lane] = _merge(m[..., lane], s[..., lane], partial[:, :, q, 0], partial[:, :, q, 1])
    lanes = torch.arange(32)
    for o in (16, 8, 4, 2, 1):
        m, s = _merge(m, s, m[..., lanes ^ o], s[..., lanes ^ o])
    m, s = m[..., 0], s[..., 0]
    lu = torch.where(m == NEG_INF, m, (1.0 - beta) * (m + torch.log2(s) - log2_b))
    return torch.zeros_like(lu) if a == 0.0 else a * lu


def _row_pass(lp: torch.Tensor, alu: torch.Tensor):
    """Row max and sum of ex2(. - max) of the masked log prior (add_log_prior)."""
    v = torch.where(lp == NEG_INF, lp, lp - alu.unsqueeze(1))
    m = v.amax(2, keepdim=True)
    return v, m, torch.exp2(v - m).sum(2, keepdim=True)


def emulate_kernel(logits: torch.Tensor, tau: float, beta: float, num_iters: int, cpv: int,
                   tile: int = 8) -> torch.Tensor:
    """The kernel's algorithm in float32 torch ops, phase by phase (see the .cu's design notes)."""
    z = logits.float()
    c2 = LOG2E / (tau * (1.0 - beta))
    a = beta / (1.0 - beta)
    log2_b = math.log2(z.shape[1])
    zmax = z.amax(2, keepdim=True)  # init_log_p: z - max(z) before scaling
    lp = (z - zmax) * c2 - torch.log2(torch.exp2((z - zmax) * c2).sum(2, keepdim=True))
    alu = _merge_columns(_column_partials(lp, torch.zeros_like(lp[..., :1]), cpv, tile), a, beta, log2_b)
    for _ in range(num_iters):  # Eq. 7
        _, m, s = _row_pass(lp, alu)
        alu = _merge_columns(_column_partials(lp, m + torch.log2(s), cpv, tile), a, beta, log2_b)
    v, m, s = _row_pass(lp, alu)  # Eq. 5
    return torch.exp2(v - m) * (1.0 / s)


@pytest.mark.parametrize("b,k,cpv", [(64, 300, 33), (50, 97, 3), (37, 41, 1), (512, 3000, 66)])
def test_kernel_decomposition_matches_the_float64_reference(one_thread, b, k, cpv):
    x = with_edge_cases(random_views(2, b, k, seed=b + k))
    for iters in (0, 1, 30):
        got = emulate_kernel(x, TAU, BETA, iters, cpv)
        ref = solve_views(x.double(), TAU, BETA, iters)
        assert torch.isfinite(got).all()
        assert (got[:, :, 0] == 0).all() and (got[:, 1, 2:5] == 0).all()
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("beta", [0.0, 2 / 3])
def test_kernel_decomposition_extreme_logits(one_thread, beta):
    x = with_edge_cases(random_views(2, 40, 60, seed=7, scale=1e4))
    x[0, :, 10] = 1e4  # ties at the extreme
    x[1, :5, 11] = -1e4
    got = emulate_kernel(x, TAU, beta, 30, cpv=6)
    ref = solve_views(x.double(), TAU, beta, 30)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- GPU tests
@pytest.fixture(scope="module", params=_cuda_ext.ROUTES)
def fused(request):
    """Each route's kernel on its own: NVRTC (launched from Python) and the nvcc extension."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none is visible)")
    if request.param == "nvcc" and _cuda_ext.nvcc_path() is None:
        pytest.skip("nvcc not found: the extension route cannot be built")
    if request.param == "nvrtc":
        try:
            import cuda.bindings.nvrtc  # noqa: F401
        except ImportError as exc:
            pytest.skip(f"the CUDA Python bindings are not installed ({exc}): no NVRTC route")
    try:
        if request.param == "nvrtc":
            from fastssl.ops import _nvrtc

            return _nvrtc.load()
        return _cuda_ext.build()
    except RuntimeError as exc:
        pytest.fail(f"the fused kernel's {request.param} route did not load: {exc}")


GRID = [(64, 3000), (512, 3000), (4096, 3000), (64, 16384), (512, 16384), (4096, 16384)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check_against_reference(fused, x: torch.Tensor, iters: int, beta: float = BETA) -> torch.Tensor:
    """Kernel output (into a NaN-poisoned buffer) vs float64 solve_views: 1e-5 max abs."""
    out = torch.full(x.shape, float("nan"), device="cuda")
    got = fused.mira_assign_views_cuda(x, TAU, beta, iters, out=out)
    assert got.data_ptr() == out.data_ptr() and not torch.isnan(out).any(), "some output element was not written"
    ref = solve_views(x.double(), TAU, beta, iters)
    err = (got.double() - ref).abs().max().item()
    assert err <= 1e-5, f"max abs error {err:.3g} for {tuple(x.shape)} {x.dtype} iters={iters}"
    return got


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("b,k", GRID)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_equals_float64_reference(fused, b, k, dtype):
    x = random_views(2, b, k, seed=b ^ k).to("cuda", dtype)
    _check_against_reference(fused, x, 30)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("b,k", [(64, 3000), (512, 3000), (4096, 16384)])
@pytest.mark.parametrize("iters", [0, 1, 30])
def test_fused_edge_cases_and_iteration_counts(fused, b, k, iters):
    x = with_edge_cases(random_views(2, b, k, seed=3)).cuda()
    got = _check_against_reference(fused, x, iters)
    assert (got[:, :, 0] == 0).all() and (got[:, 1, 2:5] == 0).all()
    torch.testing.assert_close(got.sum(2), torch.ones(2, b, device="cuda"), atol=1e-5, rtol=0)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.0, 2 / 3])
def test_fused_extreme_logits_and_empty_clusters(fused, dtype, beta):
    x = with_edge_cases(random_views(2, 512, 3000, seed=5, scale=1e4))
    x[:, :, 100:200] = -1e4  # clusters nobody likes
    x[0, :, 10] = 1e4
    _check_against_reference(fused, x.to("cuda", dtype), 30, beta=beta)


@requires_cuda
@pytest.mark.gpu
def test_fused_many_views_and_odd_shapes(fused):
    """More views than co-resident CTAs split over launches; K below the block size; many rows with
    log P in shared memory (several row tiles per CTA; one view: more CTAs than a warp's 4 x 32
    partials on an H100)."""
    _check_against_reference(fused, random_views(300, 8, 20, seed=1).cuda(), 5)
    _check_against_reference(fused, random_views(3, 1, 7, seed=2).cuda(), 3)
    for views in (1, 2):
        _check_against_reference(fused, with_edge_cases(random_views(views, 1100, 300, seed=4)).cuda(), 30)


@requires_cuda
@pytest.mark.gpu
def test_fused_rejects_bad_input(fused):
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        fused.mira_assign_views_cuda(torch.randn(2, 4, 5, device="cuda", dtype=torch.float64), TAU, BETA, 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        fused.mira_assign_views_cuda(torch.randn(2, 5, 4, device="cuda").transpose(1, 2), TAU, BETA, 1)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        fused.mira_assign_views_cuda(torch.randn(2, 4, 5), TAU, BETA, 1)


@requires_cuda
@pytest.mark.gpu
def test_custom_op_uses_the_fused_kernel_and_compiles_without_breaks(fused):
    before = _cuda_ext.status()["fused_calls"]
    views = [torch.randn(64, 300, device="cuda") for _ in range(2)]
    got = mira_assign_views(views, tau=TAU, beta=BETA, num_iters=30)
    status = _cuda_ext.status()
    assert status["fused_calls"] == before + 1 and all(status["self_check"].values()), status
    ref = solve_views(torch.stack(views).double(), TAU, BETA, 30)
    torch.testing.assert_close(torch.stack(got).double(), ref, atol=1e-5, rtol=0)

    proj = torch.nn.Linear(16, 300).cuda()

    def step(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        t0, t1 = mira_assign_views([proj(x0).detach(), proj(x1).detach()], tau=TAU, beta=BETA, num_iters=30)
        s0, s1 = torch.log_softmax(proj(x0) / 0.1, 1), torch.log_softmax(proj(x1) / 0.1, 1)
        return -0.5 * ((t0 * s1).sum(1).mean() + (t1 * s0).sum(1).mean())

    x0, x1 = torch.randn(32, 16, device="cuda"), torch.randn(32, 16, device="cuda")
    explained = torch._dynamo.explain(step)(x0, x1)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(step, fullgraph=True)
    calls = _cuda_ext.status()["fused_calls"]
    torch.testing.assert_close(compiled(x0, x1), step(x0, x1))
    assert _cuda_ext.status()["fused_calls"] >= calls + 2  # the compiled graph calls the op too


@requires_cuda
@pytest.mark.gpu
def test_float64_on_cuda_keeps_the_reference(fused):
    before = _cuda_ext.status()["fused_calls"]
    x = torch.randn(16, 30, device="cuda", dtype=torch.float64)
    got, = mira_assign_views([x], num_iters=5)
    assert got.dtype == torch.float64 and _cuda_ext.status()["fused_calls"] == before


@requires_cuda
@pytest.mark.gpu
def test_the_kernel_passes_its_self_check_in_a_separate_process(fused):
    """What `fused_for` runs before any launch in the training process: the child loads the route
    (from the build this process made), checks it against float64 and exits 0; the verdict is
    kept for the machine's next processes."""
    from fastssl.ops import _nvrtc

    route = "nvrtc" if isinstance(fused, _nvrtc.NvrtcFused) else "nvcc"
    for kept in (_cuda_ext.cache_root() / "self_checks").glob(f"{route}_*.json"):
        kept.unlink()  # so that the child runs now
    start = time.monotonic()
    assert _cuda_ext._self_check_in_child(route, 0) is None
    print(f"{route}: the self-check in a separate process took {time.monotonic() - start:.1f} s")
    assert len(list((_cuda_ext.cache_root() / "self_checks").glob(f"{route}_*.json"))) == 1
