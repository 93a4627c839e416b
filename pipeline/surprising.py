"""Which of a window's events its training leaves out: the most surprising ones
(``training.exclude_top_fraction``).

Each window is scored by the model of the windows before it, then trained on. Trained on whole,
a campaign's first burst teaches the model that its victim and foothold are normal, and its next
hops score low. So before training on window w, the trainer ranks w's events by the score the
alerter ranks them by (the entity-normalised score of pipeline/normalise.py, from the losses of
the model it is about to update: the losses the scorers published) and trains on all but the
top fraction. The events are still scored and alerted on; they only stay out of the weights and
the vocabulary's growth. An entity with no history scores 0 there as in the alerter, so a new
user's first logons are learnt, not held out window after window. With ``training.sample_events``
only the sample could be trained on, so only the sample is scored, ranked and joins the state (the
entities' means are then estimated from it): the pass costs the sample, not the window.

The per-entity state is an alerter engine of its own (pipeline/alerting.py, keeping no loss tails:
only counts, means and the population mean), saved in the trainer's checkpoint. Everything is a
function of the windows' events in event order, in the streaming trainer and in replay alike (both
train through WindowLearner.train_ordered), so streaming == replay holds with it on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from pipeline.alerting import AlertEngine, decode_state, encode_state
from pipeline.config import Config
from pipeline.parsing import Event


class SurpriseRanking:
    """The alerter's per-entity state as the trained windows left it, and the top of a window."""

    def __init__(self, config: Config):
        self.fraction = config.training.exclude_top_fraction
        self.input = config.input
        # Counts and means only: the robust z-score's loss tails are the alerter's business.
        self.alerting = dataclasses.replace(config.alerting, history=0)
        self.engine = AlertEngine(self.alerting)

    @classmethod
    def for_config(cls, config: Config) -> SurpriseRanking | None:
        return cls(config) if config.training.exclude_top_fraction > 0 else None

    def _entities(self, event: Event) -> dict[str, str]:
        return {name: event.entity(name, self.input) for name in self.input.entities}

    def top(self, window: int, read: Callable[[], Iterator[Event]],
            losses: np.ndarray | None) -> np.ndarray | None:
        """Which of the events ``read()`` yields (in event order) to leave out: True for the
        ``ceil(fraction x scored)`` highest scores that are positive, ties to the earlier event;
        None: none (no losses yet). ``losses`` are theirs in that order (NaN: unscored). Then
        they join the state, every one that ``read()`` yields (the window's events, or its
        training.sample_events sample), as a window joins the alerter's."""
        def pairs() -> Iterable[tuple[float | None, dict[str, str]]]:
            if losses is None:
                return ((None, self._entities(e)) for e in read())
            return ((None if math.isnan(loss) else float(loss), self._entities(e))
                    for e, loss in zip(read(), losses.tolist()))

        leave_out = None
        if losses is not None and not self.engine.closed(window):
            scores = np.fromiter((-math.inf if s is None else s
                                  for s in self.engine.scores_read(pairs)),
                                 dtype=np.float64, count=len(losses))
            count = math.ceil(self.fraction * int(np.count_nonzero(~np.isnan(losses))))
            order = np.argsort(-scores, kind="stable")[:count]  # stable: ties in event order
            leave_out = np.zeros(len(losses), dtype=bool)
            # Only above the entity's usual: when every score is 0 (each entity new, e.g. the
            # state of a checkpoint from before this key), nothing is surprising.
            leave_out[order] = scores[order] > 0
        self.engine.close_window(window, pairs)
        return leave_out

    def state_dict(self) -> bytes:
        return encode_state(self.engine, {})

    @classmethod
    def from_state(cls, state: bytes | None, config: Config) -> SurpriseRanking | None:
        """The ranking a checkpoint saved; a fresh one when it has none (saved with the key off:
        the entities' history starts here) and the key is on now."""
        ranking = cls.for_config(config)
        if ranking is not None and state is not None:
            ranking.engine, _ = decode_state(bytes(state), ranking.alerting)  # StateFormatError
        return ranking
