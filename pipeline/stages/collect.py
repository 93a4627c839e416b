"""Gathering a window's records from a topic that carries them followed by a completion record."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


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
