"""``pipeline audit``: every raw record must end as exactly one archive row, or a dead letter,
or a late event. Reconciles the raw topic against the archive and the side topics, per raw
topic-partition and in total.

Dead letters and late events may repeat under at-least-once delivery (the same identity twice):
that is not a loss, so they count by distinct identity. The archive is the deduplicating sink,
so an identity on two archive rows is an error, as is an event both archived and dead-lettered.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import click
from confluent_kafka import Message

from pipeline import topicread
from pipeline.brokerwatch import require_broker
from pipeline.config import Config
from pipeline.kafka import bootstrap_servers, make_admin
from pipeline.runner import header
from pipeline.scorefile import iter_scores, window_files
from pipeline.serde import DecodeError, codec
from pipeline.source_audit import SourceAudit, archive_lines, event_lines, reconcile
from pipeline.topicrecords import CONTROL_HEADER, END_OF_INPUT, LINE_HEADER, identity, line_number

Identity = tuple[str, int, int]


def require_topics(config: Config, names: list[str]) -> None:
    """One clear line (click error, exit 1) when the broker is unreachable or lacks a topic,
    instead of a consumer waiting for partitions that never come."""
    bootstrap = bootstrap_servers(config)
    existing = require_broker(make_admin(config), bootstrap).topics  # all topics: creates none
    missing = [name for name in names if name not in existing]
    if missing:
        raise click.ClickException(
            f"topic {', '.join(missing)} does not exist on the Kafka broker at {bootstrap}: the "
            f"broker lost its data (a memory:// broker loses everything when it stops) or the "
            f"config names other topics (with a demo, use --workdir DIR)")


def read_topic(config: Config, topic: str, timeout: float = 300.0) -> Iterator[Message]:
    """Every record of ``topic`` from the start to its end (pipeline/topicread.py), after
    checking that it exists; one clear line if the end cannot be reached."""
    require_topics(config, [topic])
    try:
        yield from topicread.read_topic(config, topic, timeout=timeout)
    except TimeoutError as exc:
        raise click.ClickException(f"{exc}: is the Kafka broker at {bootstrap_servers(config)} "
                                   f"still up?") from None


@dataclass
class PartitionAudit:
    raw: int = 0
    archived: int = 0
    dead_letters: int = 0
    late: int = 0
    lost: int = 0
    pending: int = 0  # in a window still open (on a live bus): no outcome yet, not lost
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
    source: SourceAudit | None = None  # against the input file (audit --input)
    archive_problem: str | None = None  # no archive to audit against (archive_problem())
    pending_windows: set[int] = field(default_factory=set)  # windows the pending events are in

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
        return self.total.ok and not self.unknown_rows and (self.source is None or self.source.ok)

    def as_dict(self) -> dict:
        """The figures as JSON-able data (``pipeline audit --json``)."""
        return {"ok": self.ok, "total": asdict(self.total),
                "partitions": {f"{t}[{p}]": asdict(a) for (t, p), a in self.partitions.items()},
                "unknown_rows": self.unknown_rows,
                "archive_problem": self.archive_problem,
                "pending_windows": sorted(self.pending_windows),
                "input": self.source.as_dict() if self.source else None}

    def format(self) -> str:
        columns = ["raw", "archived", "dead_letters", "late", "pending", "lost", "duplicated",
                   "conflicting"]
        lines = [f"{'topic[partition]':<32}" + "".join(f"{c:>13}" for c in columns)]
        rows = sorted(self.partitions.items()) + [(("total", -1), self.total)]
        for (topic, partition), part in rows:
            name = topic if partition < 0 else f"{topic}[{partition}]"
            lines.append(f"{name:<32}" + "".join(f"{getattr(part, c):>13}" for c in columns))
        if self.unknown_rows:
            lines.append(f"archive rows whose raw record is not in the raw topic (deleted by "
                         f"retention, or another topic's archive?): {self.unknown_rows}")
        lines += self.examples[:10]
        if self.archive_problem is not None:
            lines.append(self.archive_problem)
        if self.source is not None:
            lines.append(self.source.format())
        if self.total.pending:
            shown = ", ".join(map(str, sorted(self.pending_windows)[:10]))
            more = ", ..." if len(self.pending_windows) > 10 else ""
            lines.append(f"pending: {self.total.pending} event(s) in windows still open ({shown}{more}; "
                         f"on a live bus, until event time passes them on every partition): audit "
                         f"again once they are closed and archived")
        if not self.ok:
            lines.append("audit: FAILED")
        elif self.total.pending:
            lines.append(f"audit: OK so far: every raw record accounted for exactly once, but "
                         f"{self.total.pending} pending in open windows")
        else:
            lines.append("audit: OK, every raw record accounted for exactly once")
        return "\n".join(lines)


def archive_problem(directory: Path) -> str | None:
    """Why ``directory`` holds no archive yet, for a report whose every record would read as
    lost; None when it has window files."""
    if directory.is_dir() and window_files(directory):
        return None
    what = "has no window files" if directory.is_dir() else "does not exist"
    return (f"archive {directory} {what}: has the archiver archived a window yet, and is "
            f"--workdir or --archive the directory it writes (streaming.archive_dir)?")


def archive_identities(directory: Path) -> Counter:
    rows: Counter = Counter()
    if directory.is_dir():  # none yet: nothing archived
        rows.update(row.source for row in iter_scores(directory) if row.source is not None)
    return rows


def side_identities(config: Config, seen: list | None = None) -> tuple[set[Identity], set[Identity]]:
    """Raw-record identities dead-lettered and late; (identity, line) of each into ``seen``."""
    dead: set[Identity] = set()
    late: set[Identity] = set()
    for msg in read_topic(config, config.topics.dead_letters):
        try:
            _, record = codec().decode(msg.value(), expected=("salka.DeadLetter",))
        except DecodeError:
            continue
        if record["source"]["topic"] == config.topics.raw:
            dead.add(identity(record))
            if seen is not None:
                seen.append((identity(record), record["line"]))
    for msg in read_topic(config, config.topics.late):
        try:
            _, record = codec().decode(msg.value(), expected=("salka.LateEvent",))
        except DecodeError:
            continue
        late.add(identity(record["event"]))
        if seen is not None:
            seen.append((identity(record["event"]), record["event"]["line"]))
    return dead, late


def pending_identities(config: Config, candidates: set[Identity]) -> dict[Identity, int]:
    """Of ``candidates`` (raw records with no outcome), those the windower forwarded into a window
    it has not closed yet (on a live bus the newest ones stay open until event time passes them
    on every partition), with that window: not lost, not done either. Windows close in order,
    so every window up to the newest completion record is closed."""
    forwarded: dict[Identity, int] = {}
    closed_through: int | None = None
    for msg in read_topic(config, config.topics.windows):
        try:
            name, record = codec().decode(msg.value(), expected=("salka.WindowedEvent",
                                                                 "salka.WindowComplete"))
        except DecodeError:
            continue
        window = record["window"]
        if name == "salka.WindowComplete":
            closed_through = window if closed_through is None else max(closed_through, window)
        elif (ident := identity(record["event"])) in candidates:
            forwarded[ident] = window
    return {ident: window for ident, window in forwarded.items()
            if closed_through is None or window > closed_through}


def audit(config: Config, archive_dir: Path | None = None,
          input_path: Path | None = None) -> AuditReport:
    """Reconcile the raw topic; with ``input_path``, also the file it was produced from."""
    raw: set[Identity] = set()
    raw_lines: list[tuple[Identity, int | None]] = []
    ended: set[int] = set()  # raw partitions with an end-of-input record
    for msg in read_topic(config, config.topics.raw):
        control = header(msg, CONTROL_HEADER)
        if control is None:
            ident = (msg.topic(), msg.partition(), msg.offset())
            raw.add(ident)
            raw_lines.append((ident, line_number(header(msg, LINE_HEADER)) or None))
        elif control == END_OF_INPUT:
            ended.add(msg.partition())
    archive = Path(archive_dir or config.streaming.archive_dir)
    archived = archive_identities(archive)
    seen: list[tuple[Identity, int | None]] = []
    dead, late = side_identities(config, seen)
    report = AuditReport(archive_problem=archive_problem(archive))
    unaccounted = {ident for ident in raw if not archived[ident] and ident not in dead
                   and ident not in late}
    # After an end of input on every partition nothing may still be open: the windower closed
    # every window then, or it is not running (pending would hide that).
    over = config.streaming.end_of_input and {p for _, p, _ in raw} <= ended
    pending = pending_identities(config, unaccounted) if unaccounted and not over else {}
    report.pending_windows = set(pending.values())
    for ident in sorted(raw):
        part = report.partitions.setdefault(ident[:2], PartitionAudit())
        part.raw += 1
        places = [archived[ident] > 0, ident in dead, ident in late]
        part.archived += places[0]
        part.dead_letters += places[1]
        part.late += places[2]
        part.duplicated += max(0, archived[ident] - 1)
        if ident in pending:
            part.pending += 1
        elif not any(places):
            part.lost += 1
            report.examples.append(f"lost: {ident[0]}[{ident[1]}]@{ident[2]}")
        elif sum(places) > 1:
            part.conflicting += 1
            report.examples.append(f"in several places: {ident[0]}[{ident[1]}]@{ident[2]}")
        if archived[ident] > 1:
            report.examples.append(f"archived {archived[ident]} times: {ident[0]}[{ident[1]}]@{ident[2]}")
    report.unknown_rows = sum(n for ident, n in archived.items() if ident not in raw)
    if input_path is not None:
        expected, header_rows = event_lines(config, input_path)
        outcomes = [*archive_lines(Path(archive_dir or config.streaming.archive_dir),
                                   config.topics.raw), *seen]
        pending_lines = {line for ident, line in raw_lines if ident in pending and line is not None}
        report.source = reconcile(input_path, expected, header_rows, raw_lines, outcomes, pending_lines)
    return report
