"""``pipeline audit --input FILE``: reconcile the pipeline's outcomes against the input file.

The raw-topic audit (``pipeline.audit``) trusts the raw topic: a record the broker lost after
acknowledging it, or stored twice under new offsets, is invisible to it. Here the yardstick is
the file ``pipeline produce`` published: every line but a header row must end exactly once, as
an archive row, a dead letter (of the tokenizer, or of ``produce`` for a line too large for
Kafka) or a late event, found by its line number (the ``salka.line`` header, carried into every
record downstream). Reported, by line number:

- missing: a line with no outcome at all (lost at the broker, never produced, or still in flight);
- duplicated: a line on two raw records, or with two distinct outcomes (stored twice);
- unexpected: a line number the file does not have as an event (another file's records?).

Dead letters and late events may repeat under at-least-once delivery with the same identity:
outcomes count by distinct identity, as in the raw-topic audit.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config
from pipeline.parsing import HeaderRow, LineParser, read_lines
from pipeline.scorefile import iter_scores

Identity = tuple[str, int, int]
SHOWN = 20  # line numbers listed per kind in the text report


@dataclass
class SourceAudit:
    path: str
    lines: int = 0  # lines that should be events: every line but header rows
    header_rows: int = 0
    published: int = 0  # lines with at least one raw record
    accounted: int = 0  # lines with at least one outcome
    missing: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    unexpected: list[int] = field(default_factory=list)
    not_published: list[int] = field(default_factory=list)  # missing and not on the raw topic
    pending: list[int] = field(default_factory=list)  # no outcome yet: in a window still open

    @property
    def ok(self) -> bool:
        return not (self.missing or self.duplicated or self.unexpected)

    def format(self) -> str:
        out = [f"input file {self.path}: {self.lines} event lines ({self.header_rows} header rows), "
               f"{self.published} on the raw topic, {self.accounted} accounted for"]
        for name, numbers, why in (
                ("missing", self.missing, "no archive row, dead letter or late event"),
                ("duplicated", self.duplicated, "on two raw records or with two outcomes"),
                ("unexpected", self.unexpected, "line numbers that are not events of this file")):
            if numbers:
                shown = ", ".join(map(str, numbers[:SHOWN]))
                more = f" and {len(numbers) - SHOWN} more" if len(numbers) > SHOWN else ""
                out.append(f"  {name} lines ({why}): {len(numbers)}: {shown}{more}")
        if self.not_published:
            out.append(f"  of the missing, not on the raw topic at all: {len(self.not_published)}")
        if self.pending:
            out.append(f"  pending lines (in windows still open, not missing): {len(self.pending)}")
        if not self.ok:
            out.append("input audit: FAILED")
        elif self.pending:
            out.append(f"input audit: OK so far: every line accounted for exactly once, but "
                       f"{len(self.pending)} pending in open windows")
        else:
            out.append("input audit: OK, every line accounted for exactly once")
        return "\n".join(out)

    def as_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "lines": self.lines,
                "header_rows": self.header_rows, "published": self.published,
                "accounted": self.accounted, "missing": self.missing,
                "duplicated": self.duplicated, "unexpected": self.unexpected,
                "not_published": self.not_published, "pending": self.pending}


def event_lines(config: Config, path: str | Path) -> tuple[set[int], int]:
    """The file's line numbers that ``pipeline produce`` publishes, and its header-row count."""
    parser = LineParser(config.input)
    lines: set[int] = set()
    headers = 0
    for number, raw in read_lines(path):
        if isinstance(parser.parse(raw.rstrip(b"\r\n"), number), HeaderRow):
            headers += 1
        else:
            lines.add(number)
    return lines, headers


def archive_lines(directory: Path, raw_topic: str) -> Iterable[tuple[Identity, int | None]]:
    if not Path(directory).is_dir():  # none yet: nothing archived
        return
    for row in iter_scores(directory):
        if row.source is not None and row.source[0] == raw_topic:
            yield row.source, row.line


def reconcile(path: str | Path, expected: set[int], header_rows: int,
              raw: Iterable[tuple[Identity, int | None]],
              outcomes: Iterable[tuple[Identity, int | None]],
              pending: Collection[int] = ()) -> SourceAudit:
    """Pure: file line numbers vs (identity, line) of raw records and of outcomes (archive rows,
    raw-record dead letters, late events). A ``produce`` dead letter has no raw record: its
    identity is (topic, -1, -1), so it is keyed by its line. ``pending``: lines in windows still
    open, which have no outcome yet without being missing."""
    copies: dict[int, set[Identity]] = defaultdict(set)
    for ident, line in raw:
        if line is not None:
            copies[line].add(ident)
    ends: dict[int, set] = defaultdict(set)
    for ident, line in outcomes:
        if line is not None:
            ends[line].add(ident if ident[1] >= 0 else ("produce", line))
    report = SourceAudit(str(path), lines=len(expected), header_rows=header_rows)
    report.published = sum(1 for n in expected if copies.get(n))
    report.accounted = sum(1 for n in expected if ends.get(n))
    report.missing = sorted(n for n in expected if not ends.get(n) and n not in pending)
    report.pending = sorted(n for n in expected if not ends.get(n) and n in pending)
    report.not_published = [n for n in report.missing if not copies.get(n)]
    report.duplicated = sorted(n for n in expected if len(copies.get(n, ())) > 1 or len(ends.get(n, ())) > 1)
    report.unexpected = sorted((set(copies) | set(ends)) - expected)
    return report
