"""Image files in, pixels or screened bytes out: what every loader and the converter share of image I/O.

* Decoding with PIL (`load_rgb`): fully, so a truncated file fails here and not later, and
  converted to RGB; `UNREADABLE` are the errors PIL raises on a bad file.
* The converter's verdict on a file and its pixels (`decode_for_conversion`): the sniff, then a
  full decode of the bytes read once.
* Sniffing (`problem`): cheap checks on encoded bytes, before a decoder that cannot skip a
  bad sample sees them. DALI's decoders fail the WHOLE pipeline on one undecodable sample
  ("Current pipeline object is no longer valid"), so the DALI loaders screen each file's
  bytes first. The checks read only the first and last bytes, so they cost microseconds,
  and they catch what ImageNet-scale folders really contain: non-image files, and JPEG or
  PNG files cut short by an interrupted copy (a truncated JPEG lacks its end-of-image
  marker and makes libjpeg-turbo stop with "Premature end of JPEG data"). Corruption
  inside an otherwise whole file decodes to wrong pixels, which is harmless for training.
* Bad-file screening: `read_screened` (bytes that pass the sniff), `next_readable` (a bad
  training image is replaced by the next good one, at most `MAX_REPLACEMENTS` in a row).
* Reading ahead (`ReadAhead`): a DALI source's files are read by a thread pool, a batch or
  two ahead of DALI, since one thread's open+read latency caps a loader on network storage.
* Decoders that die on a bad file (DALI): `run_retiring_bad_files` runs a pass, and when
  it fails traces the failure to its files with PIL, retires them and restarts the pass
  after the last batch delivered; `placement` says where such a decoder runs;
  `free_dropped_pipelines` frees a finished pass's pipeline before anything forks.
"""

from __future__ import annotations

import gc
import io
import itertools
import os
import stat
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from PIL import Image

from pipelines.cores import default_num_workers
from pipelines.folder import DataLayoutError

T = TypeVar("T")

# Errors PIL raises on truncated, corrupt or non-image files.
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
MAX_REPLACEMENTS = 16  # bad images in a row before a loader gives up: the data, not a file, is broken
MAX_PIPELINE_ERRORS = 8  # restarts per pass before giving up: something else is wrong

# Magic numbers of the image formats PIL decodes (webp, pnm and avif are recognised in `image_format`).
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),
    (b"\xff\x4f\xff\x51", "jpeg2000"),  # a bare codestream (.j2k)
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"\x00\x00\x01\x00", "ico"),
)
# The formats DALI's decoders (nvImageCodec) read too; a file of another format would fail its pipeline.
DALI_FORMATS = frozenset({"jpeg", "png", "bmp", "tiff", "webp", "pnm", "jpeg2000"})
ANY_FORMAT = DALI_FORMATS | {"gif", "ico", "avif"}  # what PIL decodes too: the converter reads them
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND"
MIN_BYTES = 32
_BAD_FILE_LOCK = threading.Lock()  # readers in several threads record (and warn about) a bad file once


def open_image_file(path: str | os.PathLike) -> io.BufferedReader:
    """`path` opened for reading in binary, or OSError (saying what it is) when it is not a regular file.

    Why: opening a named pipe (a FIFO left in a data folder, named like an image) blocks until
    something writes to it, so a plain open() hung the loader for ever. The scan lists names
    without a stat per file (see `folder.walk_files`), so the check happens here, on the open file
    (no second lookup of the path): the open does not block (O_NONBLOCK, which changes nothing for
    a regular file's reads)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "a folder" if stat.S_ISDIR(mode) else "a device file")
            raise OSError(f"{kind}, not a regular file: remove it from the data folder")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def load_rgb(path: str) -> Image.Image:
    """Decode fully (so truncation is found here, not later) and convert CMYK/L/P/RGBA to RGB."""
    with open_image_file(path) as f, Image.open(f) as img:
        img.load()
        return eight_bit(img).convert("RGB")


def eight_bit(img: Image.Image) -> Image.Image:
    """A grey image of more than 8 bits as 8-bit "L", scaled as DALI's decoders scale it: 16-bit
    integers by their high byte, floats from [0, 1] (or clipped to [0, 255] when they exceed 1).
    PIL's convert("RGB") clips instead, so a 16-bit scan came out almost white. Others pass as they are."""
    if img.mode.startswith("I;16") or img.mode == "I":  # "I": 32-bit integers, in practice 16-bit data
        pixels = np.asarray(img).astype(np.int64) >> 8
    elif img.mode == "F":
        pixels = np.asarray(img, dtype=np.float64)
        pixels = np.nan_to_num(pixels * 255 if pixels.size and np.nanmax(pixels) <= 1 else pixels)
    else:
        return img
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"


def why_unreadable(err: BaseException) -> str:
    """What PIL's error on a file means, for the warning that skips it: its type and message, or, for an
    image above PIL's decompression-bomb limit (which DALI decodes), that limit and how to lift it."""
    if isinstance(err, Image.DecompressionBombError):
        return (f"larger than PIL's limit of {Image.MAX_IMAGE_PIXELS:,} pixels x 2 (its guard against "
                f"decompression bombs; DALI has none): shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS in your recipe")
    return f"{type(err).__name__}: {err}"


class UnreadableImage(OSError):
    """A file PIL cannot decode (`decoded_rgb`): the one error a dataset whose transform runs in the same
    call (torchvision's ImageFolder) may pass over; a transform's own error stays what it is, and stops."""


def decoded_rgb(path: str) -> Image.Image:
    """`load_rgb`, its `UNREADABLE` errors raised as `UnreadableImage` (an ImageFolder's `loader`)."""
    try:
        return load_rgb(path)
    except UNREADABLE as err:
        raise UnreadableImage(why_unreadable(err)) from err


def image_format(head: bytes) -> str | None:
    """The format of an image's first 16 bytes (a name of ANY_FORMAT), or None when they are no image's."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "avif"
    if head[:1] == b"P" and head[1:2] in b"123456" and head[2:3] in (b" ", b"\t", b"\n", b"\r"):
        return "pnm"  # PBM / PGM / PPM
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    return None


def problem(data: bytes | memoryview, formats: frozenset[str] = DALI_FORMATS) -> str | None:
    """Why these encoded bytes would not decode (a short reason), or None if they look whole.

    `formats`: those the decoder reads (DALI's by default; the converter's are PIL's). The reason
    strings are written to logs and converter reports, so they name the fix.
    """
    head, tail, size = bytes(data[:16]), bytes(data[-64:]), len(data)
    if size < MIN_BYTES:
        return f"only {size} bytes: empty or cut short"
    fmt = image_format(head)
    if fmt is None:
        return "not an image (unknown file signature): remove it from the data folder"
    if fmt not in formats:
        return (f"a {fmt.upper()} image, which DALI does not decode: convert it to JPEG or PNG, or train with "
                f"--data.backend torchvision")
    # FF D9 cannot occur inside entropy-coded data (0xFF is stuffed as FF 00), so finding it among
    # the last bytes means the stream reached its end. Writers may append more after it (padding,
    # a phone's "motion photo" video): then only a decode can tell (rare, so its cost is too).
    if fmt == "jpeg" and _JPEG_END not in tail and not _decodes(data):
        return "truncated JPEG (no end-of-image marker): re-copy or re-download the file"
    if fmt == "png" and _PNG_END not in tail and not _decodes(data):
        return "truncated PNG (no IEND chunk): re-copy or re-download the file"
    return None


def _decodes(data: bytes | memoryview) -> bool:
    """Whether PIL decodes these bytes whole (its decoders stop at the image's end, whatever follows)."""
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            img.load()
        return True
    except UNREADABLE:
        return False


def decode_for_conversion(path: str) -> tuple[np.ndarray | None, str | None]:
    """(the file's pixels, RGB, H x W x 3 uint8; None), or (None, why it cannot be converted): the
    converter's verdict, from one read of the file. The sniff (`problem`) first, then a full decode,
    which reads every compressed byte, so a truncated or corrupt stream is caught here."""
    try:
        with open_image_file(path) as f:
            data = f.read()
    except OSError as err:
        return None, f"unreadable: {err}"
    reason = problem(data, ANY_FORMAT)
    if reason is not None:
        return None, reason
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.width < 1 or img.height < 1:
                return None, "zero-sized image"
            return np.asarray(eight_bit(img).convert("RGB")), None
    except UNREADABLE as err:
        return None, f"undecodable: {why_unreadable(err)}"


def read_screened(path: str) -> tuple[np.ndarray | None, str | None]:
    """(the file's bytes, None), or (None, why) when it cannot be read or would not decode."""
    try:
        with open_image_file(path) as f:
            data = np.fromfile(f, dtype=np.uint8)
    except OSError as err:
        return None, f"unreadable: {err}"
    reason = problem(memoryview(data))
    return (data, None) if reason is None else (None, reason)


def read_unless_bad(samples: list[tuple[str, int]], bad: dict[int, str], i: int) -> np.ndarray | None:
    """The screened bytes of image `i`, or None when it is known bad or fails the screening
    (then warned about once and remembered in `bad`, so that later passes skip it silently)."""
    if i in bad:
        return None
    path = samples[i][0]
    data, reason = read_screened(path)
    if data is None:
        with _BAD_FILE_LOCK:
            if i not in bad:
                bad[i] = reason
                warnings.warn(f"skipping unreadable image {path}: {reason}", stacklevel=3)
    return data


def next_readable(samples: list[tuple[str, int]], index: int, read: Callable[[int], T | None]
                  ) -> tuple[T, int, list[int]]:
    """(`read(i)`, i, the indices passed over) for the first image from `index` on, in dataset
    order, that `read` returns (it returns None for a bad file, after warning about it).

    A bad training image is replaced rather than dropped, so every batch keeps its size;
    after MAX_REPLACEMENTS bad images in a row the data itself is broken, and this says so.
    """
    passed: list[int] = []
    for attempt in range(min(MAX_REPLACEMENTS, len(samples))):  # each image once in a small folder
        i = (index + attempt) % len(samples)
        got = read(i)
        if got is not None:
            return got, i, passed
        passed.append(i)
    first, last = samples[index][0], samples[passed[-1]][0]
    which = (f"all {len(passed)} images are unreadable" if len(passed) == len(samples) else
             f"{len(passed)} unreadable images in a row, from {first} to {last}")
    raise DataLayoutError(f"{which} (each named in a warning above): the data, not one file, is broken (an "
                          f"interrupted copy, a full disk, another format under .JPEG names); copy the data again, "
                          f"or remove those files")


class ReadAhead(Iterator[T]):
    """`read(item)` for each of `items` in order, run by `threads` threads, `chunk` items per task,
    up to `depth` items ahead of the consumer.

    Why: on a network filesystem each open+read waits ~0.5-1 ms (more on object-storage
    mounts), so one reader tops out near 1,000-2,000 files/s per process, below what a GPU
    decodes; several in flight hide that latency. The reads release the GIL (numpy.fromfile). A
    task reads several files (a batch's share per thread), since a task per file costs more CPU
    time than reading a file from the page cache. Measured (tools/bench_file_reads.py,
    docs/benchmarks.md): threads cost CPU time when the files are in the page cache and
    multiply files/s when each open waits.

    The results, and any exception `read` raises (re-raised at its item), are those of reading
    one by one; only when the reads happen differs. `close` (also at the end, or at a failure)
    stops the threads and drops the reads not yet consumed; call it when a pass stops early, so
    no idle reader thread outlives the pass. With `threads` <= 1 it reads one by one in the
    caller's thread.
    """

    def __init__(self, read: Callable[[Any], T], items: Iterable[Any], depth: int, threads: int, chunk: int = 1):
        self._read, self._items, self._chunk = read, iter(items), max(1, chunk)
        self._tasks_ahead = max(1, depth // self._chunk)
        self._pool = (ThreadPoolExecutor(threads, thread_name_prefix="fastssl-read") if threads > 1 else None)
        self._ahead: deque[Future] = deque()  # tasks: each reads `chunk` items
        self._done: deque[tuple[bool, Any]] = deque()  # the oldest task's outcomes not yet consumed

    def __next__(self) -> T:
        if self._pool is None:
            return self._read(next(self._items))
        if not self._done:
            self._refill()
            if not self._ahead:
                self.close()
                raise StopIteration
            self._done.extend(self._ahead.popleft().result())
        ok, value = self._done.popleft()
        if not ok:
            self.close()
            raise value
        return value

    def _refill(self) -> None:
        while len(self._ahead) < self._tasks_ahead:
            items = list(itertools.islice(self._items, self._chunk))
            if not items:
                return
            self._ahead.append(self._pool.submit(self._read_all, items))

    def _read_all(self, items: list[Any]) -> list[tuple[bool, Any]]:
        """(True, result) per item, up to the first that raises: (False, its exception)."""
        out = []
        for item in items:
            try:
                out.append((True, self._read(item)))
            except Exception as err:  # re-raised in the consumer, at this item
                out.append((False, err))
                break
        return out

    def close(self) -> None:
        self._ahead.clear()
        self._done.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._items = iter(())


def find_bad_files(samples: list[tuple[str, int]], indices: Iterable[int]) -> dict[int, str]:
    """Decode each file fully with PIL: the ones that fail are why a decoder failed a batch."""
    bad = {}
    for i in indices:
        try:
            load_rgb(samples[i][0])
        except UNREADABLE as err:
            bad[i] = f"undecodable: {why_unreadable(err)}"
    return bad


def retire_bad_files(samples: list[tuple[str, int]], in_flight: set[int], bad: dict[int, str], errors: int) -> bool:
    """After a decoder failed a batch: find the in-flight files PIL cannot decode, warn about each
    and add them to `bad`, so that the restarted pass skips them. False when none is found
    or after MAX_PIPELINE_ERRORS failures: then something else is wrong, and the caller re-raises."""
    found = find_bad_files(samples, sorted(in_flight))
    if not found or errors > MAX_PIPELINE_ERRORS:
        return False
    for i, reason in found.items():
        warnings.warn(f"skipping unreadable image {samples[i][0]}: {reason}", stacklevel=3)
    bad.update(found)
    return True


class BatchFeeder(Protocol):
    """What a pass's feeder records: the dataset indices of each batch handed to the decoder
    (which prefetches ahead, so these run past the batches delivered)."""

    sent: list[list[int]]


F = TypeVar("F", bound=BatchFeeder)


def run_retiring_bad_files(samples: list[tuple[str, int]], bad: dict[int, str],
                           new_feeder: Callable[[], F | None], decode: Callable[[F], Iterable[Any]],
                           deliver: Callable[[F, int, Any], T]) -> Iterator[T]:
    """Run passes of a decoder that fails a whole pass on one undecodable file (DALI).

    `new_feeder()` makes a pass's feeder from the caller's restart point (it skips the
    files in `bad`), or None when nothing is left; `decode(feeder)` starts the decoder on
    it (DALI decodes its first batches right then, so this may already fail); `deliver(feeder,
    k, output)` turns the pass's k-th output into what is yielded and moves the restart
    point past it. When the decoder raises (DALI raises RuntimeError), the files that were
    in flight are decoded with PIL; the undecodable ones are retired into `bad` and a new
    pass starts; when none is found, the error is re-raised. An error of `deliver` (a CUDA
    out-of-memory in the device augmentations) is no file's fault: it propagates at once.
    """
    errors = 0
    while True:
        feeder = new_feeder()
        if feeder is None:
            return
        delivered, decoding = 0, True
        try:
            for out in decode(feeder):
                decoding = False
                item = deliver(feeder, delivered, out)
                delivered += 1
                yield item
                decoding = True
            return
        except RuntimeError:
            if not decoding:
                raise
            errors += 1
            in_flight = {i for batch in feeder.sent[delivered:] for i in batch}
            if not retire_bad_files(samples, in_flight, bad, errors):
                raise


def free_dropped_pipelines() -> None:
    """Free the DALI pipelines this process has dropped, now, while their threads exist.

    A DALI pipeline sits in reference cycles, so only the cycle collector frees it. Left as
    garbage, it is inherited by every process forked later (the k-NN's DataLoader workers,
    right after a DALI epoch), and when such a child's collector runs its destructor, DALI
    waits there for threads that a fork does not copy: the worker hangs, and the loader
    waiting for it (tests/test_no_fork_hang.py). A full collection per pass costs far less
    than the pass."""
    gc.collect()


def placement(device: torch.device, num_workers: int) -> tuple[str, int | None, int]:
    """(decoder device, DALI device_id, CPU threads) for a DALI loader delivering to `device`:
    nvJPEG `mixed` on that GPU, or libjpeg-turbo with no device id; threads: when `num_workers`
    is 0, this process's share of the cores the machine lets the job use (`pipelines.cores`)."""
    threads = max(1, num_workers or default_num_workers(-1, 1))
    if device.type != "cuda":
        return "cpu", None, threads
    return "mixed", device.index if device.index is not None else torch.cuda.current_device(), threads
