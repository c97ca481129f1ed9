"""How to start a run again: the command a message tells the user to run (with `--resume`, under
the launcher of the first start), and whether there is a checkpoint to continue from.

Light on purpose (no torch): the command line prints these after a Ctrl-C, which may land
while torch itself is being imported, and a half-imported torch must not be imported again.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from pipelines.cores import processes_on_this_machine

__all__ = ["CHECKPOINT_NAME", "launched_processes", "one_process_refusal", "launch_words", "rerun_command"]

CHECKPOINT_NAME = "checkpoint.pt"  # the file a resume continues from (fastssl.checkpoint writes it)


def launched_processes() -> tuple[int, int]:
    """(the run's processes, those on this machine), as the launcher (`accelerate launch`, torchrun)
    set WORLD_SIZE and LOCAL_WORLD_SIZE; (1, 1) for a plain `python` run."""
    world = os.environ.get("WORLD_SIZE", "")
    processes = int(world) if world.isdigit() and int(world) > 0 else 1
    return processes, min(processes_on_this_machine(processes), processes)


def one_process_refusal(what: str, script: str) -> str | None:
    """Why `what` (a single-process trainer or tool) will not run as one of several launched
    processes: the copies would each redo the whole job on the same GPU and race on its outputs.
    None on one process."""
    processes, _ = launched_processes()
    if processes == 1:
        return None
    return (f"{what} runs as one process, and this is one of {processes}; start it with `python {script} ...`, "
            "not `accelerate launch` / torchrun with several processes")


def launch_words(head: str, processes: int, per_machine: int) -> tuple[list[str], str]:
    """How to start the command again on `processes` processes (`per_machine` on each machine):
    (the words that replace `head`, a note to append). The recorded command is `python script ...`
    whatever launched it, and followed literally it would resume on ONE process (the whole batch on
    one GPU: out of memory; the other processes' random states not restored). One machine and a
    `python` head: README's `accelerate launch` line; several machines (each needs its own
    --machine_rank) or another head: the command as it is, with a note naming the process count."""
    if processes <= 1:
        return [head], ""
    if per_machine >= processes and Path(head).name.startswith("python"):
        return ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes)], ""
    machines = processes // per_machine if per_machine > 0 and processes % per_machine == 0 else None
    where = f" on {machines} machines, one launch on each" if machines and machines > 1 else ""
    return [head], f" (with the same launcher and process count as before: {processes} processes{where})"


def rerun_command(command: list[str] | None, run_dir: Path, resume: bool = True,
                  overrides: dict[str, str] | None = None, processes: tuple[int, int] | None = None) -> str:
    """The user's command (["python", script, *args]) with `--resume` (or without), an explicit
    `--train.run_dir` and `overrides` ({"optim.base_lr": "0.1"}) replacing those fields, quoted for a shell.
    `processes` is (the run's processes, those on this machine), read from the launcher's environment
    when None: a run of several processes is started again under a launcher (`launch_words`)."""
    fields = {"train.run_dir": str(run_dir), **(overrides or {})}
    head, args = (command[:2], command[2:]) if command else (["<your command>"], [])
    kept, i = [], 0
    while i < len(args):
        arg = args[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if arg == "--resume":  # and its value, `--resume auto`
            i += 2 if i + 1 < len(args) and args[i + 1] == "auto" else 1
        elif arg == "--resume=auto":
            i += 1
        elif key in fields:
            i += 1 if "=" in arg else 2
        else:
            kept.append(arg)
            i += 1
    tail = (["--resume"] if resume else []) + [t for k, v in fields.items() for t in (f"--{k}", v)]
    launcher, note = launch_words(head[0], *(processes or launched_processes()))
    return " ".join([*launcher, *map(shlex.quote, [*head[1:], *kept, *tail])]) + note
