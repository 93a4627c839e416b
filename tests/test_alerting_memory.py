"""Closing a window costs the alerter memory bounded by its config, not by the window's size: the
threshold without rank arrays, each loss held once, and both give the same numbers as before."""

from __future__ import annotations

import random
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

from pipeline.alerting import AlertEngine, Reference, lowest_flagged
from pipeline.config import AlertingConfig
from pipeline.stats import midrank_percentiles

CONFIG = AlertingConfig(window_percentile=99.0, z_threshold=4.0, min_history=20, history=50,
                        mad_floor=0.05, max_alerts_per_entity=3, normalise=[])


def rank_threshold(ordered: np.ndarray, percentile: float) -> float:
    """The threshold as it was computed before: every score's mid-rank percentile."""
    flagged = ordered[midrank_percentiles(ordered) >= percentile]
    return float(flagged[0]) if len(flagged) else float("inf")


@pytest.mark.parametrize("size", [1, 2, 3, 10, 999, 5000])
@pytest.mark.parametrize("ties", [False, True])
def test_lowest_flagged_is_the_rank_threshold(size, ties):
    rng = np.random.default_rng(size)
    values = rng.integers(0, 7, size) / 4 if ties else rng.gamma(2.0, 0.5, size)
    ordered = np.sort(values)
    for percentile in [0.0, 0.01, 25.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0,
                       *(100.0 * (k + 0.5) / size for k in range(0, size, max(1, size // 7)))]:
        assert lowest_flagged(ordered, percentile) == rank_threshold(ordered, percentile), percentile


def test_a_nan_score_flags_nothing_as_ranks_did():
    ordered = np.sort(np.array([1.0, np.nan, 2.0]))
    assert lowest_flagged(ordered, 50.0) == rank_threshold(ordered, 50.0) == float("inf")


def test_histories_keep_the_last_losses_of_every_window_in_order():
    """Losses join the histories straight away (trimmed at twice ``history``): the kept ones and
    the counts are still the last ``history`` of each entity, across windows of every size."""
    engine = AlertEngine(replace(CONFIG, history=5))
    everything: dict[tuple[str, str], list[float]] = {}
    for window, size in enumerate([3, 4, 40, 1, 25]):
        items = []
        for i in range(size):
            loss = None if i % 9 == 8 else float(window * 100 + i)
            entities = {"user": f"U{i % 2}", "src_host": "", "dst_host": f"D{i % 3}"}
            items.append((loss, entities))
            if loss is not None:
                for key in [("user", entities["user"]), ("dst_host", entities["dst_host"])]:
                    everything.setdefault(key, []).append(loss)
        engine.close_window(window, items)
        for key, losses in everything.items():
            history = engine.histories[key]
            assert list(history.losses) == losses[-5:], (window, key)
            assert history.total_events == len(losses), (window, key)


def test_closing_a_window_holds_its_scores_once():
    """tracemalloc peak while closing a window of n events with few entities, beyond what stays:
    the scores array (8 bytes an event), sorted in place. Ranks (~50 B an event) or a second copy
    of the scores would fail this."""
    n = 30_000
    rng = random.Random(3)
    engine = AlertEngine(CONFIG)
    entities = [{"user": f"U{i}", "src_host": f"C{i}", "dst_host": "DC"} for i in range(4)]
    engine.close_window(0, [(rng.random(), entities[i % 4]) for i in range(100)])
    losses = [rng.gammavariate(2.0, 0.5) for _ in range(n)]
    midrank_percentiles([0.0])  # scipy imported before measuring
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        engine.close_window(1, lambda: ((loss, entities[i % 4]) for i, loss in enumerate(losses)))
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - max(before, after) < 12 * n, (peak - before, after - before)
    expected = Reference.of(1, list(losses), CONFIG.window_percentile)
    assert engine.reference.threshold == expected.threshold
    assert engine.reference.grid.tolist() == expected.grid.tolist()


def test_judging_a_whole_window_ranks_without_rank_arrays():
    """The first window with losses is judged whole: each score's percentile comes from one
    sorted copy of the scores (8 bytes an event), equal to midrank_percentiles' to the bit."""
    n = 30_000
    rng = random.Random(4)
    engine = AlertEngine(CONFIG)
    entities = [{"user": f"U{i}", "src_host": f"C{i}", "dst_host": "DC"} for i in range(4)]
    losses = [round(rng.gammavariate(2.0, 0.5), 2) for _ in range(n)]  # many ties
    records = [{"source": {"topic": "raw", "partition": 0, "offset": i}, "line": i,
                "event_time": float(i), "window": 1, "raw": "", "loss": loss,
                "entities": entities[i % 4]} for i, loss in enumerate(losses)]
    expected = midrank_percentiles(losses)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        alerts = engine.judge_complete(1, records)
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - max(before, after) < 24 * n, (peak - before, after - before)
    assert alerts and all(a.window_percentile == expected[a.record["line"]] for a in alerts)
    assert all(a.window_percentile >= CONFIG.window_percentile for a in alerts)
