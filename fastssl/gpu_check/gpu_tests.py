"""Stage 8, gpu_tests: `pytest -m gpu` over every test file, test_mira_cuda.py last (its cold nvcc
build is the slowest: the other files' results come first), the outcomes counted from pytest's
summary line, or test by test from its verbose log when the deadline cut it short.
"""

from __future__ import annotations

import re

from fastssl.gpu_check.goals import goal
from fastssl.gpu_check.runner import PY, ROOT, Context


def parse_pytest_summary(text: str) -> dict[str, int]:
    """Counts from pytest's last summary line ("3 passed, 1 failed, 2 skipped in 4.1s")."""
    counts: dict[str, int] = {}
    for line in reversed(text.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", line)
        if found and (" in " in line or line.startswith("=")):
            for n, what in found:
                counts["errors" if what.startswith("error") else what] = int(n)
            break
    return counts


def count_pytest_outcomes(text: str) -> tuple[dict[str, int], list[str]]:
    """Per-test outcomes of a verbose (-v) pytest log, for a run killed before its summary line:
    the counts, and the ids of the tests that failed or erred."""
    counts: dict[str, int] = {}
    failing = []
    for test_id, outcome in re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", text, re.M):
        key = {"ERROR": "errors", "XFAIL": "xfailed", "XPASS": "xpassed"}.get(outcome, outcome.lower())
        counts[key] = counts.get(key, 0) + 1
        if outcome in ("FAILED", "ERROR"):
            failing.append(test_id)
    return counts, failing


def gpu_test_files() -> list[str]:
    """Every test file, tests/test_mira_cuda.py last: its nvcc-built kernel is a cold build of a
    minute or so (earlier stages take the NVRTC route), so the other files' GPU tests (the
    two-process ones among them) run before a deadline can stop it. pytest keeps the given order."""
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py"))
    return sorted(files, key=lambda f: f.endswith("test_mira_cuda.py"))


def stage_gpu_tests(ctx: Context) -> dict:
    targets = ["tests/test_mira_cuda.py"] if ctx.dry_run else gpu_test_files()
    target = " ".join(targets) if ctx.dry_run else "tests (test_mira_cuda.py last)"
    # -v: one line per test as it ends, so a run killed at the deadline still says what passed.
    argv = [PY, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider", *targets]
    c = ctx.run("pytest-gpu", argv)
    log_text = (ctx.out / c.log).read_text(errors="replace") if (ctx.out / c.log).exists() else c.tail
    per_test, failing = count_pytest_outcomes(log_text)
    counts = parse_pytest_summary(c.tail) or per_test
    if c.rc not in (0, 5) or c.timed_out:  # 5: nothing collected
        ctx.errors.append(f"pytest: {'timed out' if c.timed_out else f'rc {c.rc}'}")
    failed = counts.get("failed", 0) + counts.get("errors", 0)
    goals = [goal("GPU tests failing", failed if counts else None, 0, "", False,
                  f"{counts.get('passed', 0)} passed, {counts.get('skipped', 0)} skipped")]
    return {"results": {"counts": counts, "rc": c.rc, "failing": failing,
                        "summary_line": bool(parse_pytest_summary(c.tail))}, "goals": goals,
            "summary": [f"`pytest -m gpu {target}`: " + (", ".join(f"{v} {k}" for k, v in counts.items()) or
                                                          "no test ended (see the log)")
                        + ("" if parse_pytest_summary(c.tail) else " (stopped before pytest's summary: counted "
                                                                   "from its per-test lines)"), ""]
                       + [f"- failing: `{t}`" for t in failing]}
