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
        if IMPORTANCE[self.importance].calibrated:  # masks are cut from a stored net, with no data or seed at hand
            usable = [n for n, c in IMPORTANCE.items() if not c.calibrated and c.types is None]
            raise ValueError(f"`protocol.prune.importance`={self.importance!r} is scored from a calibration pass "
                             "(training batches, a seed or the net's dependency graph), which the lottery protocol's mask stage does not run; "
                             f"use one of {', '.join(usable)}, or compression=[magnitude_pruning] for "
                             f"importance={self.importance}")

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
        if p["kind"] == "unstructured" and p.get("layer_rate"):
            return self._per_type(weights, round_, previous)
        if p["kind"] == "unstructured":
            return unstructured_masks(weights, sparsity, p["scope"], self.importance, previous)
        return self._structured(weights, sparsity, previous)

    def _per_type(self, weights: Mapping[str, torch.Tensor], round_: int, previous: Mapping | None) -> dict:
        """IMP with a rate per layer type (Frankle & Carbin 2019: Conv-2/4/6 prune conv 10-15%, fc 20%,
        output 10% per round): a layer matching a ``layer_rate`` pattern keeps (1 - rate)^round of its
        own weights; the others share ``rate`` under ``scope``."""
        p, previous = self.prune, previous or {}
        rest = {n: w for n, w in weights.items() if first_match(n, p["layer_rate"], None) is None}
        masks = unstructured_masks(rest, self.target_sparsity(round_), p["scope"], self.importance,
                                   {n: previous[n] for n in rest if n in previous} or None) if rest else {}
        for name, w in weights.items():
            rate = first_match(name, p["layer_rate"], None)
            if rate is not None:
                masks.update(unstructured_masks({name: w}, 1.0 - (1.0 - rate) ** round_, "layer", self.importance,
                                                {name: previous[name]} if name in previous else None))
        return {name: masks[name] for name in weights}

    def _structured(self, weights: Mapping[str, torch.Tensor], sparsity: float, previous: Mapping | None) -> dict:
        """Kept output filters by the criterion's filter score: L1/L2 filter norm (Li et al. 2017) or
        BN |gamma| (Liu et al. 2017); at least one filter kept per layer."""
        return structured_masks(weights, sparsity, self.prune["scope"], self.importance, previous,
                                rounding=self.prune.get("rounding", "nearest"), round_to=self.prune.get("round_to"))

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
