"""What an evaluation tool is pointed at: a run directory or a bare backbone file.

tools/eval_knn.py, tools/eval_linear.py and tools/finetune_semi.py all take "a run
directory or an exported backbone_<arch>.pth" and leave a JSON report beside it that a
run report picks up. Resolving the checkpoint, the data paths and the report path here
keeps the three tools from drifting apart in what they accept or where they write.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from fastssl.cli import write_fix
from fastssl.eval.errors import EvalError, check_output_file
from fastssl.run_log import write_json, write_text_atomic
from pipelines.augment import EVAL_CROP_FRACTION, EVAL_INTERPOLATION, IMAGENET_MEAN, IMAGENET_STD, EvalView

__all__ = ["TARGETS", "DISTILL_RECIPE", "resolve_target", "require_data", "read_run_config", "distillation_run",
           "start_dir", "from_run", "run_knn_figure", "markdown_twin", "write_report"]

# What every evaluation tool takes, for the messages that refuse something else.
TARGETS = "a run directory of a self-supervised recipe (recipes/mira_*.py, mlcpc_*.py) or its backbone_<arch>.pth"
DISTILL_RECIPE = "recipes/distill_mlcpc_cifar100.py"


def resolve_target(target: str | Path, *, tool: str, train: str | None = None, val: str | None = None,
                   image_size: int | None = None, arch: str | None = None, json_path: str | None = None,
                   train_keys: tuple[str, ...] = ("train",), interpolation: str | None = None,
                   crop_fraction: float | None = None, mean: tuple[float, float, float] | None = None,
                   std: tuple[float, float, float] | None = None) -> dict:
    """Checkpoint, arch, data paths, how evaluation sees an image (`view`: size, resize filter, crop share,
    the training normalisation), and report path from a run directory and the flags.

    Flags win over the run's config.json; a bare backbone file gets ImageNet's defaults. `train_keys`
    are the config.data fields tried in order for the training folder (the k-NN prefers its own
    `knn_train`). Relative data paths of the config are taken from the directory the run was started
    in (`start_dir`), so the tools work from any directory; flags are relative to this one, as usual. The
    report goes to RUN_DIR/<tool>.json, or <stem>_<tool>.json beside a bare backbone file.
    The data paths may still be missing: `require_data` says so, once the backbone has loaded,
    so that a wrong file (checkpoint.pt) is named before the flags it would also need.
    """
    target = Path(target)
    if not target.exists():
        raise EvalError(f"{str(target)!r} does not exist; pass a run directory or a backbone_<arch>.pth")
    found = {"train": train, "val": val, "size": image_size, "arch": arch, "interpolation": interpolation,
             "crop_fraction": crop_fraction, "mean": mean, "std": std}
    if target.is_dir():
        cfg = read_run_config(target)
        start = start_dir(target, cfg)
        data, aug, ev = cfg["data"], cfg["aug"], cfg.get("eval", {})
        saved_train = next((data[k] for k in train_keys if data.get(k)), None)
        found["arch"] = found["arch"] or cfg["model"]["arch"]
        found["train"] = found["train"] or (saved_train and from_run(saved_train, start))
        found["val"] = found["val"] or (data.get("val") and from_run(data["val"], start))
        found["size"] = found["size"] or ev.get("image_size") or aug.get("global_size") or 224
        found["interpolation"] = found["interpolation"] or ev.get("interpolation")
        found["crop_fraction"] = found["crop_fraction"] or ev.get("crop_fraction")
        found["mean"] = found["mean"] or aug.get("mean")
        found["std"] = found["std"] or aug.get("std")
        # The run's own arch names its file (a run has one); a different --arch is then refused by
        # load_backbone as "another architecture", which is what it is.
        found["checkpoint"] = target / f"backbone_{cfg['model']['arch']}.pth"
        if not found["checkpoint"].is_file():
            every = (cfg.get("train") or {}).get("checkpoint_every", 1)
            raise EvalError(f"run directory {str(target)!r} has no exported backbone yet ({found['checkpoint'].name}): "
                            f"training writes it with every checkpoint (train.checkpoint_every = {every} epoch(s)) "
                            "and at its end; wait for the first one, or rerun the recipe if the run stopped before")
        found["out"] = Path(json_path) if json_path else target / f"{tool}.json"
    else:
        found["checkpoint"] = target
        found["size"] = found["size"] or 224
        found["out"] = Path(json_path) if json_path else target.with_name(f"{target.stem}_{tool}.json")
    check_output_file(found["out"], "--json")  # before any work: a failed write at the end would lose the figures
    found["view"] = EvalView(found.pop("size"), found.pop("interpolation") or EVAL_INTERPOLATION,
                             found.pop("crop_fraction") or EVAL_CROP_FRACTION,
                             tuple(found.pop("mean") or IMAGENET_MEAN), tuple(found.pop("std") or IMAGENET_STD))
    return found


def markdown_twin(path: Path) -> Path:
    """Where a report's Markdown twin goes: beside the JSON, as .md. A --json that ends in .md would be
    its own twin (the table would replace the JSON): an EvalError, before any work."""
    if path.suffix.lower() == ".md":
        json_path = str(path.with_suffix(".json"))
        raise EvalError(f"--json {str(path)!r} ends in .md, where the Markdown table goes (beside the JSON, "
                        f"as .md): the table would replace the figures; name the JSON {json_path!r}")
    return path.with_suffix(".md")


def write_report(path: Path, report: dict, text: str | None = None) -> None:
    """Write a tool's JSON report (and `text`, a Markdown twin, beside it as .md), printing "wrote ..."
    and whether it replaced an earlier one (the default place is one per run and tool); a failed
    write (a full disk) is an EvalError that says so. Call it after the figures are printed:
    they then survive the failure on the screen."""
    md_path = markdown_twin(path)
    replaced = path.exists() or (text is not None and md_path.exists())
    try:
        write_json(path, report, sort_keys=False)
        if text is not None:
            write_text_atomic(md_path, text)
    except OSError as err:
        raise EvalError(f"the figures above could not be written to {str(path)!r} ({err.strerror or err}); "
                        f"{write_fix(err, '--json')}, and run again") from None
    print(f"wrote {path}" + (f" and {md_path}" if text is not None else "")
          + (" (replacing an earlier report there; pass --json elsewhere to keep both)" if replaced else ""))


def require_data(found: dict) -> None:
    """The training and val folders of `resolve_target`'s answer, which a bare backbone file does not name."""
    if not found["train"] or not found["val"]:
        raise EvalError("no data: pass --train and --val (ImageNet-layout folders)")


def distillation_run(cfg: dict) -> bool:
    """Whether a run's config.json is a knowledge-distillation run's (fastssl.distill: a student and a
    teacher, no model.arch): it holds a classifier.pt, no backbone_<arch>.pth, and other logs."""
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return isinstance(model, dict) and "student" in model and "arch" not in model


def newest_run_hint(folder: Path) -> str:
    """For a folder of runs (the demo's `runs/demo/<timestamp>/`): the newest run inside, to pass instead."""
    runs = [p for p in folder.iterdir() if (p / "config.json").is_file()] if folder.is_dir() else []
    if not runs:
        return f"; pass {TARGETS}"
    newest = max(runs, key=lambda p: (p / "config.json").stat().st_mtime)
    return f"; it holds {len(runs)} run{'s' if len(runs) > 1 else ''}, the newest {str(newest)!r}: pass that"


def read_run_config(run_dir: Path) -> dict:
    """The config.json of a self-supervised run; an EvalError saying what the directory is otherwise
    (no run, a distillation run, a config without model.arch) instead of a KeyError later."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise EvalError(f"{str(run_dir)!r} is not a run directory (no config.json){newest_run_hint(Path(run_dir))}")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as err:
        raise EvalError(f"{str(path)!r} is not valid JSON ({err}); pass {TARGETS}") from err
    if distillation_run(cfg):
        raise EvalError(f"{str(run_dir)!r} holds a distillation run ({DISTILL_RECIPE}; its student's top-1 is in "
                        f"results.json), which exports no backbone; pass {TARGETS}")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict) or not cfg["model"].get("arch"):
        raise EvalError(f"{str(path)!r} has no model.arch, so {str(run_dir)!r} is not a self-supervised run; "
                        f"pass {TARGETS}")
    for section in ("data", "aug", "eval"):  # what resolve_target reads; a run of these recipes saves all three
        if not isinstance(cfg.get(section, {}), dict) or (section != "eval" and section not in cfg):
            raise EvalError(f"{str(path)!r} has no {section} section (edited, or not written by these recipes), "
                            f"so the run's data and crops are unknown; pass {TARGETS}, with --train and --val")
    return cfg


def start_dir(run_dir: Path, cfg: dict) -> Path | None:
    """The directory a run was started in: its config.json's relative data paths are relative to it.

    Recipes store paths as typed (`data/demo/train`), so from another directory they would
    point nowhere. run_info.json records the start directory (`cwd`); for runs that predate
    it, a relative train.run_dir tells it too (`runs/demo/X`, found at /repo/runs/demo/X, was
    started in /repo). None when neither says.
    """
    try:
        cwd = json.loads((Path(run_dir) / "run_info.json").read_text()).get("cwd")
    except (OSError, ValueError, AttributeError):
        cwd = None
    if cwd:
        return Path(cwd)
    saved = Path(cfg.get("train", {}).get("run_dir") or "")
    here = Path(run_dir).resolve()
    n = len(saved.parts)
    if n and not saved.is_absolute() and len(here.parts) > n and here.parts[-n:] == saved.parts:
        return here.parents[n - 1]
    return None


def from_run(path: str, start: Path | None) -> str:
    """A data path of a run's config, made usable from here (absolute paths are kept as they are).

    Taken from the start directory when the path exists there, or when it exists from
    nowhere (then the error names the absolute path the run used); from this directory only
    when just that works (the run's data moved along with it, say).
    """
    p = Path(path)
    if p.is_absolute() or start is None:
        return path
    anchored = start / p
    return str(anchored) if anchored.exists() or not p.exists() else path


def run_knn_figure(target: str | Path) -> dict | None:
    """The run's own last online k-NN (results.json), for a report to show beside its figure; None
    when there is none. Read when the evaluation is over, so a results.json that cannot be read (a
    run killed while writing it, a hand edit) costs a warning and that one figure, not the report."""
    path = Path(target) / "results.json"
    if not Path(target).is_dir() or not path.is_file():
        return None
    try:
        knn = json.loads(path.read_text()).get("knn") or []
        last = knn[-1] if knn else None
        if last is not None and not isinstance(last, dict):
            raise ValueError(f"its last k-NN entry is {last!r}, not an object")
    except (OSError, ValueError, AttributeError, TypeError, KeyError) as err:
        warnings.warn(f"the report leaves out the run's own k-NN: {str(path)!r} cannot be read ({err})", stacklevel=2)
        return None
    return last
