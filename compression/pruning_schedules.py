"""Target sparsity as a pure function of the training step (CONVENTIONS 3: derived, not stored).

Three schedules, each a pruning *event* list plus the sparsity reached at each event:

* one-shot: prune to ``s_f`` once, at a given step.
* iterative (Han et al. 2015, "Learning both Weights and Connections"; Frankle & Carbin 2019):
  prune ``rate`` of what remains every ``every`` steps, ``times`` times:
  ``s_k = 1 - (1 - rate)^k``.
* gradual AGP (Zhu & Gupta 2017, "To prune, or not to prune", eq. 1):
  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3`` for ``t in {t0, t0 + dt, ..., t0 + n dt}``.

Steps are optimizer steps (``trainer.global_step``); epoch-based settings are converted with the
number of optimizer steps per epoch by the caller.
"""
from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("oneshot", "iterative", "agp")


def agp_sparsity(step: int, initial: float, final: float, start: int, end: int, every: int) -> float:
    """Zhu & Gupta cubic sparsity at ``step`` (held between events, ``final`` after ``end``)."""
    if step < start:
        return 0.0
    if end <= start:
        return final
    n = max(1, (end - start) // every)   # number of increments
    k = min(n, (step - start) // every)  # increments done by ``step``
    return final + (initial - final) * (1.0 - k / n) ** 3


def iterative_sparsity(step: int, rate: float, start: int, every: int, times: int) -> float:
    """``1 - (1 - rate)^k`` after the k-th of ``times`` prunings at ``start, start + every, ...``."""
    if step < start:
        return 0.0
    k = min(times, (step - start) // every + 1)
    return 1.0 - (1.0 - rate) ** k


@dataclass(frozen=True)
class PruningSchedule:
    """When to prune and to what sparsity, all in optimizer steps.

    ``kind``: oneshot (``start``, ``final``), iterative (``rate``, ``start``, ``every``, ``times``),
    agp (``initial``, ``final``, ``start``, ``end``, ``every``).
    """

    kind: str
    final: float = 0.0
    start: int = 0
    end: int = 0
    every: int = 1
    times: int = 1
    rate: float = 0.0
    initial: float = 0.0

    def target(self, step: int) -> float:
        """Sparsity that must hold once the event at ``step`` (if any) is applied."""
        if self.kind == "oneshot":
            return self.final if step >= self.start else 0.0
        if self.kind == "iterative":
            return iterative_sparsity(step, self.rate, self.start, self.every, self.times)
        return agp_sparsity(step, self.initial, self.final, self.start, self.end, self.every)

    def events(self) -> list[int]:
        """Every step at which the masks are recomputed."""
        if self.kind == "oneshot":
            return [self.start]
        if self.kind == "iterative":
            return [self.start + i * self.every for i in range(self.times)]
        n = max(1, (self.end - self.start) // self.every)
        return [self.start + i * self.every for i in range(n + 1)]

    def is_event(self, step: int) -> bool:
        if step < self.start:
            return False
        if self.kind == "oneshot":
            return step == self.start
        if self.kind == "iterative":
            return (step - self.start) % self.every == 0 and (step - self.start) // self.every < self.times
        n = max(1, (self.end - self.start) // self.every)
        return (step - self.start) % self.every == 0 and (step - self.start) // self.every <= n

    @property
    def last_step(self) -> int:
        return self.events()[-1]
