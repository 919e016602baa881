"""The masks of each pruning round and how a network is cut to them (Frankle & Carbin 2019; Li et al. 2017).

Round r of iterative magnitude pruning (IMP) prunes to sparsity 1 - (1-rate)^r from the weights
retrained after round r-1, keeping every weight pruned before pruned (one-shot: one round at
``sparsity``). Unstructured masks keep shapes (0/1 weights, enforced by ``FixedMask``); structured
keep-vectors of output filters are cut out physically with ``compression.channel_removal``
(Rethinking's L1-norm filter pruning and slimming). Settings arrive checked by ``LotteryProtocol``.
"""
from __future__ import annotations

from typing import Mapping

import torch

from netcompress.compression.importance import IMPORTANCE
from netcompress.compression.layer_selection import first_match, select_layers
from netcompress.compression.masks import structured_masks, unstructured_masks
from netcompress.protocols.retrain_init import masked_state


class PruningRounds:
    """Masks per round from the checked ``protocol.prune`` settings (a dict, see ``conf/protocol/lottery.yaml``)."""

    def __init__(self, prune: Mapping) -> None:
        self.prune = prune

    @property
    def structured(self) -> bool:
        return self.prune["kind"] == "structured"

    def target_sparsity(self, round_: int) -> float:
        """Fraction of the selected weights (or filters) pruned after ``round_`` rounds."""
        if self.prune["schedule"] == "oneshot":
            return float(self.prune["sparsity"])
        return 1.0 - (1.0 - float(self.prune["rate"])) ** round_

    @property
    def importance(self) -> str:
        """The registered criterion (compression/importance.py) that scores this setting's layers:
        BN |gamma| for ``criterion=bn_scale`` (slimming), else ``prune.importance`` (l1, l2, ...)."""
        return "bn_gamma" if self.prune["criterion"] == "bn_scale" else self.prune["importance"]

    def selected(self, net: torch.nn.Module) -> dict[str, torch.nn.Module]:
        p = self.prune
        types = IMPORTANCE[self.importance].types or (torch.nn.Conv2d, torch.nn.Linear)
        return select_layers(net, p["include"], p["exclude"], p["skip_first_last"], types=types, key="protocol.prune")

    def compute_masks(self, net: torch.nn.Module, round_: int, previous: Mapping | None) -> dict[str, torch.Tensor]:
        """Keep-masks of round ``round_`` from ``net``'s weights; ``previous``: the round before's masks."""
        p = self.prune
        layers = self.selected(net)
        weights = {name: m.weight.detach().cpu() for name, m in layers.items()}
        sparsity = self.target_sparsity(round_)
        if p["layer_sparsity"]:  # oneshot, per layer: the first matching pattern's fraction, else `sparsity`
            def fraction(name: str) -> float:
                return float(first_match(name, p["layer_sparsity"], sparsity))

            masks = {}
            for name, w in weights.items():
                one = {name: w}
                masks.update(unstructured_masks(one, fraction(name), "layer", self.importance)
                             if p["kind"] == "unstructured" else self._structured(one, fraction(name), None))
            return masks
        if p["kind"] == "unstructured":
            return unstructured_masks(weights, sparsity, p["scope"], self.importance, previous)
        return self._structured(weights, sparsity, previous)

    def _structured(self, weights: Mapping[str, torch.Tensor], sparsity: float, previous: Mapping | None) -> dict:
        """Kept output filters by the criterion's filter score: L1/L2 filter norm (Li et al. 2017) or
        BN |gamma| (Liu et al. 2017); at least one filter kept per layer."""
        return structured_masks(weights, sparsity, self.prune["scope"], self.importance, previous)

    def enforced(self, masks: Mapping[str, torch.Tensor] | None) -> dict | None:
        """The masks FixedMask enforces (unstructured only; a thin network needs none)."""
        return dict(masks) if masks is not None and not self.structured else None

    def apply(self, net: torch.nn.Module, masks: Mapping[str, torch.Tensor],
              input_size: tuple[int, int, int]) -> torch.nn.Module:
        """``net`` cut to ``masks``: pruned weights zeroed (unstructured) or filters removed (structured)."""
        if self.structured:
            from netcompress.compression.channel_removal import remove_channels

            return remove_channels(net, dict(masks), torch.zeros(1, *input_size))
        net.load_state_dict(masked_state(net.state_dict(), masks))
        return net
