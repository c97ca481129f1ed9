"""SGD/LARS parameter groups: BN and bias get neither weight decay nor LARS adaptation."""

import io

import pytest
import torch
from conftest import load_tool
from torch import nn

from fastssl.models import MiraNetwork
from fastssl.optim import LARS, build_optimizer, is_excluded, param_groups


def test_groups_split_bn_and_bias():
    net = MiraNetwork("resnet18", 32, 16, 10)
    groups = param_groups(net.named_parameters(), weight_decay=1e-4)
    regular, excluded = (set(map(id, g["params"])) for g in groups)
    for name, p in net.named_parameters():
        is_bn_or_bias = p.ndim == 1
        assert (id(p) in excluded) == is_bn_or_bias, name
        assert (id(p) in regular) == (not is_bn_or_bias), name
    assert groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"]
    assert groups[0]["weight_decay"] == 1e-4 and not groups[0]["lars_exclude"]
    assert is_excluded("projector.6.bias", nn.Parameter(torch.zeros(3)))


def reference_lars_step(w, g, buf, lr, wd, eta, momentum, exclude):
    """Float64 hand computation of one LARS step."""
    w, g = w.double(), g.double()
    d = g + wd * w
    if not exclude:
        trust = eta * w.norm() / d.norm()
        d = d * trust
    buf = d if buf is None else momentum * buf + d
    return w - lr * buf, buf


def test_lars_matches_hand_computation_and_skips_excluded():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(8, 5, dtype=torch.float64))
    bias = nn.Parameter(torch.randn(8, dtype=torch.float64))
    opt = LARS([{"params": [weight], "weight_decay": 1e-2, "lars_exclude": False},
                {"params": [bias], "weight_decay": 0.0, "lars_exclude": True}], lr=0.5, momentum=0.9, eta=0.02)
    bufs = {"w": None, "b": None}
    w_ref, b_ref = weight.detach().clone(), bias.detach().clone()
    for _ in range(3):
        gw, gb = torch.randn_like(weight), torch.randn_like(bias)
        weight.grad, bias.grad = gw.clone(), gb.clone()
        opt.step()
        w_ref, bufs["w"] = reference_lars_step(w_ref, gw, bufs["w"], 0.5, 1e-2, 0.02, 0.9, False)
        b_ref, bufs["b"] = reference_lars_step(b_ref, gb, bufs["b"], 0.5, 0.0, 0.02, 0.9, True)
        torch.testing.assert_close(weight.detach(), w_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bias.detach(), b_ref, rtol=1e-12, atol=1e-12)


def test_sgd_excluded_params_get_no_weight_decay():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = build_optimizer("sgd", net.named_parameters(), lr=1.0, momentum=0.0, weight_decay=0.5, lars_eta=0.001)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(net.named_parameters())
    # zero gradient: only weight decay moves a parameter
    torch.testing.assert_close(after["0.weight"].detach(), before["0.weight"] * 0.5)
    for name in ("0.bias", "1.weight", "1.bias"):
        torch.testing.assert_close(after[name].detach(), before[name])


@pytest.mark.parametrize("decay_bn_bias", [False, True])
@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_build_optimizer_matches_a_hand_loop(name, decay_bn_bias):
    """build_optimizer's SGD / LARS vs the float64 hand loop above over 2 steps of fixed gradients (the
    second step is where momentum shows): heavy-ball momentum 0.9 (not Nesterov), the LARS eta and weight
    decay given, BN and bias without LARS scaling and decayed only with `decay_bn_bias`. SGD is the
    loop's excluded (no trust ratio) step for every parameter."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).double()
    lr, momentum, wd, eta = 0.5, 0.9, 0.1, 0.02  # eta and wd far from the defaults (0.001, 1e-4)
    opt = build_optimizer(name, net.named_parameters(), lr=lr, momentum=momentum, weight_decay=wd, lars_eta=eta,
                          decay_bn_bias=decay_bn_bias)
    ref = {n: (p.detach().clone(), None) for n, p in net.named_parameters()}
    for _ in range(2):
        grads = {n: torch.randn_like(p) for n, p in net.named_parameters()}
        for n, p in net.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        for n, (w, buf) in ref.items():
            bn_or_bias = n != "0.weight"
            ref[n] = reference_lars_step(w, grads[n], buf, lr, wd if decay_bn_bias or not bn_or_bias else 0.0, eta,
                                         momentum, exclude=bn_or_bias or name == "sgd")
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n][0], rtol=1e-12, atol=1e-12, msg=n)


def lars_test_params() -> list[dict]:
    """Groups that reach every branch of a LARS step: LARS-adapted and decayed (a float64 weight, an
    all-zero weight (trust 1), a weight never given a gradient, one given its first gradient only at
    step 1 (its buffer made late), and a float32 weight in the same group), LARS-adapted without decay
    (a zero gradient: trust 1), excluded without decay (bias) and excluded with decay (BN scale)."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    return [
        {"params": {"w": torch.randn(8, 5, **f64), "zero": torch.zeros(4, 3, **f64), "never": torch.randn(3, 3, **f64),
                    "late": torch.randn(5, 2, **f64), "w32": torch.randn(6, 2)}, "weight_decay": 1e-2},
        {"params": {"stuck": torch.randn(4, 4, **f64), "w2": torch.randn(2, 7, **f64)}, "weight_decay": 0.0},
        {"params": {"bias": torch.randn(8, **f64)}, "weight_decay": 0.0, "lars_exclude": True},
        {"params": {"bn": torch.randn(8, **f64)}, "weight_decay": 1e-2, "lars_exclude": True},
    ]


def build_lars(cls: type, spec: list[dict]) -> tuple[torch.optim.Optimizer, dict[str, nn.Parameter]]:
    """`cls` over fresh parameters copied from `spec`, and those parameters by name."""
    named = {n: nn.Parameter(t.clone()) for g in spec for n, t in g["params"].items()}
    groups = [{**g, "params": [named[n] for n in g["params"]]} for g in spec]
    return cls(groups, lr=0.5, momentum=0.9, eta=0.02), named


def set_lars_grads(named: dict[str, nn.Parameter], grads: dict[str, torch.Tensor | None]) -> None:
    """Copies, so that one optimiser's step cannot touch the other's gradients."""
    for n, p in named.items():
        p.grad = None if grads[n] is None else grads[n].clone()


def lars_grads(named: dict[str, nn.Parameter], step: int) -> dict[str, torch.Tensor | None]:
    """Random gradients, but none for `never` (nor for `late` at step 0) and zeros for `stuck`."""
    grads = {n: torch.randn_like(p) for n, p in named.items()}
    grads["never"] = None
    grads["stuck"] = torch.zeros_like(named["stuck"])
    if step == 0:
        grads["late"] = None
    return grads


def lars_tolerance(dtype: torch.dtype) -> dict:
    """1e-12 in float64; float32 to its rounding (the fused buf += trust * d rounds once where the
    per-parameter loop rounded trust * d first)."""
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)


def test_foreach_lars_equals_the_per_parameter_definition():
    """The foreach step against the per-parameter loop it replaced (tools/bench_optim.py keeps it),
    over 4 steps with the lr changed between steps as a schedule does: every parameter and momentum
    buffer equal (`lars_tolerance`), the same state keys."""
    spec = lars_test_params()
    new, new_p = build_lars(LARS, spec)
    old, old_p = build_lars(load_tool("bench_optim").PerParameterLARS, spec)
    for step in range(4):
        grads = lars_grads(new_p, step)
        for opt, named in ((new, new_p), (old, old_p)):
            for g in opt.param_groups:
                g["lr"] = 0.5 / (step + 1)
            set_lars_grads(named, grads)
            opt.step()
        for n, p in new_p.items():
            tol = lars_tolerance(p.dtype)
            torch.testing.assert_close(p.detach(), old_p[n].detach(), **tol, msg=n)
            assert new.state[p].keys() == old.state[old_p[n]].keys(), n
            if new.state[p]:
                torch.testing.assert_close(new.state[p]["momentum_buffer"], old.state[old_p[n]]["momentum_buffer"],
                                           **tol, msg=n)
    assert not new.state[new_p["never"]] and torch.equal(new_p["never"].detach(), spec[0]["params"]["never"])
    assert not torch.equal(new_p["zero"].detach(), torch.zeros(4, 3, dtype=torch.float64))  # trust 1: it moved


def test_a_per_parameter_checkpoint_resumes_in_the_foreach_lars():
    """A state_dict saved by the per-parameter LARS loads into the foreach one and the next step
    matches: the state layout (`momentum_buffer` per parameter) is unchanged."""
    spec = lars_test_params()
    old, old_p = build_lars(load_tool("bench_optim").PerParameterLARS, spec)
    set_lars_grads(old_p, lars_grads(old_p, 1))
    old.step()
    new, new_p = build_lars(LARS, [{**g, "params": {n: old_p[n].detach() for n in g["params"]}} for g in spec])
    checkpoint = io.BytesIO()
    torch.save(old.state_dict(), checkpoint)
    checkpoint.seek(0)
    new.load_state_dict(torch.load(checkpoint))
    grads = lars_grads(old_p, 1)
    for opt, named in ((new, new_p), (old, old_p)):
        set_lars_grads(named, grads)
        opt.step()
    for n, p in new_p.items():
        torch.testing.assert_close(p.detach(), old_p[n].detach(), **lars_tolerance(p.dtype), msg=n)


def lars_step_ops(n: int) -> list[str]:
    """The aten ops of one steady-state LARS step (momentum buffers already made) over n weights
    (decayed, LARS-adapted) and n biases (excluded)."""
    torch.manual_seed(0)
    weights = [nn.Parameter(torch.randn(3 + i % 4, 5)) for i in range(n)]
    biases = [nn.Parameter(torch.randn(3 + i % 4)) for i in range(n)]
    opt = LARS([{"params": weights, "weight_decay": 1e-4}, {"params": biases, "lars_exclude": True}], lr=0.1)
    for p in weights + biases:
        p.grad = torch.randn_like(p)
    opt.step()
    with load_tool("bench_optim").OpCounter() as counter:
        opt.step()
    return counter.ops


def test_lars_step_op_count_does_not_grow_with_the_parameter_count():
    """Multi-tensor ops: 10 and 100 parameters per group dispatch the same ops. None of them is
    `_local_scalar_dense`, the op behind `.item()` or a Python `if` on a tensor: no host-device sync."""
    ops10, ops100 = lars_step_ops(10), lars_step_ops(100)
    assert len(ops10) == len(ops100), (len(ops10), len(ops100))
    assert ops10 == ops100
    assert not any("_local_scalar_dense" in op for op in ops10), ops10


def test_lars_refuses_sparse_gradients():
    p = nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="LARS does not support sparse gradients"):
        LARS([p], lr=0.1).step()


def test_lars_step_returns_the_closure_loss_with_grad_enabled():
    p = nn.Parameter(torch.ones(2, 2))

    def closure() -> torch.Tensor:
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert LARS([p], lr=0.1).step(closure).item() == 4.0
    assert p.grad is not None


def test_bench_optim_runs_and_counts_the_ops_of_both_steps(tmp_path):
    """tools/bench_optim.py on one-element ResNet-18 parameters: a few rounds, JSON written, and the
    foreach step dispatching a small fraction of the per-parameter loop's ops."""
    bench = load_tool("bench_optim")
    result = bench.main(["--arch", "resnet18", "--tiny", "--rounds", "2", "--warmup", "1",
                         "--json", str(tmp_path / "optim.json")])
    ops = result["aten_ops_per_step"]
    assert result["params"] == 62 and ops["per_parameter"] > 7 * 20 and ops["foreach"] * 5 < ops["per_parameter"]
    assert (tmp_path / "optim.json").exists() and result["median_ms"]["foreach"] > 0


def cuda_kernels_per_step(opt: torch.optim.Optimizer) -> int:
    """CUDA kernels one `opt.step()` launches, counted by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")
def test_foreach_lars_on_cuda_never_synchronises_and_equals_the_per_parameter_loop():
    """The GPU route the batch-4096 recipe takes: every branch's parameters on CUDA, no host-device wait in
    a step (the trust ratios stay on the device), and the per-parameter loop's result to float64 rounding."""
    spec = [{**g, "params": {n: t.cuda() for n, t in g["params"].items()}} for g in lars_test_params()]
    new, new_p = build_lars(LARS, spec)
    old, old_p = build_lars(load_tool("bench_optim").PerParameterLARS, spec)
    for step in range(3):
        grads = lars_grads(new_p, step)
        set_lars_grads(old_p, grads)
        old.step()
        set_lars_grads(new_p, grads)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            new.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for n in new_p:
        torch.testing.assert_close(new_p[n], old_p[n], **lars_tolerance(new_p[n].dtype), msg=n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")
def test_foreach_lars_on_cuda_launches_a_fraction_of_the_loops_kernels():
    """ResNet-18's 62 parameters in fastssl's groups: the per-parameter loop launches ~7 kernels per
    parameter, the foreach step a few per group (even if a foreach op fell back to one kernel per tensor,
    it would stay under a third of the loop's)."""
    import torchvision

    bench = load_tool("bench_optim")
    counts = {}
    for name, cls in (("foreach", LARS), ("per_parameter", bench.PerParameterLARS)):
        torch.manual_seed(0)
        net = torchvision.models.resnet18().cuda()
        opt = cls(param_groups(net.named_parameters(), 1e-6, False), lr=0.1, momentum=0.9)
        for p in net.parameters():
            p.grad = torch.randn_like(p)
        opt.step()  # momentum buffers made
        counts[name] = cuda_kernels_per_step(opt)
    assert 3 * counts["foreach"] < counts["per_parameter"], counts
