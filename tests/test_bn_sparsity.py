"""L1 on BatchNorm gamma (``callbacks/bn_sparsity.py``, Liu et al. 2017 eq. 1): the subgradient
against autograd of the written-out loss, the switch-off epoch, and clear errors."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from netcompress import models  # noqa: F401
from netcompress.callbacks.bn_sparsity import BNSparsity
from netcompress.models.factory import create_model


def test_bn_l1_adds_lambda_sign_gamma_to_the_gradient():
    torch.manual_seed(0)
    net = create_model("resnet20_cifar", num_classes=10, width=0.25)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()  # both signs
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    reference = copy.deepcopy(net)
    lam = 1e-2
    # reference: autograd of CE + lam * sum |gamma| (Liu et al. eq. 1)
    loss = nn.functional.cross_entropy(reference(x), y)
    loss = loss + lam * sum(m.weight.abs().sum() for m in reference.modules() if isinstance(m, nn.BatchNorm2d))
    loss.backward()
    nn.functional.cross_entropy(net(x), y).backward()
    callback = BNSparsity(lam=lam)
    module = SimpleNamespace(net=net)
    callback.setup(None, module, "fit")
    callback.on_before_optimizer_step(SimpleNamespace(current_epoch=0), module, None)
    for (name, a), b in zip(net.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)
    # until_epoch switches it off
    before = [p.grad.clone() for p in net.parameters()]
    BNSparsity(lam=lam, until_epoch=1).on_before_optimizer_step(SimpleNamespace(current_epoch=1), module, None)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, net.parameters()))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"lam": -1}, ValueError, r"bn_sparsity\.lam.*\[0, 1\).*-1"),
    ({"lam": True}, ValueError, r"bn_sparsity\.lam.*True"),
    ({"until_epoch": 0}, ValueError, r"bn_sparsity\.until_epoch.*null or an int >= 1.*0"),
    ({"include": "features.*"}, TypeError, r"bn_sparsity\.include.*lists of patterns"),
])
def test_bad_bn_sparsity_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        BNSparsity(**kwargs)


def test_a_model_without_batchnorm_fails_in_setup_naming_the_key():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    with pytest.raises(ValueError, match=r"`callbacks\.bn_sparsity`: Sequential has no BatchNorm layer"):
        BNSparsity().setup(None, SimpleNamespace(net=net), "fit")
