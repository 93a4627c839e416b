"""Differential attacks on the alerter stage's loss rounding (scorefile.stored_loss, commit 15813f6).

The stage (fed in event order) against ``pipeline alerts`` (alertview.offline_alerts ->
alerting.alerts_from_rows over read_scores) over the archive the real ArchiverStage writes from
the same scores topic: whole alert records (loss, score, reasons, percentiles, entity stats)
compared by repr, so -0.0 against 0.0 and NaN count, and the engines' whole state after the last
window (histories, kept losses, moments, threshold), so an unrounded loss that entered the
stage's engine anywhere shows even when no alert moved.
"""

from __future__ import annotations

import math
import random

import pytest
from confluent_kafka import OFFSET_INVALID, TopicPartition
from stage_fakes import FakeConsumer, RecordingOutput, scored_record
from test_stages_inprocess import completion, drive, in_event_order, make_config, scores_messages

from pipeline.alerting import AlertEngine, row_to_record
from pipeline.alertview import offline_alerts
from pipeline.config import Config
from pipeline.metrics import alert_kinds
from pipeline.scorefile import format_loss, parse_row, read_scores, stored_loss
from pipeline.stages.alerter import AlerterStage
from pipeline.stages.archiver import ArchiverStage
from pipeline.windowing import event_order

# ------------------------------------------------------------------------------ helpers


def canon(value):
    """A comparable, NaN- and sign-of-zero-aware form of an alert record (raw left out: offline
    has no input log here)."""
    if isinstance(value, dict):
        return tuple(sorted((k, canon(v)) for k, v in value.items() if k != "raw"))
    if isinstance(value, (list, tuple)):
        return tuple(canon(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return value


def stage_alerts(out: RecordingOutput, config: Config) -> list:
    return [canon(r) for _, r in out.records(config.topics.alerts)]


def archive(tmp_path, config: Config, messages) -> str:
    """The archive the real archiver writes from the same scores topic."""
    drive(ArchiverStage(config), messages, RecordingOutput())
    return str(tmp_path / "archive")


def offline(path: str, config: Config) -> list:
    alerts, _ = offline_alerts(path, config.alerting)
    return [canon(a) for a in alerts]


def offline_engine(path: str, config: Config) -> AlertEngine:
    """alerting.alerts_from_rows' engine after the last window (the same loop, kept)."""
    windows: dict[int, list[dict]] = {}
    for row in read_scores(path):
        windows.setdefault(row.window, []).append(row_to_record(row))
    engine = AlertEngine(config.alerting)
    for window in sorted(windows):
        engine.judge_window(window, sorted(windows[window], key=event_order))
    return engine


def raw_engine_alerts(config: Config, windows: dict[int, list[dict]]) -> list[tuple]:
    """What the stage decided before the change: the full doubles judged in event order."""
    engine = AlertEngine(config.alerting)
    got = []
    for w in sorted(windows):
        got += [(a.record["window"], a.record["line"])
                for a in engine.judge_window(w, sorted(windows[w], key=event_order))]
    return got


def state_repr(engine: AlertEngine) -> str:
    return repr(engine.state())


def near_tie_windows(rng: random.Random, n_windows: int = 5, size: int = 48) -> dict[int, list[dict]]:
    """Losses on a grid of 6-decimal values, each a few 1e-7 off it either way: thresholds,
    medians and MADs land on grid values and many losses round onto them."""
    windows = {}
    for w in range(n_windows):
        records = []
        for i in range(size):
            base = 1.0 + rng.randrange(12) * 1e-6
            if w >= 1 and rng.random() < 0.06:
                base += 5e-6  # a few outliers a grid step or five above the rest
            loss = base + rng.choice([-4.9e-7, -3e-7, -1e-7, 0.0, 1e-7, 3e-7, 4.9e-7])
            records.append(scored_record(f"w{w}e{i}", w, loss, w * 1000 + i,
                                         user=f"U{i % 4}", src=f"C{i % 3}", dst="DC"))
        windows[w] = records
    return windows


def near_tie_config(tmp_path, normalise: list[str]) -> Config:
    return make_config(tmp_path, alerting={"window_percentile": 90.0, "min_history": 10,
                                           "mad_floor": 1e-6, "z_threshold": 2.0,
                                           "max_alerts_per_entity": 1000, "normalise": normalise})


# ------------------------------------------------------------------------------ near ties


@pytest.mark.parametrize("normalise", [[], ["user"]])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_near_ties_stage_equals_pipeline_alerts_over_the_real_archive(tmp_path, normalise, seed):
    config = near_tie_config(tmp_path, normalise)
    windows = near_tie_windows(random.Random(seed))
    messages = in_event_order(config, windows)
    out = RecordingOutput()
    stage = AlerterStage(config)
    drive(stage, messages, out)
    path = archive(tmp_path, config, messages)
    got = stage_alerts(out, config)
    assert got == offline(path, config)
    assert got  # control: the rules fire on this data
    assert state_repr(stage.engine) == state_repr(offline_engine(path, config))


def test_near_ties_control_the_full_doubles_decide_otherwise(tmp_path):
    """Control for the test above: on this data the unrounded doubles give other alerts, so
    equality there is the rounding's doing, not the data's."""
    config = near_tie_config(tmp_path, [])
    windows = near_tie_windows(random.Random(1))
    messages = in_event_order(config, windows)
    path = archive(tmp_path, config, messages)
    offline_keys = [(a["window"], a["line"]) for a in offline_alerts(path, config.alerting)[0]]
    assert raw_engine_alerts(config, windows) != offline_keys


@pytest.mark.parametrize("normalise", [[], ["user"]])
def test_near_ties_held_unjudged_and_restart_paths_equal_offline(tmp_path, normalise):
    """The paths that judge a loss other than on arrival: the first scored window judged whole
    from disk, scores before any threshold (unjudged, from disk), scores held in memory for an
    earlier window's straggler, and a clean restart mid-window (held records and state)."""
    config = near_tie_config(tmp_path, normalise)
    windows = near_tie_windows(random.Random(7), n_windows=6)
    for r in windows[0]:
        r["loss"] = r["loss_total"] = None  # no model yet: window 1 is judged whole
    ordered = {w: sorted(rs, key=event_order) for w, rs in windows.items()}
    straggler = ordered[3][-1]
    records = [*ordered[0], completion(0, len(ordered[0])),
               *ordered[1], *ordered[2],  # window 2 before window 1 completes: unjudged
               completion(1, len(ordered[1])), completion(2, len(ordered[2])),
               *ordered[3][:-1], completion(3, len(ordered[3])),
               *ordered[4],  # held: window 3 waits for its straggler
               straggler, completion(4, len(ordered[4])),
               *ordered[5], completion(5, len(ordered[5]))]
    messages = scores_messages(config, records)
    cut = records.index(ordered[5][len(ordered[5]) // 2])
    out = RecordingOutput()
    stage = AlerterStage(config)
    drive(stage, messages[:cut], out)
    assert stage.counts["windows"] == 5
    stage.close(out)
    stage.after_flush()
    resumed = AlerterStage(config)
    consumer = FakeConsumer({config.topics.scores: 1})
    resumed.on_assign(consumer, [TopicPartition(config.topics.scores, 0, OFFSET_INVALID)])
    drive(resumed, messages[consumer.assigned[0].offset:], out)
    path = archive(tmp_path, config, messages)
    got, want = stage_alerts(out, config), offline(path, config)
    # Arrival order differs from event order across windows only (held / unjudged): per window
    # the same alerts in the same order.
    by_window = lambda alerts: sorted(alerts, key=lambda a: dict(a)["window"])  # noqa: E731
    assert by_window(got) == by_window(want) and got
    assert state_repr(resumed.engine) == state_repr(offline_engine(path, config))


# ------------------------------------------------------------------------------ edge losses

EDGES = [0.0, -0.0, 1e-7, -1e-7, -4e-7, 5e-7, -5e-7, 2.5e-6, 0.0000015, 1.0000005, 2.0000004999,
         123456789012.3456789, 1e300, -1e300, 5e-324, math.inf, -math.inf, math.nan, -math.nan]


@pytest.mark.parametrize("first_unscored", [False, True])
@pytest.mark.parametrize("edge", EDGES, ids=repr)
def test_edge_losses_stage_equals_pipeline_alerts(tmp_path, edge, first_unscored):
    """Losses that round to -0.0, exact decimal halves, huge, subnormal, infinite and NaN: in
    the window judged whole, the threshold's window and a realtime window."""
    config = make_config(tmp_path, alerting={"window_percentile": 90.0, "min_history": 5,
                                             "max_alerts_per_entity": 1000, "normalise": ["user"]})
    rng = random.Random(3)
    windows = {w: [scored_record(f"w{w}e{i}", w, rng.gauss(1.0, 0.05), w * 1000 + i,
                                 user=f"U{i % 3}") for i in range(30)] for w in range(4)}
    if first_unscored:
        for r in windows[0]:
            r["loss"] = r["loss_total"] = None
    for w in (1, 2, 3):
        for i in (2, 11):
            windows[w][i]["loss"] = edge
    windows[3][20]["loss"] = -edge if not math.isnan(edge) else 0.5
    messages = in_event_order(config, windows)
    out = RecordingOutput()
    stage = AlerterStage(config)
    drive(stage, messages, out)
    path = archive(tmp_path, config, messages)
    assert stage_alerts(out, config) == offline(path, config)
    assert state_repr(stage.engine) == state_repr(offline_engine(path, config))


@pytest.mark.parametrize("edge", EDGES + [None, 3.14159265358979], ids=repr)
def test_stored_loss_is_what_read_scores_gives_for_the_written_cell(edge):
    cell = format_loss(edge)
    row = parse_row({"line": "1", "event_time": "1", "window": "0", "loss": cell, "loss_total": ""})
    assert repr(stored_loss(edge)) == repr(row.loss)
    # and once stored it stays put (a second rounding would move nothing)
    assert repr(stored_loss(stored_loss(edge))) == repr(stored_loss(edge))


def test_none_and_nan_losses_are_left_as_they_were():
    assert stored_loss(None) is None
    assert math.isnan(stored_loss(math.nan)) and stored_loss(math.inf) == math.inf


def test_alert_kinds_metric_agrees_with_offline(tmp_path):
    """metrics.alert_kinds reads entity_stats' z: the stage's (rounded) against offline's."""
    config = near_tie_config(tmp_path, [])
    windows = near_tie_windows(random.Random(2))
    messages = in_event_order(config, windows)
    out = RecordingOutput()
    stage = AlerterStage(config)
    seen = []

    class Observer:
        def alerts_published(self, alerts, z):
            seen.extend(alert_kinds(a, z) for a in alerts)

    stage.observer = Observer()
    drive(stage, messages, out)
    path = archive(tmp_path, config, messages)
    windows_rows: dict[int, list[dict]] = {}
    for row in read_scores(path):
        windows_rows.setdefault(row.window, []).append(row_to_record(row))
    engine, want = AlertEngine(config.alerting), []
    for w in sorted(windows_rows):
        want += [alert_kinds(a, config.alerting.z_threshold)
                 for a in engine.judge_window(w, sorted(windows_rows[w], key=event_order))]
    assert seen == want and seen
    assert all(r["loss"] == stored_loss(r["loss"]) for _, r in out.records(config.topics.alerts))
