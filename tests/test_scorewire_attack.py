"""Hostile WindowedEvent values against the scorer's hand-written Avro (pipeline/scorewire.py).

An attacker who can write bytes to the windows topic (or controls a log source) must not get
the fast reader to accept what the codec refuses, to read something else than the codec reads,
to hang or to raise; and what the writer sends for what it accepted must be the codec's bytes.
Every value here is built by hand, byte by byte; no broker.
"""

from __future__ import annotations

import struct
import sys
import time
import tracemalloc

import pytest
from test_scorewire import REFUSED, builds, codec_path, use_build

from pipeline.config import config_from_dict
from pipeline.modelspec import make_masker
from pipeline.parsing import LineParser
from pipeline.score import Score
from pipeline.scorewire import ScoredEventWriter, WindowedEventReader
from pipeline.serde import MAGIC, avro_long, codec
from pipeline.topicrecords import record_to_event, score_to_record

WINDOWED, SCORED = "salka.WindowedEvent", "salka.ScoredEvent"
CONFIG = config_from_dict({"tokenizer": {"kind": "word", "mask": {"enabled": True}},
                           "input": {"entities": {"user": "src_user", "ok": "success"}}})
FIELDS = LineParser(CONFIG.input).model_fields


@pytest.fixture(autouse=True, params=builds())
def build(request, monkeypatch):
    use_build(monkeypatch, sys.modules[__name__], request.param)


def reader() -> WindowedEventReader:
    return WindowedEventReader(FIELDS, make_masker(CONFIG))


def string(data: bytes) -> bytes:
    return avro_long(len(data)) + data


def value(fields: list[tuple[bytes, bytes]] | bytes, *, window: bytes = b"\x04", topic: bytes = b"raw",
          partition: bytes = b"\x06", offset: bytes = b"\x0a", line: bytes = b"\x02\x0e",
          time_: bytes = b"\x00", ids: bytes = b"\x00", raw: bytes = b"a line") -> bytes:
    """A WindowedEvent value from its parts' bytes (``fields``: (name, value) pairs in one
    block, or the array's encoding as it is)."""
    if isinstance(fields, list):
        fields = (avro_long(len(fields)) + b"".join(string(k) + string(v) for k, v in fields) + b"\x00"
                  if fields else b"\x00")
    return (MAGIC + codec().fingerprints[WINDOWED] + window + string(topic) + partition + offset
            + line + time_ + fields + ids + string(raw))


def check(data: bytes, fast: bool | None = None) -> None:
    """The reader answers None or the codec path's (window, Event); what it accepted is written
    as the codec writes the same Score. ``fast``: whether the reader must (or must not) take it."""
    r = reader()
    expected = codec_path(data, r)
    got = r.read(data)
    if fast is not None:
        assert (got is not None) == fast, data.hex()
    if got is None:
        return
    assert expected != REFUSED, f"the reader accepted what the codec refuses: {data.hex()}"
    assert repr(got[:2]) == repr(expected)  # repr: NaN times and -0.0 compared too
    writer = ScoredEventWriter(CONFIG)
    for loss in (None, 2.5):
        for late in (False, True):
            score = Score(got[1], got[0], loss, loss)
            want = codec().encode(SCORED, score_to_record(score, CONFIG, late))
            assert writer.write(score, late, got[2]) == want
            assert writer.write(score, late, None) == want
            assert repr(codec().decode(want)[1]) == repr(score_to_record(score, CONFIG, late))


@pytest.mark.parametrize("bad", [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80"])
def test_a_repeated_field_name_does_not_hide_a_bad_value_from_the_codec(bad):
    """Found by fuzzing: a name given twice, its first value invalid UTF-8. The codec decodes
    every value and refuses the record; the reader's dict kept only the second value, so its
    UTF-8 check never saw the first, and it read a record the codec refuses."""
    for fields in ([(b"", bad), (b"", b"\xc3\xa9")], [(b"src_user", bad + b"x"), (b"src_user", b"U1")],
                   [(b"k", bad), (b"k", b"v"), (b"\xc3\xa9", b"")]):
        data = value(fields)
        assert codec_path(data, reader()) == REFUSED
        check(data)


def test_repeated_valid_names_read_as_the_codec_reads_them():
    # The last value wins, at the first name's place: the codec's dict comprehension
    for fields in ([(b"src_user", b"U1"), (b"success", b"x"), (b"src_user", b"\xc3\xa9")],
                   [(b"", b"a"), (b"", b"")],
                   [(b"\xe4\xb8\xad", b"1"), (b"\xe4\xb8\xad", b"\xf0\x9f\x98\x80")]):
        check(value(fields))


def test_strings_the_codec_refuses_are_refused_wherever_they_are():
    """Surrogates, overlong forms, past U+10FFFF, truncated sequences, lone continuation bytes:
    in the topic, a name, a value, the raw line; ASCII and non-ASCII neighbours."""
    bads = [b"\xed\xa0\x80", b"\xed\xbf\xbf\xed\xb0\x80", b"\xc0\x80", b"\xe0\x80\x80", b"\xf0\x80\x80\x80",
            b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xc3", b"\xe2\x82", b"\x80", b"\xff", b"\xfe"]
    for bad in bads:
        for around in (b"", b"a", b"\xc3\xa9"):
            s = around + bad + around
            for data in (value([(s, b"v")]), value([(b"src_user", s)]), value([], raw=s), value([], topic=s),
                         value([(b"a", b"\xc3\xa9"), (b"b", s)]), value([(b"a", b"b")], raw=b"\xc3\xa9" + s)):
                assert codec_path(data, reader()) == REFUSED
                check(data, fast=False)
    # and the valid neighbours of those: noncharacters, the last code point, NUL
    goods = [b"\xef\xbf\xbe", b"\xef\xbf\xbf", b"\xf4\x8f\xbf\xbf", b"\x00", b"\xed\x9f\xbf", b"\xee\x80\x80"]
    for good in goods:
        check(value([(good, good)], raw=good, topic=good), fast=True)


def test_block_encodings_the_reader_leaves_to_the_codec():
    pair = string(b"src_user") + string(b"U1")
    other = string(b"success") + string(b"\xc3\xa9")
    size = len(pair + other)
    for fields, fast in [
        (b"\x02" + pair + b"\x02" + other + b"\x00", True),  # two blocks of one
        (b"\x00", True),  # empty
        (b"\x03" + avro_long(size) + pair + other + b"\x00", False),  # a negative count and its size
        (b"\x03" + avro_long(size + 1) + pair + other + b"\x00", False),  # with a wrong size
        (b"\x01" + avro_long(0) + b"\x00", False),  # -1 items with size 0
        (b"\x80\x00", False),  # an empty array as a 2-byte zero count
        (b"\x04" + pair + b"\x00", False),  # a count past what follows
        (b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f" + pair, False),  # 2**62 - 1 items, 1 there: EOF
        (b"\xfe\xff\xff\xff\xff\xff\xff\xff\xff\x01" + pair, False),  # a 10-byte count
    ]:
        check(value(fields), fast=fast)
    for ids, fast in [
        (b"\x02\x02\x02\x02\x04\x00", True),  # [1] then [2]
        (b"\x02\x00", True),  # an empty array
        (b"\x02\x03\x02\x7e\x00", False),  # a negative count with its size
        (b"\x02\x04\x02\x00", False),  # one id short
        (b"\x02\x02\x80\x80\x80\x80\x10\x00", False),  # 2**31: no Avro int
        (b"\x02\x02\xff\xff\xff\xff\x0f\x00", True),  # -(2**31)
        (b"\x02\x02\xfe\xff\xff\xff\x0f\x00", True),  # 2**31 - 1
        (b"\x02\x02\x80\x01\x00", True),  # 64: a two-byte id
        (b"\x02\x02\x80\x00\x00", False),  # 0 in two bytes
        (b"\x02\xfe\xff\xff\xff\xff\xff\xff\xff\x7f\x02", False),  # 2**62 - 1 ids announced
        (b"\x04", False),  # no such union branch
        (b"\x01", False),  # a negative branch
    ]:
        check(value([], ids=ids), fast=fast)


def test_huge_counts_and_long_varints_end_quickly():
    """Counts of 2**62 and runs of continuation bytes: the reader answers at once (no loop per
    announced item past the bytes there are), and never raises."""
    r = reader()
    huge = b"\xfe\xff\xff\xff\xff\xff\xff\xff\x7f"
    values = [value(huge + b"\x00\x00" * 1000), value([], ids=b"\x02" + huge + b"\x02" * 10_000),
              value([], window=b"\xff" * 100_000), value([], raw=b"x", offset=b"\x80" * 50_000 + b"\x01"),
              value(b"\x02" + b"\xff" * 100_000), value([], time_=b"\x02\x00"),
              MAGIC + codec().fingerprints[WINDOWED], MAGIC + codec().fingerprints[WINDOWED] + b"\x00"]
    clock = time.perf_counter()
    for data in values:
        assert r.read(data) is None
    assert time.perf_counter() - clock < 1.0
    for data in (bytearray(value([])), memoryview(value([])), None, "text", 5):
        assert r.read(data) is None  # not bytes: the codec's to take or refuse


def test_ints_at_their_edges():
    edge = [0, 1, -1, 63, -64, 64, -65, 2**31 - 1, -(2**31), 2**31, -(2**31) - 1, 2**62 - 1, -(2**62),
            2**62, -(2**62) - 1, 2**63 - 1, -(2**63)]
    for n in edge:
        fits_9 = -(2**62) <= n < 2**62
        check(value([], window=avro_long(n)), fast=fits_9)
        check(value([], offset=avro_long(n)), fast=fits_9)
        check(value([], partition=avro_long(n)), fast=-(2**31) <= n < 2**31)
        check(value([], line=b"\x02" + avro_long(n)), fast=fits_9 and n != 0)
        check(value([], ids=b"\x02\x02" + avro_long(n) + b"\x00"), fast=-(2**31) <= n < 2**31)
    check(value([], line=b"\x00"), fast=True)  # null: line 0, written null
    check(value([], topic=b""), fast=True)  # an empty topic name
    check(value([], topic=b"t" * 300), fast=True)  # a name longer than Kafka's, not cached
    check(value([], line=b"\x02\x00"), fast=False)  # a line 0 the score writes null: the codec's


def test_event_times_bit_for_bit():
    """NaNs with payloads (quiet, signalling, negative), -0.0, infinities, subnormals: the time
    read is the codec's, and the score written carries the codec's bytes."""
    for bits in [b"\x01\x00\x00\x00\x00\x00\xf0\x7f", b"\x01\x00\x00\x00\x00\x00\xf8\x7f",
                 b"\x00\x00\x00\x00\x00\x00\xf8\xff", b"\xff\xff\xff\xff\xff\xff\xff\xff",
                 b"\x00\x00\x00\x00\x00\x00\x00\x80", b"\x00\x00\x00\x00\x00\x00\xf0\x7f",
                 b"\x01\x00\x00\x00\x00\x00\x00\x00", b"\xff\xff\xff\xff\xff\xff\xef\x7f"]:
        data = value([(b"src_user", b"U1")], time_=b"\x02" + bits)
        check(data, fast=True)
        got = reader().read(data)
        assert struct.pack("<d", got[1].time) == bits
        score = Score(got[1], got[0], None, None)
        sent = ScoredEventWriter(CONFIG).write(score, False, got[2])
        assert bits in sent and sent == codec().encode(SCORED, score_to_record(score, CONFIG))


def test_names_equal_to_entity_and_model_fields_and_masked_values():
    """Names that are entity fields or model fields, values the tokenizer's masker rewrites:
    the entities written and the model text read are the codec path's."""
    fields = [(b"src_user", b"U1@DOM1"), (b"success", b"10.0.0.1"), (b"dst_user", b"0x1f3a 12345"),
              (b"auth_type", b"e 2024-01-01T00:00:00Z"), (b"src_user", b"U2@DOM1")]
    check(value(fields), fast=True)
    # non-ASCII: fast without a repeated name, the codec's with one (a value it must decode)
    check(value(fields[:3] + [(b"auth_type", b"\xc3\xa9 2024-01-01T00:00:00Z")]), fast=True)
    check(value(fields[:3] + [(b"auth_type", b"\xc3\xa9 2024-01-01T00:00:00Z")] + fields[-1:]), fast=False)
    got = reader().read(value(fields))
    masked = reader().masker.mask_fields((("src_user", "U2@DOM1"),))
    assert dict(got[1].text_fields)["src_user"] == masked[0][1]


def test_trailing_and_missing_bytes_are_refused():
    base = value([(b"a", b"b")], raw=b"\xc3\xa9")
    for data in (base + b"\x00", base + b"x", base[:-1], base[:-3], base[:11]):
        assert codec_path(data, reader()) == REFUSED
        check(data, fast=False)


def test_hostile_topic_names_do_not_pile_up_in_memory():
    """The reader keeps a topic's name per name it met, for the next event of that topic. A
    stream of values each with its own long topic name (the windows topic is writable by
    whoever writes it) must not grow the stage's memory by the names' size: Kafka topic names
    are at most 249 characters."""
    r = reader()
    w = ScoredEventWriter(CONFIG)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40):
            name = b"%05d" % i + b"t" * 200_000
            got = r.read(value([], topic=name))
            assert got is not None and got[1].source[0] == name.decode()
            w.write(Score(got[1], got[0], None, None), False, None)  # the writer's own cache
            del got
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 1_000_000, f"{kept} bytes kept after 40 values of 200 kB topic names"


def test_scorer_stage_dead_letters_a_repeated_name_hiding_bad_utf8():
    """Through ScorerStage.handle + tick: the hostile value goes to the dead letters with the
    codec's reason, as before scorewire; the good one is scored with the codec's bytes."""
    from stage_fakes import FakeMessage, RecordingOutput

    from pipeline.modelstore import config_fingerprint
    from pipeline.stages.scorer import ScorerStage

    config = config_from_dict({"tokenizer": {"kind": "word"}})
    stage, out = ScorerStage(config), RecordingOutput()
    stage.index.add({"trained_through": None, "serves_through": 10, "url": None, "sha256": None,
                     "fingerprint": config_fingerprint(config), "time_ms": 0})
    good = value([(b"src_user", b"\xc3\xa9"), (b"success", b"ok")])
    hostile = value([(b"src_user", b"\xed\xa0\x80"), (b"src_user", b"\xc3\xa9")])
    for offset, data in enumerate((good, hostile)):
        stage.handle(FakeMessage(config.topics.windows, 0, offset, data), out)
    stage.tick(out)
    sent = [s.value for s in out.sent if s.topic == config.topics.scores]
    _, record = codec().decode(good)
    event = record_to_event(record["event"], LineParser(config.input).model_fields)
    assert sent == [codec().encode(SCORED, score_to_record(Score(event, 2, None, None), config))]
    assert stage.counts["dead_letters"] == 1
