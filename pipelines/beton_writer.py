"""The converter's worker processes: decoding the images (skipping the bad ones) and writing a
`.beton`, never forked from the caller.

They live in an importable module because they are started by a fork server (see
`worker_context`), which imports their code by name.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pipelines.beton_resume import CHECKPOINT_EVERY_S, PartialConversion, Progress, durable_samples
from pipelines.images import decode_for_conversion
from pipelines.processes import describe_exit, pool_worker_ignores_interrupts

if TYPE_CHECKING:
    from multiprocessing.context import BaseContext
    from multiprocessing.process import BaseProcess
    from multiprocessing.queues import Queue
    from multiprocessing.shared_memory import SharedMemory
    from multiprocessing.sharedctypes import Synchronized

    import numpy as np
    from ffcv.fields import Field
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

# --------------------------------------------------------------------------- writing (the converter's workers)
#
# Why the workers are started by a fork server and never forked from the caller:
# `pipelines/beton_convert.py`'s `convert()` is also called from processes that have
# run DALI pipelines or touched CUDA (tests, tools/bench_loaders.py, tools/profile_throughput.py).
# A child forked from such a process inherits DALI's objects but not its threads; when the
# child's garbage collector runs `nvidia.dali.Pipeline.__del__` it segfaults, and FFCV's
# writer (and `multiprocessing.Pool`) then waited forever for the dead worker. The fork
# server is a fresh interpreter (started by fork+exec, which runs no Python in between) that
# imports only what the workers need, once; each worker is forked from it, so it is cheap and
# holds no state of the caller. Alternatives rejected: 'spawn' starts one interpreter per
# worker and each pays FFCV's import, which compiles numba code (5-20 s); running the whole
# conversion in a child interpreter pays that import on every conversion; patching the
# start method FFCV uses globally would change it for every other library in the process.
# FFCV's own `DatasetWriter._write_common` also polls a counter until every sample is done
# and so hangs on a dead worker; `write_beton` below replaces that loop with one that watches
# the workers and fails within a fraction of a second of a death.

WORKER_MODULES = ["pipelines.beton_writer", "pipelines.beton", "pipelines.images", "ffcv.fields", "ffcv.writer",
                  "ffcv.memory_allocator"]
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class SkippedImage(Exception):
    """An image the converter leaves out (it cannot be read or decoded); `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class NothingToWrite(RuntimeError):
    """Every image was skipped; `skipped` maps sample ids to their reasons."""

    def __init__(self, skipped: dict[int, str]):
        super().__init__(f"all {len(skipped)} images were skipped")
        self.skipped = skipped


class WorkerError(RuntimeError):
    """A conversion worker failed or died; `errno` is the OSError's number when it had one (ENOSPC...)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


def worker_context(start: bool = False) -> BaseContext:
    """The multiprocessing context of every converter worker: a fork server preloading the
    worker modules (see the comment above), or 'spawn' where there is no fork server.
    `start` starts the server now, so that its imports overlap the caller's work."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    # Global, but it only affects the fork server (which nothing else here uses); '__main__'
    # is multiprocessing's default entry, kept so workers do not re-import the main script.
    multiprocessing.set_forkserver_preload(["__main__", *WORKER_MODULES])
    if start:
        from multiprocessing import forkserver

        forkserver.ensure_running()
    return multiprocessing.get_context("forkserver")


def worker_init() -> None:
    """First thing in every worker: die with the parent, even when it is killed with SIGKILL.

    PR_SET_PDEATHSIG makes the kernel send SIGKILL when the parent (the fork server, which
    itself exits as soon as the converter's end of its pipe closes) goes away; the parent-id
    check closes the window in which the parent died before the prctl. Where prctl does not
    exist (not Linux), a daemon thread polls the parent id instead. Ctrl-C reaches the whole
    process group: workers ignore it and the converter stops them after cleaning up."""
    import ctypes
    import signal
    import threading
    import time

    pool_worker_ignores_interrupts()
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        armed = False
    if os.getppid() != parent:
        os._exit(1)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()


class signals_deferred:
    """Hold SIGINT / SIGTERM / SIGHUP while workers are being started, and act on them right
    after: a stop request that cut a start in half would leave a child that got its work but
    that the parent does not know of (it could not stop it, and the child could recreate the
    partial file after the clean-up). The handlers are swapped for a recorder during the
    block (blocking the signal would not do: another thread may take it); a no-op outside
    the main thread, where handlers cannot be set."""

    SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")

    def __enter__(self) -> None:
        import signal
        import threading

        self.pending: list[int] = []
        self.saved: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self.saved[sig] = signal.signal(sig, lambda signum, _frame: self.pending.append(signum))

    def __exit__(self, *exc: object) -> None:
        import signal

        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(self.pending):
            signal.raise_signal(sig)  # now, with the caller's handler


class ConvertDataset:
    """Indexable (image, label) pairs for FFCV's writer; an image that cannot be converted raises
    SkippedImage with the reason. Seeds numpy per image so that the writer's random JPEG-or-raw
    choice ('proportion' mode) is reproducible. Pickled once per worker (the sample list, about
    100 bytes an image)."""

    def __init__(self, samples: list[tuple[str, int]], max_resolution: int | None = None):
        self.samples = samples
        self.max_resolution = max_resolution

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        import numpy as np

        path, label = self.samples[i]
        np.random.seed(i % (2**32))
        pixels, reason = decode_for_conversion(path)  # CMYK / L / P / RGBA -> RGB
        if pixels is None:
            raise SkippedImage(reason)
        return keep_a_pixel(pixels, self.max_resolution), label


def keep_a_pixel(pixels: np.ndarray, max_resolution: int | None) -> np.ndarray:
    """`pixels`, resized here only when FFCV's RGBImageField would resize a side to 0 pixels. FFCV
    scales the longer side to `max_resolution` and truncates both (`int`): a very thin image (a
    2000 x 3 banner at 500) gets a side of 0, and OpenCV's resize fails the whole conversion. Such
    an image is resized the same way (INTER_AREA) with each side at least 1 pixel, and FFCV then
    leaves it as it is; every other image is returned untouched, for FFCV to resize."""
    import numpy as np

    height, width = pixels.shape[:2]
    ratio = 1.0 if max_resolution is None else max_resolution / max(height, width)
    if ratio >= 1 or min((np.array([width, height]) * ratio).astype(int)) >= 1:
        return pixels
    import cv2

    size = (max(1, int(width * ratio)), max(1, int(height * ratio)))
    return cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)


def _write_worker(errors: Queue, work_fn: Callable[..., object], args: tuple[Any, ...]) -> None:
    """A writing worker's body, with its failure reported to the parent (message and errno)."""
    worker_init()
    try:
        work_fn(*args)
    except BaseException as err:  # noqa: BLE001 - reported, then the worker exits 1
        errors.put((f"{type(err).__name__}: {err}", getattr(err, "errno", None)))
        errors.close()
        errors.join_thread()
        raise SystemExit(1) from None


def _write_samples(work: Queue, metadata_sm: SharedMemory, metadata_type: np.dtype, fields: Mapping[str, Field],
                   allocator: MemoryAllocator, done: Synchronized, finished: Queue, dataset: ConvertDataset) -> None:
    """FFCV's `worker_job_indexed_dataset`, reporting as it goes: after each chunk, the chunk's
    written sample ids, their allocation-table entries and the skipped ones with their reasons go
    to `finished` (FFCV sends a worker's whole table once, at its end), so the parent can save
    progress while the conversion runs; a final None says this worker's last page is written."""
    import numpy as np
    from ffcv.writer import handle_sample

    metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
    names = metadata_type.names
    with allocator:  # on leaving: this worker's last page is written
        while (chunk := work.get()) is not None:
            written, skipped = [], []
            for dest, source in chunk:
                try:
                    sample = dataset[source]
                except SkippedImage as err:
                    skipped.append((dest, err.reason))
                    continue
                handle_sample(sample, dest, names, metadata, allocator, fields)
                written.append(dest)
            finished.put((written, allocator.allocations, skipped))
            allocator.allocations = []  # reported; a new chunk starts with a new sample
            with done.get_lock():
                done.value += len(chunk)
    finished.put(None)


def _raise_if_failed(procs: list, errors: Queue, what: str) -> None:
    """Raise WorkerError if a worker reported an error or died; return otherwise."""
    import queue

    try:
        message, errno = errors.get_nowait()
    except queue.Empty:
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if not dead:
            return
        try:  # a worker's report is flushed before it exits; give the pipe a moment
            message, errno = errors.get(timeout=1.0)
        except queue.Empty:
            p = dead[0]
            raise WorkerError(f"{what} worker (PID {p.pid}) died: {describe_exit(p.exitcode)}") from None
    raise WorkerError(f"{what} worker failed: {message}", errno)


class _Collected:
    """What the parent knows of the samples written so far: which finished (their metadata rows
    are final) and where their bytes are, and which were skipped and why; from it, the progress
    a resume can trust (a skipped sample is not part of it: a resume tries it again)."""

    def __init__(self, n: int, saved: Progress | None):
        import numpy as np
        from ffcv.types import ALLOC_TABLE_TYPE

        self.dtype = ALLOC_TABLE_TYPE
        self.received = np.zeros(n, dtype=bool)
        self.tables = [np.zeros(0, dtype=ALLOC_TABLE_TYPE)]
        if saved is not None:
            self.received[saved.sample_ids.astype(np.int64)] = True
            self.tables.append(saved.allocations.astype(ALLOC_TABLE_TYPE))
        self.skipped: dict[int, str] = {}
        self.workers_done = 0

    def drain(self, finished: Queue) -> None:
        """Take every report waiting in the `finished` queue."""
        import queue

        import numpy as np

        while True:
            try:
                report = finished.get_nowait()
            except queue.Empty:
                return
            if report is None:
                self.workers_done += 1
                continue
            ids, entries, skipped = report
            ids, entries = np.asarray(ids, dtype=np.int64), np.array(entries, dtype=self.dtype)
            self.tables.append(entries)  # before the ids: a stop in between must not leave a sample without bytes
            self.received[ids] = True
            self.skipped.update(skipped)

    def table(self) -> np.ndarray:
        import numpy as np

        self.tables = [np.concatenate(self.tables)]
        return self.tables[0]

    def progress(self, pages_written: int, written_end: int, metadata_sm: SharedMemory,
                 metadata_type: np.dtype) -> Progress:
        """The samples wholly inside the first `pages_written` pages (ending at `written_end`)."""
        import numpy as np

        table = self.table()
        durable = durable_samples(self.received, table, written_end)
        ids = np.flatnonzero(durable).astype(np.uint64)
        metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
        rows = metadata[ids.astype(np.int64)].copy()
        del metadata  # no view may outlive the shared memory
        return Progress(pages_written, ids, rows, table[durable[table["sample_id"].astype(np.int64)]])


def _resume(writer: DatasetWriter, partial: PartialConversion, saved: Progress) -> None:
    """Set `writer` up on the saved part of `partial.data` instead of FFCV's fresh `prepare`.

    The header and field descriptors are made by `prepare` on a scratch file and must equal
    the saved file's (the same options and sample count); the file is cut back to its saved
    pages and the saved metadata rows go back into the shared metadata."""
    import numpy as np

    scratch = partial.dir / "header"
    writer.fname = str(scratch)
    try:
        writer.prepare()
        head = scratch.read_bytes()
    finally:
        writer.fname = str(partial.data)
        scratch.unlink(missing_ok=True)
    from ffcv.utils import align_to_page

    end = align_to_page(writer.data_region_start, writer.page_size) + saved.pages_written * writer.page_size
    try:
        with open(partial.data, "r+b") as f:
            if f.read(len(head)) != head:
                raise ValueError("the saved file's header differs from this conversion's")
            if os.fstat(f.fileno()).st_size < end:
                raise ValueError("the saved file is shorter than its saved pages")
            f.truncate(end if saved.pages_written else len(head))
    except (OSError, ValueError):
        writer.metadata_sm.close()  # the caller starts over with a new one
        writer.metadata_sm.unlink()
        raise
    metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
    metadata[saved.sample_ids.astype(np.int64)] = saved.metadata
    del metadata


def _compact(writer: DatasetWriter, table: np.ndarray, skipped: dict[int, str]) -> np.ndarray:
    """Leave the skipped samples out of the finished file: the written samples' metadata rows move,
    in sample order, to the front of the shared metadata that `finalize` writes, the allocation
    table's ids follow them, and the header counts only them. The metadata region keeps its size
    (the data pages start after it); FFCV reads its first `num_samples` rows. Returns the table."""
    import numpy as np

    keep = np.ones(writer.num_samples, dtype=bool)
    keep[np.fromiter(skipped, dtype=np.int64)] = False
    metadata = np.frombuffer(writer.metadata_sm.buf, dtype=writer.metadata_type)
    metadata[: int(keep.sum())] = metadata[keep]  # the right side is a copy
    del metadata  # no view may outlive the shared memory
    table = table.copy()
    table["sample_id"] = (np.cumsum(keep) - 1)[table["sample_id"].astype(np.int64)]
    writer.header["num_samples"] = int(keep.sum())
    return table


def write_beton(partial: PartialConversion, fields: dict, dataset: ConvertDataset, *, num_workers: int,
                chunksize: int = 32, progress: bool = False,
                checkpoint_every_s: float = CHECKPOINT_EVERY_S) -> tuple[int, dict[int, str]]:
    """FFCV's `DatasetWriter.from_indexed_dataset` into `partial.data`, continuing the progress
    saved there, saving its own every `checkpoint_every_s` seconds and when it stops (error,
    signal). Returns how many samples were already saved, and the skipped ones (the dataset
    raised SkippedImage: {sample id: reason}), which the finished file leaves out (`_compact`);
    NothingToWrite when every sample was skipped. Workers come from `worker_context()` and the
    parent never waits on a dead one: any error or death raises WorkerError, the other workers
    are killed and the shared memory is released. The file is FFCV's (its `prepare`,
    `handle_sample` and `finalize` are used unchanged)."""
    import ctypes
    from contextlib import suppress

    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter

    ctx = worker_context()
    num_workers = max(1, num_workers)
    writer = DatasetWriter(str(partial.data), fields, num_workers=num_workers)
    n = writer.num_samples = len(dataset)
    procs: list = []
    queues: list = []
    allocator = collected = None
    compacted = False  # the shared metadata rows no longer sit at their sample ids: no progress from them

    def save() -> None:
        written = allocator.next_page_written.value  # read first: those pages are on disk now
        collected.drain(finished)
        partial.save_progress(collected.progress(written, allocator.offset + written * writer.page_size,
                                                 writer.metadata_sm, writer.metadata_type))

    try:
        saved = _open(writer, partial)
        collected = _Collected(n, saved)
        todo = (~collected.received).nonzero()[0].tolist()  # the samples no earlier run saved
        work, finished, errors = ctx.Queue(), ctx.Queue(), ctx.Queue()
        queues = [work, finished, errors]
        for chunk in chunks([(i, i) for i in todo], chunksize):
            work.put(chunk)
        for _ in range(num_workers):
            work.put(None)
        done = ctx.Value(ctypes.c_uint64, 0)
        allocator = MemoryAllocator(str(partial.data), writer.data_region_start, writer.page_size)
        # FFCV made these with the default (fork) context, whose locks cannot reach a fork-server child.
        first_page = 0 if saved is None else saved.pages_written
        allocator.next_page_allocated = ctx.Value(ctypes.c_uint64, first_page)
        allocator.next_page_written = ctx.Value(ctypes.c_uint64, first_page)
        args = (work, writer.metadata_sm, writer.metadata_type, writer.fields, allocator, done, finished, dataset)
        procs = [ctx.Process(target=_write_worker, args=(errors, _write_samples, args), daemon=True,
                             name=f"beton-writer-{i}") for i in range(num_workers)]
        _start(procs)
        resumed = n - len(todo)
        _wait_for_workers(procs, errors, finished, collected, done, resumed, n, save, checkpoint_every_s, progress)
        unaccounted = n - int(collected.received.sum()) - len(collected.skipped)  # each worker's None came last
        if unaccounted:
            raise WorkerError(f"{unaccounted} images were neither written nor skipped by the writing workers")
        if len(collected.skipped) == n:
            raise NothingToWrite(collected.skipped)
        if collected.skipped:
            save()  # the last progress that the rows below describe, should the finalisation fail
            compacted = True
            table = _compact(writer, collected.table(), collected.skipped)
        else:
            table = collected.table()
        writer.finalize(table.tolist())
        return resumed, collected.skipped
    except BaseException as err:
        if collected is not None and allocator is not None and not compacted:
            with suppress(Exception):  # keep what is on disk; a failure here (the disk is full) keeps the last save
                save()
        if isinstance(err, Exception):
            raise _named_death(err, procs)
        raise
    finally:
        _release(procs, queues, writer)


def _open(writer: DatasetWriter, partial: PartialConversion) -> Progress | None:
    """Set `writer` up on what `partial` saved (its progress, returned), or from the start (None):
    nothing was saved, or the saved file cannot be continued (said on stderr)."""
    saved = partial.load_progress()
    if saved is not None and saved.num_samples:
        try:
            _resume(writer, partial, saved)
            return saved
        except ValueError as err:  # (an OSError, e.g. a full disk, propagates: the progress stays)
            print(f"starting over: {partial.data} cannot be continued ({err})", file=sys.stderr)
    partial.forget_progress()
    writer.prepare()  # header and field descriptors (the file rewritten); the metadata's shared memory
    return None


def _start(procs: list[BaseProcess]) -> None:
    """Start the workers, each with no stop signal acted on halfway through its start."""
    for p in procs:
        try:
            with signals_deferred():
                p.start()
        except OSError as err:  # the fork server's child died before it got its work (EPIPE)
            raise WorkerError(f"a writing worker died as it started ({err.strerror or err})") from err


def _wait_for_workers(procs: list[BaseProcess], errors: Queue, finished: Queue, collected: _Collected,
                      done: Synchronized, resumed: int, n: int, save: Callable[[], None], checkpoint_every_s: float,
                      progress: bool) -> None:
    """Until every worker reported its last samples: watch for a failure or a death (WorkerError
    within a fraction of a second), collect the reports, move the bar, save the progress every
    `checkpoint_every_s` seconds; then join the workers."""
    import time

    from tqdm.auto import tqdm

    num_workers = len(procs)
    last_save = time.monotonic()
    with tqdm(total=n, initial=resumed, desc="writing", unit="img", disable=not progress) as bar:
        while collected.workers_done < num_workers:
            _raise_if_failed(procs, errors, "writing")
            collected.drain(finished)
            bar.update(resumed + done.value - bar.n)
            if time.monotonic() - last_save >= checkpoint_every_s:
                save()
                last_save = time.monotonic()
            if collected.workers_done < num_workers and all(p.exitcode == 0 for p in procs):
                collected.drain(finished)  # a clean exit comes after the worker's last report
                if collected.workers_done < num_workers:
                    raise WorkerError("writing workers exited without reporting their last samples")
            time.sleep(0.05)
    for p in procs:
        p.join(timeout=30)


def _named_death(err: Exception, procs: list[BaseProcess]) -> Exception:
    """The error to raise for `err`: a worker's death can surface first as another error (a broken
    pipe while the next worker starts), so a dead worker is named as the real cause."""
    import time

    deadline = time.monotonic() + 0.5  # the workers that died: for the message below
    for p in procs:
        if p.pid is not None:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
    dead = [p for p in procs if p.exitcode not in (None, 0)]
    if dead and not isinstance(err, WorkerError):
        named = WorkerError(f"writing worker (PID {dead[0].pid}) died: {describe_exit(dead[0].exitcode)}")
        named.__cause__ = err
        return named
    return err


def _release(procs: list[BaseProcess], queues: list[Queue], writer: DatasetWriter) -> None:
    """Kill the workers still running, close the queues without waiting on unread work, and free
    the metadata's shared memory: a failed or stopped conversion leaves no process and no segment."""
    from contextlib import suppress
    from multiprocessing.shared_memory import SharedMemory

    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        if p.pid is not None:
            p.join(timeout=5)
    for q in queues:
        q.cancel_join_thread()  # unread work items must not block this process's exit
        q.close()
    shm = getattr(writer, "metadata_sm", None)
    if isinstance(shm, SharedMemory):
        shm.close()
        with suppress(FileNotFoundError):
            shm.unlink()
