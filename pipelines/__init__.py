"""Loaders: source images -> `MultiCropBatch` on the training device.

Backends register here by name; the engine only calls `build_train_loader`, so a new
backend plugs in without touching the loop. Heavy backends (DALI, FFCV) are imported
only when chosen.
"""

from __future__ import annotations

import importlib

from pipelines.augment import MultiCropRecipe
from pipelines.batch import MultiCropBatch
from pipelines.spec import LoaderSpec

# name -> "module:Class"; each class takes a LoaderSpec and offers len(), set_epoch(), iter().
BACKENDS = {
    "torchvision": "pipelines.torchvision:TorchvisionLoader",
    "synthetic": "pipelines.synthetic:SyntheticLoader",
    "dali": "pipelines.dali:DaliLoader",
    "ffcv": "pipelines.ffcv:FfcvLoader",
}


def build_train_loader(backend: str, spec: LoaderSpec):
    """The training loader of `backend` for this rank."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown data backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    module_name, cls_name = BACKENDS[backend].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise RuntimeError(f"the {backend!r} backend is not available ({err}); install it with "
                           f"`.venv/bin/pip install -e '.[{backend}]'` or pick --data.backend torchvision") from err
    return getattr(module, cls_name)(spec)


__all__ = ["MultiCropBatch", "MultiCropRecipe", "LoaderSpec", "build_train_loader", "BACKENDS"]
