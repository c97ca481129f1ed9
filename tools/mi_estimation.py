#!/usr/bin/env python3
"""The ML-CPC paper's Fig. 3: estimating a known, stepped MI with CPC and ML-CPC critics.

    python tools/mi_estimation.py --out runs/mi_estimation          # the full experiment
    python tools/mi_estimation.py --quick --out /tmp/mi              # a minute-long smoke run

Data: 20-dimensional Gaussians x, y with y_k = rho x_k + sqrt(1 - rho^2) e_k, so that
I(X; Y) = -10 log(1 - rho^2); the true MI steps through 2, 4, 6, 8, 10 nats, 4,000
iterations each. Each iteration draws n = 128 pairs; every x_i is scored against all 128
y_j (its own y_i is the positive, the other 127 are the negatives: m = 128).

Critics: separable, f(x) . g(y) with f, g MLPs (two hidden layers of 256, 32-dim
output; the authors' `mlp(..., layers)` in utils.py has layers + 1 hidden layers, and the
notebook that sets `layers` is not in their repository: likely 2, i.e. three hidden layers:
`--separable-layers 3`),
and joint, an MLP on the concatenated pair (one hidden layer of 256 wide: the hidden layer is
evaluated for all 128 x 128 pairs, which is what makes a joint critic
expensive; one layer keeps the whole experiment within 15 minutes on 2 CPU cores).
Adam, lr 5e-4. Estimators: CPC (Eq. 4) and ML-CPC (Eq. 6) at alpha in {1, 0.1, 0.01}
and alpha_min(n, m) (`--alphas`; the paper's figure also has 0.001 and 0.0001); each estimator
trains its own critic on its own bound. All the
estimators of one critic family train together as one batched ensemble (the same data,
independent parameters), so the cost is one forward/backward per iteration.

Outputs, in --out: `mi_estimation.json` (per estimator: the raw per-iteration estimates, and,
per MI level, the mean estimate over the last half of the level) and `mi_estimation.png` (one
panel per estimator: the estimates, raw and smoothed as in the paper's plots, against the true MI).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from fastssl.arg_types import comma_list, int_at_least, number_in, one_of, seed_number
from fastssl.cli import ToolArgumentParser, exit_with, stop_in_one_line, write_fix
from fastssl.eval.errors import EvalError, check_output_dir
from fastssl.losses import alpha_min
from fastssl.mi_estimation import (ALPHAS, DIM, FAMILIES, LR, MI_LEVELS, SEPARABLE_LAYERS, plot, run_family,
                                   summarise)
from fastssl.run_log import write_json

MAX_BATCH = 8192  # n = m: the critics' n x m scores (x the estimators and Adam's state) must fit in memory
MAX_LAYERS = 16  # the separable critics' hidden layers: more only slows a figure that needs 2 or 3


def alpha_text(text: str) -> str:
    """An alpha of --alphas: "alpha_min" or a positive number, kept as written (it names the estimator)."""
    if text == "alpha_min":
        return text
    number_in(0, low_open=True)(text)  # refuses 0, negatives, NaN and infinity
    return text


def _progress(family: str) -> Callable[[float, float], None]:
    """Prints a line when run_family finishes an MI level."""

    def on_level(mi: float, seconds: float) -> None:
        print(f"  {family}: MI {mi:.0f} nats done ({seconds:.0f} s)", flush=True)

    return on_level


def main(argv: list[str] | None = None) -> dict:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/mi_estimation", help="output folder (JSON and PNG)")
    ap.add_argument("--iters", type=int_at_least(2), help="iterations per MI level (default: the paper's 4000; "
                    "--quick: 100)")
    ap.add_argument("--batch", type=int_at_least(2, MAX_BATCH),
                    help=f"n = m (default: the paper's 128; --quick: 16; at most {MAX_BATCH}: the critics score "
                    "n x m pairs)")
    ap.add_argument("--critics", type=comma_list(one_of(FAMILIES)), default=list(FAMILIES),
                    help="comma-separated critics: separable, joint, or separable,joint (the default: both)")
    ap.add_argument("--alphas", type=comma_list(alpha_text), default=list(ALPHAS),
                    help=f"comma-separated alphas of both bounds, numbers or alpha_min (default: "
                    f"{','.join(ALPHAS)}; the paper's figure also has 0.001 and 0.0001); each at most n")
    ap.add_argument("--separable-layers", type=int_at_least(1, MAX_LAYERS), default=SEPARABLE_LAYERS,
                    help=f"hidden layers of the separable critics' f and g (default {SEPARABLE_LAYERS}; the "
                    "authors' likely 3)")
    ap.add_argument("--seed", type=seed_number, default=0)
    ap.add_argument("--quick", action="store_true", help="100 iterations per level, n = 16: a smoke run (an "
                    "explicit --iters or --batch still wins)")
    ap.add_argument("--no-compile", action="store_true", help="eager critics (compiling fuses the joint critic)")
    args = ap.parse_args(argv)
    args.iters = args.iters if args.iters is not None else 100 if args.quick else 4000
    args.batch = args.batch if args.batch is not None else 16 if args.quick else 128
    too_large = [a for a in args.alphas if a != "alpha_min" and float(a) > args.batch]
    if too_large:  # the bounds take alpha in (0, m], m = n here
        ap.error(f"argument --alphas: {', '.join(too_large)} above m = n = {args.batch}; alpha lies in (0, m]")
    families = args.critics
    out = Path(args.out)
    try:
        check_output_dir(out, "--out")  # before the minutes of training, not after
    except EvalError as err:
        exit_with(err)
    with stop_in_one_line("nothing is written before every critic has trained: run the command again"):
        results = {f: run_family(f, args.iters, args.batch, args.seed, not args.no_compile,
                                 on_level=_progress(f), alphas=args.alphas, separable_layers=args.separable_layers)
                   for f in families}
    report = {
        "config": {"dim": DIM, "mi_levels": MI_LEVELS, "iters_per_level": args.iters, "n": args.batch,
                   "m": args.batch, "log_m": math.log(args.batch), "alpha_min": alpha_min(args.batch, args.batch),
                   "lr": LR, "seed": args.seed, "alphas": args.alphas, "separable_layers": args.separable_layers},
        "families": {f: {"summary": summarise(r, args.iters), "seconds": r["seconds"], "alphas": r["alphas"],
                         "estimates": {k: [round(v, 4) for v in vals] for k, vals in r["estimates"].items()}}
                     for f, r in results.items()},
    }
    print(f"\n{'family':10s} {'estimator':24s} " + " ".join(f"{mi:>6g}" for mi in MI_LEVELS))
    for f, r in report["families"].items():
        for name, levels in r["summary"].items():
            print(f"{f:10s} {name:24s} " + " ".join(f"{levels[f'{mi:g}']:6.2f}" for mi in MI_LEVELS))
    try:  # after the table: a failed write (a full disk) leaves the figures on the screen
        write_json(out / "mi_estimation.json", report, sort_keys=False)
        plot(results, out / "mi_estimation.png", args.batch)
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
    except OSError as err:
        exit_with(f"the figures above could not be written in {str(out)!r} ({err.strerror or err}); "
                  f"{write_fix(err, '--out')}, and run again")
    print(f"wrote {out / 'mi_estimation.json'}")
    return report


if __name__ == "__main__":
    main()
