"""Stage 3, compile: `torch.compile(fullgraph=True)` of a training step that calls
`mira_assign_views`: graph breaks (goal 0) and equality with eager within bf16 tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastssl.gpu_check.goals import goal
from fastssl.gpu_check.report import fmt, table
from fastssl.gpu_check.runner import Context, save_json

BF16_LOSS_RTOL = 2e-2  # compiled vs eager step under bf16 autocast
BF16_TARGET_ATOL = 5e-2


def worker_compile_step(args: dict, dry_run: bool) -> dict:
    """torch.compile(fullgraph=True) of teacher forward + `mira_assign_views` + student loss.

    The step is the training step's forward half (fastssl.method.train_step's order); the
    backward runs through the compiled graph's autograd. Graph breaks come from
    torch._dynamo.explain; equality is loss, targets and gradients vs eager under bf16.
    """
    import torch

    from fastssl.losses import swapped_prediction_loss
    from fastssl.models import MiraNetwork, make_teacher
    from fastssl.ops import _cuda_ext, mira_assign_views

    out_path = Path(args["json"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if dry_run:
        b, sizes, k, hidden, dim, backend = 4, (16, 16, 8, 8), 20, 32, 16, "aot_eager"  # no codegen: CPU-cheap
    else:
        b, sizes, k, hidden, dim, backend = 32, (96, 96, 48, 48), 3000, 2048, 256, "inductor"
    torch.manual_seed(0)
    student = MiraNetwork("resnet18", hidden, dim, k).to(device).to(memory_format=torch.channels_last)
    teacher = make_teacher(student)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(b, 3, s, s, generator=g).to(device).contiguous(memory_format=torch.channels_last)
             for s in sizes]
    res: dict[str, Any] = {"device": str(device), "backend": backend, "batch": b, "crops": list(sizes), "K": k}

    def step(views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            t_logits = teacher(views[:2])
        targets = mira_assign_views(t_logits, tau=0.225, beta=0.7, num_iters=30)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            s_logits = student(views)
        return swapped_prediction_loss(s_logits, targets, 0.1), torch.stack(targets)

    t = time.perf_counter()
    explained = torch._dynamo.explain(step)(views)
    res["explain_s"] = time.perf_counter() - t
    res["graph_count"] = explained.graph_count
    res["graph_break_count"] = explained.graph_break_count
    res["break_reasons"] = [str(r)[:300] for r in explained.break_reasons[:5]]
    save_json(out_path, res)
    torch._dynamo.reset()

    def run(fn: Callable[[list[torch.Tensor]], tuple[torch.Tensor, list[torch.Tensor]]]
            ) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
        student.zero_grad(set_to_none=True)
        loss, targets = fn(views)
        loss.backward()
        return loss.item(), targets.detach().float(), [p.grad.detach().float().clone() for p in student.parameters()
                                                      if p.grad is not None]

    eager = run(step)

    def compile_and_compare(backend: str) -> tuple[dict, Any]:
        """fullgraph=True with `backend`: whether it compiles, and the compiled step against eager."""
        torch._dynamo.reset()
        compiled_fn = torch.compile(step, fullgraph=True, backend=backend)
        calls = _cuda_ext.status()["fused_calls"]
        t = time.perf_counter()
        try:
            compiled = run(compiled_fn)
        except Exception as exc:  # a graph break under fullgraph=True, or a compiler error: that is the finding
            return {"fullgraph_ok": False, "fullgraph_error": f"{type(exc).__name__}: {str(exc)[:1500]}",
                    "compile_s": time.perf_counter() - t}, None
        ge, gc = torch.cat([x.flatten() for x in eager[2]]), torch.cat([x.flatten() for x in compiled[2]])
        return {"compile_s": time.perf_counter() - t, "fullgraph_ok": True,
                "fused_calls_in_compiled": _cuda_ext.status()["fused_calls"] - calls,
                "loss_eager": eager[0], "loss_compiled": compiled[0],
                "loss_rel_diff": abs(compiled[0] - eager[0]) / max(abs(eager[0]), 1e-12),
                "targets_max_abs_diff": (compiled[1] - eager[1]).abs().max().item(),
                "grad_cosine": torch.nn.functional.cosine_similarity(ge, gc, dim=0).item(),
                "grads": len(eager[2])}, compiled_fn

    if backend != "aot_eager":  # first AOTAutograd alone (seconds): the custom op's fake kernel and autograd
        res["aot_eager"], _ = compile_and_compare("aot_eager")  # under fullgraph, kept if inductor's cold
        save_json(out_path, res)  # build (a minute or more) runs past the stage's time
    found, compiled_fn = compile_and_compare(backend)
    res.update(found)
    if compiled_fn is None:
        save_json(out_path, res)
        return res
    if cuda:  # steady-state time of one compiled vs eager forward+backward, for scale
        for name, fn in (("eager", step), ("compiled", compiled_fn)):
            for _ in range(2):
                run(fn)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(5):
                run(fn)
            torch.cuda.synchronize()
            res[f"{name}_step_ms"] = 1e3 * (time.perf_counter() - t) / 5
    res["complete"] = True
    save_json(out_path, res)
    return res


def stage_compile(ctx: Context) -> dict:
    res, cmd = ctx.worker("compile_step")
    if cmd.rc != 0:
        ctx.errors.append(f"compile worker: {'timed out' if cmd.timed_out else f'rc {cmd.rc}'}"
                          + ("" if "graph_break_count" not in res else " (after explain)"))
    if "fullgraph_ok" not in res and "aot_eager" in res:  # inductor did not finish: AOTAutograd's figures
        res = {**res, **res["aot_eager"], "backend": "aot_eager (inductor did not finish)"}
    fullgraph = res.get("fullgraph_ok")
    if fullgraph is False:
        ctx.errors.append(f"torch.compile(fullgraph=True) failed: {res.get('fullgraph_error', '?')[:300]}")
    goals = [goal("graph breaks (torch._dynamo.explain)", res.get("graph_break_count"), 0, "", False,
                  f"fullgraph=True compile succeeded: {fmt(fullgraph)}"),
             goal("loss, compiled vs eager (relative)", res.get("loss_rel_diff"), BF16_LOSS_RTOL, "", False,
                  "bf16 autocast"),
             goal("targets, compiled vs eager (max abs)", res.get("targets_max_abs_diff"), BF16_TARGET_ATOL, "",
                  False, "bf16 teacher logits / (tau (1 - beta))")]
    if ctx.cuda and not ctx.dry_run:
        goals.append(goal("fused kernel calls from the compiled step", res.get("fused_calls_in_compiled"), 1, "",
                          True, "the custom op inside the compiled graph dispatches to the fused kernel"))
    keys = ["backend", "batch", "crops", "K", "graph_count", "graph_break_count", "fullgraph_ok", "explain_s",
            "compile_s", "loss_eager", "loss_compiled", "loss_rel_diff", "targets_max_abs_diff", "grad_cosine",
            "fused_calls_in_compiled", "eager_step_ms", "compiled_step_ms"]
    summary = table(["item", "value"], [[k, res.get(k)] for k in keys if k in res])
    if res.get("break_reasons"):
        summary += ["Break reasons:", ""] + [f"- {r}" for r in res["break_reasons"]]
    return {"results": res, "goals": goals, "summary": summary}
