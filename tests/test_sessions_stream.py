"""Session scores in streaming (sessions.entity): the trainer publishes each window's session
scores to topics.sessions, keyed "<window>/<session>", and they are replay's numbers (1e-5)."""

from __future__ import annotations

import csv
import gzip
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, stream_config
from stage_fakes import RecordingOutput
from test_stages_inprocess import drive, make_config, window_events, windows_topic
from test_stream import streamed_equal_to_replay

from pipeline.config import config_from_dict
from pipeline.generate import GenerateSpec
from pipeline.generate_sessions import write_sessions
from pipeline.kafka import topic_plan
from pipeline.replay import replay
from pipeline.serde import codec
from pipeline.sessions import SESSION_COLUMNS, SessionScore
from pipeline.stages.trainer import TrainerStage, checkpoint_files, session_key, session_record
from pipeline.topicread import TopicReader

SESSIONS_EXAMPLE = ROOT / "examples" / "sessions.yaml"


def sessions_config(**sections) -> dict:
    """examples/sessions.yaml with session scores on (a small session LM), and ``sections``."""
    data = yaml.safe_load(SESSIONS_EXAMPLE.read_text())
    data["sessions"] = {"entity": "session", "hidden_size": 16}
    data["window"] = {**data.get("window", {}), "size_seconds": 21600}
    return {**data, **sections}


def read_keyed(config, topic: str, expected: int, timeout: float = 60.0) -> list[tuple[bytes, str, dict]]:
    """(key, schema name, record) of every record of ``topic``: until ``expected`` were read, or
    the topic's end after ``timeout``."""
    out: list[tuple[bytes, str, dict]] = []
    deadline = time.monotonic() + timeout
    with TopicReader(config, [topic], "test-sessions") as reader:
        while time.monotonic() < deadline and (len(out) < expected or not reader.at_end):
            out += [(m.key(), *codec().decode(m.value())) for m in reader.poll()
                    if m.value() is not None]
    return out


def read_session_file(path: Path) -> list[dict]:
    with gzip.open(path, "rt", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == SESSION_COLUMNS
        return list(reader)


def same_number(streamed: float | None, replayed: str, tolerance: float) -> bool:
    if replayed == "":
        return streamed is None
    return streamed is not None and abs(streamed - float(replayed)) <= tolerance


# ---------------------------------------------------------------------------- no broker


def test_session_record_and_key():
    score = SessionScore(window=19675, session="blk_-16/08", events=3, first_line=7, last_line=9,
                         first_time=1_700_000_000.5, last_time=1_700_000_003.25, loss=1.5,
                         loss_total=6.0)
    record = session_record(score)
    assert codec().decode(codec().encode("salka.SessionScore", record)) == ("salka.SessionScore", record)
    assert SessionScore(**record) == score
    # the window ends at the first "/"; a "/" in the session value stays in it
    window, _, session = session_key(score).decode().partition("/")
    assert (int(window), session) == (19675, "blk_-16/08")
    first = session_record(SessionScore(0, "s", 1, 1, 1, None, None, None, None))
    assert codec().decode(codec().encode("salka.SessionScore", first))[1]["loss"] is None


def test_the_sessions_topic_is_planned_only_with_session_scores():
    off = config_from_dict(sessions_config(sessions={"entity": ""}))
    on = config_from_dict(sessions_config())
    assert on.topics.sessions in topic_plan(on) and topic_plan(on)[on.topics.sessions] == 1
    assert off.topics.sessions not in topic_plan(off)
    assert set(topic_plan(on)) - set(topic_plan(off)) == {on.topics.sessions}


def sessions_sent(out: RecordingOutput, config) -> list[tuple[int, bytes, dict]]:
    """(index among everything sent, key, record) of each session score sent."""
    return [(i, s.key, codec().decode(s.value)[1]) for i, s in enumerate(out.sent)
            if s.topic == config.topics.sessions]


def test_trainer_sends_session_scores_before_the_model_and_again_after_a_crash(tmp_path):
    """In-process, no broker: each window's session scores go out keyed "<window>/<session>"
    before the announcement of the model trained on it; a trainer that crashed before its
    checkpoint trains the window again and sends the same keys with the same values (what makes
    the compacted topic safe)."""
    config = make_config(tmp_path, tokenizer={"kind": "template"},
                         sessions={"entity": "user", "hidden_size": 8})
    messages = windows_topic(config, {w: window_events(w) for w in range(3)})
    stage, out = TrainerStage(config), RecordingOutput()
    drive(stage, messages, out)
    sent = sessions_sent(out, config)
    assert {r["window"] for _, _, r in sent} == {0, 1, 2}
    assert len({k for _, k, _ in sent}) == len(sent) == stage.counts["sessions"]
    for index, key, record in sent:
        assert key == session_key(SessionScore(**record))
        assert record["events"] > 0 and record["first_line"] <= record["last_line"]
        announced = [i for i, s in enumerate(out.sent) if s.topic == config.topics.models
                     and codec().decode(s.value)[1]["trained_through"] == record["window"]]
        assert announced and index < announced[0], "session scores after the model announcement"
    assert all((r["loss"] is None) == (r["window"] == 0) for _, _, r in sent)
    assert sum(r["events"] for _, _, r in sent) == 30  # window_events: 10 each, all with a user

    checkpoint_files(config)[0].unlink()  # window 2's: a crash before it was written
    again = RecordingOutput()
    drive(TrainerStage(config), messages, again)
    window_2 = {k: r for _, k, r in sent if r["window"] == 2}
    assert {k: r for _, k, r in sessions_sent(again, config)} == window_2


# ---------------------------------------------------------------------------- over the broker


@pytest.mark.slow
def test_streamed_session_scores_equal_replay(kafka_bootstrap, tmp_path):
    """Tokenizer, windower, trainer, scorer and archiver over the broker (3 raw partitions): the
    sessions topic holds every session of every window once, under its "<window>/<session>" key,
    with replay's numbers; and the archive equals replay's scores file."""
    log = tmp_path / "sessions.log"
    spec = GenerateSpec(users=10, computers=30, days=2, events_per_day=300, redteam_events=4,
                        seed=5, profile="sessions")
    events = write_sessions(spec, log, tmp_path / "labels.csv")["events"]
    config, config_path = stream_config(tmp_path, kafka_bootstrap,
                                        sessions_config(training={"epochs": 1}))
    assert config.sessions.entity == "session" and config.topics.partitions == 3
    replayed_sessions = tmp_path / "replay-sessions.csv.gz"
    replay(log, tmp_path / "replay-events.csv.gz", config, progress=False,
           sessions_output=replayed_sessions)
    expected = read_session_file(replayed_sessions)

    # Returns once every event is archived, and stops the stages: the trainer finishes the
    # window it is training (the last one) and sends its session scores before it exits.
    streamed_equal_to_replay(config, config_path, log, tmp_path, events)
    records = read_keyed(config, config.topics.sessions, expected=len(expected))

    assert {name for _, name, _ in records} == {"salka.SessionScore"}
    streamed = {(r["window"], r["session"]): (key, r) for key, _, r in records}
    assert len(streamed) == len(records), "a session score was published twice"
    by_window = {}
    for row in expected:
        by_window.setdefault(int(row["window"]), set()).add(row["session"])
    assert len(by_window) >= 3
    assert set(streamed) == {(w, s) for w, sessions in by_window.items() for s in sessions}
    for row in expected:
        key, record = streamed[int(row["window"]), row["session"]]
        assert key == f"{row['window']}/{row['session']}".encode()
        where = (row["window"], row["session"])
        for column in ("events", "first_line", "last_line"):
            assert record[column] == int(row[column]), (where, column)
        for column in ("first_time", "last_time"):
            assert same_number(record[column], row[column], 1e-6), (where, column)
        for column in ("loss", "loss_total"):
            assert same_number(record[column], row[column], 1e-5), (where, column, record[column],
                                                                    row[column])
    # the first window has no model yet; later ones were scored
    first = min(by_window)
    assert all(r["loss"] is None for _, r in streamed.values() if r["window"] == first)
    scored = {w for (w, _), (_, r) in streamed.items() if r["loss"] is not None}
    assert scored and first not in scored
