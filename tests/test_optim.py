"""SGD/LARS parameter groups: BN and bias get neither weight decay nor LARS adaptation."""

import pytest
import torch
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
