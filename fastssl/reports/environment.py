"""What a figure was measured on: machine, device, software versions, recipe.

A throughput figure without these is useless a week later, so every report carries them.
"""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import sys

import torch

from fastssl.config import Config
from pipelines.cores import usable_cores

# DALI ships one distribution per CUDA major (README: Quickstart); both are listed, one is installed.
PACKAGES = ("torch", "torchvision", "accelerate", "nvidia-dali-cuda120", "nvidia-dali-cuda130", "ffcv", "numba",
            "numpy")


# Modules whose package metadata may be missing although they import: a bundle put on
# PYTHONPATH (the GPU machine's DALI and FFCV, ../shared/devkit) has no dist-info.
MODULES = {"nvidia.dali": ("nvidia-dali-cuda120", "nvidia-dali-cuda130"), "ffcv": ("ffcv",)}


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide speed (None = not installed). A module
    already imported without package metadata is listed as `MODULE.__version__` instead
    (FFCV's is stale: 0.0.3rc1 in ffcv 1.0.2)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    for module, dists in MODULES.items():
        loaded = sys.modules.get(module)
        if loaded is not None and all(out[d] is None for d in dists):
            out[f"{module}.__version__"] = str(getattr(loaded, "__version__", "unknown"))
    return out


def describe_environment(device: torch.device) -> dict:
    """Machine, device and software of this process."""
    cuda, cores = device.type == "cuda", usable_cores()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_cores": cores,
        "python": platform.python_version(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else f"CPU ({cores} cores)",
        "device_memory_gb": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
        "packages": package_versions(),
    }


def describe_recipe(cfg: Config, name: str, dtype: str, num_processes: int = 1) -> dict:
    """The settings that decide the figures: model, batch, views, crop sizes, dtype."""
    a = cfg.aug
    return {
        "name": name,
        "arch": cfg.model.arch,
        "num_prototypes": cfg.model.num_prototypes,
        "objective": cfg.method.objective,
        "assignment": cfg.method.assignment,
        "num_iters": cfg.method.num_iters,
        "global_batch_size": cfg.train.global_batch_size,
        "batch_per_process": cfg.train.global_batch_size // max(num_processes, 1),
        "processes": num_processes,
        "views": f"2x{a.global_size} + {a.num_local}x{a.local_size}",
        "num_views": a.num_views,
        "dtype": dtype,
        "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile,
        "backend": cfg.data.backend,
        "data": cfg.data.train or None,
    }
