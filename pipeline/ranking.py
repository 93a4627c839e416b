"""``pipeline top``: scored events and entities (users, hosts) ranked by loss, or by the
entity-normalised score when an ``alerting`` config with ``normalise`` is given (as the CLI does:
pipeline/normalise.py), as terminal tables and CSV exports; the rankings are shared with the HTML
report."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Mapping
from pathlib import Path

from pipeline.alerting import row_scores
from pipeline.atomic import atomic_text
from pipeline.config import AlertingConfig
from pipeline.normalise import entities
from pipeline.parsing import read_lines
from pipeline.safetext import csv_cell, printable
from pipeline.scorefile import ScoreRow

log = logging.getLogger(__name__)
Scores = Mapping[int, float]  # id(row) -> the score it ranks by, for the scored rows


def raw_lines(path: str | Path, wanted: set[int]) -> dict[int, str]:
    """The text of the wanted physical lines of a log file."""
    found = {}
    for number, raw in read_lines(path):
        if number in wanted:
            found[number] = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    missing = sorted(wanted - found.keys())
    if missing:  # a shorter log than the scores': the raw-line column would be blank, unexplained
        log.warning("%s has no line %d%s: is it the log these scores came from? (--input)", path,
                    missing[0], f" nor {len(missing) - 1} more" if len(missing) > 1 else "")
    return found


def line_number(row: ScoreRow) -> int:
    """The row's line number, -1 where it has none (Kafka input without line numbers)."""
    return -1 if row.line is None else row.line


def entity_columns(rows: list[ScoreRow]) -> list[str]:
    """The entity columns of a scores file, in file order."""
    return list(rows[0].entities) if rows else []


def columns_for(rows: list[ScoreRow], entity: str) -> list[str]:
    """The entity columns an entity kind covers: the column of that exact name, else every entity
    column whose name contains it (``host`` -> ``src_host`` and ``dst_host``)."""
    columns = entity_columns(rows)
    if entity in columns:
        return [entity]
    matches = [c for c in columns if entity.lower() in c.lower()]
    if not matches and rows:
        known = ", ".join(columns) or "none"
        raise ValueError(f"no entity column matches {entity!r}; entity columns: {known}")
    return matches


def entity_values(row: ScoreRow, columns: list[str]) -> list[str]:
    """The distinct non-empty values of the row's columns (an event from a host to itself counts once)."""
    seen: list[str] = []
    for column in columns:
        value = row.entities.get(column) or ""
        if value and value not in seen:
            seen.append(value)
    return seen


def ranking_scores(rows: list[ScoreRow], alerting: AlertingConfig | None = None) -> Scores:
    """What each scored row ranks by: its normalised score when ``alerting.normalise`` names
    entities (computed over ``rows``, window by window, as the alerter does), else its loss."""
    scores = row_scores(rows, alerting) if alerting is not None else [r.loss for r in rows]
    return {id(r): s for r, s in zip(rows, scores) if s is not None}


def normalised(alerting: AlertingConfig | None) -> bool:
    return alerting is not None and bool(entities(alerting.normalise))


def top_events(rows: list[ScoreRow], limit: int | None, scores: Scores | None = None) -> list[ScoreRow]:
    """The ``limit`` highest-ranked scored rows: by ``scores`` (``ranking_scores``), else by loss."""
    if scores is None:
        scores = ranking_scores(rows)
    scored = [r for r in rows if id(r) in scores]
    # Ties break by line so the listing is stable.
    return sorted(scored, key=lambda r: (-scores[id(r)], line_number(r)))[:limit]


def entity_ranking(rows: list[ScoreRow], entity: str, limit: int | None = None,
                   scores: Scores | None = None) -> list[dict]:
    """Entities (values of the ``entity`` columns, see :func:`columns_for`) ranked by their worst event.

    Each entry: ``entity`` (the value), ``max_score`` (its worst event's score: ``scores``, else
    the loss), ``max_loss``, ``mean_loss`` (over its scored events), ``scored``, ``events``
    (including unscored ones), ``top1pct`` (how many of its events are among the top 1% of all
    scored events, at least one event: ranked by score, ties by line), ``worst_line`` and
    ``worst_window`` (the event with the highest score). Entities with no scored event are left
    out. Sorted by max score descending, then by name.
    """
    columns = columns_for(rows, entity)
    if scores is None:
        scores = ranking_scores(rows)
    scored = top_events(rows, None, scores)
    top_count = max(1, math.ceil(len(scored) / 100)) if scored else 0
    top_ids = {id(r) for r in scored[:top_count]}
    stats: dict[str, dict] = {}
    for row in rows:
        for value in entity_values(row, columns):
            entry = stats.setdefault(value, {"entity": value, "max_score": -math.inf,
                                             "max_loss": -math.inf, "sum": 0.0,
                                             "scored": 0, "events": 0, "top1pct": 0,
                                             "worst_line": -1, "worst_window": -1, "_key": None})
            entry["events"] += 1
            if id(row) not in scores:
                continue
            loss = row.loss
            entry["scored"] += 1
            entry["sum"] += loss
            entry["top1pct"] += id(row) in top_ids
            key = (-scores[id(row)], line_number(row))
            if entry["_key"] is None or key < entry["_key"]:
                entry.update(_key=key, max_score=scores[id(row)], max_loss=loss,
                             worst_line=line_number(row), worst_window=row.window)
    ranking = []
    for entry in stats.values():
        if not entry["scored"]:
            continue
        entry["mean_loss"] = entry.pop("sum") / entry["scored"]
        del entry["_key"]
        ranking.append(entry)
    ranking.sort(key=lambda e: (-e["max_score"], e["entity"]))
    return ranking[:limit]


def _table(rows: list[list[str]], right: set[int] = frozenset()) -> str:
    # Every cell may hold log text (entity names, raw lines): escape control characters here,
    # the one place the terminal tables are drawn, and before measuring widths.
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    def cell(i: int, text: str) -> str:
        return text.rjust(widths[i]) if i in right else text.ljust(widths[i])

    return "\n".join("  ".join(cell(i, c) for i, c in enumerate(r)).rstrip() for r in rows)


def format_top_events(rows: list[ScoreRow], limit: int, input_path: str | Path | None = None,
                      alerting: AlertingConfig | None = None) -> str:
    table = top_events_table(rows, limit, input_path, alerting)
    return _table(table) if len(table) > 1 else "no scored events"


def top_events_table(rows: list[ScoreRow], limit: int, input_path: str | Path | None = None,
                     alerting: AlertingConfig | None = None) -> list[list[str]]:
    """Header and one row per top event (raw, unescaped cells); a score column first when
    ``alerting`` normalises."""
    scores = ranking_scores(rows, alerting)
    top = top_events(rows, limit, scores)
    wanted = {line_number(r) for r in top} - {-1}
    raw = raw_lines(input_path, wanted) if input_path and wanted else {}
    columns = entity_columns(top)
    with_score = normalised(alerting)
    header = ["rank", *(["score"] if with_score else []), "loss", "line", "window", *columns]
    table = [header + (["raw line"] if raw else [])]
    for rank, row in enumerate(top, start=1):
        cells = [str(rank), *([f"{scores[id(row)]:.3f}"] if with_score else []), f"{row.loss:.3f}",
                 row["line"], row["window"], *(row.entities[c] for c in columns)]
        if raw:
            cells.append(raw.get(line_number(row), ""))
        table.append(cells)
    return table


def format_entity_ranking(rows: list[ScoreRow], entity: str, limit: int,
                          input_path: str | Path | None = None,
                          alerting: AlertingConfig | None = None) -> str:
    table = entity_ranking_table(rows, entity, limit, input_path, alerting)
    numeric = set(range(2, len(table[0]) - 1 if len(table[0]) and table[0][-1] == "raw line"
                        else len(table[0]))) | {0}
    return _table(table, right=numeric) if len(table) > 1 else "no scored events"


def entity_ranking_table(rows: list[ScoreRow], entity: str, limit: int,
                         input_path: str | Path | None = None,
                         alerting: AlertingConfig | None = None) -> list[list[str]]:
    """Header and one row per ranked entity (raw, unescaped cells); a max score column when
    ``alerting`` normalises."""
    ranking = entity_ranking(rows, entity, limit, ranking_scores(rows, alerting))
    wanted = {e["worst_line"] for e in ranking} - {-1}
    raw = raw_lines(input_path, wanted) if input_path and wanted else {}
    with_score = normalised(alerting)
    header = ["rank", entity, *(["max score"] if with_score else []), "max loss", "mean loss",
              "scored", "top 1%", "worst line", "window"]
    table = [header + (["raw line"] if raw else [])]
    for rank, e in enumerate(ranking, start=1):
        cells = [str(rank), e["entity"], *([f"{e['max_score']:.3f}"] if with_score else []),
                 f"{e['max_loss']:.3f}", f"{e['mean_loss']:.3f}", str(e["scored"]),
                 str(e["top1pct"]), str(e["worst_line"]) if e["worst_line"] >= 0 else "",
                 str(e["worst_window"]) if e["worst_window"] >= 0 else ""]
        if raw:
            cells.append(raw.get(e["worst_line"], ""))
        table.append(cells)
    return table


def format_top(rows: list[ScoreRow], limit: int, by: str = "event",
               input_path: str | Path | None = None, alerting: AlertingConfig | None = None) -> str:
    """The terminal table of ``pipeline top --by``: the highest-ranked events (``event``), or the
    users or hosts whose worst event is the most anomalous (``user``, ``host``; any entity column
    name or part of one also works); ranked by the normalised score when ``alerting`` normalises,
    else by loss. Raises ValueError for an entity no column matches."""
    if by == "event":
        return format_top_events(rows, limit, input_path, alerting)
    return format_entity_ranking(rows, by, limit, input_path, alerting)


def write_top_csv(path: str | Path, rows: list[ScoreRow], limit: int, by: str = "event",
                  input_path: str | Path | None = None,
                  alerting: AlertingConfig | None = None) -> int:
    """The ``pipeline top`` table as a plain CSV for a spreadsheet (an export humans open):
    formula-leading cells are neutralised with :func:`pipeline.safetext.csv_cell`. Returns the
    number of data rows."""
    if by == "event":
        table = top_events_table(rows, limit, input_path, alerting)
    else:
        table = entity_ranking_table(rows, by, limit, input_path, alerting)
    with atomic_text(path) as handle:
        csv.writer(handle).writerows([csv_cell(c) for c in r] for r in table)
    return len(table) - 1
