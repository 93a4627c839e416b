"""Evaluation of a scores file against labels (for research; salka never trains on labels)."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def read_scores(path: str | Path) -> list[dict[str, str]]:
    """Rows of a scores file, or of every window file of an archive directory."""
    path = Path(path)
    if path.is_dir():
        return [row for part in sorted(path.glob("window-*.csv.gz")) for row in read_scores(part)]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_labels(path: str | Path) -> dict[int, int]:
    """``line,label`` CSV (header optional); label 0 = normal, anything else = anomalous."""
    labels: dict[int, int] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or (number == 1 and not row[0].strip().isdigit()):
                continue
            if len(row) < 2:
                raise ValueError(f"{path} line {number}: expected line,label")
            label = row[1].strip()
            labels[int(row[0])] = 0 if label in ("0", "", "normal", "-") else 1
    return labels


def _line(row: dict[str, str]) -> int:
    return int(row["line"]) if row["line"] else -1  # Kafka input without line numbers


def percentile_ranks(losses: np.ndarray) -> np.ndarray:
    """Percentile of each score among all scores (ties share their average rank), 0..100."""
    order = losses.argsort(kind="stable")
    ranks = np.empty(len(losses))
    ranks[order] = np.arange(len(losses))
    # Average the ranks of tied values so the metric does not depend on file order.
    _, inverse, counts = np.unique(losses, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    ranks = sums[inverse] / counts[inverse]
    return 100.0 * (ranks + 0.5) / len(losses)


def evaluate(scores_path: str | Path, labels_path: str | Path, ks: tuple[int, ...] = (10, 50, 100)) -> dict:
    """ROC AUC, average precision, precision@k and the average red-team percentile.

    The percentile metric (Tuor et al. 2018) is the mean, over labelled events, of the
    percentage of scored events whose loss is below theirs: 100 is perfect, 50 is chance.
    Events of the first window carry no score and are left out (counted in ``unscored``).
    """
    labels = read_labels(labels_path)
    rows = read_scores(scores_path)
    scored = [r for r in rows if r["loss"] != ""]
    losses = np.array([float(r["loss"]) for r in scored])
    truth = np.array([labels.get(_line(r), 0) for r in scored])
    result: dict = {
        "events": len(rows),
        "scored": len(scored),
        "unscored": len(rows) - len(scored),
        "positives": int(truth.sum()),
        "positives_unscored": sum(labels.get(_line(r), 0) for r in rows if r["loss"] == ""),
    }
    if len(scored) == 0 or truth.sum() == 0 or truth.sum() == len(truth):
        result["error"] = "need both labelled and normal scored events"
        return result
    result["roc_auc"] = float(roc_auc_score(truth, losses))
    result["average_precision"] = float(average_precision_score(truth, losses))
    ranked = truth[np.argsort(-losses, kind="stable")]
    result["precision_at_k"] = {str(k): float(ranked[:k].mean()) for k in ks if k <= len(ranked)}
    result["mean_percentile_of_positives"] = float(percentile_ranks(losses)[truth == 1].mean())
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
