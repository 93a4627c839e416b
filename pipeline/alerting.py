"""Pure alert logic: per-entity score statistics across windows, and the rules that flag events.

Each event is judged on its own, as its score arrives (``judge_event``), against what the earlier
windows left: it is flagged when its score is at or above the percentile threshold of the latest
earlier window that had losses (``alerting.window_percentile`` of that window's scores, computed
exactly when it closed), or its loss is extreme for one of its entities (robust z-score against that entity's
own history from earlier windows, once the history is long enough). Repeats are throttled per
entity per window, first come first served: the one rule where the order events are judged in
matters (arrival order in the stage, event order offline). A window's data joins the histories
and gives the next threshold only when it closes (``close_window``), so a burst of attacks cannot
make itself look normal, nor raise its own window's threshold.

The score is the entity-normalised score of pipeline/normalise.py (``alerting.normalise``; the
raw loss when that is empty): each entity history also keeps its event count and the exact mean
and squared deviations of all its losses, and a window's events join them only when it closes
(``close_window`` scores the whole window first), so every score of window w is against windows
< w. ``row_scores`` gives the same scores for a scores file (``pipeline top``, the report).

The first window with losses has no earlier window to take a threshold from: it is judged whole
when it closes (``judge_complete``: percentile within the window itself, highest losses kept by the
throttle), as every window was before alerts went out in real time.

Memory is bounded and flat: each entity keeps its last ``history`` losses on disk
(pipeline/losstore.py; in memory only their median and MAD, which change only when a window
closes), and entities are evicted least-recently-seen first, by age (absent for more than
``entity_ttl_windows`` windows) and by count (``max_entities``). Eviction depends only on the
windows judged and the (sorted) order of their records, so the alerter stage and the offline
``pipeline alerts`` keep giving the same alerts.

State (histories in LRU order, last window judged, the threshold and its window, and for windows
not closed yet the throttle counts and the events alerted on) is saved by the alerter stage in a
compact binary form (``write_state``: numpy arrays in an .npz, read with allow_pickle=False), so a
restart neither forgets history, nor counts a window twice, nor repeats or loses an alert.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from pipeline import normalise
from pipeline.config import AlertingConfig
from pipeline.losstore import FLUSH_PAIRS, ITEM, LossStore, WindowTails, robust_stats
from pipeline.normalise import Moments, baseline, combine, entity_score
from pipeline.scorefile import ScoreRow
from pipeline.sortedscores import ScoreSorter, SortedFile
from pipeline.windowing import event_order

MAD_SCALE = 1.4826  # MAD -> standard deviation for normal data
PAIR = "pair"  # entity kind "src_host->dst_host"


class EntityHistory:
    """An entity's counts and moments, the last window it was seen in, and where its most recent
    losses (oldest first) are in the engine's LossStore, with their median and MAD: ~0.2 KB
    in memory whatever ``history`` is."""

    __slots__ = ("offset", "count", "median", "mad", "total_events", "last_window", "seen",
                 "mean", "m2")

    def __init__(self, total_events: int = 0, last_window: int = 0, seen: int = 0,
                 mean: float = 0.0, m2: float = 0.0):
        self.offset = 0  # of the kept losses in the store
        self.count = 0  # losses kept
        self.median = self.mad = math.nan  # of the kept losses
        self.total_events = total_events  # losses ever added (the count of mean and m2)
        self.last_window = last_window
        # For the normalised score (pipeline/normalise.py): events in closed windows, scored or
        # not, and the mean and squared deviations of every loss ever added (not only the kept).
        self.seen = seen
        self.mean = mean
        self.m2 = m2

    def moments(self) -> Moments:
        return Moments(self.total_events, self.mean, self.m2)


def entity_keys(entities: dict[str, str]) -> list[tuple[str, str]]:
    """(kind, value) for each non-empty entity, plus the src->dst host pair when both exist."""
    keys = [(kind, value) for kind, value in entities.items() if value]
    if entities.get("src_host") and entities.get("dst_host"):
        keys.append((PAIR, f"{entities['src_host']}->{entities['dst_host']}"))
    return keys


@dataclass
class Alert:
    record: dict  # the scored event (ScoredEvent fields)
    window_percentile: float  # of its score
    reasons: list[str]
    entity_stats: list[dict]
    score: float | None = None  # what it was ranked by: the normalised score (or the loss)


def alert_record(alert: Alert) -> dict:
    """The alert as the alerts topic's record (Avro salka.Alert)."""
    r = alert.record
    return {
        "source": r["source"], "line": r["line"], "event_time": r["event_time"],
        "window": r["window"], "raw": r["raw"], "loss": r["loss"],
        "window_percentile": alert.window_percentile, "entities": r["entities"],
        "entity_stats": alert.entity_stats, "reasons": alert.reasons,
        "score": r["loss"] if alert.score is None else alert.score,
    }


COMPACT_SLACK = 1 << 16  # losses of garbage (512 KB) the loss store may hold beyond the rule
GARBAGE_PER_ENTITY = 64  # and losses of garbage per entity (see AlertEngine._compact)

GRID_POINTS = 1001  # losses kept of the reference window, for an alert's percentile (8 KB)

Sorted = np.ndarray | SortedFile  # a window's scores in ascending order (pipeline/sortedscores.py)


def lowest_flagged(ordered: Sorted, percentile: float) -> float:
    """The lowest of the sorted ``ordered`` whose mid-rank percentile (pipeline/stats.py) is at
    or above ``percentile`` (inf: none). The percentile rises with the value, so a binary search
    with two ``searchsorted`` per step finds it, where ``midrank_percentiles`` would build ~50
    bytes of rank arrays per score (150 MB for a window of 3M events). Same arithmetic, so the
    same threshold to the bit."""
    n = len(ordered)
    if n == 0 or math.isnan(ordered[-1]):  # NaN sorts last; rankdata makes every rank NaN
        return math.inf

    low, high = 0, n
    while low < high:
        mid = (low + high) // 2
        if midrank_percentile(ordered, ordered[mid]) >= percentile:
            high = mid
        else:
            low = mid + 1
    return float(ordered[low]) if low < n else math.inf


def midrank_percentile(ordered: Sorted, value: float) -> float:
    """``midrank_percentiles``' value for one member of the sorted ``ordered`` (NaN when
    any is NaN, as there)."""
    if math.isnan(ordered[-1]):  # NaN sorts last
        return math.nan
    below = int(ordered.searchsorted(value, "left"))
    upto = int(ordered.searchsorted(value, "right"))
    return 100.0 * ((below + upto) / 2) / len(ordered)


EventKey = tuple  # pipeline.windowing.event_order: (time, line, (topic, partition, offset))


@dataclass
class Reference:
    """What the percentile rule keeps of the latest closed window that had losses: the lowest
    score the rule flags in that window (inf: none, e.g. window_percentile 100), its sorted
    scores at GRID_POINTS evenly spaced ranks, to say where a later score stands against them,
    and its mean loss (the population the normalised score shrinks toward). The score is the
    loss when alerting.normalise is empty."""

    window: int
    threshold: float
    grid: np.ndarray
    mean: float = 0.0

    @classmethod
    def of(cls, window: int, scores: list[float], percentile: float,
           mean: float = 0.0) -> Reference:
        ordered = np.asarray(scores, dtype=np.float64)
        ordered.sort()
        return cls.from_sorted(window, ordered, percentile, mean)

    @classmethod
    def from_sorted(cls, window: int, ordered: Sorted, percentile: float,
                    mean: float = 0.0) -> Reference:
        """From a window's scores in ascending order: no rank array of the window's size."""
        threshold = lowest_flagged(ordered, percentile)
        ranks = np.linspace(0, len(ordered) - 1, GRID_POINTS).round().astype(np.int64)
        return cls(window, threshold, np.asarray(ordered[ranks], dtype=np.float64), mean)

    def percentile(self, loss: float) -> float:
        """The mid-rank percentile of ``loss`` among the grid: about its percentile among the
        reference window's losses (to within 100 / GRID_POINTS)."""
        below = int(np.searchsorted(self.grid, loss, "left"))
        upto = int(np.searchsorted(self.grid, loss, "right"))
        return 100.0 * (below + upto) / 2 / len(self.grid)


class AlertEngine:
    def __init__(self, config: AlertingConfig, directory: str | None = None):
        """``directory``: where the scratch file of kept losses goes (the system's temporary
        directory when None)."""
        self.config = config
        self.store = LossStore(directory)  # the entities' kept losses (pipeline/losstore.py)
        self.kept_losses = 0  # in all histories: what the store holds live
        self.normalise = normalise.entities(config.normalise)  # kinds the score normalises by
        # Insertion order is recency: an entity moves to the end when first seen in a window,
        # so the front holds the least recently seen (evicted first).
        self.histories: dict[tuple[str, str], EntityHistory] = {}
        self.last_window: int | None = None
        self.evicted = 0
        self.reference: Reference | None = None  # None: no closed window had losses yet
        # Windows not closed yet: alerts per entity (the throttle) and the events alerted on
        # (judged again after a restart or a redelivery, they are not alerted twice).
        self.throttle: dict[int, dict[tuple[str, str], int]] = {}
        self.alerted: dict[int, set[EventKey]] = {}

    def kept(self, key: tuple[str, str]) -> list[float]:
        """The kept losses of an entity, oldest first."""
        history = self.histories[key]
        return self.store.read(history.offset, history.count).tolist()

    def _keep(self, history: EntityHistory, values: np.ndarray) -> None:
        """Makes ``values`` (float64, oldest first) the entity's kept losses."""
        self.kept_losses += len(values) - history.count
        history.offset = self.store.append(values)
        history.count = len(values)
        history.median, history.mad = robust_stats(values)

    def _join(self, history: EntityHistory, tail: np.ndarray) -> None:
        """Appends a window's last losses of the entity to its kept ones, keeping ``history``."""
        take = min(history.count, self.config.history - len(tail))  # of the old, from the end
        if take > 0:
            old = self.store.read(history.offset + history.count - take, take)
            tail = np.concatenate((old, tail))
        self._keep(history, tail)

    def _compact(self) -> None:
        """A fresh store file once the garbage (runs of evicted or since-updated entities)
        outweighs the kept losses: the file stays within about twice what is kept. Copying costs
        a read per entity, so each entity also allows 64 losses of garbage (512 B on disk): with
        many entities and short histories, compactions stay rare per window."""
        runs = len(self.histories)
        if self.store.size > 2 * self.kept_losses + COMPACT_SLACK + GARBAGE_PER_ENTITY * runs:
            self.store.compact(self.histories.values())

    def closed(self, window: int) -> bool:
        return self.last_window is not None and window <= self.last_window

    @property
    def realtime(self) -> bool:
        """Whether events are judged as they come (an earlier window gave a threshold); else
        the next window with losses is judged whole at its close (``judge_complete``)."""
        return self.reference is not None

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
            self.kept_losses -= self.histories.pop(key).count
        self.evicted += len(victims)

    def score(self, loss: float, entities: dict[str, str], population_mean: float) -> float:
        """The event's normalised score (pipeline/normalise.py) against the histories the
        closed windows left; the loss itself when alerting.normalise is empty."""
        config = self.config
        if not self.normalise:
            return loss
        scores = []
        for kind in self.normalise:
            value = entities.get(kind)
            if not value:
                continue
            history = self.histories.get((kind, value))
            if history is None:
                scores.append(0.0)  # never seen: no usual to be surprising against
            else:
                scores.append(entity_score(loss, history.seen, history.total_events, history.mean,
                                           population_mean, config.normalise_prior,
                                           config.normalise_trust))
        return combine(scores, loss, population_mean)

    def _score_reason(self, entities: dict[str, str], loss: float, population_mean: float) -> str:
        """Where the normalised score comes from: each entity's baseline and history."""
        parts = []
        for kind in self.normalise:
            value = entities.get(kind)
            if not value:
                continue
            history = self.histories.get((kind, value)) or EntityHistory()
            base = baseline(history.total_events, history.mean, population_mean,
                            self.config.normalise_prior)
            parts.append(f"{kind} {value}: {loss - base:+.3f} nats against its usual {base:.3f} "
                         f"({history.total_events} losses, {history.seen} events before)")
        return "; ".join(parts) or f"no entity: against the population mean {population_mean:.3f}"

    def _flag_reason(self, score: float, loss: float, entities: dict[str, str], where: str,
                     population_mean: float) -> str:
        if not self.normalise:
            return f"loss {loss:.3f} {where}"
        return (f"score {score:.3f} (loss {loss:.3f}) {where}; "
                f"{self._score_reason(entities, loss, population_mean)}")

    def _entity_verdicts(self, record: dict) -> tuple[list[str], list[dict]]:
        """(reasons, stats) of the robust z-score rule for each entity with enough history."""
        reasons, stats = [], []
        for kind, value in entity_keys(record["entities"]):
            history = self.histories.get((kind, value))
            if history is None or history.count < self.config.min_history:
                continue
            median, mad = history.median, history.mad  # of the kept losses: set at each close
            z = (record["loss"] - median) / (MAD_SCALE * mad + self.config.mad_floor)
            stats.append({"kind": kind, "entity": value, "events": history.total_events,
                          "median": median, "mad": mad, "z": z})
            if z >= self.config.z_threshold:
                reasons.append(f"{kind} {value}: robust z {z:.1f} against its median "
                               f"{median:.3f} over {history.count} events")
        return reasons, stats

    def judge_event(self, window: int, record: dict) -> Alert | None:
        """The alert for one scored event of a window not closed, or None (unscored, no rule
        fires, throttled, or alerted on already). Uses only the state the windows before
        ``window`` left: the caller closes them first. Needs ``realtime``."""
        if record["loss"] is None or self.closed(window):
            return None
        if self.reference is None:
            raise ValueError(f"window {window}: no earlier window had losses; judge it whole "
                             "with judge_complete")
        key = event_order(record)
        if key in self.alerted.get(window, ()):
            return None
        loss, reference = record["loss"], self.reference
        score = self.score(loss, record["entities"], reference.mean)
        reasons, stats = self._entity_verdicts(record)
        if score >= reference.threshold:
            reasons.insert(0, self._flag_reason(
                score, loss, record["entities"],
                f"at or above {reference.threshold:.3f}, the {self.config.window_percentile:g}th "
                f"percentile of window {reference.window}", reference.mean))
        if not reasons:
            return None
        counts = self.throttle.setdefault(window, {})
        if not self._admit(counts, record):
            return None
        self.alerted.setdefault(window, set()).add(key)
        return Alert(record, reference.percentile(score), reasons, stats, score)

    def _admit(self, counts: dict[tuple[str, str], int], record: dict) -> bool:
        """The throttle: False when every entity of the event had max_alerts_per_entity alerts in
        its window already; else counts the alert."""
        keys = entity_keys(record["entities"])
        if keys and all(counts.get(k, 0) >= self.config.max_alerts_per_entity for k in keys):
            return False
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
        return True

    def judge_complete(self, window: int, records: list[dict]) -> list[Alert]:
        """Alerts for a whole window judged at once, without an earlier threshold: the percentile
        within the window itself, the throttle keeping the highest losses. For the first window
        with losses (no ``realtime`` yet); does not close it."""
        return self.judge_complete_read(window, lambda: iter(records))

    def judge_complete_read(self, window: int, read: Callable[[], Iterator[dict]]) -> list[Alert]:
        """``judge_complete`` over records that ``read()`` yields in event order, twice (the
        losses first, for their ranks): the scores are sorted with bounded memory
        (pipeline/sortedscores.py: on disk beyond a few MB), and only the alerts are held."""
        if self.closed(window):
            return []
        population = self._population_mean(lambda: ((r["loss"], None) for r in read()))
        sorter = ScoreSorter(self.store.directory)
        for record in read():
            if record["loss"] is not None:
                sorter.add(self.score(record["loss"], record["entities"], population))
        # Each score's rank from the sorted scores, not midrank_percentiles' rank arrays (~60 B
        # an event): the same arithmetic, so the same percentiles to the bit. The last read
        # scores each event again (the histories do not change here, so the same score) rather
        # than keep the unsorted order too.
        candidates = []
        try:
            ordered = sorter.sorted()
            # A score under the lowest one the percentile flags is a member of the window
            # ranked below window_percentile: only the others (and entity verdicts) need a rank.
            lowest = lowest_flagged(ordered, self.config.window_percentile)
            for record in read():
                if record["loss"] is None:
                    continue
                score = self.score(record["loss"], record["entities"], population)
                reasons, stats = self._entity_verdicts(record)
                if score < lowest and not reasons:
                    continue
                percentile = midrank_percentile(ordered, score)
                if percentile >= self.config.window_percentile:
                    reasons.insert(0, self._flag_reason(
                        score, record["loss"], record["entities"],
                        f"at the {percentile:.2f}th percentile of window {window}", population))
                if reasons:
                    candidates.append(Alert(record, percentile, reasons, stats, score))
        finally:
            sorter.close()
        counts = self.throttle.setdefault(window, {})
        return [alert for alert in sorted(candidates, key=lambda a: (-a.score,
                                                                      event_order(a.record)))
                if self._admit(counts, alert.record)]

    def _population_mean(self, read: Callable[[], Iterable[tuple[float | None, dict]]]) -> float:
        """The population mean the normalised score shrinks toward: the latest earlier window's
        mean loss; for the first window with losses (none earlier) its own (``read()`` yields
        its (loss, entities))."""
        if self.reference is not None:
            return self.reference.mean
        if not self.normalise:
            return 0.0  # unused
        own = Moments()
        for loss, _ in read():
            if loss is not None:
                own.add(loss)
        return own.mean

    def window_scores(self, window: int, records: list[dict]) -> list[float | None]:
        """The score of each of a window's records (None: unscored) as the alerter judges them:
        against what the windows before it left. Call before closing it."""
        return list(self.scores_read(lambda: ((r["loss"], r["entities"]) for r in records)))

    def scores_read(self, read: Callable[[], Iterable[tuple[float | None, dict]]]
                    ) -> Iterator[float | None]:
        """``window_scores`` of the (loss, entities) that ``read()`` yields for a window not
        closed yet (read twice for the first window with losses), without holding them."""
        population = self._population_mean(read)
        for loss, entities in read():
            yield None if loss is None else self.score(loss, entities, population)

    def close_window(self, window: int, scored: Iterable[tuple[float | None, dict]]
                     | Callable[[], Iterable[tuple[float | None, dict]]]) -> None:
        """Learn from a window whose events were all judged: ``scored`` is its (loss, entities)
        in event order (the histories' LRU order and eviction follow it), or a function that
        yields them (read twice for the first window with losses when normalising, so that an
        iterator need not be held in memory). Its scores give the next windows' threshold. A
        window closed already changes nothing."""
        if self.closed(window):
            return
        if callable(scored):
            read = scored
        else:
            items = scored if isinstance(scored, (list, tuple)) else list(scored)
            read = lambda: items  # noqa: E731
        population = self._population_mean(read)
        keep = self.config.history
        # The scores, for the next threshold: sorted on disk beyond a few MB.
        scores, own = ScoreSorter(self.store.directory), Moments()
        # The window's event counts and moments per entity join the histories after the pass:
        # every score of the window is against the state the earlier windows left. Its losses
        # go to hash buckets (on disk past a few thousand each), which give each entity's last
        # ``keep`` of the window at the end: memory does not grow with the window, nor with
        # the losses kept (pipeline/losstore.py).
        tails = WindowTails(keep, self.store.directory)
        pending: dict[tuple[str, str], tuple[EntityHistory, list[int], Moments, int, array]] = {}
        touched: list[EntityHistory] = []  # by ident: the order first seen in the window
        flush = 2 * FLUSH_PAIRS
        try:
            for loss, entities in read():
                for key in entity_keys(entities):
                    entry = pending.get(key)
                    if entry is None:
                        ident = len(touched)
                        touched.append(self._touch(key, window))
                        entry = pending[key] = (touched[-1], [0], Moments(), ident,
                                                tails.buffer(ident))
                    _, events, added, ident, buffer = entry
                    events[0] += 1
                    if loss is not None:
                        added.add(loss)
                        if keep:
                            buffer.append(ident)
                            buffer.append(loss)
                            if len(buffer) >= flush:
                                tails.full(ident)
                if loss is not None:
                    own.add(loss)
                    scores.add(self.score(loss, entities, population))
            for history, (events,), added, _, _ in pending.values():
                history.seen += events
                merged = history.moments()
                merged.merge(added)
                history.total_events += added.n
                history.mean, history.m2 = merged.mean, merged.m2
            del pending  # before the threshold's sort: ~100 B per entity
            if keep:
                for ident, tail in tails.tails():
                    self._join(touched[ident], tail)
            del touched
            self._evict(window)
            self._compact()
            if len(scores):
                self.reference = Reference.from_sorted(
                    window, scores.sorted(), self.config.window_percentile, own.mean)
        finally:
            tails.close()
            scores.close()
        self.last_window = window
        for table in (self.throttle, self.alerted):
            for w in [w for w in table if w <= window]:
                del table[w]

    def judge_window(self, window: int, records: list[dict]) -> list[Alert]:
        """Alerts for one complete window of scores, its records in event order, as the stage
        gives them for events arriving in that order; then learn from it. A window judged
        already (a replay after a restart) returns nothing and changes nothing."""
        if self.closed(window):
            return []
        if self.realtime:
            alerts = [a for r in records if (a := self.judge_event(window, r)) is not None]
        else:
            alerts = self.judge_complete(window, records)
        self.close_window(window, ((r["loss"], r["entities"]) for r in records))
        return alerts

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        """As plain JSON-able data (for tests and inspection; the stage saves encode_state)."""
        return {
            "last_window": self.last_window,
            "histories": [[kind, value, h.total_events, h.last_window, self.kept((kind, value)),
                           h.seen, h.mean, h.m2]
                          for (kind, value), h in self.histories.items()],  # in LRU order
            **self._small_state(),
            "grid": [] if self.reference is None else self.reference.grid.tolist(),
        }

    def _small_state(self) -> dict:
        """The threshold (its grid apart) and the open windows' throttle, as JSON-able data."""
        ref = self.reference
        return {
            "reference": None if ref is None else {
                "window": ref.window, "mean": ref.mean,
                "threshold": None if math.isinf(ref.threshold) else ref.threshold},
            "open": [[window, [[kind, value, n] for (kind, value), n in counts.items()],
                      sorted([t, line, *source] for t, line, source in self.alerted.get(window, ()))]
                     for window, counts in sorted(self.throttle.items())],
        }

    def _load_small_state(self, state: dict, grid: list[float]) -> None:
        ref = state["reference"]
        if ref is not None:
            threshold = math.inf if ref["threshold"] is None else float(ref["threshold"])
            self.reference = Reference(int(ref["window"]), threshold,
                                       np.asarray(grid, dtype=np.float64), float(ref["mean"]))
        for window, counts, alerted in state["open"]:
            self.throttle[int(window)] = {(kind, value): int(n) for kind, value, n in counts}
            self.alerted[int(window)] = {(t, line, (topic, partition, offset))
                                         for t, line, topic, partition, offset in alerted}

    @classmethod
    def from_state(cls, config: AlertingConfig, state: dict) -> AlertEngine:
        engine = cls(config)
        engine.last_window = state["last_window"]
        for kind, value, total, last, losses, seen, mean, m2 in state["histories"]:
            history = engine.histories[(kind, value)] = EntityHistory(
                int(total), int(last), int(seen), float(mean), float(m2))
            engine._keep(history, np.asarray(losses[max(0, len(losses) - config.history):],
                                             dtype=np.float64))
        engine._load_small_state(state, state["grid"])
        return engine


# v3: the threshold and the open windows' throttle; v4: the normalised score's per-entity
# moments and event counts, and the threshold window's mean loss.
STATE_FORMAT = "salka-alerter-state-v4"


class StateFormatError(ValueError):
    """Bytes that are not a readable alerter state."""


def encode_state(engine: AlertEngine, extra: dict) -> bytes:
    """The engine's state as an .npz of flat arrays (per entity its name + 29 bytes + 8 per
    kept loss, ~60% of the JSON, no float formatting) plus ``extra`` (JSON-able, e.g. the
    resume offset). ``write_state`` writes the same to a file without holding it."""
    out = io.BytesIO()
    write_state(engine, extra, out)
    return out.getvalue()


LOSS_CHUNK = 1 << 20  # bytes of kept losses gathered per write of the state file
# The state's arrays besides the meta and the kept losses, and the numpy dtype kind of each.
STATE_DTYPES = {"kind": "u", "names": "u", "name_ends": "i", "total": "i", "seen": "i",
                "count": "i", "grid": "f", "events": "i", "mean": "f", "m2": "f"}


def write_state(engine: AlertEngine, extra: dict, handle: BinaryIO) -> None:
    """``encode_state``'s .npz written to ``handle`` (what np.savez writes, array by array). The
    kept losses, most of the state, go from the loss store to the file in 1 MiB chunks: saving
    them costs no copy of them, where gathering them into one array, then an .npz in memory,
    held them three times over (~100 MB at 4M kept losses)."""
    kinds: dict[str, int] = {}
    # Per entity, 4 or 8 bytes a field (not a list of int objects): entities are many too.
    kind_ids, names, name_ends = array("I"), bytearray(), array("q")
    totals, seen, counts, events = array("q"), array("q"), array("q"), array("q")
    means, m2s = array("d"), array("d")
    for (kind, value), history in engine.histories.items():
        kind_ids.append(kinds.setdefault(kind, len(kinds)))
        names += value.encode("utf-8", "surrogatepass")
        name_ends.append(len(names))
        totals.append(history.total_events)
        seen.append(history.last_window)
        counts.append(history.count)
        events.append(history.seen)
        means.append(history.mean)
        m2s.append(history.m2)
    meta = {"format": STATE_FORMAT, "last_window": engine.last_window, "kinds": list(kinds),
            "extra": extra, **engine._small_state()}
    grid = np.empty(0) if engine.reference is None else engine.reference.grid

    def flat(values: array, dtype) -> np.ndarray:
        return np.frombuffer(values, dtype=dtype) if len(values) else np.empty(0, dtype=dtype)

    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
              "kind": flat(kind_ids, np.uint32), "names": flat(names, np.uint8),
              "name_ends": flat(name_ends, np.int64), "total": flat(totals, np.int64),
              "seen": flat(seen, np.int64), "count": flat(counts, np.int64),
              "losses": None, "grid": np.asarray(grid, dtype=np.float64),
              "events": flat(events, np.int64), "mean": flat(means, np.float64),
              "m2": flat(m2s, np.float64)}
    # As np.savez: stored (not compressed) zip64 entries named <key>.npy, in this order.
    with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, values in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as entry:
                if values is not None:
                    np.lib.format.write_array(entry, values, allow_pickle=False)
                    continue
                np.lib.format.write_array_header_1_0(entry, {
                    "descr": np.dtype(np.float64).str, "fortran_order": False,
                    "shape": (int(sum(counts)),)})
                chunk = bytearray()
                for history in engine.histories.values():
                    # native float64, as np.frombuffer would write it
                    chunk += engine.store.read_bytes(history.offset, history.count)
                    if len(chunk) >= LOSS_CHUNK:
                        entry.write(chunk)
                        chunk.clear()
                entry.write(chunk)


def decode_state(source: bytes | BinaryIO, config: AlertingConfig,
                 directory: str | None = None) -> tuple[AlertEngine, dict]:
    """(engine, extra) from encode_state's bytes or a file of them; StateFormatError for anything
    else. The kept losses go from the file to the engine's loss store (``directory``, as
    AlertEngine) an entity at a time: loading holds none of them in memory."""
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with np.load(handle, allow_pickle=False) as npz:  # zip CRCs catch bit rot
            # write_state stores every entry: a compressed one could claim gigabytes in a few KB
            if any(info.compress_type != zipfile.ZIP_STORED for info in npz.zip.infolist()):
                raise StateFormatError("compressed entries (salka writes its state stored)")
            meta = _state_meta(npz)
            arrays = {name: npz[name] for name in STATE_DTYPES}
            for name, kind in STATE_DTYPES.items():
                if arrays[name].ndim != 1 or arrays[name].dtype.kind != kind:
                    raise StateFormatError(f"{name}: {arrays[name].dtype} of {arrays[name].ndim} "
                                           "dimensions where a flat array was expected")
            if np.any(np.diff(arrays["name_ends"]) < 0) or np.any(arrays["name_ends"] < 0):
                raise StateFormatError("entity names out of order")
            with npz.zip.open("losses.npy") as losses:
                engine = _decode_histories(meta, arrays, losses, config, directory)
        if (meta["reference"] is None) != (len(arrays["grid"]) == 0):
            raise StateFormatError("a threshold without its grid, or a grid without one")
        engine._load_small_state(meta, arrays["grid"].tolist())
        return engine, meta["extra"]
    except StateFormatError:
        raise
    except Exception as exc:  # zipfile, numpy and json raise many kinds for damaged bytes
        raise StateFormatError(f"{exc.__class__.__name__}: {exc}") from exc


def _decode_histories(meta: dict, arrays: dict[str, np.ndarray], losses: BinaryIO,
                      config: AlertingConfig, directory: str | None) -> AlertEngine:
    """The engine with the histories of a state's arrays, their kept losses read from the
    ``losses.npy`` entry as a stream (float64, the counts' sum of them)."""
    version = np.lib.format.read_magic(losses)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(losses)
    n = len(arrays["kind"])
    if any(len(arrays[name]) != n for name in ("name_ends", "total", "seen", "count",
                                               "events", "mean", "m2")) or \
            len(shape) != 1 or dtype != np.dtype(np.float64) or \
            int(arrays["count"].sum()) != shape[0] or \
            (n and int(arrays["name_ends"][-1]) != len(arrays["names"])):
        raise StateFormatError("inconsistent array lengths")
    kinds, blob = meta["kinds"], arrays["names"].tobytes()
    engine = AlertEngine(config, directory)
    engine.last_window = meta["last_window"]
    keep, start = config.history, 0
    for kind, end, total, seen, count, events, mean, m2 in zip(
            arrays["kind"].tolist(), arrays["name_ends"].tolist(), arrays["total"].tolist(),
            arrays["seen"].tolist(), arrays["count"].tolist(), arrays["events"].tolist(),
            arrays["mean"].tolist(), arrays["m2"].tolist()):
        value = blob[start:end].decode("utf-8", "surrogatepass")
        history = engine.histories[(kinds[kind], value)] = EntityHistory(total, seen, events,
                                                                         mean, m2)
        engine._keep(history, _last_losses(losses, count, keep))
        start = end
    if losses.read(1):  # also makes zipfile check the entry's CRC, at its end
        raise StateFormatError("more kept losses than counted")
    return engine


def _last_losses(losses: BinaryIO, count: int, keep: int) -> np.ndarray:
    """The last ``keep`` of the next ``count`` float64 of ``losses``, read 1 MiB at a time: a
    state saved with a longer history (or lying about it) costs no more memory than the kept."""
    if count < 0:
        raise StateFormatError("a negative count of kept losses")
    skip = max(0, count - keep) * ITEM
    while skip:
        skipped = len(losses.read(min(skip, LOSS_CHUNK)))
        if not skipped:
            raise StateFormatError("fewer kept losses than counted")
        skip -= skipped
    size = min(count, keep) * ITEM
    data = losses.read(size)
    if len(data) != size:
        raise StateFormatError("fewer kept losses than counted")
    return np.frombuffer(data, dtype=np.float64)


def _state_meta(npz) -> dict:
    """A state's JSON metadata, checked: this format, a window number (or None) judged last."""
    meta = json.loads(npz["meta"].tobytes())
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        # an older format too: its windows' thresholds and throttles are not there
        raise StateFormatError(f"not a salka alerter state ({STATE_FORMAT} expected)")
    if not (meta["last_window"] is None or type(meta["last_window"]) is int):
        raise StateFormatError("last_window is not a window number")
    return meta


def state_last_window(source: BinaryIO) -> int | None:
    """The last window judged, from a state file's small metadata alone (not its histories)."""
    try:
        with np.load(source, allow_pickle=False) as npz:
            return _state_meta(npz)["last_window"]
    except StateFormatError:
        raise
    except Exception as exc:  # as decode_state
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


def row_scores(rows: list[ScoreRow], config: AlertingConfig) -> list[float | None]:
    """The score each row is ranked and alerted by (None: unscored), as ``alerts_from_rows`` and
    the alerter stage compute it: the normalised score (pipeline/normalise.py), or the loss when
    ``config.normalise`` is empty. Aligned with ``rows``."""
    if not normalise.entities(config.normalise):
        return [row.loss for row in rows]
    windows: dict[int, list[tuple[dict, int]]] = {}
    for index, row in enumerate(rows):
        windows.setdefault(row.window, []).append((row_to_record(row), index))
    engine = AlertEngine(config)
    out: list[float | None] = [None] * len(rows)
    for window in sorted(windows):
        ordered = sorted(windows[window], key=lambda pair: event_order(pair[0]))
        records = [record for record, _ in ordered]
        for (_, index), score in zip(ordered, engine.window_scores(window, records)):
            out[index] = score
        engine.close_window(window, [(r["loss"], r["entities"]) for r in records])
    return out
