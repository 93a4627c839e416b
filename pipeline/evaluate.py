"""Evaluation of a scores file against labels (for research; salka never trains on labels)."""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from pipeline.errors import InputError
from pipeline.scorefile import check_scores_header


def read_scores(path: str | Path) -> list[dict[str, str]]:
    """Rows of a scores file, or of every window file of an archive directory."""
    path = Path(path)
    if path.is_dir():
        return [row for part in sorted(path.glob("window-*.csv.gz")) for row in read_scores(part)]
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            check_scores_header(path, reader.fieldnames)
            return list(reader)
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:  # gzip / text / CSV damage
        raise InputError(f"{path}: not a readable scores file ({exc}); pass the file written by "
                         f"pipeline replay --output, or an archive directory") from exc


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
