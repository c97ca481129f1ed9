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
notebook that sets `layers` is not in their repository: likely 2, i.e. three hidden layers),
and joint, an MLP on the concatenated pair (one hidden layer of 256 wide: the hidden layer is
evaluated for all 128 x 128 pairs, which is what makes a joint critic
expensive; one layer keeps the whole experiment within 15 minutes on 2 CPU cores).
Adam, lr 5e-4. Estimators: CPC (Eq. 4) and ML-CPC (Eq. 6) at alpha in {1, 0.1, 0.01}
and alpha_min(n, m); each estimator trains its own critic on its own bound. All 8
estimators of one critic family train together as one batched ensemble (the same data,
independent parameters), so the cost is one forward/backward per iteration.

Outputs, in --out: `mi_estimation.json` (per estimator: the per-iteration estimates
smoothed as in the paper's plots, and, per MI level, the mean estimate over the last
half of the level) and `mi_estimation.png` (one panel per estimator, estimates against
the true MI).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from fastssl.cli import ToolArgumentParser, exit_with
from fastssl.eval.errors import EvalError, check_output_dir
from fastssl.losses import alpha_min, cpc_bound, ml_cpc_bound
from fastssl.run_log import write_json

DIM = 20
MI_LEVELS = (2.0, 4.0, 6.0, 8.0, 10.0)
ALPHAS = ("1", "0.1", "0.01", "alpha_min")


def rho_for(mi: float, dim: int = DIM) -> float:
    """Per-dimension correlation giving I(X; Y) = -dim/2 log(1 - rho^2) = mi."""
    return math.sqrt(1.0 - math.exp(-2.0 * mi / dim))


def sample(n: int, mi: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    rho = rho_for(mi)
    x = torch.randn(n, DIM, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, DIM, generator=g)
    return x, y


class EnsembleLinear(nn.Module):
    """E independent Linear layers applied as one batched matmul (E x ... x in -> E x ... x out)."""

    def __init__(self, ensemble: int, d_in: int, d_out: int):
        super().__init__()
        bound = 1 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(ensemble, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(ensemble, 1, d_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def ensemble_mlp(ensemble: int, d_in: int, hidden: int, d_out: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [EnsembleLinear(ensemble, d_in if i == 0 else hidden, hidden), nn.ReLU()]
    mods.append(EnsembleLinear(ensemble, hidden, d_out))
    return nn.Sequential(*mods)


class SeparableCritics(nn.Module):
    """E separable critics: scores[e, i, j] = f_e(x_i) . g_e(y_j)."""

    def __init__(self, ensemble: int, hidden: int = 256, embed: int = 32):
        super().__init__()
        self.ensemble = ensemble
        self.f = ensemble_mlp(ensemble, DIM, hidden, embed, layers=2)
        self.g = ensemble_mlp(ensemble, DIM, hidden, embed, layers=2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.f(x.expand(self.ensemble, -1, -1))
        gy = self.g(y.expand(self.ensemble, -1, -1))
        return torch.bmm(fx, gy.transpose(1, 2))


class JointCritics(nn.Module):
    """E joint critics: scores[e, i, j] = w_e . relu(A_e x_i + B_e y_j + b_e), for all pairs (no output bias:
    every bound is unchanged when all scores shift together).

    The first layer of an MLP on [x; y] splits into an x part and a y part, so it costs
    two small matmuls; the hidden layer over all n x n pairs is the real work.
    """

    def __init__(self, ensemble: int, hidden: int = 256):
        super().__init__()
        self.ensemble = ensemble
        self.a = EnsembleLinear(ensemble, DIM, hidden)
        self.b = EnsembleLinear(ensemble, DIM, hidden)
        self.out = nn.Parameter(torch.randn(ensemble, hidden) / math.sqrt(hidden))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ax = self.a(x.expand(self.ensemble, -1, -1))  # E x n x h (carries the first bias)
        by = torch.bmm(y.expand(self.ensemble, -1, -1), self.b.weight)  # E x n x h
        # Written as pointwise + reduction, so that torch.compile fuses it into one loop that
        # never stores the E x n x n x h hidden layer (eager mode does store it).
        hidden = torch.relu(ax.unsqueeze(2) + by.unsqueeze(1))  # E x n x n x h
        return (hidden * self.out[:, None, None, :]).sum(-1)


def estimators(n: int, m: int) -> list[tuple[str, str, float]]:
    """(name, bound, alpha) for every estimator of the figure."""
    out = []
    for bound in ("cpc", "ml_cpc"):
        for a in ALPHAS:
            alpha = alpha_min(n, m) if a == "alpha_min" else float(a)
            out.append((f"{bound} alpha={a}", bound, alpha))
    return out


_OFF_DIAGONAL: dict[int, torch.Tensor] = {}


def _off_diagonal(n: int) -> torch.Tensor:
    """Flat indices of the off-diagonal entries of an n x n matrix, row by row (cached)."""
    if n not in _OFF_DIAGONAL:
        _OFF_DIAGONAL[n] = (~torch.eye(n, dtype=torch.bool)).reshape(-1).nonzero().squeeze(1)
    return _OFF_DIAGONAL[n]


def bounds_of(scores: torch.Tensor, specs: list[tuple[str, str, float]]) -> torch.Tensor:
    """E estimates from E score matrices (n x n: diagonal = positives)."""
    n = scores.shape[1]
    off = _off_diagonal(n)
    values = []
    for e, (_, bound, alpha) in enumerate(specs):
        s = scores[e]
        pos, neg = s.diagonal(), s.reshape(-1)[off].view(n, n - 1)
        values.append((cpc_bound if bound == "cpc" else ml_cpc_bound)(pos, neg, alpha))
    return torch.stack(values)


def run_family(family: str, iters_per_level: int, n: int, seed: int, compile_critics: bool) -> dict:
    specs = estimators(n, n)
    critics = SeparableCritics(len(specs)) if family == "separable" else JointCritics(len(specs))
    opt = torch.optim.Adam(critics.parameters(), lr=5e-4, foreach=True)
    forward = torch.compile(critics) if compile_critics else critics
    g = torch.Generator().manual_seed(seed)
    history = {name: [] for name, _, _ in specs}
    truth = []
    start = time.perf_counter()
    for level, mi in enumerate(MI_LEVELS):
        for it in range(iters_per_level):
            x, y = sample(n, mi, g)
            est = bounds_of(forward(x, y), specs)
            opt.zero_grad(set_to_none=True)
            (-est.sum()).backward()  # each estimator maximises its own bound (independent parameters)
            opt.step()
            for (name, _, _), v in zip(specs, est.detach().tolist()):
                history[name].append(v)
            truth.append(mi)
        print(f"  {family}: MI {mi:.0f} nats done ({time.perf_counter() - start:.0f} s)", flush=True)
    return {"estimates": history, "true_mi": truth, "seconds": time.perf_counter() - start,
            "alphas": {name: alpha for name, _, alpha in specs}}


def summarise(result: dict, iters_per_level: int) -> dict:
    """Per estimator and MI level: the mean estimate over the second half of the level."""
    out = {}
    for name, values in result["estimates"].items():
        levels = {}
        for k, mi in enumerate(MI_LEVELS):
            tail = values[k * iters_per_level + iters_per_level // 2:(k + 1) * iters_per_level]
            levels[f"{mi:g}"] = sum(tail) / len(tail)
        out[name] = levels
    return out


def smooth(values: list[float], window: int) -> list[float]:
    """Exponential moving average, as the paper's plots."""
    out, acc, w = [], None, 2.0 / (window + 1)
    for v in values:
        acc = v if acc is None else acc + w * (v - acc)
        out.append(acc)
    return out


def plot(results: dict, path: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(results.values()))["estimates"])
    fig, axes = plt.subplots(len(results), len(names), figsize=(3 * len(names), 2.6 * len(results)),
                             sharex=True, sharey=True, squeeze=False)
    for r, (family, res) in enumerate(results.items()):
        for c, name in enumerate(names):
            ax = axes[r][c]
            ax.plot(res["estimates"][name], color="0.8", lw=0.3)
            ax.plot(smooth(res["estimates"][name], 200), color="C0", lw=1)
            ax.plot(res["true_mi"], color="k", lw=1)
            ax.axhline(math.log(n), color="C3", lw=0.6, ls="--")
            ax.set_title(f"{family}: {name}", fontsize=8)
            ax.set_ylim(0, 12)
    fig.suptitle(f"MI estimates (blue) vs true MI (black); dashed: log m = {math.log(n):.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> dict:
    ap = ToolArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/mi_estimation", help="output folder (JSON and PNG)")
    ap.add_argument("--iters", type=int, default=4000, help="iterations per MI level (paper: 4000)")
    ap.add_argument("--batch", type=int, default=128, help="n = m (paper: 128)")
    ap.add_argument("--critics", default="separable,joint",
                    help="comma-separated critics: separable, joint, or separable,joint (the default: both)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="100 iterations per level, n = 16: a smoke run")
    ap.add_argument("--no-compile", action="store_true", help="eager critics (compiling fuses the joint critic)")
    args = ap.parse_args(argv)
    if args.quick:
        args.iters, args.batch = 100, 16
    families = args.critics.split(",")
    if not families or set(families) - {"separable", "joint"} or args.iters < 2 or args.batch < 2:
        ap.error("--critics takes separable and/or joint; --iters and --batch must be at least 2")
    out = Path(args.out)
    try:
        check_output_dir(out, "--out")  # before the minutes of training, not after
    except EvalError as err:
        exit_with(err)
    results = {f: run_family(f, args.iters, args.batch, args.seed, not args.no_compile) for f in families}
    report = {
        "config": {"dim": DIM, "mi_levels": MI_LEVELS, "iters_per_level": args.iters, "n": args.batch,
                   "m": args.batch, "log_m": math.log(args.batch), "alpha_min": alpha_min(args.batch, args.batch),
                   "lr": 5e-4, "seed": args.seed},
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
        exit_with(f"the figures above could not be written in {str(out)!r} ({err.strerror or err}); free space "
                  f"there, or pass --out with another folder, and run again")
    print(f"wrote {out / 'mi_estimation.json'}")
    return report


if __name__ == "__main__":
    main()
