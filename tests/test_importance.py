"""The importance registry: every criterion against a hand computation, masks from its scores equal
torch.nn.utils.prune, a newly registered criterion works in magnitude pruning by name alone, and
unknown or misplaced names fail clearly."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

from netcompress.callbacks.magnitude_pruning import MagnitudePruning
from netcompress.callbacks.slimming import Slimming, slimming_masks
from netcompress.compression import importance
from netcompress.compression.importance import (check_applies, filter_scores, importance_names, register_importance,
                                                score)
from netcompress.compression.masks import masks_from_scores, structured_masks, unstructured_masks
from netcompress.pipeline.build import build

PRUNE = "callbacks.magnitude_pruning"


def tiny_conv() -> nn.Conv2d:
    """2 filters of 1x1x2 weights, written out so the scores below can be checked by hand."""
    conv = nn.Conv2d(1, 2, (1, 2), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[3.0, -4.0]]], [[[-1.0, 2.0]]]]))
    return conv


def tiny_bn() -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    return bn


# name -> (layer, per-weight / per-channel scores, per-filter scores), all by hand
HAND = {
    "l1": (tiny_conv, [[[[3.0, 4.0]]], [[[1.0, 2.0]]]], [7.0, 3.0]),  # |w|; filter L1 norm
    "l2": (tiny_conv, [[[[9.0, 16.0]]], [[[1.0, 4.0]]]], [5.0, 5.0 ** 0.5]),  # w^2; filter L2 norm
    "bn_gamma": (tiny_bn, [0.5, 2.0, 1.0], [0.5, 2.0, 1.0]),  # |gamma|, one per channel
    "bn_variance": (tiny_bn, [4.0, 0.25, 1.0], [4.0, 0.25, 1.0]),  # running_var, one per channel
}


def test_every_registered_criterion_has_a_hand_computation():
    # the data-driven and seeded ones (calibration passes) are checked in tests/test_importance_data.py
    calibrated = {n for n, c in importance.IMPORTANCE.items() if c.calibrated} | {"bn_mean_variance"}
    assert set(importance_names()) - calibrated == set(HAND)


@pytest.mark.parametrize("name", list(HAND))
def test_criterion_equals_hand_computation(name):
    make, per_weight, per_filter = HAND[name]
    layer = make()
    torch.testing.assert_close(score(name, layer), torch.tensor(per_weight))
    torch.testing.assert_close(filter_scores(name, layer), torch.tensor(per_filter))
    assert not score(name, layer).requires_grad  # scores never join the autograd graph


def test_filter_norms_equal_torch_norms_and_bare_weights_score_like_their_layer():
    conv = nn.Conv2d(3, 5, 3)
    flat = conv.weight.detach().flatten(1)
    torch.testing.assert_close(filter_scores("l1", conv), torch.linalg.vector_norm(flat, 1, dim=1))
    torch.testing.assert_close(filter_scores("l2", conv), torch.linalg.vector_norm(flat, 2, dim=1))
    for name in ("l1", "l2"):
        torch.testing.assert_close(score(name, conv.weight), score(name, conv))


@pytest.mark.parametrize("n,name", [(1, "l1"), (2, "l2")])
def test_structured_masks_equal_torch_ln_structured(n, name):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    reference = copy.deepcopy(conv)
    keep = structured_masks({"conv": conv}, 0.5, scope="layer", importance=name)["conv"]
    prune.ln_structured(reference, "weight", amount=0.5, n=n, dim=0)
    assert torch.equal(keep, reference.weight_mask.flatten(1).any(1))


def test_unstructured_l2_masks_equal_torch_l1_unstructured():  # w^2 ranks weights as |w| does
    torch.manual_seed(0)
    layers = {"a": nn.Linear(6, 4), "b": nn.Linear(4, 3)}
    reference = copy.deepcopy(layers)
    masks = unstructured_masks(layers, 0.4, scope="global", importance="l2")
    prune.global_unstructured([(m, "weight") for m in reference.values()], prune.L1Unstructured, amount=0.4)
    for name, mask in masks.items():
        assert torch.equal(mask, reference[name].weight_mask.bool()), name


def test_masks_from_scores_by_hand():
    scores = {"a": torch.tensor([1.0, 5.0]), "b": torch.tensor([3.0, 2.0])}
    glob = masks_from_scores(scores, 0.5, "global")  # prune the 2 lowest of [1, 5, 3, 2]
    assert glob["a"].tolist() == [False, True] and glob["b"].tolist() == [True, False]
    layer = masks_from_scores(scores, 0.5, "layer")  # the lowest of each layer
    assert layer["a"].tolist() == [False, True] and layer["b"].tolist() == [True, False]
    previous = {"a": torch.tensor([True, False])}  # already pruned: goes first, masks only shrink
    again = masks_from_scores(scores, 0.5, "global", previous)
    assert again["a"].tolist() == [False, False] and again["b"].tolist() == [True, True]
    with pytest.raises(ValueError, match="scope must be one of global, layer; got 'net'"):
        masks_from_scores(scores, 0.5, "net")


def test_slimming_criteria_use_the_registry_and_keep_their_older_names():
    assert Slimming(criterion="gamma").criterion == "bn_gamma"
    assert Slimming(criterion="running_var").criterion == "bn_variance"
    assert Slimming(criterion="bn_variance").criterion == "bn_variance"
    bns = {"bn": tiny_bn()}  # running_var [4, 0.25, 1]: ratio 1/3 drops the 0.25 channel
    assert slimming_masks(bns, 1 / 3, "bn_variance")["bn"].tolist() == [True, False, True]
    assert slimming_masks(bns, 1 / 3, "running_var")["bn"].tolist() == [True, False, True]
    assert slimming_masks(bns, 1 / 3)["bn"].tolist() == [False, True, True]  # |gamma| [0.5, 2, 1]: drops 0.5


def test_unknown_names_list_the_registry_and_the_config_key():
    names = ", ".join(importance_names())
    with pytest.raises(ValueError, match=rf"`callbacks\.magnitude_pruning\.importance` must be one of {names} "
                                         r"\(the importance registry.*got 'l3'"):
        MagnitudePruning(importance="l3")
    with pytest.raises(ValueError, match=rf"`callbacks\.slimming\.criterion` must be one of {names}.*older "
                                         r"gamma, running_var \(= bn_gamma, bn_variance\); got 'taylor2'"):
        Slimming(criterion="taylor2")
    with pytest.raises(ValueError, match=rf"importance must be one of {names}.*got 'magnitude'"):
        score("magnitude", tiny_conv())


def test_criterion_on_the_wrong_layer_type_fails_clearly():
    with pytest.raises(ValueError, match=r"importance='bn_gamma' scores BatchNorm1d/BatchNorm2d/.* layers, but layer "
                                         r"'conv' is a Conv2d; use one of l1, l2"):
        check_applies("bn_gamma", {"conv": tiny_conv()}, "importance")
    with pytest.raises(ValueError, match=r"'l1' scores a layer's weight, but layer 'act' \(ReLU\) has none"):
        check_applies("l1", {"act": nn.ReLU()}, "importance")
    with pytest.raises(ValueError, match="criterion 'l1' is already registered"):
        register_importance("l1")(lambda module: module.weight)


def test_a_registered_criterion_is_usable_by_magnitude_pruning_by_name(tiny_config, monkeypatch):
    """One registered function, no other edit: ``importance=largest_first`` prunes the largest |w|."""
    monkeypatch.setattr(importance, "IMPORTANCE", dict(importance.IMPORTANCE))  # undone after the test

    @register_importance("largest_first")
    def largest_first(module):
        return -module.weight.detach().abs()

    cfg = tiny_config("+model.width=0.25", "data.val_size=16", "data.test_size=16", "compression=[magnitude_pruning]",
                      "optimizer.lr=1e-30", "optimizer.weight_decay=0.0", "scheduler=none",
                      f"{PRUNE}.importance=largest_first", f"{PRUNE}.scope=layer", f"{PRUNE}.sparsity=0.25")
    datamodule, module, trainer = build(cfg)
    initial = copy.deepcopy(module.net)
    trainer.fit(module, datamodule=datamodule)
    callback = next(c for c in trainer.callbacks if isinstance(c, MagnitudePruning))
    assert callback.importance == "largest_first" and callback.masks
    layers = dict(initial.named_modules())
    for name, mask in callback.masks.items():
        magnitude = layers[name].weight.detach().abs().flatten()
        k = round(0.25 * magnitude.numel())  # the k largest |w| go, by hand
        pruned = torch.zeros_like(magnitude, dtype=torch.bool)
        pruned[magnitude.argsort(descending=True)[:k]] = True
        assert torch.equal(mask.flatten(), ~pruned), name
