"""Loaders: source images -> `MultiCropBatch` on the training device.

Backends register by name in `pipelines.spec.BACKENDS`; the engine only calls
`build_train_loader`, so a new backend plugs in without touching the loop. Heavy
backends (DALI, FFCV) are imported only when chosen.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pipelines.augment import MultiCropRecipe
from pipelines.spec import AUTO_BACKEND, BACKENDS, DataConfig, LoaderSpec, LoaderUnavailable, install_hint, registered_class

if TYPE_CHECKING:
    import torch

    from pipelines.batch import MultiCropBatch
    from pipelines.sampler import ShardedLoader


def __getattr__(name: str) -> type[MultiCropBatch]:
    """`MultiCropBatch` on first use: it needs torch, and the config and `--help` import this package."""
    if name == "MultiCropBatch":
        from pipelines.batch import MultiCropBatch

        return MultiCropBatch
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")


def build_train_loader(spec: LoaderSpec) -> ShardedLoader:
    """The training loader of `spec.data.backend` for this rank."""
    return registered_class(BACKENDS, spec.data.backend, "data backend", "pick --data.backend torchvision")(spec)


def resolve_backend(name: str, device: torch.device) -> tuple[str, str | None]:
    """The backend `name` stands for on `device`, and a line saying why when it was `auto`.

    `auto` is DALI on a CUDA device, where it decodes on the GPU, when DALI imports; else
    torchvision, the reference pipeline (on a CPU, DALI's fast mode is faster, docs/benchmarks.md, but
    it departs from the reference: bilinear crops, fast IDCT; choose it with --data.backend dali).
    Every process resolves it for its own device, so a run's processes agree when their nodes do.
    """
    if name != AUTO_BACKEND:
        return name, None
    if device.type != "cuda":
        return "torchvision", f"--data.backend auto: torchvision (no CUDA device for DALI's GPU decoding on {device})"
    try:
        importlib.import_module("nvidia.dali")
    except ImportError as err:
        return "torchvision", (f"--data.backend auto: torchvision, as DALI is not available ({err}); "
                               f"install it with {install_hint('dali')} to decode on the GPU")
    return "dali", f"--data.backend auto: dali (GPU decoding on {device})"


__all__ = ["MultiCropBatch", "MultiCropRecipe", "DataConfig", "LoaderSpec", "LoaderUnavailable", "build_train_loader",
           "resolve_backend", "BACKENDS", "AUTO_BACKEND"]
