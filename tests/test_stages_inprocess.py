"""The stages' logic driven in-process: fake messages in, a recording Output out, no broker.

The real-broker tests (test_stream.py, test_alerting.py, ...) cover the wiring; these cover what
each stage decides: which events are forwarded and which windows close with them, what is late,
what is a repeat, which models the trainer announces, one row / alert per event, and what a
restart resumes from. A restart is a new stage object
built from the state the previous one saved, as a restarted process would be.
"""

from __future__ import annotations

import csv
import gzip
import logging
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
from pipeline.modelstore import announcement_key, load
from pipeline.parsing import LineParser
from pipeline.scorefile import format_loss, read_scores, score_columns, write_rows
from pipeline.serde import codec
from pipeline.stages.alerter import AlerterStage
from pipeline.stages.archiver import ArchiverStage
from pipeline.stages.collect import WindowCollector
from pipeline.stages.trainer import TrainerStage, checkpoint_files, read_once
from pipeline.stages.windower import WindowerStage
from pipeline.topicrecords import CONTROL_HEADER, END_OF_INPUT, identity, record_to_event
from pipeline.windowing import event_order


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

    def __init__(self, config: Config, log: list[list[FakeMessage]], clock=None):
        self.config, self.log, self.clock = config, log, clock
        self.out = RecordingOutput()
        self.committed: dict[int, int] = {}  # the group's offsets
        self.stages: list[WindowerStage] = []
        self.start()

    def start(self) -> None:
        self.stage = WindowerStage(self.config)
        if self.clock is not None:  # processing time, for idle partitions
            self.stage.clock = self.clock
        self.stages.append(self.stage)
        self.assign()

    def assign(self) -> None:
        # The windows topic has as many partitions as the tokens topic.
        consumer = FakeConsumer({self.config.topics.tokens: len(self.log),
                                 self.config.topics.windows: len(self.log)})
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

    def windows_topic(self) -> str:
        """The windows topic as sent, checked whole: event names as forwarded and "w<window>:<count>"
        per completion record. Each event goes to the windows partition of its tokens partition,
        each completion to partition 0; a completion counts exactly the distinct events of its
        window forwarded before it, and no event of a window comes after its last completion; a
        count-0 completion comes after the completions of every window up to it that had events."""
        sent = [s for s in self.out.sent if s.topic == self.config.topics.windows]
        items, forwarded, completed = [], {}, set()
        for s in sent:
            name, record = codec().decode(s.value)
            window = record["window"]
            if name == "salka.WindowedEvent":
                source = record["event"]["source"]
                assert s.partition == source["partition"], "not the windows partition of its tokens one"
                forwarded.setdefault(window, set()).add(tuple(source.values()))
                completed.discard(window)
                items.append(record["event"]["raw"])
                continue
            assert name == "salka.WindowComplete" and s.partition == 0
            if record["count"]:
                assert record["count"] == len(forwarded.get(window, ())), f"window {window} miscounted"
                completed.add(window)
            else:
                assert all(w in completed for w in forwarded if w <= window), \
                    f"count-0 completion of window {window} before an open window's completion"
            items.append(f"w{window}:{record['count']}")
        assert set(forwarded) <= completed, "events forwarded without a completion after them"
        return " ".join(items)

    def handed_over(self) -> dict[int, str]:
        """What a downstream reader (the trainer's collector) makes of the windows topic, read in
        the order sent: each window once, in window order, its distinct events in event order
        (names); a window already handed over is skipped when it comes again, as the trainer does."""
        collector, done, windows = WindowCollector("events"), None, {}
        for msg in self.out.messages(self.config.topics.windows):
            name, record = codec().decode(msg.value())
            window = record["window"]
            if done is not None and window <= done:
                continue
            if name == "salka.WindowComplete":
                collector.expect(window, record["count"], msg.partition(), msg.offset())
            else:
                collector.add(window, identity(record["event"]), record["event"], msg.partition(),
                              msg.offset())
            while (complete := collector.next_complete()) is not None:
                window, events = complete
                assert done is None or window > done
                done = window
                if events:
                    windows[window] = " ".join(e["raw"] for e in sorted(events, key=event_order))
        assert collector.expected == {}, "a completion whose events never came"
        return windows

    def total(self, counter: str) -> int:
        return sum(stage.counts[counter] for stage in self.stages)


WINDOWER_CASES = {
    # name: (tokens partitions, steps, the windows topic as sent, windows handed over downstream,
    #        late events, repeats)
    "in order, one pass": (
        [["a@1", "b@5", "c@12", "d@25", "EOI"], ["e@2", "f@14", "g@21", "EOI"]],
        ["0:* 1:*"],
        "a b c d e f g w0:3 w1:2 w2:2",
        {0: "a e b", 1: "c f", 2: "g d"}, [], 0),
    "an event after the watermark passed its window is late": (
        [["a@1", "b@15", "c@3", "EOI"], ["d@12", "EOI"]],
        ["0:2 1:1", "0:*", "1:*"],
        "a b d w0:1 w1:2",
        {0: "a", 1: "d b"}, ["c"], 0),
    "a repeat is dropped, whether its window is open or closed, and is never late": (
        [["a@1", "b@5", "a@1", "c@12", "b@5", "EOI"], ["d@11", "EOI"]],
        ["0:3", "0:1 1:1", "0:* 1:*"],
        "a b c d w0:2 w1:2",
        {0: "a b", 1: "d c"}, [], 2),
    "windows that close empty get a count-0 completion": (
        [["a@1", "b@35", "c@52", "EOI"], ["d@5", "e@38", "EOI"]],
        ["0:1 1:1", "0:1 1:1", "0:* 1:*"],
        "a d w-1:0 b e w0:2 w2:0 c w3:2 w5:1",
        {0: "a d", 3: "b e", 5: "c"}, [], 0),
    "restart after a commit: what was forwarded before it is a repeat": (
        # a and d come again (a restarted tokenizer wrote them twice) after the windower's
        # restart: a's window has closed, d's is open; neither is forwarded or counted again.
        [["a@1", "b@12", "a@1", "c@25", "EOI"], ["d@15", "e@3", "d@15", "f@22", "EOI"]],
        ["1:2 0:2", "commit", "crash", "0:* 1:*"],
        "d e a b w0:2 c f w1:2 w2:2",
        {0: "a e", 1: "b d", 2: "f c"}, [], 2),
    "a crash between forwarding and saving forwards again; downstream deduplicates": (
        [["a@1", "b@12", "c@25", "EOI"], ["d@15", "e@3", "f@22", "EOI"]],
        ["1:2 0:2", "commit", "0:1 1:1", "crash", "0:* 1:*"],
        "d e a b w0:2 c f w1:2 c f w1:2 w2:2",
        {0: "a e", 1: "b d", 2: "f c"}, [], 0),
    "saved state but no offset commit: reading resumes where the state says, not the group": (
        [["a@1", "b@12", "c@25", "EOI"], ["d@15", "e@3", "f@22", "EOI"]],
        ["1:2 0:2", "save", "crash", "0:* 1:*"],
        "d e a b w0:2 c f w1:2 w2:2",
        {0: "a e", 1: "b d", 2: "f c"}, [], 0),
    "a crash before any state was saved starts over from the beginning": (
        [["a@1", "b@12", "c@25", "EOI"], ["d@15", "e@3", "f@22", "EOI"]],
        ["1:2 0:2", "crash", "1:* 0:*"],
        "d e a b w0:2 d e f a b c w0:2 w1:2 w2:2",
        {0: "a e", 1: "b d", 2: "f c"}, [], 0),
    "a rebalance reloads the saved state in the same object": (
        [["a@1", "b@12", "c@25", "EOI"], ["d@15", "e@3", "f@22", "EOI"]],
        ["1:2 0:2", "rebalance", "0:* 1:*"],
        "d e a b w0:2 c f w1:2 w2:2",
        {0: "a e", 1: "b d", 2: "f c"}, [], 0),
    "restored clocks: after a restart the saved watermark closes windows at once": (
        # Partition 1's clock (45) comes back from the state file: reading partition 0 alone
        # closes window 2 (and 3, empty); without it the watermark would wait for partition 1.
        [["a@21", "b@26", "c@50", "EOI"], ["d@22", "e@45", "f@55", "EOI"]],
        ["0:2 1:2", "commit", "crash", "0:*", "1:*"],
        "a b d e w1:0 c w2:3 w3:0 f w4:1 w5:2",
        {2: "a d b", 4: "e", 5: "c f"}, [], 0),
    "a partition read to its end is not read again: its clock is restored at once": (
        [["a@1", "EOI"], ["b@3", "c@15", "d@27", "EOI"]],
        ["0:* 1:2", "commit", "crash", "1:*"],
        "a b c w0:2 d w1:1 w2:1",
        {0: "a b", 1: "c", 2: "d"}, [], 0),
    "after a restart an event of a window closed before it is late, not a repeat": (
        [["a@1", "b@12", "c@4", "EOI"], ["d@11", "EOI"]],
        ["0:2 1:1", "commit", "crash", "0:* 1:*"],
        "a b d w0:1 w1:2",
        {0: "a", 1: "d b"}, ["c"], 0),
}


@pytest.mark.parametrize("case", list(WINDOWER_CASES), ids=list(WINDOWER_CASES))
def test_windower_restart_table(tmp_path, case):
    partitions, steps, topic, windows, late, repeats = WINDOWER_CASES[case]
    config = make_config(tmp_path)
    run = WindowerRun(config, tokens_log(config, partitions))
    for step in steps:
        run.step(step)
    assert run.windows_topic() == topic
    assert run.handed_over() == windows
    late_records = [r for _, r in run.out.records(config.topics.late)]
    assert [r["event"]["raw"] for r in late_records] == late
    assert all(r["lateness_seconds"] >= 0 for r in late_records)
    assert run.total("late") == len(late)
    assert run.total("repeats") == repeats
    assert run.total("windows") == len([w for w in topic.split() if w.startswith("w")
                                        and not w.endswith(":0")])
    assert run.stage.open == {}  # every window closed at the end of input
    # Once everything is read and committed, nothing before the end is left to re-read.
    run.step("commit")
    assert run.committed == {p: len(msgs) for p, msgs in enumerate(run.log)}


def sent_so_far(run: WindowerRun) -> str:
    """The windows topic as sent so far (windows may still be open): event names and
    "w<window>:<count>" per completion record."""
    items = []
    for s in run.out.sent:
        if s.topic == run.config.topics.windows:
            name, record = codec().decode(s.value)
            items.append(record["event"]["raw"] if name == "salka.WindowedEvent"
                         else f"w{record['window']}:{record['count']}")
    return " ".join(items)


def test_windower_stops_waiting_for_a_partition_without_events_and_waits_again_once_it_has_some(
        tmp_path, caplog):
    # Partition 1 of the tokens topic gets nothing (no source writes to it) and nobody sends an
    # end of input (a live bus): the watermark would stay at -inf and no window would ever close.
    config = make_config(tmp_path, streaming={"idle_partition_seconds": 60.0, "end_of_input": False})
    now = [0.0]
    run = WindowerRun(config, tokens_log(config, [["a@1", "b@5", "c@12", "d@25", "e@31"],
                                                  ["f@3", "g@27", "h@45"]]), clock=lambda: now[0])
    for now[0] in (0.0, 20.0, 40.0, 59.0):  # gaps shorter than the grace (30 s)
        run.step("0:1")
    assert sent_so_far(run) == "a b c d"  # not idle yet: nothing closed
    now[0] = 60.0
    with caplog.at_level(logging.INFO, logger="pipeline.stages.windower"):
        run.step("0:0")  # partition 1 silent for 60 s while partition 0 had events
        assert sent_so_far(run) == "a b c d w0:2 w1:1"
        assert "salka.tokens[1] has had no event for 60s" in caplog.text
        now[0] = 61.0
        run.step("1:2")  # it has events again: f's window closed meanwhile (late), g's is open
        assert "salka.tokens[1] has events again" in caplog.text
    run.step("0:*")  # e@31: the watermark waits for partition 1 again (at 27): window 2 stays open
    assert sent_so_far(run) == "a b c d w0:2 w1:1 g e"
    assert [r["event"]["raw"] for _, r in run.out.records(config.topics.late)] == ["f"]
    run.step("1:*")  # h@45: the watermark is min(31, 45)
    assert sent_so_far(run) == "a b c d w0:2 w1:1 g e h w2:2"


def test_windower_waits_for_every_partition_when_idle_partition_seconds_is_zero(tmp_path):
    config = make_config(tmp_path, streaming={"idle_partition_seconds": 0.0, "end_of_input": False})
    now = [0.0]
    run = WindowerRun(config, tokens_log(config, [["a@1", "b@15", "c@28"], []]), clock=lambda: now[0])
    for now[0] in (0.0, 1e6, 2e6):
        run.step("0:1")
    assert sent_so_far(run) == "a b c"


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
                  start: dict[int, int] | None = None) -> list[FakeMessage]:
    """The windows topic as the trainer reads it, over two partitions: each window's events
    forwarded as they came (even-numbered ones to partition 0, odd ones to 1; the first ``repeat``
    of them forwarded twice, as a windower restarted before saving does) and its completion
    record (partition 0) counting the distinct events, read before partition 1's events of it."""
    offsets = dict(start or {0: 0, 1: 0})
    messages = []

    def put(partition: int, value: bytes) -> None:
        messages.append(FakeMessage(config.topics.windows, partition, offsets[partition], value,
                                    timestamp_ms=1_700_000_000_000))
        offsets[partition] += 1

    for window, events in windows.items():
        forwarded = [(i % 2, e) for i, e in enumerate(events)]
        forwarded += forwarded[:repeat]
        for partition in (0, 1):
            for p, event in forwarded:
                if p == partition:
                    put(p, encoded("salka.WindowedEvent", {"window": window, "event": event}))
            if partition == 0:
                put(0, encoded("salka.WindowComplete", {"window": window, "count": len(events),
                                                         "watermark": None, "stage": "windower"}))
    return messages


def end_offsets(messages: list[FakeMessage]) -> dict[int, int]:
    """Partition -> the offset after its last message."""
    ends: dict[int, int] = {}
    for m in messages:
        ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
    return ends


def offsets_of(partitions: list[TopicPartition]) -> dict[int, int]:
    """Partition -> offset (TopicPartition's == ignores the offset)."""
    return {tp.partition: tp.offset for tp in partitions}


def drive(stage, messages: list[FakeMessage], out: RecordingOutput) -> dict[int, int]:
    """The runner's loop, one record per batch: handle, tick, and commit when the stage asks;
    the committed offsets (partition -> offset)."""
    committed: dict[int, int] = {}
    for msg in messages:
        stage.handle(msg, out)
        if stage.tick(out):
            stage.after_flush()
            committed.update(offsets_of(stage.safe_offsets()))
    return committed


def announced(out: RecordingOutput, config: Config) -> list[dict]:
    """The model announcements sent, checked against their compaction keys."""
    sent = [s for s in out.sent if s.topic == config.topics.models]
    records = [r for _, r in out.records(config.topics.models)]
    assert [s.key for s in sent] == [announcement_key(r["trained_through"]) for r in records]
    return records


def test_trainer_trains_each_window_once_and_announces_its_models(tmp_path):
    config = make_config(tmp_path)
    events = {0: window_events(0), 1: window_events(1), 2: window_events(2)}
    messages = windows_topic(config, events, repeat=3)
    stage, out = TrainerStage(config), RecordingOutput()
    committed = drive(stage, messages, out)

    # No scores (the scorers score): a completion record per window, for the archiver to count on.
    assert set(out.by_topic) == {config.topics.scores, config.topics.models}
    assert [r for _, r in out.records(config.topics.scores)] == [
        {"window": w, "count": 10, "watermark": None, "stage": "trainer"} for w in range(3)]
    models = announced(out, config)
    # No model for window 0, then each window's model for the window after it.
    assert [(m["trained_through"], m["serves_through"]) for m in models] == [
        (None, 0), (0, 1), (1, 2), (2, 3)]
    assert len({m["sha256"] for m in models[1:]}) == 3
    assert stage.counts["windows"] == 3 and stage.counts["trained"] == 30
    assert stage.counts["models"] == 3
    # Committed with window 2's checkpoint; the repeats read after it are safe to commit too.
    assert committed == {**end_offsets(messages), 1: end_offsets(messages)[1] - 1}
    assert offsets_of(stage.safe_offsets()) == end_offsets(messages)
    assert checkpoint_files(config)[0].name == "checkpoint-000000000002.pt"

    # Each window scored with the model announced for it (checked file, as a scorer loads it)
    # gives the same numbers as the offline learner (replay) on the same windows.
    learner = WindowLearner(config)
    fields = LineParser(config.input).model_fields
    for window, model in zip(range(3), models):
        window_of_events = [record_to_event(e, fields) for e in events[window]]
        online = load(config, model).score(window, window_of_events)
        offline = learner.process_window(window, window_of_events)
        assert [(s.event.raw, s.loss) for s in online] == [(s.event.raw, s.loss) for s in offline]
        assert all(s.loss is None for s in online) == (window == 0)  # no model before window 0


def test_trainer_holds_a_small_window_once_and_never_more_than_a_chunk():
    """read_once: a window of at most max_chunk_events is decoded once for all of training's
    passes; a larger spill (whatever its completion record claimed) is streamed, and no more
    than one chunk and one event of it was ever held."""
    pulled = []

    def spill(n):
        def read():
            for i in range(n):
                pulled.append(i)
                yield i
        return read

    small = read_once(spill(5), limit=5)
    assert list(small()) == list(small()) == list(range(5)) and len(pulled) == 5
    pulled.clear()
    large_read = spill(1000)
    large = read_once(large_read, limit=5)
    assert large is large_read and len(pulled) == 6  # read as it comes, one chunk (+1) looked at
    assert list(large()) == list(range(1000))


def test_trainer_windows_closed_empty_extend_the_model_it_serves(tmp_path):
    config = make_config(tmp_path)
    empty = [encoded("salka.WindowComplete", {"window": w, "count": 0, "watermark": None,
                                              "stage": "windower"}) for w in (-1, 3)]
    before = [FakeMessage(config.topics.windows, 0, 0, empty[0])]
    first = windows_topic(config, {0: window_events(0)}, start={0: 1, 1: 0})
    after = [FakeMessage(config.topics.windows, 0, end_offsets(first)[0], empty[1])]
    stage, out = TrainerStage(config), RecordingOutput()
    drive(stage, before + first + after, out)
    # Window -1 closed empty: no model serves window 0; windows 1 to 3 closed empty: window 0's
    # model serves window 4 (same file, a longer range), and nothing else was trained.
    models = announced(out, config)
    assert [(m["trained_through"], m["serves_through"]) for m in models] == [
        (None, 0), (0, 1), (0, 4)]
    assert models[1]["sha256"] == models[2]["sha256"] and models[1]["url"] == models[2]["url"]
    assert stage.counts["windows"] == 1
    assert [r["window"] for _, r in out.records(config.topics.scores)] == [0]


def test_trainer_restart_from_its_checkpoint_skips_trained_windows(tmp_path):
    config = make_config(tmp_path)
    events = {w: window_events(w) for w in range(3)}
    straight_out = RecordingOutput()
    drive(TrainerStage(make_config(tmp_path / "straight")), windows_topic(config, events),
          straight_out)
    straight = {m["trained_through"]: m for m in announced(straight_out, config)}

    first = windows_topic(config, {0: events[0], 1: events[1]})
    partial = windows_topic(config, {2: events[2]}, start=end_offsets(first))[:4]
    drive(TrainerStage(config), first + partial, RecordingOutput())  # crashed inside window 2

    resumed, out = TrainerStage(config), RecordingOutput()
    consumer = FakeConsumer({config.topics.windows: 2})
    resumed.on_assign(consumer, [TopicPartition(config.topics.windows, p, OFFSET_INVALID)
                                 for p in (0, 1)])
    # The checkpoint's positions, per partition.
    assert {tp.partition: tp.offset for tp in consumer.assigned} == end_offsets(first)
    # The group's offset may lag behind the checkpoint: windows 0 and 1 come again, and are skipped.
    drive(resumed, first, out)
    assert out.sent == [] and resumed.counts["skipped"] == len(first)
    drive(resumed, windows_topic(config, {2: events[2]}, start=end_offsets(first)), out)
    assert [r["window"] for _, r in out.records(config.topics.scores)] == [2]
    # The checkpoint's model is announced again for window 2, then window 2's: the same files as
    # an uninterrupted trainer's.
    models = announced(out, config)
    assert [(m["trained_through"], m["serves_through"]) for m in models] == [(1, 2), (2, 3)]
    assert [m["sha256"] for m in models] == [straight[1]["sha256"], straight[2]["sha256"]]
    assert resumed.counts["windows"] == 1


# ---------------------------------------------------------------------------------- archiver


def completion(window: int, count: int) -> dict:
    return {"window": window, "count": count, "watermark": None, "stage": "trainer"}


def scores_messages(config: Config, records: list[dict], start: int = 0) -> list[FakeMessage]:
    """The scores topic (one partition) carrying ``records``: scores and completion records."""
    return [FakeMessage(config.topics.scores, 0, start + i, encoded(
        "salka.WindowComplete" if "count" in r else "salka.ScoredEvent", r))
        for i, r in enumerate(records)]


def scores_topic(config: Config, windows: dict[int, list[dict]], *, start: int = 0,
                 repeat: int = 0) -> list[FakeMessage]:
    """Each window's scores (the first ``repeat`` twice), then its completion record."""
    return scores_messages(config, [item for window, records in windows.items()
                                    for item in records + records[:repeat] + [
                                        completion(window, len(records))]], start)


def read_archive(path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def test_archiver_writes_one_row_per_event_whatever_is_redelivered(tmp_path):
    config = make_config(tmp_path)
    rng = random.Random(3)
    records = [scored_record(f"e{i}", 4, rng.uniform(0.5, 3.0), offset) for i, offset in
               enumerate(rng.sample(range(1000), 6))]  # arrival order is not row order
    late = [scored_record(f"late{i}", 4, 9.0, 2000 + i, late=True) for i in range(2)]
    stage, out = ArchiverStage(config), RecordingOutput()
    # Scorers score as events arrive: scores come before and after the trainer's completion
    # record, with repeats and late scores of the window among them.
    early = scores_messages(config, [records[0], records[1], late[0], completion(4, 6), records[2],
                                     records[0], records[3], late[1]])
    drive(stage, early, out)
    assert stage.counts["windows"] == 0 and not (tmp_path / "archive").exists()
    # Not handed over yet: a restart must read again from the window's first score.
    assert offsets_of(stage.safe_offsets()) == {0: 0}
    again = scores_messages(config, [records[4], late[0], records[5], records[2]], start=len(early))
    drive(stage, again, out)
    [path] = (tmp_path / "archive").iterdir()
    rows = read_archive(path)
    in_order = sorted(records, key=lambda r: r["event_time"])
    assert [r["source_offset"] for r in rows] == [str(r["source"]["offset"]) for r in in_order]
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in in_order], abs=1e-6)
    assert stage.counts["rows"] == 6 and stage.counts["windows"] == 1 and stage.counts["late"] == 3
    # A score repeated after its window was written is skipped, and commits like the rest.
    assert offsets_of(stage.safe_offsets()) == {0: len(early) + len(again)}

    # The whole window redelivered, to this archiver (skipped) or to a restarted one (the file is
    # rewritten with the same bytes): still one row per event.
    first = path.read_bytes()
    drive(stage, scores_topic(config, {4: records[::-1]}, start=100), out)
    assert stage.counts["windows"] == 1 and path.read_bytes() == first
    restarted = ArchiverStage(config)
    drive(restarted, scores_messages(config, records[::-1] + late + [completion(4, 6)]), out)
    assert restarted.counts["windows"] == 1 and path.read_bytes() == first
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
    """The same scores as a scores file, losses written as replay and the archiver write them."""
    write_rows(path, score_columns(config), (
        [str(r["line"]), repr(r["event_time"]), str(w), *(r["entities"][e] for e in config.input.entities),
         format_loss(r["loss"]), ""]
        for w, records in windows.items() for r in records))


def test_alerter_across_a_restart_alerts_as_the_offline_rules_do(tmp_path):
    config = make_config(tmp_path, alerting={"min_history": 20, "window_percentile": 99.0})
    windows = alert_windows(random.Random(11))
    rng = random.Random(5)
    messages, offsets = [], {}
    for w, records in windows.items():  # arrival order inside a window does not matter
        shuffled = rng.sample(records, len(records))
        # Late events' scores (huge losses), before and after the completion: never judged.
        late = [scored_record(f"late{w}.{i}", w, 40.0, 50_000 + 10 * w + i, user="U0", late=True)
                for i in range(2)]
        messages += scores_messages(config, [late[0], *shuffled, *shuffled[:2],
                                             completion(w, len(records)), late[1]], len(messages))
        offsets[w] = len(messages)

    out = RecordingOutput()
    stage = AlerterStage(config)
    drive(stage, messages[:offsets[2]], out)
    assert [tp.offset for tp in stage.safe_offsets()] == [offsets[2]]
    # Restart: the state file says where to read from; windows 1 and 2 come again all the same.
    resumed = AlerterStage(config)
    consumer = FakeConsumer({config.topics.scores: 1})
    resumed.on_assign(consumer, [TopicPartition(config.topics.scores, 0, OFFSET_INVALID)])
    # (saved when window 2 was judged, before its last late score was read)
    assert [tp.offset for tp in consumer.assigned] == [offsets[2] - 1]
    drive(resumed, messages[offsets[0]:], out)

    got = [(r["window"], r["line"], r["reasons"]) for _, r in out.records(config.topics.alerts)]
    write_scores_file(tmp_path / "scores.csv.gz", config, windows)
    rows = read_scores(tmp_path / "scores.csv.gz")  # the offline `pipeline alerts` path
    offline = [(a.record["window"], a.record["line"], a.reasons)
               for a in alerts_from_rows(rows, config.alerting)]
    # Alerts go out as scores arrive (shuffled here); no entity reaches the throttle, so arrival
    # order changes only the order they go out in.
    assert sorted(got) == sorted(offline) and len(got) == len(offline)
    assert {w for w, _, _ in got} >= {3, 4, 5}  # the outliers were flagged
    assert stage.counts["alerts"] + resumed.counts["alerts"] == len(offline)
    # windows 1 and 2, judged before the restart, are skipped, not counted as judged again
    assert stage.counts["windows"] + resumed.counts["windows"] == len(windows)
    assert resumed.counts["skipped"] > 0
    assert all(s.key == str(w).encode() for s, (w, _, _) in zip(out.sent, got))


def in_event_order(config: Config, windows: dict[int, list[dict]], start: int = 0) -> list[FakeMessage]:
    """Each window's scores in event order, then its completion record."""
    return scores_messages(config, [item for w, records in windows.items()
                                    for item in sorted(records, key=event_order) + [
                                        completion(w, len(records))]], start)


def offline_alerts(tmp_path, config: Config, windows: dict[int, list[dict]]) -> list[tuple]:
    """``pipeline alerts`` over the same scores: (window, line, reasons, percentile) per alert."""
    write_scores_file(tmp_path / "scores.csv.gz", config, windows)
    return [(a.record["window"], a.record["line"], a.reasons, a.window_percentile)
            for a in alerts_from_rows(read_scores(tmp_path / "scores.csv.gz"), config.alerting)]


def sent_alerts(out: RecordingOutput, config: Config) -> list[tuple]:
    return [(r["window"], r["line"], r["reasons"], r["window_percentile"])
            for _, r in out.records(config.topics.alerts)]


def with_attacker(windows: dict[int, list[dict]], window: int, offsets: range) -> list[dict]:
    """An attacker's outstanding events in ``window`` (more than the throttle lets out)."""
    attacks = [scored_record(f"attack{o}", window, 5.0 + (o % 7) / 10, window * 1000 + o,
                             user="ATTACKER", src="C666", dst="DC") for o in offsets]
    windows[window] += attacks
    return attacks


def test_alerter_alerts_an_event_before_its_window_completes(tmp_path):
    config = make_config(tmp_path, alerting={"window_percentile": 99.0})
    windows = alert_windows(random.Random(21), n_windows=3)
    windows[2] = sorted(windows[2], key=lambda r: r["loss"] is not None and r["loss"] > 1.5)
    outlier = windows[2][-1]  # its outliers come last; judged on arrival, alone
    messages = in_event_order(config, {w: windows[w] for w in (0, 1)})
    out = RecordingOutput()
    stage = AlerterStage(config)
    drive(stage, messages, out)
    assert stage.engine.realtime and stage.counts["windows"] == 2
    before = len(out.sent)
    drive(stage, scores_messages(config, windows[2], len(messages)), out)
    assert stage.counts["windows"] == 2  # window 2's completion record has not come
    alerted = [r for _, r in out.records(config.topics.alerts)[before:]]
    assert outlier["line"] in [r["line"] for r in alerted]
    assert all(r["window"] == 2 and "percentile of window 1" in r["reasons"][0]
               for r in alerted if r["reasons"][0].startswith("loss"))
    drive(stage, scores_messages(config, [completion(2, len(windows[2]))], len(messages) + 60), out)
    assert stage.counts["windows"] == 3 and len(out.sent) == before + len(alerted)


def test_alerter_fed_in_event_order_alerts_exactly_as_offline(tmp_path):
    # By raw loss: window 0's entities have no history, so their normalised scores are all 0.
    config = make_config(tmp_path, alerting={"window_percentile": 99.0, "min_history": 20,
                                             "normalise": []})
    windows = alert_windows(random.Random(22))
    attacks = with_attacker(windows, 4, range(500, 506))  # six: the throttle lets three out
    out = RecordingOutput()
    drive(AlerterStage(config), in_event_order(config, windows), out)
    got = sent_alerts(out, config)
    assert got == offline_alerts(tmp_path, config, windows)  # same alerts, order, percentiles
    attack_lines = {r["line"] for r in attacks}
    assert [line for w, line, _, _ in got if line in attack_lines] == \
           [r["line"] for r in attacks[:3]]  # first come first served: the first three
    assert {w for w, *_ in got} >= {0, 3, 4, 5}


def test_alerter_judges_losses_as_the_archive_keeps_them(tmp_path):
    """A loss 3e-7 below the threshold is below it as a double, equal to it in a score file (6
    decimals): the stage must decide as ``pipeline alerts`` over the archive does."""
    config = make_config(tmp_path, alerting={"window_percentile": 99.0, "min_history": 1000,
                                             "normalise": []})
    windows = alert_windows(random.Random(24), n_windows=3)
    for records in windows.values():
        for r in records:
            if r["loss"] is not None:
                r["loss"] = min(r["loss"], 1.5)
    windows[1][5]["loss"] = 2.0000004  # window 1's highest: window 2's threshold (2.000000 stored)
    windows[2][7]["loss"] = 2.0000001  # below it as a double, the same once stored
    out = RecordingOutput()
    drive(AlerterStage(config), in_event_order(config, windows), out)
    got = sent_alerts(out, config)
    assert got == offline_alerts(tmp_path, config, windows)
    assert windows[2][7]["line"] in {line for w, line, _, _ in got if w == 2}  # control: the tie


def test_alerter_judges_the_first_scored_window_whole_at_its_completion(tmp_path):
    config = make_config(tmp_path, alerting={"window_percentile": 99.0})
    windows = alert_windows(random.Random(23), n_windows=2)
    for r in windows[0]:
        r["loss"] = r["loss_total"] = None  # the first window: no model yet
    windows[1][5]["loss"] = 9.0
    out = RecordingOutput()
    stage = AlerterStage(config)
    messages = in_event_order(config, windows)
    drive(stage, messages[:-1], out)  # all but window 1's completion record
    assert out.sent == [] and not stage.engine.realtime  # no threshold yet: waiting
    drive(stage, messages[-1:], out)
    got = sent_alerts(out, config)
    assert got == offline_alerts(tmp_path, config, windows)
    assert got and got[0][1] == windows[1][5]["line"]  # the highest loss first
    assert all("percentile of window 1" in reasons[0] for _, _, reasons, _ in got)
    assert stage.engine.realtime and stage.held == {}


def test_alerter_scores_that_came_before_any_threshold_are_judged_from_disk(tmp_path):
    """Window 2's scores arrive before window 1 (the first with losses) completes: there is no
    threshold yet, so they are not held in memory; they wait on disk with their window and are
    judged one by one, in event order, when it completes: the alerts offline rules give."""
    config = make_config(tmp_path, alerting={"window_percentile": 99.0},
                         streaming={"spill_events": 7})  # on disk in runs of 7
    windows = alert_windows(random.Random(25), n_windows=3)
    for r in windows[0]:
        r["loss"] = r["loss_total"] = None  # no model yet
    windows[2][4]["loss"] = 9.0
    ordered = {w: sorted(records, key=event_order) for w, records in windows.items()}
    records = [*ordered[0], completion(0, len(ordered[0])), *ordered[1], *ordered[2],
               completion(1, len(ordered[1])), completion(2, len(ordered[2]))]
    stage, out = AlerterStage(config), RecordingOutput()
    messages = scores_messages(config, records)
    drive(stage, messages[:-2], out)
    assert stage.held == {} and stage.unjudged == {1, 2} and out.sent == []  # nothing in memory
    drive(stage, messages[-2:], out)
    assert stage.held == {} and stage.unjudged == set()
    got = sent_alerts(out, config)
    assert got == offline_alerts(tmp_path, config, windows)
    assert (2, windows[2][4]["line"]) in [(w, line) for w, line, _, _ in got]


def test_alerter_holds_scores_until_the_earlier_window_closes(tmp_path):
    config = make_config(tmp_path, alerting={"window_percentile": 99.0})
    windows = alert_windows(random.Random(24), n_windows=4)
    windows[3][10]["loss"] = 9.0
    out = RecordingOutput()
    stage = AlerterStage(config)
    early = in_event_order(config, {w: windows[w] for w in (0, 1)})
    drive(stage, early, out)
    straggler, *rest = windows[2]  # one of window 2's scores comes late (a slow scorer)
    scores = rest + [completion(2, len(windows[2]))] + windows[3]
    drive(stage, scores_messages(config, scores, len(early)), out)
    before = len(out.sent)
    assert 3 in stage.held and len(stage.held[3]) == len(windows[3])  # waiting for window 2
    assert windows[3][10]["line"] not in [r["line"] for _, r in out.records(config.topics.alerts)]
    drive(stage, scores_messages(config, [straggler], len(early) + len(scores)), out)
    assert stage.counts["windows"] == 3 and stage.held == {}  # window 2 closed: window 3 let go
    released = [r for _, r in out.records(config.topics.alerts)[before:]]
    assert windows[3][10]["line"] in [r["line"] for r in released]
    drive(stage, scores_messages(config, [completion(3, len(windows[3]))], 10_000), out)
    offline = offline_alerts(tmp_path, config, windows)
    assert sorted(sent_alerts(out, config)) == sorted(offline)


def replace_state_dir(config: Config, state_dir) -> Config:
    from dataclasses import replace

    return replace(config, streaming=replace(config.streaming, state_dir=str(state_dir)))


def test_alerter_restarted_mid_window_neither_repeats_nor_loses_alerts(tmp_path):
    config = make_config(tmp_path, alerting={"window_percentile": 99.0, "min_history": 20})
    windows = alert_windows(random.Random(25), n_windows=5)
    attacks = with_attacker(windows, 4, range(10, 60, 10))  # five, spread over the window
    messages = in_event_order(config, windows)
    straight = RecordingOutput()
    drive(AlerterStage(replace_state_dir(config, tmp_path / "straight")), messages, straight)
    expected = sent_alerts(straight, config)
    assert len([a for a in expected if a[0] == 4]) >= 3

    window_4 = next(i for i, m in enumerate(messages) if codec().decode(m.value())[1]["window"] == 4)
    second_attack = next(i for i, m in enumerate(messages)
                         if codec().decode(m.value())[1].get("raw") == attacks[1]["raw"])
    out = RecordingOutput()
    stage = AlerterStage(config)
    drive(stage, messages[:second_attack + 1], out)
    assert sum(1 for a in sent_alerts(out, config) if a[0] == 4) >= 2  # some of window 4 went out
    stage.close(out)
    stage.after_flush()  # the runner's last commit on a clean stop
    resumed = AlerterStage(config)
    consumer = FakeConsumer({config.topics.scores: 1})
    resumed.on_assign(consumer, [TopicPartition(config.topics.scores, 0, OFFSET_INVALID)])
    assert [tp.offset for tp in consumer.assigned] == [window_4]  # window 4 is read again
    drive(resumed, messages[window_4:], out)
    assert sent_alerts(out, config) == expected  # none twice, none missing, same order
    assert 0 < resumed.counts["alerts"] < len([a for a in expected if a[0] == 4])


# ---------------------------------------------------------------------------------- all


@pytest.mark.parametrize("stage_class, topic", [
    (TrainerStage, "windows"), (ArchiverStage, "scores"), (AlerterStage, "scores")])
def test_a_record_of_the_wrong_schema_is_a_dead_letter(tmp_path, stage_class, topic):
    config = make_config(tmp_path)
    stage, out = stage_class(config), RecordingOutput()
    topic = getattr(config.topics, topic)
    event = tokenized_record("x", 1.0, (RAW_TOPIC, 0, 0))
    good = (encoded("salka.WindowedEvent", {"window": 0, "event": event}) if stage_class is TrainerStage
            else encoded("salka.ScoredEvent", scored_record("x", 0, 1.0, 0)))
    wrong = encoded("salka.TokenizedEvent", event)
    for msg in [FakeMessage(topic, 0, 0, good), FakeMessage(topic, 0, 1, wrong),
                FakeMessage(topic, 1, 0, wrong)]:
        stage.handle(msg, out)
    assert stage.counts["dead_letters"] == 2
    assert [(d["stage"], d["source"]["partition"], d["source"]["offset"], d["payload"])
            for d in out.dead_letters] == [(stage.name, 0, 1, wrong), (stage.name, 1, 0, wrong)]
    assert all("salka.TokenizedEvent" in d["reason"] for d in out.dead_letters)
    assert out.by_topic == {config.topics.dead_letters: 2}
    # A dead letter is its record's outcome: committed past, unless a pending window (the good
    # record's, no completion yet) holds its partition back.
    assert offsets_of(stage.safe_offsets()) == {0: 0, 1: 1}
    assert {tp.topic for tp in stage.safe_offsets()} == {topic}


# ---------------------------------------------------------------------------------- consume sizes


def test_a_scorer_asks_for_score_poll_batch_records_and_the_other_stages_for_poll_batch(tmp_path):
    """Over a backlog a scorer scores a consume() call's records together, in length order:
    larger groups pad less. Only the scorer asks for more; both keys are the user's."""
    from pipeline.stages.scorer import ScorerStage
    from pipeline.stages.tokenizer import TokenizerStage

    config = make_config(tmp_path, streaming={"poll_batch": 77, "score_poll_batch": 1234})
    assert ScorerStage(config).consume_batch() == 1234
    for stage in (TokenizerStage(config), WindowerStage(config), ArchiverStage(config)):
        assert stage.consume_batch() == 77
    assert ScorerStage(make_config(tmp_path)).consume_batch() == 2000  # the default


def test_archiver_restarted_skips_a_window_completed_again_after_it_was_archived(tmp_path):
    """A trainer that fell back to an older checkpoint trains its windows again and sends their
    completion records again, with no score after them: a restarted archiver kept such a window
    pending, waiting for scores that never come, and every later window behind it."""
    config = make_config(tmp_path)
    windows = {w: [scored_record(f"w{w}e{i}", w, 1.0 + i / 10, w * 100 + i) for i in range(3)]
               for w in (1, 2, 3)}
    stage, out = ArchiverStage(config), RecordingOutput()
    first = scores_topic(config, {1: windows[1], 2: windows[2]})
    drive(stage, first, out)
    stage.after_flush()  # what the runner does before it commits
    assert stage.counts["windows"] == 2
    restarted = ArchiverStage(config)
    drive(restarted, scores_messages(config, [completion(1, 3)], start=len(first))
          + scores_topic(config, {3: windows[3]}, start=len(first) + 1), out)
    assert restarted.counts == {"windows": 1, "rows": 3, "late": 0, "dead_letters": 0, "skipped": 1}
    assert sorted(p.name for p in (tmp_path / "archive").iterdir()) == [
        "window-000001.csv.gz", "window-000002.csv.gz", "window-000003.csv.gz"]
    assert offsets_of(restarted.safe_offsets()) == {0: len(first) + 5}  # nothing held back


@pytest.mark.parametrize("state", [b"{", b'{"archived_through": "2"}', b"[]", b'{"archived_through": true}'])
def test_archiver_state_unreadable_is_moved_aside(tmp_path, state, caplog):
    config = make_config(tmp_path)
    path = tmp_path / "state" / "archiver.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(state)
    stage = ArchiverStage(config)
    assert stage.archived_through is None and not path.exists()
    assert "unreadable archiver state" in caplog.text
