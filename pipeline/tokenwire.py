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

import dataclasses
import logging
import struct

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
_pack_double = struct.Struct("<d").pack


_SMALL = tuple(zigzag(n) for n in range(8192))  # lengths, counts and ids: no loop, no allocation
_INT_ONLY = {int}


def varint(n: int) -> bytes:
    return _SMALL[n] if 0 <= n < 8192 else zigzag(n)


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    n = len(data)
    return (_SMALL[n] if n < 8192 else zigzag(n)) + data


class _Unfit(Exception):
    """A value the fast path does not write: the codec takes the event."""


class TokenizedEventWriter:
    """``write(event, source, raw, token_ids)`` -> the value ``codec().encode`` would give for
    ``event_to_record(dataclasses.replace(event, source=..., raw=..., token_ids=...))``."""

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
        if self.fast:
            try:
                return self._write(event, source, raw, token_ids)
            except (_Unfit, UnicodeEncodeError):
                pass  # the codec says what is wrong, in its own words
        full = dataclasses.replace(event, source=source, raw=raw,
                                   token_ids=None if token_ids is None else tuple(token_ids))
        return codec().encode(SCHEMA, event_to_record(full))

    def _write(self, event: Event, source: tuple[str, int, int], raw: str,
               token_ids: tuple[int, ...] | list[int] | None) -> bytes:
        topic, partition, offset = source
        parts = [self.header]
        append = parts.append
        topic_bytes = self._topics.get(topic)  # type: ignore[arg-type]
        if topic_bytes is None:
            if type(topic) is not str:
                raise _Unfit
            topic_bytes = self._topics[topic] = _string(topic)
        append(topic_bytes)
        append(_int(partition, INT_MIN, INT_MAX))
        append(_int(offset, LONG_MIN, LONG_MAX))
        line = event.line or None  # as event_to_record: line 0 (unknown) is null
        append(NULL if line is None else SECOND + _int(line, LONG_MIN, LONG_MAX))
        time = event.time
        if time is None:
            append(NULL)
        elif type(time) is float:
            append(SECOND + _pack_double(time))
        else:
            raise _Unfit
        fields = event.fields
        if type(fields) is not dict:
            raise _Unfit
        if fields:  # a block of len(fields) items, then the end block
            append(varint(len(fields)))
            names = self._names
            for name, value in fields.items():
                name_bytes = names.get(name)
                if name_bytes is None:
                    if type(name) is not str:
                        raise _Unfit
                    name_bytes = names[name] = _string(name)
                if type(value) is not str:
                    raise _Unfit
                append(name_bytes)
                data = value.encode("utf-8")  # _string, inlined: the loop runs per field per event
                n = len(data)
                append(_SMALL[n] if n < 8192 else zigzag(n))
                append(data)
        append(NULL)
        if token_ids is None:
            append(NULL)
        else:
            append(SECOND)
            if token_ids:
                append(varint(len(token_ids)))
                if set(map(type, token_ids)) == _INT_ONLY and 0 <= min(token_ids) and max(token_ids) < 8192:
                    append(b"".join(map(_SMALL.__getitem__, token_ids)))  # every id a table look-up
                else:
                    append(b"".join(_int(i, INT_MIN, INT_MAX) for i in token_ids))
            append(NULL)
        if type(raw) is not str:
            raise _Unfit
        append(_string(raw))
        return b"".join(parts)


def _int(n: object, low: int, high: int) -> bytes:
    if type(n) is not int or not low <= n <= high:  # bool too: validate fits no bool to an int
        raise _Unfit
    return varint(n)
