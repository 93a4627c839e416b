"""The scorer's hand-written Avro (pipeline/scorewire.py) agrees with the codec path it replaced.

Reading: for every value, the stage's path (the reader, or the codec when the reader answers None)
gives the codec's Event and window, or refuses what the codec refuses. Writing: the same bytes as
``codec().encode("salka.ScoredEvent", score_to_record(...))``. Generated, hostile and mutated
values; no broker.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import random
import struct
import sys
from pathlib import Path
from types import MappingProxyType, SimpleNamespace

import numpy as np
import pytest
from stage_fakes import FakeMessage, RecordingOutput

from nn.tokenizers import encode_event
from pipeline import compiledbuild, scorewire
from pipeline.config import config_from_dict
from pipeline.generate import GenerateSpec, generate_events
from pipeline.modelspec import fixed_encoder, make_masker, make_tokenizer
from pipeline.modelstore import config_fingerprint
from pipeline.parsing import Event, LineParser, Malformed
from pipeline.score import Score
from pipeline.scorewire import ScoredEventWriter, WindowedEventReader
from pipeline.serde import MAGIC, DecodeError, EncodeError, avro_long, codec
from pipeline.stages import scorer
from pipeline.stages.scorer import ScorerStage
from pipeline.topicrecords import event_to_record, record_to_event, score_to_record
from pipeline.windowing import event_order

ROOT = Path(__file__).resolve().parent.parent
WINDOWED, SCORED = "salka.WindowedEvent", "salka.ScoredEvent"
PIECES = ["a", "Z", "0", ",", " ", "é", "\u4e2d", "\U0001f600", "\x00", "<", '"', "\\"]
REFUSED = "refused"


def builds() -> list:
    """The reader and writer classes of each build at hand: the Python source, and the same
    source compiled by mypyc at install (setup.py) when it was built."""
    found = [pytest.param(scorewire.PYTHON_CLASSES, id="python")]
    if scorewire.COMPILED:
        found.append(pytest.param((scorewire.WindowedEventReader, scorewire.ScoredEventWriter),
                                  id="compiled"))
    return found


def use_build(monkeypatch, module, classes) -> None:
    """Every test of ``module`` (and the scorer stage it drives) with these classes."""
    reader, writer = classes
    for where in (module, scorer):
        monkeypatch.setattr(where, "WindowedEventReader", reader)
        monkeypatch.setattr(where, "ScoredEventWriter", writer)


@pytest.fixture(autouse=True, params=builds())
def build(request, monkeypatch):
    use_build(monkeypatch, sys.modules[__name__], request.param)


def test_the_compiled_build_is_used_only_when_it_was_built_from_this_source(monkeypatch):
    """setup.py compiles this source; a build of another one (the module edited since) is not
    used, the Python module is."""
    if not scorewire.COMPILED:
        pytest.skip("pure Python install (no mypyc or C compiler at install, or SALKA_PURE_PYTHON)")
    from pipeline import _scorewire_c

    assert scorewire.WindowedEventReader is _scorewire_c.WindowedEventReader
    assert compiledbuild.compiled_scorewire() is _scorewire_c
    monkeypatch.setattr(_scorewire_c, "SOURCE_SHA256", "0" * 64)
    assert compiledbuild.compiled_scorewire() is None


def test_the_build_is_chosen_by_its_sources_and_the_environment(monkeypatch):
    """The compiled build is left out when SALKA_PURE_PYTHON is set, when only the generated
    source is there, and when the sources cannot be read; setup.py hashes the same files."""
    setup_py = ROOT / "setup.py"
    spec = importlib.util.spec_from_file_location("salka_setup", setup_py)
    pytest.importorskip("setuptools")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() runs only as __main__
    assert module.sources_sha256 is compiledbuild.sources_sha256  # one hash, not a copy
    assert module.sources_sha256(ROOT) == compiledbuild.sources_sha256()
    if not scorewire.COMPILED:
        pytest.skip("pure Python install (no mypyc or C compiler at install, or SALKA_PURE_PYTHON)")
    from pipeline import _scorewire_c

    assert compiledbuild.compiled_scorewire() is _scorewire_c
    with monkeypatch.context() as patch:
        patch.setenv("SALKA_PURE_PYTHON", "1")
        assert compiledbuild.compiled_scorewire() is None
    with monkeypatch.context() as patch:
        patch.setattr(_scorewire_c, "__file__", str(ROOT / "pipeline" / "_scorewire_c.py"))
        assert compiledbuild.compiled_scorewire() is None
    with monkeypatch.context() as patch:
        patch.setattr(compiledbuild, "__file__", "/nonexistent/pipeline/compiledbuild.py")
        assert compiledbuild.compiled_scorewire() is None
    assert compiledbuild.compiled_scorewire() is _scorewire_c


def outcome(write):
    """The bytes written, or the type of the error (its words may differ: the writer and the
    codec path read an Event's attributes in another order)."""
    try:
        return ("bytes", write())
    except Exception as exc:  # noqa: BLE001 (compared: the same error type, or the same bytes)
        return (type(exc).__name__, None)


def test_the_writer_judges_odd_values_as_the_codec_does():
    """Each value of a Score, its Event, ``late``: the writer's bytes or error are the codec
    path's, in both builds (compiled, a typed read would turn True into 1 or refuse None)."""
    config = config_from_dict({"input": {"entities": {"user": "src_user"}}})
    writer = ScoredEventWriter(config)
    event = Event(5, 1.5, {"src_user": "U1"}, (), None, ("raw", 1, 2), "line")
    odd_events = [{"line": v} for v in (True, None, 0.0, np.int64(5), 2**63)] + \
        [{"time": v} for v in (5, True, np.float32(1.5), math.nan)] + \
        [{"fields": v} for v in (None, [], {"src_user": 5})] + [{"raw": v} for v in (None, b"line")] + \
        [{"source": v} for v in (["raw", 1, 2], ("raw", True, 2), ("raw", 1), None)]
    scores = [Score(dataclasses.replace(event, **change), 1, 1.5, 2.5) for change in odd_events]
    scores += [Score(event, w, 1.5, 2.5) for w in (True, np.int64(1), 2**63, None)]
    scores += [Score(event, 1, v, 2.5) for v in (1, True, np.float32(1.5), None)]
    scores += [Score(event, 1, 1.5, 2.5, t) for t in ([], None)]
    scores.append(Score(None, 1, 1.5, 2.5))
    checked = 0
    for score in scores:
        for late in (False, True, 1, None, "x"):
            want = outcome(lambda s=score, x=late: codec().encode(SCORED, score_to_record(s, config, x)))
            assert outcome(lambda s=score, x=late: writer.write(s, x)) == want, (score, late)
            checked += want[0] == "bytes"
    assert checked >= 20  # control: many are written, not only refused


def test_both_builds_write_alike_for_odd_wires_and_entities():
    """What the codec path never sees (the reader's spans, the writer's config) is taken the
    same way by both builds: read by attribute and by mapping, whatever its type."""
    if not scorewire.COMPILED:
        pytest.skip("pure Python install (no mypyc or C compiler at install, or SALKA_PURE_PYTHON)")
    python, compiled = scorewire.PYTHON_CLASSES[1], scorewire.ScoredEventWriter
    config = config_from_dict({"input": {"entities": {"user": "src_user"}}})
    proxied = dataclasses.replace(config, input=dataclasses.replace(
        config.input, entities=MappingProxyType({"user": "src_user"})))
    event = Event(5, 1.5, {"src_user": "U1"}, (), None, ("raw", 1, 2), "line")
    _, _, wire = scorewire.PYTHON_CLASSES[0]([], None).read(value_of(1, event))
    duck = SimpleNamespace(head=wire.head, raw=wire.raw)
    outcomes = []
    for conf in (config, proxied):
        for spans in (None, wire, duck, ["a", "b"], False):
            got = [outcome(lambda w=w, c=conf, x=spans: w(c).write(Score(event, 1, 1.5, 2.5), False, x))
                   for w in (python, compiled)]
            assert got[0] == got[1], (conf.input.entities, spans)
            outcomes.append(got[0][0])
    assert outcomes.count("bytes") == 6  # None, the reader's spans and the duck, either config


def test_scorewire_type_checks_as_setup_py_compiles_it():
    """A type error would make setup.py fall back to pure Python without a word at install."""
    api = pytest.importorskip("mypy.api")
    out, err, status = api.run(["--ignore-missing-imports", "--follow-imports=silent",
                                "--no-incremental", str(Path(scorewire.__file__))])
    assert status == 0, out + err


def value_of(window: int, event: Event) -> bytes:
    return codec().encode(WINDOWED, {"window": window, "event": event_to_record(event)})


def codec_path(value: bytes, reader: WindowedEventReader):
    """What the scorer did before: the codec, then record_to_event."""
    try:
        _, record = codec().decode(value, expected=(WINDOWED,))
    except DecodeError:
        return REFUSED
    return record["window"], record_to_event(record["event"], list(reader.model_fields), reader.masker)


def stage_path(value: bytes, reader: WindowedEventReader):
    """What the scorer does now: the reader, the codec path when it is in doubt."""
    got = reader.read(value)
    return codec_path(value, reader) if got is None else got[:2]


def same(a, b) -> bool:
    """Equal results (window, Event); by repr, which compares NaN times and tells -0.0 apart.
    Token ids the reader gives as ``bytes`` (its ``encode``'s) count as the codec's tuple of
    the same ints."""
    return repr(with_tuple_ids(a)) == repr(with_tuple_ids(b))


def with_tuple_ids(result):
    if isinstance(result, tuple) and len(result) == 2 and type(result[1].token_ids) is bytes:
        return result[0], dataclasses.replace(result[1], token_ids=tuple(result[1].token_ids))
    return result


def text(rnd: random.Random) -> str:
    # Lengths around the one-byte length edge (63/64 bytes) and a few long ones.
    n = rnd.choice([0, 1, 5, 31, 32, 63, 64, 65, 300, 3000])
    return "".join(rnd.choice(PIECES) for _ in range(n))


def hostile_event(rnd: random.Random) -> Event:
    fields = {text(rnd): text(rnd) for _ in range(rnd.choice([0, 1, 2, 9]))}
    if rnd.random() < 0.1:  # a block count past one varint byte
        fields = {f"f{i}": f"v{i}" for i in range(70)}
    ids = rnd.choice([None, (), tuple(rnd.randrange(0, 300) for _ in range(rnd.randrange(1, 130))),
                      (0, 63, 64, 8191, 8192, 2**31 - 1, -1, -(2**31))])
    return Event(line=rnd.choice([0, 1, 63, 64, 8192, 2**40, 2**62 - 1, 2**63 - 1, -1, -(2**63)]),
                 time=rnd.choice([None, 0.0, -0.0, 1.5, 1.7e9, math.inf, -math.inf, math.nan]),
                 fields=fields, text_fields=(), token_ids=ids,
                 source=(rnd.choice(["raw", "t\u00e9.raw", ""]), rnd.choice([0, 7, 2**31 - 1, -1, -(2**31)]),
                         rnd.choice([0, 1, 2**40, 2**63 - 1])),
                 raw=text(rnd))


def generated_events(kind: str, n: int = 300) -> list[Event]:
    """LANL-like lines of pipeline/generate.py as the tokenizer makes them (char: with ids)."""
    config = config_from_dict({"tokenizer": {"kind": kind}})
    parser, tokenizer = LineParser(config.input), make_tokenizer(config)
    events = []
    rows = generate_events(GenerateSpec(days=1, events_per_day=max(n, 50) * 2, seed=5))[:n]
    assert len(rows) == n
    for i, (row, _) in enumerate(rows):
        raw = ",".join(row)
        event = parser.parse(raw, i + 2)
        assert not isinstance(event, Malformed)
        ids = encode_event(tokenizer, event.text_fields, 120) if kind == "char" else None
        events.append(dataclasses.replace(event, source=("raw", i % 3, 10**9 + i), raw=raw,
                                          token_ids=None if ids is None else tuple(ids)))
    return events


def readers() -> list[WindowedEventReader]:
    """Word (no ids to expect), masked, odd model fields; the last two the scorer's for char
    configs: they take the ids their tokenizer gives the text fields as ``bytes``."""
    config = config_from_dict({"tokenizer": {"kind": "word"}})
    masked = config_from_dict({"tokenizer": {"kind": "word", "mask": {"enabled": True}}})
    fields = LineParser(config.input).model_fields
    return [WindowedEventReader(fields, None), WindowedEventReader(fields, make_masker(masked)),
            WindowedEventReader(["user", "no such field"], None), WindowedEventReader([], None),
            char_reader(), char_reader(masked=True)]


def char_reader(masked: bool = False) -> WindowedEventReader:
    config = config_from_dict({"tokenizer": {"kind": "char", "mask": {"enabled": masked}}})
    return WindowedEventReader(LineParser(config.input).model_fields, make_masker(config),
                               fixed_encoder(config))


def test_reader_and_writer_are_on_for_the_current_schemas():
    # Off (every record through the codec) only when schemas/ changed a record: then update
    # pipeline/scorewire.py (READS / WRITES and the code) to the new schema.
    assert WindowedEventReader([], None).fast
    assert ScoredEventWriter(config_from_dict({})).fast


@pytest.mark.parametrize("kind", ["word", "char"])
def test_reader_gives_the_codec_events_of_generated_lines(kind):
    for reader in readers():
        for i, event in enumerate(generated_events(kind)):
            value = value_of(i % 5, event)
            got = reader.read(value)
            assert got is not None, "a canonical value must take the fast path"
            assert same(got[:2], codec_path(value, reader))


def test_char_reader_takes_its_tokenizers_ids_as_bytes_and_walks_any_others():
    """The tokenizer stage's ids of the text fields come back as its ``bytes``; ids that are
    not those (another tokenizer config, a foreign writer) are read one by one as before."""
    reader = char_reader()
    for event in generated_events("char", 60):
        value = value_of(1, event)
        got = reader.read(value)
        assert type(got[1].token_ids) is bytes and same(got[:2], codec_path(value, reader))
        ids = event.token_ids
        for other_ids in [ids[:-2] + ids[-1:], ids[:1] + (300,) + ids[1:], ids[::-1], ()]:
            other = value_of(1, dataclasses.replace(event, token_ids=other_ids))
            got = reader.read(other)
            assert got[1].token_ids == other_ids and same(got[:2], codec_path(other, reader))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("reader", [0, -1])
def test_reader_gives_the_codec_events_of_hostile_values(seed, reader):
    rnd = random.Random(seed)
    reader = readers()[reader]
    for _ in range(300):
        event = hostile_event(rnd)
        window = rnd.choice([0, 1, 2**40, -5, 2**62 - 1, 2**63 - 1])
        value = value_of(window, event)
        expected = codec_path(value, reader)
        got = reader.read(value)
        if all(-(2**62) <= n < 2**62 for n in (window, event.line, event.source[2])):
            assert got is not None  # longer varints than 9 bytes: the codec's

        assert same(got[:2] if got is not None else codec_path(value, reader), expected)


def mutations(rnd: random.Random, value: bytes) -> list[bytes]:
    cut = rnd.randrange(len(value))
    at = rnd.randrange(10, len(value))
    flipped = bytearray(value)
    flipped[at] ^= 1 << rnd.randrange(8)
    invalid = bytearray(value)
    invalid[rnd.randrange(10, len(value))] = rnd.choice([0x80, 0xC3, 0xED, 0xF8, 0xFF])
    return [value[:cut], value[:-1], value + b"\x00", value + b"x", bytes(flipped), bytes(invalid),
            value[:at] + value[at + 1:], value[:at] + bytes([rnd.randrange(256)]) + value[at:],
            MAGIC + codec().fingerprints["salka.LateEvent"] + value[10:], b"", value[:10]]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("reader", [1, -2])
def test_mutated_values_are_refused_or_read_as_the_codec_reads_them(seed, reader):
    """Truncated, flipped, appended, cut, bad UTF-8: the stage path refuses what the codec
    refuses and reads the rest as the codec does; the reader never accepts a value the codec
    refuses."""
    rnd = random.Random(seed)
    reader = readers()[reader]
    events = generated_events("char", 40) + [hostile_event(rnd) for _ in range(40)]
    taken = refused = 0
    for event in events:
        for value in mutations(rnd, value_of(rnd.choice([0, 3, 2**33]), event)):
            expected = codec_path(value, reader)
            got = reader.read(value)
            if expected == REFUSED:
                assert got is None, value
                refused += 1
            elif got is not None:
                assert same(got[:2], expected)
                taken += 1
    assert taken > 50 and refused > 200  # both sides of the fuzz were exercised


def canonical_parts(window: int, event: Event) -> list[bytes]:
    """The WindowedEvent body's varints and strings, each its own part (to make overlong)."""
    topic, partition, offset = event.source
    parts = [avro_long(window), avro_long(len(topic.encode())), topic.encode(), avro_long(partition),
             avro_long(offset), b"\x02" + avro_long(event.line), b"\x02" + struct.pack("<d", event.time),
             avro_long(len(event.fields))]
    for name, value in event.fields.items():
        parts += [avro_long(len(name.encode())), name.encode(), avro_long(len(value.encode())),
                  value.encode()]
    parts += [b"\x00", b"\x02", avro_long(len(event.token_ids))]
    parts += [avro_long(i) for i in event.token_ids] + [b"\x00"]
    parts += [avro_long(len(event.raw.encode())), event.raw.encode()]
    return parts


def overlong(varint: bytes, extra: int) -> bytes:
    """The same number with ``extra`` redundant zero groups (valid Avro, not canonical)."""
    return varint[:-1] + bytes([varint[-1] | 0x80]) + b"\x80" * (extra - 1) + b"\x00"


def test_non_canonical_and_oversized_varints_read_and_score_as_through_the_codec():
    """A varint with redundant groups decodes to the same number in the codec; the reader leaves
    it to the codec (its spans would not be canonical), and what is written is the codec's
    bytes. Block counts in two blocks, and varints past 9 bytes, too."""
    config = config_from_dict({})
    reader = WindowedEventReader(LineParser(config.input).model_fields, None)
    writer = ScoredEventWriter(config)
    event = Event(line=70, time=1.5, fields={"src_user": "U1", "success": "é"}, text_fields=(),
                  token_ids=(1, 300, 2), source=("raw", 3, 5000), raw="line")
    parts = canonical_parts(2, event)
    header = MAGIC + codec().fingerprints[WINDOWED]
    assert reader.read(header + b"".join(parts)) is not None
    variants = []
    # window, topic length, partition, offset, line, block count, name and value lengths, end of
    # block, token_ids branch, id count, ids, end, raw length (a varint ends each part)
    for i in (0, 1, 3, 4, 5, 7, 8, 10, 12, 14, 16, 17, 18, 19, 20, 21, 22, 23):
        for extra in (1, 3, 9):
            variants.append(parts[:i] + [overlong(parts[i], extra)] + parts[i + 1:])
    # the fields in two blocks of one; in a block with its byte size (a negative count)
    variants.append(parts[:7] + [avro_long(1)] + parts[8:12] + [avro_long(1)] + parts[12:])
    size = len(b"".join(parts[8:16]))
    variants.append(parts[:7] + [avro_long(-2), avro_long(size)] + parts[8:])
    # negative lengths and counts, Avro ints out of range (the codec's range check refuses)
    for i, bad in [(1, -1), (8, -1), (10, -3), (18, -1), (23, -1), (3, 2**31), (3, -(2**31) - 1),
                   (19, 2**31), (20, -(2**31) - 1), (7, -1)]:
        variants.append(parts[:i] + [avro_long(bad)] + parts[i + 1:])
    # line 0 as a long, not null: the same Event, and a score with a null line
    variants.append(parts[:5] + [b"\x02\x00"] + parts[6:])
    # a one-byte negative length (-1) where an empty string's 0 was
    empty = canonical_parts(2, dataclasses.replace(event, fields={"": "v", "a": ""}))
    for i in (8, 14):
        variants.append(empty[:i] + [b"\x01"] + empty[i + 1:])
    checked = 0
    for variant in variants:
        value = header + b"".join(variant)
        expected = codec_path(value, reader)
        got = stage_path(value, reader)
        assert same(got, expected)
        if expected == REFUSED:
            continue
        checked += 1
        read = reader.read(value)
        score = Score(got[1], got[0], 1.25, 3.5)
        assert writer.write(score, False, read[2] if read else None) == \
            codec().encode(SCORED, score_to_record(score, config, False))
    assert checked > 20


def scores_of(event: Event, window: int) -> list[Score]:
    return [Score(event, window, loss, total)
            for loss, total in [(None, None), (1.5, 12.0), (math.nan, math.nan), (math.inf, -math.inf),
                                (-0.0, 0.0), (5e-324, -1e308)] + [
                (struct.unpack("<d", bits)[0], 1.0)  # NaNs with a payload: quiet and signalling
                for bits in (b"\x01\x00\x00\x00\x00\x00\xf8\x7f", b"\x01\x00\x00\x00\x00\x00\xf0\x7f")]]


@pytest.mark.parametrize("entities", [None, {}, {"user": "src_user", "é\u4e2d": "success"}])
def test_writer_bytes_equal_the_codec(entities):
    config = config_from_dict({} if entities is None else {"input": {"entities": entities}})
    reader = WindowedEventReader(LineParser(config.input).model_fields, None)
    writer = ScoredEventWriter(config)
    rnd = random.Random(11)
    events = generated_events("word", 60) + generated_events("char", 20)
    events += [hostile_event(rnd) for _ in range(120)]
    for i, event in enumerate(events):
        value = value_of(i, event)
        read = reader.read(value)
        for score in scores_of(event if read is None else read[1], i):
            for late in (False, True):
                expected = codec().encode(SCORED, score_to_record(score, config, late))
                assert writer.write(score, late, None) == expected
                if read is not None:
                    assert writer.write(score, late, read[2]) == expected


def test_explained_scores_and_odd_values_go_through_the_codec():
    config = config_from_dict({"scores": {"explain": True}})
    writer = ScoredEventWriter(config)
    event = generated_events("word", 1)[0]
    explained = Score(event, 1, 1.5, 3.0, (0.5, 1.0), ("a", "</s>"))
    assert writer.write(explained, True) == codec().encode(SCORED, score_to_record(explained, config, True))
    for odd in [Score(event, 1, 2, 3),
                Score(dataclasses.replace(event, time=7), 1, None, None)]:
        assert writer.write(odd) == codec().encode(SCORED, score_to_record(odd, config))
    for bad in [Score(event, 2**63, None, None), Score(event, 1, True, None)]:
        with pytest.raises(EncodeError) as got:  # the codec's own error for what fits no schema
            writer.write(bad)
        with pytest.raises(EncodeError) as want:
            codec().encode(SCORED, score_to_record(bad, config))
        assert str(got.value) == str(want.value)


def test_scorer_stage_sends_what_the_codec_path_sent():
    """ScorerStage.handle + tick over fake messages (events, late events, completions, garbage)
    against the path it replaced: the codec, record_to_event, score_to_record, the codec."""
    config = config_from_dict({"tokenizer": {"kind": "char"}})
    stage, out = ScorerStage(config), RecordingOutput()
    stage.index.add({"trained_through": None, "serves_through": 10, "url": None, "sha256": None,
                     "fingerprint": config_fingerprint(config), "time_ms": 0})
    late_event = generated_events("char", 3)[2]
    late_value = codec().encode("salka.LateEvent", {"window": 1, "watermark": 5.0, "lateness_seconds": 1.0,
                                                     "event": event_to_record(late_event)})
    values = [value_of(i % 2, e) for i, e in enumerate(generated_events("char", 30))]
    values += [late_value, values[3][:-2], b"junk", values[4] + b"\x00",
               codec().encode("salka.WindowComplete", {"window": 0, "count": 15, "watermark": None,
                                                       "stage": "windower"})]
    for offset, value in enumerate(values):
        stage.handle(FakeMessage(config.topics.windows, 0, offset, value), out)
    stage.tick(out)
    expected = []
    fields = LineParser(config.input).model_fields
    for value in values:
        try:
            name, record = codec().decode(value)
        except DecodeError:
            continue
        if name != "salka.WindowComplete":
            expected.append((record["window"], name == "salka.LateEvent",
                             record_to_event(record["event"], fields)))
    expected.sort(key=lambda x: (x[0], x[1], event_order(x[2])))
    sent = [s.value for s in out.sent if s.topic == config.topics.scores]
    assert sent == [codec().encode(SCORED, score_to_record(Score(e, w, None, None), config, late))
                    for w, late, e in expected]
    assert stage.counts["dead_letters"] == 3 and stage.counts["late"] == 1
    assert stage.counts["scored"] == 31
