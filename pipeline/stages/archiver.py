"""Archiver stage: scores -> one gzip CSV per window, same columns as replay's output plus the
raw record's Kafka coordinates.

Rows are keyed by event identity while a window fills, and a window's file is (re)written whole
from that set when its completion record arrives, through a temp file and a rename: a redelivered
score can never add a second row, and a rewritten file has the same bytes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from confluent_kafka import Message, TopicPartition

from pipeline.config import Config
from pipeline.records import identity
from pipeline.runner import Output, decode_or_dead_letter
from pipeline.scorefile import explain_cells, format_loss, format_number, score_columns, write_rows
from pipeline.stages.collect import WindowCollector

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


def row_order(record: dict) -> tuple:
    return (record["event_time"] or 0.0, record["line"] or 0, identity(record))


class ArchiverStage:
    name = "archiver"

    def __init__(self, config: Config):
        self.config = config
        self.directory = Path(config.streaming.archive_dir)
        self.pending = WindowCollector("scores")
        self.safe_offset: int | None = None
        self.counts = {"windows": 0, "rows": 0, "dead_letters": 0}

    def topics(self) -> list[str]:
        return [self.config.topics.scores]

    def on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        pass

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        self.pending.clear()
        self.safe_offset = None

    def handle(self, msg: Message, out: Output) -> None:
        decoded = decode_or_dead_letter(self, msg, out, ("salka.ScoredEvent", "salka.WindowComplete"))
        if decoded is None:
            return
        name, record = decoded
        window = record["window"]
        if name == "salka.ScoredEvent":
            self.pending.add(window, identity(record), record)
            return
        rows = self.pending.complete(window, record["count"])
        if rows is None:
            return
        ordered = sorted(rows, key=row_order)
        path = archive_path(self.directory, window)
        written = write_rows(path, score_columns(self.config, with_source=True),
                             (archive_row(r, self.config) for r in ordered))
        log.info("archived window %d: %d rows -> %s", window, written, path,
                 extra={"window": window, "rows": written})
        self.counts["windows"] += 1
        self.counts["rows"] += written
        self.safe_offset = msg.offset() + 1

    def tick(self, out: Output) -> bool:
        return False

    def after_flush(self) -> None:
        pass

    def safe_offsets(self) -> list[TopicPartition]:
        if self.safe_offset is None:
            return []
        return [TopicPartition(self.config.topics.scores, 0, self.safe_offset)]

    def close(self, out: Output) -> None:
        log.info("archiver totals: %s", self.counts)
