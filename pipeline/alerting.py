"""Pure alert logic: per-entity score statistics across windows, and the rules that flag events.

A complete window of scores is judged at once: an event is flagged when its loss is extreme for
the window as a whole (percentile) or for one of its entities (robust z-score against that
entity's own history from earlier windows, once the history is long enough). Repeats are
throttled per entity per window (the highest losses are kept). Only then does the window's data
join the histories, so a burst of attacks cannot make itself look normal.

Memory is bounded: each entity keeps its last ``history`` losses in a flat float array, and
entities are evicted least-recently-seen first, by age (absent for more than
``entity_ttl_windows`` windows) and by count (``max_entities``). Eviction depends only on the
windows judged and the (sorted) order of their records, so the alerter stage and the offline
``pipeline alerts`` keep giving the same alerts.

State (histories in LRU order, last window judged) is saved by the alerter stage in a compact
binary form (``encode_state``: numpy arrays in an .npz, read with allow_pickle=False), so a
restart neither forgets history nor counts a window twice.
"""

from __future__ import annotations

import io
import json
import math
from array import array
from dataclasses import dataclass

import numpy as np

from pipeline.config import AlertingConfig
from pipeline.scorefile import ScoreRow
from pipeline.stats import midrank_percentiles
from pipeline.windowing import event_order

MAD_SCALE = 1.4826  # MAD -> standard deviation for normal data
PAIR = "pair"  # entity kind "src_host->dst_host"


class EntityHistory:
    """An entity's most recent losses (oldest first), its event count and the last window it was
    seen in. Slots and a flat float array: ~0.3 KB + 8 B per loss, a deque of floats costs 3x."""

    __slots__ = ("losses", "total_events", "last_window")

    def __init__(self, losses=(), total_events: int = 0, last_window: int = 0):
        self.losses = array("d", losses)
        self.total_events = total_events
        self.last_window = last_window

    def add(self, loss: float, keep: int) -> None:
        self.losses.append(loss)
        if len(self.losses) > keep:
            del self.losses[0]  # a memmove of at most history * 8 bytes
        self.total_events += 1

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


def alert_record(alert: Alert) -> dict:
    """The alert as the alerts topic's record (Avro salka.Alert)."""
    r = alert.record
    return {
        "source": r["source"], "line": r["line"], "event_time": r["event_time"],
        "window": r["window"], "raw": r["raw"], "loss": r["loss"],
        "window_percentile": alert.window_percentile, "entities": r["entities"],
        "entity_stats": alert.entity_stats, "reasons": alert.reasons,
    }


class AlertEngine:
    def __init__(self, config: AlertingConfig):
        self.config = config
        # Insertion order is recency: an entity moves to the end when first seen in a window,
        # so the front holds the least recently seen (evicted first).
        self.histories: dict[tuple[str, str], EntityHistory] = {}
        self.last_window: int | None = None
        self.evicted = 0

    def _touch(self, key: tuple[str, str], window: int) -> EntityHistory:
        history = self.histories.get(key)
        if history is None:
            history = self.histories[key] = EntityHistory(last_window=window)
        elif history.last_window != window:
            del self.histories[key]  # re-inserted at the end: most recently seen
            self.histories[key] = history
            history.last_window = window
        return history

    def _evict(self, window: int) -> None:
        """Drop entities absent for more than entity_ttl_windows windows, then the least
        recently seen beyond max_entities. One pass over the front of the dict: repeated
        next(iter(d)) after deletions at the front would be quadratic."""
        oldest = window - self.config.entity_ttl_windows
        excess = len(self.histories) - self.config.max_entities
        victims = []
        for key, history in self.histories.items():
            if history.last_window >= oldest and len(victims) >= excess:
                break
            victims.append(key)
        for key in victims:
            del self.histories[key]
        self.evicted += len(victims)

    def judge_window(self, window: int, records: list[dict]) -> list[Alert]:
        """Alerts for one complete window of scores; then learn from it. A window judged
        already (a replay after a restart) returns nothing and changes nothing."""
        if self.last_window is not None and window <= self.last_window:
            return []
        scored = [r for r in records if r["loss"] is not None]
        ranks = midrank_percentiles([r["loss"] for r in scored]).tolist()
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
        keep = self.config.history
        for record in scored:
            for key in entity_keys(record["entities"]):
                self._touch(key, window).add(record["loss"], keep)
        self._evict(window)
        self.last_window = window
        return alerts

    def _throttle(self, candidates: list[Alert]) -> list[Alert]:
        """At most max_alerts_per_entity per entity per window, highest losses first."""
        kept, per_entity = [], {}
        for alert in sorted(candidates, key=lambda a: (-a.record["loss"], event_order(a.record))):
            keys = entity_keys(alert.record["entities"])
            if keys and all(per_entity.get(k, 0) >= self.config.max_alerts_per_entity for k in keys):
                continue
            for key in keys:
                per_entity[key] = per_entity.get(key, 0) + 1
            kept.append(alert)
        return kept

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        """As plain JSON-able data (for tests and inspection; the stage saves encode_state)."""
        return {
            "last_window": self.last_window,
            "histories": [[kind, value, h.total_events, h.last_window, list(h.losses)]
                          for (kind, value), h in self.histories.items()],  # in LRU order
        }

    @classmethod
    def from_state(cls, config: AlertingConfig, state: dict) -> AlertEngine:
        engine = cls(config)
        engine.last_window = state["last_window"]
        for kind, value, total, seen, losses in state["histories"]:
            engine.histories[(kind, value)] = EntityHistory(
                (float(v) for v in losses[-config.history:]), int(total), int(seen))
        return engine


STATE_FORMAT = "salka-alerter-state-v2"


class StateFormatError(ValueError):
    """Bytes that are not a readable alerter state."""


def encode_state(engine: AlertEngine, extra: dict) -> bytes:
    """The engine's state as an .npz of flat arrays (per entity its name + 29 bytes + 8 per
    kept loss, ~60% of the JSON, no float formatting) plus ``extra`` (JSON-able, e.g. the
    resume offset)."""
    kinds: dict[str, int] = {}
    kind_ids, names, name_ends, totals, seen, counts = [], [], [], [], [], []
    losses = array("d")
    end = 0
    for (kind, value), history in engine.histories.items():
        kind_ids.append(kinds.setdefault(kind, len(kinds)))
        name = value.encode("utf-8", "surrogatepass")
        names.append(name)
        end += len(name)
        name_ends.append(end)
        totals.append(history.total_events)
        seen.append(history.last_window)
        counts.append(len(history.losses))
        losses.extend(history.losses)
    meta = {"format": STATE_FORMAT, "last_window": engine.last_window, "kinds": list(kinds),
            "extra": extra}
    out = io.BytesIO()
    np.savez(out, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             kind=np.array(kind_ids, dtype=np.uint32),
             names=np.frombuffer(b"".join(names), dtype=np.uint8),
             name_ends=np.array(name_ends, dtype=np.int64),
             total=np.array(totals, dtype=np.int64), seen=np.array(seen, dtype=np.int64),
             count=np.array(counts, dtype=np.int64), losses=np.frombuffer(losses, dtype=np.float64))
    return out.getvalue()


def decode_state(data: bytes, config: AlertingConfig) -> tuple[AlertEngine, dict]:
    """(engine, extra) from encode_state's bytes; StateFormatError for anything else."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:  # zip CRCs catch bit rot
            arrays = {name: npz[name] for name in ("meta", "kind", "names", "name_ends", "total",
                                                   "seen", "count", "losses")}
        meta = json.loads(arrays["meta"].tobytes())
        if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
            raise StateFormatError(f"not a salka alerter state ({STATE_FORMAT} expected)")
        n = len(arrays["kind"])
        if any(len(arrays[name]) != n for name in ("name_ends", "total", "seen", "count")) or \
                int(arrays["count"].sum()) != len(arrays["losses"]) or \
                (n and int(arrays["name_ends"][-1]) != len(arrays["names"])):
            raise StateFormatError("inconsistent array lengths")
        kinds, blob = meta["kinds"], arrays["names"].tobytes()
        engine = AlertEngine(config)
        engine.last_window = meta["last_window"]
        losses = arrays["losses"].tolist()
        start = used = 0
        for kind, end, total, seen, count in zip(arrays["kind"].tolist(),
                                                 arrays["name_ends"].tolist(),
                                                 arrays["total"].tolist(), arrays["seen"].tolist(),
                                                 arrays["count"].tolist()):
            value = blob[start:end].decode("utf-8", "surrogatepass")
            kept = losses[used:used + count][-config.history:]
            engine.histories[(kinds[kind], value)] = EntityHistory(kept, total, seen)
            start, used = end, used + count
        return engine, meta["extra"]
    except StateFormatError:
        raise
    except Exception as exc:  # zipfile, numpy and json raise many kinds for damaged bytes
        raise StateFormatError(f"{exc.__class__.__name__}: {exc}") from exc


def row_to_record(row: ScoreRow, raw: str = "") -> dict:
    """A scores-file row (replay output or archive) as the scores topic's record."""
    topic, partition, offset = row.source or ("", 0, 0)
    return {
        "source": {"topic": topic, "partition": partition, "offset": offset},
        "line": row.line,
        "event_time": row.event_time,
        "window": row.window,
        "entities": dict(row.entities),
        "loss": row.loss,
        "raw": raw,
    }


def alerts_from_rows(rows: list[ScoreRow], config: AlertingConfig,
                     raw_lines: dict[int, str] | None = None) -> list[Alert]:
    """The alerter's decisions over a whole scores file, window by window in order."""
    windows: dict[int, list[dict]] = {}
    for row in rows:
        raw = (raw_lines or {}).get(row.line, "") if row.line is not None else ""
        windows.setdefault(row.window, []).append(row_to_record(row, raw))
    engine = AlertEngine(config)
    alerts = []
    for window in sorted(windows):
        alerts += engine.judge_window(window, sorted(windows[window], key=event_order))
    return alerts
