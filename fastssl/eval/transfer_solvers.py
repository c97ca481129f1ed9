"""The transfer protocol's L2-penalised logistic regression (fastssl/eval/transfer.py), fitted for
a whole grid of penalties; each solver returns, per penalty, the class scores of the evaluation set.

Two solvers give the same answer (tests/test_eval_transfer.py holds them to each other):
scikit-learn's lbfgs (the reference), and `batched_lbfgs`, a PyTorch L-BFGS that fits the
whole grid of penalties at once (one matrix product per step for all of them), on the GPU
for the big datasets (Food-101: 75k x 2048 features, 101 classes, 45 penalties).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fastssl.eval.errors import EvalError


def _binary_columns(targets: np.ndarray, num_classes: int) -> np.ndarray | None:
    """The 0/1 columns of the independent binary problems, or None for one multinomial one.

    Multi-label targets (N x K, VOC) give K binary problems (-1, ignored, counts as 0);
    two classes give one binary problem (scikit-learn fits one weight vector there, not two).
    """
    if targets.ndim == 2:
        return (targets > 0).astype(np.float64)
    if num_classes == 2:
        return (targets == 1).astype(np.float64)[:, None]
    return None


def _as_class_scores(raw: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Binary decision values of a two-class problem as per-class scores [0, s] (argmax = class)."""
    if targets.ndim == 1 and num_classes == 2:
        return np.concatenate([np.zeros_like(raw), raw], axis=1)
    return raw


def sklearn_scores(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, cs: Sequence[float],
                   num_classes: int, max_iter: int = 1000, tol: float = 1e-4,
                   on_fitted: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Decision scores on `x_eval` of scikit-learn's L2 logistic regression, one array per C
    (`on_fitted(1)` after each C: a progress bar).

    Warm-started along the grid (as Ericsson), which changes only how fast each fit converges.
    """
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
    except ImportError as err:
        raise EvalError("scikit-learn is not installed; pip install scikit-learn (the [all] extra), "
                        "or use --solver lbfgs") from err
    import warnings

    columns = _binary_columns(y_fit, num_classes)
    problems = [y_fit] if columns is None else [columns[:, k] for k in range(columns.shape[1])]
    models = [LogisticRegression(C=1.0, max_iter=max_iter, tol=tol, warm_start=True) for _ in problems]
    out = []
    for c in cs:
        raw = []
        for model, y in zip(models, problems):
            model.set_params(C=float(c))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x_fit, y)
            d = model.decision_function(x_eval)
            raw.append(d if d.ndim == 2 else d[:, None])
        out.append(_as_class_scores(np.concatenate(raw, axis=1), y_fit, num_classes))
        if on_fitted is not None:
            on_fitted(1)
    return out


def batched_lbfgs(objective: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, max_iter: int = 1000,
                  tol: float = 1e-4, history: int = 10, ftol: float = 64 * np.finfo(float).eps
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS on G independent problems at once: rows of `x0` (G x P); `objective` maps them
    to their G values. Returns (solutions, iterations of each).

    Why not torch.optim.LBFGS on the sum: one line search and one curvature history for
    problems whose penalties differ by 11 orders of magnitude converges as slowly as the
    worst of them. Here every problem has its own history, step (backtracking Armijo) and
    stopping rule, scipy's as scikit-learn uses it: max |gradient| <= tol, or a relative
    decrease of the value below ftol; the arithmetic is batched over problems.
    """

    def value_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            v = objective(x)
            (g,) = torch.autograd.grad(v.sum(), x)
        return v.detach(), g.detach()

    x = x0.detach().clone()
    v, g = value_grad(x)
    n_prob, dim = x.shape
    s_hist = x.new_zeros(n_prob, history, dim)
    y_hist = x.new_zeros(n_prob, history, dim)
    rho = x.new_zeros(n_prob, history)
    gamma = 1.0 / g.norm(dim=1).clamp_min(1.0)  # the first step: at most unit length
    active = g.abs().amax(1) > tol
    iters = torch.zeros(n_prob, dtype=torch.long)
    for k in range(max_iter):
        if not bool(active.any()):
            break
        q, alphas = g.clone(), []
        newest_first = [(k - 1 - j) % history for j in range(min(k, history))]
        for j in newest_first:
            a = rho[:, j] * (s_hist[:, j] * q).sum(1)
            q -= a[:, None] * y_hist[:, j]
            alphas.append(a)
        r = gamma[:, None] * q
        for j, a in zip(reversed(newest_first), reversed(alphas)):
            b = rho[:, j] * (y_hist[:, j] * r).sum(1)
            r += (a - b)[:, None] * s_hist[:, j]
        d = -r
        slope = (g * d).sum(1)
        uphill = slope >= 0  # cannot happen for a convex objective but for rounding: fall back to -g
        d[uphill] = -g[uphill] * gamma[uphill, None]
        slope = (g * d).sum(1)
        d[~active] = 0
        step = torch.ones_like(v)
        done = ~active
        x_new, v_new, g_new = x.clone(), v.clone(), g.clone()
        for _ in range(60):
            trial = x + step[:, None] * d
            vt, gt = value_grad(trial)
            ok = ~done & torch.isfinite(vt) & (vt <= v + 1e-4 * step * slope)
            x_new[ok], v_new[ok], g_new[ok] = trial[ok], vt[ok], gt[ok]
            done |= ok
            if bool(done.all()):
                break
            step = torch.where(done, step, step * 0.5)
        moved = done & active
        s, y = x_new - x, g_new - g
        sy = (s * y).sum(1)
        good = moved & (sy > 1e-10 * s.norm(dim=1) * y.norm(dim=1))
        slot = k % history
        s_hist[:, slot] = torch.where(good[:, None], s, 0.0)
        y_hist[:, slot] = torch.where(good[:, None], y, 0.0)
        rho[:, slot] = torch.where(good, 1.0 / sy.where(good, torch.ones_like(sy)), 0.0)
        gamma = torch.where(good, sy / (y * y).sum(1).clamp_min(1e-300), gamma)
        decrease = (v - v_new) / torch.maximum(torch.maximum(v.abs(), v_new.abs()), torch.ones_like(v))
        iters += active.long().cpu()
        x, v, g = x_new, v_new, g_new
        active = active & moved & (g.abs().amax(1) > tol) & (decrease > ftol)
    return x, iters


def _logistic_objective(x: torch.Tensor, y: torch.Tensor, binary: bool, l2: torch.Tensor, num_out: int
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """scikit-learn's objective divided by C * n (same minimiser, same scaled gradient that
    its tolerance applies to): mean loss + ||W||^2 / (2 C n), intercepts unpenalised. The
    parameters of problem g are the row params[g] = [W (num_out x D), b (num_out)] flattened."""
    n, dim = x.shape

    def objective(params: torch.Tensor) -> torch.Tensor:
        w = params[:, : num_out * dim].view(-1, num_out, dim)
        b = params[:, num_out * dim :]
        logits = torch.einsum("nd,gkd->gnk", x, w) + b[:, None, :]
        if binary:
            data = F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none").sum(2).mean(1)
        else:
            data = F.cross_entropy(logits.transpose(1, 2), y.expand(logits.shape[0], n), reduction="none").mean(1)
        return data + 0.5 * l2 * (w * w).sum((1, 2))

    return objective


def lbfgs_scores(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, cs: Sequence[float], num_classes: int,
                 max_iter: int = 1000, tol: float = 1e-4, device: torch.device | str = "cpu",
                 memory_bytes: float = 2e9, on_fitted: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """`sklearn_scores` computed by `batched_lbfgs` in float64 on `device`: the grid of C is
    fitted in chunks of as many problems as fit in about `memory_bytes` of logits and grads
    (`on_fitted(n)` after each chunk of n)."""
    device = torch.device(device)
    columns = _binary_columns(y_fit, num_classes)
    binary = columns is not None
    num_out = columns.shape[1] if binary else num_classes
    x = torch.as_tensor(x_fit, dtype=torch.float64, device=device)
    y = (torch.as_tensor(columns, dtype=torch.float64, device=device) if binary
         else torch.as_tensor(y_fit, dtype=torch.long, device=device))
    xe = torch.as_tensor(x_eval, dtype=torch.float64, device=device)
    n, dim = x.shape
    per_problem = 8 * 6 * n * num_out  # logits, probabilities and their grads, float64
    chunk = max(1, min(len(cs), int(memory_bytes // per_problem)))
    out: list[np.ndarray] = []
    for start in range(0, len(cs), chunk):
        part = torch.tensor([1.0 / (float(c) * n) for c in cs[start : start + chunk]], dtype=torch.float64,
                            device=device)
        objective = _logistic_objective(x, y, binary, part, num_out)
        params, _ = batched_lbfgs(objective, x.new_zeros(len(part), num_out * (dim + 1)), max_iter, tol)
        w = params[:, : num_out * dim].view(-1, num_out, dim)
        raw = torch.einsum("nd,gkd->gnk", xe, w) + params[:, num_out * dim :][:, None, :]
        out.extend(_as_class_scores(r, y_fit, num_classes) for r in raw.cpu().numpy())
        if on_fitted is not None:
            on_fitted(len(part))
    return out


def fit_scores(solver: str, *args: Any, device: torch.device | str = "cpu", **kwargs: Any) -> list[np.ndarray]:
    """Decision scores per C of the chosen solver ("sklearn" or "lbfgs")."""
    if solver == "sklearn":
        return sklearn_scores(*args, **kwargs)
    if solver == "lbfgs":
        return lbfgs_scores(*args, device=device, **kwargs)
    raise ValueError(f"unknown solver {solver!r}")
