"""The scores file format (replay output and archive files): gzip CSV, header row, one row per
event, written to a temporary name and renamed so a reader never sees half a file."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable
from pathlib import Path

from pipeline.atomic import atomic_write
from pipeline.config import Config
from pipeline.errors import InputError

SOURCE_COLUMNS = ["source_topic", "source_partition", "source_offset"]


EXPLAIN_COLUMNS = ["tokens", "token_losses"]


# Columns every scores file has whatever the config (entities and extras vary).
REQUIRED_COLUMNS = ["line", "event_time", "window", "loss", "loss_total"]


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


def write_rows(path: str | Path, columns: list[str], rows: Iterable[list[str]]) -> int:
    count = 0
    # mtime=0: the same rows always give the same bytes, so rewriting a file after a redelivery
    # is indistinguishable from the first write.
    with atomic_write(path) as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        with io.TextIOWrapper(gz, encoding="utf-8", newline="") as text:
            writer = csv.writer(text)
            writer.writerow(columns)
            for row in rows:
                writer.writerow(row)
                count += 1
    return count
