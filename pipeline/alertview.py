"""Alerts as text for a person, one way: ``pipeline alerts`` (the alerting rules run offline over a
scores file) and the demo's summary (the alerter stage's alerts, read from the alerts topic) print
the same lines. An alert here is the alerts topic's record (``alerting.alert_record``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pipeline.alerting import alert_record, alerts_from_rows
from pipeline.config import AlertingConfig
from pipeline.normalise import entities
from pipeline.ranking import raw_lines
from pipeline.safetext import printable
from pipeline.scorefile import read_scores


def offline_alerts(scores_path: str | Path, config: AlertingConfig,
                   input_path: str | Path | None = None) -> tuple[list[dict], int]:
    """(alert records, events read): the alerter's decisions over a scores file or archive
    directory, window by window as the stage takes them; ``input_path`` (the scored log) fills in
    each alert's raw line."""
    rows = read_scores(scores_path)
    raw = raw_lines(input_path, {r.line for r in rows if r.line is not None}) if input_path else None
    return [alert_record(a) for a in alerts_from_rows(rows, config, raw)], len(rows)


def alert_score(alert: dict) -> float:
    """What an alert ranks by: its score (normalised, alerting.normalise), else its loss."""
    score = alert.get("score")
    return alert["loss"] if score is None else score


def highest(alerts: list[dict], limit: int) -> list[dict]:
    """The ``limit`` highest-scoring alerts, highest first (ties keep their order)."""
    return sorted(alerts, key=lambda a: -alert_score(a))[:limit]


def alert_lines(alerts: list[dict], limit: int) -> list[str]:
    """The ``limit`` highest-scoring alerts: rank, score (when normalised), loss, line, window,
    entities, then the raw line and one line per reason."""
    lines = []
    for rank, a in enumerate(highest(alerts, limit), start=1):
        # entities, raw line and reasons carry log text: printable() each
        entities = " ".join(f"{k}={v}" for k, v in a["entities"].items())
        score = "" if alert_score(a) == a["loss"] else f"score {alert_score(a):.3f}  "
        lines.append(f"{rank:>3}. {score}loss {a['loss']:.3f}  line {a['line']}  "
                     f"window {a['window']}  {printable(entities)}")
        if a["raw"]:
            lines.append(f"     {printable(a['raw'])}")
        lines += [f"     - {printable(reason)}" for reason in a["reasons"]]
    return lines


def precision_line(alerts: list[dict], labels: Mapping[int, int], k: int) -> str:
    """The share of the ``k`` highest-scoring alerts whose line is labelled anomalous."""
    top = highest(alerts, k)
    hits = sum(labels.get(a["line"], 0) for a in top)
    return f"precision of the top {len(top)} alerts: {hits / max(len(top), 1):.2f}"


def offline_report(scores_path: str | Path, config: AlertingConfig, limit: int,
                   input_path: str | Path | None = None,
                   labels: Mapping[int, int] | None = None) -> str:
    """The text ``pipeline alerts`` prints: a count, the top ``limit`` alerts and, with labels,
    their precision."""
    alerts, events = offline_alerts(scores_path, config, input_path)
    shown = min(limit, len(alerts))
    by = "normalised score" if entities(config.normalise) else "loss"
    lines = [f"{len(alerts)} alerts from {events} events; top {shown} by {by}:",
             *alert_lines(alerts, limit)]
    if labels is not None:
        lines.append(precision_line(alerts, labels, limit))
    return "\n".join(lines)
