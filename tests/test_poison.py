"""Poison pills and size limits (issue 9: D2, D3, D5).

- A record a stage cannot process, or cannot dead-letter whole, is dead-lettered cut to fit
  (a prefix, its size, SHA-256 and the reason); the stage goes on with the next records.
- ``pipeline produce`` dead-letters a line too large for Kafka and publishes everything else.
- ``pipeline audit --input FILE`` finds lines the broker dropped or stored twice.

The embedded broker (Tansu) enforces no size limit of its own (20 MB records are accepted,
``max.message.bytes`` on a topic is ignored), so the limits met here are the producer's
``message.max.bytes``: salka's default (8 MiB) and a lower one set in ``kafka:``, as a user with a
1 MB cluster would. Records over the producer's limit are put on the raw topic by a client
with a higher limit, as another producer or a larger-limit cluster would.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner
from confluent_kafka import KafkaError, KafkaException, Producer
from helpers import delete_topics, read_records, stream_config, wait_for

from pipeline.audit import archive_problem, audit
from pipeline.cli import cli
from pipeline.demo import ArchiveCounter, StageProcesses
from pipeline.generate import GenerateSpec, write_log
from pipeline.poison import budget, fit_dead_letter, is_poison, message_limit
from pipeline.produce import produce_file
from pipeline.serde import codec
from pipeline.source_audit import reconcile
from pipeline.topicrecords import CONTROL_HEADER, LINE_HEADER, dead_letter

GOOD = "{t},U{u}@DOM1,U{u}@DOM1,C{c},C2,Kerberos,Network,LogOn,Success"


def good_line(t: int) -> bytes:
    return GOOD.format(t=t, u=t % 5, c=t % 7).encode()


def assert_cut_properly(letter: dict, original: bytes, limit: int) -> None:
    assert len(letter["payload"]) < len(original)
    assert original.startswith(letter["payload"])
    assert letter["payload_size"] == len(original)
    assert letter["payload_sha256"] == hashlib.sha256(original).hexdigest()
    assert len(codec().encode("salka.DeadLetter", letter)) <= limit


# ------------------------------------------------------------------ pure: fitting a dead letter

def _letter(payload: bytes, reason: str = "a CSV field longer than 131072 characters") -> dict:
    return dead_letter("tokenizer", "raw", 0, 7, reason, payload, 7)


@pytest.mark.parametrize("over", [-1, 0, 1, 1000])
def test_dead_letter_is_whole_up_to_the_limit_and_cut_beyond(over):
    payload = b"x" * 100_000
    letter = _letter(payload)
    limit = len(codec().encode("salka.DeadLetter", letter)) - over  # whole, it is `over` bytes over
    data, record = fit_dead_letter(letter, limit)
    assert len(data) <= limit
    assert codec().decode(data) == ("salka.DeadLetter", record)
    if over <= 0:
        assert record["payload"] == payload
    else:
        assert_cut_properly(record, payload, limit)
        assert len(data) > limit - 20  # the longest prefix that fits, not an arbitrary one


def test_a_huge_reason_is_shortened_too():
    data, record = fit_dead_letter(_letter(b"y" * 50_000, reason="bad: " + "z" * 60_000), 20_000)
    assert len(data) <= 20_000 and len(record["reason"]) <= 2000
    assert record["reason"].startswith("bad: zzz") and "[60005 characters]" in record["reason"]
    assert_cut_properly(record, b"y" * 50_000, 20_000)


def test_null_payload_dead_letter_fits_as_is():
    record = dead_letter("tokenizer", "raw", 0, 1, "null value", None)
    data, fitted = fit_dead_letter(record, 1000)
    assert fitted == record and fitted["payload_size"] is None


def test_budget_leaves_room_for_key_headers_and_framing():
    assert budget(1000) < 1000
    assert budget(10_000, b"123", [("salka.line", b"123")]) == budget(10_000) - 3 - 13


@pytest.mark.parametrize("exc, poison", [
    (ValueError("odd input"), True),
    (KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)), True),
    (KafkaException(KafkaError(KafkaError._TRANSPORT)), False),
    (OSError(28, "No space left on device"), False),
    (MemoryError(), False),
])
def test_only_the_records_own_faults_count_as_poison(exc, poison):
    assert is_poison(exc) is poison


# ---------------------------------------------------------------- pure: audit against the file

def _ids(pairs):
    return [(("raw", 0, offset), line) for offset, line in pairs]


def test_reconcile_clean_when_every_line_ends_once():
    raw = _ids([(0, 2), (1, 3), (2, 4)])
    outcomes = raw + [raw[1]]  # a dead letter repeated under at-least-once delivery
    report = reconcile("f", {2, 3, 4}, 1, raw, outcomes)
    assert report.ok and report.published == report.accounted == 3


def test_reconcile_names_missing_duplicated_and_unexpected_lines():
    raw = _ids([(0, 2), (1, 3), (2, 3), (3, 9)])  # line 3 stored twice, 4 lost, 9 not in file
    outcomes = raw + [(("raw", -1, -1), 5)]  # line 5: produce dead-lettered it
    report = reconcile("f", {2, 3, 4, 5}, 1, raw, outcomes)
    assert not report.ok
    assert (report.missing, report.duplicated, report.unexpected) == ([4], [3], [9])
    assert report.not_published == [4]
    text = report.format()
    assert "missing lines" in text and ": 4" in text and "input audit: FAILED" in text


def test_an_audit_says_when_there_is_no_archive_to_audit_against(tmp_path):
    assert "does not exist" in archive_problem(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    assert "has no window files" in archive_problem(tmp_path / "empty")
    (tmp_path / "empty" / "window-000001.csv.gz").write_bytes(b"")
    assert archive_problem(tmp_path / "empty") is None


# ---------------------------------------------------------------- over the broker: the tokenizer

def _raw_producer(config) -> Producer:
    # Puts records on the raw topic that salka's own producer would refuse (the broker takes them).
    return Producer({"bootstrap.servers": config.kafka["bootstrap.servers"],
                     "message.max.bytes": 30_000_000, "compression.type": "lz4"})


def _run_tokenizer_over(tmp_path, kafka_bootstrap, limit: int | None, poison: dict[int, bytes]):
    kafka = {"message.max.bytes": limit} if limit else {}
    config, config_path = stream_config(tmp_path, kafka_bootstrap, {"kafka": kafka})
    t = config.topics
    goods = {n: good_line(n * 10) for n in range(1, 6)}
    producer = _raw_producer(config)
    for number, value in [*poison.items(), *goods.items()]:  # the good records come after
        key = str(number).encode()
        producer.produce(t.raw, value, key=key, headers=[(LINE_HEADER, key)])
    assert producer.flush(60) == 0
    stages = StageProcesses(config_path, tmp_path / "logs")
    try:
        stages.start("tokenizer")
        tokens = read_records(config, t.tokens, expected=len(goods), timeout=90)
        dead = read_records(config, t.dead_letters, expected=len(poison), timeout=90)
        assert not stages.dead(), stages.dead()
    finally:
        stages.stop()
    log_text = (tmp_path / "logs" / "tokenizer-0.log").read_text()
    delete_topics(config)
    assert "restarting from the last commit" not in log_text  # never a crash loop
    assert sorted(r["line"] for _, r in tokens) == sorted(goods)  # later events processed
    letters = {r["line"]: r for _, r in dead}
    assert sorted(letters) == sorted(poison)
    return config, letters


@pytest.mark.slow
def test_tokenizer_dead_letters_records_around_a_lowered_producer_limit(kafka_bootstrap, tmp_path):
    limit = 1_000_000  # kafka.message.max.bytes: e.g. a cluster at Kafka's 1 MB default
    key_room = budget(limit, b"1000", [(LINE_HEADER, b"1000")])
    field = "F" * 120_000  # each CSV field under the parser's limit: 960 KB, its event 1.9 MB
    poison = {
        1000: b"A" * (key_room - 1000),  # just under: its dead letter still fits whole
        1001: b"A" * key_room,  # at the producer's limit for a raw record: the dead letter does not
        1002: b"A" * (limit + 1),  # over the producer's limit
        1003: b"A" * 3_000_000,  # far over it
        # parses fine, but its tokenized event (fields + raw line) is over half the limit, the
        # room later stages need: the tokenizer dead-letters it and says so
        1004: ",".join(["7200", f"U{field}@D", f"U{field}@D", f"C{field}", f"C{field}", field,
                        field, field, field]).encode(),
    }
    config, letters = _run_tokenizer_over(tmp_path, kafka_bootstrap, limit, poison)
    assert message_limit(config) == limit
    for number in (1000, 1004):  # whole when they fit
        assert letters[number]["payload"] == poison[number]
        assert letters[number]["payload_size"] == len(poison[number])
    for number in (1001, 1002, 1003):
        assert_cut_properly(letters[number], poison[number], limit)
    assert "a CSV field longer than" in letters[1003]["reason"]
    assert "over 500000 (half of kafka message.max.bytes" in letters[1004]["reason"]


@pytest.mark.slow
def test_tokenizer_survives_the_8_39_mb_line_at_the_default_limit(kafka_bootstrap, tmp_path):
    """Issue 9 D2 as reported: an 8.39 MB raw line fits the producer's default limit, its dead
    letter did not, MSG_SIZE_TOO_LARGE escaped and the tokenizer crash-looped."""
    limit = 8_388_608
    poison = {2000: b"B" * 8_388_000, 2001: b"C" * 9_000_000}
    _, letters = _run_tokenizer_over(tmp_path, kafka_bootstrap, None, poison)
    for number, value in poison.items():
        assert_cut_properly(letters[number], value, limit)


# ------------------------------------------------------------------ over the broker: produce


@pytest.mark.slow
def test_produce_dead_letters_an_oversized_line_and_publishes_the_rest(kafka_bootstrap, tmp_path):
    limit = 100_000
    config, config_path = stream_config(tmp_path, kafka_bootstrap,
                                        {"kafka": {"message.max.bytes": limit},
                                         "topics": {"partitions": 2}})
    lines = [good_line(t).decode() for t in range(0, 400, 10)]
    big = "9" * 150_000
    lines[10] = big  # physical line 11 (no header row)
    log = tmp_path / "log.csv"
    log.write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    result = runner.invoke(cli, ["produce", "--config", str(config_path), "--input", str(log)])
    assert result.exit_code == 0, result.output
    assert "line 11" in result.output and "dead-lettered" in result.output
    assert "Traceback" not in result.output

    raw = read_records_raw(config, config.topics.raw, expected=len(lines) - 1 + 2)
    data = [(m[0], m[1]) for m in raw if m[2] is None]
    markers = [m for m in raw if m[2] is not None]
    assert sorted(int(k) for k, _ in data) == [n for n in range(1, len(lines) + 1) if n != 11]
    assert len(markers) == 2  # the end marker on every partition, after the oversized line
    dead = read_records(config, config.topics.dead_letters, expected=1)
    delete_topics(config)
    assert len(dead) == 1
    letter = dead[0][1]
    assert letter["stage"] == "produce" and letter["line"] == 11
    assert "message.max.bytes" in letter["reason"]
    assert_cut_properly(letter, big.encode(), limit)


def read_records_raw(config, topic: str, expected: int) -> list[tuple[bytes, bytes, str | None]]:
    """(key, value, control header) of the first ``expected`` records of ``topic``."""
    from pipeline.runner import header
    from pipeline.topicread import read_topic

    return [(m.key(), m.value(), header(m, CONTROL_HEADER))
            for m in read_topic(config, topic, count=expected, timeout=60)]


# ---------------------------------------------------------- over the broker: audit --input


def _pipeline_run(tmp_path, kafka_bootstrap, skip: int | None = None, duplicate: int | None = None):
    """Produce a generated log (optionally skipping one line and producing another twice, as a
    broker that lost or duplicated a record would have stored them), run it through the stages
    to the archive, and return (config, config file, log)."""
    config, config_path = stream_config(tmp_path, kafka_bootstrap, {"topics": {"partitions": 2}})
    log, labels = tmp_path / "auth.csv", tmp_path / "labels.csv"
    write_log(GenerateSpec(users=6, computers=16, days=2, events_per_day=150, redteam_events=0,
                           seed=3), log, labels)
    total = len(log.read_text().splitlines())
    stages = StageProcesses(config_path, tmp_path / "logs")
    archive = Path(config.streaming.archive_dir)
    try:
        for stage in ("tokenizer", "windower", "trainer", "scorer", "archiver"):
            stages.start(stage)
        # Line after line, as the broker would have stored them: `skip` left out, `duplicate`
        # stored twice in a row (so both copies are in time for their window and archived).
        order = [n for n in range(1, total + 1) if n != skip]
        if duplicate is not None:
            order.insert(order.index(duplicate), duplicate)
        runs: list[range] = []
        for n in order:
            if runs and n == runs[-1].stop:
                runs[-1] = range(runs[-1].start, n + 1)
            else:
                runs.append(range(n, n + 1))
        for i, run in enumerate(runs):
            produce_file(config, log, lines=run, end_marker=i == len(runs) - 1)
        expected = len(order) - 1  # the header row is not an event
        wait_for(lambda: ArchiveCounter(archive).count()[0] >= expected or stages.dead(), 180,
                 what=f"{expected} archived rows")
        assert not stages.dead(), stages.dead()
    finally:
        stages.stop()
    return config, config_path, log


@pytest.mark.slow
def test_audit_input_is_clean_after_a_normal_run(kafka_bootstrap, tmp_path):
    config, config_path, log = _pipeline_run(tmp_path, kafka_bootstrap)
    report = audit(config, input_path=log)
    elsewhere = audit(config, archive_dir=tmp_path / "elsewhere")  # a wrong --archive: all "lost"
    delete_topics(config)
    print(report.format())
    assert report.ok and report.source is not None and report.source.ok
    assert report.source.lines == report.source.accounted == report.total.raw
    assert report.source.header_rows == 1
    assert report.archive_problem is None
    assert not elsewhere.ok and elsewhere.total.lost == report.total.archived
    assert f"archive {tmp_path / 'elsewhere'} does not exist: has the archiver" in elsewhere.format()


@pytest.mark.slow
def test_audit_input_reports_a_dropped_and_a_duplicated_line(kafka_bootstrap, tmp_path):
    config, config_path, log = _pipeline_run(tmp_path, kafka_bootstrap, skip=40, duplicate=77)
    # The raw-topic audit cannot see either: every raw record ended exactly once.
    assert audit(config).ok
    result = CliRunner().invoke(cli, ["audit", "--config", str(config_path), "--input", str(log)])
    delete_topics(config)
    print(result.output)
    assert result.exit_code == 1
    assert "missing lines (no archive row, dead letter or late event): 1: 40" in result.output
    assert "duplicated lines (on two raw records or with two outcomes): 1: 77" in result.output
    assert "input audit: FAILED" in result.output
