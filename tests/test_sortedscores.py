"""A window's scores sorted with bounded memory (pipeline/sortedscores.py): the sorted file
answers what the sorted array does, and the alerter's decisions do not depend on which of the
two it ranked by."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from pipeline import sortedscores
from pipeline.alerting import AlertEngine, Reference, lowest_flagged
from pipeline.config import AlertingConfig
from pipeline.sortedscores import ScoreSorter, SortedFile


def small_runs(monkeypatch) -> None:
    monkeypatch.setattr(sortedscores, "RUN", 1000)
    monkeypatch.setattr(sortedscores, "MERGE_BYTES", 8 * 1024)
    monkeypatch.setattr(sortedscores, "MIN_BLOCK", 64)
    monkeypatch.setattr(sortedscores, "STRIDE", 16)


def sort_both(values: list[float], tmp_path) -> tuple[np.ndarray, np.ndarray | SortedFile]:
    sorter = ScoreSorter(tmp_path)
    for value in values:
        sorter.add(value)
    assert len(sorter) == len(values)
    return np.sort(np.array(values, dtype=np.float64)), sorter.sorted()


@pytest.mark.parametrize("kind", ["distinct", "ties", "nan", "one run", "exact runs"])
def test_the_sorted_file_is_the_sorted_array(tmp_path, monkeypatch, kind):
    small_runs(monkeypatch)
    rng = random.Random(kind)
    size = {"one run": 999, "exact runs": 3000}.get(kind, 7_777)
    values = [rng.gammavariate(2.0, 0.5) for _ in range(size)]
    if kind == "ties":
        values = [round(v, 1) for v in values]
    if kind == "nan":
        values = [float("nan") if i % 97 == 5 else v for i, v in enumerate(values)]
    expected, ordered = sort_both(values, tmp_path)
    assert isinstance(ordered, SortedFile) == (size > 1000)
    assert len(ordered) == len(expected)
    got = ordered[np.arange(len(expected))]
    assert np.array_equal(got, expected, equal_nan=True)
    assert ordered[-1] == expected[-1] or np.isnan(expected[-1])
    probes = [*values[::37], -1.0, 0.0, 100.0, float("inf"), *(round(v, 1) for v in values[:50])]
    for value in probes:
        for side in ("left", "right"):
            assert ordered.searchsorted(value, side) == np.searchsorted(expected, value, side), \
                (value, side)
    for percentile in [0.0, 50.0, 99.0, 99.9, 100.0]:
        assert lowest_flagged(ordered, percentile) == lowest_flagged(expected, percentile)
    if isinstance(ordered, SortedFile):
        ordered.close()


def test_no_scores_sort_to_an_empty_array(tmp_path):
    assert len(ScoreSorter(tmp_path).sorted()) == 0


def records(window: int, n: int, rng: random.Random) -> list[dict]:
    out = []
    for i in range(n):
        user = f"U{rng.randrange(40)}"
        loss = None if i % 50 == 7 else round(rng.gammavariate(2.0, 0.5), 2)  # ties
        out.append({"source": {"topic": "raw", "partition": 0, "offset": window * n + i},
                    "line": i, "event_time": float(window * 10_000 + i), "window": window,
                    "raw": "", "loss": loss,
                    "entities": {"user": user, "src_host": f"C{i % 9}", "dst_host": "DC"}})
    return out


def decisions(config: AlertingConfig) -> list:
    rng = random.Random(11)
    engine = AlertEngine(config)
    out = []
    for window in range(4):
        for alert in engine.judge_window(window, records(window, 5_000, rng)):
            out.append((window, alert.record["line"], alert.window_percentile, alert.score,
                        alert.reasons))
        ref = engine.reference
        out.append((ref.window, ref.threshold, ref.grid.tolist(), ref.mean))
    return out


@pytest.mark.parametrize("normalise", [[], ["user"]])
def test_alerts_are_the_same_ranked_in_memory_or_on_disk(monkeypatch, normalise):
    """The first window judged whole and the thresholds of every window, with runs of 1,000
    scores (so each window's are merged on disk) and with one run in memory."""
    config = replace(AlertingConfig(window_percentile=99.0, z_threshold=3.0, min_history=10,
                                    history=50), normalise=normalise)
    in_memory = decisions(config)
    small_runs(monkeypatch)
    assert decisions(config) == in_memory
    alerts = [d for d in in_memory if len(d) == 5]
    assert any(d[0] > 0 for d in alerts)
    if not normalise:  # (normalised, window 0 scores 0 everywhere: no entity has a history)
        assert any(d[0] == 0 and "percentile of window 0" in d[4][0] for d in alerts)


def test_the_reference_of_a_sorted_file_is_that_of_the_array(tmp_path, monkeypatch):
    small_runs(monkeypatch)
    rng = random.Random(3)
    values = [rng.random() for _ in range(5_000)]
    expected, ordered = sort_both(values, tmp_path)
    got, want = Reference.from_sorted(1, ordered, 99.9), Reference.of(1, values, 99.9)
    assert (got.threshold, got.grid.tolist()) == (want.threshold, want.grid.tolist())
