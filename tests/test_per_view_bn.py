"""Per-view BatchNorm: one forward per resolution computes what the authors' one forward per view does.

Reference: a network with plain BatchNorm and the same weights, given each view ALONE
(MIRA's train.py: 8 student forwards, 2 teacher forwards). Compared in float32 to 1e-5:
outputs, running statistics, the swapped-prediction loss and every gradient; in one
process and across 2 real gloo processes, where a view's statistics are over the global
batch (that view's rows on both processes).
"""

from __future__ import annotations

import copy

import pytest
import torch
from dist_utils import DEVICES, on_device, requires_gloo, run_distributed

from fastssl.losses import swapped_prediction_loss
from fastssl.models import MiraNetwork
from fastssl.models.per_view_bn import PerViewBatchNorm1d, PerViewBatchNorm2d, combine_view_stats, set_rows_per_view

TOL = dict(rtol=1e-5, atol=1e-5)


def make_views(batch: int, seed: int = 0, shift: float = 1.0) -> list[torch.Tensor]:
    """2 global + 3 local views whose statistics differ from view to view (so pooling them shows)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [32, 32, 16, 16, 16]
    return [torch.randn(batch, 3, s, s, generator=g) * (1 + 0.5 * i) + shift * i for i, s in enumerate(sizes)]


def twin_networks(seed: int = 0) -> tuple[MiraNetwork, MiraNetwork]:
    """(per-view network, plain-BN network) with identical weights."""
    torch.manual_seed(seed)
    per_view = MiraNetwork("resnet18", 64, 16, 12, bn_stats="per_view")
    with torch.no_grad():  # non-trivial BN affine parameters (zero-init residual starts some at 0)
        for m in per_view.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    plain = MiraNetwork("resnet18", 64, 16, 12, bn_stats="per_forward")
    plain.load_state_dict(per_view.state_dict())
    return per_view, plain


def per_view_reference(plain: MiraNetwork, views: list[torch.Tensor]):
    """The authors' way: every view through the network on its own."""
    logits, zs = [], []
    for v in views:
        (lg,), (z,) = plain([v], with_embeddings=True)
        logits.append(lg)
        zs.append(z)
    return logits, zs


def loss_of(logits: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    return swapped_prediction_loss(logits, targets, 0.1)


def test_every_batchnorm_is_per_view_and_keys_unchanged():
    per_view, plain = twin_networks()
    bns = [m for m in per_view.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, (PerViewBatchNorm1d, PerViewBatchNorm2d)) for m in bns)
    assert list(per_view.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, batch, tol", [(torch.float32, 16, 1e-5), (torch.float64, 6, 1e-10)])
def test_batched_forward_equals_separate_per_view_forwards(dtype, batch, tol, device):
    """float32 to 1e-5 (plain BatchNorm's own float32 error here is ~7e-6); float64 shows the
    formula is exact rather than close. On a GPU the views go through `_PerViewNorm`'s CUDA kernels and the
    reference through cuDNN's: float32 to 5e-5 there (two float32 kernels, each ~1e-6, through 20 layers)."""
    on = on_device(device)
    tol = 5e-5 if device == "cuda" and dtype == torch.float32 else tol
    per_view, plain = (net.to(dtype).to(on) for net in twin_networks())
    views = [v.to(dtype).to(on) for v in make_views(batch)]
    logits, zs = per_view(views, with_embeddings=True)
    ref_logits, ref_zs = per_view_reference(plain, views)
    for a, b in zip(logits + zs, ref_logits + ref_zs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # running statistics: one momentum update per view, in view order, as 5 separate forwards
    ref_state = plain.state_dict()
    for key, value in per_view.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], rtol=tol, atol=tol, msg=key)
    assert int(per_view.backbone.bn1.num_batches_tracked) == len(views)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_loss_and_gradients_equal_a_per_view_step(dtype, tol, device):
    """Gradients compared relative to each parameter's largest gradient entry."""
    on = on_device(device)
    per_view, plain = (net.to(dtype).to(on) for net in twin_networks(1))
    views = [v.to(dtype).to(on) for v in make_views(16, seed=1)]
    targets = [torch.softmax(torch.randn(16, 12, dtype=dtype), 1).to(on) for _ in range(2)]
    loss = loss_of(per_view(views), targets)
    ref_loss = loss_of(per_view_reference(plain, views)[0], targets)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol)
    ref_params = dict(plain.named_parameters())
    for name, p in per_view.named_parameters():
        ref = ref_params[name].grad
        assert (p.grad - ref).abs().max() <= tol * ref.abs().max() + 1e-30, name


def test_per_forward_switch_keeps_views_pooled():
    """--model.bn_stats per_forward: all views of a forward share statistics (the previous
    behaviour), which visibly differs from per-view forwards on views of unequal statistics."""
    per_view, plain = twin_networks()
    views = make_views(6)
    pooled = plain(views)
    per_view_out = per_view(views)
    assert max((a - b).abs().max().item() for a, b in zip(pooled, per_view_out)) > 1e-2


def test_eval_mode_uses_running_statistics_for_any_batch():
    per_view, plain = twin_networks()
    per_view(make_views(4))  # give the running statistics something to hold
    plain.load_state_dict(per_view.state_dict())
    per_view.eval()
    plain.eval()
    x = torch.randn(7, 3, 32, 32)  # not a multiple of the last rows-per-view
    with torch.no_grad():
        torch.testing.assert_close(per_view.backbone(x), plain.backbone(x), **TOL)


def test_uneven_batch_is_refused():
    bn = PerViewBatchNorm1d(4)
    bn.rows_per_view = 3
    with pytest.raises(ValueError, match="not a whole number of views"):
        bn(torch.randn(7, 4))


def test_channels_last_and_bf16_autocast():
    """channels_last in and out: in float32, as close to the float64 answer as plain BatchNorm's per-view
    forwards are (its convolutions are other kernels, so not bit-equal: which ones depends on the CPU's
    instruction set); under bf16 autocast the logits (cosines, computed in float32) are no further from
    the float32 answer than plain BatchNorm's per-view forwards are."""
    per_view, plain = twin_networks()
    per_view = per_view.to(memory_format=torch.channels_last)
    views = make_views(16)
    last = [v.contiguous(memory_format=torch.channels_last) for v in views]
    ref = per_view_reference(plain, views)[0]
    ref64 = per_view_reference(copy.deepcopy(plain).double(), [v.double() for v in views])[0]
    ours = per_view(last)
    fp32_err = max((b.double() - c).abs().max().item() for b, c in zip(ref, ref64))
    ours_err = max((a.double() - c).abs().max().item() for a, c in zip(ours, ref64))
    assert ours_err <= 2 * fp32_err + 1e-6, (ours_err, fp32_err)
    feats = per_view.backbone(last[0])
    assert feats.shape == (16, 512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = per_view(last)
        plain_bf16 = per_view_reference(plain, views)[0]
    ours_err = max((a.float() - b).abs().max().item() for a, b in zip(ours, ref))
    plain_err = max((a.float() - b).abs().max().item() for a, b in zip(plain_bf16, ref))
    assert all(a.dtype == torch.float32 for a in ours)
    assert ours_err <= 2 * plain_err + 0.01, (ours_err, plain_err)


def _kernels_cases():
    from fastssl.models.per_view_bn import CUDA_KERNELS, PYTHON_KERNELS

    gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    return [pytest.param(PYTHON_KERNELS, "cpu", id="python-cpu"),
            pytest.param(PYTHON_KERNELS, "cuda", id="python-cuda", marks=gpu),
            pytest.param(CUDA_KERNELS, "cuda", id="cuda", marks=gpu)]


@pytest.mark.parametrize("kernels, device", _kernels_cases())
@pytest.mark.parametrize("dtype, memory_format", [(torch.float64, torch.contiguous_format),
                                                  (torch.bfloat16, torch.channels_last)])
def test_per_view_function_equals_batchnorm_on_each_view(kernels, device, dtype, memory_format):
    """`_PerViewNorm` (the GPU's and the distributed route) on one process against float64 BatchNorm
    given each view alone: output, running statistics (one update per view, in order) and the
    gradients of input, weight and bias. float64 to 1e-10; bf16 input (the training dtype) to its
    rounding: the output is stored in bf16, everything else is float32 or better."""
    import torch.nn.functional as F

    from fastssl.models.per_view_bn import _PerViewNorm

    g = torch.Generator().manual_seed(7)
    views, rows, c = 3, 5, 4
    x = torch.cat([torch.randn(rows, c, 6, 6, generator=g) * (1 + v) + 3 * v for v in range(views)])
    weight, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.2
    running = (torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5)
    upstream = torch.randn(x.shape, generator=g)
    x = x.to(dtype).to(memory_format=memory_format)

    def step(x, weight, bias, running_mean, running_var, per_view):
        x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
        y = per_view(x, weight, bias, running_mean, running_var)
        (y.double() * upstream.to(y.device)).sum().backward()
        return y, x.grad, weight.grad, bias.grad

    ref_running = [r.double().clone() for r in running]
    ref = step(x.double(), weight.double(), bias.double(), *ref_running, lambda x, w, b, m, v: torch.cat(
        [F.batch_norm(view, m, v, w, b, training=True, momentum=0.1, eps=1e-5) for view in x.split(rows)]))
    on, params = torch.device(device), torch.promote_types(dtype, torch.float32)  # as the module's under autocast
    ours_running = [r.to(on, params).clone() for r in running]
    ours = step(x.to(on), weight.to(on, params), bias.to(on, params), *ours_running,
                lambda x, w, b, m, v: _PerViewNorm.apply(
        x, w, b, m, v, [0.1] * views, 1e-5, rows, None, kernels))
    y = ours[0]
    assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format)
    tol = 1e-10 if dtype == torch.float64 else 2 ** -8  # bf16 keeps 8 significant bits
    for name, got, want in zip(["output", "input grad", "weight grad", "bias grad"], ours, ref):
        scale = want.abs().max().item()
        assert (got.double().cpu() - want).abs().max().item() <= tol * scale, name
    for got, want in zip(ours_running, ref_running):
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-10 if dtype == torch.float64 else 1e-5, atol=1e-6)


def test_cuda_kernels_only_for_modules_they_take():
    """SyncBatchNorm's CUDA kernels read the counts in the running statistics' dtype and the weight in the
    statistics' dtype: float32 modules under bf16 activations, and float64 ones, yes; a module cast to bf16
    (counts above 256 are not bf16 numbers) or without running statistics, their PyTorch definitions."""
    bn = PerViewBatchNorm2d(4)
    assert bn._cuda_dtypes_fit(torch.zeros(2, 4, 3, 3, dtype=torch.bfloat16), track=True)
    assert bn.double()._cuda_dtypes_fit(torch.zeros(2, 4, 3, 3, dtype=torch.float64), track=True)
    assert not bn.to(torch.bfloat16)._cuda_dtypes_fit(torch.zeros(2, 4, 3, 3, dtype=torch.bfloat16), track=True)
    assert not PerViewBatchNorm2d(4)._cuda_dtypes_fit(torch.zeros(2, 4, 3, 3), track=False)


def test_chan_combination_equals_pooled_statistics():
    x = torch.randn(3, 40, 5, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.5]).view(3, 1, 1) + 7
    parts = [x[:, :13], x[:, 13:]]  # two "processes" with unequal rows
    count = torch.tensor([[13.0] * 3, [27.0] * 3], dtype=torch.float64)
    mean = torch.stack([p.mean(1) for p in parts])
    var = torch.stack([p.var(1, correction=0) for p in parts])
    total, pooled_mean, pooled_var = combine_view_stats(count, mean, var)
    torch.testing.assert_close(total, torch.full((3,), 40.0, dtype=torch.float64))
    torch.testing.assert_close(pooled_mean, x.mean(1))
    torch.testing.assert_close(pooled_var, x.var(1, correction=0))


# ----------------------------------------------------------------------------- two processes


def _distributed_step(rank: int, world_size: int, views: list[torch.Tensor], targets: list[torch.Tensor],
                      device: str):
    import torch.distributed as dist

    on = on_device(device)
    per_view = twin_networks(2)[0].double().to(on)
    views, targets = [v.to(on) for v in views], [t.to(on) for t in targets]
    calls = {"all_gather": 0}
    real_all_gather = dist.all_gather

    def counting_all_gather(*args, **kwargs):
        calls["all_gather"] += 1
        return real_all_gather(*args, **kwargs)

    dist.all_gather = counting_all_gather
    try:
        rows = slice(rank * views[0].shape[0] // world_size, (rank + 1) * views[0].shape[0] // world_size)
        logits = per_view([v[rows] for v in views])
        loss = loss_of(logits, [t[rows] for t in targets])
        loss.backward()
    finally:
        dist.all_gather = real_all_gather
    num_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in per_view.modules())
    grads = {n: p.grad for n, p in per_view.named_parameters()}
    return {"logits": [lg.detach() for lg in logits], "loss": loss.detach(), "grads": grads,
            "state": per_view.state_dict(), "gathers": calls["all_gather"], "num_bn": num_bn}


@requires_gloo
@pytest.mark.parametrize("device", DEVICES)
def test_two_processes_use_global_per_view_statistics(device):
    """float64, so that agreement to 1e-10 shows the global statistics are exact (in float32
    the summed gradients agree to ~1e-3 of their largest entry: rounding, amplified)."""
    views = [v.double() for v in make_views(32, seed=3)]
    targets = [torch.softmax(torch.randn(32, 12, dtype=torch.float64), 1) for _ in range(2)]
    outs = run_distributed(_distributed_step, world_size=2, args=(views, targets, device), timeout=240)

    plain = twin_networks(2)[1].double()
    ref_logits = per_view_reference(plain, views)[0]  # each view's WHOLE global batch alone
    halves = [slice(0, 16), slice(16, 32)]
    ref_loss = sum(loss_of([lg[h] for lg in ref_logits], [t[h] for t in targets]) for h in halves)
    ref_loss.backward()
    for rank, out in enumerate(outs):
        for a, b in zip(out["logits"], ref_logits):
            torch.testing.assert_close(a, b[halves[rank]], rtol=1e-10, atol=1e-10)
        for key, value in out["state"].items():
            torch.testing.assert_close(value, plain.state_dict()[key], rtol=1e-10, atol=1e-10, msg=key)
        # one all-gather per BN layer per forward (backbone layers see 2 forwards: 2 resolutions)
        backbone_bn = out["num_bn"] - 2
        assert out["gathers"] == 2 * backbone_bn + 2
    # DDP sums (then averages) the processes' gradients: their sum is the gradient of the summed loss
    for name, p in plain.named_parameters():
        summed = outs[0]["grads"][name] + outs[1]["grads"][name]
        assert (summed - p.grad).abs().max() <= 1e-9 * p.grad.abs().max() + 1e-30, name


def _sync_bn_step(rank: int, world_size: int, views: list[torch.Tensor], device: str):
    on = on_device(device)
    net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(twin_networks(2)[1].double()).to(on)
    half = views[0].shape[0] // world_size
    logits = net([v[rank * half:(rank + 1) * half].to(on) for v in views])
    sum(lg.square().sum() for lg in logits).backward()
    synced = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules())
    return {"logits": [lg.detach() for lg in logits], "synced": synced,
            "grads": {n: p.grad for n, p in net.named_parameters()}}


@requires_gloo
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")
def test_sync_batchnorm_per_forward_pools_every_processes_rows():
    """`--model.bn_stats per_forward` on CUDA with several processes: the engine turns the
    student's BatchNorm into SyncBatchNorm (engine.build_networks), so each forward's statistics
    pool its views' rows on every process, as one process with the whole batch would. Two ranks
    on GPU 0 over gloo (SyncBatchNorm runs only on CUDA), float64, against one process."""
    views = [v.double() for v in make_views(16, seed=5)]
    outs = run_distributed(_sync_bn_step, world_size=2, args=(views, "cuda"), timeout=240)
    plain = twin_networks(2)[1].double()
    ref = plain(views)
    sum(lg.square().sum() for lg in ref).backward()
    for rank, out in enumerate(outs):
        assert out["synced"] == sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in plain.modules())
        for got, whole in zip(out["logits"], ref):
            torch.testing.assert_close(got, whole[rank * 8:(rank + 1) * 8].detach(), rtol=1e-9, atol=1e-9)
    for name, p in plain.named_parameters():  # each rank's gradient of its rows' loss: they sum to the whole's
        summed = outs[0]["grads"][name] + outs[1]["grads"][name]
        assert (summed - p.grad).abs().max() <= 1e-8 * p.grad.abs().max() + 1e-30, name


def test_the_network_tells_its_batchnorms_the_rows_per_view_once_per_batch_size(monkeypatch):
    """The walk over every module happens when the batch size changes, not at each forward; each
    BatchNorm then reads the batch size it is given."""
    import fastssl.models.network as network

    walks = []
    monkeypatch.setattr(network, "set_rows_per_view", lambda m, rows: walks.append(rows) or set_rows_per_view(m, rows))
    net = MiraNetwork("resnet18", 32, 16, 10)
    bns = [m for m in net.modules() if isinstance(m, PerViewBatchNorm2d)]
    for batch in (4, 4, 4, 6, 6, 4):
        net([torch.randn(batch, 3, 16, 16) for _ in range(2)])
        assert {bn.rows_per_view for bn in bns} == {batch}
    assert walks == [4, 6, 4]
