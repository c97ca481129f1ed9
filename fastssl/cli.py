"""Command-line entry shared by all recipes: `python recipes/X.py [--resume [auto]] [--section.field VALUE ...]`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Callable, NoReturn

from fastssl.config import Config, ConfigError, validate
from fastssl.overrides import apply_overrides, field_help
from pipelines.beton import BetonError
from pipelines.folder import DataLayoutError
from pipelines.spec import LoaderUnavailable

USAGE = """usage: {prog} [--resume [auto]] [--print-config] [--section.field VALUE ...]

  --resume          continue the run in --train.run_dir from its last checkpoint
  --resume auto     continue it when --train.run_dir holds a checkpoint, start it afresh when it
                    does not: one command for the first start and every restart (SLURM requeue)
  --print-config    print the resolved configuration and exit
  --section.field   override any field of the recipe, e.g. --data.train /imagenet/train

fields (= the recipe's value), each with what it means:
{fields}"""


# The folders whose warnings are fastssl's own: said as one line by `plain_warnings`.
OWN_CODE = tuple(str(Path(__file__).resolve().parents[1] / folder) + os.sep
                 for folder in ("fastssl", "pipelines", "tools", "recipes"))


def plain_warnings() -> None:
    """fastssl's own warnings ("skipping unreadable image ...", a one-class data folder) as one
    line, `warning: <message>`, as its errors are; other libraries' keep Python's format, with
    the file and line that help report them. Loader workers forked later inherit it."""
    default = warnings.formatwarning
    if getattr(default, "fastssl", False):
        return

    def formatwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
        if str(filename).startswith(OWN_CODE):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    formatwarning.fastssl = True
    warnings.formatwarning = formatwarning


class ToolArgumentParser(argparse.ArgumentParser):
    """The tools' argument parser: a bad argument is one line (the error and where the options
    are listed) and exit status 2, not argparse's whole usage block before it. Its program name
    is the file of the tool that builds it (not sys.argv[0]: a tool's `main` may be called from
    another program, e.g. a test runner). Building one makes fastssl's warnings one line too
    (`plain_warnings`): every tool builds one first."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("prog", Path(sys._getframe(1).f_code.co_filename).name)
        super().__init__(*args, **kwargs)
        plain_warnings()

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (options: {self.prog} --help)\n")


def output_file(text: str) -> Path:
    """argparse type of a tool's output file (`--json`): refused at once, as a usage error, where it
    cannot be written (`eval.errors.check_output_file`), not after the tool's work."""
    from fastssl.eval.errors import EvalError, check_output_file

    try:
        check_output_file(Path(text), "the file")
    except EvalError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return Path(text)


def write_fix(err: BaseException, flag: str) -> str:
    """What to do about a tool's output that could not be written, `flag` naming where it goes: room,
    when the disk is full (ENOSPC, EDQUOT, or torch.save's zip writer stopping short, its RuntimeError
    on a full disk); otherwise another place, since a read-only or forbidden folder gains nothing from
    freeing space."""
    from fastssl.checkpoint import out_of_room

    if out_of_room(err) or isinstance(err, RuntimeError):
        return f"free space there, or pass {flag} with another folder"
    return f"pass {flag} with a folder you can write to"


def write_output_json(path: Path, data: dict, sort_keys: bool = True) -> None:
    """`run_log.write_json` for a tool's `--json`; a failed write (a full disk) exits 2 with one line."""
    from fastssl.run_log import write_json

    try:
        write_json(path, data, sort_keys)
    except OSError as err:
        exit_with(f"could not write {path}: {err.strerror or err}; {write_fix(err, '--json')}")


def exit_with(err: Exception | str) -> NoReturn:
    """The one way recipes and tools fail on bad input: one line on stderr, exit status 2, no traceback.
    Silent for an error another process of this node prints (`runtime.said_by_another_process`)."""
    runtime = sys.modules.get("fastssl.runtime")  # not imported: no process group, nobody else to say it
    if not (isinstance(err, BaseException) and runtime is not None and runtime.said_by_another_process(err)):
        print(f"error: {without_worker_traceback(str(err))}", file=sys.stderr)
    sys.exit(2)


@contextmanager
def sizes_that_fit(flags: str) -> Iterator[None]:
    """Around a benchmark whose sizes come from the command line: sizes that do not fit in memory (the
    host's or the device's) exit 2 naming the flags to lower, not with an allocator's traceback."""
    from fastssl.recovery import is_out_of_memory

    try:
        yield
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        said = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        exit_with(f"out of memory at these sizes ({said[:160]}); lower {flags}")


def exit_once_per_node(err: Exception) -> NoReturn:
    """`exit_with` for an error the command line alone decides (a bad flag or value): every process a
    launcher started meets the same one, so the first process of each node (LOCAL_RANK 0) says it and
    the others exit 2 silently: one line per node's log, not one per GPU."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        sys.exit(2)
    exit_with(err)


def without_worker_traceback(message: str) -> str:
    """The error's own message when a DataLoader worker raised it: torch re-raises it in the main process
    with "Caught X in DataLoader worker process N." and the worker's traceback in front of it."""
    if "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]  # "pipelines.folder.DataLayoutError: <the message>"
    return last.split(": ", 1)[1] if ": " in last else last


class StopSignal(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a `kill`, a scheduler's time limit, a closed terminal) met where a tool
    stops as it does on Ctrl-C (`stop_signals_interrupt`): a KeyboardInterrupt, so that the tool's
    handling of one (what is kept, how to go on) covers it, with the signal it came from."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interrupt_exit_status(err: KeyboardInterrupt) -> int:
    """The shell's status for what interrupted: 128 + the signal's number (SIGTERM 143), 130 for Ctrl-C."""
    return 128 + err.signum if isinstance(err, StopSignal) else 130


def interrupted_by(err: KeyboardInterrupt) -> str:
    """"interrupted" and, for a signal other than Ctrl-C, which one: the first words of a stop's line."""
    return f"interrupted by {err}" if isinstance(err, StopSignal) else "interrupted"


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within: SIGTERM and SIGHUP raise StopSignal where they land, as Ctrl-C raises KeyboardInterrupt,
    so that the tool's own line on a stop (what it kept, the command that goes on) is said for them
    too; by default they end the process at once, without a word. Outside the main thread (where
    handlers cannot be set) a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: FrameType | None) -> NoReturn:
        raise StopSignal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def stop_in_one_line(kept: str) -> Iterator[None]:
    """Around a tool's main: Ctrl-C, SIGTERM and SIGHUP end it with one line, "interrupted[ by SIGTERM];
    <kept>", and the shell's status for the signal (130, 143), where Ctrl-C printed a traceback and
    SIGTERM ended it without a word (and without its clean-up: `finally` blocks run on a StopSignal).
    For tools whose stop needs no more said than what is kept (`kept`: e.g. "nothing is written: run
    the command again")."""
    try:
        with stop_signals_interrupt():
            yield
    except KeyboardInterrupt as err:
        print(f"{interrupted_by(err)}; {kept}", file=sys.stderr, flush=True)
        raise SystemExit(interrupt_exit_status(err)) from None


def interrupted_advice(command: list[str], run_dir: Path) -> str:
    """What a Ctrl-C that reached the command line (KeyboardInterrupt) leaves, and the command to go on.

    Set-up (listing an ImageNet folder takes minutes) runs before the training loop turns SIGINT
    into a checkpoint and a stop, so a Ctrl-C there ends a run that wrote nothing: start it again.
    The loop re-raises only a second Ctrl-C, by then maybe after a checkpoint: the run directory
    decides which, not where the interrupt came from."""
    from fastssl.relaunch import CHECKPOINT_NAME, rerun_command  # no torch: a Ctrl-C may have cut its import short

    if (run_dir / CHECKPOINT_NAME).is_file():
        return (f"interrupted; the checkpoint in {run_dir} is kept, continue from it with: "
                f"{rerun_command(command, run_dir)}")
    return (f"interrupted before a checkpoint was written in {run_dir}; nothing to resume: start again with: "
            f"{rerun_command(command, run_dir, resume=False)}")


def usage(cfg: Config, prog: str) -> str:
    """Every field with the recipe's value and, on the next line, its help (the comment beside it in config.py)."""
    helps = field_help(cfg)
    lines = []
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            name = f"{section.name}.{f.name}"
            lines.append(f"  --{name} = {getattr(getattr(cfg, section.name), f.name)!r}")
            lines.append(f"      {helps.get(name) or '(no description)'}")
    return USAGE.format(prog=prog, fields="\n".join(lines))


FLAGS = ("--resume", "--print-config", "--help", "-h")


def misspelt_flag(arg: str) -> str | None:
    """The flag a bare `--word` (no `section.field`) was probably meant to be, e.g. `--print-configg`;
    None when it looks like nothing of the kind (then it is read as a field, which names its own fixes)."""
    import difflib

    name = arg.split("=", 1)[0]
    if not name.startswith("--") or "." in name:
        return None
    close = difflib.get_close_matches(name, FLAGS[:3], n=1, cutoff=0.75)
    return close[0] if close else None


def parse(cfg: Config, argv: list[str]) -> tuple[Config, dict]:
    """Split the flags from the field overrides and apply the overrides to `cfg`."""
    flags: dict = {"resume": False, "print_config": False, "help": False}
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--resume" and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            if argv[i + 1] != "auto":
                raise ConfigError(f"--resume {argv[i + 1]}: --resume takes no value or 'auto'; use --resume to "
                                  f"continue a run, --resume auto to continue it or start it when there is none")
            flags["resume"], i = "auto", i + 1
        elif arg == "--resume=auto":
            flags["resume"] = "auto"
        elif arg in FLAGS:
            flags[{"--resume": "resume", "--print-config": "print_config"}.get(arg, "help")] = True
        elif arg.split("=", 1)[0] in FLAGS:  # --resume=yes, --print-config=1
            name = arg.split("=", 1)[0]
            raise ConfigError(f"{arg}: {name} takes no value" + (" (or --resume auto)" if name == "--resume" else ""))
        elif misspelt := misspelt_flag(arg):
            raise ConfigError(f"unknown flag {arg}; did you mean {misspelt}?")
        else:
            rest.append(arg)
        i += 1
    return apply_overrides(cfg, rest), flags


def command_line(cfg: Any, argv: list[str] | None, prog: str | None, *, check: Callable[[Any], None],
                 dump: Callable[[Any], str], start: Callable[[Any, bool | str, list[str]], dict],
                 user_errors: Callable[[], tuple[type[Exception], ...]]) -> dict:
    """The flow every trainer's command line shares: parse, `--help`, `check` the config,
    `--print-config` (printed by `dump`), then `start(cfg, resume, command)`; a ConfigError or
    an exception of `user_errors()` is bad input and exits 2 with one line, no traceback (one per
    node when the processes agreed on it: `runtime.failing_together`)
    (`user_errors` is called only then: its classes may live in modules that import torch, which
    `--help` and a misspelt field do not wait for); a Ctrl-C that reaches here
    (KeyboardInterrupt) exits 130 with one line saying how to go on (`interrupted_advice`). However
    `start` ends, the processes leave together (`leave_process_group`). A run a stop signal ended early
    (results["interrupted"], after its checkpoint) exits 128 + the signal's number."""
    plain_warnings()
    argv = sys.argv[1:] if argv is None else argv
    prog = prog or sys.argv[0]
    command = ["python", prog, *argv]
    finished = False
    try:
        try:
            cfg, flags = parse(cfg, argv)
            if flags["help"]:
                print(usage(cfg, prog))
                sys.exit(0)
            check(cfg)
        except ConfigError as err:
            exit_once_per_node(err)
        if flags["print_config"]:
            print(dump(cfg))
            sys.exit(0)
        results = start(cfg, flags["resume"], command)
        finished = True
    except Exception as err:
        if isinstance(err, ConfigError) or isinstance(err, user_errors()):
            exit_with(err)  # one line per node where the processes agreed on it
        raise
    except KeyboardInterrupt:  # Ctrl-C in set-up, or a second one in the loop: one line, not a traceback
        if os.environ.get("RANK", "0") == "0":  # every process gets the Ctrl-C: one of them says it
            print(interrupted_advice(command, Path(cfg.train.run_dir)), file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as a shell reports a process Ctrl-C ended
    finally:
        leave_process_group(finished)
    if "interrupted" in results:  # checkpointed: 128 + the signal's number (SIGTERM 143, SIGUSR1 138)
        from fastssl.runtime import stop_exit_code

        sys.exit(stop_exit_code(results["interrupted"]))
    return results


def leave_process_group(finished: bool) -> None:
    """Release the process group with the other processes (`runtime.end_process_group`), after an error too.

    An error exit that skipped it let a process die while a peer was still in the last collective,
    which aborted that peer (gloo: SIGABRT, which torchrun then reported as the failure instead of
    the error line) and NCCL warns at every exit that leaves its group. After an error a process
    waits less for the others (`runtime.FAILED_END_TIMEOUT_S`): one that failed alone gives up soon,
    and a release that fails (NCCL, a collective a peer never matched) does not replace the exit the
    error was given. Nothing to do when torch was never imported (`--help`, a bad flag); a Ctrl-C
    during the wait ends it."""
    runtime = sys.modules.get("fastssl.runtime")
    if runtime is None:
        return
    try:
        runtime.end_process_group(None if finished else runtime.FAILED_END_TIMEOUT_S)
    except KeyboardInterrupt:
        pass
    except Exception:
        if finished:
            raise


def run(cfg: Config, argv: list[str] | None = None, prog: str | None = None) -> dict:
    """Parse the command line into `cfg` and train; bad input exits with code 2 and a clear message."""
    from fastssl.config import dumps

    def start(c: Config, resume: bool | str, command: list[str]) -> dict:
        from fastssl.engine import train  # torch and the models: not for `--help` or a misspelt field

        return train(c, resume=resume, command=command)

    def user_errors() -> tuple[type[Exception], ...]:
        from fastssl.checkpoint import CheckpointError
        from fastssl.recovery import OutOfDeviceMemory, TrainingDiverged

        return (DataLayoutError, FileNotFoundError, BetonError, LoaderUnavailable, CheckpointError, TrainingDiverged,
                OutOfDeviceMemory)

    return command_line(cfg, argv, prog, check=validate, dump=dumps, start=start, user_errors=user_errors)
