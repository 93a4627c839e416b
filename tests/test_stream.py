"""The streaming pipeline over a real broker: every stage its own OS process, talking only
through topics. Runs against KAFKA_BOOTSTRAP_SERVERS when set, else an embedded Tansu broker."""

from __future__ import annotations

import dataclasses
import re
import signal
import time
from pathlib import Path

import pytest
from helpers import delete_topics, log_text, read_records, stream_config, wait_for

from pipeline.audit import audit
from pipeline.demo import ArchiveCounter, StageProcesses
from pipeline.generate import GenerateSpec, write_log
from pipeline.kafka import make_producer, produce
from pipeline.learner import WindowLearner
from pipeline.produce import produce_file
from pipeline.replay import replay
from pipeline.scorefile import read_scores
from pipeline.stages.trainer import checkpoint_files, load_newest_checkpoint
from pipeline.topicrecords import LINE_HEADER

BAD_LINES = {
    "not,enough,columns": "expected 9 CSV columns, got 3",
    "": "empty line",
    "notatime,U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success": "bad time",
}


def tokenizers_assigned(log_dir: Path, count: int) -> bool:
    """Every tokenizer process holds at least one raw partition."""
    for i in range(count):
        text = log_text(log_dir / f"tokenizer-{i}.log")
        assigned = re.findall(r"tokenizer assigned \[(.*)\]", text)
        if not assigned or not assigned[-1].strip():
            return False
    return True


def archived_rows(archive: Path) -> int:
    return ArchiveCounter(archive).count()[0] if archive.exists() else 0


def losses_by_line(rows: list[dict]) -> dict[int, tuple[str, str, str]]:
    return {int(r["line"]): (r["window"], r["event_time"], r["loss"]) for r in rows}


def assert_same_scores(streamed: list[dict], replayed: list[dict]) -> None:
    a, b = losses_by_line(streamed), losses_by_line(replayed)
    assert len(streamed) == len(a), "an event appears twice in the archive"
    assert a.keys() == b.keys()
    for line, (window, event_time, loss) in b.items():
        assert a[line][:2] == (window, event_time), line
        if loss == "":
            assert a[line][2] == "", line
        else:
            assert abs(float(a[line][2]) - float(loss)) <= 1e-5, (line, a[line][2], loss)


def streamed_equal_to_replay(config, config_path: Path, log: Path, tmp_path: Path,
                             events: int) -> list[dict]:
    """Stream ``log`` through tokenizer, windower, trainer, scorer and archiver until ``events``
    rows are archived, assert the archive equals replay of the same log; the archived rows."""
    replay_out = tmp_path / "replay.csv.gz"
    replay(log, replay_out, config, progress=False)
    archive = Path(config.streaming.archive_dir)
    stages = StageProcesses(config_path, tmp_path / "logs")
    try:
        for stage in ("tokenizer", "windower", "trainer", "scorer", "archiver"):
            stages.start(stage)
        produce_file(config, log)
        wait_for(lambda: (archive.exists() and ArchiveCounter(archive).count()[0] >= events)
                 or stages.dead(), 180, what="every event archived")
        assert not stages.dead(), stages.dead()
    finally:
        stages.stop()
    streamed = read_scores(archive)
    assert_same_scores(streamed, read_scores(replay_out))
    return streamed


@pytest.fixture(scope="module")
def streamed_run(kafka_bootstrap, tmp_path_factory):
    """One run of the whole pipeline: 3 raw partitions, 2 tokenizer processes, a log with a few
    malformed lines mixed in; and the replay of the same file for comparison."""
    tmp = tmp_path_factory.mktemp("stream")
    log, labels = tmp / "auth.csv", tmp / "labels.csv"
    write_log(GenerateSpec(users=12, computers=30, days=3, events_per_day=600,
                           redteam_events=8, seed=11), log, labels)
    lines = log.read_text().splitlines()
    positions = [len(lines) // 3, len(lines) // 2, 2 * len(lines) // 3]
    for index, text in sorted(zip(positions, BAD_LINES), reverse=True):
        lines.insert(index, text)
    log.write_text("\n".join(lines) + "\n")
    bad_line_numbers = {i + 1: text for i, text in enumerate(lines) if text in BAD_LINES}

    # A growing word vocabulary (tokenizer.word.grow): the trainer's tokenizer changes after every
    # window, and streaming must still give replay's numbers.
    # And a trainer that keeps at most 64 records of a window in memory: the rest waits on disk
    # in sorted runs, read back in event order (pipeline/spill.py). And a trainer that leaves
    # each window's most surprising events out of its training (pipeline/surprising.py).
    config, config_path = stream_config(tmp, kafka_bootstrap, {"topics": {"partitions": 3},
                                                               "tokenizer": {"word": {"grow": True}},
                                                               "streaming": {"spill_events": 64},
                                                               "training": {"exclude_top_fraction": 0.02}})
    replay_out = tmp / "replay.csv.gz"
    replay(log, replay_out, config, progress=False)

    stages = StageProcesses(config_path, tmp / "logs")
    try:
        for i in range(2):
            stages.start("tokenizer", i)
        for stage in ("windower", "trainer", "scorer", "archiver"):
            stages.start(stage)
        wait_for(lambda: tokenizers_assigned(tmp / "logs", 2), 60, what="both tokenizers assigned")
        report = produce_file(config, log)
        archive = Path(config.streaming.archive_dir)
        expected_rows = report.records - len(bad_line_numbers)
        wait_for(lambda: archived_rows(archive) >= expected_rows or stages.dead(), 180,
                 what="every event archived")
        assert not stages.dead(), stages.dead()
    finally:
        stages.stop()
    dead = read_records(config, config.topics.dead_letters, expected=len(bad_line_numbers))
    yield {
        "config": config, "tmp": tmp, "log": log, "bad": bad_line_numbers, "dead": dead,
        "archive": read_scores(Path(config.streaming.archive_dir)),
        "replay": read_scores(replay_out), "produced": report.records,
    }
    delete_topics(config)


def test_stream_archive_equals_replay(streamed_run):
    """The key invariant: same events, same windows, same losses (1e-5) as pipeline replay,
    although Kafka delivered them over 3 partitions through 2 tokenizer processes."""
    assert_same_scores(streamed_run["archive"], streamed_run["replay"])
    assert any(r["loss"] for r in streamed_run["archive"])


def test_the_trainer_left_surprising_events_out(streamed_run):
    """The run above had training.exclude_top_fraction on, and it did leave events out."""
    trainer = (streamed_run["tmp"] / "logs" / "trainer-0.log").read_text()
    assert re.search(r"its [1-9][0-9]* most surprising events left out of training", trainer)


def test_both_tokenizers_did_work(streamed_run):
    logs = streamed_run["tmp"] / "logs"
    for i in range(2):
        assert re.search(r"tokenizer totals: \{'events': [1-9]", (logs / f"tokenizer-{i}.log").read_text())


def test_malformed_raw_lines_reach_the_dead_letter_topic(streamed_run):
    dead = [record for name, record in streamed_run["dead"] if name == "salka.DeadLetter"]
    by_line = {record["line"]: record for record in dead}
    assert set(by_line) == set(streamed_run["bad"])
    for line, text in streamed_run["bad"].items():
        record = by_line[line]
        assert record["stage"] == "tokenizer"
        assert BAD_LINES[text] in record["reason"]
        assert record["payload"] == text.encode()
    # and every other event was scored
    archived = {int(r["line"]) for r in streamed_run["archive"]}
    assert len(archived) == streamed_run["produced"] - len(streamed_run["bad"])
    assert archived.isdisjoint(streamed_run["bad"])


@pytest.mark.slow
def test_late_event_goes_to_the_late_topic(kafka_bootstrap, tmp_path):
    config, config_path = stream_config(
        tmp_path, kafka_bootstrap,
        {"topics": {"partitions": 1}, "window": {"size_seconds": 3600}})
    log = tmp_path / "late.csv"
    row = "{},U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success"
    # line 4 (t=100) arrives after t=7300 moved the watermark past window 0's end (3600)
    log.write_text("\n".join(row.format(t) for t in (10, 20, 7300, 100, 7400)) + "\n")
    stages = StageProcesses(config_path, tmp_path / "logs")
    try:
        stages.start("tokenizer")
        stages.start("windower")
        produce_file(config, log)
        late = read_records(config, config.topics.late, expected=1)

        def through_window_2():  # count-0 completions come or not, as batches fall
            records = read_records(config, config.topics.windows)
            return records if any(r.get("count") and r["window"] == 2 for _, r in records) else None

        windows = wait_for(through_window_2, 60, what="window 2 closed")
    finally:
        stages.stop()
        delete_topics(config)
    assert len(late) == 1
    name, record = late[0]
    assert name == "salka.LateEvent"
    assert record["event"]["line"] == 4 and record["window"] == 0
    assert record["lateness_seconds"] == pytest.approx(7300 - 3600)
    completions = [r for n, r in windows if n == "salka.WindowComplete"]
    assert [(c["window"], c["count"]) for c in completions if c["count"]] == [(0, 2), (2, 2)]
    # windows closed empty (before window 0, and window 1): count-0 completions, in order
    empty = [c["window"] for c in completions if not c["count"]]
    assert set(empty) <= {-1, 1} and empty == sorted(empty)
    events = [r["event"]["line"] for n, r in windows if n == "salka.WindowedEvent"]
    assert sorted(events) == [1, 2, 3, 5]


def test_audit_on_a_live_bus_counts_events_of_an_open_window_as_pending_not_lost(
        kafka_bootstrap, tmp_path):
    # No end of input: the newest window stays open. Its event is pending; those of the window
    # that closed, with no archiver running here, are lost.
    config, config_path = stream_config(
        tmp_path, kafka_bootstrap,
        {"topics": {"partitions": 1}, "window": {"size_seconds": 3600},
         "streaming": {"end_of_input": False}})
    log = tmp_path / "live.csv"
    row = "{},U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success"
    log.write_text("\n".join(row.format(t) for t in (10, 20, 3700)) + "\n")
    stages = StageProcesses(config_path, tmp_path / "logs")
    try:
        stages.start("tokenizer")
        stages.start("windower")
        produce_file(config, log, end_marker=False)
        read_records(config, config.topics.windows, expected=4)  # 3 events, window 0's completion
    finally:
        stages.stop()
    report = audit(config, input_path=log)
    delete_topics(config)
    total = report.total
    assert (total.raw, total.archived, total.pending, total.lost) == (3, 0, 1, 2)
    assert report.pending_windows == {1} and not report.ok
    assert report.source.pending == [3] and report.source.missing == [1, 2]
    assert "pending: 1 event(s) in windows still open (1;" in report.format()


def test_audit_after_an_end_of_input_everywhere_counts_nothing_as_pending(kafka_bootstrap, tmp_path):
    # A batch run whose windower stopped before the end of input reached it: its window never
    # closes, and nothing will archive its events. Pending would hide that: they are lost.
    config, config_path = stream_config(
        tmp_path, kafka_bootstrap, {"topics": {"partitions": 1}, "window": {"size_seconds": 3600}})
    log, empty = tmp_path / "batch.csv", tmp_path / "empty.csv"
    row = "{},U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success"
    log.write_text("\n".join(row.format(t) for t in (10, 20)) + "\n")
    empty.write_text("")
    stages = StageProcesses(config_path, tmp_path / "logs")
    try:
        stages.start("tokenizer")
        stages.start("windower")
        produce_file(config, log, end_marker=False)
        read_records(config, config.topics.windows, expected=2)
    finally:
        stages.stop()
    produce_file(config, empty, end_marker=True)  # the end of input, with nobody to read it
    report = audit(config, input_path=log)
    delete_topics(config)
    assert (report.total.pending, report.total.lost) == (0, 2) and not report.ok
    assert report.source.missing == [1, 2] and report.format().endswith("audit: FAILED")


def test_windows_close_on_a_live_bus_where_one_partition_has_no_events(kafka_bootstrap, tmp_path):
    # A live bus (no end of input) whose sources all write to raw partition 0: tokens
    # partition 1 stays empty, and its -inf clock would keep every window open for good.
    config, config_path = stream_config(
        tmp_path, kafka_bootstrap,
        {"topics": {"partitions": 2}, "window": {"size_seconds": 3600},
         "streaming": {"end_of_input": False, "idle_partition_seconds": 2.0}})
    row = "{},U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success"
    stages = StageProcesses(config_path, tmp_path / "logs")
    producer = make_producer(config)
    try:
        stages.start("tokenizer")
        stages.start("windower")
        # Events for longer than idle_partition_seconds once both read: silence everywhere
        # counts only for its grace, so a burst at start-up and then nothing leaves it waiting.
        wait_for(lambda: all("assigned ['" in log_text(tmp_path / "logs" / f"{s}-0.log")
                             for s in ("tokenizer", "windower")), 60, what="both stages assigned")
        for line, t in enumerate((10, 20, 3700, 7300, 7310, 7320), start=1):
            produce(producer, config.topics.raw, row.format(t).encode(), partition=0,
                    headers=[(LINE_HEADER, str(line).encode())], on_delivery=None)
            producer.flush(10)
            time.sleep(0.7)

        def closed():
            records = read_records(config, config.topics.windows)
            done = [(r["window"], r["count"]) for n, r in records if n == "salka.WindowComplete"]
            return done if (1, 1) in done else None

        completions = wait_for(closed, 60, what="windows 0 and 1 closed")
        assert not stages.dead(), stages.dead()
    finally:
        stages.stop()
        delete_topics(config)
    assert [c for c in completions if c[1]] == [(0, 2), (1, 1)]
    text = (tmp_path / "logs" / "windower-0.log").read_text()
    assert f"{config.topics.tokens}[1] has had no event for 2s" in text


@pytest.mark.slow
@pytest.mark.parametrize("damage", [None, "truncate", "foreign"])
def test_trainer_restart_resumes_from_its_checkpoint(kafka_bootstrap, tmp_path, damage):
    """SIGTERM the trainer after window 1, restart it: it resumes from its newest checkpoint
    without retraining. With the newest checkpoint damaged, it refuses it, falls back to the one
    before, replays from there, and the archive still equals an uninterrupted replay."""
    log, labels = tmp_path / "auth.csv", tmp_path / "labels.csv"
    write_log(GenerateSpec(users=10, computers=30, days=4, events_per_day=400,
                           redteam_events=0, seed=2), log, labels)
    times = [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]]
    # lines 2.. of day 0 and day 1, plus the first few of day 2 (which close window 1), in two
    # parts: window 0 is checkpointed before window 1 closes, so that there is a checkpoint
    # before the newest (in one part, windows 0 and 1 may complete in one batch: one checkpoint)
    window_0 = range(1, 2 + sum(1 for t in times if t < 86400) + 5)
    first_part = range(1, 2 + sum(1 for t in times if t < 2 * 86400) + 5)
    config, config_path = stream_config(tmp_path, kafka_bootstrap, {"topics": {"partitions": 1}})
    stages = StageProcesses(config_path, tmp_path / "logs")
    archive = Path(config.streaming.archive_dir)
    try:
        for stage in ("tokenizer", "windower", "trainer", "scorer", "archiver"):
            stages.start(stage)
        produce_file(config, log, lines=window_0, end_marker=False)
        wait_for(lambda: checkpoint_files(config), 120, what="window 0 checkpointed")
        produce_file(config, log, lines=range(window_0.stop, first_part.stop), end_marker=False)
        wait_for(lambda: (archive / "window-000001.csv.gz").exists(), 120, what="window 1 archived")
        trainer = next(p for name, p in stages.processes if name == "trainer-0")
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(30) == 0  # clean exit on SIGTERM
        assert load_newest_checkpoint(config).last_window == 1
        newest = checkpoint_files(config)[0]
        if damage == "truncate":
            newest.write_bytes(newest.read_bytes()[:1000])
        elif damage == "foreign":
            WindowLearner(dataclasses.replace(config, seed=99)).save(newest)  # another run's
        stages.start("trainer", 1)
        produce_file(config, log, lines=range(first_part.stop, len(times) + 2))
        wait_for(lambda: archived_rows(archive) >= len(times), 120, what="all windows archived")
    finally:
        stages.stop()
        delete_topics(config)
    restarted = (tmp_path / "logs" / "trainer-1.log").read_text()
    if damage is None:
        assert "trained through window 1" in restarted
        assert not re.search(r"window [01]: trained on", restarted)  # nothing retrained
    else:
        assert "refusing checkpoint" in restarted and str(newest) in restarted
        assert "trained through window 0" in restarted
        assert not re.search(r"window 0: trained on", restarted)
        assert re.search(r"window 1: trained on", restarted)  # replayed from the older checkpoint
    assert re.search(r"window 2: trained on", restarted)
    replay_out = tmp_path / "replay.csv.gz"
    replay(log, replay_out, config, progress=False)
    assert_same_scores(read_scores(archive), read_scores(replay_out))
