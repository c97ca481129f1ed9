"""The fused MIRA kernel without nvcc (`fastssl.ops._nvrtc`) and the route chain of `_cuda_ext`.

On CPU: NVRTC compiles the real kernel for sm_80 and sm_90 (no GPU needed) into a cubin with
the six entry points; the grid planning mirrors mira_fused.cu's rules; the argument struct
matches the kernel's; the route chain (NVRTC, nvcc, reference) picks, falls back and warns
once. The launch itself runs on a GPU: tests/test_mira_cuda.py's GPU tests (both routes) and
tools/gpu_check.py's `fused` stage.
"""

from __future__ import annotations

import ctypes
import re
import struct
import sys
import warnings

import pytest
import torch

from fastssl.ops import _cuda_ext, _nvrtc


def _nvrtc_here() -> str | None:
    """Why NVRTC and the driver bindings cannot be had here, or None when they can."""
    try:
        _nvrtc.nvrtc_version()
        _nvrtc._bindings("driver")
    except RuntimeError as exc:
        return str(exc)
    return None


def nvrtc_or_skip() -> tuple[int, int]:
    try:
        return _nvrtc.nvrtc_version()
    except RuntimeError as exc:
        pytest.skip(f"NVRTC is not available here: {exc}")


# ------------------------------------------------------------------------------ compiling, CPU
@pytest.mark.slow  # two real compiles: about 6 s of CPU each
@pytest.mark.parametrize("arch", [80, 90])
def test_nvrtc_compiles_the_kernel_to_a_cubin_without_a_gpu(arch, tmp_path, monkeypatch):
    nvrtc_or_skip()
    monkeypatch.setenv("FASTSSL_EXT_DIR", str(tmp_path))
    compiled = _nvrtc.compile_kernel(arch, use_cache=False)
    image = compiled.image
    assert compiled.kind == "cubin" and compiled.target == f"sm_{arch}"
    assert image[:4] == b"\x7fELF" and image[4] == 2  # ELF, 64-bit
    assert struct.unpack_from("<H", image, 18)[0] == 190  # e_machine EM_CUDA
    flags = struct.unpack_from("<I", image, 48)[0]
    assert arch in {flags & 0xFF, (flags >> 8) & 0xFF}, hex(flags)  # the SM in e_flags (old / new layout)
    for name in _nvrtc.ENTRY_POINTS:  # extern "C": the names unmangled in the symbol table
        assert re.search(rb"\x00" + name.encode() + rb"\x00", image), name
    assert not list(tmp_path.iterdir())  # use_cache=False writes nothing


def test_compile_errors_name_the_line(tmp_path, monkeypatch):
    nvrtc_or_skip()
    monkeypatch.setenv("FASTSSL_EXT_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"mira_kernel.cu\(2\): error"):
        _nvrtc.compile_kernel(90, source='extern "C" __global__ void k() {}\nthis is not C++;\n')


def test_compiled_images_are_cached_on_disk(tmp_path, monkeypatch):
    """A second process finds the image: same source, same file; another source, another file."""
    nvrtc_or_skip()
    monkeypatch.setenv("FASTSSL_EXT_DIR", str(tmp_path))
    src = 'extern "C" __global__ void fastssl_tiny(float* x) { x[threadIdx.x] = 1.f; }\n'
    first = _nvrtc.compile_kernel(90, source=src)
    files = list((tmp_path / "nvrtc").glob("*.cubin"))
    assert len(files) == 1 and files[0].read_bytes() == first.image
    files[0].write_bytes(b"\x7fELF-from-the-cache")  # what a later process would load
    _nvrtc._compiled.clear()
    assert _nvrtc.compile_kernel(90, source=src).image == b"\x7fELF-from-the-cache"
    _nvrtc.compile_kernel(90, source=src + "// edited\n")
    assert len(list((tmp_path / "nvrtc").glob("*.cubin"))) == 2
    assert not list((tmp_path / "nvrtc").glob(".*.tmp"))


def test_a_device_newer_than_nvrtc_gets_ptx(tmp_path, monkeypatch):
    nvrtc_or_skip()
    monkeypatch.setenv("FASTSSL_EXT_DIR", str(tmp_path))
    newest = max(_nvrtc.supported_archs())
    got = _nvrtc.compile_kernel(newest + 1, source='extern "C" __global__ void fastssl_tiny() {}\n')
    assert got.kind == "ptx" and got.target == f"compute_{newest}" and b".entry fastssl_tiny" in got.image


# ---------------------------------------------------------------------- launch planning, CPU
H100 = {"cooperative": True, "sms": 132, "smem_max": 227 * 1024}


def test_plan_keeps_log_p_in_shared_memory_when_it_fits():
    """2 x 512 x 3000 on 132 SMs: 66 CTAs per view, 8 rows each, log P in shared memory."""
    plan = _nvrtc.plan_launch(2, 512, 3000, blocks_per_sm=lambda s, m: 1, **H100)
    rows = 8  # ceil(512 / 66)
    assert plan == _nvrtc.Plan(True, 66, 2, 4 * ((rows + 8) + 16 * 8 + 8 + rows * 3000))


def test_plan_streams_from_global_memory_for_large_shapes():
    seen = []

    def occupancy(in_smem: bool, smem: int) -> int:
        seen.append((in_smem, smem))
        return 1

    plan = _nvrtc.plan_launch(2, 4096, 16384, blocks_per_sm=occupancy, **H100)
    assert plan.error == "" and not plan.in_smem and plan.cpv == 66 and plan.views_per_launch == 2
    assert plan.smem == 4 * ((63 + 1) + 8 + 16 * 8 + 8)  # 63 rows per CTA, padded to 64 + one tile
    assert seen == [(False, plan.smem)]  # 63 x 16384 floats never fit: smem variant not even asked


def test_plan_splits_many_views_over_launches_and_refuses_what_cannot_run():
    plan = _nvrtc.plan_launch(300, 8, 20, blocks_per_sm=lambda s, m: 2, **H100)
    assert plan.in_smem and plan.cpv == 1 and plan.views_per_launch == 264  # 2 CTAs x 132 SMs
    assert "cooperative" in _nvrtc.plan_launch(2, 8, 20, blocks_per_sm=lambda s, m: 1,
                                               **{**H100, "cooperative": False}).error
    assert "too many" in _nvrtc.plan_launch(1, 10**6, 10, blocks_per_sm=lambda s, m: 1,
                                            **{**H100, "sms": 1, "smem_max": 1024}).error
    assert "cannot be resident" in _nvrtc.plan_launch(2, 4096, 16384, blocks_per_sm=lambda s, m: 0, **H100).error


def test_the_self_check_runs_every_entry_point_and_names_the_one_that_fails():
    """Each input dtype, in shared and in global memory (on an H100 and on any GPU): a fault in
    an entry point the check skipped would come in the training process."""
    problems = _cuda_ext._self_check_problems(torch.device("cpu"))
    plans = [_nvrtc.plan_launch(*x.shape, blocks_per_sm=lambda s, m: 1, **H100) for x in problems]
    entries = {(x.dtype, p.in_smem) for x, p in zip(problems, plans)}
    assert entries == {(d, in_smem) for d in (torch.float32, torch.bfloat16, torch.float16) for in_smem in (True, False)}
    # one row per CTA beyond any GPU's shared memory (H100 227 KB, B200 228 KB)
    assert all(_nvrtc.smem_bytes_for(1, x.shape[2], True) > 256 * 1024 for x in problems if x.shape[2] > 1000)
    # on an H100: a problem with more CTAs per view than the warp's 4 x 32 partials, several row tiles each
    assert any(p.in_smem and p.cpv > 4 * 32 and x.shape[1] / p.cpv > _nvrtc.TILE for x, p in zip(problems, plans))
    from fastssl.ops.mira_fused import solve_views

    class WrongInHalf:  # the reference, off by 1e-3 on fp16 inputs only
        def mira_assign_views_cuda(self, x, tau, beta, iters):
            out = solve_views(x.float(), tau, beta, iters)
            return out + 1e-3 if x.dtype == torch.float16 else out

    assert "torch.float16" in _cuda_ext._self_check(WrongInHalf(), torch.device("cpu"))


def test_params_match_the_kernel_struct():
    """The ctypes mirror has the .cuh struct's fields, in order, 64 bytes; values as mira_launch sets them."""
    text = _nvrtc.KERNEL_SOURCE.read_text()
    body = re.search(r"struct Params \{(.*?)\};", text, re.S).group(1)
    names = [n for decl in re.sub(r"//[^\n]*", "", body).split(";") if decl.strip()
             for n in re.findall(r"(\w+)\s*(?:,|$)", decl.strip())]
    assert names == [f[0] for f in _nvrtc.Params._fields_]
    assert ctypes.sizeof(_nvrtc.Params) == 64 and _nvrtc.Params.B.offset == 32 and _nvrtc.Params.c2.offset == 48
    p = _nvrtc.make_params(1, 2, 3, 4, 512, 3000, 66, 30, tau=0.225, beta=0.7)
    assert (p.B, p.K, p.cpv, p.num_iters) == (512, 3000, 66, 30)
    assert p.c2 == pytest.approx(1.4426950408889634 / (0.225 * 0.3), rel=1e-7)
    assert p.a == pytest.approx(0.7 / 0.3, rel=1e-7) and p.log2_b == 9.0


class FakeDriver:
    """cuda.bindings.driver's calls `_DeviceKernels` makes, on an H100 whose entry points have the
    static shared memory given, enforcing CUDA's rule for the dynamic-smem attribute: dynamic + static
    <= the device's opt-in maximum, else CUDA_ERROR_INVALID_VALUE."""

    OPTIN = 227 * 1024

    def __init__(self, static: dict[str, int]) -> None:
        real = _nvrtc._bindings("driver")
        self.CUresult, self.CUdevice_attribute = real.CUresult, real.CUdevice_attribute
        self.CUfunction_attribute = real.CUfunction_attribute
        self.static, self.dynamic_limit = static, {}
        self.ok = self.CUresult.CUDA_SUCCESS

    def cuGetErrorName(self, err): return (self.ok, err.name.encode())
    def cuInit(self, flags): return (self.ok,)
    def cuDeviceGet(self, index): return (self.ok, index)
    def cuDevicePrimaryCtxRetain(self, device): return (self.ok, 7)
    def cuCtxGetCurrent(self): return (self.ok, 7)
    def cuModuleLoadData(self, image): return (self.ok, "module")
    def cuModuleGetFunction(self, module, name): return (self.ok, name.decode())

    def cuDeviceGetAttribute(self, attr, device):
        a = self.CUdevice_attribute
        return (self.ok, {a.CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH: 1, a.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: 132,
                          a.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: self.OPTIN}[attr])

    def cuFuncGetAttribute(self, attr, fn):
        assert attr == self.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
        return (self.ok, self.static[fn])

    def cuFuncSetAttribute(self, fn, attr, value):
        assert attr == self.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if value + self.static[fn] > self.OPTIN:
            return (self.CUresult.CUDA_ERROR_INVALID_VALUE,)
        self.dynamic_limit[fn] = value
        return (self.ok,)


def test_the_dynamic_smem_limit_leaves_room_for_each_entry_points_static_shared_memory(monkeypatch):
    """As mira_fused.cu's `dynamic_smem_limit`: each function's limit is raised to the opt-in maximum
    less its static shared memory (raising it to the whole maximum is refused when a kernel has any),
    and the plan is bounded by the smallest of them."""
    if (why := _nvrtc_here()) is not None:
        pytest.skip(f"cuda.bindings is not available here: {why}")
    static = {name: 1024 * (i == 2) for i, name in enumerate(_nvrtc.ENTRY_POINTS)}
    driver = FakeDriver(static)
    monkeypatch.setattr(_nvrtc, "_bindings", lambda name: driver)
    monkeypatch.setattr(_nvrtc, "compile_kernel", lambda arch: _nvrtc.Compiled(b"\x7fELF", "cubin", f"sm_{arch}"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    dev = _nvrtc._DeviceKernels(0)
    assert driver.dynamic_limit == {name: FakeDriver.OPTIN - static[name] for name in _nvrtc.ENTRY_POINTS}
    assert dev.smem_max == FakeDriver.OPTIN - 1024 and (dev.cooperative, dev.sms) == (True, 132)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_load_without_a_gpu_says_so():
    nvrtc_or_skip()
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        _nvrtc.load()
    with pytest.raises(RuntimeError, match="CUDA tensor"):  # the extension's checks, in its order
        _nvrtc.NvrtcFused().mira_assign_views_cuda(torch.randn(2, 3, 4, dtype=torch.float64), 0.2, 0.5, 1)


# --------------------------------------------------------------------------- route chain, CPU
class FakeKernel:
    def __init__(self, route: str) -> None:
        self.route = route


@pytest.fixture
def chain(monkeypatch):
    """_cuda_ext with fake routes: `loads` and `checks` say which load and pass their self-check
    (`child_checks`: the one in a separate process, which runs first)."""
    _cuda_ext._reset_for_tests()
    monkeypatch.delenv("FASTSSL_FUSED_MIRA", raising=False)
    cfg = {"loads": {"nvrtc": True, "nvcc": True}, "checks": {"nvrtc": True, "nvcc": True},
           "child_checks": {"nvrtc": True, "nvcc": True}, "tried": [], "checked_here": []}

    def load_route(route: str, verbose: bool):
        cfg["tried"].append(route)
        if not cfg["loads"][route]:
            raise RuntimeError(f"{route} cannot load here")
        return FakeKernel(route)

    def self_check(module, device):
        cfg["checked_here"].append(module.route)
        return None if cfg["checks"][module.route] else f"self-check on {device} failed: {module.route} wrong"

    def child_check(route, index):
        return None if cfg["child_checks"][route] else f"the {route} kernel's self-check ... killed by SIGABRT"

    monkeypatch.setattr(_cuda_ext, "_load_route", load_route)
    monkeypatch.setattr(_cuda_ext, "_self_check", self_check)
    monkeypatch.setattr(_cuda_ext, "_self_check_in_child", child_check)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # no CUDA runtime here
    yield cfg
    _cuda_ext._reset_for_tests()


def run_chain(device: torch.device = torch.device("cuda", 0)):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _cuda_ext.fused_for(device)
        again = _cuda_ext.fused_for(device)
    assert first is again
    return first, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_nvrtc_is_the_first_route(chain):
    got, msgs = run_chain()
    assert got.route == "nvrtc" and chain["tried"] == ["nvrtc"]
    assert len(msgs) == 1 and "built by NVRTC" in msgs[0], msgs
    assert _cuda_ext.status()["route"] == "nvrtc"


def test_success_is_said_on_rank_zero_only_and_a_passed_over_route_on_every_rank(chain, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    got, msgs = run_chain()
    assert got.route == "nvrtc" and msgs == []
    _cuda_ext._reset_for_tests()
    chain["loads"]["nvrtc"] = False
    got, msgs = run_chain()
    assert got.route == "nvcc" and len(msgs) == 1 and "nvrtc cannot load here" in msgs[0], msgs
    _cuda_ext._reset_for_tests()
    monkeypatch.setenv("RANK", "0")
    chain["loads"]["nvrtc"] = True
    got, msgs = run_chain()
    assert got.route == "nvrtc" and len(msgs) == 1 and "built by NVRTC" in msgs[0], msgs


def test_nvcc_when_nvrtc_cannot_load(chain):
    chain["loads"]["nvrtc"] = False
    got, msgs = run_chain()
    assert got.route == "nvcc" and chain["tried"] == ["nvrtc", "nvcc"]
    assert len(msgs) == 1 and "nvcc-built torch extension" in msgs[0] and "nvrtc cannot load here" in msgs[0]


def test_a_failed_self_check_moves_to_the_next_route(chain):
    chain["checks"]["nvrtc"] = False
    got, msgs = run_chain()
    assert got.route == "nvcc" and len(msgs) == 1 and "nvrtc wrong" in msgs[0], msgs
    assert "nvrtc wrong" in _cuda_ext.status()["route_reasons"]["nvrtc"]


def test_a_route_that_fails_in_the_child_never_runs_here(chain):
    """A kernel that faults in the separate check is never launched in the training process
    (whose CUDA context the fault would poison); the next route is checked both ways."""
    chain["child_checks"]["nvrtc"] = False
    got, msgs = run_chain()
    assert got.route == "nvcc" and chain["checked_here"] == ["nvcc"]
    assert len(msgs) == 1 and "killed by SIGABRT" in msgs[0], msgs


def test_the_reference_when_no_route_works(chain):
    chain["checks"]["nvrtc"] = False
    chain["loads"]["nvcc"] = False
    got, msgs = run_chain()
    assert got is None and len(msgs) == 1, msgs
    assert "not used" in msgs[0] and "nvrtc wrong" in msgs[0] and "nvcc cannot load here" in msgs[0]
    assert "reference implementation" in msgs[0] and _cuda_ext.status()["route"] is None


@pytest.mark.parametrize("only", ["nvcc", "nvrtc"])
def test_the_environment_can_name_one_route(chain, monkeypatch, only):
    monkeypatch.setenv("FASTSSL_FUSED_MIRA", only)
    chain["loads"] = {"nvrtc": only == "nvrtc", "nvcc": only == "nvcc"}
    got, msgs = run_chain()
    assert got.route == only and chain["tried"] == [only] and len(msgs) == 1


# ------------------------------------------------------------ the self-check's separate process, CPU
def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_childs_verdict_is_kept_and_names_what_failed(tmp_path):
    from fastssl.ops._child_check import verdict_in_child

    passed, failed = tmp_path / "pass.json", tmp_path / "fail.json"
    assert verdict_in_child(python("pass"), passed, timeout=60) is None
    assert verdict_in_child(python("raise SystemExit(3)"), passed, timeout=60) is None  # kept: not run again
    wrong = python("import sys; print('max abs error 0.5', file=sys.stderr); sys.exit(1)")
    first = verdict_in_child(wrong, failed, timeout=60, what="the nvrtc kernel's self-check")
    assert first.startswith("the nvrtc kernel's self-check in a separate process failed (exit status 1): max abs error 0.5")
    assert f"kept in {failed}: delete it to check again" in first
    assert verdict_in_child(python("pass"), failed, timeout=60) == first
    failed.unlink()
    assert verdict_in_child(python("pass"), failed, timeout=60) is None


def test_a_child_that_dies_or_hangs_fails_and_one_that_cannot_check_decides_nothing(tmp_path):
    from fastssl.ops._child_check import INCONCLUSIVE_EXIT, verdict_in_child

    died = verdict_in_child(python("import os; os.abort()"), tmp_path / "abort.json", timeout=60)
    assert "failed (killed by SIGABRT)" in died
    hung = verdict_in_child(python("import time; time.sleep(60)"), tmp_path / "hang.json", timeout=1)
    assert "did not finish within 1 s" in hung and (tmp_path / "hang.json").exists()  # every process would hang
    assert verdict_in_child([str(tmp_path / "no-such-python")], tmp_path / "none.json", timeout=60) is None
    cannot = python(f"raise SystemExit({INCONCLUSIVE_EXIT})")  # e.g. no device for a second process
    assert verdict_in_child(cannot, tmp_path / "cannot.json", timeout=60) is None
    assert not (tmp_path / "none.json").exists() and not (tmp_path / "cannot.json").exists()


def test_the_processes_of_a_machine_share_one_child(tmp_path):
    """The first process runs the child; the others wait on the lock and read its verdict."""
    import threading

    from fastssl.ops._child_check import verdict_in_child

    runs = tmp_path / "runs.txt"
    argv = python(f"import time; open({str(runs)!r}, 'a').write('run\\n'); time.sleep(0.5)")
    got = []
    callers = [threading.Thread(target=lambda: got.append(verdict_in_child(argv, tmp_path / "v.json", 60)),
                                daemon=True) for _ in range(3)]  # daemon: a caller stuck on the lock fails the test only
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in callers), "a process still waits on the lock after 120 s"
    assert got == [None, None, None] and runs.read_text() == "run\n"


def test_the_self_check_child_imports_this_checkout_and_says_when_it_cannot_check(tmp_path, monkeypatch):
    """The real child command, with no GPU visible to it: it runs this checkout's entry point, which
    finds no device and exits INCONCLUSIVE_EXIT, so no verdict is kept (the in-process check decides)."""
    import subprocess

    from fastssl.ops._child_check import INCONCLUSIVE_EXIT

    monkeypatch.setenv("FASTSSL_EXT_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the child's view, also on a GPU machine
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.chdir(tmp_path)  # the child finds fastssl through PYTHONPATH, not the working folder
    children = []
    real_run = subprocess.run

    def run(*args, **kwargs):
        children.append(real_run(*args, **kwargs))
        return children[-1]

    monkeypatch.setattr(subprocess, "run", run)
    assert _cuda_ext._self_check_in_child("nvrtc", 0) is None
    (child,) = children
    assert child.returncode == INCONCLUSIVE_EXIT, child.stderr
    assert "could not run the self-check here: RuntimeError: " in child.stderr, child.stderr  # no driver/device
    assert not (tmp_path / "self_checks").exists() or not list((tmp_path / "self_checks").glob("*.json"))


# ---------------------------------------------------------------------- the launcher, CPU
def test_launch_mirrors_mira_launch(monkeypatch):
    """One cooperative launch per views_per_launch views on torch's stream; each gets its views'
    pointers and the kernel arguments, read back from the kernelParams array the driver gets."""
    launches = []

    class FakeDriver:
        class CUresult:
            CUDA_SUCCESS = 0

        @staticmethod
        def CUstream(handle):
            return ("stream", handle)

        @staticmethod
        def cuLaunchCooperativeKernel(fn, gx, gy, gz, bx, by, bz, smem, stream, params):
            argv = (ctypes.c_void_p * 1).from_address(params)
            p = _nvrtc.Params.from_address(argv[0])
            launches.append({"fn": fn, "grid": (gx, gy, gz), "block": (bx, by, bz), "smem": smem, "stream": stream,
                             **{name: getattr(p, name) for name, _ in _nvrtc.Params._fields_}})
            return (0,)

    class FakeStream:
        cuda_stream = 4242

    monkeypatch.setattr(_nvrtc, "_bindings", lambda name: FakeDriver)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    dev = type("Dev", (), {"functions": {name: f"fn:{name}" for name in _nvrtc.ENTRY_POINTS}})()
    v, b, k = 5, 6, 7
    logits = torch.zeros(v, b, k, dtype=torch.bfloat16)
    out, partial, alu = torch.empty(v, b, k), torch.empty(2, k, 3, 2), torch.empty(2, k)
    plan = _nvrtc.Plan(in_smem=False, cpv=3, views_per_launch=2, smem=1234)
    _nvrtc.NvrtcFused._launch(dev, plan, logits, out, partial, alu, 0.225, 0.7, 30)
    assert [x["grid"] for x in launches] == [(6, 1, 1), (6, 1, 1), (3, 1, 1)]  # views 0-1, 2-3, 4
    for i, x in enumerate(launches):
        assert x["fn"] == "fn:fastssl_mira_bf16_gmem" and x["block"] == (512, 1, 1) and x["smem"] == 1234
        assert x["stream"] == ("stream", 4242)
        assert x["logits"] == logits.data_ptr() + 2 * i * b * k * 2  # bf16: 2 bytes
        assert x["out"] == out.data_ptr() + 2 * i * b * k * 4
        assert (x["partial"], x["alu"]) == (partial.data_ptr(), alu.data_ptr())  # workspaces reused
        assert (x["B"], x["K"], x["cpv"], x["num_iters"]) == (b, k, 3, 30)
