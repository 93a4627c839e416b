"""Gathering a window's records from a topic that carries them and, somewhere, a completion record
saying how many there are: the collector, and the stage base of the trainer, archiver and alerter
built on it.

The records of a window may come before or after its completion record, and from any partition
(the windower forwards events as they arrive; scorers publish scores as they score them). A window
is handed over once its completion record arrived and that many distinct records did, windows in
the order of their numbers.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Message, TopicPartition

from pipeline.config import Config
from pipeline.runner import Output, decode_or_dead_letter
from pipeline.serde import codec
from pipeline.spill import SpilledWindow
from pipeline.stages.base import BaseStage
from pipeline.topicrecords import identity
from pipeline.windowing import event_order

log = logging.getLogger(__name__)
COMPLETE = "salka.WindowComplete"


class WindowCollector:
    """Records of each window keyed by event identity (so a redelivered record replaces itself),
    the counts completion records announced, and per window and partition the lowest offset a
    record of it came from (where a restart must read again while it is pending)."""

    def __init__(self, what: str):
        self.what = what
        self.windows: dict[int, dict[tuple, object]] = {}
        self.expected: dict[int, int] = {}
        self.first_offsets: dict[int, dict[int, int]] = {}
        self.waiting_logged: set[int] = set()

    def _seen_at(self, window: int, partition: int, offset: int) -> None:
        firsts = self.first_offsets.setdefault(window, {})
        firsts[partition] = min(firsts.get(partition, offset), offset)

    def add(self, window: int, key: tuple, item: object, partition: int = 0, offset: int = 0) -> None:
        self.windows.setdefault(window, {})[key] = item
        self._seen_at(window, partition, offset)

    def expect(self, window: int, count: int, partition: int = 0, offset: int = 0) -> None:
        self.expected[window] = count
        self._seen_at(window, partition, offset)

    def next_complete(self) -> tuple[int, list] | None:
        """The lowest window whose completion record arrived, with its items, once all of them
        are there (None while some are missing: they are on their way, or a re-emission brings
        them). Hands over once: this and older windows are forgotten."""
        if not self.expected:
            return None
        window = min(self.expected)
        items = self.windows.get(window, {})
        if len(items) < self.expected[window]:
            if window not in self.waiting_logged:
                self.waiting_logged.add(window)
                log.info("window %d: completion says %d %s, %d received so far: waiting", window,
                         self.expected[window], self.what, len(items))
            return None
        self.forget_through(window)
        return window, list(items.values())

    def forget_through(self, window: int) -> None:
        for table in (self.windows, self.expected, self.first_offsets):
            for w in [w for w in table if w <= window]:
                del table[w]
        self.waiting_logged = {w for w in self.waiting_logged if w > window}

    def oldest_pending(self) -> dict[int, int]:
        """Partition -> the lowest offset of a record of a window not handed over yet."""
        oldest: dict[int, int] = {}
        for firsts in self.first_offsets.values():
            for partition, offset in firsts.items():
                oldest[partition] = min(oldest.get(partition, offset), offset)
        return oldest

    def clear(self) -> None:
        self.windows.clear()
        self.expected.clear()
        self.first_offsets.clear()
        self.waiting_logged.clear()


class SpillCollector(WindowCollector):
    """A WindowCollector that keeps each window's records on disk (pipeline/spill.py) instead of
    in memory, as (event order key, record bytes): what the trainer holds stays bounded however
    large a window gets. A window is handed over as its ``SpilledWindow``, read back in event
    order; the taker discards it when done."""

    def __init__(self, what: str, directory: Path, run_size: int):
        super().__init__(what)
        self.directory = directory
        self.run_size = run_size
        shutil.rmtree(directory, ignore_errors=True)  # a previous run's: its windows are read again
        self.spills: dict[int, SpilledWindow] = {}
        self.counted: dict[int, tuple[int, int]] = {}  # window -> (received, distinct) last counted

    def add(self, window: int, key: tuple, item: tuple, partition: int = 0, offset: int = 0) -> None:
        spilled = self.spills.get(window)
        if spilled is None:
            spilled = self.spills[window] = SpilledWindow(self.directory / f"window-{window}", self.run_size)
        spilled.add(*item)
        self._seen_at(window, partition, offset)

    def next_complete(self) -> tuple[int, SpilledWindow] | None:
        if not self.expected:
            return None
        window = min(self.expected)
        spilled = self.spills.get(window) or SpilledWindow(self.directory / f"window-{window}", self.run_size)
        wanted = self.expected[window]
        if spilled.received < wanted or self._distinct(window, spilled) < wanted:
            if window not in self.waiting_logged:
                self.waiting_logged.add(window)
                log.info("window %d: completion says %d %s, %d received so far: waiting", window,
                         wanted, self.what, spilled.received)
            return None
        self.spills.pop(window, None)
        self.forget_through(window)
        return window, spilled

    def _distinct(self, window: int, spilled: SpilledWindow) -> int:
        """Counted again only when records came since (redeliveries make received > distinct)."""
        received, distinct = self.counted.get(window, (-1, 0))
        if received != spilled.received:
            distinct = spilled.distinct()
            self.counted[window] = (spilled.received, distinct)
        return distinct

    def forget_through(self, window: int) -> None:
        super().forget_through(window)
        for w in [w for w in self.spills if w <= window]:
            self.spills.pop(w).discard()
        self.counted = {w: c for w, c in self.counted.items() if w > window}

    def clear(self) -> None:
        super().clear()
        for spilled in self.spills.values():
            spilled.discard()
        self.spills.clear()
        self.counted.clear()


def spill_directory(config: Config, stage: str) -> Path:
    return Path(config.streaming.state_dir) / "spill" / stage


def resume_positions(saved) -> dict[int, int] | None:
    """A saved input position as partition -> offset: a stage's state written before its input
    had several partitions holds one offset, of partition 0. None: read from the start."""
    if saved is None:
        return None
    if isinstance(saved, int):
        return {0: saved}
    return {int(p): int(o) for p, o in dict(saved).items()}


class WindowStage(BaseStage):
    """A stage that reads a topic of windows' records and completion records, keeps each window's
    records on disk until it is whole (``SpillCollector``), hands it over in window order, read
    back in event order, and is safe to commit, per partition, up to the first record of a window
    it has not handled yet.

    A subclass sets ``record_schema`` and implements ``window_complete``; it may override
    ``item`` (what is kept of a record; None: the record is not one of a window's, skip it)
    and ``already_done`` (windows to skip)."""

    record_schema: str
    # True: the stage saves its input position with its state and reads from there
    # (``resume_offset``; None: from the start), so that state and position agree. False: the
    # group's committed offsets say where to read.
    resumes_from_state = False

    def __init__(self, config: Config, input_topic: str, what: str):
        super().__init__(config)
        self.input_topic = input_topic
        # A window's records wait on disk, not in memory, until it is complete (pipeline/spill.py).
        self.pending = SpillCollector(what, spill_directory(config, self.name),
                                      config.streaming.spill_events)
        self.next_offsets: dict[int, int] = {}  # partition -> offset after the last one read
        self.completions: dict[int, dict] = {}  # window -> its completion record, while pending
        self.resume_offset: dict[int, int] | None = None
        # The last window handed over: a record of it or an older one that comes again (a scorer
        # or windower repeating itself) is skipped, not kept pending with no completion to come,
        # which would hold the safe offset back at it.
        self.handed_through: int | None = None

    def topics(self) -> list[str]:
        return [self.input_topic]

    def on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        if not self.resumes_from_state:
            return
        saved = resume_positions(self.resume_offset) or {}
        for tp in partitions:
            tp.offset = saved.get(tp.partition, OFFSET_BEGINNING)
        consumer.assign(partitions)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        # The next assignment reads again from the saved position (or the committed offset).
        self.pending.clear()
        self.next_offsets.clear()
        self.completions.clear()

    def item(self, record: dict, msg: Message) -> tuple[tuple, tuple] | None:
        """(identity, what to keep) of one record of a window: its bytes as read (``msg``), with
        its place in event order."""
        return self.kept(record, msg)

    def kept(self, event: dict, msg: Message) -> tuple[tuple, tuple]:
        """(identity, (event order key, bytes as read)) for a record whose event is ``event``
        (the record itself, or the event it wraps)."""
        return identity(event), (event_order(event), msg.value())

    def records(self, items: SpilledWindow) -> Iterator[dict]:
        """A handed-over window's records in event order, decoded again (they were checked
        when first read)."""
        for value in items.read():
            yield self.record(value)

    def record(self, value: bytes) -> dict:
        """One value of a handed-over window decoded again."""
        return codec().decode(value, expected=(self.record_schema,))[1]

    def already_done(self, window: int) -> bool:
        """A window handled before (re-emitted or redelivered): skipped, counted in ``skipped``."""
        return False

    def window_complete(self, out: Output, window: int, items: SpilledWindow, msg: Message,
                        complete: dict) -> None:
        """A whole window (``records(items)`` reads it); ``complete`` is its completion record."""
        raise NotImplementedError

    def handle(self, msg: Message, out: Output) -> None:
        partition, offset = msg.partition(), msg.offset()
        self.next_offsets[partition] = offset + 1
        decoded = decode_or_dead_letter(self, msg, out, (self.record_schema, COMPLETE))
        if decoded is None:
            return
        name, record = decoded
        window = record["window"]
        if self.already_done(window):
            self.counts["skipped"] = self.counts.get("skipped", 0) + 1
            return
        kept = None if name == COMPLETE else self.item(record, msg)
        if name != COMPLETE and kept is None:
            return
        if self.handed_through is not None and window <= self.handed_through:
            self.counts["skipped"] = self.counts.get("skipped", 0) + 1
            return
        if name == COMPLETE:
            self.pending.expect(window, record["count"], partition, offset)
            self.completions[window] = record
        else:
            self.pending.add(window, *kept, partition, offset)
        while (done := self.pending.next_complete()) is not None:
            window, items = done
            self.handed_through = window
            try:
                self.window_complete(out, window, items, msg, self.completions.pop(window))
            finally:
                items.discard()
            for w in [w for w in self.completions if w < window]:
                del self.completions[w]

    def safe_positions(self) -> dict[int, int]:
        """Partition -> where a restart must read from: the first record of a window not yet
        handed over, else after the last record read."""
        positions = dict(self.next_offsets)
        positions.update(self.pending.oldest_pending())
        return positions

    def safe_offsets(self) -> list[TopicPartition]:
        return [TopicPartition(self.input_topic, p, o) for p, o in sorted(self.safe_positions().items())]
