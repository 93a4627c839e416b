"""The statistics of scores, one place each: mid-rank percentiles (eval's red-team metric, the
alerter's window percentile) and ROC AUC / average precision (eval, the HTML report).

scipy and scikit-learn are imported where used: importing them costs over a second, and the
alerter stage should not pay it before its first window.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def midrank_percentiles(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Percentile of each value among all values, 0..100: the share of values below it, ties
    counting half (mid-ranks), so the result does not depend on the order of the values."""
    from scipy.stats import rankdata

    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return np.empty(0)
    # rankdata's average rank is (below + (ties + 1) / 2), a half-integer computed exactly, so
    # (rank - 0.5) is below + ties / 2 exactly and the division is the only rounding.
    return 100.0 * (rankdata(values, method="average") - 0.5) / len(values)


def detection_scores(truth: Sequence[int] | np.ndarray,
                     scores: Sequence[float] | np.ndarray) -> tuple[float, float] | None:
    """(ROC AUC, average precision) of ``scores`` (higher = more anomalous) against 0/1 ``truth``;
    None when they are undefined (no positive or no negative)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    truth = np.asarray(truth)
    positives = int(truth.sum())
    if positives == 0 or positives == len(truth):
        return None
    return float(roc_auc_score(truth, scores)), float(average_precision_score(truth, scores))
