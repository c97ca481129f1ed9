"""The data configuration and what the training loop tells a loader: the seam every backend plugs into.

`DataConfig` is the `data` section of a run's config (`--data.field` on the command
line; the `# comment` beside a field is its `--help`). It is declared here, next to the
loaders that read it, and handed to them whole inside a `LoaderSpec`, so a new loader
option is one field here and one read in its backend. The backend, eval-loader and
FFCV-order names are declared here too: the config validates against these tables, and
the loaders are looked up in them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipelines.augment import MultiCropRecipe

if TYPE_CHECKING:
    from types import ModuleType

    import torch

# name -> "module:Class" of the training loaders; each class takes a LoaderSpec and offers len(),
# set_epoch(), iter(). Modules are imported only when chosen (DALI and FFCV are optional).
BACKENDS = {
    "torchvision": "pipelines.torchvision:TorchvisionLoader",
    "synthetic": "pipelines.synthetic:SyntheticLoader",
    "dali": "pipelines.dali:DaliLoader",
    "ffcv": "pipelines.ffcv:FfcvLoader",
}
# Not a loader: the name a run resolves to one of BACKENDS for its device (`pipelines.resolve_backend`).
AUTO_BACKEND = "auto"
# name -> "module:Class" of the evaluation loaders (`pipelines.eval.build_eval_loader`).
EVAL_BACKENDS = {
    "torchvision": "pipelines.eval:EvalLoader",
    "dali": "pipelines.dali_eval:DaliEvalLoader",
}
# FFCV traversal orders: "sampler" is the shared one of `pipelines.sampler`; the rest are FFCV's own.
ORDERS = ("sampler", "random", "quasi_random", "sequential")


# Loader workers per process: each is a process of its own (hundreds of MB), so a number past any
# machine's cores forks until the memory is gone.
MAX_WORKERS = 1024

OWN_PACKAGES = ("pipelines", "fastssl")  # an ImportError naming one of these is a bug, not a missing install


class LoaderUnavailable(RuntimeError):
    """A loader the settings name cannot be built here (an unknown name, an uninstalled package):
    bad input, reported in one line that names the fix."""


def install_hint(package: str) -> str:
    """How to install an optional loader package (`dali` or `ffcv`) into the project's venv.

    DALI has one build per CUDA major and it must match torch's: `make setup` picks it
    (tools/dali_extra.py); a plain `.[dali]` would install the CUDA 12 build beside a CUDA 13 torch.
    The stamp is removed first: on a checkout already set up, `make setup` alone does nothing."""
    if package == "dali":
        return ("`rm -f .venv/.fastssl-installed && make setup` (it installs DALI's build for this torch's CUDA, "
                "tools/dali_extra.py)")
    return f"`.venv/bin/pip install -e '.[{package}]'`"


def registered_class(table: dict[str, str], name: str, what: str, instead: str,
                     error: type[Exception] = LoaderUnavailable) -> type:
    """The class registered as `name` in `table` (BACKENDS or EVAL_BACKENDS), its module imported now,
    so that an unknown name or an uninstalled optional package fails before any work, as `error`,
    with a message naming the fix (`instead`: the option that avoids it)."""
    if name not in table:
        raise error(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    module_name, cls_name = table[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        if (err.name or "").split(".")[0] in OWN_PACKAGES:  # a bug of ours, not a missing package
            raise
        raise error(f"the {name!r} {what} is not available ({err}); install it with {install_hint(name)}, "
                    f"or {instead}") from err
    return getattr(module, cls_name)


@dataclass
class DataConfig:
    """Where the images come from and how they are loaded."""

    backend: str = "torchvision"  # torchvision | synthetic | dali | ffcv | auto (dali on a GPU if installed)
    train: str = ""  # ImageNet-layout folder train/<class>/<image>.JPEG (a .beton for ffcv)
    val: str = ""  # same layout; used by the online k-NN ("" = no k-NN)
    knn_train: str = ""  # JPEG folder for the k-NN memory bank ("" = data.train; required with ffcv)
    num_workers: int = -1  # loader workers per process; -1 = this machine's cores / its processes
    synthetic_size: int = 1_281_167  # images per epoch for the synthetic backend
    synthetic_classes: int = 1000  # labels of the synthetic backend's images
    dali_hw_decoder_load: float = 0.65  # DALI on GPU: share of JPEGs for the hardware decoder (0..1)
    dali_cpu_fast: bool = True  # DALI on CPU: bilinear crops, fast IDCT, numba photometric steps (False: the GPU graph)
    dali_read_threads: int = 8  # DALI: files read at once, up to two batches ahead (network storage; 1 = one by one)
    device_augment: bool = False  # torchvision, dali: the loader only crops; flip/colour/blur/solarize batched on the device
    ffcv_order: str = "sampler"  # FFCV: sampler (the order every backend shares) | random | quasi_random | sequential
    ffcv_os_cache: bool = True  # FFCV: page-cache reads (True) or FFCV's process cache (False)

    def errors(self) -> list[str]:
        """Every problem with the values, as `field: what is wrong (fix)` strings. Touches no files."""
        out: list[str] = []
        if self.backend not in BACKENDS and self.backend != AUTO_BACKEND:
            out.append(f"backend: unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)} "
                       f"or {AUTO_BACKEND}")
        if self.backend != "synthetic" and not self.train:
            out.append("train: no training data given; pass --data.train /path/to/train "
                       "(ImageNet layout: train/<class>/<image>.JPEG) or use --data.backend synthetic")
        if self.synthetic_size < 1 or self.synthetic_classes < 1:
            out.append("synthetic_size/synthetic_classes: must be positive")
        if self.backend == "ffcv" and self.val and not self.knn_train:
            out.append("knn_train: the ffcv backend trains from a .beton but the online k-NN reads JPEG "
                       "folders; pass --data.knn_train /path/to/imagenet/train, or drop --data.val")
        if not -1 <= self.num_workers <= MAX_WORKERS:
            out.append(f"num_workers: loader workers per process (0: load in the training process, at most "
                       f"{MAX_WORKERS}), or -1 for this machine's cores shared by its processes; got {self.num_workers}")
        if self.ffcv_order not in ORDERS:
            out.append(f"ffcv_order: unknown {self.ffcv_order!r}; choose {', '.join(ORDERS[:-1])} or {ORDERS[-1]}")
        if self.dali_read_threads < 1:
            out.append(f"dali_read_threads: at least 1 (1 reads one file at a time), got {self.dali_read_threads}")
        if not 0 <= self.dali_hw_decoder_load <= 1:
            out.append(f"dali_hw_decoder_load: a share must lie in [0, 1], got {self.dali_hw_decoder_load}")
        return out


def eval_backend_errors(name: str) -> list[str]:
    """The problem with an eval-loader name (config `eval.loader`), as `what is wrong (fix)` strings."""
    if name in EVAL_BACKENDS:
        return []
    return [f"unknown {name!r}; choose one of {', '.join(EVAL_BACKENDS)}"]


@dataclass
class LoaderSpec:
    """Everything a backend needs to produce this rank's `MultiCropBatch`es: the data
    configuration whole, plus what only the running process knows (its rank, device, dtype)."""

    data: DataConfig
    recipe: MultiCropRecipe
    batch_size: int  # per process
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_workers: int = 0  # resolved by the caller (data.num_workers -1 = a share of this machine's cores)
    device: torch.device = field(default_factory=lambda: _torch().device("cpu"))
    channels_last: bool = True
    # The views' dtype: the autocast dtype on GPU (bf16 halves the loader's output traffic),
    # float32 otherwise. The model's first layer would cast to it anyway.
    dtype: torch.dtype = field(default_factory=lambda: _torch().float32)

    @property
    def path(self) -> str:
        """The training source: a folder, a `.txt` file list, or a `.beton` (`data.train`)."""
        return self.data.train

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """Move one view to the training device in the training dtype and memory format."""
        torch = _torch()
        x = x.to(self.device, dtype=self.dtype, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)


def _torch() -> ModuleType:
    """torch, imported on first use: this module is read by the config and `--help`, which need none of it."""
    import torch

    return torch
