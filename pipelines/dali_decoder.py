"""Arguments of DALI's image decoders (`fn.decoders.image`) and resamplers, shared by the training and
evaluation pipelines.

Why the nvJPEG memory settings: on the `mixed` (GPU) decoder nvJPEG grows its device and pinned
host buffers whenever an image larger than any before arrives. Over a long ImageNet run that
means repeated reallocations of large buffers, which fragment memory until the decoder cannot
get what it asks for: the known out-of-memory failure of DALI SSL loaders deep into training.
DALI's own ImageNet examples (docs/examples/use_cases/pytorch/resnet50/main.py) pad nvJPEG's
buffers and preallocate the hardware decoder's for the largest ImageNet image up front, with
the values below; we use them for every `mixed` decode. They do not apply to the CPU decoder
(libjpeg-turbo), which gets only its own arguments.

The paddings are per decoder thread (one device buffer and two pinned host buffers each, DALI's
docs say), and the example runs 4 threads. A process of an 8-GPU node may run 16 or more, which
at the example's per-thread sizes would hold 3.4 GB of GPU memory and 4.5 GB of pinned host
memory per GPU: past 4 threads the example's totals are shared among the threads.
The hardware decoder's preallocation (the two hints) comes on top of that, for a whole batch
in DALI 2's nvImageCodec decoder; nvJPEG does not document its size, so it is measured, not
assumed: gpu_check's `loaders` stage reports the device memory each loader's first batch
adds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from nvidia.dali.types import DALIInterpType

__all__ = ["NVJPEG_MEMORY", "decoder_args", "dali_interp"]

# As DALI's ImageNet examples set them (bytes; pixels for the HW decoder's preallocation hints).
NVJPEG_MEMORY: dict[str, int] = {
    "device_memory_padding": 211_025_920,  # nvJPEG device buffers: the largest ImageNet sample
    "host_memory_padding": 140_544_512,  # nvJPEG pinned host buffers
    "preallocate_width_hint": 5980,  # the hardware JPEG decoder (A100/H100): largest ImageNet image
    "preallocate_height_hint": 6430,
}


EXAMPLE_THREADS = 4  # the decoder threads of DALI's ImageNet example (its --workers)
DALI_DEFAULT_PADDING = {"device_memory_padding": 16 * 2**20, "host_memory_padding": 8 * 2**20}  # DALI's own
# EXIF orientation ignored, as PIL (the torchvision loaders, the converter, so FFCV) ignores it: a
# rotated photo gives the same pixels, and so the same crops, in every backend and evaluation.
ORIENTATION_AS_PIL = {"adjust_orientation": False}


def decoder_args(decoder_device: str, hw_decoder_load: float, cpu_args: Optional[dict[str, Any]] = None,
                 threads: int = 1) -> dict:
    """Keyword arguments for `fn.decoders.image` on `decoder_device` ('mixed' or 'cpu').

    'mixed': the hardware decoder's share and the nvJPEG memory settings above, the per-thread
    paddings scaled so that `threads` threads hold the example's totals (never below DALI's
    defaults); 'cpu': only `cpu_args` (e.g. ``use_fast_idct``). Pure, so the choice is tested
    without a GPU.
    """
    if decoder_device == "mixed":
        share = min(1.0, EXAMPLE_THREADS / max(threads, 1))
        padding = {k: max(DALI_DEFAULT_PADDING[k], int(NVJPEG_MEMORY[k] * share)) for k in DALI_DEFAULT_PADDING}
        return {"hw_decoder_load": hw_decoder_load, **NVJPEG_MEMORY, **padding}
    if decoder_device != "cpu":
        raise ValueError(f"decoder_device must be 'mixed' or 'cpu', got {decoder_device!r}")
    return dict(cpu_args or {})


def dali_interp(name: str) -> DALIInterpType:
    """DALI's resampling filter for a name of `pipelines.augment.INTERPOLATIONS`."""
    from nvidia.dali import types

    return {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR}[name]
