"""Archiver stage: scores -> one gzip CSV per window, same columns as replay's output plus the
raw record's Kafka coordinates.

Rows are keyed by event identity while a window fills, and a window's file is (re)written whole
from that set when its completion record arrives, through a temp file and a rename: a redelivered
score can never add a second row, and a rewritten file has the same bytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from confluent_kafka import Message

from pipeline.atomic import quarantine, write_bytes_atomic
from pipeline.config import Config
from pipeline.runner import Output
from pipeline.scorefile import explain_cells, format_loss, format_number, score_columns, write_rows
from pipeline.spill import SpilledWindow
from pipeline.stages.collect import WindowStage

log = logging.getLogger(__name__)


def archive_path(directory: str | Path, window: int) -> Path:
    return Path(directory) / f"window-{window:06d}.csv.gz"


def archive_row(record: dict, config: Config) -> list[str]:
    source = record["source"]
    row = [
        str(record["line"] or ""), format_number(record["event_time"]), str(record["window"]),
        *(record["entities"].get(name, "") for name in config.input.entities),
        format_loss(record["loss"]), format_loss(record["loss_total"]),
        source["topic"], str(source["partition"]), str(source["offset"]),
    ]
    if config.scores.explain:
        row += explain_cells(record.get("tokens") or (), record.get("token_losses") or ())
    return row


class ArchiverStage(WindowStage):
    name = "archiver"
    record_schema = "salka.ScoredEvent"

    def __init__(self, config: Config):
        super().__init__(config, config.topics.scores, "scores")
        self.directory = Path(config.streaming.archive_dir)
        self.counts = {"windows": 0, "rows": 0, "late": 0, "dead_letters": 0}
        # The last window archived, saved before each commit: a completion record of it or an
        # older window that comes again after a restart (a trainer that fell back to an older
        # checkpoint trains and completes its windows again, and no score follows) is skipped.
        # Kept pending, it waited for scores that never come, and every later window behind it.
        self.state_path = Path(config.streaming.state_dir) / "archiver.json"
        self.archived_through = self.saved = self._load_state()

    def _load_state(self) -> int | None:
        if not self.state_path.exists():
            return None
        try:
            window = json.loads(self.state_path.read_text())["archived_through"]
            if isinstance(window, bool) or not isinstance(window, int):
                raise TypeError(f"archived_through is {window!r}, not a window number")
            return window
        except (ValueError, KeyError, TypeError) as exc:
            quarantine(self.state_path, f"unreadable archiver state ({exc.__class__.__name__}: {exc})",
                       "archiving again what the committed offsets give (same files)")
            return None

    def after_flush(self) -> None:
        if self.archived_through != self.saved:
            state = {"archived_through": self.archived_through}
            write_bytes_atomic(self.state_path, json.dumps(state).encode())
            self.saved = self.archived_through

    def already_done(self, window: int) -> bool:
        return self.archived_through is not None and window <= self.archived_through

    def item(self, record: dict, msg: Message) -> tuple[tuple, tuple] | None:
        if record["late"]:  # not one of its window's rows (replay has no late events): counted
            self.counts["late"] += 1
            return None
        return super().item(record, msg)

    def window_complete(self, out: Output, window: int, items: SpilledWindow, msg: Message,
                        complete: dict) -> None:
        path = archive_path(self.directory, window)
        written = write_rows(path, score_columns(self.config, with_source=True),
                             (archive_row(r, self.config) for r in self.records(items)))
        log.info("archived window %d: %d rows -> %s", window, written, path,
                 extra={"window": window, "rows": written})
        self.counts["windows"] += 1
        self.counts["rows"] += written
        self.archived_through = window
