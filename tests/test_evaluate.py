"""`pipeline eval` and the report's detection section rank the labelled events two ways: by the
raw loss, and by the entity-normalised score (alerting.normalise) that top, the alerts and the
report's tables rank by. Checked against statistics computed by hand, on a constructed scores file
where the two rankings disagree, so that evaluating the loss twice cannot pass."""

from __future__ import annotations

import json
import random
import re
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.alerting import row_scores
from pipeline.cli import cli
from pipeline.config import AlertingConfig, load_config
from pipeline.evaluate import evaluate, evaluate_rows, format_report
from pipeline.htmlreport import build_report
from pipeline.scorefile import ScoreRow, format_loss, format_number, read_scores, write_rows

COLUMNS = ["line", "event_time", "window", "user", "src_host", "dst_host", "loss", "loss_total"]
USUAL = {"U0": 1.0, "U1": 1.5, "U2": 2.0, "U3": 2.5}  # each user's own usual loss
NORM = AlertingConfig(normalise=["user"], normalise_prior=5.0, normalise_trust=5.0)
RAW = replace(NORM, normalise=[])
KS = (3, 5, 10)


def constructed() -> tuple[list[ScoreRow], dict[int, int]]:
    """Window 0 unscored, windows 1-3 with 8 events per user at its usual loss (+ small noise).
    Labelled: 3 events of U0 in window 3 at about 1.9 (high for U0, below U2's and U3's ordinary
    2.0 and 2.5) and one in window 2 at 1.8; unlabelled: a newcomer's first logons at 4.0 (the
    highest raw losses).
    By loss the newcomer, U2 and U3 outrank the labelled events; by U0's own history they top."""
    rng = random.Random(7)
    rows: list[ScoreRow] = []
    labels: dict[int, int] = {}

    def add(window: int, user: str, loss: float | None, label: int = 0) -> None:
        line = len(rows) + 2  # line 1 of the log is its header
        rows.append(ScoreRow(line, window * 3600.0 + len(rows), window,
                             {"user": user, "src_host": "C1", "dst_host": "C2"}, loss, loss))
        labels[line] = label

    for window in range(4):
        for _ in range(8):
            for user, usual in USUAL.items():
                add(window, user, None if window == 0 else usual + rng.gauss(0, 0.05))
        if window == 2:
            add(window, "U0", 1.8 + rng.gauss(0, 0.05), 1)
        if window == 3:
            for _ in range(3):
                add(window, "U0", 1.9 + rng.gauss(0, 0.05), 1)
            for _ in range(2):
                add(window, "NEW1", 4.0 + rng.gauss(0, 0.05))
    return rows, labels


def by_hand(truth: np.ndarray, values: np.ndarray, ks: tuple[int, ...]) -> dict:
    """AUC, AP, precision@k and the mean percentile, from their definitions (no ties here)."""
    positives, negatives = values[truth == 1], values[truth == 0]
    auc = float(np.mean([(p > n) + 0.5 * (p == n) for p in positives for n in negatives]))
    order = np.argsort(-values, kind="stable")
    hits = np.cumsum(truth[order])
    ranks = np.flatnonzero(truth[order] == 1) + 1
    ap = float(np.mean(hits[ranks - 1] / ranks))
    at_k = {str(k): float(truth[order][:k].sum() / k) for k in ks}
    percentile = float(np.mean([100.0 * ((values < v).sum() + 0.5 * (values == v).sum()) / len(values)
                                for v in positives]))
    return {"roc_auc": auc, "average_precision": ap, "precision_at_k": at_k,
            "mean_percentile_of_positives": percentile}


def assert_metrics(got: dict, expected: dict) -> None:
    for key in ("roc_auc", "average_precision", "mean_percentile_of_positives"):
        assert got[key] == pytest.approx(expected[key]), key
    assert got["precision_at_k"] == pytest.approx(expected["precision_at_k"])


@pytest.fixture(scope="module")
def constructed_file(tmp_path_factory) -> dict:
    rows, labels = constructed()
    directory = tmp_path_factory.mktemp("evaluate")
    scores, labels_path = directory / "scores.csv.gz", directory / "labels.csv"
    write_rows(scores, COLUMNS, ([str(r.line), format_number(r.event_time), str(r.window),
                                  *r.entities.values(), repr(r.loss) if r.loss is not None else "",
                                  format_loss(r.loss_total)] for r in rows))
    labels_path.write_text("line,label\n" + "".join(f"{line},{label}\n" for line, label in labels.items()))
    rows = read_scores(scores)  # as evaluate reads them
    scored = [r for r in rows if r.loss is not None]
    truth = np.array([labels[r.line] for r in scored])
    score_of = dict(zip(map(id, rows), row_scores(rows, NORM)))
    return {"scores": scores, "labels": labels_path, "rows": rows, "label_map": labels, "truth": truth,
            "loss": np.array([r.loss for r in scored]), "score": np.array([score_of[id(r)] for r in scored]),
            "windows": np.array([r.window for r in scored])}


def test_the_two_rankings_really_differ(constructed_file):
    truth = constructed_file["truth"]
    by_loss = by_hand(truth, constructed_file["loss"], KS)
    by_score = by_hand(truth, constructed_file["score"], KS)
    assert truth.sum() == 4
    assert by_score["roc_auc"] > 0.95 and by_loss["roc_auc"] < 0.6, (by_score, by_loss)
    assert by_score["precision_at_k"]["3"] == 1.0 and by_loss["precision_at_k"]["3"] == 0.0


def test_eval_of_the_score_equals_the_statistics_of_row_scores(constructed_file):
    result = evaluate(constructed_file["scores"], constructed_file["labels"], KS, NORM)
    truth = constructed_file["truth"]
    assert_metrics(result["score"], by_hand(truth, constructed_file["score"], KS))
    assert_metrics(result, by_hand(truth, constructed_file["loss"], KS))  # top level: the loss, as before
    assert result["score"]["normalise"] == ["user"]
    assert (result["scored"], result["positives"]) == (len(truth), 4)
    text = format_report(result)
    auc = re.search(r"^ROC AUC +([0-9.]+) +([0-9.]+)$", text, flags=re.MULTILINE)
    assert auc and (float(auc.group(1)), float(auc.group(2))) == (round(result["score"]["roc_auc"], 4),
                                                                  round(result["roc_auc"], 4))
    assert re.search(r"^precision@3 +1\.000 +0\.000$", text, flags=re.MULTILINE), text


def test_eval_with_normalise_off_is_the_loss_only_as_before(constructed_file):
    rows, labels = constructed_file["rows"], constructed_file["label_map"]
    raw = evaluate_rows(rows, labels, KS, RAW)
    assert "score" not in raw and raw == evaluate_rows(rows, labels, KS)
    assert_metrics(raw, by_hand(constructed_file["truth"], constructed_file["loss"], KS))
    text = format_report(raw)
    assert f"ROC AUC: {raw['roc_auc']:.4f}" in text and not re.search(r"\bscore\b", text)


def test_eval_command_follows_the_config(constructed_file):
    args = ["eval", "--scores", str(constructed_file["scores"]), "--labels", str(constructed_file["labels"])]
    default = CliRunner().invoke(cli, [*args, "--json"])
    assert default.exit_code == 0, default.output
    # The default config normalises by the user ("auto"): both rankings, with its prior and trust.
    expected = evaluate(constructed_file["scores"], constructed_file["labels"],
                        alerting=load_config(None).alerting)
    assert json.loads(default.output) == expected and expected["score"]["normalise"] == ["user"]
    off = CliRunner().invoke(cli, [*args, "--json", "--set", "alerting.normalise=[]"])
    assert off.exit_code == 0 and "score" not in json.loads(off.output)
    text = CliRunner().invoke(cli, args).output
    assert re.search(r"^ +score +loss$", text, flags=re.MULTILINE), text


def window_row(html: str, window: int) -> list[str]:
    table = html.split('<table id="window-auc">')[1].split("</table>")[0]
    rows = [re.findall(r"<t[dh][^>]*>([^<]*)</t[dh]>", tr) for tr in table.split("<tr>")[1:]]
    return rows[0] if window < 0 else next(r for r in rows[1:] if r[0] == str(window))


def test_report_shows_both_aucs_and_per_window(constructed_file, tmp_path):
    rows, labels = constructed_file["rows"], constructed_file["label_map"]
    truth, loss, score = (constructed_file[k] for k in ("truth", "loss", "score"))
    result = build_report(rows, tmp_path / "report.html", labels=labels, alerting=NORM)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    by_score, by_loss = by_hand(truth, score, KS), by_hand(truth, loss, KS)
    assert result["score"]["roc_auc"] == pytest.approx(by_score["roc_auc"])
    assert result["score"]["average_precision"] == pytest.approx(by_score["average_precision"])
    assert result["roc_auc"] == pytest.approx(by_loss["roc_auc"])
    assert f'<dd id="score-roc-auc">{by_score["roc_auc"]:.4f}</dd>' in html
    assert f'<dd id="roc-auc">{by_loss["roc_auc"]:.4f}</dd>' in html
    assert f'<dd id="score-average-precision">{by_score["average_precision"]:.4f}</dd>' in html
    assert window_row(html, -1) == ["window", "scored", "labelled", "score AUC", "score AP", "loss AUC",
                                    "loss AP"]
    in_3 = constructed_file["windows"] == 3
    w3 = by_hand(truth[in_3], score[in_3], ()), by_hand(truth[in_3], loss[in_3], ())
    assert window_row(html, 3) == ["3", str(in_3.sum()), "3", f"{w3[0]['roc_auc']:.4f}",
                                   f"{w3[0]['average_precision']:.4f}", f"{w3[1]['roc_auc']:.4f}",
                                   f"{w3[1]['average_precision']:.4f}"]
    assert result["windows_evaluated"] == 2 and result["plots"] == 5  # two curves a plot, not more plots


def test_report_with_normalise_off_shows_the_loss_only(constructed_file, tmp_path):
    rows, labels = constructed_file["rows"], constructed_file["label_map"]
    result = build_report(rows, tmp_path / "report.html", labels=labels, alerting=RAW)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "score" not in result and result == build_report(rows, tmp_path / "plain.html", labels=labels) | {
        "path": str(tmp_path / "report.html")}
    by_loss = by_hand(constructed_file["truth"], constructed_file["loss"], KS)
    assert f'<dt>ROC AUC</dt><dd id="roc-auc">{by_loss["roc_auc"]:.4f}</dd>' in html
    assert 'id="score-roc-auc"' not in html and "score AUC" not in html and "ROC AUC, loss" not in html
    assert window_row(html, -1) == ["window", "scored", "labelled", "ROC AUC", "AP"]
