"""Estimating a known mutual information with CPC and ML-CPC critics (Song & Ermon, Fig. 3).

The library half of tools/mi_estimation.py (the command line). The true MI is known by
construction, so the estimators' bias and ceilings show directly:

- data: `sample` draws DIM-dimensional Gaussians x, y with y_k = rho x_k + sqrt(1 - rho^2) e_k,
  so that I(X; Y) = -DIM/2 log(1 - rho^2) (`rho_for` inverts it); the MI steps through MI_LEVELS;
- critics: `SeparableCritics` (f(x) . g(y)) and `JointCritics` (an MLP on the pair), each an
  ensemble of E independent critics evaluated as batched matmuls (`EnsembleLinear`), so that
  all estimators of one family cost one forward/backward per iteration;
- estimators: CPC (Eq. 4) and ML-CPC (Eq. 6) at each alpha in ALPHAS (`estimators`), every
  one on its own critic and its own bound (`bounds_of`; the bounds are fastssl.losses');
- `run_family` trains one family on the stepped MI; `summarise` and `smooth` reduce its
  per-iteration estimates to the paper's table and curves; `plot` draws them (matplotlib,
  imported only there).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastssl.losses import alpha_min, cpc_bound, ml_cpc_bound

__all__ = [
    "ALPHAS", "DIM", "LR", "MI_LEVELS", "EnsembleLinear", "JointCritics", "SeparableCritics", "bounds_of",
    "ensemble_mlp", "estimators", "plot", "rho_for", "run_family", "sample", "smooth", "summarise",
]

DIM = 20  # the paper's data dimension
MI_LEVELS = (2.0, 4.0, 6.0, 8.0, 10.0)  # the true MI, in nats, one level after the other
ALPHAS = ("1", "0.1", "0.01", "alpha_min")  # as they appear in the estimators' names
SEPARABLE_LAYERS = 2  # hidden layers of f and g (the authors' likely 3: `mlp(..., layers=2)` has layers + 1)
LR = 5e-4  # Adam's learning rate, the paper's
FAMILIES = ("separable", "joint")  # the critic families of the paper's Figure 2

# (name, bound, alpha): the name is the result's key ("ml_cpc alpha=0.1"), bound "cpc" or "ml_cpc".
Spec = tuple[str, str, float]


def rho_for(mi: float, dim: int = DIM) -> float:
    """Per-dimension correlation giving I(X; Y) = -dim/2 log(1 - rho^2) = mi."""
    return math.sqrt(1.0 - math.exp(-2.0 * mi / dim))


def sample(n: int, mi: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n pairs (x_i, y_i), each n x DIM, whose true MI is `mi` nats: y = rho x + sqrt(1 - rho^2) e.

    Drawn from `g` alone (x first, then the noise), so a seed fixes the whole data stream.
    """
    rho = rho_for(mi)
    x = torch.randn(n, DIM, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, DIM, generator=g)
    return x, y


class EnsembleLinear(nn.Module):
    """E independent Linear layers applied as one batched matmul (E x ... x in -> E x ... x out).

    One baddbmm for all E critics instead of E small matmuls: the ensemble trains at the
    cost of one network. Initialised as nn.Linear (uniform in +-1/sqrt(in)).
    """

    def __init__(self, ensemble: int, d_in: int, d_out: int):
        super().__init__()
        bound = 1 / math.sqrt(d_in)
        self.weight = nn.Parameter(torch.empty(ensemble, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(ensemble, 1, d_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def ensemble_mlp(ensemble: int, d_in: int, hidden: int, d_out: int, layers: int) -> nn.Sequential:
    """E independent MLPs: `layers` hidden layers of `hidden` units (ReLU), then a linear output."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [EnsembleLinear(ensemble, d_in if i == 0 else hidden, hidden), nn.ReLU()]
    mods.append(EnsembleLinear(ensemble, hidden, d_out))
    return nn.Sequential(*mods)


class SeparableCritics(nn.Module):
    """E separable critics: scores[e, i, j] = f_e(x_i) . g_e(y_j).

    f and g have two hidden layers of 256 and a 32-dim output (the authors' `mlp(..., layers)`
    has layers + 1 hidden layers, and the notebook that sets `layers` is not in their
    repository: likely 2, i.e. three hidden layers).
    """

    def __init__(self, ensemble: int, hidden: int = 256, embed: int = 32, layers: int = SEPARABLE_LAYERS):
        super().__init__()
        self.ensemble = ensemble
        self.f = ensemble_mlp(ensemble, DIM, hidden, embed, layers=layers)
        self.g = ensemble_mlp(ensemble, DIM, hidden, embed, layers=layers)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self.f(x.expand(self.ensemble, -1, -1))
        gy = self.g(y.expand(self.ensemble, -1, -1))
        return torch.bmm(fx, gy.transpose(1, 2))


class JointCritics(nn.Module):
    """E joint critics: scores[e, i, j] = w_e . relu(A_e x_i + B_e y_j + b_e), for all pairs (no output bias:
    every bound is unchanged when all scores shift together).

    The first layer of an MLP on [x; y] splits into an x part and a y part, so it costs
    two small matmuls; the hidden layer over all n x n pairs is the real work. One hidden
    layer of 256 (not the separable critics' depth) keeps the whole experiment within
    15 minutes on 2 CPU cores.
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


def estimators(n: int, m: int, alphas: Sequence[str] = ALPHAS) -> list[Spec]:
    """(name, bound, alpha) for every estimator of the figure: CPC (Eq. 4) then ML-CPC (Eq. 6),
    each at every alpha of `alphas` (numbers as text, or "alpha_min": alpha_{m,n}, Theorem 2)."""
    out = []
    for bound in ("cpc", "ml_cpc"):
        for a in alphas:
            alpha = alpha_min(n, m) if a == "alpha_min" else float(a)
            out.append((f"{bound} alpha={a}", bound, alpha))
    return out


_OFF_DIAGONAL: dict[int, torch.Tensor] = {}


def _off_diagonal(n: int) -> torch.Tensor:
    """Flat indices of the off-diagonal entries of an n x n matrix, row by row (cached)."""
    if n not in _OFF_DIAGONAL:
        _OFF_DIAGONAL[n] = (~torch.eye(n, dtype=torch.bool)).reshape(-1).nonzero().squeeze(1)
    return _OFF_DIAGONAL[n]


def bounds_of(scores: torch.Tensor, specs: list[Spec]) -> torch.Tensor:
    """E estimates from E score matrices (n x n: diagonal = positives).

    Row i of a score matrix pairs x_i with every y_j: its diagonal entry is the positive,
    the other n - 1 its negatives (m = n), the layout fastssl.losses' bounds take.
    """
    n = scores.shape[1]
    off = _off_diagonal(n)
    values = []
    for e, (_, bound, alpha) in enumerate(specs):
        s = scores[e]
        pos, neg = s.diagonal(), s.reshape(-1)[off].view(n, n - 1)
        values.append((cpc_bound if bound == "cpc" else ml_cpc_bound)(pos, neg, alpha))
    return torch.stack(values)


def run_family(family: str, iters_per_level: int, n: int, seed: int, compile_critics: bool,
               on_level: Callable[[float, float], None] | None = None, alphas: Sequence[str] = ALPHAS,
               separable_layers: int = SEPARABLE_LAYERS) -> dict[str, Any]:
    """Train every estimator of one critic family ("separable" or "joint") through MI_LEVELS.

    All estimators see the same data (n pairs an iteration, m = n) and each maximises its own
    bound on its own parameters, so one summed backward trains them all. `on_level(mi, seconds)`
    is called when a level is done (seconds since the start), for progress output.

    Returns {"estimates": {name: one value per iteration}, "true_mi": one value per iteration,
    "seconds": the training time, "alphas": {name: alpha}}.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown critic family {family!r}; choose {' or '.join(FAMILIES)}")
    specs = estimators(n, n, alphas)
    torch.manual_seed(seed)  # the critics' initial weights: `seed` makes a run repeatable, not only its data
    critics = (SeparableCritics(len(specs), layers=separable_layers) if family == "separable"
               else JointCritics(len(specs)))
    opt = torch.optim.Adam(critics.parameters(), lr=LR, foreach=True)
    forward = torch.compile(critics) if compile_critics else critics
    g = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {name: [] for name, _, _ in specs}
    truth: list[float] = []
    start = time.perf_counter()
    for mi in MI_LEVELS:
        for _ in range(iters_per_level):
            x, y = sample(n, mi, g)
            est = bounds_of(forward(x, y), specs)
            opt.zero_grad(set_to_none=True)
            (-est.sum()).backward()  # each estimator maximises its own bound (independent parameters)
            opt.step()
            for (name, _, _), v in zip(specs, est.detach().tolist()):
                history[name].append(v)
            truth.append(mi)
        if on_level is not None:
            on_level(mi, time.perf_counter() - start)
    return {"estimates": history, "true_mi": truth, "seconds": time.perf_counter() - start,
            "alphas": {name: alpha for name, _, alpha in specs}}


def summarise(result: dict[str, Any], iters_per_level: int) -> dict[str, dict[str, float]]:
    """Per estimator and MI level: the mean estimate over the second half of the level
    (the first half is the critic catching up with the new MI)."""
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


def plot(results: dict[str, dict[str, Any]], path: Path, n: int) -> None:
    """One panel per family and estimator: raw (grey) and smoothed (blue) estimates, the true MI
    (black) and the log m ceiling of CPC at alpha = 1 (dashed). Imports matplotlib here, so that
    the rest of the module works without it (ImportError when it is missing)."""
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
    try:
        fig.savefig(path, dpi=90)
    finally:
        plt.close(fig)  # a library function called repeatedly must not keep every figure open
