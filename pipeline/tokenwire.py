"""salka.TokenizedEvent values written directly: the tokenizer stage's one encode per event.

The generic path (``codec().encode`` of ``topicrecords.event_to_record``) costs ~50 us for this
small record: a dict per event and per field, a validation pass, and fastavro resolving each
union branch per value. The record's shape is fixed, so its Avro body is written here by hand in
a few us, byte for byte what the codec writes (tests/test_tokenizer_hotpath.py compares the two
on random and hostile events).

Only values this writer handles by construction take the fast path (str strings, int within
Avro int/long, float or None times); anything else goes through the codec, so a record that does
not fit fails with the codec's own ``EncodeError`` and message. If schemas/ changes the record,
the writer turns itself off (every event through the codec) rather than write stale bytes.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence

from fastavro.schema import to_parsing_canonical_form

from pipeline.parsing import Event
from pipeline.serde import MAGIC, codec
from pipeline.serde import avro_long as zigzag
from pipeline.topicrecords import event_to_record

log = logging.getLogger(__name__)

SCHEMA = "salka.TokenizedEvent"
# The canonical form this writer was written for; another one disables the fast path.
WRITES = (
    '{"name":"salka.TokenizedEvent","type":"record","fields":[{"name":"source","type":{"name":'
    '"salka.SourceRef","type":"record","fields":[{"name":"topic","type":"string"},{"name":'
    '"partition","type":"int"},{"name":"offset","type":"long"}]}},{"name":"line","type":["null",'
    '"long"]},{"name":"event_time","type":["null","double"]},{"name":"fields","type":{"type":'
    '"array","items":{"name":"salka.Field","type":"record","fields":[{"name":"name","type":'
    '"string"},{"name":"value","type":"string"}]}}},{"name":"token_ids","type":["null",{"type":'
    '"array","items":"int"}]},{"name":"raw","type":"string"}]}'
)
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
LONG_MIN, LONG_MAX = -(1 << 63), (1 << 63) - 1
NULL = b"\x00"  # union branch 0 ("null"); also an array's end block
SECOND = b"\x02"  # union branch 1
pack_double = struct.Struct("<d").pack  # an Avro double


_SMALL = tuple(zigzag(n) for n in range(8192))  # lengths, counts and ids: no loop, no allocation
_INT_ONLY = {int}


# Offsets and line numbers are mostly past _SMALL: two 14-bit tables write any long below 2**41
# in two or three look-ups instead of serde.avro_long's loop (~1 us each, twice per event).
_LOW14 = tuple(bytes(((i & 0x7F) | 0x80, (i >> 7) | 0x80)) for i in range(1 << 14))  # more follows
_LAST14 = tuple(bytes((i,)) if i < 0x80 else bytes(((i & 0x7F) | 0x80, i >> 7)) for i in range(1 << 14))


def long_bytes(n: int) -> bytes:
    """``serde.avro_long(n)`` (the caller checks the range), by table for 0 <= n < 2**41."""
    if 0 <= n < 8192:
        return _SMALL[n]
    z = n << 1  # zigzag of a non-negative n
    if 0 <= n < 1 << 27:
        return _LOW14[z & 0x3FFF] + _LAST14[z >> 14]
    if 0 <= n < 1 << 41:
        return _LOW14[z & 0x3FFF] + _LOW14[(z >> 14) & 0x3FFF] + _LAST14[z >> 28]
    return zigzag(n)


def int_array(ids: Sequence[int]) -> bytes:
    """The canonical Avro int array of ``ids``, each 0 <= id < 8192 (``bytes`` always are): one
    block, every id a table look-up, then the end block."""
    if not ids:
        return NULL
    return long_bytes(len(ids)) + b"".join(map(_SMALL.__getitem__, ids)) + NULL


def avro_string(text: str) -> bytes:
    """An Avro string: its UTF-8 length, then its bytes."""
    data = text.encode("utf-8")
    n = len(data)
    return long_bytes(n) + data


class _Unfit(Exception):
    """A value the fast path does not write: the codec takes the event."""


class TokenizedEventWriter:
    """``write(event, source, raw, token_ids)`` -> the value ``codec().encode`` would give for
    ``event_to_record`` of the event with that source, raw line and token ids."""

    def __init__(self) -> None:
        self.header = MAGIC + codec().fingerprints[SCHEMA]
        self.fast = to_parsing_canonical_form(codec().schemas[SCHEMA]) == WRITES
        if not self.fast:
            log.warning("schemas/%s.avsc changed: pipeline/tokenwire.py no longer matches it; "
                        "encoding through the generic codec (slower) until it is updated", SCHEMA)
        self._topics: dict[str, bytes] = {}  # topic name -> its Avro string (a handful per stage)
        self._names: dict[str, bytes] = {}  # field name -> its Avro string (the config's columns)

    def write(self, event: Event, source: tuple[str, int, int], raw: str,
              token_ids: tuple[int, ...] | list[int] | None) -> bytes:
        return self.write_fields(event.line, event.time, event.fields, source, raw, token_ids)

    def write_fields(self, line: int, time: float | None, fields: dict[str, str],
                     source: tuple[str, int, int], raw: str,
                     token_ids: tuple[int, ...] | list[int] | None) -> bytes:
        """``write`` from an event's parts (``LineParser.parse_fields`` gives them): the stage
        builds no Event for it."""
        if self.fast:
            try:
                return self._write(line, time, fields, source, raw, token_ids)
            except (_Unfit, UnicodeEncodeError):
                pass  # the codec says what is wrong, in its own words
        full = Event(line=line, time=time, fields=fields, text_fields=(), source=source, raw=raw,
                     token_ids=None if token_ids is None else tuple(token_ids))
        return codec().encode(SCHEMA, event_to_record(full))

    def _write(self, line: int, time: float | None, fields: dict[str, str],
               source: tuple[str, int, int], raw: str,
               token_ids: tuple[int, ...] | list[int] | None) -> bytes:
        topic, partition, offset = source
        prefix = self._topics.get(topic)  # type: ignore[arg-type]
        if prefix is None:  # the header and the topic's string: the same for a topic's events
            if type(topic) is not str:
                raise _Unfit
            prefix = self._topics[topic] = self.header + avro_string(topic)
        if type(partition) is not int or not INT_MIN <= partition <= INT_MAX:
            raise _Unfit  # bool too: validate fits no bool to an int
        if type(offset) is not int or not LONG_MIN <= offset <= LONG_MAX:
            raise _Unfit
        parts = [prefix, long_bytes(partition), long_bytes(offset)]
        append = parts.append
        line = line or None  # as event_to_record: line 0 (unknown) is null
        if line is None:
            append(NULL)
        elif type(line) is not int or not LONG_MIN <= line <= LONG_MAX:
            raise _Unfit
        else:
            append(SECOND + long_bytes(line))
        if time is None:
            append(NULL)
        elif type(time) is float:
            append(SECOND + pack_double(time))
        else:
            raise _Unfit
        if type(fields) is not dict:
            raise _Unfit
        if fields:  # a block of len(fields) items, then the end block
            append(long_bytes(len(fields)))
            names, small = self._names, _SMALL
            for name, value in fields.items():  # runs per field per event: kept lean (measured)
                name_bytes = names.get(name)
                if name_bytes is None:
                    if type(name) is not str:
                        raise _Unfit
                    name_bytes = names[name] = avro_string(name)
                if type(value) is not str:
                    raise _Unfit
                data = value.encode()
                n = len(data)
                append(name_bytes)
                append(small[n] if n < 8192 else zigzag(n))
                append(data)
        append(NULL)
        if token_ids is None:
            append(NULL)
        else:
            append(SECOND)
            if not token_ids or type(token_ids) is bytes or (  # bytes: ids 0..255
                    set(map(type, token_ids)) == _INT_ONLY and 0 <= min(token_ids) and max(token_ids) < 8192):
                append(int_array(token_ids))  # the empty array too: its end block alone
            else:
                append(long_bytes(len(token_ids)))
                append(b"".join(_int(i, INT_MIN, INT_MAX) for i in token_ids))
                append(NULL)
        if type(raw) is not str:
            raise _Unfit
        append(avro_string(raw))
        return b"".join(parts)


def _int(n: object, low: int, high: int) -> bytes:
    if type(n) is not int or not low <= n <= high:  # bool too: validate fits no bool to an int
        raise _Unfit
    return long_bytes(n)
