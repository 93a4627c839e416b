"""Pure parsing: one raw log line -> an Event, or a Malformed value saying why not.

The same functions run offline (replay reads a file) and online (the tokenizer stage reads a
topic), so nothing here knows where a line came from beyond the identity it is handed.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import time as _time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import repeat
from pathlib import Path
from typing import BinaryIO

from nn.masking import Masker
from pipeline.config import InputConfig
from pipeline.errors import UnreadableLog, naming

# Times past this are almost surely garbage (year 2200); rejecting them keeps one bad record from
# opening a window centuries ahead and stalling every watermark behind it.
MAX_EPOCH_SECONDS = 7_258_118_400.0


@dataclass(frozen=True)
class Event:
    line: int  # physical 1-based line number in the source file; 0 when unknown
    time: float | None  # event time, epoch seconds; None when the input has no time
    fields: dict[str, str]  # every parsed field by name
    text_fields: tuple[tuple[str, str], ...]  # (name, value) pairs the model reads, in order
    token_ids: tuple[int, ...] | bytes | None = None  # BOS..EOS ids, when a fixed tokenizer made them early
    source: tuple[str, int, int] | None = None  # Kafka (topic, partition, offset) of the raw record
    raw: str = ""  # the raw line, carried on the streaming path for analysts

    def entity(self, name: str, config: InputConfig) -> str:
        return self.fields.get(config.entities[name], "")


@dataclass(frozen=True)
class Malformed:
    """A line that is no event, and why: returned by ``LineParser.parse``, never raised."""

    line: int
    reason: str


class HeaderRow(Malformed):
    """The line is the CSV header: skipped, not an error."""


class CommentRow(HeaderRow):
    """A line starting with ``input.csv.comment_prefix`` (Zeek's #fields ...): skipped too."""


def has_year(time_format: str) -> bool:
    """Whether a time format carries the year (syslog's "%b %d %H:%M:%S" does not)."""
    if time_format in ("epoch", "iso8601"):
        return True
    return re.search(r"%[YyGcx]", time_format.replace("%%", "")) is not None


def parse_time(value: str, time_format: str, year: int | None = None) -> float:
    """Event time in epoch seconds; raises ValueError naming the problem.

    ``year`` completes a strptime format without one (else strptime says 1900: a negative time).
    """
    value = value.strip()
    if not value:
        raise ValueError("empty time")
    if time_format == "epoch":
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError(f"time {value!r} is not a finite number")
    else:
        if time_format == "iso8601":
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        elif year is not None and not has_year(time_format):
            # Prepended, not replaced afterwards: "Feb 29" only exists in the right year.
            parsed = datetime.strptime(f"{year} {value}", f"%Y {time_format}")
        else:
            parsed = datetime.strptime(value, time_format)
        if parsed.tzinfo is None:  # naive times are read as UTC, never as the host's zone
            parsed = parsed.replace(tzinfo=timezone.utc)
        seconds = parsed.timestamp()
    if seconds < 0:
        raise ValueError(f"time {value!r} is negative")
    if seconds > MAX_EPOCH_SECONDS:
        raise ValueError(f"time {value!r} is too far in the future")
    return seconds


def future_problem(seconds: float, now: float, max_future: float) -> str | None:
    """Why an event time is refused as too far ahead of the wall clock, or None.

    The watermark follows the newest time per partition, so a single forged far-future time
    would close every window up to it and send all later events to the late topic. Bounding
    times by the wall clock caps what one event can do, and decides the same in replay and in
    the tokenizer (historical data is far behind the clock either way).
    """
    if seconds - now > max_future:
        return (f"time {seconds:.0f} is too far in the future: {seconds - now:.0f} s ahead of the "
                f"wall clock, more than input.max_future_seconds ({max_future:g})")
    return None


class LineParser:
    """Turns raw lines into Events per the ``input`` config section."""

    def __init__(self, config: InputConfig, clock: Callable[[], float] = _time.time,
                 masker: Masker | None = None):
        self.config = config
        self.clock = clock  # wall clock for the far-future bound; tests pass a fixed one
        self.masker = masker  # tokenizer.mask (pipeline.modelspec.make_masker); None: off
        self.pattern = re.compile(config.text.pattern) if config.text.pattern else None
        if config.format == "csv":
            names = list(config.csv.columns)
        elif config.format == "json":
            names = list(config.json.fields)
        else:
            names = list(self.pattern.groupindex) if self.pattern else ["text"]
        self.model_fields = list(config.model_fields) or [
            n for n in names if n != config.time_field
        ]
        # Per-event work done once: the header row lowered, whether the time format has a year.
        self._header = [c.lower() for c in config.csv.columns]
        self._has_year = has_year(config.time_format)
        self._format, self._time_field = config.format, config.time_field

    def parse(self, raw: bytes | str, line: int) -> Event | Malformed:
        parsed = self.parse_fields(raw, line)
        if isinstance(parsed, Malformed):
            return parsed
        _, time, fields = parsed
        return Event(line=line, time=time, fields=fields, text_fields=self.text_fields(fields))

    def parse_fields(self, raw: bytes | str,
                     line: int) -> tuple[str, float | None, dict[str, str]] | Malformed:
        """``parse`` up to the model's text: (the line as text, only its line break stripped;
        its event time; its fields), or why it is no event. The tokenizer stage's hot path: it
        needs no Event, and no model text unless its tokenizer is fixed."""
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return Malformed(line, f"invalid UTF-8 at byte {exc.start}")
        text = raw.rstrip("\r\n")
        raw = text.removeprefix("\ufeff")  # a BOM (Excel, PowerShell) is not data
        if "\x00" in raw:
            return Malformed(line, "line contains NUL bytes")
        if not raw or raw.isspace():  # what ``not raw.strip()`` says, without the copy
            return Malformed(line, "empty line")
        if self._format == "csv":
            fields = self._csv_fields(raw, line)
        elif self._format == "json":
            fields = self._json_fields(raw, line)
        else:
            fields = self._text_fields(raw, line)
        if isinstance(fields, Malformed):
            return fields
        time = None
        if self._time_field:
            try:
                time = self._time(fields.get(self._time_field, ""))
            except (ValueError, OverflowError) as exc:
                return Malformed(line, f"bad time in field {self._time_field!r}: {exc}")
            problem = future_problem(time, self.clock(), self.config.max_future_seconds)
            if problem:
                return Malformed(line, f"bad time in field {self._time_field!r}: {problem}")
        return text, time, fields

    def text_fields(self, fields: dict[str, str]) -> tuple[tuple[str, str], ...]:
        """The (name, value) pairs the model reads, masked when tokenizer.mask is on."""
        names = self.model_fields
        text_fields = tuple(zip(names, map(fields.get, names, repeat("", len(names)))))
        if self.masker is not None:
            text_fields = self.masker.mask_fields(text_fields)
        return text_fields

    def _time(self, value: str) -> float:
        fmt = self.config.time_format
        if self._has_year:
            return parse_time(value, fmt)
        if self.config.default_year:
            return parse_time(value, fmt, self.config.default_year)
        # The current year, unless that puts the stamp past tomorrow: a December line read in
        # January belongs to last year (as rsyslog and Logstash infer it).
        now = self.clock()
        seconds = parse_time(value, fmt, datetime.fromtimestamp(now, timezone.utc).year)
        if seconds > now + 86400:
            seconds = parse_time(value, fmt, datetime.fromtimestamp(now, timezone.utc).year - 1)
        return seconds

    def _csv_fields(self, raw: str, line: int) -> dict[str, str] | Malformed:
        columns = self.config.csv.columns
        prefix = self.config.csv.comment_prefix
        if prefix and raw.startswith(prefix):
            return self._comment(raw, line)
        try:
            rows = _csv_rows(raw, self.config.csv.delimiter)
        except csv.Error as exc:
            if "field limit" in str(exc):
                return Malformed(line, f"a CSV field longer than {csv.field_size_limit()} characters "
                                        f"(line of {len(raw)} characters)")
            return Malformed(line, f"broken CSV quoting: {exc}")
        values = rows[0] if rows else []
        header = self.config.csv.header
        header_row = self._header  # the first value alone rules out almost every data row
        looks_like_header = (len(values) == len(header_row)
                             and (not values or values[0].strip().lower() == header_row[0])
                             and all(v.strip().lower() == h for v, h in zip(values, header_row)))
        if line == 1 and (header is True or (header == "auto" and looks_like_header)):
            return HeaderRow(line, "header row")
        if looks_like_header:
            return Malformed(line, "a header row in the middle of the data")
        if len(values) != len(columns):
            return Malformed(
                line, f"expected {len(columns)} CSV columns, got {len(values)}"
            )
        return dict(zip(columns, values))

    def _comment(self, raw: str, line: int) -> Malformed:
        """Skip a comment line; a Zeek ``#fields`` line must name input.csv.columns, else every
        line after it would be read into the wrong fields."""
        values = raw.split(self.config.csv.delimiter)
        columns = list(self.config.csv.columns)
        if values[0] == "#fields" and values[1:] != columns:
            return Malformed(line, f"the #fields line names {values[1:]}, input.csv.columns is "
                                    f"{columns}: make input.csv.columns the same list")
        return CommentRow(line, "comment line")

    def _json_fields(self, raw: str, line: int) -> dict[str, str] | Malformed:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            return Malformed(line, f"not JSON: {exc.msg} at column {exc.colno}")
        except (ValueError, RecursionError) as exc:  # huge integers, deep nesting
            return Malformed(line, f"not usable JSON: {type(exc).__name__}")
        if not isinstance(obj, dict):
            return Malformed(line, f"expected a JSON object, got {type(obj).__name__}")
        fields = {path: json_text(json_lookup(obj, path)) for path in self.config.json.fields}
        for path, value in fields.items():
            try:  # a "\ud800" escape decodes to a lone surrogate, which no UTF-8 writer takes
                value.encode("utf-8")
            except UnicodeEncodeError:
                return Malformed(line, f"field {path!r} holds a lone UTF-16 surrogate (a \\ud800-"
                                       f"\\udfff escape without its pair): not text")
        return fields

    def _text_fields(self, raw: str, line: int) -> dict[str, str] | Malformed:
        if self.pattern is None:
            return {"text": raw}
        match = self.pattern.search(raw)
        if match is None:
            return Malformed(line, "line does not match input.text.pattern")
        fields = {k: v or "" for k, v in match.groupdict().items()}
        if "text" not in fields:
            fields["text"] = raw
        return fields


def _csv_rows(raw: str, delimiter: str) -> list[list[str]]:
    """``list(csv.reader([raw], delimiter=delimiter, strict=True))``: a line with no quote, no
    line break, no NUL (Python 3.10's reader refuses one) and no field past the size limit is
    split by ``str.split``, which reads it the same (tests/test_tokenizer_hotpath.py compares
    them), in a fraction of the time."""
    if (raw and '"' not in raw and "\r" not in raw and "\n" not in raw and "\0" not in raw
            and len(delimiter) == 1 and delimiter not in '"\r\n'
            and len(raw) <= csv.field_size_limit()):
        return [raw.split(delimiter)]
    return list(csv.reader([raw], delimiter=delimiter, strict=True))


def json_lookup(obj: object, path: str) -> object:
    """The value at ``a.b.c`` (None when absent); a key containing dots matches whole first."""
    if not isinstance(obj, dict):
        return None
    if path in obj:
        return obj[path]
    for match in re.finditer(r"\.", path):
        head = path[: match.start()]
        if head in obj:
            found = json_lookup(obj[head], path[match.end():])
            if found is not None:
                return found
    return None


def json_text(value: object) -> str:
    """A JSON value as a field string: strings as they are, absent / null empty, others as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


GZIP_MAGIC = b"\x1f\x8b"


class _Prefixed(io.RawIOBase):
    """A stream whose first bytes were read to look at them: those bytes, then the rest."""

    def __init__(self, head: bytes, rest: BinaryIO):
        self.head, self.rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.head:
            data, self.head = self.head[: len(buffer)], self.head[len(buffer):]
        else:
            data = self.rest.read1(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def read_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(physical 1-based line number as ``grep -n`` counts it, raw bytes) for every line. A
    gzip file (known by its first bytes, whatever its name: logs are shipped compressed, as
    LANL's auth.txt.gz) is read decompressed, and its lines are numbered as ``zcat | grep -n``
    numbers them, in replay, produce and the input audit alike."""
    with naming(path), open(path, "rb") as handle:
        try:
            head = handle.read(2)
            if handle.seekable():
                handle.seek(0)
                stream: BinaryIO = handle
            else:  # a pipe (<(zcat ...), a FIFO) cannot seek back: the two bytes go first
                stream = io.BufferedReader(_Prefixed(head, handle))
            lines = gzip.GzipFile(fileobj=stream, mode="rb") if head == GZIP_MAGIC else stream
            yield from enumerate(lines, start=1)
        except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise UnreadableLog(f"{path}: a gzip file that is truncated or corrupt ({exc}); "
                                f"decompress it with gunzip to see how far it reads") from exc
