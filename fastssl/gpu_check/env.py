"""Stage 1, env: the GPU, driver, torch / CUDA / nvcc, DALI and FFCV versions, or why each is not
importable (each import in its own process: a broken DALI does not hide FFCV's version).
"""

from __future__ import annotations

import os
import shutil

from fastssl.gpu_check.report import table
from fastssl.gpu_check.runner import PY, Context


def stage_env(ctx: Context) -> dict:
    info, cmd = ctx.worker("env")
    if cmd.rc != 0:
        ctx.errors.append("the environment worker failed")
    for name, probe in (("nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"]),
                        ("nvcc", [info.get("nvcc") or "nvcc", "--version"])):
        if shutil.which(probe[0]) is None:
            info[name] = "not found"
            continue
        c = ctx.run(f"env-{name}", probe, timeout=30)
        lines = [ln for ln in c.tail.splitlines() if ln.strip()]
        info[name] = lines[-1].strip() if lines and c.rc == 0 else f"failed (rc {c.rc})"
    for module in ("nvidia.dali", "ffcv"):
        dist = "ffcv" if module == "ffcv" else "nvidia-dali-cuda130"
        code = (f"import importlib.metadata as m, {module} as x\n"  # the import is the check
                f"try:\n    v = m.version({dist!r})\n"  # ffcv's own __version__ is stale (0.0.3rc1 in 1.0.2)
                f"except m.PackageNotFoundError:\n    v = getattr(x, '__version__', '?')\n"
                f"print(v)")
        c = ctx.run(f"env-{module}", [PY, "-c", code], timeout=90)
        lines = [ln for ln in c.tail.splitlines() if ln.strip()]
        info[module] = lines[-1].strip() if c.rc == 0 and lines else \
            ("not checked: the stage's time ran out while importing it" if c.timed_out else
             f"not importable: {lines[-1].strip() if lines else f'rc {c.rc}'}")
    rows = [[k, v] for k, v in info.items() if not isinstance(v, dict)]
    rows += [[f"package {k}", v if v else "not installed"] for k, v in info.get("packages", {}).items()]
    summary = table(["item", "value"], rows)
    return {"results": info, "summary": summary}


def worker_env(args: dict, dry_run: bool) -> dict:
    import torch

    from fastssl.ops import _cuda_ext
    from fastssl.reports.environment import describe_environment

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    info = describe_environment(device)
    nvcc = _cuda_ext.nvcc_path()
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if cuda else None,
                capability=".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
                gpu_count=torch.cuda.device_count(), nvcc=str(nvcc) if nvcc else None,
                fastssl_ext_dir=str(_cuda_ext.cache_root()),
                pythonpath=os.environ.get("PYTHONPATH", ""))
    if cuda:
        free, total = torch.cuda.mem_get_info()
        info["gpu_memory_free_gb"] = round(free / 2**30, 1)
    import importlib.metadata

    for name in ("matplotlib", "pillow", "pytest", "tensorboard", "tqdm"):  # what the tools also need
        try:
            info["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info["packages"][name] = None
    return info
