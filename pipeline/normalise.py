"""Entity-normalised scores: how surprising an event is *for its entity*, given that entity's own
history, on the loss's scale (nats).

For an event of window w with loss ``x``, and its entity e (``alerting.normalise``, e.g. the user)
as the windows before w left it: ``seen`` events (scored or not), ``n`` losses with mean ``m``::

    baseline = (n * m + prior * P) / (n + prior)       # the entity's mean, shrunk toward P
    score    = seen / (seen + trust) * (x - baseline)  # nats above it, weighed by history

``P`` is the mean loss of the latest earlier window that had losses (the population as the latest
model sees it; the first window with losses, which has no earlier one, uses its own mean, as its
percentile threshold does). With several entity kinds the score is the largest.

Why this form (benchmarks/detect.py chose it over the alternatives it was measured against):
- Dividing by the entity's standard deviation (a z-score) ranks worse: entities with steady,
  low-variance losses (service accounts) blow up on any small change, and a campaign on one account
  inflates that account's variance so its later events look normal.
- An entity with no history has no "usual" to be surprising against: its first events score
  about 0 (neutral), not as high as its raw loss says. Onboarded users' first logons have the
  highest raw losses of all (their names are new to the model); with a raw or population z-score
  they fill the top of the list. The weight counts every earlier event of the entity, unscored ones
  too, so an entity the model saw in the first (unscored) window is not new.
- Shrinkage toward P keeps an entity with a handful of losses from being judged against a noisy
  mean of two events.

Everything here is pure; pipeline/alerting.py keeps the per-entity state (in its entity histories,
saved with the alerter's state) and runs these functions for the alerter stage, ``pipeline alerts``,
``pipeline top`` and the report alike, so all of them give the same numbers.
"""

from __future__ import annotations

import math


class Moments:
    """Count, mean and sum of squared deviations of losses (Welford), mergeable (Chan et al.)."""

    __slots__ = ("n", "mean", "m2")

    def __init__(self, n: int = 0, mean: float = 0.0, m2: float = 0.0):
        self.n, self.mean, self.m2 = n, mean, m2

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    def merge(self, other: Moments) -> None:
        """Fold ``other`` (later losses) in; exact, in one step, whatever their number."""
        if other.n == 0:
            return
        n = self.n + other.n
        delta = other.mean - self.mean
        self.mean += delta * other.n / n
        self.m2 += other.m2 + delta * delta * self.n * other.n / n
        self.n = n

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else 0.0


def baseline(n: int, mean: float, population_mean: float, prior: float) -> float:
    """The entity's expected loss: its mean over ``n`` losses, shrunk toward the population's
    with the weight of ``prior`` pseudo-losses."""
    if n + prior == 0:  # prior 0 and no loss yet: nothing but the population to go by
        return population_mean
    return (n * mean + prior * population_mean) / (n + prior)


def weight(seen: int, trust: float) -> float:
    """How much an entity's surprise counts: 0 with no history, 1/2 after ``trust`` events."""
    return seen / (seen + trust)


def entity_score(loss: float, seen: int, n: int, mean: float, population_mean: float,
                 prior: float, trust: float) -> float:
    """Nats above the entity's (shrunk) mean loss, weighed by how much history it has."""
    return weight(seen, trust) * (loss - baseline(n, mean, population_mean, prior))


def entities(setting: str | list[str]) -> list[str]:
    """The entity names of an ``alerting.normalise`` setting ("auto": the user, as a loaded
    config resolves it when input.entities has one)."""
    return ["user"] if setting == "auto" else list(setting)


def combine(scores: list[float], loss: float, population_mean: float) -> float:
    """The event's score from its entities' scores: the largest; with no entity to normalise by
    (every configured entity empty), the loss against the population's mean."""
    return max(scores) if scores else loss - population_mean
