"""The scores file format (replay output and archive files): gzip CSV, header row, one row per
event, written to a temporary name and renamed so a reader never sees half a file; and its one
reader (:func:`read_scores` -> typed :class:`ScoreRow`), used by every analysis command."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.atomic import atomic_write
from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.parsing import GZIP_MAGIC

SOURCE_COLUMNS = ["source_topic", "source_partition", "source_offset"]


EXPLAIN_COLUMNS = ["tokens", "token_losses"]


# Columns every scores file has whatever the config (entities and extras vary).
REQUIRED_COLUMNS = ["line", "event_time", "window", "loss", "loss_total"]
# Every column that is not an entity: any other column of a scores file is one (config.input.entities).
FIXED_COLUMNS = frozenset([*REQUIRED_COLUMNS, *SOURCE_COLUMNS, *EXPLAIN_COLUMNS])


def check_scores_header(path: str | Path, header: list[str] | None) -> None:
    """Stop with one line when ``path`` is not a scores file (a log passed as --scores)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in (header or [])]
    if missing:
        shown = ",".join(header or [])[:80]
        raise InputError(f"{path}: not a scores file (no {missing[0]!r} column; its first line is "
                         f"{shown!r}); pass the file written by pipeline replay --output, "
                         f"or an archive directory")


def score_columns(config: Config, with_source: bool = False) -> list[str]:
    columns = ["line", "event_time", "window", *config.input.entities, "loss", "loss_total"]
    if with_source:
        columns += SOURCE_COLUMNS
    return columns + EXPLAIN_COLUMNS if config.scores.explain else columns


def explain_cells(tokens, token_losses) -> list[str]:
    """JSON lists (empty cells when the event has no score yet)."""
    if not token_losses:
        return ["", ""]
    return [json.dumps(list(tokens), ensure_ascii=False),
            json.dumps([round(x, 4) for x in token_losses])]


def format_number(value: float | None) -> str:
    """Event times as written in the input when they are whole seconds (3600, not 3600.0)."""
    if value is None:
        return ""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def format_loss(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def stored_loss(value: float | None) -> float | None:
    """A loss as every score file (replay's output, the archive) keeps it and reads it back.
    The alerter stage judges these, so that it decides exactly as ``pipeline alerts`` over the
    archive: a full double a few 1e-7 below a threshold could otherwise be flagged there only."""
    return None if value is None else float(format_loss(value))


def write_rows(path: str | Path, columns: list[str], rows: Iterable[list[str]]) -> int:
    count = 0
    # mtime=0: the same rows always give the same bytes, so rewriting a file after a redelivery
    # is indistinguishable from the first write.
    with atomic_write(path) as raw:
        gz = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0)
        text = io.TextIOWrapper(gz, encoding="utf-8", newline="")
        try:
            writer = csv.writer(text)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(row)
                count += 1
            text.close()  # flushes, and ends the gzip stream: only once every row is in
        except BaseException:
            # No gzip end-of-stream after a failure: a reader of a stream (a FIFO, stdout: the
            # atomic writer writes those straight) sees a truncated file, not a whole short one.
            gz.fileobj = io.BytesIO()  # what closing it (when collected) writes goes nowhere
            raise
    return count


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True, slots=True)
class ScoreRow:
    """One event's row of a scores file, typed.

    ``row[column]`` (and ``row.get(column)``) gives a cell as salka writes it (the same formatting
    functions as the writers), for tables and exports that show the file's text.
    """

    line: int | None  # physical line of the input file; None for Kafka input without one
    event_time: float | None
    window: int
    entities: dict[str, str]  # the entity columns, in file order
    loss: float | None  # None: the first window, no model yet
    loss_total: float | None
    source: tuple[str, int, int] | None = None  # (topic, partition, offset): archive rows
    extras: dict[str, str] = field(default_factory=dict)  # tokens, token_losses (scores.explain)

    def __getitem__(self, column: str) -> str:
        if column in self.entities:
            return self.entities[column]
        if column in self.extras:
            return self.extras[column]
        if column == "line":
            return "" if self.line is None else str(self.line)
        if column == "event_time":
            return format_number(self.event_time)
        if column == "window":
            return str(self.window)
        if column in ("loss", "loss_total"):
            return format_loss(getattr(self, column))
        if column in SOURCE_COLUMNS and self.source is not None:
            return str(self.source[SOURCE_COLUMNS.index(column)])
        raise KeyError(column)

    def get(self, column: str, default: str | None = None) -> str | None:
        try:
            return self[column]
        except KeyError:
            return default


def _optional(cells: Mapping[str, str | None], column: str, kind: type) -> int | float | None:
    text = cells.get(column) or ""
    try:
        return kind(text) if text else None
    except ValueError:
        raise ValueError(f"{column} {text[:40]!r} is not a number") from None


def parse_row(cells: Mapping[str, str | None]) -> ScoreRow:
    """A scores-file row (column -> cell text, as csv.DictReader gives it) as a ScoreRow;
    ValueError naming the column for a cell that is not what salka writes."""
    window = _optional(cells, "window", int)
    if window is None:
        raise ValueError("window is empty")
    source = None
    if "source_topic" in cells:
        source = (cells["source_topic"] or "", int(_optional(cells, "source_partition", int) or 0),
                  int(_optional(cells, "source_offset", int) or 0))
    return ScoreRow(
        line=_optional(cells, "line", int), event_time=_optional(cells, "event_time", float),
        window=window,
        entities={c: v or "" for c, v in cells.items() if c is not None and c not in FIXED_COLUMNS},
        loss=_optional(cells, "loss", float), loss_total=_optional(cells, "loss_total", float),
        source=source, extras={c: cells[c] or "" for c in EXPLAIN_COLUMNS if c in cells})


def read_scores(path: str | Path) -> list[ScoreRow]:
    """Rows of a scores file, or of every window file of an archive directory, in file order.
    Anything that is not a readable scores file stops with one line naming the file (and row)."""
    path = Path(path)
    # A directory without window files is a wrong path (the demo's workdir for its archive), not
    # an archive with no events: analysing it would print "no scored events" and exit 0.
    if path.is_dir() and not window_files(path):
        raise InputError(f"{path}: no window-*.csv.gz files, so not a score archive; pass the "
                         f"archiver's directory (streaming.archive_dir, e.g. demo/archive) or a "
                         f"scores file written by pipeline replay --output")
    return list(iter_scores(path))


def window_files(directory: str | Path) -> list[Path]:
    """An archive directory's window files, in window order (the archiver's names)."""
    return sorted(Path(directory).glob("window-*.csv.gz"))


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def iter_scores(path: str | Path) -> Iterator[ScoreRow]:
    """:func:`read_scores` one row at a time, for readers of a whole archive (the audit)."""
    path = Path(path)
    if path.is_dir():
        for part in window_files(path):
            yield from iter_scores(part)
        return
    try:
        # Replay writes gzip whatever the name (--output scores.csv too): the magic bytes decide.
        opener = gzip.open if path.suffix == ".gz" or _is_gzip(path) else open
        with opener(path, "rt", newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            check_scores_header(path, reader.fieldnames)
            for cells in reader:
                try:
                    row = parse_row(cells)
                except ValueError as exc:
                    raise InputError(f"{path}:{reader.line_num}: {exc}; a scores file is written by "
                                     f"pipeline replay --output or the archiver") from None
                yield row
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:  # gzip / text / CSV damage
        raise InputError(f"{path}: not a readable scores file ({exc}); pass the file written by "
                         f"pipeline replay --output, or an archive directory") from exc
