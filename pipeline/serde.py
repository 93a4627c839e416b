"""Avro records on Kafka, framed with Avro single-object encoding.

Each value is ``C3 01`` + the writer schema's 8-byte CRC-64-AVRO fingerprint (little-endian) +
the Avro binary body, so a reader can tell which schema wrote a record (a topic may carry several,
e.g. events and completion records) and refuse bytes that are not salka's. Codec errors of any
kind become one ``DecodeError`` whose message says what was wrong.
"""

from __future__ import annotations

import array
import io
import numbers
from collections.abc import Callable, Mapping, Sequence
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
        self.encode_checks: dict[str, Callable[[Any], bool] | None] = {}
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
            self.encode_checks[name] = encode_check(schema, schema.get("__named_schemas", {}))

    def encode(self, name: str, record: dict) -> bytes:
        out = io.BytesIO()
        out.write(MAGIC + self.fingerprints[name])
        try:
            # The writer alone truncates 2.5 to 2 and writes 2**40 into an Avro int: validate,
            # by the compiled check; fastavro's validate has the last word (and the message)
            # on a record the check refuses.
            check = self.encode_checks[name]
            if check is None or not check(record):
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


# ---------------------------------------------------------------------------- encode-side check

class _Unsupported(Exception):
    """A schema construct encode_check does not compile (logical types...): fastavro validates."""


_PRIMITIVE_CHECKS: dict[str, Callable[[Any], bool]] = {
    # fastavro.validation's own tests, one per type (its Cython module, as installed).
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "bytes": lambda v: isinstance(v, (bytes, bytearray)),
    # Any Real but a bool fits a float or double, ints included (the writer converts them).
    "float": lambda v: type(v) is float or (isinstance(v, (int, float, numbers.Real))
                                              and not isinstance(v, bool)),
}
_PRIMITIVE_CHECKS["double"] = _PRIMITIVE_CHECKS["float"]
_ALWAYS_FIT = {"string": frozenset({str}), "float": frozenset({float, int}),
               "double": frozenset({float, int}), "boolean": frozenset({bool}),
               "null": frozenset({type(None)}), "bytes": frozenset({bytes, bytearray})}


def always_fit(schema: Any) -> frozenset[type]:
    """Exact Python types every value of which fits ``schema`` (so a type lookup decides, with
    no call: an array's items in one set(map(type, ...)) pass in C, a record field by a set
    membership). Empty where values must be looked at (ints have ranges) or for containers."""
    if isinstance(schema, list):  # a union takes what any branch takes (a tuple is never here)
        return frozenset().union(*(always_fit(b) for b in schema))
    if isinstance(schema, dict) and "logicalType" not in schema and isinstance(schema["type"], str):
        schema = schema["type"]  # {"type": "string"}
    return _ALWAYS_FIT.get(schema, frozenset()) if isinstance(schema, str) else frozenset()


def _int_check(kind: str) -> Callable[[Any], bool]:
    low, high = INT_RANGE[kind]

    def check_int(v: Any) -> bool:
        if type(v) is int:
            return low <= v < high
        # fastavro's test, in its order: an Integral (numpy's too) in range, bools excluded.
        return isinstance(v, (int, numbers.Integral)) and low <= v < high and not isinstance(v, bool)
    return check_int


def _items_check(items: Any, item: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """all(item(x) for x in values), by a type census in C where the item type allows it."""
    if isinstance(items, str) and items in INT_RANGE:
        low, high = INT_RANGE[items]

        def all_ints(values: Any) -> bool:
            if set(map(type, values)) <= {int}:  # plain ints: only the extremes can miss
                return not values or (low <= min(values) and max(values) < high)
            return all(map(item, values))
        return all_ints
    always = always_fit(items)
    if always:
        return lambda values: set(map(type, values)) <= always or all(map(item, values))
    return lambda values: all(map(item, values))


def encode_check(schema: Any, named: dict[str, Any]) -> Callable[[Any], bool] | None:
    """``check(record) -> bool``: fastavro's ``validate(record, schema, raise_errors=False)``
    verdict, compiled once per schema (None where a construct is not covered: validate then).

    What validate costs per record is mostly its interpretation of the schema (a type switch,
    keyword calls and an f-string field path per value, the schema re-parsed per call): about
    10 us of a 32 us TokenizedEvent encode. The compiled check decides with closures built
    once, and a single C pass over an array's item types. Same verdict, including validate's
    quirks: an int fits a float/double, a bool fits no int, tuple notation picks a union
    branch, a missing field takes its default, any Sequence (bytes too) fits an array."""
    try:
        return _compile(schema, named, {})
    except _Unsupported:
        return None


def _compile(schema: Any, named: dict[str, Any], done: dict[str, Callable[[Any], bool]]
             ) -> Callable[[Any], bool]:
    if isinstance(schema, str):
        if schema in INT_RANGE:
            return _int_check(schema)
        if schema in _PRIMITIVE_CHECKS:
            return _PRIMITIVE_CHECKS[schema]
        if schema in done:
            return done[schema]
        if schema in named:
            return _compile(named[schema], named, done)
        raise _Unsupported(schema)
    if isinstance(schema, list):
        return _union_check(schema, named, done)
    if "logicalType" in schema:  # validate converts the value first (LOGICAL_WRITERS)
        raise _Unsupported(schema["logicalType"])
    kind = schema["type"]
    if kind == "record":
        return _record_check(schema, named, done)
    if kind == "array":
        item = _compile(schema["items"], named, done)
        items = _items_check(schema["items"], item)

        def check_array(v: Any) -> bool:
            if type(v) is not list and (not isinstance(v, (Sequence, array.array)) or isinstance(v, str)):
                return False
            return items(v)
        return check_array
    if kind == "map":
        values = _items_check(schema["values"], _compile(schema["values"], named, done))

        def check_map(v: Any) -> bool:
            if type(v) is not dict and not isinstance(v, Mapping):
                return False
            return (set(map(type, v)) <= {str} or all(isinstance(k, str) for k in v)) and values(v.values())
        return check_map
    if kind == "enum":
        symbols = list(schema["symbols"])  # a list, as validate's `in`: unhashable values allowed
        return lambda v: v in symbols
    if kind == "fixed":
        size = schema["size"]
        return lambda v: isinstance(v, (bytes, bytearray)) and len(v) == size
    if isinstance(kind, (str, list, dict)) and kind not in ("error", "request", "error_union"):
        return _compile(kind, named, done)  # {"type": "long"}, {"type": "salka.SourceRef"}
    raise _Unsupported(kind)


def _record_check(schema: dict, named: dict[str, Any], done: dict[str, Callable[[Any], bool]]
                  ) -> Callable[[Any], bool]:
    fullname = schema["name"]  # parse_schema leaves full names
    compiled: list[Callable[[Any], bool]] = []
    done[fullname] = lambda v: compiled[0](v)  # a recursive reference resolves once built
    # A missing field reads as its default (None without one), as validate reads it.
    fields = [(f["name"], f.get("default"), always_fit(f["type"]), _compile(f["type"], named, done))
              for f in schema["fields"]]

    def check_record(v: Any) -> bool:
        if type(v) is not dict and not isinstance(v, Mapping):
            return False
        if "-type" in v and v["-type"] != fullname:  # fastavro's record-name hint
            return False
        get = v.get
        for name, default, always, check in fields:
            value = get(name, default)
            if type(value) not in always and not check(value):
                return False
        return True
    compiled.append(check_record)
    done[fullname] = check_record
    return check_record


def _union_check(schema: list, named: dict[str, Any], done: dict[str, Callable[[Any], bool]]
                 ) -> Callable[[Any], bool]:
    branches = [_compile(b, named, done) for b in schema]
    # Tuple notation, ("branch name", value): a record branch answers to its name, any other
    # branch to its schema as written (so "long" to "long").
    names = [b["name"] if isinstance(b, dict) and b.get("type") == "record" else b for b in schema]

    def by_name(v: tuple) -> bool:
        name, datum = v  # a tuple of another length raises here, as in validate
        for branch_name, check in zip(names, branches):
            if branch_name == name:
                return check(datum)
        return False

    if len(schema) == 2 and schema[0] == "null":
        other = branches[1]

        def check_optional(v: Any) -> bool:
            if v is None:
                return True
            if isinstance(v, tuple):
                return by_name(v)
            return other(v)
        return check_optional

    def check_union(v: Any) -> bool:
        if isinstance(v, tuple):
            return by_name(v)
        return any(check(v) for check in branches)
    return check_union


_codec: AvroCodec | None = None


def codec() -> AvroCodec:
    """The process-wide codec (schemas parsed once)."""
    global _codec
    if _codec is None:
        _codec = AvroCodec()
    return _codec



def avro_long(n: int) -> bytes:
    """Avro's zig-zag varint encoding of a long (the caller checks the range)."""
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
    return MAGIC + codec().fingerprints["salka.WindowedEvent"] + avro_long(window) + tokenized[HEADER_LEN:]
