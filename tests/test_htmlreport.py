"""The HTML report's template: shipped as package data, autoescaped, and its notes for missing data.

tests/test_report.py checks the report's content against a constructed scores file; these tests add
hostile text in attribute positions and the branches it does not reach (one-class labels, no host column).
"""

from __future__ import annotations

import csv
import fnmatch
import gzip
import json
from pathlib import Path

import pytest

from pipeline.scorefile import read_scores

ROOT = Path(__file__).resolve().parent.parent
QUOTE_ATTACK = '" onmouseover="alert(1)'  # would add an attribute if a title="..." were not escaped
TAG_ATTACK = '"><img src=x onerror=alert(1)>'


def write_scores(path: Path, users: list[str], tokens: list[str] | None = None) -> Path:
    """Two windows of events, one per user; the second window scored (loss rises with the index)."""
    with gzip.open(path, "wt", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["line", "event_time", "window", "user", "loss", "loss_total", "tokens",
                         "token_losses"])
        line = 2
        for window in range(2):
            for i, user in enumerate(users):
                loss = "" if window == 0 else f"{1.0 + i:.6f}"
                explained = window == 1 and tokens is not None
                token_losses = [0.5 * (k + 1) for k in range(len(tokens or []))]
                writer.writerow([line, window * 3600 + i, window, user, loss, loss,
                                 json.dumps(tokens) if explained else "",
                                 json.dumps(token_losses) if explained else ""])
                line += 1
    return path


def test_report_template_is_package_data_and_autoescaped():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pipeline.htmlreport import _template

    template = _template()
    assert template.environment.autoescape is True
    shipped = Path(template.filename).resolve().relative_to((ROOT / "pipeline").resolve()).as_posix()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    globs = project["tool"]["setuptools"]["package-data"]["pipeline"]
    assert any(fnmatch.fnmatch(shipped, pattern) for pattern in globs), (shipped, globs)
    assert any(dep.lower().startswith("jinja2") for dep in project["project"]["dependencies"])


def test_quotes_and_tags_in_log_text_stay_text(tmp_path):
    from pipeline.htmlreport import build_report

    users, tokens = ["U1", TAG_ATTACK, "U3"], ["a", QUOTE_ATTACK, "b"]
    scores = write_scores(tmp_path / "scores.csv.gz", users, tokens=tokens)
    out = tmp_path / "report.html"
    result = build_report(read_scores(scores), out, title=f"</title><script>{TAG_ATTACK}")
    html = out.read_text(encoding="utf-8")
    assert result["explained"] == 3 and result["top_users"] == 3
    assert html.count("<img") == result["plots"] == 2  # loss per window, user trend: no injected image
    assert "<script" not in html and "onerror=alert(1)>" not in html
    assert QUOTE_ATTACK not in html and 'onmouseover="' not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html  # shown as text in the user tables
    assert 'title="&#34; onmouseover=&#34;alert(1): 1.000 nats"' in html  # the token's hover text


def test_labels_of_one_class_give_a_note_instead_of_curves(tmp_path):
    from pipeline.htmlreport import build_report

    scores = write_scores(tmp_path / "scores.csv.gz", ["U1", "U2"])
    rows = read_scores(scores)
    result = build_report(rows, tmp_path / "report.html", labels={2: 1, 3: 1})  # only unscored lines
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert result["has_labels"] is True and result["positives"] == 0
    assert "roc_auc" not in result and "windows_evaluated" not in result
    assert result["plots"] == build_report(rows, tmp_path / "plain.html")["plots"]
    assert 'id="labels"' in html and 'id="roc"' not in html
    assert "(0 labelled anomalous among 2 scored)" in html


def test_scores_without_host_columns_say_so(tmp_path):
    from pipeline.htmlreport import build_report

    scores = write_scores(tmp_path / "scores.csv.gz", ["U1", "U2"])
    result = build_report(read_scores(scores), tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert (result["top_users"], result["top_hosts"]) == (2, 0)
    hosts = html.split('<section id="top-hosts">')[1].split("</section>")[0]
    assert "no host column in this scores file." in hosts and "<table" not in hosts
