"""The combination rules of pipeline/combinations.py: each row refuses with its message, and a
callback that declares no capability combines with anything."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl

from netcompress.callbacks.bn_sparsity import BNSparsity
from netcompress.callbacks.cluster import Cluster
from netcompress.callbacks.kd import KD
from netcompress.callbacks.lowrank import LowRank
from netcompress.callbacks.magnitude_pruning import MagnitudePruning
from netcompress.callbacks.noop import Noop
from netcompress.callbacks.ptq import PTQ
from netcompress.callbacks.qat import QAT
from netcompress.callbacks.slimming import Slimming
from netcompress.pipeline.combinations import CAPABILITIES, RULES, capabilities_of, check_combinations
from netcompress.pipeline.entries import calibration_only_entries, reshaping_entries

ALL = [BNSparsity, Cluster, KD, LowRank, MagnitudePruning, Noop, PTQ, QAT, Slimming]


def make(cls):
    return cls("initial") if cls is KD else cls()


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_callback_declares_only_known_capabilities(cls):
    assert capabilities_of(cls) <= CAPABILITIES.keys()
    assert capabilities_of(make(cls)) == capabilities_of(cls)


@pytest.mark.parametrize("cls", [c for c in ALL if "single" in capabilities_of(c)], ids=lambda c: c.__name__)
def test_rule_single_refuses_two_entries_of_one_class(cls):
    with pytest.raises(ValueError, match=rf"only one {cls.__name__} callback per run, but `callbacks\.a` and "
                                         rf"`callbacks\.b` are both {cls.__name__}; keep one entry"):
        check_combinations([make(cls), make(cls)], ["a", "b"])


def test_rule_quantizes_refuses_two_quantizers():
    with pytest.raises(ValueError, match=r"callbacks\.qat and callbacks\.ptq both quantize the network; pick one"):
        check_combinations([QAT(), PTQ()])


@pytest.mark.parametrize("reshaper", [Slimming, LowRank], ids=["slimming", "lowrank"])
def test_rule_masks_on_a_reshaped_net_is_refused_in_either_order(reshaper):
    name = reshaper.__module__.rpartition(".")[2]
    for callbacks, names in (([MagnitudePruning(), reshaper()], ["magnitude_pruning", name]),
                             ([reshaper(), MagnitudePruning()], [name, "magnitude_pruning"])):
        with pytest.raises(ValueError, match=rf"`callbacks\.magnitude_pruning` and `callbacks\.{name}` cannot run in "
                                             rf"one fit: {name} removes channels or swaps layers.*masks of "
                                             rf"magnitude_pruning would point at layers that no longer exist.*"
                                             rf"compression=\[magnitude_pruning\] init_from=<that run>/model\.pt"):
            check_combinations(callbacks, names)


@pytest.mark.parametrize("editor, last", [
    (MagnitudePruning(start=2), 2),
    (MagnitudePruning(schedule="iterative", start=1, every=2, times=3), 5),
    (MagnitudePruning(schedule="agp", start=0, end=4), 4),
    (LowRank(at_epoch=3), 3),
    (Slimming(at_epochs=[1, 3]), 3),
], ids=["oneshot", "iterative", "agp", "lowrank", "slimming"])
def test_rule_edits_after_clustering_is_refused_and_edits_before_are_fine(editor, last):
    name = type(editor).__module__.rpartition(".")[2]
    with pytest.raises(ValueError, match=rf"`callbacks\.{name}` changes the weights until epoch {last} but "
                                         rf"`callbacks\.cluster` clusters them at epoch {last}.*Set "
                                         rf"`callbacks\.cluster\.at_epoch` to {last + 1} or more.*got at_epoch={last}"):
        check_combinations([Cluster(at_epoch=last), editor])
    check_combinations([editor, Cluster(at_epoch=last + 1)])


def test_edits_before_the_first_epoch_or_by_step_never_clash_with_clustering():
    check_combinations([LowRank(at_epoch=0), Cluster(at_epoch=0)])  # decomposed in on_train_start
    check_combinations([MagnitudePruning(unit="step", start=500), Cluster(at_epoch=0)])  # not scheduled by epoch


def test_every_rule_is_exercised_above():
    assert len(RULES) == 4  # a new row needs its own test here


class Plain(pl.Callback):
    """Declares nothing."""


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_a_callback_without_capabilities_combines_with_anything(cls):
    check_combinations([Plain(), make(cls), Noop(), Plain(), pl.callbacks.ModelCheckpoint()])
    assert capabilities_of(Plain()) == frozenset()


def test_unknown_capability_is_a_type_error_naming_the_class():
    class Typo(pl.Callback):
        CAPABILITIES = frozenset({"quantises"})

    with pytest.raises(TypeError, match=r"Typo declares unknown capabilities \['quantises'\]"):
        check_combinations([Typo()])


def test_entry_lists_come_from_capabilities():
    callbacks = {
        "slimming": {"_target_": "netcompress.callbacks.slimming.Slimming"},
        "magnitude_pruning": {"_target_": "netcompress.callbacks.magnitude_pruning.MagnitudePruning"},
        "filters": {"_target_": "netcompress.callbacks.magnitude_pruning.MagnitudePruning", "remove_filters": True},
        "lowrank": {"_target_": "netcompress.callbacks.lowrank.LowRank"},
        "ptq": {"_target_": "netcompress.callbacks.ptq.PTQ"},
        "qat": {"_target_": "netcompress.callbacks.qat.QAT"},
        "lr_monitor": {"_target_": "pytorch_lightning.callbacks.LearningRateMonitor"},
    }
    assert reshaping_entries(callbacks) == ["slimming", "filters", "lowrank"]
    assert calibration_only_entries(callbacks) == ["ptq"]
