"""Networks: projector/prototypes as the authors', EMA teacher, exported backbone."""

import pytest
import torch
import torchvision
from torch import nn

from fastssl.checkpoint import export_backbone
from fastssl.models import MiraNetwork, ema_update, make_teacher
from fastssl.models.ema import ema_pairs


def test_projector_and_prototypes_as_notes():
    net = MiraNetwork("resnet50")
    layers = list(net.projector)
    kinds = [nn.BatchNorm1d if isinstance(m, nn.BatchNorm1d) else type(m) for m in layers]  # per-view BN is one
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[0].bias) == (2048, 2048, None)
    assert (layers[3].in_features, layers[3].out_features, layers[3].bias) == (2048, 2048, None)
    assert (layers[6].in_features, layers[6].out_features) == (2048, 256) and layers[6].bias is not None
    assert net.prototypes.weight.shape == (3000, 256)
    # zero-init residual: the last BN of every bottleneck starts at 0
    assert all(float(b.bn3.weight.detach().abs().max()) == 0 for b in net.backbone.layer1)
    # MoCo's torchvision ResNet (model.zero_init_residual false): every BN weight starts at 1
    moco = MiraNetwork("resnet18", 32, 16, 8, zero_init_residual=False)
    blocks = [b for layer in (moco.backbone.layer1, moco.backbone.layer4) for b in layer]
    assert all(torch.equal(b.bn2.weight.detach(), torch.ones_like(b.bn2.weight)) for b in blocks)


def test_logits_are_cosines():
    torch.manual_seed(0)
    net = MiraNetwork("resnet18", 64, 16, 40)
    with torch.no_grad():
        net.prototypes.weight.mul_(torch.rand(40, 1) * 10)  # rescaling a prototype must not matter
        z, logits = net.head(torch.randn(6, 512))
        proto = net.prototypes.weight / net.prototypes.weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(logits, z @ proto.T)
    assert logits.abs().max() <= 1 + 1e-6


def test_logits_stay_float32_under_bf16_autocast():
    """Under bf16 autocast the cosines would be 0.004 apart near 1 (0.04 after 1 / tau_s): the
    prototype layer computes them in float32 from the projection (float64 reference)."""
    torch.manual_seed(0)
    net = MiraNetwork("resnet18", 64, 16, 40)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z, logits = net.head(torch.randn(6, 512))
    assert z.dtype == logits.dtype == torch.float32
    proto = torch.nn.functional.normalize(net.prototypes.weight.detach().double(), dim=1)
    torch.testing.assert_close(logits.double(), z.double() @ proto.T, atol=1e-6, rtol=0)


def test_multicrop_forward_order():
    torch.manual_seed(0)
    net = MiraNetwork("resnet18", 32, 16, 8).eval()
    views = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    with torch.no_grad():
        together = net(views)
        alone = [net([v])[0] for v in views]
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_ema_update_and_head_copy():
    torch.manual_seed(0)
    student = MiraNetwork("resnet18", 32, 16, 8)
    teacher = make_teacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    ema_update(teacher, student, momentum=0.9)
    s, t = dict(student.named_parameters()), dict(teacher.named_parameters())
    for name in s:
        if name.startswith("prototypes"):
            torch.testing.assert_close(t[name], s[name])  # copied, not averaged
        else:
            torch.testing.assert_close(t[name], 0.9 * t_before[name] + 0.1 * s[name])
    ema_update(teacher, student, momentum=1.0)  # the schedule's end: the teacher stops moving
    torch.testing.assert_close(t["backbone.conv1.weight"], 0.9 * t_before["backbone.conv1.weight"]
                               + 0.1 * s["backbone.conv1.weight"])
    other = MiraNetwork("resnet18", 32, 16, 8)  # another student: followed, not the one listed first
    ema_update(teacher, other, momentum=0.0)
    for name, param in other.named_parameters():
        torch.testing.assert_close(t[name], param)
    pairs = ema_pairs(teacher, other)
    assert pairs[0] is ema_pairs(teacher, other)[0]  # listed once per pair
    assert [id(p) for p in pairs[0]] == [id(t[n]) for n in t if not n.startswith("prototypes")]
    other.load_state_dict(student.state_dict(), assign=True)  # new parameter objects: listed again
    ema_update(teacher, other, momentum=0.0)
    torch.testing.assert_close(teacher.backbone.conv1.weight, student.backbone.conv1.weight)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_exported_backbone_loads_into_torchvision(tmp_path, arch):
    net = MiraNetwork(arch, 32, 16, 8)
    export_backbone(net.backbone, tmp_path / "b.pth")
    target = getattr(torchvision.models, arch)()
    result = target.load_state_dict(torch.load(tmp_path / "b.pth"), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    torch.testing.assert_close(target.conv1.weight, net.backbone.conv1.weight)
