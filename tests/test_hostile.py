"""Hostile input mixed into a normal log: every bad record becomes a dead letter with a reason
naming the problem, every good event is scored, no stage dies, and the audit reconciles."""

from __future__ import annotations

from pathlib import Path

import pytest
from kafka_helpers import delete_topics, read_records, stream_config, wait_for

from pipeline.audit import audit
from pipeline.demo import ArchiveCounter, StageProcesses
from pipeline.generate import GenerateSpec, write_log
from pipeline.kafka import make_producer
from pipeline.produce import produce_file
from pipeline.records import LINE_HEADER
from pipeline.serde import codec

GOOD = b"5000,U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success"
TOKENIZED = {"source": {"topic": "x", "partition": 0, "offset": 0}, "line": 1, "event_time": 1.0,
             "fields": [], "token_ids": None, "raw": "x"}
SCORED = {"source": {"topic": "x", "partition": 0, "offset": 0}, "line": 1, "event_time": 1.0,
          "window": 0, "entities": {"user": "U1"}, "loss": 1.5, "loss_total": 9.0, "raw": "x"}

# (kind, raw record value, what the dead letter's reason must say)
BAD_RAW = [
    ("empty", b"", "empty line"),
    ("whitespace only", b"  \t  ", "empty line"),
    ("null value", None, "null value"),
    ("binary", bytes(range(256)), "invalid UTF-8"),
    ("invalid UTF-8", b"1,U1\xff\xfe@DOM1,U1,C1,C2,K,N,L,S", "invalid UTF-8"),
    ("NUL bytes", GOOD.replace(b"U1@", b"U1\x00@", 1), "NUL"),
    ("2 MB line", b"A" * 2_000_000, "a CSV field longer than"),
    ("2 MB line of columns", b"1," + b"A," * 1_000_000, "expected 9 CSV columns, got 1000002"),
    ("too few columns", b"1,U1@DOM1,C1", "expected 9 CSV columns, got 3"),
    ("too many columns", GOOD + b",extra,more", "expected 9 CSV columns, got 11"),
    ("thousands of columns", b"," * 10_000, "expected 9 CSV columns, got 10001"),
    ("broken quoting", b'1,"U1@DOM1,U1@DOM1,C1,C2,K,N,L,S', "CSV"),
    ("unparsable time", GOOD.replace(b"5000", b"yesterday"), "bad time"),
    ("negative time", GOOD.replace(b"5000", b"-5000"), "negative"),
    ("far-future time", GOOD.replace(b"5000", b"99999999999"), "too far in the future"),
    ("NaN time", GOOD.replace(b"5000", b"nan"), "not a finite number"),
    ("infinite time", GOOD.replace(b"5000", b"inf"), "not a finite number"),
    ("empty time", GOOD.replace(b"5000", b""), "empty time"),
    ("only delimiters", b",,,,,,,,", "empty time"),
    ("header mid-stream", b"time,src_user,dst_user,src_computer,dst_computer,auth_type,logon_type,"
                          b"auth_orientation,success", "header row"),
    ("BOM before time", "\ufeff".encode() + GOOD, "bad time"),
    ("JSON line", b'{"time": 5000, "user": "U1"}', "expected 9 CSV columns"),
    ("Avro record on the raw topic", codec().encode("salka.TokenizedEvent", TOKENIZED), "invalid UTF-8"),
    ("carriage return only", b"\r", "empty line"),
]


def test_hostile_records_are_dead_lettered_and_nothing_else_is_lost(kafka_bootstrap, tmp_path):
    assert len(BAD_RAW) >= 20
    config, config_path = stream_config(tmp_path, kafka_bootstrap, {"topics": {"partitions": 3}})
    log, labels = tmp_path / "auth.csv", tmp_path / "labels.csv"
    write_log(GenerateSpec(users=8, computers=20, days=2, events_per_day=400, redteam_events=0,
                           seed=4), log, labels)
    good_events = len(log.read_text().splitlines()) - 1
    t = config.topics
    # Records that are not salka's on salka's internal topics, each stage's input
    bad_internal = [
        (t.tokens, b"not avro at all", "windower", "not an Avro single-object record"),
        (t.tokens, codec().encode("salka.WindowComplete", {"window": 1, "count": 1, "watermark": None,
                                                           "stage": "x"}),
         "windower", "where salka.TokenizedEvent was expected"),
        (t.windows, b"\xc3\x01" + b"\x00" * 8 + b"junk", "trainer", "unknown writer schema"),
        (t.windows, codec().encode("salka.TokenizedEvent", TOKENIZED), "trainer",
         "record of schema salka.TokenizedEvent"),
        (t.scores, codec().encode("salka.ScoredEvent", SCORED)[:-3], "archiver", "corrupt salka.ScoredEvent"),
        (t.scores, None, "archiver", "null"),
    ]
    producer = make_producer(config)
    for number, (_, value, _) in enumerate(BAD_RAW, start=100_000):
        producer.produce(t.raw, value, key=str(number).encode(),
                         headers=[(LINE_HEADER, str(number).encode())])
    for topic, value, _, _ in bad_internal:
        producer.produce(topic, value, partition=0)
    assert producer.flush(30) == 0

    stages = StageProcesses(config_path, tmp_path / "logs")
    archive = Path(config.streaming.archive_dir)
    try:
        for i in range(2):
            stages.start("tokenizer", i)
        for stage in ("windower", "trainer", "archiver"):
            stages.start(stage)
        produce_file(config, log)
        wait_for(lambda: ArchiveCounter(archive).count()[0] >= good_events or stages.dead(), 180,
                 what="every good event archived")
        assert not stages.dead(), stages.dead()
        expected_dead = len(BAD_RAW) + len(bad_internal)
        dead = read_records(config, t.dead_letters, expected=expected_dead, timeout=60)
    finally:
        stages.stop()
    assert not stages.dead() or all(p.returncode == 0 for _, p in stages.processes)

    letters = [r for name, r in dead if name == "salka.DeadLetter"]
    raw_letters = {r["line"]: r for r in letters if r["stage"] == "tokenizer"}
    for number, (kind, value, reason) in enumerate(BAD_RAW, start=100_000):
        assert number in raw_letters, f"{kind}: no dead letter"
        assert reason in raw_letters[number]["reason"], (kind, raw_letters[number]["reason"])
        assert raw_letters[number]["payload"] == value, kind  # the record itself is kept as data
    for topic, value, stage, reason in bad_internal:
        match = [r for r in letters if r["stage"] == stage and r["source"]["topic"] == topic
                 and reason in r["reason"]]
        assert match, (stage, reason, [r["reason"] for r in letters if r["stage"] == stage])
        assert match[0]["payload"] == value

    report = audit(config)
    print(report.format())
    assert report.total.raw == good_events + len(BAD_RAW)
    assert report.total.archived == good_events
    assert report.total.dead_letters == len(BAD_RAW)
    assert report.ok
    delete_topics(config)


OFFLINE = [bad for bad in BAD_RAW if bad[1] is not None]  # a null value exists only on Kafka


@pytest.mark.parametrize("kind, value, reason", OFFLINE, ids=[b[0] for b in OFFLINE])
def test_each_bad_raw_record_has_its_reason_offline(kind, value, reason):
    """The same reasons without a broker: the tokenizer's parse step on its own."""
    from pipeline.config import config_from_dict
    from pipeline.parsing import LineParser, ParseError

    result = LineParser(config_from_dict({}).input).parse(value, 7)
    assert isinstance(result, ParseError), kind
    assert reason in result.reason
