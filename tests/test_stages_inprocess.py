"""The stages' logic driven in-process: fake messages in, a recording Output out, no broker.

The real-broker tests (test_stream.py, test_alerting.py, ...) cover the wiring; these cover what
each stage decides: which windows close with which events, what is late, what is a repeat, one
score / row / alert per event, and what a restart resumes from. A restart is a new stage object
built from the state the previous one saved, as a restarted process would be.
"""

from __future__ import annotations

import csv
import gzip
import random

import pytest
from confluent_kafka import OFFSET_INVALID, TopicPartition
from stage_fakes import (
    RAW_TOPIC,
    FakeConsumer,
    FakeMessage,
    RecordingOutput,
    encoded,
    scored_record,
    tokenized_record,
)

from pipeline.alerting import alerts_from_rows
from pipeline.config import Config, config_from_dict
from pipeline.learner import WindowLearner
from pipeline.parsing import LineParser
from pipeline.scorefile import read_scores, score_columns, write_rows
from pipeline.stages.alerter import AlerterStage
from pipeline.stages.archiver import ArchiverStage
from pipeline.stages.trainer import TrainerStage, checkpoint_files
from pipeline.stages.windower import WindowerStage
from pipeline.topicrecords import CONTROL_HEADER, END_OF_INPUT, record_to_event


def make_config(tmp_path, **sections) -> Config:
    data = {
        "window": {"size_seconds": 10.0, "allowed_lateness_seconds": 0.0},
        "model": {"rnn": {"hidden_size": 8}},
        "training": {"epochs": 1, "batch_size": 8},
        "streaming": {"state_dir": str(tmp_path / "state"), "archive_dir": str(tmp_path / "archive")},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return config_from_dict(data)


# ---------------------------------------------------------------------------------- windower


def tokens_log(config: Config, partitions: list[list[str]]) -> list[list[FakeMessage]]:
    """The tokens topic from a compact spec: "a@21" is event a at time 21, "EOI" an end-of-input
    marker. A name met again on its partition is the same raw record delivered again (a
    restarted tokenizer wrote it twice): same source coordinates, a later tokens offset."""
    topic, log = config.topics.tokens, []
    for p, items in enumerate(partitions):
        raw_offsets: dict[str, int] = {}
        messages = []
        for offset, item in enumerate(items):
            if item == "EOI":
                messages.append(FakeMessage(topic, p, offset, None,
                                            headers=[(CONTROL_HEADER, END_OF_INPUT.encode())]))
                continue
            name, time = item.split("@")
            raw = raw_offsets.setdefault(name, len(raw_offsets))
            record = tokenized_record(name, float(time), (RAW_TOPIC, p, raw))
            messages.append(FakeMessage(topic, p, offset, encoded("salka.TokenizedEvent", record)))
        log.append(messages)
    return log


class WindowerRun:
    """The runner's loop around a windower, over an in-memory tokens topic: batches (handle,
    then tick), commits (save state, then commit the safe offsets), crashes and rebalances."""

    def __init__(self, config: Config, log: list[list[FakeMessage]]):
        self.config, self.log = config, log
        self.out = RecordingOutput()
        self.committed: dict[int, int] = {}  # the group's offsets
        self.stages: list[WindowerStage] = []
        self.start()

    def start(self) -> None:
        self.stage = WindowerStage(self.config)
        self.stages.append(self.stage)
        self.assign()

    def assign(self) -> None:
        consumer = FakeConsumer({self.config.topics.tokens: len(self.log)})
        self.stage.on_assign(consumer, [TopicPartition(self.config.topics.tokens, p, OFFSET_INVALID)
                                        for p in range(len(self.log))])
        # An offset the stage left unset means the group's committed one (else the beginning).
        self.position = {tp.partition: tp.offset if tp.offset >= 0
                         else self.committed.get(tp.partition, 0) for tp in consumer.assigned}

    def step(self, step: str) -> None:
        if step == "commit":
            self.stage.after_flush()
            self.committed.update({tp.partition: tp.offset for tp in self.stage.safe_offsets()})
        elif step == "save":  # state saved, then a crash before the offset commit
            self.stage.after_flush()
        elif step == "crash":  # nothing more saved: a new process from what is on disk
            self.start()
        elif step == "rebalance":  # the runner commits on revoke; the same object reloads
            self.step("commit")
            self.stage.on_revoke([])
            self.assign()
        else:  # "0:2 1:*": a batch of 2 records of partition 0 and the rest of partition 1
            for take in step.split():
                p, n = take.split(":")
                p, start = int(p), self.position[int(p)]
                end = len(self.log[p]) if n == "*" else start + int(n)
                for msg in self.log[p][start:end]:
                    self.stage.handle(msg, self.out)
                self.position[p] = end
            self.stage.tick(self.out)

    def emissions(self) -> list[tuple[int, list[str]]]:
        """(window, event names in emitted order) per completion record sent, checked whole:
        the completion counts every event sent for its window just before it, each once."""
        emitted, members = [], []
        for name, record in self.out.records(self.config.topics.windows):
            if name == "salka.WindowedEvent":
                members.append(record)
                continue
            assert {m["window"] for m in members} <= {record["window"]}
            assert record["count"] == len(members)
            sources = [tuple(m["event"]["source"].values()) for m in members]
            assert len(set(sources)) == len(sources), f"duplicate event in window {record['window']}"
            emitted.append((record["window"], [m["event"]["raw"] for m in members]))
            members = []
        assert members == [], "events sent without their completion record"
        return emitted

    def total(self, counter: str) -> int:
        return sum(stage.counts[counter] for stage in self.stages)


WINDOWER_CASES = {
    # name: (tokens partitions, steps, expected windows, late events, repeats, emissions per window)
    "in order, one pass": (
        [["a@1", "b@5", "c@12", "d@25", "EOI"], ["e@2", "f@14", "g@21", "EOI"]],
        ["0:* 1:*"],
        {0: "a e b", 1: "c f", 2: "g d"}, [], 0, {0: 1, 1: 1, 2: 1}),
    "an event after the watermark passed its window is late": (
        [["a@1", "b@15", "c@3", "EOI"], ["d@12", "EOI"]],
        ["0:2 1:1", "0:*", "1:*"],
        {0: "a", 1: "d b"}, ["c"], 0, {0: 1, 1: 1}),
    "a repeat replaces itself in an open window, is dropped for a closed one, never late": (
        [["a@1", "b@5", "a@1", "c@12", "b@5", "EOI"], ["d@11", "EOI"]],
        ["0:3", "0:1 1:1", "0:* 1:*"],
        {0: "a b", 1: "d c"}, [], 1, {0: 1, 1: 1}),
    "restart after a commit resumes from its state: closed windows' events are repeats": (
        [["a@1", "b@12", "c@25", "EOI"], ["d@15", "e@3", "f@22", "EOI"]],
        ["1:2 0:2", "commit", "crash", "0:* 1:*"],
        {0: "a e", 1: "b d", 2: "f c"}, [], 1, {0: 1, 1: 1, 2: 1}),
    "a crash between emitting and saving re-emits the same window": (
        [["a@1", "b@12", "c@25", "EOI"], ["d@15", "e@3", "f@22", "EOI"]],
        ["1:2 0:2", "commit", "0:1 1:1", "crash", "0:* 1:*"],
        {0: "a e", 1: "b d", 2: "f c"}, [], 1, {0: 1, 1: 2, 2: 1}),
    "saved state but no offset commit: reading resumes where the state says, not the group": (
        [["a@1", "b@12", "c@25", "EOI"], ["d@15", "e@3", "f@22", "EOI"]],
        ["1:2 0:2", "save", "crash", "0:* 1:*"],
        {0: "a e", 1: "b d", 2: "f c"}, [], 1, {0: 1, 1: 1, 2: 1}),
    "a crash before any state was saved starts over from the beginning": (
        [["a@1", "b@12", "c@25", "EOI"], ["d@15", "e@3", "f@22", "EOI"]],
        ["1:2 0:2", "crash", "1:* 0:*"],
        {0: "a e", 1: "b d", 2: "f c"}, [], 0, {0: 2, 1: 1, 2: 1}),
    "a rebalance reloads the saved state in the same object": (
        [["a@1", "b@12", "c@25", "EOI"], ["d@15", "e@3", "f@22", "EOI"]],
        ["1:2 0:2", "rebalance", "0:* 1:*"],
        {0: "a e", 1: "b d", 2: "f c"}, [], 1, {0: 1, 1: 1, 2: 1}),
    "pending restore: a clock comes back only once its partition's re-read caught up": (
        # Restored at once, partition 1's clock (45) would close window 2 after partition 0's
        # re-read, before d@22 is read again: d would be lost as a repeat of a closed window.
        [["a@21", "b@26", "c@50", "EOI"], ["d@22", "e@45", "f@55", "EOI"]],
        ["0:2 1:2", "commit", "crash", "0:*", "1:*"],
        {2: "a d b", 4: "e", 5: "c f"}, [], 0, {2: 1, 4: 1, 5: 1}),
    "a partition read to its end is not read again: its clock is restored at once": (
        [["a@1", "EOI"], ["b@3", "c@15", "d@27", "EOI"]],
        ["0:* 1:2", "commit", "crash", "1:*"],
        {0: "a b", 1: "c", 2: "d"}, [], 0, {0: 1, 1: 1, 2: 1}),
    "after a restart an event of a window closed before it is late, not a repeat": (
        [["a@1", "b@12", "c@4", "EOI"], ["d@11", "EOI"]],
        ["0:2 1:1", "commit", "crash", "0:* 1:*"],
        {0: "a", 1: "d b"}, ["c"], 0, {0: 1, 1: 1}),
}


@pytest.mark.parametrize("case", list(WINDOWER_CASES), ids=list(WINDOWER_CASES))
def test_windower_restart_table(tmp_path, case):
    partitions, steps, windows, late, repeats, emissions = WINDOWER_CASES[case]
    config = make_config(tmp_path)
    run = WindowerRun(config, tokens_log(config, partitions))
    for step in steps:
        run.step(step)
    emitted = run.emissions()
    got: dict[int, list[str]] = {}
    for window, names in emitted:  # a re-emitted window must carry the same events
        assert got.setdefault(window, names) == names, f"window {window} re-emitted differently"
    assert {w: " ".join(names) for w, names in got.items()} == windows
    assert {w: sum(1 for e, _ in emitted if e == w) for w in got} == emissions
    late_records = [r for _, r in run.out.records(config.topics.late)]
    assert [r["event"]["raw"] for r in late_records] == late
    assert all(r["lateness_seconds"] >= 0 for r in late_records)
    assert run.total("late") == len(late)
    assert run.total("repeats") == repeats
    assert run.total("windows") == len(emitted)
    # Once everything is read and committed, nothing before the end is left to re-read.
    run.step("commit")
    assert run.committed == {p: len(msgs) for p, msgs in enumerate(run.log)}


def test_windower_dead_letters_what_is_not_a_tokenized_event(tmp_path):
    config = make_config(tmp_path)
    run = WindowerRun(config, [[FakeMessage(config.topics.tokens, 0, 0, b"not avro")]])
    run.step("0:*")
    assert run.stage.counts["dead_letters"] == 1
    [letter] = run.out.dead_letters
    assert letter["stage"] == "windower" and letter["payload"] == b"not avro"
    assert run.out.by_topic == {config.topics.dead_letters: 1}


# ---------------------------------------------------------------------------------- trainer

USERS = ["U1", "U2", "U3", "U4"]


def window_events(window: int, n: int = 10) -> list[dict]:
    """TokenizedEvent records of one window (window size 10 s), a few users and hosts."""
    return [tokenized_record(f"w{window}e{i}", window * 10.0 + i * 0.5,
                             (RAW_TOPIC, 0, window * 100 + i), user=USERS[i % 4],
                             src=f"C{i % 3}", dst=f"C{(i + 1) % 3}")
            for i in range(n)]


def windows_topic(config: Config, windows: dict[int, list[dict]], repeat: int = 0,
                  start: int = 0) -> list[FakeMessage]:
    """The windows topic: each window's events (the first ``repeat`` of them sent twice, as a
    re-emitting windower does) and its completion record counting the distinct events."""
    values = []
    for window, events in windows.items():
        for event in events + events[:repeat]:
            values.append(encoded("salka.WindowedEvent", {"window": window, "event": event}))
        values.append(encoded("salka.WindowComplete", {"window": window, "count": len(events),
                                                        "watermark": None, "stage": "windower"}))
    return [FakeMessage(config.topics.windows, 0, start + i, v, timestamp_ms=1_700_000_000_000)
            for i, v in enumerate(values)]


def drive(stage, messages: list[FakeMessage], out: RecordingOutput) -> list[TopicPartition]:
    """The runner's loop, one record per batch: handle, tick, and commit when the stage asks."""
    committed = []
    for msg in messages:
        stage.handle(msg, out)
        if stage.tick(out):
            stage.after_flush()
            committed = stage.safe_offsets() or committed
    return committed


def scores_by_window(out: RecordingOutput, config: Config) -> dict[int, list[dict]]:
    """ScoredEvents per window, checked against the completion record that follows them."""
    windows: dict[int, list[dict]] = {}
    pending: list[dict] = []
    for name, record in out.records(config.topics.scores):
        if name == "salka.ScoredEvent":
            pending.append(record)
            continue
        assert record["count"] == len(pending) and record["stage"] == "trainer"
        windows[record["window"]] = pending
        pending = []
    assert pending == []
    return windows


def test_trainer_scores_each_event_once_and_checkpoints(tmp_path):
    config = make_config(tmp_path)
    events = {0: window_events(0), 1: window_events(1), 2: window_events(2)}
    messages = windows_topic(config, events, repeat=3)
    stage, out = TrainerStage(config), RecordingOutput()
    committed = drive(stage, messages, out)

    scored = scores_by_window(out, config)
    assert sorted(scored) == [0, 1, 2]
    for window, records in scored.items():
        assert sorted(r["raw"] for r in records) == sorted(e["raw"] for e in events[window])
        assert all(r["window"] == window for r in records)
    assert all(r["loss"] is None for r in scored[0])  # no model before the first window
    assert all(r["loss"] > 0 and r["loss_total"] > r["loss"] for w in (1, 2) for r in scored[w])
    assert stage.counts["windows"] == 3 and stage.counts["scored"] == 30
    assert [tp.offset for tp in committed] == [len(messages)]
    assert checkpoint_files(config)[0].name == "checkpoint-000000000002.pt"

    # The same numbers as the offline learner (replay) on the same windows.
    learner = WindowLearner(config)
    fields = LineParser(config.input).model_fields
    for window in (0, 1, 2):
        offline = learner.process_window(window, [record_to_event(e, fields) for e in events[window]])
        assert [(s.event.raw, s.loss) for s in offline] == [(r["raw"], r["loss"]) for r in scored[window]]


def test_trainer_restart_from_its_checkpoint_skips_trained_windows(tmp_path):
    config = make_config(tmp_path)
    events = {w: window_events(w) for w in range(3)}
    straight_out = RecordingOutput()
    drive(TrainerStage(make_config(tmp_path / "straight")), windows_topic(config, events),
          straight_out)
    expected = scores_by_window(straight_out, config)[2]

    first = windows_topic(config, {0: events[0], 1: events[1]})
    partial = windows_topic(config, {2: events[2]}, start=len(first))[:4]
    drive(TrainerStage(config), first + partial, RecordingOutput())  # crashed inside window 2

    resumed, out = TrainerStage(config), RecordingOutput()
    consumer = FakeConsumer({config.topics.windows: 1})
    resumed.on_assign(consumer, [TopicPartition(config.topics.windows, 0, OFFSET_INVALID)])
    assert [tp.offset for tp in consumer.assigned] == [len(first)]  # the checkpoint's position
    # The group's offset may lag behind the checkpoint: windows 0 and 1 come again, and are skipped.
    drive(resumed, first, out)
    assert out.sent == [] and resumed.counts["skipped"] == len(first)
    drive(resumed, windows_topic(config, {2: events[2]}, start=len(first)), out)
    assert scores_by_window(out, config) == {2: expected}
    assert resumed.counts["windows"] == 1


# ---------------------------------------------------------------------------------- archiver


def scores_topic(config: Config, windows: dict[int, list[dict]], *, start: int = 0,
                 repeat: int = 0, count: int | None = None) -> list[FakeMessage]:
    values = []
    for window, records in windows.items():
        for record in records + records[:repeat]:
            values.append(encoded("salka.ScoredEvent", record))
        values.append(encoded("salka.WindowComplete", {
            "window": window, "count": len(records) if count is None else count,
            "watermark": None, "stage": "trainer"}))
    return [FakeMessage(config.topics.scores, 0, start + i, v) for i, v in enumerate(values)]


def read_archive(path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_archiver_writes_one_row_per_event_whatever_is_redelivered(tmp_path):
    config = make_config(tmp_path)
    rng = random.Random(3)
    records = [scored_record(f"e{i}", 4, rng.uniform(0.5, 3.0), offset) for i, offset in
               enumerate(rng.sample(range(1000), 6))]  # arrival order is not row order
    stage, out = ArchiverStage(config), RecordingOutput()
    # The completion record comes before two of the scores (they are redelivered later).
    early = scores_topic(config, {4: records[:4]}, count=6)
    drive(stage, early, out)
    assert stage.counts["windows"] == 0 and stage.safe_offsets() == []
    again = scores_topic(config, {4: records}, start=len(early), repeat=3)
    drive(stage, again, out)
    [path] = (tmp_path / "archive").iterdir()
    rows = read_archive(path)
    assert [r["source_offset"] for r in rows] == [
        str(r["source"]["offset"]) for r in sorted(records, key=lambda r: r["event_time"])]
    assert [float(r["loss"]) for r in rows] == pytest.approx(
        [r["loss"] for r in sorted(records, key=lambda r: r["event_time"])], abs=1e-6)
    assert stage.counts["rows"] == 6 and stage.counts["windows"] == 1
    assert [tp.offset for tp in stage.safe_offsets()] == [len(early) + len(again)]

    # The whole window redelivered: the file is rewritten with the same bytes, still one row each.
    first = path.read_bytes()
    drive(stage, scores_topic(config, {4: records[::-1]}, start=100), out)
    assert path.read_bytes() == first
    assert out.sent == []  # the archiver writes files, never records


# ---------------------------------------------------------------------------------- alerter


def alert_windows(rng: random.Random, n_windows: int = 6, size: int = 60) -> dict[int, list[dict]]:
    """Windows of losses ~1.0 per user/host with a few outliers from the third window on."""
    windows = {}
    for w in range(n_windows):
        records = [scored_record(f"w{w}e{i}", w, rng.gauss(1.0, 0.05), w * 1000 + i,
                                 user=f"U{i % 6}", src=f"C{i % 6}", dst="DC") for i in range(size)]
        if w >= 2:
            for i in rng.sample(range(size), 2):
                records[i]["loss"] = rng.uniform(2.0, 4.0)
        windows[w] = records
    windows[0][0]["loss"] = windows[0][0]["loss_total"] = None  # unscored events are skipped
    return windows


def write_scores_file(path, config: Config, windows: dict[int, list[dict]]) -> None:
    """The same scores as a scores file (losses with full precision, so nothing rounds)."""
    write_rows(path, score_columns(config), (
        [str(r["line"]), repr(r["event_time"]), str(w), *(r["entities"][e] for e in config.input.entities),
         "" if r["loss"] is None else repr(r["loss"]), ""]
        for w, records in windows.items() for r in records))


def test_alerter_across_a_restart_alerts_as_the_offline_rules_do(tmp_path):
    config = make_config(tmp_path, alerting={"min_history": 20, "window_percentile": 99.0})
    windows = alert_windows(random.Random(11))
    rng = random.Random(5)
    messages, offsets = [], {}
    for w, records in windows.items():  # arrival order inside a window does not matter
        shuffled = rng.sample(records, len(records))
        messages += scores_topic(config, {w: shuffled}, start=len(messages), repeat=2)
        offsets[w] = len(messages)

    out = RecordingOutput()
    stage = AlerterStage(config)
    drive(stage, messages[:offsets[2]], out)
    assert [tp.offset for tp in stage.safe_offsets()] == [offsets[2]]
    # Restart: the state file says where to read from; windows 1 and 2 come again all the same.
    resumed = AlerterStage(config)
    consumer = FakeConsumer({config.topics.scores: 1})
    resumed.on_assign(consumer, [TopicPartition(config.topics.scores, 0, OFFSET_INVALID)])
    assert [tp.offset for tp in consumer.assigned] == [offsets[2]]
    drive(resumed, messages[offsets[0]:], out)

    got = [(r["window"], r["line"], r["reasons"]) for _, r in out.records(config.topics.alerts)]
    write_scores_file(tmp_path / "scores.csv.gz", config, windows)
    rows = read_scores(tmp_path / "scores.csv.gz")  # the offline `pipeline alerts` path
    offline = [(a.record["window"], a.record["line"], a.reasons)
               for a in alerts_from_rows(rows, config.alerting)]
    assert got == offline
    assert {w for w, _, _ in got} >= {3, 4, 5}  # the outliers were flagged
    assert stage.counts["alerts"] + resumed.counts["alerts"] == len(offline)
    # windows 1 and 2, judged before the restart, are skipped, not counted as judged again
    assert stage.counts["windows"] + resumed.counts["windows"] == len(windows)
    assert resumed.counts["skipped"] > 0
    assert all(s.key == str(w).encode() for s, (w, _, _) in zip(out.sent, got))


# ---------------------------------------------------------------------------------- all


@pytest.mark.parametrize("stage_class, topic", [
    (TrainerStage, "windows"), (ArchiverStage, "scores"), (AlerterStage, "scores")])
def test_a_record_of_the_wrong_schema_is_a_dead_letter(tmp_path, stage_class, topic):
    config = make_config(tmp_path)
    stage, out = stage_class(config), RecordingOutput()
    wrong = encoded("salka.TokenizedEvent", tokenized_record("x", 1.0, (RAW_TOPIC, 0, 0)))
    stage.handle(FakeMessage(getattr(config.topics, topic), 0, 0, wrong), out)
    assert stage.counts["dead_letters"] == 1
    [letter] = out.dead_letters
    assert letter["stage"] == stage.name and "salka.TokenizedEvent" in letter["reason"]
    assert stage.safe_offsets() == []
