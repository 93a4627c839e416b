"""The alerter's kept losses on disk (pipeline/losstore.py): runs read back as written, compaction
keeps every live run, each entity's window tail is its last losses in order however the pairs
spread over buckets, files and chunks, and the engine's scratch file stays within about twice
what it keeps."""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, replace

import numpy as np
import pytest

from pipeline import alerting
from pipeline.alerting import AlertEngine
from pipeline.config import AlertingConfig
from pipeline.losstore import BUCKETS, FLUSH_PAIRS, REDUCE_PAIRS, LossStore, WindowTails, robust_stats


@dataclass
class Run:
    offset: int = 0
    count: int = 0


def test_runs_read_back_and_compaction_keeps_only_the_live_ones(tmp_path):
    store = LossStore(tmp_path / "scratch")
    rng = np.random.default_rng(0)
    runs, values = [], []
    for size in [0, 1, 5, 100_000, 3, 70_000]:  # runs larger than a copy chunk too
        data = rng.random(size)
        runs.append(Run(store.append(data), size))
        values.append(data)
    for run, data in zip(runs, values):
        assert store.read(run.offset, run.count).tolist() == data.tolist()
    live = [runs[i] for i in (1, 3, 5)]  # the others are garbage now
    store.compact(live)
    assert store.size == sum(run.count for run in live)
    for i in (1, 3, 5):
        assert store.read(runs[i].offset, runs[i].count).tolist() == values[i].tolist()
    assert store.read(runs[0].offset, 0).tolist() == []
    store.close()


def test_a_store_that_keeps_nothing_makes_no_file(tmp_path):
    store = LossStore(tmp_path / "never")
    store.append(np.empty(0))
    store.compact([Run()])
    assert store.size == 0 and not (tmp_path / "never").exists()


def naive_tails(pairs: list[tuple[int, float]], keep: int) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for ident, loss in pairs:
        out.setdefault(ident, []).append(loss)
    return {ident: losses[-keep:] for ident, losses in out.items()}


@pytest.mark.parametrize("keep", [1, 7, 500])
def test_window_tails_are_each_idents_last_losses_in_order(tmp_path, keep):
    """Skewed idents (one takes half the pairs, more than a bucket buffer and a reduce chunk),
    so the pairs go through buffers, bucket files and several chunks."""
    rng = random.Random(keep)
    n = 2 * REDUCE_PAIRS + 3 * FLUSH_PAIRS
    pairs = [(0 if rng.random() < 0.5 else rng.randrange(1, 3 * BUCKETS), rng.random())
             for _ in range(n)]
    tails = WindowTails(keep, tmp_path)
    for ident, loss in pairs:
        buffer = tails.buffer(ident)
        buffer.append(ident)
        buffer.append(loss)
        if len(buffer) >= 2 * FLUSH_PAIRS:
            tails.full(ident)
    got = {ident: tail.tolist() for ident, tail in tails.tails()}
    tails.close()
    assert got == naive_tails(pairs, keep)


def test_robust_stats_are_the_sorted_median_and_mad():
    rng = random.Random(2)
    for size in [1, 2, 3, 10, 11, 500]:
        values = [round(rng.gammavariate(2.0, 0.5), 3) for _ in range(size)]  # ties too
        median = statistics.median(values)
        assert robust_stats(np.array(values)) == \
            (median, statistics.median(abs(v - median) for v in values))


def test_the_engines_scratch_file_stays_within_twice_what_it_keeps(tmp_path, monkeypatch):
    """Forty windows of entities coming and going (evicted by age and count): after every close
    the file holds at most twice the kept losses (no slack, so compaction runs often), and each
    entity's kept losses are still its last ``history`` ones."""
    monkeypatch.setattr(alerting, "COMPACT_SLACK", 0)
    monkeypatch.setattr(alerting, "GARBAGE_PER_ENTITY", 0)
    config = AlertingConfig(history=20, min_history=5, max_entities=60, entity_ttl_windows=2,
                            normalise=[])
    engine = AlertEngine(config, str(tmp_path))
    rng = random.Random(5)
    everything: dict[tuple[str, str], list[float]] = {}
    sizes = []
    for window in range(40):
        items = []
        for _ in range(rng.randint(100, 600)):
            user = f"U{window // 5}-{rng.randrange(30)}"
            loss = rng.random()
            items.append((loss, {"user": user, "src_host": "", "dst_host": ""}))
            everything.setdefault(("user", user), []).append(loss)
        engine.close_window(window, items)
        live = sum(h.count for h in engine.histories.values())
        assert engine.store.size <= 2 * live, (window, engine.store.size, live)
        sizes.append(engine.store.size)
        for key in engine.histories:
            assert engine.kept(key) == everything[key][-20:], (window, key)
    assert engine.evicted > 0 and any(b < a for a, b in zip(sizes, sizes[1:]))  # compacted


def test_history_zero_keeps_no_losses_and_no_file(tmp_path):
    """The trainer's surprise ranking keeps counts and means only (history 0)."""
    config = replace(AlertingConfig(normalise=["user"]), history=0)
    engine = AlertEngine(config, str(tmp_path / "none"))
    engine.close_window(0, [(0.5, {"user": "U1", "src_host": "", "dst_host": ""})] * 10)
    assert engine.histories[("user", "U1")].count == 0 and engine.kept(("user", "U1")) == []
    assert engine.histories[("user", "U1")].total_events == 10
    assert not (tmp_path / "none").exists()
