"""Alert logic on constructed score streams, and the alerter stage's restart over a real broker."""

from __future__ import annotations

import json
import random
import signal
import time
from dataclasses import replace

import pytest
from helpers import delete_topics, read_records, stream_config, wait_for

from pipeline.alerting import AlertEngine, StateFormatError, alerts_from_rows, decode_state, encode_state
from pipeline.config import AlertingConfig
from pipeline.demo import StageProcesses
from pipeline.kafka import make_producer
from pipeline.scorefile import parse_row, stored_loss
from pipeline.serde import codec
from pipeline.stages.alerter import judged_through

# The raw-loss rules (normalise=[]); tests/test_normalise.py covers the normalised score.
CONFIG = AlertingConfig(window_percentile=99.9, z_threshold=4.0, min_history=20, history=500,
                        mad_floor=0.05, max_alerts_per_entity=3, normalise=[])


def record(offset: int, window: int, loss: float | None, user: str = "U1", src: str = "C1",
           dst: str = "C2") -> dict:
    return {"source": {"topic": "raw", "partition": 0, "offset": offset}, "line": offset + 1,
            "event_time": window * 86400.0 + offset, "window": window,
            "entities": {"user": user, "src_host": src, "dst_host": dst},
            "loss": loss, "loss_total": None if loss is None else loss * 10, "raw": f"event {offset}"}


def normal_window(window: int, start: int, rng: random.Random, users: int = 20, size: int = 400,
                  shared_dst: bool = True):
    """Every user at loss ~1.0 with a little noise, from their own host (to a shared server)."""
    return [record(start + i, window, rng.gauss(1.0, 0.05), f"U{i % users}", f"C{i % users}",
                   "DC" if shared_dst else f"D{i % users}")
            for i in range(size)]


def test_entity_history_flags_a_loss_extreme_for_that_entity():
    rng = random.Random(1)
    engine = AlertEngine(replace(CONFIG, window_percentile=100.0))  # entity rule only
    for w in range(3):
        assert engine.judge_window(w, normal_window(w, w * 1000, rng)) == []
    window = normal_window(3, 3000, rng)
    window[5]["loss"] = 1.6  # unremarkable for the window, very high for U5 (median 1.0, MAD ~0.03)
    alerts = engine.judge_window(3, window)
    assert [a.record["source"]["offset"] for a in alerts] == [3005]
    reasons = " ".join(alerts[0].reasons)
    assert "user U5: robust z" in reasons
    stats = {s["kind"]: s for s in alerts[0].entity_stats}
    assert stats["user"]["entity"] == "U5" and stats["user"]["z"] >= 4.0
    assert stats["user"]["median"] == pytest.approx(1.0, abs=0.05)


def test_no_entity_verdict_without_enough_history():
    engine = AlertEngine(replace(CONFIG, window_percentile=100.0, min_history=50))
    rng = random.Random(2)
    engine.judge_window(0, normal_window(0, 0, rng, shared_dst=False))  # 20 losses per entity
    window = normal_window(1, 1000, rng, shared_dst=False)
    window[3]["loss"] = 5.0
    assert engine.judge_window(1, window) == []  # U3 has 20 < 50 losses of history


def test_window_percentile_flags_the_top_of_the_window():
    engine = AlertEngine(replace(CONFIG, window_percentile=99.0, z_threshold=1e9))
    losses = list(range(1000))
    random.Random(3).shuffle(losses)
    window = [record(i, 0, float(loss), f"U{i}", f"C{i}", f"D{i}") for i, loss in enumerate(losses)]
    alerts = engine.judge_window(0, window)
    assert sorted(a.record["loss"] for a in alerts) == [float(x) for x in range(990, 1000)]
    assert all("percentile of window 0" in a.reasons[0] for a in alerts)


def test_unscored_events_are_never_flagged():
    engine = AlertEngine(replace(CONFIG, window_percentile=1.0))
    assert engine.judge_window(0, [record(i, 0, None) for i in range(10)]) == []


def test_repeats_are_throttled_per_entity_per_window_keeping_the_highest():
    engine = AlertEngine(replace(CONFIG, window_percentile=90.0, z_threshold=1e9))
    window = [record(i, 0, 1.0, f"U{i}", f"C{i}", f"D{i}") for i in range(200)]
    for i in range(10):  # ten outstanding events of one user from one host
        window.append(record(500 + i, 0, 10.0 + i, "ATTACKER", "C666", "D666"))
    alerts = engine.judge_window(0, window)
    attacker = [a for a in alerts if a.record["entities"]["user"] == "ATTACKER"]
    assert sorted(a.record["loss"] for a in attacker) == [17.0, 18.0, 19.0]


def test_history_comes_from_earlier_windows_only():
    """A burst of one user's attacks cannot lower its own z-scores within the window."""
    rng = random.Random(4)
    engine = AlertEngine(replace(CONFIG, window_percentile=100.0, max_alerts_per_entity=1000))
    for w in range(2):
        engine.judge_window(w, normal_window(w, w * 1000, rng))
    burst = normal_window(2, 2000, rng) + [record(3000 + i, 2, 2.0, "U7", "C7", "DC")
                                           for i in range(200)]
    flagged = [a for a in engine.judge_window(2, burst) if a.record["entities"]["user"] == "U7"]
    assert len(flagged) == 200


def test_restart_from_saved_state_continues_exactly_and_replays_count_once():
    rng = random.Random(5)
    windows = [normal_window(w, w * 1000, rng) for w in range(5)]
    windows[4][9]["loss"] = 2.0
    straight = AlertEngine(replace(CONFIG, window_percentile=100.0))
    expected = [straight.judge_window(w, windows[w]) for w in range(5)]
    assert expected[4] and not any(expected[:4])

    first = AlertEngine(replace(CONFIG, window_percentile=100.0))
    for w in range(3):
        first.judge_window(w, windows[w])
    saved = json.loads(json.dumps(first.state()))  # what the stage writes to disk
    resumed = AlertEngine.from_state(replace(CONFIG, window_percentile=100.0), saved)
    assert resumed.judge_window(2, windows[2]) == []  # a replayed window: judged already
    assert resumed.state() == saved  # ... and not counted twice
    got = [resumed.judge_window(w, windows[w]) for w in (3, 4)]
    assert [[a.record["source"]["offset"] for a in ws] for ws in got] == \
           [[a.record["source"]["offset"] for a in ws] for ws in expected[3:]]
    assert resumed.state() == straight.state()


def test_history_is_bounded():
    engine = AlertEngine(replace(CONFIG, history=30))
    rng = random.Random(6)
    for w in range(5):
        engine.judge_window(w, normal_window(w, w * 1000, rng, users=2))
    assert all(len(engine.kept(key)) == h.count == 30 for key, h in engine.histories.items())
    assert engine.histories[("user", "U0")].total_events == 5 * 200


def test_alerts_from_a_scores_file_match_the_engine():
    rng = random.Random(7)
    windows = [normal_window(w, w * 1000, rng) for w in range(4)]
    windows[3][2]["loss"] = 3.0
    rows = [parse_row({"line": str(r["line"]), "event_time": str(r["event_time"]), "window": str(r["window"]),
                       "user": r["entities"]["user"], "src_host": r["entities"]["src_host"],
                       "dst_host": r["entities"]["dst_host"], "loss": f"{r['loss']:.6f}", "loss_total": ""})
            for w in windows for r in w]
    engine = AlertEngine(CONFIG)
    direct = [a.record["line"] for w in range(4) for a in engine.judge_window(w, windows[w])]
    offline = [a.record["line"] for a in alerts_from_rows(rows, CONFIG)]
    assert offline == direct and 3003 in offline


def test_least_recently_seen_entities_are_evicted_beyond_max_entities():
    engine = AlertEngine(replace(CONFIG, max_entities=50, entity_ttl_windows=1000))
    rng = random.Random(9)
    for w in range(6):  # 10 new users a window, plus U-keep every window
        window = [record(w * 100 + i, w, rng.gauss(1.0, 0.05), f"U{w}-{i}", "", "") for i in range(10)]
        window.append(record(w * 100 + 99, w, 1.0, "U-keep", "", ""))
        engine.judge_window(w, window)
        assert len(engine.histories) == min(50, 11 * (w + 1) - w)
    users = [value for _, value in engine.histories]
    assert "U-keep" in users and "U0-0" not in users and "U5-9" in users
    assert users[-2:] == ["U5-9", "U-keep"] and engine.evicted == 6 * 10 + 1 - 50
    assert engine.histories[("user", "U-keep")].total_events == 6


def test_entities_absent_longer_than_the_ttl_lose_their_history():
    engine = AlertEngine(replace(CONFIG, entity_ttl_windows=2))
    engine.judge_window(0, [record(0, 0, 1.0, "OLD", "", ""), record(1, 0, 1.0, "NEW", "", "")])
    for w in (1, 2):
        engine.judge_window(w, [record(w, w, 1.0, "NEW", "", "")])
        assert ("user", "OLD") in engine.histories  # absent for 1, then 2 windows: kept
    engine.judge_window(3, [record(3, 3, 1.0, "NEW", "", "")])
    assert list(engine.histories) == [("user", "NEW")]  # absent for 3 > 2 windows


def capped_windows() -> list[list[dict]]:
    """Twelve windows where a capped history changes the verdicts: U-rare is seen every third
    window, among 30 one-off users a window, and is finally anomalous."""
    rng = random.Random(10)
    windows = []
    for w in range(12):
        window = [record(w * 1000 + i, w, rng.gauss(1.0, 0.05), f"U{w}-{i}", "", "")
                  for i in range(30)]
        if w % 3 == 0:
            window += [record(w * 1000 + 500 + i, w, rng.gauss(1.0, 0.02), "U-rare", "", "")
                       for i in range(25)]
        windows.append(window)
    windows[9][-1]["loss"] = 1.4
    return windows


def test_eviction_gives_the_same_alerts_offline_and_across_a_restart():
    config = replace(CONFIG, window_percentile=100.0, min_history=20, max_entities=40)
    windows = capped_windows()
    unbounded = AlertEngine(replace(config, max_entities=10**9))
    assert any(unbounded.judge_window(w, windows[w]) for w in range(12))
    straight = AlertEngine(config)
    expected = [[a.record["line"] for a in straight.judge_window(w, windows[w])] for w in range(12)]
    assert not any(expected)  # U-rare's history was evicted in the windows between its visits

    rows = [parse_row({"line": str(r["line"]), "event_time": str(r["event_time"]), "window": str(r["window"]),
                       "user": r["entities"]["user"], "src_host": r["entities"]["src_host"],
                       "dst_host": r["entities"]["dst_host"], "loss": repr(r["loss"]), "loss_total": ""})
            for w in windows for r in w]
    offline = [a.record["line"] for a in alerts_from_rows(rows, config)]
    assert offline == [line for lines in expected for line in lines]

    first = AlertEngine(config)
    for w in range(5):
        first.judge_window(w, windows[w])
    resumed, extra = decode_state(encode_state(first, {"resume_offset": 17}), config)
    assert extra == {"resume_offset": 17} and resumed.state() == first.state()
    got = [[a.record["line"] for a in resumed.judge_window(w, windows[w])] for w in range(5, 12)]
    assert got == expected[5:] and resumed.state() == straight.state()


def test_binary_state_round_trips_and_is_smaller_than_json():
    engine = AlertEngine(CONFIG)
    rng = random.Random(11)
    for w in range(3):
        engine.judge_window(w, normal_window(w, w * 1000, rng, users=200, shared_dst=False)
                            + [record(w * 1000 + 999, w, 2.0, "Ü\u202e\x00 odd,name", "h\ud800", "")])
    data = encode_state(engine, {"resume_offset": 3})
    restored, extra = decode_state(data, CONFIG)
    assert restored.state() == engine.state() and restored.last_window == 2
    assert list(restored.histories) == list(engine.histories)  # LRU order kept
    assert len(data) < 0.7 * len(json.dumps(engine.state()))


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped byte", "json", "foreign npz",
                                    "lengths"])
def test_damaged_binary_state_is_refused(damage):
    import io

    import numpy as np

    engine = AlertEngine(CONFIG)
    engine.judge_window(0, normal_window(0, 0, random.Random(12)))
    data = encode_state(engine, {"resume_offset": 1})
    if damage == "empty":
        data = b""
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped byte":  # inside the losses array: only the zip CRC can tell
        at = data.index(np.float64(engine.kept(("user", "U0"))[0]).tobytes())
        data = data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]
    elif damage == "json":
        data = json.dumps(engine.state()).encode()
    elif damage == "foreign npz":
        out = io.BytesIO()
        np.savez(out, weights=np.zeros(3))
        data = out.getvalue()
    elif damage == "lengths":
        out = io.BytesIO()
        with np.load(io.BytesIO(data)) as npz:
            arrays = {k: npz[k] for k in npz.files}
        arrays["losses"] = arrays["losses"][:-1]
        np.savez(out, **arrays)
        data = out.getvalue()
    with pytest.raises(StateFormatError):
        decode_state(data, CONFIG)


# ------------------------------------------------------------------- alerts in real time


def percentile_only(**changes) -> AlertingConfig:
    return replace(CONFIG, z_threshold=1e9, max_alerts_per_entity=1000, **changes)


def test_the_first_window_with_losses_is_judged_whole_then_events_one_by_one():
    engine = AlertEngine(percentile_only(window_percentile=99.0))
    assert engine.judge_window(0, [record(i, 0, None) for i in range(50)]) == []  # no model yet
    assert not engine.realtime  # an unscored window gives no threshold
    losses = [float(x) for x in range(1000)]
    random.Random(13).shuffle(losses)
    first = [record(1000 + i, 1, loss, f"U{i}", f"C{i}", f"D{i}") for i, loss in enumerate(losses)]
    with pytest.raises(ValueError, match="judge it whole"):
        engine.judge_event(1, first[0])
    alerts = engine.judge_window(1, first)  # its own top 1%, as before alerts went real-time
    assert sorted(a.record["loss"] for a in alerts) == [float(x) for x in range(990, 1000)]
    assert "percentile of window 1" in alerts[0].reasons[0]
    assert engine.realtime and engine.reference.window == 1
    assert engine.reference.threshold == 990.0  # the lowest loss window 1's rule flagged
    # Window 2: each event alone against window 1's threshold, whatever else window 2 holds.
    assert engine.judge_event(2, record(3000, 2, 989.5)) is None
    alert = engine.judge_event(2, record(3001, 2, 990.0))
    assert alert is not None and alert.reasons == [
        "loss 990.000 at or above 990.000, the 99th percentile of window 1"]
    assert 98.9 <= alert.window_percentile <= 99.1  # where 990 stands among window 1's losses
    assert engine.judge_event(2, record(3002, 2, 5000.0)).window_percentile == 100.0


def test_thresholds_come_only_from_earlier_windows():
    """A burst in window w does not raise window w's own threshold: every event of it is
    flagged, where judging the window against itself would flag its top 0.1% only."""
    rng = random.Random(14)
    config = percentile_only(window_percentile=99.5)
    engine = AlertEngine(config)
    engine.judge_window(1, normal_window(1, 1000, rng, shared_dst=False))
    threshold = engine.reference.threshold
    assert 1.0 < threshold < 1.5
    burst = [record(3000 + i, 2, 3.0 + i / 1000, f"X{i}", f"XC{i}", f"XD{i}") for i in range(100)]
    window = sorted(normal_window(2, 2000, rng, shared_dst=False) + burst,
                    key=lambda r: r["source"]["offset"])
    flagged = engine.judge_window(2, window)
    assert {a.record["source"]["offset"] for a in flagged} >= {r["source"]["offset"] for r in burst}
    against_itself = AlertEngine(config).judge_complete(2, window)
    assert len(against_itself) <= 3 and len(flagged) >= 100
    assert engine.reference.window == 2 and engine.reference.threshold >= 3.0  # for window 3 on


def test_the_real_time_throttle_is_first_come_first_served():
    engine = AlertEngine(replace(CONFIG, window_percentile=90.0, z_threshold=1e9))
    engine.judge_window(0, [record(i, 0, 1.0 + i / 1000, f"U{i}", f"C{i}", f"D{i}") for i in range(200)])
    attacks = [record(500 + i, 1, 10.0 - i, "ATTACKER", "C666", "D666") for i in range(5)]
    attacks += [record(600 + i, 1, 20.0 + i, "ATTACKER", "C666", "D666") for i in range(5)]
    alerts = [a for r in attacks if (a := engine.judge_event(1, r)) is not None]
    assert [a.record["loss"] for a in alerts] == [10.0, 9.0, 8.0]  # the first three, not the highest
    # An event with one entity not throttled yet still goes out.
    other_host = record(700, 1, 30.0, "ATTACKER", "C777", "D666")
    assert engine.judge_event(1, other_host) is not None
    assert engine.throttle[1][("user", "ATTACKER")] == 4
    engine.close_window(1, [(r["loss"], r["entities"]) for r in attacks + [other_host]])
    assert engine.throttle == {} and engine.alerted == {}  # a closed window's throttle is dropped


def test_an_event_judged_again_is_not_alerted_twice_even_after_a_restart():
    rng = random.Random(15)
    config = replace(CONFIG, window_percentile=99.0)
    windows = [normal_window(w, w * 1000, rng) for w in range(3)]
    attacks = (7, 147, 207, 267, 387)  # U7 five times, two before the restart: three go out
    for i in attacks + (3, 250):
        windows[2][i]["loss"] = 3.0 + i / 1000
    straight = AlertEngine(config)
    expected = [[a.record["line"] for a in straight.judge_window(w, windows[w])] for w in range(3)]
    assert [line - 2001 for line in expected[2] if line - 2001 in attacks] == [7, 147, 207]
    assert {3, 250} <= {line - 2001 for line in expected[2]}

    first = AlertEngine(config)
    for w in range(2):
        first.judge_window(w, windows[w])
    half = [a.record["line"] for r in windows[2][:200] if (a := first.judge_event(2, r))]
    assert half and first.judge_event(2, windows[2][3]) is None  # judged again: alerted already
    resumed, extra = decode_state(encode_state(first, {"resume_offset": {"0": 7}}), config)
    assert extra == {"resume_offset": {"0": 7}} and resumed.state() == first.state()
    assert AlertEngine.from_state(config, json.loads(json.dumps(first.state()))).state() == first.state()
    # The restarted stage reads the open window again from its first record.
    rest = [a.record["line"] for r in windows[2] if (a := resumed.judge_event(2, r))]
    assert half + rest == expected[2]
    resumed.close_window(2, [(r["loss"], r["entities"]) for r in windows[2]])
    assert resumed.state() == straight.state()


def test_a_state_of_the_previous_format_is_refused():
    import io

    import numpy as np

    engine = AlertEngine(CONFIG)
    engine.judge_window(0, normal_window(0, 0, random.Random(16)))
    with np.load(io.BytesIO(encode_state(engine, {"resume_offset": 1}))) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["meta"].tobytes())
    meta["format"] = "salka-alerter-state-v2"
    del meta["reference"], meta["open"], arrays["grid"]  # what v2 wrote
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    out = io.BytesIO()
    np.savez(out, **arrays)
    with pytest.raises(StateFormatError, match="v4 expected"):
        decode_state(out.getvalue(), CONFIG)


# ---------------------------------------------------------------------------- the stage


def produce_window(producer, config, records: list[dict]) -> None:
    for r in records:
        producer.produce(config.topics.scores, codec().encode("salka.ScoredEvent", r), partition=0)
    done = {"window": records[0]["window"], "count": len(records), "watermark": None, "stage": "trainer"}
    producer.produce(config.topics.scores, codec().encode("salka.WindowComplete", done), partition=0)
    assert producer.flush(30) == 0


@pytest.mark.slow
def test_alerter_stage_keeps_its_history_across_a_restart(kafka_bootstrap, tmp_path):
    config, config_path = stream_config(
        tmp_path, kafka_bootstrap, {"alerting": {"window_percentile": 100.0}})
    rng = random.Random(8)
    windows = [normal_window(w, w * 1000, rng, size=200) for w in range(4)]
    windows[3][4]["loss"] = 2.5  # extreme for U4 only against its history of windows 0..2
    producer = make_producer(config)
    stages = StageProcesses(config_path, tmp_path / "logs")
    try:
        for w in range(3):
            produce_window(producer, config, windows[w])
        stages.start("alerter")
        state = tmp_path / "state" / "alerter.npz"
        wait_for(lambda: judged_through(config) == 2, 90, what="windows 0-2 judged")
        first = stages.processes[0][1]
        first.send_signal(signal.SIGTERM)
        assert first.wait(30) == 0
        produce_window(producer, config, windows[2])  # a redelivered window: must not count twice
        produce_window(producer, config, windows[3])
        stages.start("alerter", 1)
        alerts = read_records(config, config.topics.alerts, expected=1, timeout=90)
        wait_for(lambda: judged_through(config) == 3, 60, what="window 3 judged")
    finally:
        stages.stop()
        delete_topics(config)
    assert [(name, r["line"]) for name, r in alerts] == [("salka.Alert", 3005)]
    assert any("user U4: robust z" in reason for reason in alerts[0][1]["reasons"])
    engine = AlertEngine(replace(config.alerting))
    for w in range(4):  # the losses as the stage judges them: as score files keep them
        engine.judge_window(w, [{**r, "loss": stored_loss(r["loss"])} for r in windows[w]])
    assert decode_state(state.read_bytes(), config.alerting)[0].state() == engine.state()


@pytest.mark.slow
def test_alerter_stage_alerts_within_a_second_of_the_score(kafka_bootstrap, tmp_path):
    """Over a real broker: an outlier's alert goes out while its window is still open, shortly
    after its score (the Kafka timestamps of both; printed with -s)."""
    from pipeline.topicread import read_topic

    config, config_path = stream_config(
        tmp_path, kafka_bootstrap, {"alerting": {"window_percentile": 99.0}})
    rng = random.Random(17)
    windows = [normal_window(w, w * 1000, rng, size=200) for w in range(3)]
    producer = make_producer(config)
    stages = StageProcesses(config_path, tmp_path / "logs")
    try:
        stages.start("alerter")
        for w in range(2):
            produce_window(producer, config, windows[w])
        wait_for(lambda: judged_through(config) == 1, 90, what="windows 0-1 judged")
        for i, r in enumerate(windows[2][:5]):  # window 2 stays open: no completion record
            r["loss"] = 5.0 + i
            producer.produce(config.topics.scores, codec().encode("salka.ScoredEvent", r), partition=0)
            assert producer.flush(30) == 0
            time.sleep(0.5)

        def window_2_alerts() -> list[tuple[dict, int]]:  # (alert, its timestamp), once all 5
            alerts = [(r, m.timestamp()[1]) for m in read_topic(config, config.topics.alerts, timeout=30)
                      if (r := codec().decode(m.value())[1])["window"] == 2]
            return alerts if len(alerts) >= 5 else []

        alerts = wait_for(window_2_alerts, 30, what="window 2's alerts")
        scores = {codec().decode(m.value())[1]["line"]: m.timestamp()[1]
                  for m in read_topic(config, config.topics.scores, timeout=30)
                  if codec().decode(m.value())[0] == "salka.ScoredEvent"}
        latencies = [(t - scores[r["line"]]) / 1000 for r, t in alerts]
    finally:
        stages.stop()
        delete_topics(config)
    print(f"score -> alert latency (s): {sorted(latencies)}")
    assert len(latencies) == 5 and judged_through(config) == 1  # window 2 was never closed
    assert sorted(latencies)[2] < 1.0  # the median; a shared 2-core machine can stall one
