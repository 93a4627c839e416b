"""Evaluation of a scores file against labels (for research; salka never trains on labels)."""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipeline.alerting import row_scores
from pipeline.config import AlertingConfig
from pipeline.errors import InputError, naming
from pipeline.normalise import entities
from pipeline.scorefile import ScoreRow, read_scores
from pipeline.stats import detection_scores, midrank_percentiles

# Labels: 0/1 or false/true, nothing looser ("yes", "-", "attack" were once guessed at).
LABEL_VALUES = {"0": 0, "1": 1, "false": 0, "true": 1}
LABELS_FORMAT = ("a labels file is a comma-separated CSV whose header names the columns line and "
                 "label, one row per labelled line, labels 0/1 or true/false")


def read_labels(path: str | Path) -> dict[int, int]:
    """A labels CSV -> {line: 0 or 1}. The header names ``line`` and ``label`` (any order; other
    columns are ignored); lines not listed count as normal. Anything else stops with the file and
    row (``labels.csv:7``) rather than being read by position and guessed at."""
    labels: dict[int, int] = {}
    first_row: dict[int, int] = {}
    try:
        with naming(path), open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip().lower() for name in next(reader, [])]
            if "line" not in header or "label" not in header:
                hint = " (';' separated? use commas)" if ";" in "".join(header) else ""
                raise InputError(f"{path}:1: header {','.join(header)!r} does not name the columns "
                                 f"line and label{hint}; {LABELS_FORMAT}")
            line_at, label_at = header.index("line"), header.index("label")
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    raise InputError(f"{where}: {len(row)} columns, the header has {len(header)}; "
                                     f"{LABELS_FORMAT}")
                line, label = row[line_at].strip(), row[label_at].strip().lower()
                if not re.fullmatch(r"[0-9]+", line) or int(line) < 1:
                    raise InputError(f"{where}: line {row[line_at]!r} is not a line number "
                                     f"(a positive integer); {LABELS_FORMAT}")
                if label not in LABEL_VALUES:
                    raise InputError(f"{where}: label {row[label_at]!r} is not 0/1 or true/false; "
                                     f"{LABELS_FORMAT}")
                if int(line) in labels:
                    raise InputError(f"{where}: line {line} is labelled again (first at row "
                                     f"{first_row[int(line)]}); give each line once")
                labels[int(line)] = LABEL_VALUES[label]
                first_row[int(line)] = reader.line_num
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); {LABELS_FORMAT}") from exc
    except csv.Error as exc:
        raise InputError(f"{path}:{reader.line_num}: broken CSV ({exc}); {LABELS_FORMAT}") from exc
    return labels


def scored_truth(rows: list[ScoreRow], labels: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(losses, 0/1 labels) of the scored rows, in row order; lines not labelled count as normal,
    as do rows without a line number (Kafka input)."""
    scored = [r for r in rows if r.loss is not None]
    return (np.array([r.loss for r in scored], dtype=np.float64),
            np.array([1 if labels.get(r.line, 0) else 0 for r in scored], dtype=np.int64))


def precision_at_k(truth: np.ndarray, losses: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """{k: share of labelled events among the k highest losses} for each k <= the events; ties
    keep their order (a stable sort), so the result does not depend on the sort algorithm."""
    ranked = truth[np.argsort(-losses, kind="stable")]
    return {str(k): float(ranked[:k].mean()) for k in ks if k <= len(ranked)}


def ranking_values(rows: list[ScoreRow], alerting: AlertingConfig | None) -> np.ndarray | None:
    """The entity-normalised scores (pipeline.alerting.row_scores) of the scored rows, in
    ``scored_truth``'s order: what ``pipeline top``, the alerts and the report rank by. None when
    ``alerting`` is None or its ``normalise`` is empty: then the loss itself is the ranking."""
    if alerting is None or not entities(alerting.normalise):
        return None
    scores = row_scores(rows, alerting)  # None exactly where the loss is None
    return np.array([s for r, s in zip(rows, scores) if r.loss is not None], dtype=np.float64)


def detection_metrics(truth: np.ndarray, values: np.ndarray, ks: tuple[int, ...]) -> dict | None:
    """ROC AUC, average precision, precision@k and the average red-team percentile of one
    ranking (``values``, higher = more anomalous); None without both labelled and normal events."""
    detection = detection_scores(truth, values)
    if detection is None:
        return None
    return {"roc_auc": detection[0], "average_precision": detection[1],
            "precision_at_k": precision_at_k(truth, values, ks),
            "mean_percentile_of_positives": float(midrank_percentiles(values)[truth == 1].mean())}


def evaluate_rows(rows: list[ScoreRow], labels: Mapping[int, int], ks: tuple[int, ...] = (10, 50, 100),
                  alerting: AlertingConfig | None = None) -> dict:
    """:func:`evaluate` of rows already read (``read_scores``) and labels (``read_labels``)."""
    losses, truth = scored_truth(rows, labels)
    result: dict = {
        "events": len(rows),
        "scored": len(losses),
        "unscored": len(rows) - len(losses),
        "positives": int(truth.sum()),
        "positives_unscored": sum(labels.get(r.line, 0) for r in rows if r.loss is None),
    }
    by_loss = detection_metrics(truth, losses, ks)
    if by_loss is None:
        result["error"] = "need both labelled and normal scored events"
        return result
    result.update(by_loss)  # the loss's metrics keep the top-level keys they always had
    scores = ranking_values(rows, alerting)
    if scores is not None:
        result["score"] = {"normalise": entities(alerting.normalise),
                           **detection_metrics(truth, scores, ks)}
    return result


def evaluate(scores_path: str | Path, labels_path: str | Path, ks: tuple[int, ...] = (10, 50, 100),
             alerting: AlertingConfig | None = None) -> dict:
    """ROC AUC, average precision, precision@k and the average red-team percentile.

    The percentile metric (Tuor et al. 2018) is the mean, over labelled events, of the
    percentage of scored events whose loss is below theirs: 100 is perfect, 50 is chance.
    Events of the first window carry no score and are left out (counted in ``unscored``).
    The top-level metrics rank by the raw loss. With ``alerting`` whose ``normalise`` names
    entities, ``score`` holds the same metrics (and ``normalise``) for the entity-normalised
    score that ``pipeline top``, the alerts and the report rank by, over the same events.
    """
    labels = read_labels(labels_path)  # first: a wrong labels file is named before a long read
    return evaluate_rows(read_scores(scores_path), labels, ks, alerting)


def format_report(result: dict) -> str:
    lines = [
        f"events: {result['events']} (scored {result['scored']}, first window unscored "
        f"{result['unscored']})",
        f"labelled anomalous among scored: {result['positives']}"
        f" (+{result['positives_unscored']} in unscored windows)",
    ]
    if "error" in result:
        return "\n".join([*lines, f"cannot evaluate: {result['error']}"])
    if "score" in result:
        return "\n".join([*lines, *_side_by_side(result["score"], result)])
    lines += [
        f"ROC AUC: {result['roc_auc']:.4f}",
        f"average precision: {result['average_precision']:.4f}",
        *(f"precision@{k}: {v:.3f}" for k, v in result["precision_at_k"].items()),
        f"average percentile of anomalous events: {result['mean_percentile_of_positives']:.2f}",
    ]
    return "\n".join(lines)


def _side_by_side(score: dict, loss: dict) -> list[str]:
    """The two rankings' metrics as a table, one column each: the score's first (it is what
    the alerts rank by), the loss beside it for comparison."""
    def metric(key: str):
        return lambda metrics: metrics[key]

    def at(k: str):
        return lambda metrics: metrics["precision_at_k"][k]

    rows = [("ROC AUC", metric("roc_auc"), ".4f"), ("average precision", metric("average_precision"), ".4f"),
            *((f"precision@{k}", at(k), ".3f") for k in loss["precision_at_k"]),
            ("average percentile of anomalous events", metric("mean_percentile_of_positives"), ".2f")]
    width = max(len(label) for label, _, _ in rows)
    return [f"score: the loss for its {', '.join(score['normalise'])} (alerting.normalise), as top and "
            f"the alerts rank; loss: the raw loss",
            f"{'':<{width}}  {'score':>8}  {'loss':>8}",
            *(f"{label:<{width}}  {format(get(score), spec):>8}  {format(get(loss), spec):>8}"
              for label, get, spec in rows)]
