"""Pure event-time windowing: which window an event belongs to, and in what order it is used."""

from __future__ import annotations

import math

from pipeline.config import InputConfig, WindowConfig
from pipeline.parsing import Event


def window_of(event: Event, window: WindowConfig) -> int:
    """Window index: floor(time / size) for timed events, else by physical line number.

    Windows are aligned to the epoch (not to the first event), so every process, offline or
    online, started at any point of the stream, agrees on the boundaries.
    """
    if event.time is None:
        return (event.line - 1) // window.size_lines
    return math.floor(event.time / window.size_seconds)


def event_order(event: Event) -> tuple[float, int]:
    """Deterministic order inside a window: event time, then source identity."""
    return (event.time if event.time is not None else 0.0, event.line)


def window_start(index: int, window: WindowConfig, input_config: InputConfig) -> float | None:
    if not input_config.time_field:
        return None
    return index * window.size_seconds
