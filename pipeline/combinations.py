"""Which callbacks can share one fit: each declares what it does, the rules between them live here.

A callback class declares ``CAPABILITIES`` (a frozenset of names from :data:`CAPABILITIES`) and,
for what depends on one of its arguments, ``CAPABILITIES_IF = {"remove_filters": {"reshapes_net"}}``
(the capabilities hold when that argument is true). :data:`RULES` is the one table of
combinations refused; :func:`check_combinations` runs it over every pair of callbacks once,
before any training (``pipeline.build``). Callbacks never look at each other: a new technique
declares its capabilities and, at most, adds a row here. A callback that declares nothing
(Lightning's own, ``noop``) combines with anything.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple, Sequence

# name -> what a callback declaring it does (and the attributes the rules read from it).
CAPABILITIES: dict[str, str] = {
    "single": "one entry of this class per run; its options cover the variants",
    "quantizes": "wraps layers in fake quantization and exports int8 after test",
    "calibration_only": "needs no training epoch: trainer.max_epochs=0 is fine",
    "masks_weights": "keeps weight masks bound to named layers for the whole fit",
    "reshapes_net": "removes channels or swaps layers, so a checkpoint may hold a thinner network than model.* builds",
    "edits_weights": "zeroes, removes or replaces weights at scheduled epochs; `last_edit_epoch` is the last one "
                     "(None: before the first epoch, or not scheduled by epoch)",
    "clusters_weights": "ties each layer's weights to shared values from epoch `at_epoch` on",
}


class Entry(NamedTuple):
    name: str          # the config entry: callbacks.<name>
    callback: Any
    capabilities: frozenset[str]


@dataclass(frozen=True)
class Rule:
    """Refuse entries ``a`` (with all of ``first``) and ``b`` (with all of ``second``) in one fit.

    ``message(a, b)`` says why and what to do, or returns None where the pair is fine after all
    (a rule that depends on the entries' settings, such as epochs).
    """

    first: frozenset[str]
    second: frozenset[str]
    message: Callable[[Entry, Entry], str | None]


def _same_class(a: Entry, b: Entry) -> str | None:
    if type(a.callback) is not type(b.callback):
        return None
    kind = type(a.callback).__name__
    return (f"only one {kind} callback per run, but `callbacks.{a.name}` and `callbacks.{b.name}` are both {kind}; "
            f"keep one entry and set the variants in its options")


def _two_quantizers(a: Entry, b: Entry) -> str:
    return (f"callbacks.{a.name} and callbacks.{b.name} both quantize the network; pick one of them "
            "(qat trains with quantization, ptq only calibrates)")


def _masks_on_reshaped(a: Entry, b: Entry) -> str:
    return (f"`callbacks.{a.name}` and `callbacks.{b.name}` cannot run in one fit: {b.name} removes channels or "
            f"swaps layers during the fit, so the masks of {a.name} would point at layers that no longer exist. "
            f"Use two runs: `compression=[{b.name}]`, then `compression=[{a.name}] init_from=<that run>/model.pt` "
            "(or the reverse order)")


def _edits_after_clustering(a: Entry, b: Entry) -> str | None:
    last, at = b.callback.last_edit_epoch, a.callback.at_epoch
    if last is None or last < at:
        return None
    return (f"`callbacks.{b.name}` changes the weights until epoch {last} but `callbacks.{a.name}` clusters them at "
            f"epoch {at}: weights must be final before clustering (Han et al.: prune, retrain, then cluster), or "
            f"the clusters come apart. Set `callbacks.{a.name}.at_epoch` to {last + 1} or more, or end "
            f"`callbacks.{b.name}` earlier; got at_epoch={at}")


RULES: tuple[Rule, ...] = (
    Rule(frozenset({"single"}), frozenset({"single"}), _same_class),
    Rule(frozenset({"quantizes"}), frozenset({"quantizes"}), _two_quantizers),
    Rule(frozenset({"masks_weights"}), frozenset({"reshapes_net"}), _masks_on_reshaped),
    Rule(frozenset({"clusters_weights"}), frozenset({"edits_weights"}), _edits_after_clustering),
)


def capabilities_of(target: Any, arguments: Mapping | None = None) -> frozenset[str]:
    """What a callback (or its class, with the config entry's ``arguments``) declares it does."""
    cls = target if isinstance(target, type) else type(target)
    found = set(getattr(cls, "CAPABILITIES", ()))
    for argument, extra in getattr(cls, "CAPABILITIES_IF", {}).items():
        if target is cls:
            value = (arguments or {}).get(argument, inspect.signature(cls).parameters[argument].default)
        else:
            value = getattr(target, argument)
        if value:
            found |= set(extra)
    unknown = found - CAPABILITIES.keys()
    if unknown:
        raise TypeError(f"{cls.__qualname__} declares unknown capabilities {sorted(unknown)}; "
                        f"known: {', '.join(CAPABILITIES)} (pipeline/combinations.py)")
    return frozenset(found)


def _default_name(callback: Any) -> str:
    """The entry name by convention: one technique = one callback file = one config entry."""
    return type(callback).__module__.rpartition(".")[2]


def check_combinations(callbacks: Sequence[Any], names: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` for the first pair of callbacks the rules refuse (in list order).

    ``names``: each callback's config entry (``callbacks.<name>``); by default its module's name.
    """
    if names is None or len(names) != len(callbacks):
        names = [_default_name(c) for c in callbacks]
    entries = [Entry(n, c, capabilities_of(c)) for n, c in zip(names, callbacks)]
    for i, a in enumerate(entries):
        for b in entries[i + 1:]:
            for rule in RULES:
                pairs = [(a, b)] if rule.first == rule.second else [(a, b), (b, a)]
                for x, y in pairs:
                    if rule.first <= x.capabilities and rule.second <= y.capabilities:
                        message = rule.message(x, y)
                        if message:
                            raise ValueError(message)
