"""Pure parsing: one raw log line -> an Event, or a ParseError saying why not.

The same functions run offline (replay reads a file) and online (the tokenizer stage reads a
topic), so nothing here knows where a line came from beyond the identity it is handed.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline.config import InputConfig

# Times past this are almost surely garbage (year 2200); rejecting them keeps one bad record from
# opening a window centuries ahead and stalling every watermark behind it.
MAX_EPOCH_SECONDS = 7_258_118_400.0


@dataclass(frozen=True)
class Event:
    line: int  # physical 1-based line number in the source file; 0 when unknown
    time: float | None  # event time, epoch seconds; None when the input has no time
    fields: dict[str, str]  # every parsed field by name
    text_fields: tuple[tuple[str, str], ...]  # (name, value) pairs the model reads, in order
    token_ids: tuple[int, ...] | None = None  # BOS..EOS ids, when a fixed tokenizer made them early
    source: tuple[str, int, int] | None = None  # Kafka (topic, partition, offset) of the raw record
    raw: str = ""  # the raw line, carried on the streaming path for analysts

    def entity(self, name: str, config: InputConfig) -> str:
        return self.fields.get(config.entities[name], "")


@dataclass(frozen=True)
class ParseError:
    line: int
    reason: str


class HeaderRow(ParseError):
    """The line is the CSV header: skipped, not an error."""


def parse_time(value: str, time_format: str) -> float:
    """Event time in epoch seconds; raises ValueError naming the problem."""
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


class LineParser:
    """Turns raw lines into Events per the ``input`` config section."""

    def __init__(self, config: InputConfig):
        self.config = config
        self.pattern = re.compile(config.text.pattern) if config.text.pattern else None
        if config.format == "csv":
            names = list(config.csv.columns)
        else:
            names = list(self.pattern.groupindex) if self.pattern else ["text"]
        self.model_fields = list(config.model_fields) or [
            n for n in names if n != config.time_field
        ]

    def parse(self, raw: bytes | str, line: int) -> Event | ParseError:
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return ParseError(line, f"invalid UTF-8 at byte {exc.start}")
        raw = raw.rstrip("\r\n")
        if "\x00" in raw:
            return ParseError(line, "line contains NUL bytes")
        if not raw.strip():
            return ParseError(line, "empty line")
        if self.config.format == "csv":
            fields = self._csv_fields(raw, line)
        else:
            fields = self._text_fields(raw, line)
        if isinstance(fields, ParseError):
            return fields
        time = None
        if self.config.time_field:
            try:
                time = parse_time(fields[self.config.time_field], self.config.time_format)
            except (ValueError, OverflowError) as exc:
                return ParseError(line, f"bad time in field {self.config.time_field!r}: {exc}")
        text_fields = tuple((name, fields.get(name, "")) for name in self.model_fields)
        return Event(line=line, time=time, fields=fields, text_fields=text_fields)

    def _csv_fields(self, raw: str, line: int) -> dict[str, str] | ParseError:
        columns = self.config.csv.columns
        try:
            rows = list(csv.reader([raw], delimiter=self.config.csv.delimiter, strict=True))
        except csv.Error as exc:
            if "field limit" in str(exc):
                return ParseError(line, f"a CSV field longer than {csv.field_size_limit()} characters "
                                        f"(line of {len(raw)} characters)")
            return ParseError(line, f"broken CSV quoting: {exc}")
        values = rows[0] if rows else []
        header = self.config.csv.header
        looks_like_header = [v.strip().lower() for v in values] == [c.lower() for c in columns]
        if line == 1 and (header is True or (header == "auto" and looks_like_header)):
            return HeaderRow(line, "header row")
        if looks_like_header:
            return ParseError(line, "a header row in the middle of the data")
        if len(values) != len(columns):
            return ParseError(
                line, f"expected {len(columns)} CSV columns, got {len(values)}"
            )
        return dict(zip(columns, values))

    def _text_fields(self, raw: str, line: int) -> dict[str, str] | ParseError:
        if self.pattern is None:
            return {"text": raw}
        match = self.pattern.search(raw)
        if match is None:
            return ParseError(line, "line does not match input.text.pattern")
        fields = {k: v or "" for k, v in match.groupdict().items()}
        if "text" not in fields:
            fields["text"] = raw
        return fields


def event_text(event: Event) -> str:
    """The string char and BPE tokenizers read: the model fields joined by commas."""
    return ",".join(value for _, value in event.text_fields)


def read_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(physical 1-based line number as ``grep -n`` counts it, raw bytes) for every line."""
    with open(path, "rb") as handle:
        yield from enumerate(handle, start=1)
