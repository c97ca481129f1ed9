#!/usr/bin/env python3
"""Files/s the DALI loaders' source reads (and screens) with each reader-thread count, side by side.

    python tools/bench_file_reads.py --data data/demo/train --threads 1,4,16
    # network storage's per-file latency, simulated: every open waits 2 ms more
    strace -f -qq --seccomp-bpf -e trace=openat -e inject=openat:delay_exit=2000 -o /dev/null \\
        python tools/bench_file_reads.py --data data/demo/train --threads 1,8

It runs the DALI training source itself (`pipelines.dali._ShardSource`: `--data.dali_read_threads`
readers, two batches ahead, bad files replaced) without DALI's decoding, so it isolates what
one process's reading costs the loader. The thread counts are interleaved within each
repetition; the median over repetitions is reported with its spread. One untimed pass first
puts the files in the page cache, so without the strace wrapper this measures the readers'
own CPU cost, and with it the latency they hide.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time

from fastssl.arg_types import comma_list, int_at_least
from fastssl.bench.loaders import summarize
from fastssl.cli import ToolArgumentParser, exit_with, output_file, stop_in_one_line, write_output_json
from fastssl.run_log import utc_now
from pipelines.folder import DataLayoutError, scan_source


def read_epoch(samples: list[tuple[str, int]], batches: list[list[int]], threads: int) -> float:
    """Files/s of one pass of the DALI source over `batches`."""
    from pipelines.dali import _ShardSource

    source = _ShardSource(samples, batches, {}, threads)
    start = time.perf_counter()
    files = sum(len(blobs) for blobs, _, _ in source)
    seconds = time.perf_counter() - start
    source.close()
    return files / seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/demo/train", help="image folder in ImageNet layout (or a .txt list)")
    ap.add_argument("--threads", type=comma_list(int_at_least(1, 1024)), default=[1, 8],
                    help="comma-separated reader-thread counts to compare (default 1,8)")
    ap.add_argument("--batch-size", type=int_at_least(1), default=64, help="images per batch (per process)")
    ap.add_argument("--files", type=int_at_least(1), default=2048,
                    help="files per repetition (the first of the folder; all of it when it holds fewer)")
    ap.add_argument("--repeats", type=int_at_least(1), default=5)
    ap.add_argument("--json", type=output_file, help="write the results here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if importlib.util.find_spec("nvidia.dali") is None:  # the source lives in the DALI loader's module
        exit_with("DALI is not installed (`make setup` installs it)")
    try:
        samples, _ = scan_source(args.data)
    except DataLayoutError as err:
        exit_with(err)
    order = list(range(min(args.files, len(samples))))
    if len(order) < args.files:
        print(f"{args.data} holds {len(samples)} images: each repetition reads all of them (--files {args.files})")
    batches = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
    runs: dict[int, list[float]] = {t: [] for t in args.threads}
    try:
        read_epoch(samples, batches, 1)  # untimed: the files into the page cache
        for rep in range(args.repeats):
            for threads in args.threads:
                runs[threads].append(read_epoch(samples, batches, threads))
                print(f"  repeat {rep + 1}/{args.repeats} threads {threads:3d} {runs[threads][-1]:10.0f} files/s",
                      flush=True)
    except DataLayoutError as err:  # files that cannot be read
        exit_with(err)
    results = {str(t): summarize(r) for t, r in runs.items()}
    first = results[str(args.threads[0])]["images_per_s"]
    print(f"\n{'threads':>7s} {'files/s':>10s} {'min':>10s} {'max':>10s} {'x ' + str(args.threads[0]):>9s}")
    for t, r in results.items():
        r["files_per_s"] = r.pop("images_per_s")
        print(f"{t:>7s} {r['files_per_s']:10.0f} {r['min']:10.0f} {r['max']:10.0f} {r['files_per_s'] / first:9.2f}")
    report = {"threads": results,
              "config": {"data": args.data, "files": len(order), "batch_size": args.batch_size,
                         "repeats": args.repeats},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "date": utc_now()}
    if args.json:
        write_output_json(args.json, report, sort_keys=False)
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    with stop_in_one_line("nothing is written before the benchmark ends: run it again"):
        main()
