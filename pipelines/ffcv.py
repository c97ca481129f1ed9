"""The FFCV loader: a `.beton` -> ONE decode per image -> every crop -> device -> batched augmentations.

FFCV's own multi-view recipe decodes the JPEG again for every view (8 decodes per image
here). `MultiCropDecoder` is an FFCV decoder compiled with numba that decodes once and
cuts all the views' random-resized crops from that buffer into one flat uint8 row per
image; on the training device the row is split into views, and the photometric steps run
as batched tensor ops with per-sample parameters (`pipelines.device_augment`). When the
training device is the CPU, the photometric steps run instead inside the decoder, per crop,
on uint8 pixels in FFCV's threads (`pipelines.cpu_augment`): the main process then only
normalises, and the model keeps the cores it would have spent on float32 tensor ops.

* Order: by default the shared sampler's (`pipelines.sampler`: the same permutation as
  every backend, sharded across ranks, resumable mid-epoch). `order` = "random",
  "quasi_random" or "sequential" uses FFCV's own traversal instead (with
  `distributed=True` on several processes); a resumed epoch then skips the batches it had
  already trained on. FFCV's orders are functions of (seed, epoch) too.
* Randomness: the decoder reseeds numba's generator (per thread) before each image's
  draws, from (seed, epoch, dataset index) (`image_seed`), so an image's crops and, on
  CPU, its photometric draws do not depend on the threads, on prefetching or on the batch
  the epoch started at; the device-side augmentations draw (on the host) from `batch_seed`. Hence a run stopped
  mid-epoch and resumed logs the same losses as an uninterrupted one, whatever the order
  option (tests/test_loader_resume.py), and needs no loader state beyond (epoch, batch).
* Compilation: numba compiles FFCV's pipeline in every process on its first batch. The
  stages that can be cached are compiled with `cache=True` (on disk, under
  `__pycache__` or NUMBA_CACHE_DIR), so later runs start in seconds; the decoder holds
  ctypes pointers and is compiled anew each run.
* Crops are resized with OpenCV's INTER_AREA (FFCV's resize), not bicubic.
"""

from __future__ import annotations

import atexit
import gc
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import replace
from queue import Empty
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.cores import torch_threads_kept, usable_cores

with torch_threads_kept():  # FFCV's import sets torch's thread count to 1
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder, get_random_crop
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.state import State
    from ffcv.transforms import ToDevice, ToTensor
    from ffcv.traversal_order.base import TraversalOrder
from numba import carray, njit
from numba import set_num_threads as set_numba_threads

from pipelines.augment import MultiCropRecipe
from pipelines.batch import MultiCropBatch
from pipelines.beton import CONVERT_HINT, IMAGE_FIELD, LABEL_FIELD, BetonError, check_beton
from pipelines.cpu_augment import augment_crop_u8, crop_params
from pipelines.device_augment import augment_views, normalize_crops
from pipelines.folder import check_class_count, check_not_splits
from pipelines.numba_pointer import void_pointer
from pipelines.sampler import ShardedLoader, batch_seed, epoch_permutation
from pipelines.spec import ORDERS, LoaderSpec

if TYPE_CHECKING:
    from ffcv.loader.epoch_iterator import EpochIterator

# The orders of `pipelines.spec.ORDERS` that are FFCV's own ("sampler" is the shared one).
FFCV_ORDERS = {name: OrderOption[name.upper()] for name in ORDERS if name != "sampler"}


def _cached_compile(code: Callable[..., Any], signature: Any = None) -> Callable[..., Any]:
    """FFCV's `Compiler.compile` with numba's on-disk cache (uncacheable stages fall back)."""
    from numba import njit

    parallel = bool(getattr(code, "is_parallel", False)) and Compiler.num_threads > 1
    if not Compiler.is_enabled:
        return code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "cannot cache ..." for closures over ctypes pointers
        return njit(signature, fastmath=True, nogil=True, error_model="numpy", parallel=parallel, cache=True)(code)


Compiler.compile = classmethod(lambda cls, code, signature=None: _cached_compile(code, signature))


def _set_decoder_threads(cls, n: int) -> None:
    """FFCV's `Compiler.set_num_threads` (numba's threads for its decoding stages) without its
    `torch.set_num_threads(n)`: FFCV calls it with its worker count when a loader is made and in each
    epoch's thread, which would resize the trainer's torch thread pool (process-wide) behind its back
    (torchrun's OMP_NUM_THREADS=1 per process, or the user's own choice)."""
    cls.num_threads = n if n >= 1 else usable_cores()
    set_numba_threads(cls.num_threads)


Compiler.set_num_threads = classmethod(_set_decoder_threads)
# numba warns, at first call, about each stage it cannot cache: expected for the decoder.
warnings.filterwarnings("ignore", message="Cannot cache compiled function")


# The stream of the decoder's per-image draws, apart from the epoch order's (SeedSequence([seed, epoch])).
DECODER_STREAM = 1


def epoch_key(seed: int, epoch: int) -> np.uint64:
    """The 64-bit key of one epoch's per-image draws in the decoder (`image_seed`)."""
    return np.random.SeedSequence([seed, epoch], spawn_key=(DECODER_STREAM,)).generate_state(1, np.uint64)[0]


@njit(cache=True, nogil=True)
def read_key(address: int) -> np.uint64:
    """The uint64 at `address`: the decoder's epoch key, read at every batch.

    Why an address: numba freezes a NumPy array a compiled function closes over as a
    constant, so an array that Python updates each epoch must be reached through its address.
    """
    return carray(void_pointer(address), 1, np.uint64)[0]


@njit(cache=True, nogil=True)
def image_seed(key: np.uint64, index: np.uint64) -> np.uint32:
    """The seed of one image's draws in one epoch: SplitMix64's output `index` of the stream `key`.

    The finaliser is a bijection of the 64-bit state, so the images of an epoch get
    distinct 64-bit values; numba's `np.random.seed` keeps 32 bits of them (as the
    torchvision loader's `sample_seed`).
    """
    z = key + (np.uint64(index) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.uint32(z >> np.uint64(32))


class MultiCropDecoder(ResizedCropRGBImageDecoder):
    """Decode each image once; emit every view's random-resized crop into one flat uint8 row.

    Row layout: view 0 (s0 x s0 x 3), view 1, ..., in recipe order. Crop boxes are drawn
    independently per view and per image (FFCV's torchvision-equivalent `get_random_crop`).
    With `photometric=True` each crop also gets the recipe's flip, jitter, grayscale, blur
    and solarize right after it is cut (`pipelines.cpu_augment`, uint8, in FFCV's threads).
    Every draw of an image comes from numba's generator reseeded with
    `image_seed(key[0], index)` just before them, in the thread that decodes it: `key` is a
    one-element uint64 array that the owner sets to `epoch_key(seed, epoch)` before each
    epoch starts (and keeps alive with the decoder; the compiled code holds its address).
    """

    def __init__(self, recipe: MultiCropRecipe, key: np.ndarray, photometric: bool = False):
        if key.dtype != np.uint64 or key.shape != (1,):
            raise ValueError(f"the epoch key must be a uint64 array of shape (1,), not {key.dtype} {key.shape}")
        views = recipe.views()
        self.key = key
        self.photometric = photometric
        self.params = np.stack([crop_params(recipe, v) for v in views])
        self.sizes = np.array([v.size for v in views], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(3 * self.sizes**2)]).astype(np.int64)
        self.scales = np.array([v.scale for v in views], dtype=np.float64)
        self.ratio = np.array(recipe.ratio, dtype=np.float64)
        super().__init__((int(self.offsets[-1]), 1))

    @property
    def get_crop_generator(self) -> Callable[..., Any]:
        return get_random_crop

    def declare_state_and_memory(self, previous_state: State) -> tuple[State, tuple[AllocationQuery, AllocationQuery]]:
        self.max_width = np.uint64(self.metadata["width"].max())
        self.max_height = np.uint64(self.metadata["height"].max())
        shape, dtype = (int(self.offsets[-1]),), np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=shape, dtype=dtype),
                (AllocationQuery(shape, dtype), AllocationQuery((self.max_height * self.max_width * np.uint64(3),), dtype)))

    def generate_code(self) -> Callable[..., Any]:
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c = Compiler.compile(imdecode)
        resize_crop_c = Compiler.compile(resize_crop)
        get_crop_c = Compiler.compile(get_random_crop)
        sizes, offsets, scales, ratio = self.sizes, self.offsets, self.scales, self.ratio
        num_views, photometric, params = len(sizes), self.photometric, self.params
        key_address = np.int64(self.key.ctypes.data)  # typed int64, not Literal[int]: one cached read_key

        def decode(batch_indices: np.ndarray, my_storage: tuple[np.ndarray, np.ndarray], metadata: np.ndarray,
                   storage_state: Any) -> np.ndarray:
            destination, temp_storage = my_storage
            key = read_key(key_address)
            for dst_ix in my_range(len(batch_indices)):
                np.random.seed(image_seed(key, batch_indices[dst_ix]))  # this thread's generator, for this image
                field = metadata[batch_indices[dst_ix]]
                image_data = mem_read(field["data_ptr"], storage_state)
                height, width = np.uint32(field["height"]), np.uint32(field["width"])
                if field["mode"] == jpg:  # the one decode of this image
                    temp = temp_storage[dst_ix]
                    imdecode_c(image_data, temp, height, width, height, width, 0, 0, 1, 1, False, False)
                    image = temp.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = image_data.reshape(height, width, 3)
                for v in range(num_views):
                    i, j, h, w = get_crop_c(height, width, scales[v], ratio)
                    out = destination[dst_ix, offsets[v]:offsets[v + 1]].reshape(sizes[v], sizes[v], 3)
                    resize_crop_c(image, i, i + h, j, j + w, out)
                    if photometric:
                        augment_crop_u8(out, params[v])
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        decode.key = self.key  # the memory at key_address lives as long as the code
        return decode


class _PlanOrder(TraversalOrder):
    """FFCV traversal that reads the order planned by `FfcvLoader` for the coming epoch.

    (FFCV's Loader calls an order *instance* with itself, so the instance is its own factory.)
    """

    def __init__(self, plan: Callable[[int], np.ndarray]):
        self.plan = plan

    def __call__(self, loader: Loader) -> "_PlanOrder":
        TraversalOrder.__init__(self, loader)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.plan(epoch)


_LIVE_LOADERS: "weakref.WeakSet[FfcvLoader]" = weakref.WeakSet()


EPOCH_THREAD_JOIN_S = 120.0  # FFCV's thread finishes its batch in flight, then sees the stop


READER_POLL_S = 1.0  # how often the training thread, waiting for a batch, looks whether FFCV's thread is alive


def _delivered(epoch_it: EpochIterator, path: str) -> Iterator[Any]:
    """FFCV's batches, as iterating `epoch_it` gives them. FFCV's own `__next__` waits on its queue with
    no timeout, so when its thread dies (an exception in its decoder: a .beton damaged inside) the
    training thread waited forever, deaf even to SIGTERM; here it raises a BetonError instead."""
    from ffcv.loader.epoch_iterator import IS_CUDA

    while True:
        try:
            item = epoch_it.output_queue.get(timeout=READER_POLL_S)
        except Empty:
            if epoch_it.is_alive():
                continue
            try:  # its last put may have come just before it ended
                item = epoch_it.output_queue.get_nowait()
            except Empty:
                raise BetonError(f"FFCV's reader of {path!r} stopped mid-epoch (its error is printed above): the "
                                 f".beton is damaged; copy it again, or {CONVERT_HINT}") from None
        if item is None:  # the end of the epoch
            epoch_it.close()
            return
        slot, result = item
        if IS_CUDA:  # as FFCV's __next__: the batch's copy to the device is done before it is used
            epoch_it.current_stream.wait_stream(epoch_it.cuda_streams[slot])
        yield result


def _stop_epoch_thread(epoch_it: EpochIterator) -> None:
    """Stop FFCV's epoch thread and wait for it, then free its memory.

    FFCV's `EpochIterator` is a daemon thread that keeps decoding until its queue is full
    and only then looks at its stop flag, and its end-of-epoch marker is put with no
    timeout at all; `close()` neither stops it nor waits. A thread still running when the
    interpreter shuts down drops a tensor after Python has gone and the process aborts
    ("terminate called without an active exception", exit code 134). So: flag, then
    empty the queue (so that no put blocks) until the thread has ended, then close.
    """
    epoch_it.terminate_event.set()
    deadline = time.monotonic() + EPOCH_THREAD_JOIN_S
    while epoch_it.is_alive() and time.monotonic() < deadline:
        try:
            while True:
                epoch_it.output_queue.get_nowait()
        except Empty:
            pass
        epoch_it.join(timeout=0.05)
    if epoch_it.is_alive():
        warnings.warn(f"FFCV's epoch thread did not stop within {EPOCH_THREAD_JOIN_S:.0f} s", stacklevel=2)
    # Batches decoded ahead were copied to the GPU on FFCV's own streams, into memory the
    # caching allocator gave out on the main stream: the main stream waits for those copies
    # before that memory can be handed out again.
    for stream in getattr(epoch_it, "cuda_streams", None) or []:
        if stream is not None:
            epoch_it.current_stream.wait_stream(stream)
    epoch_it.close()


@atexit.register
def _release_ffcv_loaders() -> None:
    """Stop every epoch thread still running and drop FFCV's loaders before the interpreter tears down."""
    for loader in list(_LIVE_LOADERS):
        if loader._epoch_it is not None:
            _stop_epoch_thread(loader._epoch_it)
            loader._epoch_it = None
        loader._loader = None
    gc.collect()


class FfcvLoader(ShardedLoader):
    """Multi-crop batches from a `.beton` written by tools/convert_imagenet_to_ffcv.py."""

    def __init__(self, spec: LoaderSpec):
        classes, num_images = check_beton(spec.path)  # clear error naming the converter
        # The folder scanner's checks, on the class names the converter recorded (when known).
        check_not_splits(classes, f"{spec.path!r} was converted from a folder that",
                         lambda split: f"convert its {split}/ folder instead: python tools/convert_imagenet_to_ffcv.py "
                                       f"SRC/{split} OUT.beton")
        if len(classes) == 1:
            check_class_count(classes, False, repr(str(spec.path)), f"has one class ({classes[0]!r})")
        super().__init__(spec, num_images)
        order = spec.data.ffcv_order
        if order not in ORDERS:
            raise ValueError(f"data.ffcv_order: unknown {order!r}; choose one of {', '.join(ORDERS)}")
        if order == "quasi_random" and spec.world_size > 1:
            raise ValueError("data.ffcv_order: FFCV's quasi_random order does not support several processes; "
                             "use sampler or random")
        self._loader: Loader | None = None
        self._epoch_it = None  # FFCV's EpochIterator (a thread) of the epoch being read
        self._inner_order: TraversalOrder | None = None
        self._pristine_pages: np.ndarray | None = None  # FFCV's quasi-random page table, as built
        self._key = np.zeros(1, dtype=np.uint64)  # the decoder's epoch key (its compiled code reads it)
        _LIVE_LOADERS.add(self)

    @property
    def photometric_in_loader(self) -> bool:
        """CPU training: the photometric steps run in the decoder's threads, not as tensor ops."""
        return self.spec.device.type != "cuda"

    def _plan(self, epoch: int) -> np.ndarray:
        """This rank's indices for `epoch`, from `start_batch` on, whole batches only."""
        s, n = self.spec, len(self)
        if self._inner_order is None:
            perm = epoch_permutation(self.num_images, s.seed, epoch).numpy()
            mine = perm[s.rank : n * s.batch_size * s.world_size : s.world_size]
        else:
            if self._pristine_pages is not None:
                # FFCV's QuasiRandom shuffles its page table in place at each call, so its order
                # would depend on how many epochs were planned before (a resumed run would read
                # other images than an uninterrupted one): restored, it is a function of (seed, epoch).
                np.copyto(self._inner_order.page_to_samples_array, self._pristine_pages)
            mine = np.asarray(self._inner_order.sample_order(epoch))[: n * s.batch_size]
        return mine[self.start_batch * s.batch_size :].astype(np.uint64)

    def _build(self) -> Loader:
        s = self.spec
        plan_order = _PlanOrder(self._plan)
        device = s.device if s.device.type == "cuda" else torch.device("cpu")
        decoder = MultiCropDecoder(s.recipe, self._key, photometric=self.photometric_in_loader)
        loader = Loader(s.path, batch_size=s.batch_size, num_workers=max(1, s.num_workers or 1),
                        order=plan_order, distributed=False, seed=s.seed, os_cache=s.data.ffcv_os_cache, drop_last=True,
                        pipelines={IMAGE_FIELD: [decoder, ToTensor(),
                                                 ToDevice(device, non_blocking=True)],
                                   LABEL_FIELD: [IntDecoder(), ToTensor()]})
        if s.data.ffcv_order != "sampler":  # FFCV's own order, dealt to ranks by FFCV (distributed=True)
            probe = Loader(s.path, batch_size=s.batch_size, num_workers=1, order=FFCV_ORDERS[s.data.ffcv_order],
                           distributed=s.world_size > 1, seed=s.seed, pipelines={IMAGE_FIELD: None, LABEL_FIELD: None})
            self._inner_order = probe.traversal_order
            pages = getattr(self._inner_order, "page_to_samples_array", None)  # QuasiRandom's only
            self._pristine_pages = None if pages is None else pages.copy()
        return loader

    def __iter__(self) -> Iterator[MultiCropBatch]:
        if self._loader is None:
            # FFCV sizes every epoch from the order it sees at construction: show it a whole
            # epoch even when the first iteration resumes mid-epoch.
            start, self.start_batch = self.start_batch, 0
            try:
                self._loader = self._build()
            finally:
                self.start_batch = start
        self._loader.next_epoch = self.epoch
        plan = self._plan(self.epoch)
        if self._epoch_it is not None:  # an earlier epoch left unfinished
            _stop_epoch_thread(self._epoch_it)
        # No epoch thread runs now; FFCV's starts decoding (ahead) in iter(): the key first.
        self._key[0] = epoch_key(self.spec.seed, self.epoch)
        epoch_it = self._epoch_it = iter(self._loader)
        try:
            yield from self._batches(epoch_it, plan)
        finally:  # also when the caller stops early: the thread must not outlive the epoch
            _stop_epoch_thread(epoch_it)
            if self._epoch_it is epoch_it:
                self._epoch_it = None

    def _batches(self, epoch_it: EpochIterator, plan: np.ndarray) -> Iterator[MultiCropBatch]:
        s, recipe = self.spec, self.spec.recipe
        offsets = np.concatenate([[0], np.cumsum([3 * v.size**2 for v in recipe.views()])])
        for b, (rows, label) in enumerate(_delivered(epoch_it, s.path)):
            batch_no = self.start_batch + b
            g = torch.Generator().manual_seed(batch_seed(s.seed, self.epoch, s.rank, batch_no))  # host draws
            crops = [rows[:, offsets[v]:offsets[v + 1]].reshape(-1, view.size, view.size, 3)
                     for v, view in enumerate(recipe.views())]
            if self.photometric_in_loader:
                views = [normalize_crops(x, recipe, dtype=s.dtype) for x in crops]
            else:
                views = augment_views(crops, recipe, recipe.views(), g, dtype=s.dtype)
            views = [x if s.channels_last else x.contiguous() for x in views]
            index = torch.from_numpy(plan[b * s.batch_size : (b + 1) * s.batch_size].astype(np.int64))
            yield MultiCropBatch(views=views, index=index, label=label.reshape(-1).long().cpu().clone())
