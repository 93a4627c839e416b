"""One event's score: what the learner returns, and what score records and rows are made from.

Plain data without torch, so that the Kafka-only stages that carry scores never load it.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.parsing import Event


@dataclass(frozen=True)
class Score:
    event: Event
    window: int
    loss: float | None  # mean per-token cross-entropy (nats); None before any training
    loss_total: float | None
    token_losses: tuple[float, ...] = ()  # per predicted token, when explaining
    tokens: tuple[str, ...] = ()  # the predicted tokens, for display
