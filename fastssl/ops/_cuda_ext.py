"""Just-in-time build and load of the fused CUDA MIRA kernel (`csrc/mira_kernel.cuh`).

Three routes, in this order, and ONE warning naming the one taken (on rank 0 only when the first
route works; on every rank when one was passed over or none works):
  1. NVRTC (`fastssl.ops._nvrtc`): compiled at run time through the CUDA Python bindings that
     pip's torch installs, launched from Python; needs no nvcc and no toolkit headers;
  2. nvcc: the torch extension built by `build` below (`csrc/mira_fused.cu` + binding);
  3. the reference `solve_views` (no fused kernel).
A route that cannot be had, or whose self-check on the device fails, passes to the next.
``FASTSSL_FUSED_MIRA`` = ``nvrtc`` or ``nvcc`` allows only that route, ``0`` none.

The self-check runs first in a separate process (`fastssl.ops._child_check`, once per kernel
build, GPU model and driver, its verdict kept beside the builds), then in this one: a kernel
that faults would poison this process's CUDA context, leaving no reference to fall back to.

Why JIT: the kernel is one .cu file and the package ships as pure Python; building on first
CUDA use with `torch.utils.cpp_extension.load` matches whatever torch/CUDA the user has. The
build is cached under ``$FASTSSL_EXT_DIR`` (default ``~/.cache/fastssl/torch_extensions/<torch
version>/``) in a folder named after a hash of the source, the target archs and the flags, so
an edit to the .cu rebuilds and an unchanged one loads in milliseconds.

Why a fallback and not an error: the fused kernel is an optimisation of `solve_views`. When it
cannot be had (``FASTSSL_FUSED_MIRA=0``, no nvcc, a compile error, no GPU and no
``TORCH_CUDA_ARCH_LIST``, or a failed self-check against the reference) `load_fused` returns
None, ONE warning per process says why, and callers use the reference.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import torch

__all__ = ["ROUTES", "SOURCES", "allowed_routes", "build", "fused_for", "load_fused", "mira_assign_views_fused",
           "status"]

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (CSRC / "mira_binding.cpp", CSRC / "mira_fused.cu")  # g++ and nvcc, built in parallel
HEADERS = (CSRC / "mira_fused.h", CSRC / "mira_kernel.cuh")
ROUTES = ("nvrtc", "nvcc")  # tried in this order; the reference is the last resort
ROUTE_NAMES = {"nvrtc": "NVRTC (cuda.bindings, no nvcc)", "nvcc": "the nvcc-built torch extension"}
ENV_DISABLE = "FASTSSL_FUSED_MIRA"
ENV_DIR = "FASTSSL_EXT_DIR"
CUDA_FLAGS = ("-O3",)
SELF_CHECK_TOL = 1e-4
CHILD_CHECK_TIMEOUT_S = 180.0  # the child loads the build (or NVRTC's cached cubin) this process just made

_lock = threading.RLock()
_state: dict[str, Any] = {}


def _reset_for_tests() -> None:
    """Forget the loaded module, the failure reason, the warning and the self-checks."""
    with _lock:
        _state.clear()
        _state.update(attempted=False, module=None, route=None, pending=[], reasons={}, reason=None, warned=False,
                      checked={}, fused_calls=0)


_reset_for_tests()


def _disabled_by_env() -> bool:
    return os.environ.get(ENV_DISABLE, "1").strip().lower() in {"0", "false", "no", "off"}


def allowed_routes() -> tuple[str, ...]:
    """`ROUTES`, or the one route ``FASTSSL_FUSED_MIRA`` names (``nvrtc`` / ``nvcc``)."""
    value = os.environ.get(ENV_DISABLE, "").strip().lower()
    return (value,) if value in ROUTES else ROUTES


def arch_list() -> Optional[str]:
    """The archs to compile for: ``$TORCH_CUDA_ARCH_LIST`` (works with no GPU), else the visible GPUs'."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if not torch.cuda.is_available():
        return None
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


def nvcc_path() -> Optional[Path]:
    """nvcc of the CUDA toolkit torch's extension builder will use (CUDA_HOME), if it exists."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if not home:
        return None
    nvcc = Path(home) / "bin" / "nvcc"
    return nvcc if nvcc.is_file() and os.access(nvcc, os.X_OK) else None


@functools.lru_cache(maxsize=None)  # asked for the build's name and for its flags: one nvcc run
def toolkit_root(nvcc: Path) -> Optional[Path]:
    """The CUDA toolkit folder of `nvcc`, as nvcc itself reports it (``TOP=`` of ``--dryrun``).

    Why: torch guesses CUDA_HOME as the parent of the nvcc on PATH and takes cuda_runtime.h and
    -lcudart from there; when that nvcc is a wrapper (here /usr/local/bin/nvcc execs
    /usr/local/cuda-13.0/bin/nvcc) the guess is /usr/local and the g++/link steps fail.
    """
    try:
        out = subprocess.run([str(nvcc), "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    tops = [ln.split("TOP=", 1)[1].strip() for ln in (out.stdout + out.stderr).splitlines() if "TOP=" in ln]
    return Path(tops[0]).resolve() if tops else None


def toolkit_flags(nvcc: Path) -> tuple[list[str], list[str]]:
    """Include folders and -L flags of the real toolkit (those that exist), for g++ and the linker."""
    top = toolkit_root(nvcc)
    if top is None:
        return [], []
    targets = top / "targets" / "x86_64-linux"
    includes = [str(d) for d in (top / "include", targets / "include") if (d / "cuda_runtime.h").exists()]
    libs = [f"-L{d}" for d in (top / "lib64", targets / "lib") if (d / "libcudart.so").exists()]
    return includes, libs


def cache_root() -> Path:
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fastssl" / "torch_extensions" / torch.__version__.replace("+", "_")


def extension_name(sources: Sequence[Path], archs: str, toolkit: str = "") -> str:
    """Module name keyed by source bytes, archs, flags, torch version and the CUDA toolkit (its folder,
    e.g. /usr/local/cuda-12.4): a change rebuilds, and nodes with different toolkits sharing one cache
    folder (a home directory on network storage) never rebuild each other's module while it is loaded."""
    h = hashlib.sha256()
    for path in sources:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    h.update(f"{archs}|{CUDA_FLAGS}|{torch.__version__}|{torch.version.cuda}|{toolkit}".encode())
    return f"fastssl_mira_fused_{h.hexdigest()[:16]}"


def _log_head(exc: BaseException, lines: int = 8) -> str:
    """The first error lines of a failed build (all of ninja's log is too long for a warning)."""
    text = str(exc).splitlines()
    errors = [ln.strip() for ln in text if "error" in ln.lower()]
    return "\n".join((errors or [ln.strip() for ln in text if ln.strip()])[:lines])


def build(verbose: bool = False, sources: Sequence[Path] = SOURCES,
          headers: Sequence[Path] = HEADERS) -> ModuleType:
    """Compile (or load the cached build of) `sources`; raises RuntimeError saying why it cannot."""
    from torch.utils import cpp_extension

    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError(f"nvcc not found (CUDA_HOME={cpp_extension.CUDA_HOME!r}); install the CUDA toolkit "
                           f"or set CUDA_HOME")
    archs = arch_list()
    if archs is None:
        raise RuntimeError("no CUDA device is visible and TORCH_CUDA_ARCH_LIST is not set, so there is no "
                           "architecture to compile for")
    name = extension_name([*sources, *headers], archs, str(toolkit_root(nvcc) or nvcc))
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    includes, libs = toolkit_flags(nvcc)
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by cpp_extension for the -gencode flags
    try:
        return cpp_extension.load(name=name, sources=[str(p) for p in sources], build_directory=str(build_dir),
                                  extra_cflags=["-O3"], extra_cuda_cflags=list(CUDA_FLAGS),
                                  extra_include_paths=includes, extra_ldflags=libs, verbose=verbose)
    except Exception as exc:  # ninja/nvcc failures arrive as RuntimeError, a bad .so as ImportError
        raise RuntimeError(f"building the extension in {build_dir} failed:\n{_log_head(exc)}") from exc
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def _reasons() -> str:
    """Why each route tried so far is not used, e.g. 'NVRTC: ...; nvcc: ...'."""
    return "; ".join(f"{'NVRTC' if r == 'nvrtc' else r}: {why}" for r, why in _state["reasons"].items())


def _fail(reason: str) -> None:
    """Record why the fused kernel is off and warn about it once per process."""
    _state["module"], _state["route"], _state["reason"] = None, None, reason
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"fastssl: the fused CUDA MIRA kernel is not used: {reason}. The reference implementation "
                      f"(fastssl.ops.mira_fused.solve_views) is used instead.", RuntimeWarning, stacklevel=3)


def _load_route(route: str, verbose: bool) -> Any:
    """The kernel of one route (an object with `mira_assign_views_cuda`); raises saying why not."""
    if route == "nvrtc":
        from . import _nvrtc

        return _nvrtc.load()
    return build(verbose=verbose)


def _next_route(verbose: bool = False) -> None:
    """Load the first remaining route that loads; none left: the reference (one warning)."""
    while _state["pending"]:
        route = _state["pending"].pop(0)
        try:
            _state["module"], _state["route"] = _load_route(route, verbose), route
            _state["checked"] = {}
            return
        except Exception as exc:
            _state["reasons"][route] = str(exc)
    _fail(_reasons() or "no route is allowed")


def load_fused(verbose: bool = False) -> Optional[Any]:
    """The kernel of the first route that loads (NVRTC, then nvcc), or None (after one warning)."""
    with _lock:
        if not _state["attempted"]:
            _state["attempted"] = True
            if _disabled_by_env():
                _fail(f"disabled by the environment ({ENV_DISABLE}={os.environ.get(ENV_DISABLE)})")
            else:
                _state["pending"] = list(allowed_routes())
                _next_route(verbose)
        return _state["module"]


SELF_CHECK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 2 rows over 2 CTAs: one row of 100,000 clusters per CTA (400 KB) exceeds any GPU's shared memory: the gmem variant
SELF_CHECK_GMEM_K = 100_000
# 1,100 rows: more CTAs than one warp's 4 x 32 partials (132 on an H100) and several row tiles per CTA
SELF_CHECK_TALL_B = 1_100


def _self_check_problems(device: torch.device) -> list[torch.Tensor]:
    """Every entry point the kernel has: each input dtype, in shared memory (small K, with a masked
    and an empty cluster), in global memory (K too large for shared memory), and one view of many
    rows, so that a CTA reduces several row tiles (a column's running maximum rescaled, one that
    is -inf in the first tiles only) and a column merges more partials than a warp loads at once;
    on `device`."""
    g = torch.Generator().manual_seed(0)
    x = 3.0 * torch.randn(2, 24, 40, generator=g)
    x[:, :, 5] = float("-inf")  # a cluster nobody can take (masked prior)
    x[0, 3, 7] = float("-inf")
    x[1, :, 9] -= 40.0  # an empty cluster (hugely negative log-marginal)
    wide = 3.0 * torch.randn(1, 2, SELF_CHECK_GMEM_K, generator=g)
    tall = 3.0 * torch.randn(1, SELF_CHECK_TALL_B, 300, generator=g)
    tall[0, : SELF_CHECK_TALL_B // 2, 4] = float("-inf")
    return [problem.to(device=device, dtype=dtype) for problem in (x, wide, tall) for dtype in SELF_CHECK_DTYPES]


def _self_check(module: Any, device: torch.device) -> Optional[str]:
    """Kernel vs float64 `solve_views` on each entry point's problem; None if they all agree.

    Why every entry point: a fault in one the check skipped would come in the training process,
    whose CUDA context it poisons. Milliseconds in all."""
    from .mira_fused import solve_views

    for x in _self_check_problems(device):
        got = module.mira_assign_views_cuda(x, 0.225, 0.7, 10)
        err = (got.double() - solve_views(x.double(), 0.225, 0.7, 10)).abs().max().item()
        if not err <= SELF_CHECK_TOL:  # also catches NaN
            return (f"self-check on {device} failed ({x.dtype}, {tuple(x.shape)}): max abs error {err:.3g} vs "
                    "the float64 reference")
    return None


def _self_check_in_child(route: str, index: int) -> Optional[str]:
    """`_self_check` of `route` on cuda:`index`, run in a separate process: None when it passed (or
    could not be run there: then the in-process check decides), else why not, e.g. the child was
    killed by the CUDA error a faulting kernel raises. The verdict is kept per kernel build, GPU
    model and driver, so one process of a machine (or of a cluster sharing the cache) runs it."""
    from ._child_check import verdict_in_child
    from .mira_fused import __file__ as reference

    h = hashlib.sha256()
    for path in (*SOURCES, *HEADERS, Path(__file__).with_name("_nvrtc.py"), Path(reference)):
        h.update(path.read_bytes())
    nvcc = nvcc_path() if route == "nvcc" else None
    h.update(f"{route}|{torch.__version__}|{torch.version.cuda}|{torch.cuda.get_device_name(index)}|"
             f"{torch.cuda.get_device_capability(index)}|{_driver_version()}|{CUDA_FLAGS}|{SELF_CHECK_TOL}|"
             f"{nvcc}|{nvcc.stat().st_mtime_ns if nvcc else ''}".encode())
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    isolated = ["-P"] if sys.version_info >= (3, 11) else []  # not a fastssl/ of the working folder
    argv = [sys.executable, *isolated, "-c", "import sys; from fastssl.ops._cuda_ext import _self_check_main; "
            "sys.exit(_self_check_main(sys.argv[1], int(sys.argv[2])))", route, str(index)]
    return verdict_in_child(argv, cache_root() / "self_checks" / f"{route}_{h.hexdigest()[:16]}.json",
                            CHILD_CHECK_TIMEOUT_S, env, what=f"the {route} kernel's self-check")


def _driver_version() -> int:
    """The CUDA driver's version (e.g. 13000), 0 when it cannot be read: part of a verdict's key."""
    import ctypes

    try:
        version = ctypes.c_int(0)
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return version.value
    except (OSError, AttributeError):
        return 0


def _self_check_main(route: str, index: int) -> int:
    """The separate self-check process: 0 when `route`'s kernel agrees with the reference on cuda:`index`,
    1 when it does not (or raises, or faults), `INCONCLUSIVE_EXIT` when the device or the route cannot
    be had here, which says nothing about the kernel."""
    from ._child_check import INCONCLUSIVE_EXIT

    device = torch.device("cuda", index)
    try:
        torch.empty(1, device=device)
        module = _load_route(route, verbose=False)
    except Exception as exc:
        print(f"could not run the self-check here: {type(exc).__name__}: {exc}", file=sys.stderr)
        return INCONCLUSIVE_EXIT
    with torch.no_grad():
        failure = _self_check(module, device)
    torch.cuda.synchronize(device)  # a fault surfaces here at the latest
    if failure:
        print(failure, file=sys.stderr)
        return 1
    return 0


def _is_rank_zero() -> bool:
    """Whether this process is the job's first (torchrun / accelerate set RANK; a lone process is)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def fused_for(device: torch.device) -> Optional[Any]:
    """The kernel if a route loads and passes its self-check on `device` (checked on first use).

    A failed self-check (in a separate process first, then here) moves on to the next route (and
    checks that one); the first passing route is named in one warning, so a user sees which
    kernel runs.
    """
    if load_fused() is None:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _lock:
        while _state["module"] is not None:
            verdict = _state["checked"].get(index)
            if verdict is None:
                if torch.cuda.is_current_stream_capturing():
                    return None  # cannot synchronise inside a CUDA graph capture; check later
                try:  # a fault there costs only the child
                    failure = _self_check_in_child(_state["route"], index)
                except Exception:  # the separate check itself broke: the in-process one decides
                    failure = None
                if failure is None:
                    with torch.no_grad():
                        try:
                            failure = _self_check(_state["module"], torch.device("cuda", index))
                        except Exception as exc:  # e.g. a launch error on an unsupported device
                            failure = f"self-check on cuda:{index} raised {type(exc).__name__}: {exc}"
                verdict = failure is None
                _state["checked"][index] = verdict
                if failure:
                    _state["reasons"][_state["route"]] = failure
                    _next_route()
                    continue
                if not _state["warned"]:
                    _state["warned"] = True
                    # A route that failed is news on every rank; plain success is said once per job.
                    if _state["reasons"] or _is_rank_zero():
                        skipped = f" ({_reasons()})" if _state["reasons"] else ""
                        warnings.warn(f"fastssl: the fused CUDA MIRA kernel runs, built by "
                                      f"{ROUTE_NAMES[_state['route']]}{skipped}.", RuntimeWarning, stacklevel=3)
            return _state["module"] if verdict else None
        return None


def mira_assign_views_fused(module: Any, logits: torch.Tensor, tau: float, beta: float,
                            num_iters: int) -> torch.Tensor:
    """One fused launch (counted, so tests can see the custom op really took this path)."""
    _state["fused_calls"] += 1
    return module.mira_assign_views_cuda(logits.contiguous(), float(tau), float(beta), int(num_iters))


def status() -> dict[str, Any]:
    """Whether the fused kernel loaded, by which route, why not (per route), self-checks, fused calls."""
    with _lock:
        return {"attempted": _state["attempted"], "loaded": _state["module"] is not None,
                "route": _state["route"], "route_reasons": dict(_state["reasons"]),
                "reason": _state["reason"], "self_check": dict(_state["checked"]),
                "fused_calls": _state["fused_calls"]}
