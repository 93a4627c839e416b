"""Evaluation of a scores file against labels (for research; salka never trains on labels)."""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipeline.errors import InputError
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
        with open(path, newline="", encoding="utf-8-sig") as handle:
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


def evaluate(scores_path: str | Path, labels_path: str | Path, ks: tuple[int, ...] = (10, 50, 100)) -> dict:
    """ROC AUC, average precision, precision@k and the average red-team percentile.

    The percentile metric (Tuor et al. 2018) is the mean, over labelled events, of the
    percentage of scored events whose loss is below theirs: 100 is perfect, 50 is chance.
    Events of the first window carry no score and are left out (counted in ``unscored``).
    """
    labels = read_labels(labels_path)
    rows = read_scores(scores_path)
    losses, truth = scored_truth(rows, labels)
    result: dict = {
        "events": len(rows),
        "scored": len(losses),
        "unscored": len(rows) - len(losses),
        "positives": int(truth.sum()),
        "positives_unscored": sum(labels.get(r.line, 0) for r in rows if r.loss is None),
    }
    detection = detection_scores(truth, losses)
    if detection is None:
        result["error"] = "need both labelled and normal scored events"
        return result
    result["roc_auc"], result["average_precision"] = detection
    result["precision_at_k"] = precision_at_k(truth, losses, ks)
    result["mean_percentile_of_positives"] = float(midrank_percentiles(losses)[truth == 1].mean())
    return result


def format_report(result: dict) -> str:
    lines = [
        f"events: {result['events']} (scored {result['scored']}, first window unscored "
        f"{result['unscored']})",
        f"labelled anomalous among scored: {result['positives']}"
        f" (+{result['positives_unscored']} in unscored windows)",
    ]
    if "error" in result:
        return "\n".join([*lines, f"cannot evaluate: {result['error']}"])
    lines += [
        f"ROC AUC: {result['roc_auc']:.4f}",
        f"average precision: {result['average_precision']:.4f}",
        *(f"precision@{k}: {v:.3f}" for k, v in result["precision_at_k"].items()),
        f"average percentile of anomalous events: {result['mean_percentile_of_positives']:.2f}",
    ]
    return "\n".join(lines)
