"""A `.beton` conversion in progress, kept on disk so that a killed or failed converter goes on
where it stopped instead of starting over.

Why: converting ImageNet's train split takes tens of minutes to hours, and a SLURM time limit,
a full disk or a crashed worker used to throw all of it away. Everything lives in one hidden
folder beside the output, `.OUT.partial/`:

* `data`: the `.beton` being written (FFCV's layout: header, metadata, data pages; the
  allocation table and the final metadata are added when it completes);
* `job.json`: what is being converted (a fingerprint of the file list, labels and options,
  and how images are numbered), so a resume never mixes two conversions;
* `progress.npz`: the samples whose bytes are on disk (`Progress`), saved every
  `--checkpoint-every` seconds and when the converter is stopped;
* `lock`: an exclusive `flock` while a converter works in the folder (the kernel drops it
  when that process dies, even by `kill -9`), holding its PID for the message.

A sample counts as saved only when every byte of it lies in a page that is already written
(`durable_samples`): FFCV's workers fill pages in memory and write them in page order, so a
prefix of pages is on disk at any moment. A resume cuts the file back to that prefix and
converts every other sample again.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

PARTIAL_SUFFIX = ".partial"
NO_LOCKS = (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP)  # flock is not supported on this filesystem
CHECKPOINT_EVERY_S = 60.0  # how often a running conversion saves its progress (--checkpoint-every)


class ConversionBusy(RuntimeError):
    """Another converter is writing the same output now."""


@dataclass
class Progress:
    """The saved part of a conversion: the first `pages_written` data pages of `data`, and the
    samples that lie entirely in them with their metadata rows and allocation-table entries."""

    pages_written: int
    sample_ids: np.ndarray  # uint64, sorted
    metadata: np.ndarray  # the writer's metadata rows of those samples (its structured dtype)
    allocations: np.ndarray  # ffcv.types.ALLOC_TABLE_TYPE entries of those samples

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)


def durable_samples(received: np.ndarray, allocations: np.ndarray, written_end: int) -> np.ndarray:
    """Which samples are on disk (a boolean mask over sample ids).

    `received`: the samples a worker reported finished (their metadata rows are final);
    `allocations`: their allocation-table entries (sample_id, ptr, size); `written_end`: the
    file offset up to which every page is written. A finished sample whose bytes reach past
    it still sits in a worker's page buffer and is not saved."""
    unsaved = np.zeros(len(received), dtype=bool)
    late = allocations["sample_id"][allocations["ptr"] + allocations["size"] > written_end]
    unsaved[late.astype(np.int64)] = True
    return received & ~unsaved


def job_fingerprint(samples: list[tuple[str, int]], classes: list[str], options: dict) -> str:
    """What a conversion converts: the ordered (path, label) list, the class names and the
    storage options. A saved conversion continues only under the same fingerprint."""
    digest = hashlib.sha256(json.dumps({"classes": classes, "options": options}, sort_keys=True).encode())
    for path, label in samples:
        digest.update(f"{path}\0{label}\n".encode())
    return digest.hexdigest()


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(file)` into a temporary name beside `path`, flushed to disk, then renamed over it.
    A failed write (a full disk) leaves `path` as it was and no temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class PartialConversion:
    """The folder `.OUT.partial/` of one output (see the module docstring)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.dir = self.out.with_name(f".{self.out.name}{PARTIAL_SUFFIX}")
        self.data = self.dir / "data"
        self.job_file = self.dir / "job.json"
        self.progress_file = self.dir / "progress.npz"
        self._lock_fd: int | None = None

    # ----------------------------------------------------------------- ownership

    def acquire(self) -> None:
        """Create the folder and lock it; ConversionBusy when a live converter holds it.
        OSError (EACCES, EROFS, ENOSPC...) when the output folder cannot take it."""
        self.dir.mkdir(exist_ok=True)
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in NO_LOCKS:  # Lustre without flock, NFS without lockd: convert, unguarded
                print(f"warning: {self.dir} cannot be locked here ({os.strerror(err.errno)}); run one converter "
                      "per output at a time", file=sys.stderr)
                self._lock_fd = fd
                return
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConversionBusy(f"another converter (PID {holder}) is writing {str(self.out)!r} now; "
                                 "wait for it to finish, or stop it and rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    # ----------------------------------------------------------------- the job

    def saved_job(self) -> dict | None:
        try:
            return json.loads(self.job_file.read_text())
        except (OSError, ValueError):
            return None

    def start(self, job: dict) -> None:
        """Begin a new conversion here: forget any other one's data and progress, record `job`."""
        self.forget_progress()
        self.data.unlink(missing_ok=True)
        _write_atomically(self.job_file, lambda f: f.write(json.dumps(job).encode()))

    def forget_progress(self) -> None:
        """No saved progress from here on (before `data` is rewritten from its start: a record of
        the old file must never describe the new one)."""
        self.progress_file.unlink(missing_ok=True)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)  # the removal reaches the disk before any new page does
        finally:
            os.close(fd)

    # ----------------------------------------------------------------- progress

    def load_progress(self) -> Progress | None:
        """The last saved progress, or None (none saved, or unreadable: the conversion starts over)."""
        try:
            with np.load(self.progress_file) as saved:
                return Progress(int(saved["pages_written"]), saved["sample_ids"], saved["metadata"],
                                saved["allocations"])
        except (OSError, ValueError, KeyError):
            return None

    def save_progress(self, progress: Progress) -> None:
        """Flush the data file's written pages, then record `progress` (atomically: a stop in the
        middle keeps the previous record, which stays true of the file)."""
        fd = os.open(self.data, os.O_RDONLY)
        try:
            os.fsync(fd)  # the workers' pages, written through their own descriptors
        finally:
            os.close(fd)
        _write_atomically(self.progress_file, lambda f: np.savez(
            f, pages_written=np.int64(progress.pages_written), sample_ids=progress.sample_ids,
            metadata=progress.metadata, allocations=progress.allocations))

    def saved_count(self) -> int:
        progress = self.load_progress()
        return 0 if progress is None else progress.num_samples

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())

    # ----------------------------------------------------------------- the end

    def finish(self) -> None:
        """The data is a complete `.beton`: move it to the output and remove the folder."""
        os.replace(self.data, self.out)
        self.discard()

    def discard(self) -> None:
        """Remove the folder. It is renamed first, still locked: a converter starting meanwhile makes
        a new folder with a new lock instead of finding this one half-removed."""
        doomed = self.dir.with_name(f"{self.dir.name}.removing-{os.getpid()}")
        try:
            os.rename(self.dir, doomed)
        except OSError:
            doomed = self.dir
        shutil.rmtree(doomed, ignore_errors=True)
        self.release()
