"""Windower stage: tokenized events -> closed event-time windows (events + completion record).

A window closes when the watermark (minimum over the tokens partitions of the newest event time
seen there, minus the allowed lateness) passes its end. An event whose window has closed goes to
the late topic with how late it was. Exactly one windower runs (the watermark is global).

Crash safety without a transaction: input offsets are committed only up to the oldest event still
buffered in an open window. Redelivered events (a restarted tokenizer or windower reads again) are
recognised by their raw record's offset: a tokenizer writes each raw partition's events in offset
order, so an event at or below the highest raw offset already seen from its raw partition is a
repeat. A repeat of an open window's event replaces itself (same identity); a repeat of a closed
window's event was emitted or routed as late already and is dropped, so it is never mistaken for
a late event. A small state file (last closed window, highest raw offset seen per raw partition)
carries this across restarts. A crash between emitting and saving state re-emits the window; the
trainer deduplicates by event identity.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from confluent_kafka import Message, TopicPartition

from pipeline.atomic import quarantine, write_bytes_atomic
from pipeline.config import Config
from pipeline.kafka import partition_count
from pipeline.parsing import LineParser
from pipeline.runner import Output, decode_or_dead_letter, header
from pipeline.serde import windowed_event_value
from pipeline.stages.base import BaseStage
from pipeline.topicrecords import CONTROL_HEADER, END_OF_INPUT, identity, record_to_event
from pipeline.windowing import Watermark, event_clock, event_order, window_end, window_of

log = logging.getLogger(__name__)


class WindowerStage(BaseStage):
    name = "windower"

    def __init__(self, config: Config):
        super().__init__(config)
        self.timed = bool(config.input.time_field)
        self.model_fields = LineParser(config.input).model_fields
        self.state_path = Path(config.streaming.state_dir) / "windower.json"
        self.watermark: Watermark | None = None
        # window -> identity -> (event order, encoded TokenizedEvent, tokens partition, offset):
        # the bytes as read, not decoded dicts, so a buffered event costs ~0.5 KB, not ~5.6 KB.
        self.open: dict[int, dict[tuple, tuple]] = {}
        self.next_offsets: dict[int, int] = {}
        self.counts = {"events": 0, "late": 0, "dead_letters": 0, "windows": 0, "repeats": 0}
        self._load_state()

    # ------------------------------------------------------------------ state

    def _load_state(self) -> None:
        # Every window ending at or before closed_through is closed (emitted, or passed empty).
        self.closed_through = -math.inf
        self.seen: dict[tuple[str, int], int] = {}  # raw (topic, partition) -> highest raw offset
        # Per tokens partition: the newest clock, where reading resumes (the oldest event still
        # in an open window) and how far it had read. The newest clock is restored because a
        # partition whose input was all consumed (its end-of-input marker included) is not read
        # again; but only once the re-read has caught up, or the restored watermark would close
        # windows whose buffered events have not been re-read yet.
        self.restored_newest: dict[int, float] = {}
        self.resume: dict[int, int] = {}
        self.read_to: dict[int, int] = {}
        self.pending_restore: dict[int, tuple[int, float]] = {}
        if self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text())
                self.closed_through = _float(state["closed_through"])
                self.seen = {(t, int(p)): int(o) for t, p, o in state["seen"]}
                self.restored_newest = {int(p): _float(c) for p, c in state["newest"].items()}
                self.resume = {int(p): int(o) for p, o in state["resume"].items()}
                self.read_to = {int(p): int(o) for p, o in state["read_to"].items()}
                log.info("windower resumes: windows ending by %s are closed", self.closed_through)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self.closed_through, self.seen = -math.inf, {}
                self.restored_newest, self.resume, self.read_to = {}, {}, {}
                quarantine(self.state_path, f"unreadable windower state ({exc.__class__.__name__}: "
                           f"{exc})", "rebuilding from the committed offsets")
        self.saved = self._state()

    def _state(self) -> dict:
        newest = dict(self.watermark.newest) if self.watermark is not None else {}
        newest.update({p: c for p, (_, c) in self.pending_restore.items()})
        resume = {tp.partition: tp.offset for tp in self.safe_offsets()}
        read_to = {**self.read_to, **self.next_offsets}
        return {"closed_through": _json_float(self.closed_through),
                "seen": [[t, p, o] for (t, p), o in sorted(self.seen.items())],
                "newest": {str(p): _json_float(c) for p, c in sorted(newest.items())},
                "resume": {str(p): o for p, o in sorted({**self.resume, **resume}.items())},
                "read_to": {str(p): o for p, o in sorted(read_to.items())}}

    def after_flush(self) -> None:
        state = self._state()
        if state == self.saved:
            return
        write_bytes_atomic(self.state_path, json.dumps(state).encode())
        self.saved = state

    # ------------------------------------------------------------------ stage protocol

    def topics(self) -> list[str]:
        return [self.config.topics.tokens]

    def on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        if self.watermark is None:
            count = partition_count(consumer, self.config.topics.tokens)
            self.watermark = Watermark(count, self.config.window.allowed_lateness_seconds
                                       if self.timed else 0.0)
        for tp in partitions:
            if tp.partition in self.resume:  # the state file, not the group, says where to read
                tp.offset = self.resume[tp.partition]
            clock = self.restored_newest.get(tp.partition)
            if clock is None:
                continue
            if self.resume.get(tp.partition, 0) >= self.read_to.get(tp.partition, 0):
                self.watermark.newest[tp.partition] = clock  # nothing to re-read there
            else:
                self.pending_restore[tp.partition] = (self.read_to[tp.partition], clock)
        consumer.assign(partitions)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        # Another windower joined (unsupported) or the group rebalanced: start over from the
        # committed offsets and the saved state; re-read events are recognised as repeats.
        self.open.clear()
        self.next_offsets.clear()
        self.pending_restore.clear()
        self.watermark = None
        self._load_state()

    def handle(self, msg: Message, out: Output) -> None:
        self._handle(msg, out)
        restore = self.pending_restore.get(msg.partition())
        if restore is not None and msg.offset() + 1 >= restore[0]:  # re-read caught up
            self.watermark.observe(msg.partition(), restore[1])
            del self.pending_restore[msg.partition()]

    def _handle(self, msg: Message, out: Output) -> None:
        partition, offset = msg.partition(), msg.offset()
        self.next_offsets[partition] = offset + 1
        if header(msg, CONTROL_HEADER) == END_OF_INPUT:
            self.watermark.end_of_input(partition)
            return
        decoded = decode_or_dead_letter(self, msg, out, ("salka.TokenizedEvent",))
        if decoded is None:
            return
        record = decoded[1]
        event = record_to_event(record, self.model_fields)
        self.watermark.observe(partition, event_clock(event))
        window = window_of(event, self.config.window)
        end = window_end(window, self.config.window, self.timed)
        raw = event.source[:2]
        repeat = event.source[2] <= self.seen.get(raw, -1)
        self.seen[raw] = max(event.source[2], self.seen.get(raw, -1))
        key = identity(record)
        key = (sys.intern(key[0]), key[1], key[2])  # one topic string for all buffered events
        member = ((*event_order(event)[:2], key), msg.value(), partition, offset)
        if repeat and window in self.open:  # buffered already: replaces itself
            self.open[window][key] = member
        elif repeat and end <= self.closed_through:
            self.counts["repeats"] += 1  # emitted or routed as late the first time
        elif end <= max(self.closed_through, self.watermark.value):
            # The watermark passed the window's end before this event came: late, even if the
            # window is still waiting to be emitted at the end of this batch, so that batch
            # boundaries never decide what is late.
            self._late(out, record, window, end)
        else:
            self.open.setdefault(window, {})[key] = member
        if not repeat:
            self.counts["events"] += 1

    def _late(self, out: Output, record: dict, window: int, end: float) -> None:
        mark = max(self.closed_through, self.watermark.value)
        if not math.isfinite(mark):  # end of input: measure from the last window closed
            mark = self.closed_through if math.isfinite(self.closed_through) else end
        late = {"window": window, "watermark": mark, "lateness_seconds": max(0.0, mark - end),
                "event": record}
        out.send_record(self.config.topics.late, "salka.LateEvent", late)
        self.counts["late"] += 1

    def tick(self, out: Output) -> bool:
        if self.watermark is None:
            return False
        mark = self.watermark.value
        ready = sorted(w for w in self.open
                       if window_end(w, self.config.window, self.timed) <= mark)
        for window in ready:
            self._emit(out, window, mark)
        if math.isfinite(mark):
            self.closed_through = max(self.closed_through, mark)
        elif ready:  # end of input: closed up to the last window, and live again on new data
            last = window_end(ready[-1], self.config.window, self.timed)
            self.closed_through = max(self.closed_through, last)
        return bool(ready)

    def _emit(self, out: Output, window: int, mark: float) -> None:
        members = sorted(self.open.pop(window).values(), key=lambda m: m[0])
        topic = self.config.topics.windows
        for _, value, _, _ in members:
            out.send(topic, windowed_event_value(window, value), partition=0)
        done = {"window": window, "count": len(members),
                "watermark": mark if math.isfinite(mark) else None, "stage": self.name}
        out.send_record(topic, "salka.WindowComplete", done, partition=0)
        self.counts["windows"] += 1
        log.info("window %d closed: %d events (watermark %s)", window, len(members), mark,
                 extra={"window": window, "events": len(members)})

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


def _json_float(value: float) -> str | float:
    """JSON has no infinities: write them as strings."""
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _float(value) -> float:
    return -math.inf if value is None else float(value)
