"""Pure alert logic: per-entity score statistics across windows, and the rules that flag events.

A complete window of scores is judged at once: an event is flagged when its loss is extreme for
the window as a whole (percentile) or for one of its entities (robust z-score against that
entity's own history from earlier windows, once the history is long enough). Repeats are
throttled per entity per window (the highest losses are kept). Only then does the window's data
join the histories, so a burst of attacks cannot make itself look normal.

State is plain JSON-able data, saved by the alerter stage with the last window it judged, so a
restart neither forgets history nor counts a window twice.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass, field

from pipeline.config import AlertingConfig

MAD_SCALE = 1.4826  # MAD -> standard deviation for normal data
PAIR = "pair"  # entity kind "src_host->dst_host"


@dataclass
class EntityHistory:
    losses: deque = field(default_factory=deque)
    total_events: int = 0

    def stats(self) -> tuple[float, float]:
        """(median, MAD) of the kept losses."""
        values = sorted(self.losses)
        median = _median(values)
        return median, _median(sorted(abs(v - median) for v in values))


def _median(values: list[float]) -> float:
    n = len(values)
    if n == 0:
        return math.nan
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2


def entity_keys(entities: dict[str, str]) -> list[tuple[str, str]]:
    """(kind, value) for each non-empty entity, plus the src->dst host pair when both exist."""
    keys = [(kind, value) for kind, value in entities.items() if value]
    if entities.get("src_host") and entities.get("dst_host"):
        keys.append((PAIR, f"{entities['src_host']}->{entities['dst_host']}"))
    return keys


@dataclass
class Alert:
    record: dict  # the scored event (ScoredEvent fields)
    window_percentile: float
    reasons: list[str]
    entity_stats: list[dict]


class AlertEngine:
    def __init__(self, config: AlertingConfig):
        self.config = config
        self.histories: dict[tuple[str, str], EntityHistory] = {}
        self.last_window: int | None = None

    def _history(self, key: tuple[str, str]) -> EntityHistory:
        if key not in self.histories:
            self.histories[key] = EntityHistory(deque(maxlen=self.config.history))
        return self.histories[key]

    def judge_window(self, window: int, records: list[dict]) -> list[Alert]:
        """Alerts for one complete window of scores; then learn from it. A window judged
        already (a replay after a restart) returns nothing and changes nothing."""
        if self.last_window is not None and window <= self.last_window:
            return []
        scored = [r for r in records if r["loss"] is not None]
        ranks = _percentiles([r["loss"] for r in scored])
        candidates = []
        for record, percentile in zip(scored, ranks):
            reasons, stats = [], []
            if percentile >= self.config.window_percentile:
                reasons.append(f"loss {record['loss']:.3f} at the {percentile:.2f}th percentile of "
                               f"window {window}")
            for kind, value in entity_keys(record["entities"]):
                history = self.histories.get((kind, value))
                if history is None or len(history.losses) < self.config.min_history:
                    continue
                median, mad = history.stats()
                z = (record["loss"] - median) / (MAD_SCALE * mad + self.config.mad_floor)
                stats.append({"kind": kind, "entity": value, "events": history.total_events,
                              "median": median, "mad": mad, "z": z})
                if z >= self.config.z_threshold:
                    reasons.append(f"{kind} {value}: robust z {z:.1f} against its median "
                                   f"{median:.3f} over {len(history.losses)} events")
            if reasons:
                candidates.append(Alert(record, percentile, reasons, stats))
        alerts = self._throttle(candidates)
        for record in scored:
            for key in entity_keys(record["entities"]):
                history = self._history(key)
                history.losses.append(record["loss"])
                history.total_events += 1
        self.last_window = window
        return alerts

    def _throttle(self, candidates: list[Alert]) -> list[Alert]:
        """At most max_alerts_per_entity per entity per window, highest losses first."""
        kept, per_entity = [], {}
        for alert in sorted(candidates, key=lambda a: (-a.record["loss"], _order(a.record))):
            keys = entity_keys(alert.record["entities"])
            if keys and all(per_entity.get(k, 0) >= self.config.max_alerts_per_entity for k in keys):
                continue
            for key in keys:
                per_entity[key] = per_entity.get(key, 0) + 1
            kept.append(alert)
        return kept

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        return {
            "last_window": self.last_window,
            "histories": [[kind, value, h.total_events, list(h.losses)]
                          for (kind, value), h in sorted(self.histories.items())],
        }

    @classmethod
    def from_state(cls, config: AlertingConfig, state: dict) -> AlertEngine:
        engine = cls(config)
        engine.last_window = state["last_window"]
        for kind, value, total, losses in state["histories"]:
            history = engine._history((kind, value))
            history.losses.extend(float(v) for v in losses)
            history.total_events = int(total)
        return engine


def _order(record: dict) -> tuple:
    source = record["source"]
    return (record["event_time"] or 0.0, record["line"] or 0, source["topic"], source["partition"],
            source["offset"])


def _percentiles(losses: list[float]) -> list[float]:
    """Percentage of the window's scored events with a lower loss (ties count half)."""
    n = len(losses)
    order = sorted(losses)
    return [100.0 * (bisect_left(order, x) + 0.5 * (bisect_right(order, x) - bisect_left(order, x)))
            / n for x in losses]


FIXED_COLUMNS = {"line", "event_time", "window", "loss", "loss_total", "source_topic",
                 "source_partition", "source_offset", "tokens", "token_losses"}


def row_to_record(row: dict[str, str], raw: str = "") -> dict:
    """A scores-file row (replay output or archive) as the scores topic's record."""
    return {
        "source": {"topic": row.get("source_topic", ""),
                   "partition": int(row.get("source_partition") or 0),
                   "offset": int(row.get("source_offset") or 0)},
        "line": int(row["line"]) if row["line"] else None,
        "event_time": float(row["event_time"]) if row["event_time"] else None,
        "window": int(row["window"]),
        "entities": {k: v for k, v in row.items() if k not in FIXED_COLUMNS},
        "loss": float(row["loss"]) if row["loss"] else None,
        "raw": raw,
    }


def alerts_from_rows(rows: list[dict[str, str]], config: AlertingConfig,
                     raw_lines: dict[int, str] | None = None) -> list[Alert]:
    """The alerter's decisions over a whole scores file, window by window in order."""
    windows: dict[int, list[dict]] = {}
    for row in rows:
        raw = (raw_lines or {}).get(int(row["line"]) if row["line"] else -1, "")
        windows.setdefault(int(row["window"]), []).append(row_to_record(row, raw))
    engine = AlertEngine(config)
    alerts = []
    for window in sorted(windows):
        alerts += engine.judge_window(window, sorted(windows[window], key=_order))
    return alerts
