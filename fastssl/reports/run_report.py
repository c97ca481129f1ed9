"""The report of one run directory (finished or still running), from the loop's own logs.

Reads what every run writes: config.json, run_info.json (machine and recipe, written at
start), train_log.csv (every `log_every` steps), epochs.csv (per epoch: images/s, data-wait
share, step time, peak memory, k-NN), results.json, and the evaluation tools' JSON
(`EVAL_FILES`: eval_knn*.json, eval_linear.json, finetune_semi*.json) when present.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from fastssl.checkpoint import CheckpointError, read_json_record
from fastssl.config import ConfigError, from_dict

from . import charts
from .environment import describe_environment, describe_recipe
from .schema import ReportError, new_report

# The evaluation tools' reports in a run directory: one name each, or a family (a k-NN per memory
# bank, `eval_knn --subset`; a fine-tuning per subset, `finetune_semi_<subset>.json`; the older
# `finetune_semi.json` too).
EVAL_FILES = ("eval_knn.json", "eval_knn_*.json", "eval_linear.json", "finetune_semi*.json")


def read_csv(path: Path, required: tuple[str, ...] = ("step",)) -> list[dict]:
    """Rows with numbers as floats ('' -> None); a missing file (run just started) gives no rows, and a
    last row cut short by a kill is left out. A damaged log (not text, without one of the `required`
    columns the report reads, a value that is not a number) is a ReportError naming it, not a traceback
    or a report of a run that "logged no step"."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as err:
        raise ReportError(f"{path} is damaged ({err}); restore it, or move it away to report without it") from None
    missing = [name for name in required if name not in columns]
    if columns and missing:
        raise ReportError(f"{path} is damaged: its header {','.join(columns[:6])!r} has no {', '.join(missing)} "
                          f"column; restore it, or move it away to report without it")
    for line, row in enumerate(rows, start=2):
        if None in row:  # csv.DictReader's key for the fields past the header's
            raise ReportError(f"{path} is damaged: row {line} has more fields than its header; restore it, or move "
                              f"it away to report without it")
    if rows and None in rows[-1].values() and all(isinstance(_number(v), (float, type(None)))
                                                  for v in rows[-1].values()):
        rows.pop()  # fewer fields than the header, all numbers: a run killed while writing its last row
    out = [{k: _number(v) for k, v in r.items()} for r in rows if r.get("step")]
    for line, row in enumerate(out, start=2):  # every column the loggers write is a number (or empty)
        bad = next((k for k in ("step", "epoch", *row) if not isinstance(row.get(k), (float, type(None)))), None)
        if bad:
            raise ReportError(f"{path} is damaged: row {line} has {bad} {row[bad]!r}, not a number; restore it, "
                              f"or move it away to report without it")
    return out


def _number(v: str | None) -> float | str | None:
    if v in (None, ""):
        return None
    try:
        return float(v)
    except ValueError:
        return v


def run_info(run_dir: Path) -> tuple[dict, dict, str]:
    """(environment, recipe, note) from run_info.json, or from config.json and this machine for old runs."""
    info_path = run_dir / "run_info.json"
    if info_path.is_file():
        info = read_json(info_path)
        if not isinstance(info.get("environment"), dict) or not isinstance(info.get("recipe"), dict):
            raise ReportError(f"{info_path} is damaged: it lacks the run's environment or recipe; restore it, or "
                              f"move it away to report with this machine's instead")
        return info["environment"], info["recipe"], ""
    try:
        cfg = from_dict(json.loads((run_dir / "config.json").read_text()))
    except (ConfigError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ReportError(f"{run_dir}/config.json cannot be read as a fastssl config ({err})") from err
    import torch

    return (describe_environment(torch.device("cpu")), describe_recipe(cfg, run_dir.name, "unknown"),
            "This run predates run_info.json: machine and software above are the machine rendering the report.")


def evaluations(run_dir: Path, results: dict) -> dict:
    """Final figures of every evaluation found in the run directory."""
    out = {}
    results_path = run_dir / "results.json"
    first = results.get("knn_random_init")
    if first:
        top1, top5 = _figures(first, results_path, "knn_random_init")
        out["online k-NN, random init"] = {"top1": top1, "top5": top5,
                                           "detail": "before training (knn_at_start), k = 20"}
    if results.get("knn"):
        knn = results["knn"]
        last = knn[-1] if isinstance(knn, list) else knn
        top1, top5 = _figures(last, results_path, "knn[-1]" if isinstance(knn, list) else "knn")
        out["online k-NN (loop)"] = {"top1": top1, "top5": top5,
                                     "detail": f"epoch {last.get('epoch', '?')}, k = 20"}
    for path in (path for pattern in EVAL_FILES for path in sorted(run_dir.glob(pattern))):
        top1, top5 = _figures(_headline(read_json(path)), path, "")
        out[path.stem] = {"top1": top1, "top5": top5, "detail": path.name}
    return out


def _figures(entry: object, path: Path, where: str) -> tuple[float | None, float | None]:
    """(top1, top5) of an evaluation's entry (`where` in `path`), each a number or absent; a ReportError
    naming the file and the value when it is not (a file edited by hand, or another program's)."""
    fix = "restore it, or move it away to report without it"
    if not isinstance(entry, dict):
        raise ReportError(f"{path} is damaged: its {where or 'content'} is {str(entry)[:80]!r}, not an object of "
                          f"figures; {fix}")
    for key in ("top1", "top5", "epoch"):
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ReportError(f"{path} is damaged: its {where}{'.' if where else ''}{key} is {value!r}, not a number; "
                              f"{fix}")
    return entry.get("top1"), entry.get("top5")


def read_json(path: Path) -> dict:
    """A JSON file of the run directory, or a ReportError that names it (a run writes its files atomically,
    so a damaged one was damaged after the run wrote it)."""
    try:
        return read_json_record(path, "figures of the run", without="report without it")
    except CheckpointError as err:
        raise ReportError(str(err)) from None


def _headline(data: dict) -> object:
    """The entry holding top-1/top-5 of an evaluation JSON: the top level, or k = 20 of eval_knn's per-k
    table; {} when there is none."""
    if "top1" in data:
        return data
    for key in ("k", "results", "knn"):
        table = data.get(key)
        if isinstance(table, dict):
            best = table.get("20") or table.get(20) or next(iter(table.values()), {})
            if isinstance(best, dict):
                return best
    return {}


# Data-wait shares that name the loader: past LOADER_BOUND the loop mostly waits for it; past
# LOADER_STALLS it holds the step back enough to be worth a faster loader.
LOADER_BOUND, LOADER_STALLS = 0.5, 0.1


def wait_verdict(share: float) -> str:
    """What a data-wait share says about the bottleneck (the end of run_verdict's sentence)."""
    if share > LOADER_BOUND:
        return "the loader is the bottleneck."
    if share > LOADER_STALLS:
        return (f"the model step takes most of the time, but the loader stalls it: a loader that kept up would "
                f"make the run up to {1 / (1 - share):.2f}x faster.")
    return "the model step is the bottleneck, not the loader."


def run_verdict(epochs: list[dict], steps: list[dict]) -> str:
    """One paragraph: progress, throughput, data wait, memory, and the bottleneck."""
    if not steps:
        return "No training step has been logged yet."
    rows = epochs or steps
    ips = [r["images_per_s"] for r in rows if r.get("images_per_s")]
    waits = [r["data_wait_share"] for r in rows if r.get("data_wait_share") is not None]
    mean_ips = sum(ips) / len(ips) if ips else 0.0
    mean_wait = sum(waits) / len(waits) if waits else 0.0
    last = steps[-1]
    loss = "not logged" if last.get("loss") is None else f"{last['loss']:.4f}"
    text = (f"{len(epochs)} epoch(s) finished, step {int(last['step'])}, last logged loss {loss}. "
            f"Mean {mean_ips:.1f} images/s; the loop waited for data {100 * mean_wait:.0f}% of the time, so "
            + wait_verdict(mean_wait))
    peaks = [r["peak_memory_mb"] for r in epochs if r.get("peak_memory_mb")]
    if peaks:
        text += f" Peak device memory {max(peaks):.0f} MB per process"
        used = [r["device_used_mb"] for r in epochs if r.get("device_used_mb")]
        text += f" ({max(used):.0f} MB in use on the device, with PyTorch's cache and DALI's pools)." if used else "."
    return text


def build_run_report(run_dir: Path, out: Path, date: str) -> dict:
    """report.json content for `run_dir`; charts are written into `out`."""
    if not run_dir.is_dir():
        raise ReportError(f"run directory {str(run_dir)!r} does not exist; pass a directory under runs/ that a "
                          "recipe wrote (it holds config.json and train_log.csv)")
    if not (run_dir / "config.json").is_file():
        raise ReportError(f"{str(run_dir)!r} is not a run directory (no config.json); pass the directory a recipe "
                          "printed as its run directory")
    environment, recipe, note = run_info(run_dir)
    epochs = read_csv(run_dir / "epochs.csv", ("step", "epoch"))
    steps = read_csv(run_dir / "train_log.csv", ("step", "loss", "images_per_s"))  # the charts' columns
    results_path = run_dir / "results.json"
    results = read_json(results_path) if results_path.is_file() else {}
    report = new_report("run", environment, recipe, date)
    report.update(run_dir=str(run_dir), epochs=epochs, steps=steps, evaluations=evaluations(run_dir, results),
                  knn_random_init=results.get("knn_random_init"),
                  verdict=run_verdict(epochs, steps) + (f" {note}" if note else ""))
    report["charts"] = run_charts(report, out)
    return report


def knn_points(epochs: list[dict], random_init: dict | None) -> list[tuple[int, float]]:
    """(epochs trained, k-NN top-1) of the online k-NN, the random-init network's at epoch 0.

    Demo-like runs measure the k-NN only at the start and at the end: without the
    random-init point their chart would be a single dot that compares with nothing.
    """
    points = [(0, random_init["top1"])] if random_init and random_init.get("top1") is not None else []
    return points + [(int(r["epoch"]) + 1, r["knn_top1"]) for r in epochs if r.get("knn_top1") is not None]


def run_charts(report: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    steps, epochs, found = report["steps"], report["epochs"], {}
    if steps:
        x = [r["step"] for r in steps]
        found["loss"] = charts.line_chart(out / "loss.png", {"loss": (x, [r["loss"] for r in steps])}, "step",
                                          "loss", "Training loss")
        found["throughput"] = charts.line_chart(out / "throughput.png",
                                                {"images/s": (x, [r["images_per_s"] for r in steps])}, "step",
                                                "images/s", "Images/s over steps")
        mi = [(r["step"], r["mi_nats"]) for r in steps if r.get("mi_nats") is not None]
        if mi:
            ceiling = [(r["step"], r["mi_ceiling_nats"]) for r in steps if r.get("mi_ceiling_nats") is not None]
            series = {"ML-CPC estimate": ([s for s, _ in mi], [v for _, v in mi])}
            if ceiling:
                series["ceiling log(m / alpha)"] = ([s for s, _ in ceiling], [v for _, v in ceiling])
            found["mi"] = charts.line_chart(out / "mi.png", series, "step", "nats", "Mutual information estimate")
    knn = knn_points(epochs, report.get("knn_random_init"))
    if knn:
        found["knn"] = charts.line_chart(
            out / "knn.png", {"top-1": ([e for e, _ in knn], [v for _, v in knn])},
            "epoch (0 = random init)" if knn[0][0] == 0 else "epoch",
            "k-NN top-1 (%)", "Online k-NN", integer_x=True,
            labels={"top-1": [f"{v:.1f}" + (" (random init)" if e == 0 else "") for e, v in knn]})
    if epochs:
        last = epochs[-1]
        if last.get("step_time_s") and last.get("data_wait_share") is not None:
            ms = 1e3 * last["step_time_s"]
            found["breakdown"] = charts.stacked_breakdown(
                out / "breakdown.png", {"data wait": ms * last["data_wait_share"],
                                        "model step and the rest": ms * (1 - last["data_wait_share"])},
                f"Step time, epoch {int(last['epoch']) + 1}")
    return found
