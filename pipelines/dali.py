"""The DALI loader: decode each source image ONCE, then cut and augment every view from it.

Why: the authors' MIRA code turns DALI off as soon as local crops are used, so their
multi-crop decodes on CPU workers; decoding once per view multiplies the JPEG cost by 8.
Here one decode (nvJPEG `mixed`, with the hardware decoder taking `hw_decoder_load` of
the images, on a GPU; libjpeg-turbo on CPU-only machines) feeds 2 global and N local
random-resized crops, and each view gets its augmentations per sample.

* Order and sharding are the shared sampler's (`pipelines.sampler`): the same epoch
  permutation from the run seed as every backend, dealt to ranks from Accelerate's
  process index and count, so a resumed run continues the data order.
* Skipped augmentations cost nothing: on a GPU each optional step sits under a DALI
  conditional (`if coin_flip:`), which runs the op only on the samples that drew it; in
  CPU mode the steps run as one numba function per sample (`pipelines.dali_photometric`),
  where a step not drawn is an `if` in compiled code.
* Bad files never stop an epoch: DALI fails the whole pipeline on one undecodable
  sample, so every file's bytes are screened first (`pipelines.images`), and an error
  that still gets through is traced to its file, which is then replaced and counted, and
  the epoch goes on from the failed batch.
* CPU mode (no GPU), unless `dali_cpu_fast` is off: crops resampled with antialiased
  bilinear (triangle) filters, libjpeg-turbo's fast integer IDCT, and the photometric
  steps as numba functions instead of DALI's CPU arithmetic, blur and the conditionals'
  batch splits and merges (docs/benchmarks.md has the figures of each change). With
  `dali_cpu_fast` off, the CPU runs the GPU's graph: crops with the recipe's
  `interpolation` (bicubic by default, as torchvision's RandomResizedCrop), the accurate
  IDCT, DALI operators under conditionals.
* `device_augment` on: DALI only decodes and crops (uint8), and flip, colour, grayscale,
  blur and solarize run on the training device as batched tensor ops
  (`pipelines.device_augment`, as FFCV's GPU path), drawn per batch from
  (run seed, epoch, rank, batch). Why: on a GPU the graph above is one DALI operator per
  step, branch and view (thousands per batch with the jitter order drawn per view), each
  scheduled on its own; the batched ops are two passes of a few hundred kernels.
* Augmentation randomness comes from DALI's per-pipeline seed, drawn from (run seed,
  epoch, rank, first batch): runs are repeatable. A resumed epoch draws the augmentations
  the interrupted one would have drawn: the pipelines run with DALI's checkpointing, the
  training checkpoint keeps each rank's DALI state at the batch it stopped after
  (`state_dict`), and the resumed epoch's pipeline is rebuilt from it (`load_state_dict`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import nvidia.dali.math as dmath
from nvidia.dali import Pipeline, fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipelines.augment import JITTER_ORDERS, MultiCropRecipe, ViewSpec
from pipelines.batch import MultiCropBatch
from pipelines.dali_decoder import ORIENTATION_AS_PIL, dali_interp, decoder_args
from pipelines.dali_photometric import available as numba_photometric_available
from pipelines.dali_photometric import jitter_order, photometric, uniform
from pipelines.device_augment import GRAY_WEIGHTS, augment_views
from pipelines.folder import scan_source
from pipelines.images import (ReadAhead, free_dropped_pipelines, next_readable, placement, read_unless_bad,
                             run_retiring_bad_files)
from pipelines.sampler import ShardedLoader, batch_seed
from pipelines.spec import LoaderSpec

if TYPE_CHECKING:
    from nvidia.dali.pipeline import DataNode

OUTPUT_NAMES_EXTRA = ("index", "label")


class _ShardSource:
    """DALI external source: this rank's batches of one epoch, as encoded bytes.

    Each file is screened before DALI sees it; a bad file is replaced by the next good
    image in dataset order (as the torchvision reference does), and the bad files each
    batch passed over are recorded (`passed_over`) for the loader to count. Files are read
    by a thread pool up to two batches ahead of DALI (`ReadAhead`); `close` stops it.
    """

    def __init__(self, samples: list[tuple[str, int]], batches: list[list[int]], bad: dict[int, str],
                 read_threads: int):
        self.samples, self.batches, self.bad = samples, batches, bad
        self.sent: list[list[int]] = []  # dataset indices handed to DALI, per batch (it prefetches ahead)
        self.passed_over: list[set[int]] = []  # per batch sent: the bad files replaced in it
        size = max(map(len, batches), default=1)  # read two batches ahead, a batch's share per thread and task
        self._reads = ReadAhead(self._read_slot, (i for batch in batches for i in batch), depth=2 * size,
                                threads=read_threads, chunk=-(-size // read_threads))

    def __iter__(self) -> "_ShardSource":
        return self

    def __next__(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        if len(self.sent) >= len(self.batches):
            self.close()
            raise StopIteration
        blobs, index, label, passed_over = [], [], [], set()
        for _ in self.batches[len(self.sent)]:
            data, j, passed = next(self._reads)
            passed_over.update(passed)
            blobs.append(data)
            index.append(np.array([j], dtype=np.int64))
            label.append(np.array([self.samples[j][1]], dtype=np.int64))
        self.sent.append([int(i[0]) for i in index])
        self.passed_over.append(passed_over)
        return blobs, index, label

    def close(self) -> None:
        self._reads.close()

    def _read_slot(self, i: int) -> tuple[np.ndarray, int, list[int]]:
        return next_readable(self.samples, i, self._read)

    def _read(self, i: int) -> np.ndarray | None:
        return read_unless_bad(self.samples, self.bad, i)


def _coin(p: float) -> DataNode:
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


SOLARIZE_TABLE = [v if v < 128 else 255 - v for v in range(256)]  # torchvision's threshold 128


def _solarize(img: DataNode) -> DataNode:
    """x -> 255 - x for x >= 128, exactly, on uint8: one table lookup per value."""
    return fn.lookup_table(img, keys=list(range(256)), values=SOLARIZE_TABLE, dtype=types.UINT8)


def _flag(p: float) -> DataNode | float:
    """Per-sample 0/1 float: 1 with probability p (a constant at p = 0 or 1)."""
    if p <= 0 or p >= 1:
        return float(p >= 1)
    return fn.cast(_coin(p), dtype=types.FLOAT)


def _colour(img: DataNode, recipe: MultiCropRecipe) -> DataNode:
    """Colour jitter (p; its steps in the recipe's `jitter_order`) and grayscale (p) with
    torchvision's definitions, run only on the samples that drew either (one conditional: each
    split and merge of the batch costs).

    Not DALI's `color_twist` / `hsv`: they approximate the steps by one linear map in YIQ
    space, whose contrast pivots on mid-grey (128) instead of the image's mean luma and whose
    hue is a rotation, not torchvision's HSV shift (a dark image at contrast 0.6 came out
    about 35 levels brighter than torchvision's). A sample that drew grayscale but not the
    jitter gets the identity factors, then its luma.
    """
    jp, gp = recipe.jitter_p, recipe.grayscale_p
    if jp <= 0 and gp <= 0:
        return img
    b, c, s, h = recipe.jitter
    jitter, gray = _flag(jp), _flag(gp)
    order = jitter_order(recipe, types.INT32) if recipe.num_jitter_orders > 1 else None

    def factor(lo: float, hi: float, identity: float) -> DataNode:
        return identity + jitter * (uniform(lo, hi) - identity)

    def steps(x: DataNode) -> DataNode:
        return jitter_exact(x, factor(max(0.0, 1 - b), 1 + b, 1.0), factor(max(0.0, 1 - c), 1 + c, 1.0),
                            factor(max(0.0, 1 - s), 1 + s, 1.0), factor(-h, h, 0.0), gray, order)

    if jp >= 1 or gp >= 1:
        return steps(img)
    if _either(jitter, gray):
        img = steps(img)
    return img


def jitter_exact(img: DataNode, brightness: DataNode | float, contrast: DataNode | float,
                 saturation: DataNode | float, hue: DataNode | float, gray: DataNode | float = 0.0,
                 order: DataNode | None = None) -> DataNode:
    """torchvision's ColorJitter (brightness, contrast, saturation, hue), then grayscale where
    `gray` is 1, on uint8 HWC images, as DALI arithmetic; the factors are per-sample DataNodes or
    numbers. `order`: per sample, an INT32 index into `JITTER_ORDERS` (each position then runs
    the step each sample takes there, under conditionals), or None for the order above. The
    definitions of `pipelines.device_augment.jitter_step`, rounded to uint8 once at the end.
    """
    x = fn.cast(img, dtype=types.FLOAT) * (1.0 / 255.0)
    r, g, b = (x[:, :, i] for i in range(3))
    factors = (brightness, contrast, saturation, hue)
    for position in range(4):
        if order is None:
            r, g, b = _jitter_step(position, r, g, b, factors[position])
        else:
            step = fn.lookup_table(order, keys=list(range(len(JITTER_ORDERS))),
                                   values=[o[position] for o in JITTER_ORDERS], dtype=types.INT32)
            r, g, b = _step_drawn(step, r, g, b, factors)
    if not (isinstance(gray, float) and gray == 0.0):
        luma = _luma(r, g, b)
        r, g, b = (v + gray * (luma - v) for v in (r, g, b))
    out = fn.cast(fn.stack(r, g, b, axis=2) * 255.0, dtype=types.UINT8)  # DALI's cast rounds to nearest
    return fn.reshape(out, layout="HWC")  # the layout of the samples that skip the step (a conditional merges both)


def _step_drawn(step: DataNode, r: DataNode, g: DataNode, b: DataNode, factors: Sequence[DataNode | float]
                ) -> tuple[DataNode, DataNode, DataNode]:
    """Each sample's jitter step `step` (a per-sample INT32: 0 brightness ... 3 hue), under conditionals."""
    if step == 0:
        r, g, b = _jitter_step(0, r, g, b, factors[0])
    elif step == 1:
        r, g, b = _jitter_step(1, r, g, b, factors[1])
    elif step == 2:
        r, g, b = _jitter_step(2, r, g, b, factors[2])
    else:
        r, g, b = _jitter_step(3, r, g, b, factors[3])
    return r, g, b


def _jitter_step(step: int, r: DataNode, g: DataNode, b: DataNode, factor: DataNode | float
                 ) -> tuple[DataNode, ...]:
    """Step `step` of the jitter (0 brightness, 1 contrast, 2 saturation, 3 hue) on float H x W
    channel planes in [0, 1].

    The HSV hue shift in closed form, branch-free (as `pipelines.cpu_augment`): HSV keeps a
    pixel's max v and chroma c = v - min; channel n of (h6, v, c) is
    v - c clamp(min(k, 4 - k), 0, 1) with k = (n + h6) mod 6, n = 5, 3, 1 for R, G, B.
    """
    if step == 0:
        return tuple(dmath.clamp(v * factor, 0.0, 1.0) for v in (r, g, b))
    if step == 1:
        mean = fn.reductions.mean(_luma(r, g, b))
        return tuple(dmath.clamp(mean + (v - mean) * factor, 0.0, 1.0) for v in (r, g, b))
    if step == 2:
        luma = _luma(r, g, b)
        return tuple(dmath.clamp(luma + (v - luma) * factor, 0.0, 1.0) for v in (r, g, b))
    v = dmath.max(dmath.max(r, g), b)
    chroma = v - dmath.min(dmath.min(r, g), b)
    inv = 1.0 / (chroma + (chroma <= 0.0))
    is_r, is_g = v == r, v == g
    h6 = is_r * ((g - b) * inv) + (1 - is_r) * (is_g * (2.0 + (b - r) * inv) + (1 - is_g) * (4.0 + (r - g) * inv))
    h6 = h6 + 6.0 * factor
    return tuple(v - chroma * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)
                 for k in (_mod6(n + h6) for n in (5.0, 3.0, 1.0)))


def _luma(r: DataNode, g: DataNode, b: DataNode) -> DataNode:
    """torchvision's rgb_to_grayscale weights."""
    return GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b


def _mod6(k: DataNode) -> DataNode:
    return k - 6.0 * dmath.floor(k * (1.0 / 6.0))


def _either(a: DataNode | float, b: DataNode | float) -> DataNode | bool:
    """Per-sample `a or b` of two 0/1 flags, as a DALI boolean (a constant when both are)."""
    if not isinstance(a, float) or not isinstance(b, float):
        return fn.cast(a + b, dtype=types.BOOL)
    return bool(a or b)


def _augment_view(images: DataNode, recipe: MultiCropRecipe, view: ViewSpec, out_dtype: types.DALIDataType,
                  interp: types.DALIInterpType = types.INTERP_CUBIC, numba_steps: bool = False,
                  crop_only: bool = False) -> DataNode:
    """One view of every sample: crop, the photometric steps each sample drew, flip and normalise.

    The photometric steps run either as DALI operators under conditionals (the `if`
    statements on DataNodes: each branch runs only on the samples that took it;
    probabilities of exactly 0 or 1 build no coin at all) or, in CPU mode, as one numba
    function per sample (`pipelines.dali_photometric`). `crop_only`: the uint8 crop alone
    (the rest runs on the training device).
    """
    img = fn.random_resized_crop(images, size=[view.size, view.size], random_area=list(view.scale),
                                 random_aspect_ratio=list(recipe.ratio), interp_type=interp, antialias=True)
    if crop_only:
        return img
    if numba_steps:
        img = photometric(img, recipe, view)
    else:
        img = _conditional_photometric(img, recipe, view)
    mirror = fn.random.coin_flip(probability=recipe.flip_p) if recipe.flip_p > 0 else 0
    return fn.crop_mirror_normalize(img, dtype=out_dtype, output_layout="HWC", mirror=mirror,
                                    mean=[255 * m for m in recipe.mean], std=[255 * s for s in recipe.std])


def _conditional_photometric(img: DataNode, recipe: MultiCropRecipe, view: ViewSpec) -> DataNode:
    """Jitter, grayscale, blur and solarize as DALI operators, each under its own conditional (the GPU graph)."""
    img = _colour(img, recipe)
    if view.blur_p > 0:
        if view.blur_p >= 1 or _coin(view.blur_p):
            # No window_size: DALI sizes the kernel from sigma (2 * ceil(3 sigma) + 1), so a
            # small sigma costs a small window.
            img = fn.gaussian_blur(img, sigma=uniform(*recipe.blur_sigma))
    if view.solarize_p > 0:
        if view.solarize_p >= 1 or _coin(view.solarize_p):
            img = _solarize(img)
    return img


@pipeline_def(enable_conditionals=True)
def multicrop_pipeline(source: _ShardSource, recipe: MultiCropRecipe, decoder_device: str,
                       hw_decoder_load: float, out_dtype: types.DALIDataType, cpu_fast: bool = True,
                       numba_steps: bool = False, crop_only: bool = False) -> tuple[DataNode, ...]:
    """Encoded bytes -> one decode -> every view of the recipe, plus index and label.

    `numba_steps` (CPU mode only): the photometric steps as numba functions
    (`pipelines.dali_photometric`; the caller checks that they could be built). `crop_only`:
    every view as uint8 HWC crops, for `pipelines.device_augment`.
    """
    jpegs, index, label = fn.external_source(source=source, num_outputs=3, batch=True,
                                             dtype=[types.UINT8, types.INT64, types.INT64])
    fast = cpu_fast and decoder_device == "cpu"
    decode_args = decoder_args(decoder_device, hw_decoder_load, {"use_fast_idct": fast},  # + nvJPEG memory on GPU
                               threads=Pipeline.current().num_threads)
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, **ORIENTATION_AS_PIL,
                               **decode_args)
    interp = types.INTERP_LINEAR if fast else dali_interp(recipe.interpolation)  # the fast CPU path: linear
    numba_steps = numba_steps and decoder_device == "cpu"
    views = [_augment_view(images, recipe, view, out_dtype, interp, numba_steps, crop_only)
             for view in recipe.views()]
    return (*views, index, label)


class DaliLoader(ShardedLoader):
    """Multi-crop batches from a JPEG folder (or a `.txt` file list) through DALI."""

    def __init__(self, spec: LoaderSpec):
        self.samples, _ = scan_source(spec.path)
        super().__init__(spec, len(self.samples))
        self.decoder_device, self.device_id, self.num_threads = placement(spec.device, spec.num_workers)
        self.bad: dict[int, str] = {}  # dataset index -> why it is skipped (kept across epochs)
        self._live: tuple[DALIGenericIterator, int] | None = None  # the iterator and the batch it is at
        self._restore: dict | None = None  # a saved state for the epoch a resume starts with

    @property
    def _numba_steps(self) -> bool:
        """CPU mode with `dali_cpu_fast`: photometric steps as numba functions, if they can be built."""
        return self.decoder_device == "cpu" and self.spec.data.dali_cpu_fast and numba_photometric_available()

    @property
    def _out_dtype(self) -> types.DALIDataType:
        return types.FLOAT16 if self.spec.dtype == torch.float16 else types.FLOAT

    def state_dict(self) -> dict | None:
        """Where this rank's augmentations stand: DALI's checkpoint of the pipeline after the last
        batch handed out (random generators included), or None between epochs (a new epoch's
        pipeline starts from its seed)."""
        if self._live is None:
            return None
        iterator, batch = self._live
        return {"epoch": self.epoch, "batch": batch, "dali": iterator.checkpoints()[0]}

    def load_state_dict(self, state: dict | None) -> None:
        """Continue the saved epoch's augmentations where they stopped (used by the first matching epoch)."""
        self._restore = state

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next iteration reads `epoch` from `start_batch`. A pipeline kept from an epoch cut
        short (`--train.steps_per_epoch`) is dropped and collected now, with its decoder memory."""
        if self._live is not None:
            self._live = None
            free_dropped_pipelines()
        super().set_epoch(epoch, start_batch)

    def _iterator(self, source: _ShardSource, first_batch: int) -> DALIGenericIterator:
        """A fresh pipeline over `source` (built per epoch: cheap, and no reset-mid-epoch state)."""
        state, self._restore = self._restore, None
        restore = (state["dali"] if state and (state["epoch"], state["batch"]) == (self.epoch, first_batch)
                   else None)
        data = self.spec.data
        with warnings.catch_warnings():  # the source is ours to position: it starts at `first_batch`
            warnings.filterwarnings("ignore", message="Checkpointing enabled in a pipeline with external source")
            pipe = multicrop_pipeline(source, self.spec.recipe, self.decoder_device, data.dali_hw_decoder_load,
                                      self._out_dtype, data.dali_cpu_fast, self._numba_steps, data.device_augment,
                                      batch_size=self.spec.batch_size, num_threads=self.num_threads,
                                      device_id=self.device_id, prefetch_queue_depth=2,
                                      seed=batch_seed(self.spec.seed, self.epoch, self.spec.rank, first_batch),
                                      enable_checkpointing=True, checkpoint=restore)
            names = [f"view{v}" for v in range(self.spec.recipe.num_views)] + list(OUTPUT_NAMES_EXTRA)
            return DALIGenericIterator(pipe, names, last_batch_policy=LastBatchPolicy.PARTIAL, size=-1)

    def __iter__(self) -> Iterator[MultiCropBatch]:
        batches = self.shard()
        done = 0  # batches delivered: a failed pass restarts at batch `done`
        met: set[int] = set()  # bad files met this epoch: each counts once (MultiCropBatch.num_skipped)
        live: DALIGenericIterator | None = None  # the pass's iterator: `state_dict` checkpoints it
        current: _ShardSource | None = None  # the pass's source: its reader threads stop with the pass

        def new_source() -> _ShardSource | None:
            nonlocal current
            self._live = None  # a new pass (or the epoch's end): no iterator to checkpoint yet
            if current is not None:
                current.close()
            current = (_ShardSource(self.samples, batches[done:], self.bad, self.spec.data.dali_read_threads)
                       if done < len(batches) else None)
            return current

        def decode(source: _ShardSource) -> DALIGenericIterator:
            nonlocal live
            live = self._iterator(source, self.start_batch + done)
            return live

        def deliver(source: _ShardSource, k: int, out: list[dict[str, torch.Tensor]]) -> MultiCropBatch:
            nonlocal done
            # DALI returns batches in the order the source sent them: this is the pass's batch k.
            passed_over = source.passed_over[k]
            done += 1
            self._live = (live, self.start_batch + done)  # set before the batch is handed out (and saved)
            batch = self._to_batch(out[0], len(passed_over - met), self.start_batch + done - 1)
            met.update(passed_over)
            return batch

        ended = False  # to its end, or failed; not when a stop closes it mid-epoch (`state_dict` saves its pipeline)
        try:
            yield from run_retiring_bad_files(self.samples, self.bad, new_source, decode, deliver)
            ended = True
        except RuntimeError:
            ended = True
            raise
        finally:
            if current is not None:
                current.close()
            # The training loop breaks out after the epoch's last step (the generator is closed
            # there, not run to its end): that epoch has ended too.
            if ended or done >= len(batches):  # the epoch's pipeline is garbage now: freed before anything forks
                live = self._live = None
                free_dropped_pipelines()

    def _to_batch(self, out: dict[str, torch.Tensor], num_skipped: int, batch_no: int) -> MultiCropBatch:
        s = self.spec
        outputs = [out[f"view{v}"] for v in range(s.recipe.num_views)]
        if s.data.device_augment:  # uint8 HWC crops: the photometric steps on the training device
            g = torch.Generator().manual_seed(batch_seed(s.seed, self.epoch, s.rank, batch_no))  # host draws
            crops = [x.to(s.device, non_blocking=True) for x in outputs]
            views = augment_views(crops, s.recipe, s.recipe.views(), g, dtype=s.dtype)
        else:  # HWC memory = NCHW channels_last, no copy
            views = [x.permute(0, 3, 1, 2).to(s.device, dtype=s.dtype, non_blocking=True) for x in outputs]
        views = [x if s.channels_last else x.contiguous() for x in views]
        return MultiCropBatch(views=views, index=out["index"].reshape(-1).cpu(), label=out["label"].reshape(-1).cpu(),
                              num_skipped=num_skipped)
