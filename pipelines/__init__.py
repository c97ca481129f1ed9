"""Loaders: source images -> `MultiCropBatch` on the training device.

Backends register by name in `pipelines.spec.BACKENDS`; the engine only calls
`build_train_loader`, so a new backend plugs in without touching the loop. Heavy
backends (DALI, FFCV) are imported only when chosen.
"""

from __future__ import annotations

from pipelines.augment import MultiCropRecipe
from pipelines.batch import MultiCropBatch
from pipelines.spec import BACKENDS, DataConfig, LoaderSpec, registered_class


def build_train_loader(spec: LoaderSpec):
    """The training loader of `spec.data.backend` for this rank."""
    return registered_class(BACKENDS, spec.data.backend, "data backend", "pick --data.backend torchvision")(spec)


__all__ = ["MultiCropBatch", "MultiCropRecipe", "DataConfig", "LoaderSpec", "build_train_loader", "BACKENDS"]
