"""The DALI evaluation loader: `pipelines.eval.EvalLoader`'s contract, with DALI's decoder and resizer.

Why: evaluation reads every val (and, for the k-NN, every train) image once per call;
on a GPU the PIL decode + resize in DataLoader workers is the bottleneck, while
nvJPEG (`mixed`, with the hardware decoder taking `data.dali_hw_decoder_load` of the images) and
DALI's GPU resampler keep up with the backbone. On a CPU-only machine DALI decodes with
libjpeg-turbo and resamples on its own threads.

Same transform as `pipelines.eval.eval_transform`: shorter side to round(size / crop_fraction)
with an antialiased linear (or, with `interpolation="bicubic"`, cubic) filter (torchvision's
resize of a PIL image also antialiases), centre crop `size`, the view's mean/std, with
torchvision's output sizes and crop offsets to the pixel. The two resamplers differ in detail, so
pixels agree closely but not exactly (tests/test_eval_loaders.py measures it).

Same iteration contract: (images N x 3 x S x S float on `device`, labels, dataset
indices), this rank's share (every world_size-th image) in dataset order, every readable
image exactly once, the last batch partial. Bad files are dropped with a warning, as
EvalLoader drops them: DALI fails the whole pipeline on one undecodable sample, so each
file's bytes are screened first (`pipelines.images`), and an error that still gets through
is traced to its file with PIL and the pass goes on after the last delivered batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from pipelines.augment import EvalView
from pipelines.folder import Listing, scan_image_folder
from pipelines.dali_decoder import ORIENTATION_AS_PIL, dali_interp, decoder_args
from pipelines.images import ReadAhead, free_dropped_pipelines, placement, read_unless_bad, run_retiring_bad_files
from pipelines.sampler import rank_share
from pipelines.spec import DataConfig

if TYPE_CHECKING:
    from nvidia.dali.pipeline import DataNode

OUTPUT_NAMES = ("images", "label", "index")


class _EvalSource:
    """DALI external source: this rank's files from position `start` on, as encoded bytes.

    Screens each file before DALI sees it and drops a bad one (with a warning); batches
    are filled with good images, so only the last one is short. `ends[b]` is the position
    in `order` after batch b, which is where a pass restarts after a decode failure. Files
    are read by a thread pool up to two batches ahead (`ReadAhead`); `close` stops it.
    """

    def __init__(self, samples: list[tuple[str, int]], order: list[int], start: int, batch_size: int,
                 bad: dict[int, str], read_threads: int):
        self.samples, self.pos, self.batch_size, self.bad = samples, start, batch_size, bad
        self.sent: list[list[int]] = []  # dataset indices handed to DALI, per batch (it prefetches ahead)
        self.ends: list[int] = []
        self._reads = ReadAhead(self._read, order[start:], depth=2 * batch_size, threads=read_threads,
                                chunk=-(-batch_size // read_threads))
        self.pending = self._next_batch()  # read ahead, so an all-bad shard builds no pipeline

    def __iter__(self) -> "_EvalSource":
        return self

    def __next__(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        batch, self.pending = self.pending, None
        if batch is None or not batch[0]:
            self.close()
            raise StopIteration
        self.pending = self._next_batch()
        blobs, index, end = batch
        self.sent.append(index)
        self.ends.append(end)
        labels = [np.array([self.samples[i][1]], dtype=np.int64) for i in index]
        return blobs, labels, [np.array([i], dtype=np.int64) for i in index]

    @property
    def empty(self) -> bool:
        return self.pending is None or not self.pending[0]

    def close(self) -> None:
        self._reads.close()

    def _read(self, i: int) -> tuple[int, np.ndarray | None]:
        return i, read_unless_bad(self.samples, self.bad, i)

    def _next_batch(self) -> tuple[list[np.ndarray], list[int], int]:
        blobs, index = [], []
        while len(blobs) < self.batch_size:
            got = next(self._reads, None)
            if got is None:
                break
            i, data = got
            self.pos += 1
            if data is not None:
                blobs.append(data)
                index.append(i)
        return blobs, index, self.pos


def _half_even(d: DataNode) -> DataNode:
    """round(d / 2) with Python's ties-to-even, on per-sample integers: torchvision's CenterCrop offset."""
    k = d // 2
    return k + (d - 2 * k) * (k - 2 * (k // 2))


def _torchvision_geometry(images: DataNode, view: EvalView) -> tuple[DataNode, DataNode, DataNode, DataNode]:
    """Per-sample resized (height, width) and normalised crop positions that equal torchvision's.

    Why not `resize_shorter` + crop_pos 0.5: DALI rounds the long side (torchvision
    truncates it) and rounds a half-pixel crop offset away from zero (torchvision to even),
    so about half of the images came out shifted by one pixel, which moves pixels as much
    as the whole resampler difference. Integer arithmetic here reproduces both rules
    exactly; DALI's crop anchor is round(pos * (extent - crop)), so pos = offset / (extent - crop)
    lands on the offset.
    """
    short, size = view.resize, view.size
    shape = images.shape()
    h, w = shape[0], shape[1]
    tall = fn.cast(h > w, dtype=types.INT64)
    new_h = short + tall * ((short * h) // w - short)
    new_w = short + (1 - tall) * ((short * w) // h - short)

    def pos(extent: DataNode) -> DataNode:
        d = extent - size
        return fn.cast(_half_even(d), dtype=types.FLOAT) / fn.cast(d + fn.cast(d == 0, dtype=types.INT64),
                                                                     dtype=types.FLOAT)

    return fn.cast(new_h, dtype=types.FLOAT), fn.cast(new_w, dtype=types.FLOAT), pos(new_h), pos(new_w)


@pipeline_def
def eval_pipeline(source: _EvalSource, view: EvalView, decoder_device: str, hw_decoder_load: float, layout: str
                  ) -> tuple[DataNode, DataNode, DataNode]:
    """Encoded bytes -> decode -> shorter side round(size / crop_fraction), antialiased -> centre crop -> normalise."""
    jpegs, label, index = fn.external_source(source=source, num_outputs=3, batch=True,
                                             dtype=[types.UINT8, types.INT64, types.INT64])
    decode_args = decoder_args(decoder_device, hw_decoder_load,  # + nvJPEG memory on GPU (pipelines/dali_decoder.py)
                               threads=Pipeline.current().num_threads)
    # jpeg_fancy_upsampling: nvJPEG upsamples chroma as libjpeg-turbo (PIL) does, not its own way.
    images = fn.decoders.image(jpegs, device=decoder_device, output_type=types.RGB, jpeg_fancy_upsampling=True,
                               **ORIENTATION_AS_PIL, **decode_args)
    new_h, new_w, pos_y, pos_x = _torchvision_geometry(images, view)
    images = fn.resize(images, resize_y=new_h, resize_x=new_w, interp_type=dali_interp(view.interpolation),
                       antialias=True)
    images = fn.crop_mirror_normalize(images, crop=(view.size, view.size), crop_pos_x=pos_x, crop_pos_y=pos_y,
                                      dtype=types.FLOAT, output_layout=layout,
                                      mean=[255 * m for m in view.mean], std=[255 * s for s in view.std])
    return images, label, index


class DaliEvalLoader:
    """This rank's share (every world_size-th image) of a labelled folder, in order, through DALI.

    Takes `EvalLoader`'s arguments; `num_workers` is DALI's CPU thread count (0: one per
    core). `data` holds the DALI options, the training loader's (`data.dali_hw_decoder_load`:
    the share of images nvJPEG's hardware decoder takes on GPUs that have one); its
    defaults when not given.
    """

    def __init__(self, root: str, view: EvalView, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, device: torch.device | None = None, channels_last: bool = True,
                 data: DataConfig | None = None, listing: Listing | None = None):
        self.samples, self.classes = listing if listing is not None else scan_image_folder(root)
        self.indices = rank_share(len(self.samples), rank, world_size)
        self.view, self.batch_size = view, batch_size
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.channels_last, self.data = channels_last, data if data is not None else DataConfig()
        self.decoder_device, self.device_id, self.num_threads = placement(self.device, num_workers)
        self.bad: dict[int, str] = {}  # dataset index -> why it is skipped (kept across passes)

    def _iterator(self, source: _EvalSource) -> DALIGenericIterator:
        """A fresh pipeline over `source` (built per pass: cheap next to decoding a split)."""
        # HWC memory read as NCHW is channels_last without a copy; CHW when contiguous NCHW is wanted.
        layout = "HWC" if self.channels_last else "CHW"
        pipe = eval_pipeline(source, self.view, self.decoder_device, self.data.dali_hw_decoder_load, layout,
                             batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                             prefetch_queue_depth=2)
        return DALIGenericIterator(pipe, list(OUTPUT_NAMES), last_batch_policy=LastBatchPolicy.PARTIAL, size=-1)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        start = 0  # position in `indices` after the last batch delivered: a failed pass restarts there
        current: _EvalSource | None = None  # the pass's source: its reader threads stop with the pass

        def new_source() -> _EvalSource | None:
            nonlocal current
            if current is not None:
                current.close()
            current = _EvalSource(self.samples, self.indices, start, self.batch_size, self.bad,
                                  self.data.dali_read_threads)
            return None if current.empty else current

        def deliver(source: _EvalSource, k: int, out: list[dict[str, torch.Tensor]]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            nonlocal start
            start = source.ends[k]
            return self._to_batch(out[0])

        try:
            yield from run_retiring_bad_files(self.samples, self.bad, new_source, self._iterator, deliver)
        finally:  # the pass's readers stop, and its pipeline is garbage now: freed before anything forks
            if current is not None:
                current.close()
            free_dropped_pipelines()

    def _to_batch(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images = out["images"]
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)  # NHWC memory = NCHW channels_last, no copy
        images = images.to(self.device, non_blocking=True)
        return images, out["label"].reshape(-1).cpu(), out["index"].reshape(-1).cpu()
