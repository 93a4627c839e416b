"""Gathering a window's records from a topic that carries them followed by a completion record:
the collector, and the stage base of the trainer, archiver and alerter built on it."""

from __future__ import annotations

import logging

from confluent_kafka import Message, TopicPartition

from pipeline.config import Config
from pipeline.runner import Output, assign_from, decode_or_dead_letter
from pipeline.stages.base import BaseStage
from pipeline.topicrecords import identity
from pipeline.windowing import event_order

log = logging.getLogger(__name__)
COMPLETE = "salka.WindowComplete"


class WindowCollector:
    """Records of each window keyed by event identity (so a redelivered record replaces itself),
    handed over once the window's completion record says all of them are there."""

    def __init__(self, what: str):
        self.what = what
        self.windows: dict[int, dict[tuple, object]] = {}

    def add(self, window: int, key: tuple, item: object) -> None:
        self.windows.setdefault(window, {})[key] = item

    def complete(self, window: int, count: int) -> list | None:
        """The window's items, or None while fewer than ``count`` arrived (a re-emission or
        redelivery will bring the rest and a new completion record). Hands over once: this and
        older windows are forgotten."""
        items = self.windows.get(window, {})
        if len(items) < count:
            log.warning("window %d: completion says %d %s, %d received: waiting", window, count,
                        self.what, len(items))
            return None
        for w in [w for w in self.windows if w <= window]:
            del self.windows[w]
        return list(items.values())

    def clear(self) -> None:
        self.windows.clear()


class WindowStage(BaseStage):
    """A stage that reads one single-partition topic of windows (each window's records, then
    its completion record), gathers a window whole (``WindowCollector``), hands it over in event
    order, and is safe to commit up to the completion record of the last window it handled.

    A subclass sets ``record_schema`` and implements ``window_complete``; it may override
    ``item`` (what is kept of a record) and ``already_done`` (windows to skip)."""

    record_schema: str
    # True: the stage saves its input position with its state and reads from there
    # (``resume_offset``; None: from the start), so that state and position agree. False: the
    # group's committed offsets say where to read.
    resumes_from_state = False

    def __init__(self, config: Config, input_topic: str, what: str):
        super().__init__(config)
        self.input_topic = input_topic
        self.pending = WindowCollector(what)
        self.safe_offset: int | None = None  # input topic, partition 0
        self.resume_offset: int | None = None

    def topics(self) -> list[str]:
        return [self.input_topic]

    def on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        if self.resumes_from_state:
            assign_from(consumer, partitions, self.resume_offset)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        # The next assignment reads again from the saved position (or the committed offset).
        self.pending.clear()
        self.safe_offset = None

    def item(self, record: dict) -> tuple[tuple, object]:
        """(identity, what to keep) of one record of a window."""
        return identity(record), record

    def already_done(self, window: int) -> bool:
        """A window handled before (re-emitted or redelivered): skipped, counted in ``skipped``."""
        return False

    def window_complete(self, out: Output, window: int, items: list, msg: Message,
                        complete: dict) -> None:
        """A whole window, its items in event order; ``complete`` is its completion record."""
        raise NotImplementedError

    def handle(self, msg: Message, out: Output) -> None:
        decoded = decode_or_dead_letter(self, msg, out, (self.record_schema, COMPLETE))
        if decoded is None:
            return
        name, record = decoded
        window = record["window"]
        if self.already_done(window):
            self.counts["skipped"] += 1
            if name == COMPLETE:
                self.safe_offset = msg.offset() + 1
            return
        if name != COMPLETE:
            self.pending.add(window, *self.item(record))
            return
        items = self.pending.complete(window, record["count"])
        if items is None:
            return
        self.window_complete(out, window, sorted(items, key=event_order), msg, record)
        self.safe_offset = msg.offset() + 1

    def safe_offsets(self) -> list[TopicPartition]:
        if self.safe_offset is None:
            return []
        return [TopicPartition(self.input_topic, 0, self.safe_offset)]
