"""The fused MIRA kernel without nvcc: NVRTC compiles `csrc/mira_kernel.cuh` at run time.

Why: a pip install of torch brings NVRTC (``nvidia-cuda-nvrtc``) and the CUDA Python bindings
(``cuda-bindings``) but not nvcc, so the extension build of `_cuda_ext` (the second route)
fails for most users and they silently got the slower reference. This route needs neither
nvcc nor the toolkit's headers: the kernel source includes nothing under NVRTC.

What it does, mirroring the C++ host side of `csrc/mira_fused.cu` (keep the two in step):
compile the six extern "C" entry points for the device's architecture (a cubin; PTX for the
newest architecture NVRTC knows when the device is newer still), load them into torch's
(primary) context, size the grid with the occupancy calculator (`plan_launch`, the same rules
as `mira_plan`) and launch cooperatively on torch's current stream, with the output and the
workspaces from torch's caching allocator. `NvrtcFused.mira_assign_views_cuda` has the
extension's signature and error messages, so `_cuda_ext` treats both routes alike.

Pure parts (compiling, planning, the argument layout) run without a GPU and are tested on CPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["KERNEL_SOURCE", "NvrtcFused", "Params", "Plan", "compile_kernel", "entry_point", "load",
           "nvrtc_version", "plan_launch", "smem_bytes_for"]

KERNEL_SOURCE = Path(__file__).resolve().parent / "csrc" / "mira_kernel.cuh"
THREADS, WARPS, TILE = 512, 16, 8  # kThreads, kWarps, kTile of mira_kernel.cuh
INT_MAX = 2**31 - 1
LOG2E = 1.4426950408889634
NVRTC_OPTIONS = ("-std=c++17",)
DTYPE_TAGS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def entry_point(dtype: torch.dtype, in_smem: bool) -> str:
    """The extern "C" kernel for an input dtype and log P's home (mira_kernel.cuh's entries)."""
    return f"fastssl_mira_{DTYPE_TAGS[dtype]}_{'smem' if in_smem else 'gmem'}"


ENTRY_POINTS = tuple(entry_point(d, s) for d in DTYPE_TAGS for s in (True, False))


# ------------------------------------------------------------------------------------ compiling
def _bindings(name: str) -> Any:
    """cuda.bindings.<name>, or RuntimeError saying how to get it."""
    try:
        import importlib

        return importlib.import_module(f"cuda.bindings.{name}")
    except ImportError as exc:
        raise RuntimeError(f"the CUDA Python bindings are not installed ({exc}); pip's torch brings them, "
                           f"else `pip install cuda-bindings`") from exc


def _nvrtc_check(result: Any, what: str) -> Any:
    """Unpack a cuda.bindings.nvrtc result tuple; raise RuntimeError on an error code."""
    nvrtc = _bindings("nvrtc")
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC {what} failed: {err.name if hasattr(err, 'name') else err}")
    return rest[0] if len(rest) == 1 else rest


def nvrtc_version() -> tuple[int, int]:
    """NVRTC's (major, minor); RuntimeError when the bindings or the library cannot be loaded."""
    nvrtc = _bindings("nvrtc")
    try:
        major, minor = _nvrtc_check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    except RuntimeError:
        raise
    except Exception as exc:  # the bindings load libnvrtc lazily: a missing library surfaces here
        raise RuntimeError(f"NVRTC cannot be loaded: {type(exc).__name__}: {exc}") from exc
    return int(major), int(minor)


def supported_archs() -> list[int]:
    """The SM architectures this NVRTC can compile for, e.g. [75, 80, ..., 120]."""
    nvrtc = _bindings("nvrtc")
    return [int(a) for a in _nvrtc_check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")]


@dataclass(frozen=True)
class Compiled:
    """NVRTC's output for one architecture: a cubin (ELF) or, for a newer device, PTX."""

    image: bytes
    kind: str  # "cubin" or "ptx"
    target: str  # e.g. "sm_90" or "compute_120"


_compile_lock = threading.Lock()
_compiled: dict[tuple[str, int], Compiled] = {}


def cache_dir() -> Path:
    """Where compiled images are kept between processes: beside the nvcc route's builds."""
    from ._cuda_ext import cache_root

    return cache_root() / "nvrtc"


def _compile(text: str, target: str, kind: str) -> bytes:
    """One NVRTC compilation of `text` for `target`; RuntimeError with the log's error lines."""
    nvrtc = _bindings("nvrtc")
    prog = _nvrtc_check(nvrtc.nvrtcCreateProgram(text.encode(), b"mira_kernel.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={target}".encode(), *(o.encode() for o in NVRTC_OPTIONS)]
        err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            size = _nvrtc_check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            lines = [ln for ln in log.decode(errors="replace").splitlines() if ln.strip()]
            errors = [ln for ln in lines if "error" in ln.lower()] or lines
            raise RuntimeError(f"NVRTC could not compile {KERNEL_SOURCE.name} for {target}:\n" + "\n".join(errors[:8]))
        get_size, get = ((nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if kind == "cubin"
                         else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX))
        image = b" " * _nvrtc_check(get_size(prog), get_size.__name__)
        _nvrtc_check(get(prog, image), get.__name__)
        return bytes(image)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_kernel(arch: int, source: Optional[str] = None, use_cache: bool = True) -> Compiled:
    """The kernel compiled for SM `arch` (e.g. 90), from this process's or the disk cache if there.

    A cubin when NVRTC knows `arch`; PTX for the newest architecture it knows when the device is
    newer (the driver compiles that on load). RuntimeError with NVRTC's log on a compile error.
    Why a disk cache: the compile takes seconds of CPU per process (every rank of every run);
    the file is named by a hash of the source, target, options and NVRTC version, written
    atomically, and an unwritable cache is skipped.
    """
    text = KERNEL_SOURCE.read_text() if source is None else source
    key = (hashlib.sha256(text.encode()).hexdigest(), int(arch))
    with _compile_lock:
        if use_cache and key in _compiled:
            return _compiled[key]
        archs = supported_archs()
        version = nvrtc_version()
        if arch in archs:
            target, kind = f"sm_{arch}", "cubin"
        elif any(a < arch for a in archs):
            target, kind = f"compute_{max(a for a in archs if a < arch)}", "ptx"
        else:
            raise RuntimeError(f"NVRTC {version[0]}.{version[1]} cannot compile for sm_{arch} (it supports {archs})")
        digest = hashlib.sha256(f"{text}|{target}|{NVRTC_OPTIONS}|{version}".encode()).hexdigest()[:20]
        path = cache_dir() / f"mira_kernel_{target}_{digest}.{kind}"
        image = None
        if use_cache and path.is_file():
            image = path.read_bytes()
        if not image:
            image = _compile(text, target, kind)
            if use_cache:
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp.write_bytes(image)
                    os.replace(tmp, path)
                except OSError:  # a read-only cache only costs the next process a compile
                    with contextlib.suppress(OSError):
                        tmp.unlink(missing_ok=True)
        _compiled[key] = Compiled(image, kind, target)
        return _compiled[key]


# ------------------------------------------------------------------------------------- planning
def rows_pad_for(rows: int) -> int:
    return (rows + TILE - 1) // TILE * TILE + TILE


def smem_bytes_for(rows: int, k: int, in_smem: bool) -> int:
    """Dynamic shared memory of a CTA with `rows` rows: mira_fused.cu's smem_bytes_for."""
    return 4 * (rows_pad_for(rows) + WARPS * TILE + TILE + (rows * k if in_smem else 0))


@dataclass(frozen=True)
class Plan:
    """How one call is launched (mira_fused.h's MiraPlan); `error` set: it cannot be."""

    in_smem: bool = False
    cpv: int = 0
    views_per_launch: int = 0
    smem: int = 0
    error: str = ""


def plan_launch(v: int, b: int, k: int, *, cooperative: bool, sms: int, smem_max: int,
                blocks_per_sm: Callable[[bool, int], int]) -> Plan:
    """The grid for V x B x K: mira_fused.cu's `mira_plan`, rule for rule.

    `blocks_per_sm(in_smem, smem_bytes)` is the occupancy calculator's answer for that variant
    (a parameter, so the rules are tested without a GPU). Shared-memory log P when a CTA's rows
    fit at one CTA per SM, else log P in the output buffer; never more CTAs than co-resident.
    """
    if not cooperative:
        return Plan(error="the device does not support cooperative launches")
    cpv0 = max(1, min(b, sms // v))
    rows0 = -(-b // cpv0)
    if rows0 * k > INT_MAX:
        return Plan(error=f"B x K per CTA is too large ({rows0} x {k})")
    smem_s = smem_bytes_for(rows0, k, True)
    if smem_s <= smem_max:
        cap = blocks_per_sm(True, smem_s) * sms
        if cap >= cpv0:
            return Plan(True, cpv0, min(v, cap // cpv0), smem_s)
    smem_g = smem_bytes_for(rows0, k, False)
    if smem_g > smem_max:
        return Plan(error=f"B = {b} rows per view is too many: {rows0} rows per CTA need {smem_g} bytes of "
                          f"shared memory")
    cap = blocks_per_sm(False, smem_g) * sms
    if cap < 1:
        return Plan(error="the kernel cannot be resident on this device")
    cpv = max(1, min(b, cap // v))  # more CTAs than cpv0 only shrink the rows per CTA
    return Plan(False, cpv, max(1, min(v, cap // cpv)), smem_g)


class Params(ctypes.Structure):
    """mira_kernel.cuh's `Params`, byte for byte (64 bytes: 4 pointers, 4 ints, 4 floats)."""

    _fields_ = [("logits", ctypes.c_void_p), ("out", ctypes.c_void_p), ("partial", ctypes.c_void_p),
                ("alu", ctypes.c_void_p), ("B", ctypes.c_int), ("K", ctypes.c_int), ("cpv", ctypes.c_int),
                ("num_iters", ctypes.c_int), ("c2", ctypes.c_float), ("a", ctypes.c_float),
                ("one_minus_beta", ctypes.c_float), ("log2_b", ctypes.c_float)]


def make_params(logits: int, out: int, partial: int, alu: int, b: int, k: int, cpv: int, num_iters: int,
                tau: float, beta: float) -> Params:
    """The kernel arguments as mira_fused.cu's `mira_launch` fills them (float32 rounding included)."""
    return Params(logits, out, partial, alu, b, k, cpv, num_iters, LOG2E / (tau * (1.0 - beta)),
                  beta / (1.0 - beta), 1.0 - beta, math.log2(b))


# ------------------------------------------------------------------------------------ launching
def _drv_check(result: Any, what: str) -> Any:
    """Unpack a cuda.bindings.driver result tuple; raise RuntimeError naming the CUDA error."""
    driver = _bindings("driver")
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        name = driver.cuGetErrorName(err)[1]
        raise RuntimeError(f"{what} failed: {name.decode() if isinstance(name, bytes) else err}")
    return rest[0] if len(rest) == 1 else (rest or None)


class _DeviceKernels:
    """The six entry points loaded into one device's primary context, and its launch limits."""

    def __init__(self, index: int) -> None:
        drv = _bindings("driver")
        self.index = index
        _drv_check(drv.cuInit(0), "cuInit")
        self.device = _drv_check(drv.cuDeviceGet(index), "cuDeviceGet")
        self.ctx = _drv_check(drv.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        self.make_current()
        attr = drv.CUdevice_attribute
        get = lambda a: int(_drv_check(drv.cuDeviceGetAttribute(a, self.device), "cuDeviceGetAttribute"))
        self.cooperative = get(attr.CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH) == 1
        self.sms = get(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        optin = get(attr.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        major, minor = torch.cuda.get_device_capability(index)
        self.compiled = compile_kernel(10 * major + minor)
        self._image = ctypes.create_string_buffer(self.compiled.image)  # NUL-terminated (PTX needs it)
        self.module = _drv_check(drv.cuModuleLoadData(ctypes.addressof(self._image)), "cuModuleLoadData")
        self.functions = {}
        limits = []
        for name in ENTRY_POINTS:
            fn = _drv_check(drv.cuModuleGetFunction(self.module, name.encode()), f"cuModuleGetFunction({name})")
            # As mira_fused.cu: the dynamic-smem limit raised once to the most the device allows beside
            # the function's static shared memory (CUDA: the two together may not exceed the opt-in maximum).
            static = int(_drv_check(drv.cuFuncGetAttribute(
                drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn), "cuFuncGetAttribute"))
            limits.append(optin - static)
            _drv_check(drv.cuFuncSetAttribute(
                fn, drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, limits[-1]),
                "cuFuncSetAttribute")
            self.functions[name] = fn
        self.smem_max = min(limits)  # the plan's bound on dynamic shared memory, whichever entry point it picks
        self._occupancy: dict[tuple[str, int], int] = {}

    def make_current(self) -> None:
        """torch's primary context current on this thread (the runtime usually has done it)."""
        drv = _bindings("driver")
        current = _drv_check(drv.cuCtxGetCurrent(), "cuCtxGetCurrent")
        if current is None or int(current) != int(self.ctx):
            _drv_check(drv.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def blocks_per_sm(self, name: str, smem: int) -> int:
        key = (name, smem)
        if key not in self._occupancy:
            drv = _bindings("driver")
            self._occupancy[key] = int(_drv_check(drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(
                self.functions[name], THREADS, smem), "cuOccupancyMaxActiveBlocksPerMultiprocessor"))
        return self._occupancy[key]


def _check_inputs(logits: torch.Tensor, tau: float, beta: float, num_iters: int) -> None:
    """mira_binding.cpp's checks, in its order and with its messages."""
    fn = "mira_assign_views_cuda"
    if not logits.is_cuda:
        raise RuntimeError(f"{fn}: logits must be a CUDA tensor, got {logits.device}")
    if logits.dim() != 3:
        raise RuntimeError(f"{fn}: logits must be V x B x K, got {list(logits.shape)}")
    if not logits.is_contiguous():
        raise RuntimeError(f"{fn}: logits must be contiguous")
    if not (math.isfinite(tau) and tau > 0):
        raise RuntimeError(f"{fn}: tau must be > 0, got {tau}")
    if not 0 <= beta < 1:
        raise RuntimeError(f"{fn}: beta must be in [0, 1), got {beta}")
    if not 0 <= num_iters <= INT_MAX:
        raise RuntimeError(f"{fn}: num_iters must be >= 0, got {num_iters}")
    if logits.shape[1] > INT_MAX or logits.shape[2] > INT_MAX:
        raise RuntimeError(f"{fn}: B or K too large")
    if logits.dtype not in DTYPE_TAGS:
        raise RuntimeError(f"{fn}: logits must be float32, bfloat16 or float16, got {logits.dtype} "
                           f"(float64 uses the reference solve_views)")


class NvrtcFused:
    """The NVRTC-built kernel behind the extension's interface (`mira_assign_views_cuda`)."""

    route = "nvrtc"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[int, _DeviceKernels] = {}

    def kernels_for(self, index: int) -> _DeviceKernels:
        with self._lock:
            if index not in self._devices:
                self._devices[index] = _DeviceKernels(index)
            return self._devices[index]

    def mira_assign_views_cuda(self, logits: torch.Tensor, tau: float, beta: float, num_iters: int,
                               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """V x B x K logits (fp32/bf16/fp16, contiguous, CUDA) -> V x B x K float32 targets."""
        _check_inputs(logits, float(tau), float(beta), int(num_iters))
        if out is None:
            result = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        else:
            if not (out.device == logits.device and out.dtype == torch.float32 and out.is_contiguous()
                    and out.shape == logits.shape):
                raise RuntimeError(f"mira_assign_views_cuda: out must be a contiguous float32 tensor of shape "
                                   f"{list(logits.shape)} on {logits.device}")
            if out.numel() and out.data_ptr() == logits.data_ptr():
                raise RuntimeError("mira_assign_views_cuda: out aliases logits")
            result = out
        v, b, k = logits.shape
        if v == 0 or b == 0 or k == 0:
            return result
        index = logits.device.index if logits.device.index is not None else torch.cuda.current_device()
        with torch.cuda.device(index):
            dev = self.kernels_for(index)
            dev.make_current()
            tag = DTYPE_TAGS[logits.dtype]
            plan = plan_launch(v, b, k, cooperative=dev.cooperative, sms=dev.sms, smem_max=dev.smem_max,
                               blocks_per_sm=lambda s, m: dev.blocks_per_sm(f"fastssl_mira_{tag}_"
                                                                            f"{'smem' if s else 'gmem'}", m))
            if plan.error:
                raise RuntimeError(f"mira_assign_views_cuda: cannot launch V x B x K = {v} x {b} x {k}: {plan.error}")
            partial = torch.empty((plan.views_per_launch, k, plan.cpv, 2), dtype=torch.float32, device=logits.device)
            alu = torch.empty((plan.views_per_launch, k), dtype=torch.float32, device=logits.device)
            self._launch(dev, plan, logits, result, partial, alu, float(tau), float(beta), int(num_iters))
        return result

    @staticmethod
    def _launch(dev: _DeviceKernels, plan: Plan, logits: torch.Tensor, out: torch.Tensor, partial: torch.Tensor,
                alu: torch.Tensor, tau: float, beta: float, num_iters: int) -> None:
        """One cooperative launch per `plan.views_per_launch` views, on torch's current stream."""
        drv = _bindings("driver")
        fn = dev.functions[entry_point(logits.dtype, plan.in_smem)]
        stream = drv.CUstream(torch.cuda.current_stream(logits.device).cuda_stream)
        v, b, k = logits.shape
        elt = logits.element_size()
        for v0 in range(0, v, plan.views_per_launch):
            nv = min(plan.views_per_launch, v - v0)
            params = make_params(logits.data_ptr() + v0 * b * k * elt, out.data_ptr() + v0 * b * k * 4,
                                 partial.data_ptr(), alu.data_ptr(), b, k, plan.cpv, num_iters, tau, beta)
            argv = (ctypes.c_void_p * 1)(ctypes.addressof(params))
            _drv_check(drv.cuLaunchCooperativeKernel(fn, nv * plan.cpv, 1, 1, THREADS, 1, 1, plan.smem, stream,
                                                     ctypes.addressof(argv)), "cuLaunchCooperativeKernel")


def load() -> NvrtcFused:
    """The NVRTC route, checked as far as it can be before a launch; RuntimeError saying why not.

    Compiles for every visible device's architecture now, so a compile error moves
    `_cuda_ext` on to the nvcc route at once rather than at the first call.
    """
    version = nvrtc_version()
    _bindings("driver")
    if not torch.cuda.is_available():
        raise RuntimeError(f"no CUDA device is visible (NVRTC {version[0]}.{version[1]} is installed)")
    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        compile_kernel(10 * major + minor)
    return NvrtcFused()
