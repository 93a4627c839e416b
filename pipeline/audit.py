"""``pipeline audit``: every raw record must end as exactly one archive row, or a dead letter,
or a late event. Reconciles the raw topic against the archive and the side topics, per raw
topic-partition and in total.

Dead letters and late events may repeat under at-least-once delivery (the same identity twice):
that is not a loss, so they count by distinct identity. The archive is the deduplicating sink,
so an identity on two archive rows is an error, as is an event both archived and dead-lettered.
"""

from __future__ import annotations

import csv
import gzip
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config
from pipeline.kafka import make_consumer
from pipeline.records import CONTROL_HEADER, identity
from pipeline.runner import header
from pipeline.serde import DecodeError, codec

Identity = tuple[str, int, int]


def read_topic(config: Config, topic: str, idle: float = 3.0, timeout: float = 300.0):
    """Every record of ``topic`` from the start, until nothing new arrives for ``idle`` seconds
    (the embedded broker's end offsets are unreliable, so no end-offset arithmetic here)."""
    consumer = make_consumer(config, f"audit-{uuid.uuid4().hex[:10]}")
    assigned: list = []
    consumer.subscribe([topic], on_assign=lambda c, parts: assigned.extend(parts))
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    try:
        while time.monotonic() < deadline and (not assigned or time.monotonic() - last < idle):
            if not assigned:
                last = time.monotonic()  # the idle clock starts once partitions are assigned
            for msg in consumer.consume(1000, timeout=0.2):
                last = time.monotonic()
                if not msg.error():
                    yield msg
    finally:
        consumer.close()


@dataclass
class PartitionAudit:
    raw: int = 0
    archived: int = 0
    dead_letters: int = 0
    late: int = 0
    lost: int = 0
    duplicated: int = 0  # archive rows beyond the first for one identity
    conflicting: int = 0  # identities in more than one of archive / dead letters / late

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.conflicting)


@dataclass
class AuditReport:
    partitions: dict[tuple[str, int], PartitionAudit] = field(default_factory=dict)
    unknown_rows: int = 0  # archive rows whose raw record is not in the raw topic (retention?)
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> PartitionAudit:
        total = PartitionAudit()
        for part in self.partitions.values():
            for name in vars(total):
                setattr(total, name, getattr(total, name) + getattr(part, name))
        return total

    @property
    def ok(self) -> bool:
        # Rows whose raw record cannot be found mean the audit could not check them.
        return self.total.ok and not self.unknown_rows

    def format(self) -> str:
        columns = ["raw", "archived", "dead_letters", "late", "lost", "duplicated", "conflicting"]
        lines = [f"{'topic[partition]':<32}" + "".join(f"{c:>13}" for c in columns)]
        rows = sorted(self.partitions.items()) + [(("total", -1), self.total)]
        for (topic, partition), part in rows:
            name = topic if partition < 0 else f"{topic}[{partition}]"
            lines.append(f"{name:<32}" + "".join(f"{getattr(part, c):>13}" for c in columns))
        if self.unknown_rows:
            lines.append(f"archive rows whose raw record is not in the raw topic (deleted by "
                         f"retention, or another topic's archive?): {self.unknown_rows}")
        lines += self.examples[:10]
        lines.append("audit: OK, every raw record accounted for exactly once" if self.ok
                     else "audit: FAILED")
        return "\n".join(lines)


def archive_identities(directory: Path) -> Counter:
    rows: Counter = Counter()
    for path in sorted(directory.glob("window-*.csv.gz")):
        with gzip.open(path, "rt", newline="") as handle:
            for row in csv.DictReader(handle):
                rows[(row["source_topic"], int(row["source_partition"]), int(row["source_offset"]))] += 1
    return rows


def side_identities(config: Config) -> tuple[set[Identity], set[Identity]]:
    dead: set[Identity] = set()
    late: set[Identity] = set()
    for msg in read_topic(config, config.topics.dead_letters):
        try:
            _, record = codec().decode(msg.value(), expected=("salka.DeadLetter",))
        except DecodeError:
            continue
        if record["source"]["topic"] == config.topics.raw:
            dead.add(identity(record))
    for msg in read_topic(config, config.topics.late):
        try:
            _, record = codec().decode(msg.value(), expected=("salka.LateEvent",))
        except DecodeError:
            continue
        late.add(identity(record["event"]))
    return dead, late


def audit(config: Config, archive_dir: Path | None = None) -> AuditReport:
    raw: set[Identity] = set()
    for msg in read_topic(config, config.topics.raw):
        if header(msg, CONTROL_HEADER) is None:
            raw.add((msg.topic(), msg.partition(), msg.offset()))
    archived = archive_identities(Path(archive_dir or config.streaming.archive_dir))
    dead, late = side_identities(config)
    report = AuditReport()
    for ident in sorted(raw):
        part = report.partitions.setdefault(ident[:2], PartitionAudit())
        part.raw += 1
        places = [archived[ident] > 0, ident in dead, ident in late]
        part.archived += places[0]
        part.dead_letters += places[1]
        part.late += places[2]
        part.duplicated += max(0, archived[ident] - 1)
        if not any(places):
            part.lost += 1
            report.examples.append(f"lost: {ident[0]}[{ident[1]}]@{ident[2]}")
        elif sum(places) > 1:
            part.conflicting += 1
            report.examples.append(f"in several places: {ident[0]}[{ident[1]}]@{ident[2]}")
        if archived[ident] > 1:
            report.examples.append(f"archived {archived[ident]} times: {ident[0]}[{ident[1]}]@{ident[2]}")
    report.unknown_rows = sum(n for ident, n in archived.items() if ident not in raw)
    return report
