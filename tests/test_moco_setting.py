"""The ML-CPC authors' MoCo-v2 setting: moco head, CIFAR stem, weight decay on every
parameter, per-epoch cosine lr, shuffle-BN in the key encoder (one process and two)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from dist_utils import DEVICES, on_device, requires_gloo, run_distributed
from fastssl.checkpoint import export_backbone
from fastssl.config import Config
from fastssl.critic import shuffled_forward
from fastssl.models import MiraNetwork
from fastssl.optim import build_optimizer, param_groups
from fastssl.schedules import step_schedule


def test_moco_head_is_linear_relu_linear_with_biases_and_no_bn():
    net = MiraNetwork("resnet18", 64, 16, 8, head="moco")
    layers = list(net.projector)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (512, 64, 16)
    assert layers[0].bias is not None and layers[2].bias is not None
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.projector.modules())
    logits, z = net([torch.randn(2, 3, 32, 32)] * 2, with_embeddings=True)
    assert z[0].shape == (2, 16) and torch.allclose(z[0].norm(dim=1), torch.ones(2))


def test_cifar_stem_keeps_32px_resolution_and_exports_to_torchvision(tmp_path):
    net = MiraNetwork("resnet18", 32, 16, 8, stem="cifar")
    assert net.backbone.conv1.kernel_size == (3, 3) and net.backbone.conv1.stride == (1, 1)
    assert isinstance(net.backbone.maxpool, nn.Identity)
    stem_out = net.backbone.maxpool(net.backbone.conv1(torch.randn(1, 3, 32, 32)))
    assert stem_out.shape[-2:] == (32, 32)  # the ImageNet stem would give 8 x 8
    export_backbone(net.backbone, tmp_path / "b.pth")
    target = torchvision.models.resnet18()
    target.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the same stem change (README)
    target.maxpool = nn.Identity()
    result = target.load_state_dict(torch.load(tmp_path / "b.pth"), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    torch.testing.assert_close(target.conv1.weight, net.backbone.conv1.weight)
    from fastssl.eval.backbone_io import load_backbone
    loaded, arch = load_backbone(tmp_path / "b.pth", None)
    assert arch == "resnet18" and loaded.conv1.kernel_size == (3, 3)


def test_decay_bn_bias_puts_weight_decay_on_every_parameter():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    assert [g["weight_decay"] for g in param_groups(net.named_parameters(), 0.1)] == [0.1, 0.0]
    groups = param_groups(net.named_parameters(), 0.1, decay_bn_bias=True)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1]
    opt = build_optimizer("sgd", net.named_parameters(), lr=1.0, momentum=0.0, weight_decay=0.1, lars_eta=1e-3,
                          decay_bn_bias=True)
    bias_before = net[0].bias.detach().clone()
    net[0].bias.grad = torch.zeros(4)
    opt.step()
    torch.testing.assert_close(net[0].bias.detach(), 0.9 * bias_before)


def test_lr_per_epoch_is_constant_within_an_epoch_and_cosine_across():
    cfg = Config()
    cfg.optim.warmup_epochs, cfg.train.epochs = 0, 4
    cfg.optim.cosine_per = "epoch"
    lrs = [step_schedule(cfg, s, 10).lr for s in range(40)]
    assert len(set(lrs[10:20])) == 1 and lrs[9] > lrs[10] > lrs[20] > lrs[30]
    cfg.optim.cosine_per = "step"
    assert step_schedule(cfg, 15, 10).lr < lrs[15]
    assert step_schedule(cfg, 10, 10).lr == pytest.approx(lrs[10])  # the same cosine at epoch starts


def _net() -> MiraNetwork:
    torch.manual_seed(0)
    return MiraNetwork("resnet18", 32, 8, 4, stem="cifar").train()


def _groupwise_reference(net: MiraNetwork, views: list[torch.Tensor], perm: torch.Tensor, groups: int):
    """An ordinary forward of each group of the permuted batch on its own, unpermuted."""
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if hasattr(m, "sync"):
            m.sync = False
    zs = []
    for idx in perm.chunk(groups):
        _, z = ref([v[idx] for v in views], with_embeddings=True)
        zs.append(z)
    inverse = torch.argsort(perm)
    return [torch.cat([z[i] for z in zs])[inverse] for i in range(len(views))]


def test_shuffle_bn_on_one_process_normalises_shuffled_groups():
    net = _net()
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    with torch.no_grad():
        plain = net(views, with_embeddings=True)[1]
        torch.manual_seed(1)
        _, z, perm = shuffled_forward(net, views, splits=2)
        expected = _groupwise_reference(net, views, perm, groups=2)
    assert sorted(perm.tolist()) == list(range(8)) and perm.tolist() != list(range(8))
    for got, want, whole in zip(z, expected, plain):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(got, whole, atol=1e-3)  # not the plain whole-batch BN


def _shuffled_two_ranks(rank: int, world_size: int, views: list[torch.Tensor], device: str):
    on = on_device(device)
    net, views = _net().to(on), [v.to(on) for v in views]
    b = views[0].shape[0] // world_size
    mine = [v[rank * b:(rank + 1) * b] for v in views]
    torch.manual_seed(rank)  # different seeds: rank 0's permutation must win
    with torch.no_grad():
        _, z, perm = shuffled_forward(net, mine, splits=4)  # splits do not apply across processes
        expected = _groupwise_reference(net, views, perm, groups=world_size)
    return z, [e[rank * b:(rank + 1) * b] for e in expected], perm


@requires_gloo
@pytest.mark.parametrize("device", DEVICES)
def test_shuffle_bn_across_two_processes_is_a_local_forward_of_the_permuted_batch(device):
    g = torch.Generator().manual_seed(5)
    views = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
    outs = run_distributed(_shuffled_two_ranks, world_size=2, args=(views, device))
    torch.testing.assert_close(outs[0][2], outs[1][2])  # one permutation for all ranks
    for z, expected, _ in outs:
        for got, want in zip(z, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_export_student_writes_and_scores_the_query_encoder(tmp_path, capsys):
    """ML-CPC's linear evaluation reads the query encoder (main_lincls_cifar.py keeps `module.encoder_q`):
    with model.export student the exported backbone is the student's, not the EMA key encoder's, and the
    loop's k-NN scores it."""
    from pathlib import Path

    from fastssl.engine import train
    from test_engine import tiny_config

    cfg = tiny_config(tmp_path, epochs=1)
    cfg.model.export = "student"
    cfg.method.ema_momentum_start = cfg.method.ema_momentum_end = 0.9  # the teacher lags: the two differ
    train(cfg)
    run = Path(cfg.train.run_dir)
    exported = torch.load(run / "backbone_resnet18.pth")
    saved = torch.load(run / "checkpoint.pt", weights_only=False)
    student = {k[len("backbone."):]: v for k, v in saved["student"].items() if k.startswith("backbone.")}
    teacher = {k[len("backbone."):]: v for k, v in saved["teacher"].items() if k.startswith("backbone.")}
    assert set(exported) == set(student) == set(teacher)
    assert all(torch.equal(exported[k], student[k]) for k in exported)
    assert any(not torch.equal(exported[k], teacher[k]) for k in exported if k.endswith("weight"))
    assert "k-NN of the student" in capsys.readouterr().out
