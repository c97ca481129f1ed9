"""report.md of a profile report, a run report, and a comparison of two reports."""

from __future__ import annotations

from .analysis import compare


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def head(report: dict, title: str) -> list[str]:
    """Title, date, machine, device, software, recipe: what every figure below was measured on."""
    env, rec = report["environment"], report["recipe"]
    pk = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    lines = [f"# {title}", "", f"- date: {report['date']}",
             f"- machine: {env['hostname']} ({env['platform']}, {env['cpu_cores']} cores)",
             f"- device: {env['device_name']}" + (f", {env['device_memory_gb']} GB, CUDA {env['cuda']}"
                                                  if env.get("cuda") else ""),
             f"- software: Python {env['python']}, {pk}",
             f"- recipe: {rec['name']} ({rec['arch']}, K = {rec['num_prototypes']}, {rec['objective']}, "
             f"{rec['num_iters']} fixed-point steps)",
             f"- batch: {rec['batch_per_process']} per process (global {rec['global_batch_size']} over "
             f"{rec['processes']} processes); views {rec['views']}; dtype {rec['dtype']}; "
             f"channels_last {rec['channels_last']}; compile {rec['compile']}",
             f"- data: {rec['backend']} {rec['data'] or ''}".rstrip(), ""]
    return lines


def profile_markdown(report: dict) -> str:
    s, charts = report["stages"], report["charts"]
    lines = head(report, "Throughput profile")
    lines += ["## Verdict", "", report["verdict"], ""]
    lines += ["## Images/s per stage", ""]
    rows = [[f"loader only: {n}", _num(r["images_per_s"]), _num(r.get("min")), _num(r.get("max"))]
            for n, r in s["loader"].items()]
    m, e = s["model_step"], s["end_to_end"]
    rows.append(["model step only (synthetic batch on the device)", _num(m["images_per_s"]), "-", "-"])
    rows.append([f"end to end ({e['backend']})", _num(e["images_per_s"]), "-", "-"])
    lines += _table(["stage", "source images/s", "min", "max"], rows)
    lines += [f"End to end waited for data {100 * e['data_wait_share']:.1f}% of the time over "
              f"{e['steps']} steps after {e['warmup']} warm-up steps.", ""]
    if m.get("device_busy_share") is not None:
        lines += [f"During the model step the GPU ran kernels or copies {100 * m['device_busy_share']:.0f}% of the "
                  f"time ({m['device_busy_ms']:.1f} of {m['step_ms']:.1f} ms; {m['device_ops_per_step']:.0f} "
                  "launched per step).", ""]
        if m.get("device_top_ms"):
            lines += _table(["kernel (longest first)", "ms per step"],
                            [[name.replace("|", "/"), _num(ms, "{:.2f}")] for name, ms in m["device_top_ms"].items()])
    lines += [f"![images/s per stage]({charts['stages']})", "", "## Step-time breakdown", ""]
    rows = [[k.replace("_", " "), _num(v, "{:.2f}")] for k, v in report["breakdown_ms"].items()]
    lines += _table(["part of the step (instrumented pass, device synchronised at each boundary)", "ms"], rows)
    lines += [f"![step-time breakdown]({charts['breakdown']})", "", "## Assignment alone", ""]
    rows = [[n, str(r["B"]), str(r["K"]), _num(r["median_us"], "{:.0f}")] for n, r in s["assignment"].items()]
    lines += _table(["implementation", "B", "K", "median us (2 views)"], rows)
    lines += ["## Memory", ""]
    mem = report["memory"]
    lines += [f"- peak device memory per process: {_num(mem.get('peak_device_mb'), '{:.0f} MB')}",
              f"- peak host memory (RSS) of the profiling process: {_num(mem.get('peak_host_rss_mb'), '{:.0f} MB')}",
              ""]
    lines += ["## One ImageNet epoch (1,281,167 images)", ""]
    rows = [[f"{n} x {report['environment']['device']}", _num(p["images_per_s"]), _num(p["hours"], "{:.2f}")]
            for n, p in report["projection"].items()]
    lines += _table(["devices", "images/s", "hours"], rows)
    lines += ["The multi-device line assumes ideal linear scaling (no communication): a lower bound on the time.",
              "", "## Images/s over steps", "", f"![images/s over steps]({charts['over_steps']})", "",
              "## Cross-checks", ""]
    rows = [[k.replace("_", " "), _num(v.get("profile")), _num(v.get("independent")), _num(v.get("ratio"), "{:.3f}"),
             "yes" if v.get("within_15_percent") else "**no: figures doubtful**"]
            for k, v in report["checks"].items()]
    lines += _table(["figure", "this profile", "independent measurement", "ratio", "within 15%"], rows)
    lines += [c["note"] for c in report["checks"].values() if c.get("note")]
    return "\n".join(lines) + "\n"


def run_markdown(report: dict) -> str:
    charts = report["charts"]
    lines = head(report, f"Run report: {report['run_dir']}")
    lines += ["## Verdict", "", report["verdict"], "", "## Per epoch", ""]
    rows = [[str(int(r["epoch"]) + 1), _num(r.get("loss"), "{:.4f}"), _num(r.get("images_per_s")),
             _num(100 * r["data_wait_share"] if r.get("data_wait_share") is not None else None),
             _num(r.get("step_time_s"), "{:.3f}"), _num(r.get("peak_memory_mb") or None, "{:.0f}"), _num(r.get("knn_top1"))]
            for r in report["epochs"]]
    lines += _table(["epoch", "loss", "images/s", "data wait %", "step s", "peak MB", "k-NN top-1"], rows)
    for key, title in (("loss", "Loss"), ("throughput", "Images/s over steps"), ("knn", "k-NN top-1"),
                       ("mi", "ML-CPC mutual information estimate"), ("breakdown", "Step-time split, last epoch")):
        if key in charts:
            lines += [f"## {title}", "", f"![{title}]({charts[key]})", ""]
    if report["evaluations"]:
        lines += ["## Evaluations", ""]
        rows = [[name, _num(e.get("top1")), _num(e.get("top5")), e.get("detail", "")]
                for name, e in report["evaluations"].items()]
        lines += _table(["evaluation", "top-1", "top-5", "settings"], rows)
    return "\n".join(lines) + "\n"


def compare_markdown(a: dict, b: dict, name_a: str, name_b: str) -> str:
    lines = ["# Profile comparison", "", f"- A: {name_a} ({a['date']}, {a['environment']['device_name']}, "
             f"{a['recipe']['name']})", f"- B: {name_b} ({b['date']}, {b['environment']['device_name']}, "
             f"{b['recipe']['name']})", ""]
    rows = [[n, _num(va, "{:.3g}"), _num(vb, "{:.3g}"), _num(r, "{:.2f}")] for n, va, vb, r in compare(a, b)]
    lines += _table(["figure", "A", "B", "B / A"], rows)
    return "\n".join(lines)
