"""Avro records on Kafka, framed with Avro single-object encoding.

Each value is ``C3 01`` + the writer schema's 8-byte CRC-64-AVRO fingerprint (little-endian) +
the Avro binary body, so a reader can tell which schema wrote a record (a topic may carry several,
e.g. events and completion records) and refuse bytes that are not salka's. Codec errors of any
kind become one ``DecodeError`` whose message says what was wrong.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

from fastavro import schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, load_schema, to_parsing_canonical_form
from fastavro.validation import ValidationError, validate

from schemas import SCHEMA_DIR

MAGIC = b"\xc3\x01"
HEADER_LEN = len(MAGIC) + 8


class DecodeError(ValueError):
    """Bytes that are not a record of a known salka schema."""


class EncodeError(ValueError):
    """A record that does not fit its schema (a bug in the writing stage)."""


class AvroCodec:
    """All schemas of ``schemas/``, parsed once, addressable by name and by fingerprint."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}
        self.fingerprints: dict[str, bytes] = {}
        self.by_fingerprint: dict[bytes, str] = {}
        self.range_checks: dict[str, Callable[[Any], None] | None] = {}
        for path in sorted(SCHEMA_DIR.glob("*.avsc")):
            name = path.stem  # "salka.TokenizedEvent"
            # A fresh lookup per file, so referenced types are inlined in full: the canonical
            # form (and so the fingerprint) is the whole schema, whatever order files load in.
            schema = load_schema(str(path), named_schemas={})
            canonical = to_parsing_canonical_form(schema)
            # fastavro gives the hex of the fingerprint's bytes in little-endian order, as the
            # single-object encoding spec writes them.
            fp = bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))
            self.schemas[name] = schema
            self.fingerprints[name] = fp
            self.by_fingerprint[fp] = name
            self.range_checks[name] = range_check(schema, schema.get("__named_schemas", {}))

    def encode(self, name: str, record: dict) -> bytes:
        out = io.BytesIO()
        out.write(MAGIC + self.fingerprints[name])
        try:
            # The writer alone truncates 2.5 to 2 and writes 2**40 into an Avro int: validate.
            fits(record, self.schemas[name])
            schemaless_writer(out, self.schemas[name], record)
        except Exception as exc:  # fastavro raises ValueError / TypeError / KeyError variously
            raise EncodeError(f"record does not fit {name}: {exc}") from exc
        return out.getvalue()

    def decode(self, data: bytes | None, expected: tuple[str, ...] = ()) -> tuple[str, dict]:
        """(schema name, record); ``expected`` limits which schemas are acceptable here."""
        if data is None:
            raise DecodeError("empty record value (null)")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError(f"expected bytes, got {type(data).__name__}")
        if len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise DecodeError(
                f"not an Avro single-object record (starts with {bytes(data[:4])!r}, "
                f"{len(data)} bytes)"
            )
        name = self.by_fingerprint.get(bytes(data[2:HEADER_LEN]))
        if name is None:
            raise DecodeError(f"unknown writer schema fingerprint {data[2:HEADER_LEN].hex()}")
        if expected and name not in expected:
            raise DecodeError(f"record of schema {name} where {', '.join(expected)} was expected")
        body = io.BytesIO(data[HEADER_LEN:])
        try:
            record = schemaless_reader(body, self.schemas[name], None)
        except Exception as exc:
            raise DecodeError(f"corrupt {name} record: {exc.__class__.__name__}: {exc}") from exc
        if body.tell() != len(data) - HEADER_LEN:
            raise DecodeError(f"{len(data) - HEADER_LEN - body.tell()} trailing bytes after a {name} record")
        check = self.range_checks[name]
        try:  # hostile varints can hold values no spec-following writer could have written
            if check is not None:
                check(record)
        except ValidationError as exc:
            raise DecodeError(f"{name} record out of range: {exc}") from exc
        return name, record


def fits(record: dict, schema: Any) -> None:
    """ValidationError (with fastavro's message) unless ``record`` fits ``schema``. Checked
    quietly first: with raise_errors=True fastavro builds and formats an error for every union
    branch that does not match (the null of each set optional field), which made validation 90%
    of encoding a record; the detailed check runs only for a record that fails."""
    if not validate(record, schema, raise_errors=False):
        validate(record, schema, raise_errors=True)
        raise ValidationError(f"record does not fit {schema.get('name', 'the schema')}")


INT_RANGE = {"int": (-(2**31), 2**31), "long": (-(2**63), 2**63)}


def range_check(schema: Any, named: dict[str, Any], path: str = "") -> Callable[[Any], None] | None:
    """A check that every int / long in a record *the Avro reader produced* fits its type
    (ValidationError naming the field otherwise); None where a part holds no integers.

    What the reader returns has the schema's types by construction, and its strings are valid
    UTF-8, but it reads ints as varints of any length: only the ranges are left to check. Doing
    just that (min / max over an id array) took a WindowedEvent's check from 43 us with fastavro's
    ``validate`` to about 2 us, which was half of what a scorer spent per event outside torch."""
    if isinstance(schema, str):
        if schema in INT_RANGE:
            low, high = INT_RANGE[schema]

            def check_int(value: int) -> None:
                if not low <= value < high:
                    raise ValidationError(f"{path or 'value'}: {value} does not fit an Avro {schema}")
            return check_int
        return range_check(named[schema], named, path) if schema in named else None
    if isinstance(schema, list):  # a union: the check of the branch the value's type picks
        branches = [(b, range_check(b, named, path)) for b in schema]
        checked = [(b, c) for b, c in branches if c is not None]
        if not checked:
            return None
        if len(checked) == 1 and all(b == "null" or c is not None for b, c in branches):
            only = checked[0][1]
            return lambda value: None if value is None else only(value)

        def check_branches(value: Any) -> None:  # several integer branches: let fastavro tell
            if not validate(value, schema, raise_errors=False):
                raise ValidationError(f"{path or 'value'}: {value!r} fits no branch of the union")
        return check_branches
    kind = schema["type"]
    if kind in INT_RANGE or (isinstance(kind, str) and kind in named):
        return range_check(kind, named, path)
    if kind == "record":
        fields = [(f["name"], range_check(f["type"], named, f"{path}.{f['name']}".lstrip(".")))
                  for f in schema["fields"]]
        fields = [(name, c) for name, c in fields if c is not None]
        if not fields:
            return None

        def check_record(value: dict) -> None:
            for name, c in fields:
                c(value[name])
        return check_record
    if kind in ("array", "map"):
        items = schema["items" if kind == "array" else "values"]
        item = range_check(items, named, f"{path}[]")
        if item is None:
            return None
        if isinstance(items, str) and items in INT_RANGE:  # id arrays: 2 C passes, not 1 call per id
            def check_ints(value: Any) -> None:
                values = value.values() if kind == "map" else value
                if values:
                    item(min(values))
                    item(max(values))
            return check_ints

        def check_items(value: Any) -> None:
            for v in (value.values() if kind == "map" else value):
                item(v)
        return check_items
    return None  # enum, fixed, string, bytes, boolean, float, double, null: the reader's own


_codec: AvroCodec | None = None


def codec() -> AvroCodec:
    """The process-wide codec (schemas parsed once)."""
    global _codec
    if _codec is None:
        _codec = AvroCodec()
    return _codec



def _avro_long(n: int) -> bytes:
    """Avro's zig-zag varint encoding of a long."""
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def windowed_event_value(window: int, tokenized: bytes) -> bytes:
    """The salka.WindowedEvent value {window, event} for an encoded salka.TokenizedEvent value,
    without decoding it again: Avro writes a record as its fields in order, so the body is the
    window's long followed by the event's own body. Lets the windower buffer events as the bytes
    it read (a few hundred bytes) instead of decoded dicts (kilobytes)."""
    return MAGIC + codec().fingerprints["salka.WindowedEvent"] + _avro_long(window) + tokenized[HEADER_LEN:]
