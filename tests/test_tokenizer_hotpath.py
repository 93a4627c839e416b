"""The tokenizer stage's hot path writes the same bytes as the generic path it replaced.

pipeline/tokenwire.py writes salka.TokenizedEvent values by hand and pipeline/parsing.py splits
plain CSV lines with str.split: both must agree with the codec and csv.reader on every input,
hostile ones included, or the stream would stop matching replay.
"""

from __future__ import annotations

import csv
import dataclasses
import random
import re

import pytest
from stage_fakes import LANL_COLUMNS, FakeMessage, RecordingOutput

from nn.tokenizers import encode_event
from pipeline.config import config_from_dict
from pipeline.modelspec import make_tokenizer
from pipeline.parsing import Event, LineParser, Malformed, _csv_rows
from pipeline.serde import EncodeError, avro_long, codec
from pipeline.stages.tokenizer import TokenizerStage
from pipeline.tokenwire import TokenizedEventWriter, long_bytes
from pipeline.topicrecords import CONTROL_HEADER, END_OF_INPUT, LINE_HEADER, event_to_record, line_number

SCHEMA = "salka.TokenizedEvent"
PIECES = ["a", "Z", "0", ",", " ", "é", "\u4e2d", "\U0001f600", "\x01", "<", '"', "\\"]


def generic(event: Event, source, raw: str, token_ids) -> bytes:
    """What the stage wrote before: the codec over event_to_record."""
    full = dataclasses.replace(event, source=source, raw=raw,
                               token_ids=None if token_ids is None else tuple(token_ids))
    return codec().encode(SCHEMA, event_to_record(full))


def text(rnd: random.Random) -> str:
    # Lengths around the one-byte varint edge (63/64) and past the writer's table (8192 bytes).
    n = rnd.choice([0, 1, 5, 31, 32, 63, 64, 65, 300, 2800, 8200])
    return "".join(rnd.choice(PIECES) for _ in range(n))


def random_case(rnd: random.Random):
    fields = {text(rnd) or "f": text(rnd) for _ in range(rnd.choice([0, 1, 2, 9]))}
    if rnd.random() < 0.1:  # an array block count past one varint byte
        fields = {f"f{i}": f"v{i}" for i in range(70)}
    event = Event(line=rnd.choice([0, 1, 63, 64, 8191, 8192, 2**40, 2**63 - 1, -1, -(2**63)]),
                  time=rnd.choice([None, 0.0, -0.0, 1.5, 1.7e9, 7.2e9]), fields=fields,
                  text_fields=())
    token_ids = rnd.choice([
        None, [], [rnd.randrange(0, 300) for _ in range(rnd.randrange(1, 130))],
        [0, 63, 64, 8191, 8192, 2**31 - 1, -1, -(2**31)], (5, 6, 7),
    ])
    source = (rnd.choice(["raw", "t\u00e9.raw", ""]), rnd.choice([0, 7, 2**31 - 1, -1]),
              rnd.choice([0, 1, 2**40, 2**63 - 1]))
    return event, source, text(rnd), token_ids


def test_writer_is_on_for_the_current_schema():
    # Off (every event through the codec) only when schemas/ changed the record: then update
    # pipeline/tokenwire.py (WRITES and the writer) to the new schema.
    assert TokenizedEventWriter().fast


@pytest.mark.parametrize("seed", range(4))
def test_writer_bytes_equal_the_codec(seed):
    rnd, writer = random.Random(seed), TokenizedEventWriter()
    for _ in range(200):
        event, source, raw, token_ids = random_case(rnd)
        assert writer.write(event, source, raw, token_ids) == generic(event, source, raw, token_ids)


@pytest.mark.parametrize("change", [
    {"line": 2**63}, {"line": True}, {"time": 3}, {"time": "1"}, {"fields": {"a": 1}},
    {"fields": {"a": "\ud800"}}, {"raw": "lone \udc00 surrogate"}, {"token_ids": [2**31]},
    {"token_ids": [1.5]}, {"source": ("raw", 2**31, 0)}, {"source": ("raw", 0, 2**63)},
])
def test_values_that_do_not_fit_fail_as_the_codec_fails(change):
    """Whatever the fast path does not write goes to the codec: the same bytes when the codec
    accepts it (an int time is a double), the codec's own EncodeError when not."""
    case = {"event": Event(line=3, time=1.0, fields={"a": "b"}, text_fields=()),
            "source": ("raw", 0, 5), "raw": "x", "token_ids": None}
    for key in ("line", "time", "fields"):
        if key in change:
            case["event"] = dataclasses.replace(case["event"], **{key: change[key]})
    case.update({k: v for k, v in change.items() if k in ("source", "raw", "token_ids")})
    try:
        expected = generic(**case)
    except EncodeError as exc:
        with pytest.raises(EncodeError) as got:
            TokenizedEventWriter().write(**case)
        assert str(got.value) == str(exc)
    else:
        assert TokenizedEventWriter().write(**case) == expected


def test_long_bytes_is_avro_long():
    """The table writer of offsets and line numbers, at and around every table's edge."""
    edges = [0, 1, 63, 64, 8191, 8192, 8193, 2**13, 2**14, 2**20, 2**27 - 1, 2**27, 2**27 + 1,
             2**34, 2**41 - 1, 2**41, 2**41 + 1, 2**63 - 1, -1, -64, -65, -(2**63)]
    rnd = random.Random(3)
    cases = edges + [rnd.randrange(0, 2**41) for _ in range(20_000)]
    for n in cases:
        assert long_bytes(n) == avro_long(n), n


@pytest.mark.parametrize("value", [
    None, b"17", b" 17\n", b"1_000", b"x", b"", b"\xff", "\u0661\u0662".encode(), b"\x1c5",
    b"\x855", "\u20035".encode(), b"-3", b"+4", b"0x10", b"1e3", b"\xff7", b"0",
    "\u00b2".encode(), b"9223372036854775807", b"9223372036854775808", b"9" * 5000,
])
def test_line_header_read_as_text(value):
    """The line header as int() reads its text (decoded with replacement): the bytes fast path
    changes no number, ASCII or not; a number no record can carry (below 1, past an Avro long,
    which once made the tokenizer's dead letter fail to encode and the stage crash-loop) or no
    number at all (int() refuses "\u00b2", which str.isdigit() accepts) is 0, none."""
    try:
        expected = int(value.decode("utf-8", errors="replace")) if value is not None else 0
    except ValueError:
        expected = 0
    expected = expected if 1 <= expected <= 2**63 - 1 else 0
    assert line_number(value) == expected
    assert line_number(value.decode("utf-8", errors="replace") if value is not None else None) == expected
    assert line_number("\u0661\u0662".encode()) == 12  # not the fast path, still a number


def test_parse_fields_is_parse_without_the_event():
    config = config_from_dict({"tokenizer": {"kind": "char"}})
    parser = LineParser(config.input)
    for number, value in enumerate(lanl_lines(50) + [b"\xef\xbb\xbf86400,U1,U1,C1,C2,a,b,c,d\r\n"], 1):
        full, parts = parser.parse(value, number), parser.parse_fields(value, number)
        if isinstance(full, Malformed):
            assert parts == full
            continue
        text, time, fields = parts
        assert text == value.decode("utf-8").rstrip("\r\n")  # what the stage carries as raw
        assert (time, fields, parser.text_fields(fields)) == (full.time, full.fields, full.text_fields)


def test_csv_split_reads_lines_as_csv_reader():
    rnd = random.Random(7)
    pieces = [",", "a", " ", "\t", ";", "|", "'", "\\", "\u2028", "\x0b", "\x1c", "é", '"', "\r", "\n", "\0"]
    for _ in range(20_000):
        raw = "".join(rnd.choice(pieces) for _ in range(rnd.randrange(0, 14)))
        for delimiter in (",", "\t", ";", "|", " ", "'", "\\"):
            try:
                expected = list(csv.reader([raw], delimiter=delimiter, strict=True))
            except csv.Error as exc:
                with pytest.raises(csv.Error, match=re.escape(str(exc))):
                    _csv_rows(raw, delimiter)
            else:
                assert _csv_rows(raw, delimiter) == expected, (raw, delimiter)


def test_csv_split_keeps_the_field_size_limit():
    old = csv.field_size_limit(10)
    try:
        with pytest.raises(csv.Error, match="field larger than field limit"):
            _csv_rows("a" * 11, ",")
    finally:
        csv.field_size_limit(old)


def lanl_lines(n: int) -> list[bytes]:
    lines = [",".join(LANL_COLUMNS).encode() + b"\n"]
    for i in range(n):
        user, src = i * 7919 % 50, i * 104729 % 30
        lines.append(f"{86400 + i},U{user}@DOM1,U{user}@DOM1,C{src},C{i % 7},"
                     f"{'Kerberos' if i % 3 else 'NTLM'},Network,LogOn,Success\r\n".encode())
    # Quoted, broken, short, non-UTF-8, NUL, empty, a header in the middle, unicode.
    lines += [b'86500,"U1,x@DOM1",U1@DOM1,C1,C2,NTLM,Network,LogOn,Success\n',
              b'86501,"U1@DOM1,U1@DOM1,C1,C2,NTLM,Network,LogOn,Success\n',
              b"86502,U1@DOM1\n", b"86503,\xff\xfe,U1,C1,C2,a,b,c,d\n", b"86504,\x00\n", b"\n",
              ",".join(LANL_COLUMNS).upper().encode(),
              "86505,Ü1@DOM1,Ü1@DOM1,C1,C2,NTLM,Network,LogOn,Success".encode()]
    return lines


@pytest.mark.parametrize("kind", ["word", "char"])
def test_stage_sends_what_the_generic_path_sent(kind):
    """TokenizerStage.handle, record by record, against the path it replaced: parse, then
    event_to_record and the codec (token ids by the char tokenizer when it is fixed)."""
    config = config_from_dict({"tokenizer": {"kind": kind}})
    stage, out = TokenizerStage(config), RecordingOutput()
    stage.tokens_partitions = 2
    parser, tokenizer = LineParser(config.input), make_tokenizer(config)
    expected_events, expected_dead = [], 0
    messages = []
    for offset, value in enumerate(lanl_lines(300)):
        headers = [("other", b"1"), (LINE_HEADER, None), (LINE_HEADER, str(offset + 1).encode()),
                   (LINE_HEADER, b"999")]
        messages.append(FakeMessage("raw", 3, offset, value, key=b"k", headers=headers))
        result = parser.parse(value, offset + 1)
        if isinstance(result, Malformed):
            expected_dead += 1
            continue
        ids = encode_event(tokenizer, result.text_fields, config.tokenizer.max_tokens) \
            if kind == "char" else None
        raw = value.decode("utf-8").rstrip("\r\n")
        expected_events.append(generic(result, ("raw", 3, offset), raw, ids))
    messages.append(FakeMessage("raw", 3, len(messages), None,
                                headers=[(CONTROL_HEADER, END_OF_INPUT.encode())]))
    for msg in messages:
        stage.handle(msg, out)
    tokens = [s for s in out.sent if s.topic == config.topics.tokens]
    assert [s.value for s in tokens[:-1]] == expected_events
    assert all(s.partition == 1 and s.key == b"k" for s in tokens[:-1])
    assert tokens[-1].value is None and tokens[-1].headers == messages[-1].headers()
    assert len(out.dead_letters) == expected_dead >= 6
    assert stage.counts == {"events": len(expected_events), "dead_letters": expected_dead,
                            "control": 1}
    assert stage.safe_offsets()[0].offset == len(messages)
