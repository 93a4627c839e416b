"""The scorer's per-event Avro work done by hand: salka.WindowedEvent values read straight into
Events, salka.ScoredEvent values written straight from Scores.

The generic path (``codec().decode`` + ``record_to_event`` in, ``score_to_record`` +
``codec().encode`` out) built and walked a dict per record and per field and cost about as much
per event as the torch forward pass of a small model. Both records have a fixed shape, so they
are read and written here in a few us, with the same results as the codec
(tests/test_scorewire.py compares them on generated, hostile and mutated values).

The reader takes only what it reads by construction: a WindowedEvent value that is canonical
Avro (what salka's writers write), whole, with in-range ints and valid UTF-8. On any doubt
(truncation, trailing bytes, another schema, a negative length or block count, a varint with
redundant groups or past 9 bytes, a non-null line 0, bad UTF-8, ...) it answers None and the
caller takes the codec path, so a bad record fails with the codec's own DecodeError and message,
and an odd but valid one gets the codec's result. It keeps two spans of the value for the
writer: the event's source, line and event_time, which start a ScoredEvent body in the same
encoding, and its raw string, which is a ScoredEvent field too; the writer copies them instead
of encoding them again.

If schemas/ changes either record, this module turns itself off (every record through the
codec) rather than read or write stale bytes.

setup.py also compiles this module with mypyc (as ``pipeline._scorewire_c``), which then takes
the place of the classes below when it was built from the very files in COMPILED_FROM
(pipeline/compiledbuild.py; the end of this module). So it must type-check, and what the caller
hands in (a Score, ``late``, a wire, the config's entities, the masker's result) is read through
``Any`` and checked here: compiled, a read through a declared type is converted or refused by
mypyc on its own terms.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from fastavro.schema import to_parsing_canonical_form

from nn.masking import Masker
from nn.tokenizers import Fields
from pipeline.compiledbuild import compiled_scorewire
from pipeline.config import Config
from pipeline.parsing import Event
from pipeline.score import Score
from pipeline.serde import MAGIC, codec
from pipeline.tokenwire import (
    INT_MAX,
    INT_MIN,
    LONG_MAX,
    LONG_MIN,
    NULL,
    SECOND,
    avro_string,
    int_array,
    long_bytes,
    pack_double,
)
from pipeline.topicrecords import score_to_record

log = logging.getLogger("pipeline.scorewire")  # the compiled build's too

WINDOWED, SCORED = "salka.WindowedEvent", "salka.ScoredEvent"
# The canonical forms this module was written for; another one turns its side off.
_SOURCE = ('{"name":"source","type":{"name":"salka.SourceRef","type":"record","fields":[{"name":'
           '"topic","type":"string"},{"name":"partition","type":"int"},{"name":"offset","type":'
           '"long"}]}},{"name":"line","type":["null","long"]},{"name":"event_time","type":'
           '["null","double"]}')
READS = (
    '{"name":"salka.WindowedEvent","type":"record","fields":[{"name":"window","type":"long"},'
    '{"name":"event","type":{"name":"salka.TokenizedEvent","type":"record","fields":['
    + _SOURCE + ',{"name":"fields","type":{"type":"array","items":{"name":"salka.Field","type":'
    '"record","fields":[{"name":"name","type":"string"},{"name":"value","type":"string"}]}}},'
    '{"name":"token_ids","type":["null",{"type":"array","items":"int"}]},{"name":"raw","type":'
    '"string"}]}}]}'
)
WRITES = (
    '{"name":"salka.ScoredEvent","type":"record","fields":[' + _SOURCE
    + ',{"name":"window","type":"long"},{"name":"entities","type":{"type":"map","values":'
    '"string"}},{"name":"loss","type":["null","double"]},{"name":"loss_total","type":["null",'
    '"double"]},{"name":"raw","type":"string"},{"name":"tokens","type":["null",{"type":"array",'
    '"items":"string"}]},{"name":"token_losses","type":["null",{"type":"array","items":"float"}]},'
    '{"name":"late","type":"boolean"}]}'
)
# Varints of at most 9 bytes hold 63 bits of zig-zag: every value fits an Avro long, and nothing
# salka writes (windows, offsets, lines, lengths) comes near. Longer ones go to the codec.
_MAX_VARINT = 9
_unpack_double = struct.Struct("<d").unpack_from
_NULLS_TRUE, _NULLS_FALSE = NULL + NULL + b"\x01", NULL + NULL + b"\x00"
# Topic names cached at most this long (Kafka's limit is 249): a hostile value's megabyte name
# is not kept, 1024 of them would hold gigabytes for the stage's life
_TOPIC_MAX = 255


class Wire(NamedTuple):
    """Spans of a WindowedEvent value that a ScoredEvent body repeats byte for byte."""

    head: bytes  # source, line, event_time: the TokenizedEvent body's start
    raw: bytes  # the raw string, its length included


class _Doubt(Exception):
    """Something the fast reader does not take by construction: the codec decides."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """(zig-zag decoded value, next position) of a canonical varint of at most 9 bytes."""
    shift = value = 0
    start = pos
    while True:
        byte = data[pos]  # IndexError past the end: the caller's doubt
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if pos - start >= _MAX_VARINT:
            raise _Doubt
    if byte == 0 and pos - start > 1:  # a redundant zero group: valid Avro, not canonical
        raise _Doubt
    return (value >> 1) ^ -(value & 1), pos


def _length(data: bytes, pos: int) -> tuple[int, int]:
    """A string length or a block count (>= 0); a negative one (an array block with its byte
    size, or an invalid length) is the codec's to read or refuse."""
    byte = data[pos]
    if byte < 0x80 and not byte & 1:  # one byte, non-negative: nearly every length
        return byte >> 1, pos + 1
    n, pos = _varint(data, pos)
    if n < 0:
        raise _Doubt
    return n, pos


def _ids(data: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    """An int array's items (canonical blocks of positive counts), and the position after it."""
    ids: list[int] = []
    append = ids.append
    count, pos = _length(data, pos)
    while count:
        for _ in range(count):
            byte = data[pos]
            if byte < 0x80:
                append((byte >> 1) ^ -(byte & 1))
                pos += 1
            else:
                value, pos = _varint(data, pos)
                if not INT_MIN <= value <= INT_MAX:  # the codec's range check refuses it
                    raise _Doubt
                append(value)
        count, pos = _length(data, pos)
    return tuple(ids), pos


class WindowedEventReader:
    """``read(value)`` -> (window, Event, Wire) for a WindowedEvent value it reads by
    construction, the Event as ``record_to_event(record["event"], model_fields, masker)`` gives
    it (its token ids as ``bytes`` where ``encode`` gave them, else a tuple); None for anything
    else (the caller decodes it with the codec)."""

    def __init__(self, model_fields: Sequence[str], masker: Masker | None,
                 encode: Callable[[Fields], Sequence[int]] | None = None) -> None:
        self.header = MAGIC + codec().fingerprints[WINDOWED]
        self.fast = to_parsing_canonical_form(codec().schemas[WINDOWED]) == READS
        if not self.fast:
            log.warning("schemas/%s.avsc changed: pipeline/scorewire.py no longer matches it; "
                        "decoding through the generic codec (slower) until it is updated", WINDOWED)
        self.model_fields = tuple(model_fields)
        self.blanks = ("",) * len(self.model_fields)  # fields.get's default, one per model field
        self.masker = masker
        # The fixed tokenizer's BOS..EOS ids of an event's text fields (nn.tokenizers.encode_event,
        # as the tokenizer stage calls it), or None: a record carrying exactly the ``bytes`` it
        # gives is read with those ids, the same ints as the codec's tuple
        self.encode = encode
        self.topics: dict[bytes, str] = {}  # a topic's bytes -> its name (a handful per stage)

    def read(self, value: object) -> tuple[int, Event, Wire] | None:
        if not self.fast or type(value) is not bytes or not value.startswith(self.header):
            return None
        try:
            return self._read(value)
        except (_Doubt, IndexError, UnicodeDecodeError, struct.error):
            return None

    def _model_text(self, fields: dict[str, str]) -> Any:
        """The (name, value) pairs the model reads, masked as the tokenizer stage masks them
        (Any: compiled, whatever the masker gives is passed on as it is, as in Python)."""
        model_fields = self.model_fields
        text_fields = tuple(zip(model_fields, map(fields.get, model_fields, self.blanks)))
        masker: Any = self.masker
        return text_fields if masker is None else masker.mask_fields(text_fields)

    def _read(self, data: bytes) -> tuple[int, Event, Wire]:
        size = len(data)
        window, pos = _varint(data, len(self.header))
        head_start = pos
        # source: topic, partition (an Avro int), offset
        n, pos = _length(data, pos)
        end = pos + n
        if end > size:
            raise _Doubt
        name = data[pos:end]
        topic = self.topics.get(name)
        if topic is None:
            topic = name.decode()
            if len(self.topics) < 1024 and n <= _TOPIC_MAX:  # hostile names: stay bounded
                self.topics[name] = topic
        partition, pos = _varint(data, end)
        if not INT_MIN <= partition <= INT_MAX:
            raise _Doubt
        offset, pos = _varint(data, pos)
        branch = data[pos]  # line: null or long
        if branch == 0:
            line, pos = 0, pos + 1
        elif branch == 2:
            line, pos = _varint(data, pos + 1)
            if not line:  # a line 0 the score record writes as null: the head span would differ
                raise _Doubt
        else:
            raise _Doubt
        branch = data[pos]  # event_time: null or double
        if branch == 0:
            time, pos = None, pos + 1
        elif branch == 2:
            (time,) = _unpack_double(data, pos + 1)
            pos += 9
        else:
            raise _Doubt
        head = data[head_start:pos]
        # The strings are cut from one latin-1 text of the whole value (a character per byte, so
        # the same positions): the fields, then the raw line. That is their UTF-8 decoding when
        # their bytes are ASCII, as log lines nearly always are; else they are decoded again
        # from their bytes below. A cut past the end is caught after the walk: the next byte's
        # read raises IndexError, or the raw string does not end the value.
        text = data.decode("latin-1")
        fields_start = pos
        fields: dict[str, str] = {}
        items = 0  # names read, repeats included
        count, pos = _length(data, pos)
        while count:
            items += count
            for _ in range(count):
                n = data[pos]
                if n & 0x81:  # not a one-byte length >= 0
                    n, pos = _length(data, pos)
                else:
                    n, pos = n >> 1, pos + 1
                end = pos + n
                key = text[pos:end]
                n = data[end]
                if n & 0x81:
                    n, pos = _length(data, end)
                else:
                    n, pos = n >> 1, end + 1
                end = pos + n
                fields[key] = text[pos:end]
                pos = end
            count, pos = _length(data, pos)
        fields_end, text_fields = pos, None
        branch = data[pos]  # token_ids: null or an int array
        ids: tuple[int, ...] | bytes | None = None
        if branch == 0:
            pos += 1
        elif branch == 2:
            expected: object = None
            if self.encode is not None:
                # The ids the tokenizer stage gave these text fields, when the record carries
                # exactly those: one comparison of their Avro bytes instead of a loop over every
                # id. The text is made before the value's end is checked: a value the codec
                # refuses costs what an accepted one of its size does (without encode, nothing).
                fields = _utf8_fields(data[fields_start:fields_end], fields, items)
                text_fields = self._model_text(fields)
                expected = self.encode(text_fields)
            if type(expected) is bytes and data.startswith(array := int_array(expected), pos + 1):
                ids, pos = expected, pos + 1 + len(array)
            else:
                ids, pos = _ids(data, pos + 1)
        else:
            raise _Doubt
        raw_start = pos
        n, pos = _length(data, pos)
        if pos + n != size:  # truncated, or trailing bytes: the codec refuses it
            raise _Doubt
        raw = text[pos:]
        if not data[pos:].isascii():
            raw = raw.encode("latin-1").decode()  # UnicodeDecodeError: the codec's to refuse
        if text_fields is None:
            fields = _utf8_fields(data[fields_start:fields_end], fields, items)
            text_fields = self._model_text(fields)
        event = Event(line, time, fields, text_fields, ids, (topic, partition, offset), raw)
        return window, event, Wire(head, data[raw_start:])


def _utf8_fields(span: bytes, fields: dict[str, str], items: int) -> dict[str, str]:
    """``fields`` (cut from the value's latin-1 text) as their UTF-8 decoding: themselves when
    their bytes, ``span``, are ASCII; UnicodeDecodeError (the codec's to refuse) if not UTF-8."""
    if span.isascii():
        return fields
    if items != len(fields):  # a repeated name's earlier value, never decoded here, may be bad
        raise _Doubt  # UTF-8 that the codec refuses
    return {k.encode("latin-1").decode(): v.encode("latin-1").decode() for k, v in fields.items()}


class ScoredEventWriter:
    """``write(score, late, wire)`` -> the value ``codec().encode("salka.ScoredEvent",
    score_to_record(score, config, late))`` gives; ``wire``: the spans the reader kept of the
    score's event (None: its fields are encoded from the Event)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.header = MAGIC + codec().fingerprints[SCORED]
        self.fast = to_parsing_canonical_form(codec().schemas[SCORED]) == WRITES
        if not self.fast:
            log.warning("schemas/%s.avsc changed: pipeline/scorewire.py no longer matches it; "
                        "encoding through the generic codec (slower) until it is updated", SCORED)
        settings: Any = config  # its entities read as the codec path reads them (see _write)
        entities = settings.input.entities
        # The map's block count and each key's string: the same for every event
        self.entities = [(avro_string(name), field) for name, field in entities.items()]
        self.map_start = long_bytes(len(entities)) if entities else b""
        self.topics: dict[str, bytes] = {}

    def write(self, score: Score, late: Any = False, wire: Any = None) -> bytes:
        untyped: Any = score  # see _write (``late``: a bool, Any for the same reason)
        if self.fast and not untyped.token_losses:  # explaining scores: the codec writes them
            try:
                return self._write(untyped, late, wire)
            except (_Doubt, UnicodeEncodeError):
                pass  # the codec writes it, or says what is wrong in its own words
        return codec().encode(SCORED, score_to_record(score, self.config, late))

    # The Score, its Event, ``late`` and ``wire`` come in as Any and each value is checked here:
    # compiled (setup.py), a read through a declared type is converted or refused by mypyc (True
    # as the int 1, a TypeError for None) where the codec refuses or writes it its own way.
    def _write(self, score: Any, late: Any, wire: Any) -> bytes:
        event: Any = score.event
        fields: object = event.fields
        if type(fields) is not dict:
            raise _Doubt
        parts: list[Any] = [self.header, wire.head if wire is not None else self._head(event)]
        append = parts.append
        window: object = score.window
        if type(window) is not int or not LONG_MIN <= window <= LONG_MAX:
            raise _Doubt
        append(long_bytes(window))
        if self.entities:
            append(self.map_start)
            get = fields.get
            for key, field in self.entities:
                value: object = get(field, "")
                if type(value) is not str:
                    raise _Doubt
                append(key)
                append(avro_string(value))
        append(NULL)
        losses: tuple[object, object] = (score.loss, score.loss_total)
        for loss in losses:
            if loss is None:
                append(NULL)
            elif type(loss) is float:
                append(SECOND + pack_double(loss))
            else:
                raise _Doubt
        raw: object = event.raw
        if wire is not None:
            append(wire.raw)
        elif type(raw) is str:
            append(avro_string(raw))
        else:
            raise _Doubt
        if type(late) is not bool:
            raise _Doubt
        append(_NULLS_TRUE if late else _NULLS_FALSE)  # tokens, token_losses (explain only), late
        return b"".join(parts)

    def _head(self, event: Any) -> bytes:
        """source, line, event_time of an Event the reader did not read (the codec did)."""
        source: object = event.source
        if type(source) is not tuple or len(source) != 3:
            raise _Doubt
        topic: object = source[0]
        partition: object = source[1]
        offset: object = source[2]
        if type(topic) is not str:
            raise _Doubt
        topic_bytes = self.topics.get(topic)
        if topic_bytes is None:
            topic_bytes = avro_string(topic)
            if len(self.topics) < 1024 and len(topic) <= _TOPIC_MAX:
                self.topics[topic] = topic_bytes
        if type(partition) is not int or not INT_MIN <= partition <= INT_MAX:
            raise _Doubt
        if type(offset) is not int or not LONG_MIN <= offset <= LONG_MAX:
            raise _Doubt
        line: object = event.line or None  # as score_to_record: line 0 (unknown) is null
        if line is None:
            line_bytes = NULL
        elif type(line) is int and LONG_MIN <= line <= LONG_MAX:
            line_bytes = SECOND + long_bytes(line)
        else:
            raise _Doubt
        time: object = event.time
        if time is None:
            time_bytes = NULL
        elif type(time) is float:
            time_bytes = SECOND + pack_double(time)
        else:
            raise _Doubt
        return b"".join((topic_bytes, long_bytes(partition), long_bytes(offset), line_bytes, time_bytes))



# The compiled build is this source up to here (setup.py cuts it at the next line).
# ---- end of the compiled build ----

PYTHON_CLASSES = (WindowedEventReader, ScoredEventWriter)  # tests run both builds
COMPILED = compiled_scorewire() is not None
if COMPILED:  # Wire stays this module's (the compiled reader makes its own; equal, not isinstance)
    from pipeline._scorewire_c import (  # type: ignore[no-redef]  # noqa: F811
        ScoredEventWriter,
        WindowedEventReader,
    )
