"""Closing a window costs the alerter memory bounded by its config, not by the window's size: the
threshold without rank arrays, each loss held once, and both give the same numbers as before."""

from __future__ import annotations

import io
import json
import random
import statistics
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

from pipeline import alerting, losstore, sortedscores
from pipeline.alerting import (
    STATE_FORMAT,
    AlertEngine,
    Reference,
    decode_state,
    encode_state,
    lowest_flagged,
    write_state,
)
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
            assert engine.kept(key) == losses[-5:], (window, key)
            assert history.total_events == len(losses), (window, key)
            median = statistics.median(losses[-5:])  # as stats() computed them per event
            assert (history.median, history.mad) == \
                (median, statistics.median(abs(v - median) for v in losses[-5:])), (window, key)


def traced(run):
    """``run()``'s result, and tracemalloc's traced bytes around it: (result, before, after,
    peak)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = run()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, before, after, peak


def test_closing_a_window_holds_its_scores_once():
    """tracemalloc peak while closing a window of n events, beyond what stays: the scores array
    (8 bytes an event), sorted in place. Ranks (~50 B an event) or a second copy of the scores
    would fail this. (No entities: their kept losses cost a bounded scratch, tested below.)"""
    n = 30_000
    rng = random.Random(3)
    engine = AlertEngine(CONFIG)
    entities = [{"user": "", "src_host": "", "dst_host": ""}] * 4
    engine.close_window(0, [(rng.random(), entities[i % 4]) for i in range(100)])
    losses = [rng.gammavariate(2.0, 0.5) for _ in range(n)]
    midrank_percentiles([0.0])  # scipy imported before measuring
    _, before, after, peak = traced(lambda: engine.close_window(
        1, lambda: ((loss, entities[i % 4]) for i, loss in enumerate(losses))))
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
    alerts, before, after, peak = traced(lambda: engine.judge_complete(1, records))
    assert peak - max(before, after) < 24 * n, (peak - before, after - before)
    assert alerts and all(a.window_percentile == expected[a.record["line"]] for a in alerts)
    assert all(a.window_percentile >= CONFIG.window_percentile for a in alerts)


def test_judging_a_whole_window_holds_its_scores_once():
    """The first window with losses, judged whole from a ``read()`` (as the stage reads it back
    from disk): its scores are held once, sorted in place (8 bytes an event), not beside a
    sorted copy (16). Few alerts (percentile 99.99) and records made as they are read, so the
    scores are what a window's size costs."""
    n = 40_000
    rng = random.Random(6)
    config = replace(CONFIG, window_percentile=99.99, normalise=["user"])
    losses = [rng.gammavariate(2.0, 0.5) for _ in range(n)]

    def read():
        for i, loss in enumerate(losses):
            yield {"source": {"topic": "raw", "partition": 0, "offset": i}, "line": i,
                   "event_time": float(i), "window": 1, "raw": "", "loss": loss,
                   "entities": {"user": f"U{i % 7}", "src_host": "C1", "dst_host": "DC"}}

    expected = AlertEngine(config).judge_complete(1, list(read()))
    engine = AlertEngine(config)
    alerts, before, after, peak = traced(lambda: engine.judge_complete_read(1, read))
    assert peak - max(before, after) < 12 * n, (peak - before, after - before)
    assert [(a.record["line"], a.window_percentile, a.score, a.reasons) for a in alerts] == \
        [(a.record["line"], a.window_percentile, a.score, a.reasons) for a in expected]


def engine_with_histories(entities: int, kept: int, seed: int = 7) -> AlertEngine:
    """An engine whose ``entities`` histories hold ``kept`` losses each, and a threshold."""
    rng = random.Random(seed)
    engine = AlertEngine(replace(CONFIG, history=kept, max_entities=10 * entities))
    items = [(rng.gammavariate(2.0, 0.5), {"user": f"U{i % entities}", "src_host": "",
                                           "dst_host": ""}) for i in range(entities * kept)]
    engine.close_window(0, items)
    engine.throttle[1] = {("user", "U1"): 2}
    engine.alerted[1] = {(5.0, 6, ("raw", 0, 5))}
    return engine


def savez_state(engine: AlertEngine, extra: dict) -> bytes:
    """The state as encode_state wrote it before write_state: gathered, then np.savez."""
    kinds: dict[str, int] = {}
    columns: dict[str, list] = {k: [] for k in ("kind", "names", "name_ends", "total", "seen",
                                                "count", "losses", "events", "mean", "m2")}
    end = 0
    for (kind, value), h in engine.histories.items():
        name = value.encode("utf-8", "surrogatepass")
        end += len(name)
        for key, v in (("kind", kinds.setdefault(kind, len(kinds))), ("names", name),
                       ("name_ends", end), ("total", h.total_events), ("seen", h.last_window),
                       ("count", h.count), ("events", h.seen), ("mean", h.mean),
                       ("m2", h.m2)):
            columns[key].append(v)
        columns["losses"].extend(engine.kept((kind, value)))
    meta = {"format": STATE_FORMAT, "last_window": engine.last_window, "kinds": list(kinds),
            "extra": extra, **engine._small_state()}
    out = io.BytesIO()
    np.savez(out, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
             kind=np.array(columns["kind"], dtype=np.uint32),
             names=np.frombuffer(b"".join(columns["names"]), dtype=np.uint8),
             **{k: np.array(columns[k], dtype=np.int64) for k in ("name_ends", "total", "seen",
                                                                   "count")},
             losses=np.array(columns["losses"], dtype=np.float64),
             grid=np.asarray(engine.reference.grid, dtype=np.float64),
             events=np.array(columns["events"], dtype=np.int64),
             **{k: np.array(columns[k], dtype=np.float64) for k in ("mean", "m2")})
    return out.getvalue()


def npz_arrays(data: bytes) -> list[tuple[str, str, list]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return [(name, npz[name].dtype.str, npz[name].tolist()) for name in npz.files]


def test_saving_the_state_streams_the_kept_losses_and_writes_what_savez_wrote(tmp_path):
    """write_state puts each history's losses into the file as it goes: the traced peak while
    saving stays far under the kept losses' size (gathering them into one array, then an .npz
    in memory, held them three times over). The arrays, their order and dtypes are np.savez's,
    and the state reads back the same."""
    engine = engine_with_histories(entities=2_000, kept=250)  # 500k kept losses: 4 MB
    losses_bytes = 8 * sum(h.count for h in engine.histories.values())
    extra = {"resume_offset": {"0": 12}}
    path = tmp_path / "alerter.npz"
    def save() -> None:
        with open(path, "wb") as handle:
            write_state(engine, extra, handle)

    _, before, _, peak = traced(save)
    assert peak - before < losses_bytes / 2, (peak - before, losses_bytes)
    data = path.read_bytes()
    assert npz_arrays(data) == npz_arrays(savez_state(engine, extra))
    assert encode_state(engine, extra) == data or npz_arrays(encode_state(engine, extra)) == \
        npz_arrays(data)  # (the zip entries' times may differ by a second)
    restored, restored_extra = decode_state(data, engine.config)
    assert restored.state() == engine.state() and restored_extra == extra


def test_reading_the_state_back_holds_no_losses_in_memory(tmp_path):
    """decode_state streams the kept losses from the file to the loss store, an entity at a
    time: neither while reading nor after does the engine hold them (the old decode held the
    file's array and each history's bytes: twice their size)."""
    engine = engine_with_histories(entities=2_000, kept=250)
    path = tmp_path / "alerter.npz"
    path.write_bytes(encode_state(engine, {}))
    losses_bytes = 8 * sum(h.count for h in engine.histories.values())

    def load():
        with open(path, "rb") as handle:
            return decode_state(handle, engine.config, str(tmp_path))

    (restored, _), before, after, peak = traced(load)
    assert peak - before < losses_bytes / 3 and after - before < losses_bytes / 4, \
        (peak - before, after - before, losses_bytes)
    assert restored.state() == engine.state()


def test_closing_a_window_six_times_larger_costs_no_more_memory(monkeypatch):
    """Everything a close holds, what stays included (the kept losses and the scores were 8 B
    each, and grew with the window): the same for 10k and 60k events over the same 600 users,
    with the scratch sizes made small so that both windows go through the bucket files, the
    chunked reduce, the sorted runs and their merge (pipeline/losstore.py, sortedscores.py)."""
    monkeypatch.setattr(alerting, "FLUSH_PAIRS", 128)
    monkeypatch.setattr(losstore, "REDUCE_PAIRS", 1024)
    monkeypatch.setattr(sortedscores, "RUN", 4096)
    monkeypatch.setattr(sortedscores, "MERGE_BYTES", 64 * 1024)
    monkeypatch.setattr(sortedscores, "MIN_BLOCK", 256)
    config = replace(CONFIG, history=1_000)
    users = [{"user": f"U{i}", "src_host": "", "dst_host": ""} for i in range(600)]

    def growth(n: int) -> int:
        engine = AlertEngine(config)
        engine.close_window(0, [(0.5, user) for user in users])
        losses = np.random.default_rng(n).gamma(2.0, 0.5, n).tolist()
        midrank_percentiles([0.0])  # scipy imported before measuring
        _, before, _, peak = traced(lambda: engine.close_window(
            1, lambda: ((loss, users[i % 600]) for i, loss in enumerate(losses))))
        expected = [0.5] + losses[7::600]
        assert engine.kept(("user", "U7")) == expected[-1_000:]
        reference = Reference.of(1, losses, config.window_percentile)
        assert (engine.reference.threshold, engine.reference.grid.tolist()) == \
            (reference.threshold, reference.grid.tolist())
        return peak - before

    small, large = growth(10_000), growth(60_000)
    # Kept losses and scores in memory: + 2 x 8 B x 50k = 800 KB.
    assert large < small + 200_000, (small, large)
