"""What an evaluation tool is pointed at: a run directory or a bare backbone file.

tools/eval_knn.py, tools/eval_linear.py and tools/finetune_semi.py all take "a run
directory or an exported backbone_<arch>.pth" and leave a JSON report beside it that a
run report picks up. Resolving the checkpoint, the data paths and the report path here
keeps the three tools from drifting apart in what they accept or where they write.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastssl.eval.errors import EvalError
from pipelines.augment import EVAL_INTERPOLATION

__all__ = ["resolve_target", "start_dir", "from_run", "run_knn_figure"]


def resolve_target(target: str | Path, *, tool: str, train: str | None = None, val: str | None = None,
                   image_size: int | None = None, arch: str | None = None, json_path: str | None = None,
                   train_keys: tuple[str, ...] = ("train",), need_train: bool = True,
                   interpolation: str | None = None) -> dict:
    """Checkpoint, arch, data paths, image size, resize filter and report path from a run directory and the flags.

    Flags win over the run's config.json. `train_keys` are the config.data fields tried in
    order for the training folder (the k-NN prefers its own `knn_train`). Relative data
    paths of the config are taken from the directory the run was started in (`start_dir`),
    so the tools work from any directory; flags are relative to this one, as usual. The
    report goes to RUN_DIR/<tool>.json, or <stem>_<tool>.json beside a bare backbone file.
    """
    target = Path(target)
    if not target.exists():
        raise EvalError(f"{str(target)!r} does not exist; pass a run directory or a backbone_<arch>.pth")
    found = {"train": train, "val": val, "size": image_size, "arch": arch, "interpolation": interpolation}
    if target.is_dir():
        config_path = target / "config.json"
        if not config_path.is_file():
            raise EvalError(f"{str(target)!r} is not a run directory (no config.json)")
        cfg = json.loads(config_path.read_text())
        start = start_dir(target, cfg)
        saved_train = next((cfg["data"][k] for k in train_keys if cfg["data"].get(k)), None)
        found["arch"] = found["arch"] or cfg["model"]["arch"]
        found["train"] = found["train"] or (saved_train and from_run(saved_train, start))
        found["val"] = found["val"] or (cfg["data"]["val"] and from_run(cfg["data"]["val"], start))
        found["size"] = found["size"] or cfg["eval"].get("image_size") or cfg["aug"]["global_size"]
        found["interpolation"] = found["interpolation"] or cfg["eval"].get("interpolation")
        found["checkpoint"] = target / f"backbone_{found['arch']}.pth"
        found["out"] = Path(json_path) if json_path else target / f"{tool}.json"
    else:
        found["checkpoint"] = target
        found["size"] = found["size"] or 224
        found["out"] = Path(json_path) if json_path else target.with_name(f"{target.stem}_{tool}.json")
    found["interpolation"] = found["interpolation"] or EVAL_INTERPOLATION
    if (need_train and not found["train"]) or not found["val"]:
        raise EvalError("no data: pass --train and --val (ImageNet-layout folders)")
    return found


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
    """The run's own last online k-NN (results.json), for a report to show beside its figure."""
    path = Path(target) / "results.json"
    if not Path(target).is_dir() or not path.is_file():
        return None
    knn = json.loads(path.read_text()).get("knn") or []
    return knn[-1] if knn else None
