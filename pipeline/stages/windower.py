"""Windower stage: tokenized events -> the windows topic, each on-time event forwarded as it arrives
with its window, and a completion record per window once it closes.

A window closes when the watermark (minimum over the tokens partitions of the newest event time
seen there, minus the allowed lateness; a partition idle for streaming.idle_partition_seconds does
not count until its next event) passes its end. An event whose window has closed goes to
the late topic with how late it was. Exactly one windower runs (the watermark is global).

Nothing is held per event: an on-time event is forwarded at once (to the windows partition of its
tokens partition, where scorers score it), and only a count per open window is kept. When a
window closes its completion record (partition 0) says how many distinct events it has, and the
trainer reads them back from the topic. When windows close that had no events, a completion record
with count 0 says so, so that scorers know the newest model also serves the window after them.

Redelivered events (a restarted tokenizer or windower reads again) are recognised by their raw
record's offset: a tokenizer writes each raw partition's events in offset order, so an event at or
below the highest raw offset already seen from its raw partition is a repeat, and is dropped. A
small state file (counts of the open windows, the highest raw offset seen per raw partition, the
newest clock and read position per tokens partition) is saved once the forwarded events are
acknowledged, before the input offsets are committed. A crash before the save forwards some events
again; every reader deduplicates by event identity.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from confluent_kafka import Message, TopicPartition

from pipeline.atomic import quarantine, write_bytes_atomic
from pipeline.config import Config
from pipeline.kafka import partition_count
from pipeline.parsing import LineParser
from pipeline.runner import Output, decode_or_dead_letter, header
from pipeline.serde import windowed_event_value
from pipeline.stages.base import BaseStage
from pipeline.topicrecords import CONTROL_HEADER, END_OF_INPUT, record_to_event
from pipeline.windowing import Watermark, event_clock, first_open_window, window_end, window_of

log = logging.getLogger(__name__)


class WindowerStage(BaseStage):
    name = "windower"
    needs_every_partition = True  # one process: a second one waits (runner)

    def __init__(self, config: Config):
        super().__init__(config)
        self.timed = bool(config.input.time_field)
        self.model_fields = LineParser(config.input).model_fields
        self.state_path = Path(config.streaming.state_dir) / "windower.json"
        self.clock = time.monotonic  # processing time, for idle partitions
        self.watermark: Watermark | None = None
        self.windows_partitions: int | None = None
        self.next_offsets: dict[int, int] = {}
        self.counts = {"events": 0, "late": 0, "dead_letters": 0, "windows": 0, "repeats": 0}
        self._load_state()

    # ------------------------------------------------------------------ state

    def _load_state(self) -> None:
        # Every window ending at or before closed_through is closed (emitted, or passed empty).
        self.closed_through = -math.inf
        self.reported_through: int | None = None  # last window a completion record covers
        self.open: dict[int, int] = {}  # open window -> distinct events forwarded
        self.seen: dict[tuple[str, int], int] = {}  # raw (topic, partition) -> highest raw offset
        # Per tokens partition: the newest clock and where reading resumes (everything before it
        # was forwarded or routed, and acknowledged).
        self.restored_newest: dict[int, float] = {}
        self.resume: dict[int, int] = {}
        if self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text())
                if "open" not in state:  # its read position is the oldest event it buffered
                    raise ValueError("written by a release that held windows in memory")
                self.closed_through = _float(state["closed_through"])
                self.reported_through = state.get("reported_through")
                self.open = {int(w): int(c) for w, c in state["open"].items()}
                self.seen = {(t, int(p)): int(o) for t, p, o in state["seen"]}
                self.restored_newest = {int(p): _float(c) for p, c in state["newest"].items()}
                self.resume = {int(p): int(o) for p, o in state["resume"].items()}
                log.info("windower resumes: windows ending by %s are closed, %d open",
                         self.closed_through, len(self.open))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                self.closed_through, self.reported_through, self.open, self.seen = -math.inf, None, {}, {}
                self.restored_newest, self.resume = {}, {}
                quarantine(self.state_path, f"unreadable windower state ({exc.__class__.__name__}: "
                           f"{exc})", "rebuilding from the committed offsets")
        self.saved = self._state()

    def _state(self) -> dict:
        newest = dict(self.restored_newest)
        if self.watermark is not None:
            newest.update(self.watermark.newest)
        return {"closed_through": _json_float(self.closed_through),
                "reported_through": self.reported_through,
                "open": {str(w): c for w, c in sorted(self.open.items())},
                "seen": [[t, p, o] for (t, p), o in sorted(self.seen.items())],
                "newest": {str(p): _json_float(c) for p, c in sorted(newest.items())},
                "resume": {str(p): o for p, o in sorted({**self.resume, **self.next_offsets}.items())}}

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
                                       if self.timed else 0.0,
                                       self.config.streaming.idle_partition_seconds, self.clock())
            self.windows_partitions = partition_count(consumer, self.config.topics.windows)
        for tp in partitions:
            if tp.partition in self.resume:  # the state file, not the group, says where to read
                tp.offset = self.resume[tp.partition]
            clock = self.restored_newest.get(tp.partition)
            if clock is not None:  # nothing before the resume position is read again
                self.watermark.newest[tp.partition] = clock
        consumer.assign(partitions)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        # Another windower joined (unsupported) or the group rebalanced: start over from the
        # saved state; events forwarded since are forwarded again and deduplicated downstream.
        self.next_offsets.clear()
        self.watermark = None
        self._load_state()

    def handle(self, msg: Message, out: Output) -> None:
        partition, offset = msg.partition(), msg.offset()
        self.next_offsets[partition] = offset + 1
        if header(msg, CONTROL_HEADER) == END_OF_INPUT:
            self.watermark.end_of_input(partition)
            self._heard(partition)
            return
        decoded = decode_or_dead_letter(self, msg, out, ("salka.TokenizedEvent",))
        if decoded is None:
            return
        record = decoded[1]
        event = record_to_event(record, self.model_fields)
        self.watermark.observe(partition, event_clock(event))
        self._heard(partition)
        window = window_of(event, self.config.window)
        end = window_end(window, self.config.window, self.timed)
        raw = event.source[:2]
        if event.source[2] <= self.seen.get(raw, -1):
            self.counts["repeats"] += 1  # forwarded or routed as late the first time
            return
        self.seen[raw] = event.source[2]
        self.counts["events"] += 1
        if end <= max(self.closed_through, self.watermark.value):
            # The watermark passed the window's end before this event came: late, even if the
            # window is still waiting to be closed at the end of this batch, so that batch
            # boundaries never decide what is late.
            self._late(out, record, window, end)
            return
        out.send(self.config.topics.windows, windowed_event_value(window, msg.value()),
                 partition=partition % (self.windows_partitions or 1))
        self.open[window] = self.open.get(window, 0) + 1

    def _heard(self, partition: int) -> None:
        if self.watermark.heard(partition, self.clock()):
            log.info("%s[%d] has events again: the watermark waits for it again",
                     self.config.topics.tokens, partition)

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
        for partition in self.watermark.find_idle(self.clock()):
            log.warning("%s[%d] has had no event for %.0fs while other partitions had some: the "
                        "watermark no longer waits for it (streaming.idle_partition_seconds), so "
                        "windows close on the others; its events in a closed window go to the late "
                        "topic", self.config.topics.tokens, partition,
                        self.config.streaming.idle_partition_seconds)
        mark = self.watermark.value
        ready = sorted(w for w in self.open if window_end(w, self.config.window, self.timed) <= mark)
        for window in ready:
            self._complete(out, window, self.open.pop(window), mark)
        if math.isfinite(mark):
            self.closed_through = max(self.closed_through, mark)
        elif ready:  # end of input: closed up to the last window, and live again on new data
            last = window_end(ready[-1], self.config.window, self.timed)
            self.closed_through = max(self.closed_through, last)
        if not math.isfinite(self.closed_through):
            return bool(ready)
        # Windows that closed without events: say so, so that the newest model serves past them.
        last_closed = first_open_window(self.closed_through, self.config.window, self.timed) - 1
        if self.reported_through is None or last_closed > self.reported_through:
            self._complete(out, last_closed, 0, mark)
            return True
        return bool(ready)

    def _complete(self, out: Output, window: int, count: int, mark: float) -> None:
        done = {"window": window, "count": count,
                "watermark": mark if math.isfinite(mark) else None, "stage": self.name}
        out.send_record(self.config.topics.windows, "salka.WindowComplete", done, partition=0)
        self.reported_through = max(window, self.reported_through if self.reported_through is not None
                                    else window)
        if count:
            self.counts["windows"] += 1
            log.info("window %d closed: %d events (watermark %s)", window, count, mark,
                     extra={"window": window, "events": count})

    def safe_offsets(self) -> list[TopicPartition]:
        """Everything read was forwarded or routed: commit it all (once acknowledged)."""
        topic = self.config.topics.tokens
        return [TopicPartition(topic, p, o) for p, o in sorted(self.next_offsets.items())]

    def close(self, out: Output) -> None:
        log.info("windower totals: %s; %d windows still open", self.counts, len(self.open))


def _json_float(value: float) -> str | float:
    """JSON has no infinities: write them as strings."""
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _float(value) -> float:
    return -math.inf if value is None else float(value)
