"""Avro single-object framing (pipeline/serde.py) and the record conversions (pipeline/topicrecords.py).

No broker: every case is bytes in, bytes out. The fingerprint is checked against an independent
implementation of the Avro spec (parsing canonical form + Rabin CRC-64-AVRO, little-endian), so a
Java or Go reader following the spec would agree with what salka writes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import random
import signal
import struct
import time

import pytest
from fastavro.schema import to_parsing_canonical_form
from fastavro.validation import ValidationError, validate
from helpers import LANL_LINE

from pipeline.config import config_from_dict
from pipeline.parsing import Event, LineParser
from pipeline.score import Score
from pipeline.serde import HEADER_LEN, MAGIC, DecodeError, EncodeError, codec
from pipeline.topicrecords import (
    dead_letter,
    event_to_record,
    identity,
    record_to_event,
    score_to_record,
)
from schemas import SCHEMA_DIR

# ---------------------------------------------------------------------------- spec, independently

EMPTY = 0xC15D213AA4D7A795  # Avro spec, "Schema Fingerprints"


def _fp_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
        table.append(fp)
    return table


FP_TABLE = _fp_table()


def crc64_avro(data: bytes) -> int:
    fp = EMPTY
    for byte in data:
        fp = (fp >> 8) ^ FP_TABLE[(fp ^ byte) & 0xFF]
    return fp


PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
RAW_SCHEMAS = {
    path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(SCHEMA_DIR.glob("*.avsc"))
}
SCHEMA_NAMES = sorted(RAW_SCHEMAS)


def _fullname(name: str, namespace: str | None) -> str:
    return name if "." in name or not namespace else f"{namespace}.{name}"


def spec_canonical_form(name: str) -> str:
    """Parsing Canonical Form of the *whole* schema ``name`` (named types it uses inlined at their
    first occurrence), per the spec's PRIMITIVES, FULLNAMES, STRIP, ORDER, STRINGS and WHITESPACE
    rules, as Java's SchemaNormalization.toParsingForm prints a fully resolved Schema."""
    seen: set[str] = set()

    def dump(value: str) -> str:
        return json.dumps(value, ensure_ascii=False)

    def pcf(schema, namespace: str | None) -> str:
        if isinstance(schema, str):
            if schema in PRIMITIVES:
                return dump(schema)
            full = _fullname(schema, namespace)
            return dump(full) if full in seen else pcf(RAW_SCHEMAS[full], namespace)
        if isinstance(schema, list):
            return "[" + ",".join(pcf(branch, namespace) for branch in schema) + "]"
        kind = schema["type"]
        if kind in PRIMITIVES:
            return dump(kind)
        if kind == "array":
            return '{"type":"array","items":' + pcf(schema["items"], namespace) + "}"
        if kind == "map":
            return '{"type":"map","values":' + pcf(schema["values"], namespace) + "}"
        full = _fullname(schema["name"], schema.get("namespace", namespace))
        if full in seen:
            return dump(full)
        seen.add(full)
        inner = full.rpartition(".")[0] or None
        parts = [f'"name":{dump(full)}', f'"type":{dump(kind)}']
        if kind == "record":
            fields = ",".join(
                '{"name":' + dump(f["name"]) + ',"type":' + pcf(f["type"], inner) + "}"
                for f in schema["fields"]
            )
            parts.append(f'"fields":[{fields}]')
        elif kind == "enum":
            parts.append('"symbols":[' + ",".join(dump(s) for s in schema["symbols"]) + "]")
        elif kind == "fixed":
            parts.append(f'"size":{int(schema["size"])}')
        return "{" + ",".join(parts) + "}"

    return pcf(RAW_SCHEMAS[name], None)


def spec_header(name: str) -> bytes:
    return b"\xc3\x01" + crc64_avro(spec_canonical_form(name).encode("utf-8")).to_bytes(8, "little")


# ---------------------------------------------------------------------------- representative records

SRC = {"topic": "salka.raw", "partition": 2, "offset": 99}
TOK_SET = {
    "source": SRC,
    "line": 7,
    "event_time": 3600.25,
    "fields": [
        {"name": "time", "value": "3600"},
        {"name": "src_user", "value": "U1@DOM1"},
        {"name": "ünïcödé", "value": "€ 😀 \x00 tab\t"},
    ],
    "token_ids": [1, 5, 2],
    "raw": LANL_LINE,
}
TOK_NULL = {
    "source": {"topic": "", "partition": 0, "offset": 0},
    "line": None,
    "event_time": None,
    "fields": [],
    "token_ids": None,
    "raw": "",
}

# (schema, variant, record): every schema at least once; nullable fields both null ("null") and set.
RECORDS = [
    ("salka.SourceRef", "set", SRC),
    ("salka.SourceRef", "int-long-max", {"topic": "t" * 300, "partition": 2**31 - 1, "offset": 2**63 - 1}),
    ("salka.SourceRef", "int-long-min", {"topic": "t", "partition": -(2**31), "offset": -(2**63)}),
    ("salka.Field", "set", {"name": "src_user", "value": "U1@DOM1"}),
    ("salka.Field", "empty", {"name": "", "value": ""}),
    ("salka.TokenizedEvent", "set", TOK_SET),
    ("salka.TokenizedEvent", "null", TOK_NULL),
    ("salka.WindowedEvent", "set", {"window": 12, "event": TOK_SET}),
    ("salka.WindowedEvent", "null", {"window": -1, "event": TOK_NULL}),
    ("salka.WindowComplete", "set", {"window": 3, "count": 10, "watermark": 14400.0, "stage": "windower"}),
    ("salka.WindowComplete", "null", {"window": 0, "count": 0, "watermark": None, "stage": "trainer"}),
    ("salka.LateEvent", "set",
     {"window": 0, "watermark": 90000.0, "lateness_seconds": 3600.0, "event": TOK_SET}),
    ("salka.LateEvent", "null",
     {"window": 5, "watermark": -1.5e300, "lateness_seconds": 0.0, "event": TOK_NULL}),
    (
        "salka.ScoredEvent",
        "set",
        {
            "source": SRC, "line": 7, "event_time": 3600.0, "window": 0,
            "entities": {"user": "U1@DOM1", "src_host": "C1", "dst_host": "C2"},
            "loss": 1.25, "loss_total": 11.25, "raw": LANL_LINE,
            "tokens": ["U1@DOM1", "C1", "[EOS]"], "token_losses": [0.5, 2.75, 0.25], "late": True,
        },
    ),
    (
        "salka.ScoredEvent",
        "null",
        {
            "source": SRC, "line": None, "event_time": None, "window": 0, "entities": {},
            "loss": None, "loss_total": None, "raw": "", "tokens": None, "token_losses": None,
            "late": False,
        },
    ),
    (
        "salka.ModelAnnouncement",
        "set",
        {"trained_through": 19675, "serves_through": 19677, "url": "s3://models/model-19675.pt",
         "sha256": "ab" * 32, "fingerprint": "0123456789abcdef", "time_ms": 1_700_000_000_000},
    ),
    (
        "salka.ModelAnnouncement",
        "null",
        {"trained_through": None, "serves_through": 0, "url": None, "sha256": None,
         "fingerprint": "", "time_ms": 0},
    ),
    (
        "salka.DeadLetter",
        "set",
        {
            "stage": "tokenizer", "source": SRC, "line": 7, "reason": "bad time in field 'time'",
            "payload": b"\x00\xff\xc3\x01not utf-8", "time_ms": 1_700_000_000_000,
            "payload_size": 9_000_000, "payload_sha256": "ab" * 32,
        },
    ),
    (
        "salka.DeadLetter",
        "null",
        {"stage": "windower", "source": SRC, "line": None, "reason": "empty record value (null)",
         "payload": None, "time_ms": 0, "payload_size": None, "payload_sha256": None},
    ),
    ("salka.SessionScore", "set",
     {"window": 19675, "session": "blk_-1608999687919862906", "events": 7, "first_line": 8,
      "last_line": 2**40, "first_time": 1_709_511_944.177, "last_time": 1_709_511_950.757,
      "loss": 1.710332, "loss_total": 13.682652}),
    ("salka.SessionScore", "null",
     {"window": -1, "session": "", "events": 0, "first_line": 0, "last_line": 0,
      "first_time": None, "last_time": None, "loss": None, "loss_total": None}),
    ("salka.EntityStat", "set",
     {"kind": "user", "entity": "U1@DOM1", "events": 40, "median": 0.5, "mad": 0.1, "z": 6.5}),
    (
        "salka.Alert",
        "set",
        {
            "source": SRC, "line": 7, "event_time": 3600.0, "window": 2, "raw": LANL_LINE,
            "loss": 4.5, "window_percentile": 99.95,
            "entities": {"user": "U1@DOM1", "src_host": "C1", "dst_host": "C2"},
            "entity_stats": [{"kind": "user", "entity": "U1@DOM1", "events": 40, "median": 0.5,
                              "mad": 0.1, "z": 6.5}],
            "reasons": ["user U1@DOM1: robust z 6.5"], "score": 2.25,
        },
    ),
    (
        "salka.Alert",
        "null",
        {
            "source": SRC, "line": None, "event_time": None, "window": 0, "raw": "", "loss": 0.0,
            "window_percentile": 100.0, "entities": {}, "entity_stats": [], "reasons": [],
            "score": None,
        },
    ),
]
RECORD_IDS = [f"{name}-{variant}" for name, variant, _ in RECORDS]
REPRESENTATIVE = {name: record for name, variant, record in RECORDS if variant == "set"}


def nullable_values(schema, record, namespace=None, path="", seen=None):
    """(path, value) of every nullable union reachable in ``record`` (through nested records)."""
    if isinstance(schema, str):
        if schema in PRIMITIVES:
            return []
        schema = RAW_SCHEMAS[_fullname(schema, namespace)]
    if isinstance(schema, list):
        out = [(path, record)] if "null" in schema else []
        if record is not None:
            for branch in schema:
                if branch != "null":
                    out += nullable_values(branch, record, namespace, path)
        return out
    if schema["type"] == "record":
        inner = _fullname(schema["name"], schema.get("namespace", namespace)).rpartition(".")[0]
        return [
            item for f in schema["fields"]
            for item in nullable_values(f["type"], record[f["name"]], inner, f"{path}.{f['name']}")
        ]
    if schema["type"] == "array":
        return [item for i, x in enumerate(record)
                for item in nullable_values(schema["items"], x, namespace, f"{path}[{i}]")]
    return []


def zigzag(n: int) -> bytes:
    """Avro long encoding (zig-zag varint), for hand-made hostile bodies."""
    u = ((n << 1) ^ (n >> 63)) & (2**64 - 1)
    out = bytearray()
    while True:
        byte, u = u & 0x7F, u >> 7
        out.append(byte | (0x80 if u else 0))
        if not u:
            return bytes(out)


def header(name: str) -> bytes:
    return MAGIC + codec().fingerprints[name]


@contextlib.contextmanager
def deadline(seconds: float):
    """Turn a hang into a test failure (no pytest-timeout here)."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------- round trips


def test_every_schema_has_representative_records():
    assert set(codec().schemas) == set(SCHEMA_NAMES)
    assert {name for name, _, _ in RECORDS} == set(SCHEMA_NAMES)


@pytest.mark.parametrize("name, variant, record", RECORDS, ids=RECORD_IDS)
def test_nullable_fields_are_covered_null_and_set(name, variant, record):
    values = nullable_values(RAW_SCHEMAS[name], record)
    if variant == "null":
        assert values and all(v is None for _, v in values), values
    elif variant == "set":
        assert all(v is not None for _, v in values), values


@pytest.mark.parametrize("name, variant, record", RECORDS, ids=RECORD_IDS)
def test_record_round_trips(name, variant, record):
    data = codec().encode(name, copy.deepcopy(record))
    assert data[:2] == b"\xc3\x01"
    assert data[2:HEADER_LEN] == codec().fingerprints[name]
    assert codec().decode(data) == (name, record)
    assert codec().decode(data, expected=(name,)) == (name, record)
    assert codec().decode(bytearray(data)) == (name, record)


# ---------------------------------------------------------------------------- header / fingerprint

# Java's SchemaNormalization.parsingFingerprint64, from the Avro repository's schema-tests.txt.
SPEC_VECTORS = [
    ('"null"', 7195948357588979594),
    ('"boolean"', -6970731678124411036),
    ('"int"', 8247732601305521295),
    ('"long"', -3434872931120570953),
    ('"float"', 5583340709985441680),
    ('"double"', -8181574048448539266),
    ('"bytes"', 5746618253357095269),
    ('"string"', -8142146995180207161),
]


@pytest.mark.parametrize("canonical, java_long", SPEC_VECTORS)
def test_crc64_avro_reference_matches_spec_vectors(canonical, java_long):
    assert struct.unpack("<q", crc64_avro(canonical.encode()).to_bytes(8, "little"))[0] == java_long


def test_fingerprints_are_distinct():
    assert len(set(codec().fingerprints.values())) == len(SCHEMA_NAMES)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_codec_canonical_form_is_the_whole_schema(name):
    assert to_parsing_canonical_form(codec().schemas[name]) == spec_canonical_form(name)


def test_header_fingerprint_is_little_endian():
    """Byte order alone: the CRC of the codec's own canonical form, little-endian, for every schema."""
    wrong = {}
    for name in SCHEMA_NAMES:
        canonical = to_parsing_canonical_form(codec().schemas[name])
        got = codec().encode(name, REPRESENTATIVE[name])[2:HEADER_LEN]
        if got != crc64_avro(canonical.encode()).to_bytes(8, "little"):
            wrong[name] = got.hex()
    assert not wrong


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_header_matches_spec_single_object_encoding(name):
    """What a Java/Go writer following the spec puts in front of the body."""
    data = codec().encode(name, REPRESENTATIVE[name])
    assert data[:HEADER_LEN] == spec_header(name)


def test_decodes_what_a_spec_writer_framed():
    name = "salka.TokenizedEvent"
    body = codec().encode(name, REPRESENTATIVE[name])[HEADER_LEN:]
    assert codec().decode(spec_header(name) + body) == (name, REPRESENTATIVE[name])


# ---------------------------------------------------------------------------- expected schemas


@pytest.mark.parametrize(
    "name, expected",
    [
        ("salka.SourceRef", ("salka.TokenizedEvent",)),
        ("salka.WindowComplete", ("salka.WindowedEvent",)),
        ("salka.TokenizedEvent", ("salka.WindowedEvent", "salka.WindowComplete")),
        ("salka.DeadLetter", ("salka.ScoredEvent",)),
    ],
)
def test_decode_refuses_a_record_of_another_schema(name, expected):
    data = codec().encode(name, REPRESENTATIVE[name])
    with pytest.raises(DecodeError) as info:
        codec().decode(data, expected=expected)
    message = str(info.value)
    assert name in message
    assert all(e in message for e in expected)
    assert codec().decode(data, expected=(*expected, name)) == (name, REPRESENTATIVE[name])


# ---------------------------------------------------------------------------- hostile bytes


def _tok() -> bytes:
    return codec().encode("salka.TokenizedEvent", TOK_SET)


HOSTILE = [
    ("none", lambda: None, "null"),
    ("empty", lambda: b"", "not an Avro single-object record"),
    ("one-byte", lambda: b"\xc3", "not an Avro single-object record"),
    ("magic-only", lambda: MAGIC, "not an Avro single-object record"),
    ("short-fingerprint", lambda: header("salka.SourceRef")[:-1], "not an Avro single-object record"),
    ("plain-json", lambda: b'{"topic": "salka.raw", "partition": 2}', "not an Avro single-object record"),
    ("raw-line", lambda: LANL_LINE.encode(), "not an Avro single-object record"),
    ("wrong-magic", lambda: b"\xc3\x02" + _tok()[2:], "not an Avro single-object record"),
    ("no-magic", lambda: _tok()[2:], "not an Avro single-object record"),
    ("unknown-fingerprint", lambda: MAGIC + bytes(8) + _tok()[HEADER_LEN:], "unknown writer schema fingerp"),
    ("plain-avro-body", lambda: _tok()[HEADER_LEN:], "not an Avro single-object record"),
    ("trailing-byte", lambda: _tok() + b"\x00", "1 trailing bytes after a salka.TokenizedEvent"),
    ("trailing-record", lambda: _tok() + _tok(), "trailing bytes after a salka.TokenizedEvent"),
    ("body-cut-1", lambda: _tok()[:-1], "corrupt salka.TokenizedEvent record"),
    ("body-cut-to-1", lambda: _tok()[: HEADER_LEN + 1], "corrupt salka.TokenizedEvent record"),
    (
        "huge-string-length",
        lambda: header("salka.SourceRef") + zigzag(2**62) + b"abc",
        "corrupt salka.SourceRef record",
    ),
    (
        "max-string-length",
        lambda: header("salka.SourceRef") + zigzag(2**63 - 1) + b"abc",
        "corrupt salka.SourceRef record",
    ),
    (
        "negative-string-length",
        lambda: header("salka.SourceRef") + zigzag(-1) + b"abc" + zigzag(1) + zigzag(2),
        "corrupt salka.SourceRef record",
    ),
    (
        "huge-bytes-length",
        lambda: header("salka.DeadLetter") + b"\x00" * 6 + b"\x02" + zigzag(2**62),
        "corrupt salka.DeadLetter record",
    ),
    (
        "huge-array-count",
        lambda: header("salka.TokenizedEvent") + b"\x00" * 5 + zigzag(2**62) + b"\x00" * 5,
        "corrupt salka.TokenizedEvent record",
    ),
    (
        "huge-negative-block",
        lambda: header("salka.TokenizedEvent") + b"\x00" * 5 + zigzag(-(2**62)) + zigzag(2**62),
        "corrupt salka.TokenizedEvent record",
    ),
    (
        "huge-map-count",
        lambda: header("salka.ScoredEvent") + b"\x00" * 6 + zigzag(2**40) + b"\x02a\x02b",
        "corrupt salka.ScoredEvent record",
    ),
    ("bad-union-index", lambda: header("salka.WindowComplete") + b"\x02\x02\x08", "corrupt salka.Window"),
    ("bad-utf8", lambda: header("salka.Field") + b"\x04\xff\xfe\x00", "corrupt salka.Field record"),
    ("overlong-varint", lambda: header("salka.SourceRef") + b"\x00\x02" + b"\xff" * 20, "corrupt salka.S"),
]


@pytest.mark.parametrize("make, needle", [(m, n) for _, m, n in HOSTILE], ids=[i for i, _, _ in HOSTILE])
def test_hostile_bytes_raise_decode_error(make, needle):
    with pytest.raises(DecodeError) as info:
        codec().decode(make())
    assert needle in str(info.value)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_header_alone_is_a_decode_error(name):
    with pytest.raises(DecodeError, match=f"corrupt {name} record"):
        codec().decode(header(name))


def test_every_truncation_is_a_decode_error():
    data = _tok()
    for cut in range(len(data)):
        with pytest.raises(DecodeError) as info:
            codec().decode(data[:cut])
        assert str(info.value)


@pytest.mark.parametrize(
    "framed_as, writer", [(a, b) for a in SCHEMA_NAMES for b in SCHEMA_NAMES if a != b]
)
def test_header_of_one_schema_with_body_of_another(framed_as, writer):
    body = codec().encode(writer, REPRESENTATIVE[writer])[HEADER_LEN:]
    with pytest.raises(DecodeError) as info:
        codec().decode(header(framed_as) + body)
    assert framed_as in str(info.value)


def test_random_bytes_raise_decode_error():
    rng = random.Random(20240601)
    with deadline(3):
        for length in range(0, 300):
            for _ in range(3):
                data = rng.randbytes(length)
                with pytest.raises(DecodeError) as info:
                    codec().decode(data)
                assert str(info.value)
                # random bytes behind the magic: an unknown fingerprint, never another error
                with pytest.raises(DecodeError, match="unknown writer schema fingerprint|not an Avro"):
                    codec().decode(MAGIC + data)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_random_bodies_behind_a_valid_header_decode_or_raise_decode_error(name):
    rng = random.Random(name)
    with deadline(3):
        for length in range(0, 64):
            for _ in range(5):
                try:
                    got, record = codec().decode(header(name) + rng.randbytes(length))
                except DecodeError as exc:
                    assert name in str(exc)
                else:
                    assert got == name and isinstance(record, dict)


def test_single_byte_corruptions_decode_or_raise_decode_error():
    data = _tok()
    rng = random.Random(7)
    outcomes = {"decoded": 0, "refused": 0}
    started = time.monotonic()
    with deadline(3):
        for _ in range(300):
            corrupt = bytearray(data)
            position = rng.randrange(len(corrupt))
            corrupt[position] = (corrupt[position] + rng.randrange(1, 256)) % 256  # always a change
            try:
                name, record = codec().decode(bytes(corrupt))
            except DecodeError as exc:
                assert str(exc)
                outcomes["refused"] += 1
            else:
                assert name == "salka.TokenizedEvent" and isinstance(record, dict)
                outcomes["decoded"] += 1
    assert time.monotonic() - started < 2
    assert outcomes["refused"] > 0 and outcomes["decoded"] > 0, outcomes


# ---------------------------------------------------------------------------- encode errors


def _without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


def _with(record: dict, **changes) -> dict:
    return {**copy.deepcopy(record), **changes}


# BUG 3, pipeline/serde.py AvroCodec.encode / decode: fastavro's schemaless_writer does not validate, so
# a value that does not fit is written anyway instead of raising EncodeError: a float is silently
# truncated into an int/long field (2.5 -> 2), an int beyond 32 bits goes into an Avro `int` field (which
# Java/Go readers refuse: "Invalid int encoding"). The reader likewise accepts such an `int` unchecked.
# (fastavro.validation.validate(record, schema, raise_errors=True) refuses all three.)

MISFITS = [
    ("missing-string", "salka.SourceRef", _without(SRC, "topic"), "topic"),
    ("missing-int", "salka.SourceRef", _without(SRC, "partition"), "partition"),
    ("missing-record", "salka.TokenizedEvent", _without(TOK_SET, "source"), "source"),
    ("missing-array", "salka.TokenizedEvent", _without(TOK_SET, "fields"), "fields"),
    ("missing-nested", "salka.TokenizedEvent", _with(TOK_SET, fields=[{"name": "a"}]), "value"),
    ("missing-stage", "salka.WindowComplete", {"window": 1, "count": 2, "watermark": None}, "stage"),
    ("str-for-int", "salka.SourceRef", _with(SRC, partition="2"), "partition"),
    ("none-for-int", "salka.SourceRef", _with(SRC, partition=None), "partition"),
    ("int-for-string", "salka.SourceRef", _with(SRC, topic=5), "topic"),
    ("bytes-for-string", "salka.SourceRef", _with(SRC, topic=b"raw"), "topic"),
    ("long-overflow", "salka.SourceRef", _with(SRC, offset=2**64), ""),
    ("str-for-nullable-long", "salka.TokenizedEvent", _with(TOK_SET, line="7"), "line"),
    ("str-for-nullable-double", "salka.TokenizedEvent", _with(TOK_SET, event_time="x"), "event_time"),
    ("str-items", "salka.TokenizedEvent", _with(TOK_SET, token_ids=["a"]), "token_ids"),
    ("none-for-record", "salka.TokenizedEvent", _with(TOK_SET, source=None), "source"),
    ("str-for-bytes", "salka.DeadLetter", _with(REPRESENTATIVE["salka.DeadLetter"], payload="x"), "payload"),
    ("int-map-value", "salka.ScoredEvent", _with(REPRESENTATIVE["salka.ScoredEvent"], entities={"u": 1}),
     "entities"),
    ("not-a-record", "salka.SourceRef", None, ""),
    ("float-for-int", "salka.SourceRef", _with(SRC, partition=2.5), "partition"),
    ("float-for-long", "salka.DeadLetter", _with(REPRESENTATIVE["salka.DeadLetter"], time_ms=1.5), "time_ms"),
    ("int-beyond-32-bits", "salka.SourceRef", _with(SRC, partition=2**40), "partition"),
]


@pytest.mark.parametrize(
    "case, name, record, needle", MISFITS,
    ids=[m.values[0] if hasattr(m, "values") else m[0] for m in MISFITS],
)
def test_encode_error_when_a_record_does_not_fit(case, name, record, needle):
    with pytest.raises(EncodeError) as info:
        codec().encode(name, record)
    assert f"record does not fit {name}" in str(info.value)
    assert needle in str(info.value)


def test_decode_refuses_an_int_field_beyond_32_bits():
    body = zigzag(len(b"raw")) + b"raw" + zigzag(2**40) + zigzag(5)
    with pytest.raises(DecodeError):
        codec().decode(header("salka.SourceRef") + body)


def test_decode_refuses_a_token_id_beyond_32_bits_inside_a_windowed_event():
    record = {"window": 3, "event": {**TOK_NULL, "token_ids": [1, 5, 2]}}
    good = codec().encode("salka.WindowedEvent", record)
    hostile = good.replace(zigzag(5), zigzag(2**40), 1)  # the one 0x0a byte: token id 5
    assert hostile != good
    assert codec().decode(good)[1]["event"]["token_ids"] == [1, 5, 2]
    with pytest.raises(DecodeError, match=r"event\.token_ids\[\]: 1099511627776 does not fit an Avro int"):
        codec().decode(hostile)


def _int_leaves(value, path=()):
    """Paths to every int in a decoded record (bools excluded: Avro booleans are not ints)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _int_leaves(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _int_leaves(v, (*path, i))]
    return [path] if isinstance(value, int) and not isinstance(value, bool) else []


def _with(record, path, value):
    record = copy.deepcopy(record)
    node = record
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return record


@pytest.mark.parametrize("name", sorted(REPRESENTATIVE))
def test_range_check_agrees_with_fastavro_validate_at_every_integer(name):
    """The decoder's range check (serde.range_check) in place of fastavro's validate: for every
    integer of every schema, at and beyond the 32- and 64-bit edges, the same verdict."""
    schema, check = codec().schemas[name], codec().range_checks[name]
    record = REPRESENTATIVE[name]
    leaves = _int_leaves(record)
    for path in leaves:
        for value in (0, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63 - 1, 2**63, -(2**63) - 1):
            mutated = _with(record, path, value)
            fits_avro = validate(mutated, schema, raise_errors=False)
            try:
                if check is not None:
                    check(mutated)
                passed = True
            except ValidationError:
                passed = False
            assert passed == fits_avro, (path, value)
    assert leaves or check is None  # a schema without integers needs no check


# ---------------------------------------------------------------------------- topicrecords.py

CONFIG = config_from_dict({})


def _lanl_event(line: int = 7) -> tuple[Event, LineParser]:
    parser = LineParser(CONFIG.input)
    parsed = parser.parse(LANL_LINE, line)
    assert isinstance(parsed, Event)
    event = dataclasses.replace(parsed, source=("raw", 2, 99), raw=LANL_LINE, token_ids=(1, 5, 2))
    return event, parser


def _through_kafka(name: str, record: dict) -> dict:
    got, decoded = codec().decode(codec().encode(name, record), expected=(name,))
    assert got == name
    return decoded


def test_event_round_trips_through_a_tokenized_event():
    event, parser = _lanl_event()
    record = _through_kafka("salka.TokenizedEvent", event_to_record(event))
    back = record_to_event(record, parser.model_fields)
    assert back == event
    assert (back.line, back.time, back.fields, back.text_fields, back.token_ids, back.source, back.raw) == (
        7, 3600.0, event.fields, event.text_fields, (1, 5, 2), ("raw", 2, 99), LANL_LINE,
    )
    assert list(back.fields) == list(event.fields)  # field order survives
    assert isinstance(back.token_ids, tuple) and isinstance(back.source, tuple)
    assert identity(record) == ("raw", 2, 99)


def test_unknown_line_is_null_on_the_wire_and_zero_again():
    event, parser = _lanl_event(line=0)
    record = event_to_record(event)
    assert record["line"] is None
    decoded = _through_kafka("salka.TokenizedEvent", record)
    assert decoded["line"] is None
    assert record_to_event(decoded, parser.model_fields) == event


def test_untimed_event_without_token_ids_round_trips():
    config = config_from_dict({"input": {"format": "text", "time_field": "", "entities": {}}})
    parser = LineParser(config.input)
    line = "sshd[42]: Accepted password for root"
    event = dataclasses.replace(parser.parse(line, 3), source=("salka.raw", 0, 0), raw=line)
    assert event.time is None and event.token_ids is None
    record = _through_kafka("salka.TokenizedEvent", event_to_record(event))
    assert record["event_time"] is None and record["token_ids"] is None
    assert record_to_event(record, parser.model_fields) == event


def test_event_travels_inside_windowed_and_late_records():
    event, parser = _lanl_event()
    inner = event_to_record(event)
    for name, record in [
        ("salka.WindowedEvent", {"window": 0, "event": inner}),
        ("salka.LateEvent", {"window": 0, "watermark": 86400.0, "lateness_seconds": 0.0, "event": inner}),
    ]:
        decoded = _through_kafka(name, record)
        assert identity(decoded["event"]) == ("raw", 2, 99)
        assert record_to_event(decoded["event"], parser.model_fields) == event


def test_record_to_event_reads_missing_model_fields_as_empty():
    event, _ = _lanl_event()
    back = record_to_event(event_to_record(event), ["src_user", "no_such_field"])
    assert back.text_fields == (("src_user", "U1@DOM1"), ("no_such_field", ""))


@pytest.mark.parametrize("loss, loss_total", [(1.5, 12.0), (None, None)])
def test_score_to_record_round_trips(loss, loss_total):
    event, _ = _lanl_event()
    record = score_to_record(Score(event=event, window=0, loss=loss, loss_total=loss_total), CONFIG)
    decoded = _through_kafka("salka.ScoredEvent", record)
    assert decoded == {
        "source": {"topic": "raw", "partition": 2, "offset": 99},
        "line": 7,
        "event_time": 3600.0,
        "window": 0,
        "entities": {"user": "U1@DOM1", "src_host": "C1", "dst_host": "C2"},
        "loss": loss,
        "loss_total": loss_total,
        "raw": LANL_LINE,
        "tokens": None,
        "token_losses": None,
        "late": False,
    }
    assert identity(decoded) == ("raw", 2, 99)
    late = score_to_record(Score(event=event, window=0, loss=loss, loss_total=loss_total), CONFIG, late=True)
    assert _through_kafka("salka.ScoredEvent", late) == {**decoded, "late": True}


@pytest.mark.parametrize("payload, line", [(b"\xff\xfe garbage \x00", 12), (None, None)])
def test_dead_letter_round_trips(payload, line):
    before = int(time.time() * 1000)
    record = dead_letter("windower", "salka.tokens", 1, 41, "corrupt record", payload, line=line)
    after = int(time.time() * 1000)
    decoded = _through_kafka("salka.DeadLetter", record)
    assert decoded == record
    assert decoded["payload"] == payload and decoded["line"] == line
    assert before <= decoded["time_ms"] <= after
    assert identity(decoded) == ("salka.tokens", 1, 41)
