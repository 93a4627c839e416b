"""Pure event-time windowing: which window an event belongs to, and in what order it is used."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pipeline.config import WindowConfig
from pipeline.parsing import Event


def window_of(event: Event, window: WindowConfig) -> int:
    """Window index: floor(time / size) for timed events, else by physical line number.

    Windows are aligned to the epoch (not to the first event), so every process, offline or
    online, started at any point of the stream, agrees on the boundaries.
    """
    if event.time is None:
        return (event.line - 1) // window.size_lines
    index = math.floor(event.time / window.size_seconds)
    # Division and multiplication round differently for sizes like 0.1: settle on the products,
    # so that window_start(index) <= time < window_end(index) holds exactly.
    if event.time >= (index + 1) * window.size_seconds:
        index += 1
    elif event.time < index * window.size_seconds:
        index -= 1
    return index


def event_order(event: Event | Mapping[str, Any]) -> tuple:
    """Deterministic order inside a window: event time, then source identity (file line, then
    Kafka coordinates), whatever order the events arrived in. The one sort key for an event as
    an ``Event`` (replay, trainer) and as a topic record (archiver, alerter: ``event_time``,
    ``line`` and ``source``), so every stage orders a window as training did."""
    if isinstance(event, Event):
        time, line, source = event.time, event.line, event.source
    else:
        s = event["source"]
        time, line, source = event["event_time"], event["line"], (s["topic"], s["partition"], s["offset"])
    return (time if time is not None else 0.0, line or 0, source or ("", 0, 0))


def event_clock(event: Event) -> float:
    """The value windows are cut on: event time, or the line number when events have no time."""
    return event.time if event.time is not None else float(event.line)


def window_end(index: int, window: WindowConfig, timed: bool) -> float:
    """Exclusive end of a window on the event clock."""
    if timed:
        return (index + 1) * window.size_seconds
    return float((index + 1) * window.size_lines + 1)


def first_open_window(closed_through: float, window: WindowConfig, timed: bool) -> int:
    """The lowest window whose end is past ``closed_through`` (finite): every window before it is
    closed."""
    size = window.size_seconds if timed else window.size_lines
    index = math.floor(closed_through / size) if timed else math.floor((closed_through - 1) / size)
    while window_end(index - 1, window, timed) > closed_through:  # settle float rounding
        index -= 1
    while window_end(index, window, timed) <= closed_through:
        index += 1
    return index


OUTAGE_GRACE = 30.0  # seconds: time enough for every broker's first fetch answer after an outage


class Watermark:
    """Event-clock watermark: the minimum over input partitions of the newest clock seen there,
    minus the allowed lateness. A partition with no data yet holds it back (-inf); one that
    reported end of input no longer does (+inf).

    An idle partition stops holding it back too (``idle_after`` seconds of processing time, 0:
    never): one that has had no event for that long while another partition had some, such as a
    partition no source writes to, or a source that died. Without this one empty partition of a
    live bus would keep every window open for good. Its next event makes it count again (that
    event is late if its window closed meanwhile). Silence everywhere (a quiet bus, a broker
    away) proves nothing about one partition: it counts for at most ``grace`` seconds (half of
    ``idle_after``, at most OUTAGE_GRACE), and when events come again after one, every other
    partition has ``grace`` seconds to show its own, the backlog another broker may still be
    sending.
    """

    def __init__(self, partitions: int, lateness: float = 0.0, idle_after: float = 0.0,
                 now: float = 0.0):
        self.newest = {p: -math.inf for p in range(partitions)}
        self.lateness = lateness
        self.idle_after = idle_after
        self.grace = min(idle_after / 2, OUTAGE_GRACE)
        # Per partition: the processing time from which it is idle, if nothing comes before.
        # Deadlines, not times of last events: the comparison at the grace's end is then between
        # two equal sums, never a difference that rounding puts a hair short.
        self.idle_from = {p: now + idle_after for p in range(partitions)}
        self.last_heard = now
        self.idle: set[int] = set()

    def observe(self, partition: int, clock: float) -> None:
        newest = self.newest.get(partition, -math.inf)
        # After an end of input, new data means the partition is live again.
        if clock > newest or newest == math.inf:
            self.newest[partition] = clock

    def end_of_input(self, partition: int) -> None:
        self.newest[partition] = math.inf

    def heard(self, partition: int, now: float) -> bool:
        """An event (or end of input) came from ``partition`` at processing time ``now``.
        True when that partition was idle until now."""
        if self.idle_after and now - self.last_heard >= self.grace:  # after silence everywhere
            for p, at in self.idle_from.items():
                self.idle_from[p] = max(at, now + self.grace)
        self.idle_from[partition] = now + self.idle_after
        self.last_heard = now
        if partition in self.idle:
            self.idle.discard(partition)
            return True
        return False

    def find_idle(self, now: float) -> list[int]:
        """Partitions idle from ``now`` on (each said once, until it has events again)."""
        if not self.idle_after:
            return []
        judged = min(now, self.last_heard + self.grace)  # silence everywhere counts this much
        found = [p for p, at in sorted(self.idle_from.items())
                 if p not in self.idle and self.newest.get(p) != math.inf and judged >= at]
        self.idle.update(found)
        return found

    @property
    def value(self) -> float:
        if not self.newest:
            return -math.inf
        live = [c for p, c in self.newest.items() if p not in self.idle] if self.idle else None
        return min(live or self.newest.values()) - self.lateness
