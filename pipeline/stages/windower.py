"""Windower stage: tokenized events -> closed event-time windows (events + completion record).

A window closes when the watermark (minimum over the tokens partitions of the newest event time
seen there, minus the allowed lateness) passes its end. An event whose window has closed goes to
the late topic with how late it was. Exactly one windower runs (the watermark is global).

Crash safety without a transaction: input offsets are committed only up to the oldest event still
buffered in an open window, and a small state file (last closed window + how far each partition
was read when it closed) lets a restarted windower skip re-read events it already emitted or
routed as late. A crash between emitting and saving state re-emits the window; the trainer
deduplicates by event identity.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from confluent_kafka import Message, TopicPartition

from pipeline.config import Config
from pipeline.kafka import partition_count
from pipeline.parsing import LineParser
from pipeline.records import CONTROL_HEADER, END_OF_INPUT, dead_letter, identity, record_to_event
from pipeline.runner import Output, header
from pipeline.serde import DecodeError, codec
from pipeline.windowing import Watermark, event_clock, event_order, window_end, window_of

log = logging.getLogger(__name__)


class WindowerStage:
    name = "windower"

    def __init__(self, config: Config):
        self.config = config
        self.timed = bool(config.input.time_field)
        self.model_fields = LineParser(config.input).model_fields
        self.state_path = Path(config.streaming.state_dir) / "windower.json"
        self.watermark: Watermark | None = None
        self.open: dict[int, dict[tuple, tuple]] = {}  # window -> identity -> (event, record, p, offset)
        self.next_offsets: dict[int, int] = {}
        self.counts = {"events": 0, "late": 0, "dead_letters": 0, "windows": 0}
        self._dirty = False  # a window closed since the state file was written
        self._load_state()

    # ------------------------------------------------------------------ state

    def _load_state(self) -> None:
        self.last_closed: int | None = None
        self.handled_below: dict[int, int] = {}
        if self.state_path.exists():
            state = json.loads(self.state_path.read_text())
            self.last_closed = state["last_closed"]
            self.handled_below = {int(p): o for p, o in state["handled_below"].items()}
            log.info("windower resumes after window %s", self.last_closed)

    def after_flush(self) -> None:
        handled = {**self.handled_below, **self.next_offsets}
        if handled == self.handled_below and not self._dirty:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"last_closed": self.last_closed,
                                   "handled_below": {str(p): o for p, o in handled.items()}}))
        os.replace(tmp, self.state_path)
        self.handled_below = handled
        self._dirty = False

    # ------------------------------------------------------------------ stage protocol

    def topics(self) -> list[str]:
        return [self.config.topics.tokens]

    def on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        if self.watermark is None:
            count = partition_count(consumer, self.config.topics.tokens)
            self.watermark = Watermark(count, self.config.window.allowed_lateness_seconds
                                       if self.timed else 0.0)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        # Another windower joined (unsupported) or the group rebalanced: start over from the
        # committed offsets and the saved state; re-read events are deduplicated.
        self.open.clear()
        self.next_offsets.clear()
        self.watermark = None
        self._load_state()

    def handle(self, msg: Message, out: Output) -> None:
        partition, offset = msg.partition(), msg.offset()
        self.next_offsets[partition] = offset + 1
        if header(msg, CONTROL_HEADER) == END_OF_INPUT:
            self.watermark.end_of_input(partition)
            return
        try:
            _, record = codec().decode(msg.value(), expected=("salka.TokenizedEvent",))
        except DecodeError as exc:
            self._dead_letter(out, msg, str(exc))
            return
        event = record_to_event(record, self.model_fields)
        window = window_of(event, self.config.window)
        closed = self.last_closed is not None and window <= self.last_closed
        if closed and offset < self.handled_below.get(partition, 0):
            self.watermark.observe(partition, event_clock(event))
            return  # emitted or routed before a restart
        end = window_end(window, self.config.window, self.timed)
        if closed or end <= self.watermark.value:
            self._late(out, record, window, end)
        else:
            self.open.setdefault(window, {})[identity(record)] = (event, record, partition, offset)
            self.counts["events"] += 1
        self.watermark.observe(partition, event_clock(event))

    def _late(self, out: Output, record: dict, window: int, end: float) -> None:
        mark = self.watermark.value
        if not math.isfinite(mark):  # just restarted, or end of input: measure from the close
            mark = window_end(self.last_closed if self.last_closed is not None else window,
                              self.config.window, self.timed)
        late = {"window": window, "watermark": mark, "lateness_seconds": max(0.0, mark - end),
                "event": record}
        out.send_record(self.config.topics.late, "salka.LateEvent", late)
        self.counts["late"] += 1

    def _dead_letter(self, out: Output, msg: Message, reason: str) -> None:
        log.warning("%s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), reason)
        record = dead_letter(self.name, msg.topic(), msg.partition(), msg.offset(), reason, msg.value())
        out.send_record(self.config.topics.dead_letters, "salka.DeadLetter", record)
        self.counts["dead_letters"] += 1

    def tick(self, out: Output) -> bool:
        if self.watermark is None:
            return False
        mark = self.watermark.value
        ready = sorted(w for w in self.open
                       if window_end(w, self.config.window, self.timed) <= mark)
        for window in ready:
            self._emit(out, window, mark)
        return bool(ready)

    def _emit(self, out: Output, window: int, mark: float) -> None:
        members = sorted(self.open.pop(window).values(), key=lambda m: event_order(m[0]))
        topic = self.config.topics.windows
        for _, record, _, _ in members:
            out.send_record(topic, "salka.WindowedEvent", {"window": window, "event": record},
                            partition=0)
        done = {"window": window, "count": len(members),
                "watermark": mark if math.isfinite(mark) else None, "stage": self.name}
        out.send_record(topic, "salka.WindowComplete", done, partition=0)
        self.last_closed = window if self.last_closed is None else max(self.last_closed, window)
        self._dirty = True
        self.counts["windows"] += 1
        log.info("window %d closed: %d events (watermark %s)", window, len(members), mark)

    def safe_offsets(self) -> list[TopicPartition]:
        """Up to the oldest event still buffered in an open window, per partition."""
        oldest = dict(self.next_offsets)
        for members in self.open.values():
            for _, _, partition, offset in members.values():
                oldest[partition] = min(oldest.get(partition, offset), offset)
        topic = self.config.topics.tokens
        return [TopicPartition(topic, p, o) for p, o in oldest.items()]

    def close(self, out: Output) -> None:
        log.info("windower totals: %s; %d windows still open", self.counts, len(self.open))
