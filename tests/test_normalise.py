"""The entity-normalised score (pipeline/normalise.py): its arithmetic, its causality, new entities,
and that `pipeline top`, `pipeline alerts`, the report and the alerter stage all rank by it."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from click.testing import CliRunner

from pipeline.alerting import (
    AlertEngine,
    alert_record,
    alerts_from_rows,
    decode_state,
    encode_state,
    row_scores,
)
from pipeline.alertview import highest
from pipeline.cli import cli
from pipeline.config import AlertingConfig, ConfigError, config_from_dict
from pipeline.htmlreport import build_report
from pipeline.normalise import Moments, baseline, entity_score, weight
from pipeline.ranking import format_top, ranking_scores, top_events
from pipeline.scorefile import ScoreRow, format_loss, format_number, write_rows
from pipeline.windowing import event_order

NORM = AlertingConfig(window_percentile=99.0, normalise=["user"], normalise_prior=20.0,
                      normalise_trust=20.0)
RAW = replace(NORM, normalise=[])
USERS = [f"U{i}" for i in range(8)]


def row(line: int, window: int, loss: float | None, user: str, src: str = "C1",
        dst: str = "C2") -> ScoreRow:
    return ScoreRow(line, window * 3600.0 + line / 1000, window,
                    {"user": user, "src_host": src, "dst_host": dst}, loss, loss)


def history(seed: int = 1, windows: int = 4, per_user: int = 30) -> list[ScoreRow]:
    """Unscored window 0, then windows where each user has its own usual loss (U0 1.0 .. U7 2.4)."""
    rng = random.Random(seed)
    rows, line = [], 2
    for w in range(windows):
        for _ in range(per_user):
            for u, user in enumerate(USERS):
                loss = None if w == 0 else 1.0 + 0.2 * u + rng.gauss(0, 0.05)
                rows.append(row(line, w, loss, user))
                line += 1
    return rows


def with_newcomer_and_insider(rows: list[ScoreRow]) -> tuple[list[ScoreRow], int, int]:
    """Window 4: an onboarded user's first logon (the highest raw loss) and U0, whose losses are
    always about 1.0, at 2.5 (unusual for U0, ordinary for U7)."""
    w = rows[-1].window + 1
    line = rows[-1].line + 1
    extra = [row(line + i, w, 1.0 + 0.2 * (i % 8), USERS[i % 8]) for i in range(40)]
    newcomer = row(line + 40, w, 4.0, "NEW1")
    insider = row(line + 41, w, 2.5, "U0", dst="C99")
    return rows + extra + [newcomer, insider], newcomer.line, insider.line


def test_the_arithmetic():
    assert weight(0, 20.0) == 0.0 and weight(20, 20.0) == 0.5
    assert baseline(0, 0.0, 1.5, 20.0) == 1.5  # no loss yet: the population's
    assert baseline(20, 1.0, 2.0, 20.0) == pytest.approx(1.5)
    assert baseline(0, 0.0, 1.5, 0.0) == 1.5  # prior 0 and nothing known: no division by zero
    assert entity_score(9.0, 0, 0, 0.0, 1.0, 20.0, 20.0) == 0.0  # never seen: neutral
    assert entity_score(3.0, 20, 20, 1.0, 1.0, 20.0, 20.0) == pytest.approx(1.0)  # 0.5 * 2 nats
    values = [random.Random(3).gauss(2, 1) for _ in range(101)]
    whole, first, second = Moments(), Moments(), Moments()
    for v in values:
        whole.add(v)
    for v in values[:40]:
        first.add(v)
    for v in values[40:]:
        second.add(v)
    first.merge(second)
    assert (first.n, first.mean, first.m2) == pytest.approx((whole.n, whole.mean, whole.m2))
    assert whole.std == pytest.approx(float(__import__("numpy").std(values)))


def test_a_windows_scores_do_not_depend_on_later_windows():
    rows = history(windows=5)
    scores = row_scores(rows, NORM)
    cut = [r for r in rows if r.window <= 2]
    assert row_scores(cut, NORM) == scores[:len(cut)]
    # Later windows changed (other losses, other users): the earlier scores stay the same.
    rng = random.Random(9)
    changed = cut + [replace(r, loss=rng.uniform(0, 9), entities={**r.entities, "user": "X"})
                     for r in rows[len(cut):]]
    assert row_scores(changed, NORM)[:len(cut)] == scores[:len(cut)]
    # ... and within a window, an event's score does not depend on the window's other events
    window3 = [i for i, r in enumerate(rows) if r.window == 3]
    alone = [r for r in rows if r.window < 3] + [rows[window3[5]]]
    assert row_scores(alone, NORM)[-1] == scores[window3[5]]
    # Control: earlier windows do matter (so the checks above could fail).
    shifted = [replace(r, loss=r.loss + 1.0) if r.window == 1 and r.loss is not None else r
               for r in rows]
    assert row_scores(shifted, NORM)[window3[0]] != scores[window3[0]]


def test_a_new_entity_does_not_top_the_ranking_and_an_unusual_event_for_its_entity_does():
    rows, newcomer, insider = with_newcomer_and_insider(history())
    by_loss = top_events(rows, 3)
    assert by_loss[0].line == newcomer  # the raw loss ranks the newcomer first
    assert insider not in [r.line for r in by_loss[:1]]
    scores = ranking_scores(rows, NORM)
    by_score = top_events(rows, 3, scores)
    assert by_score[0].line == insider
    new_score = scores[id(next(r for r in rows if r.line == newcomer))]
    assert new_score == 0.0  # no history: nothing is unusual *for it*
    # The users whose worst event is the most unusual for them: U0 first, NEW1 not near the top.
    table = format_top(rows, 20, "user", alerting=NORM).splitlines()
    assert table[0].split()[:3] == ["rank", "user", "max"] and "score" in table[0]
    users = [line.split()[1] for line in table[1:]]
    assert users[0] == "U0" and users.index("NEW1") >= len(users) // 2
    assert format_top(rows, 20, "user").splitlines()[1].split()[1] == "NEW1"  # by loss


def test_an_entity_seen_in_an_unscored_window_is_not_new():
    rows = history(windows=2)  # window 0 unscored, window 1 the first with losses
    scores = row_scores(rows, NORM)
    window1 = [s for r, s in zip(rows, scores) if r.window == 1]
    assert all(s is not None for s in window1) and any(s != 0.0 for s in window1)
    assert all(s is None for r, s in zip(rows, scores) if r.window == 0)
    # Without window 0 the same users are new in window 1: every score is 0.
    alone = [r for r in rows if r.window == 1]
    assert set(row_scores(alone, NORM)) == {0.0}


def test_alerts_rank_by_the_normalised_score_and_explain_it():
    rows, newcomer, insider = with_newcomer_and_insider(history())
    alerts = [alert_record(a) for a in alerts_from_rows(rows, NORM)]
    top = highest(alerts, 5)
    assert top[0]["line"] == insider and top[0]["score"] > 0
    assert newcomer not in [a["line"] for a in alerts]
    assert any("nats against its usual" in reason and "U0" in reason for reason in top[0]["reasons"])
    # The same events by raw loss: the newcomer is the top alert.
    raw = highest([alert_record(a) for a in alerts_from_rows(rows, RAW)], 5)
    assert raw[0]["line"] == newcomer and raw[0]["score"] == raw[0]["loss"]


def test_the_engine_event_by_event_and_across_a_restart_equals_the_offline_alerts():
    rows, _, insider = with_newcomer_and_insider(history(seed=4, windows=6))
    offline = [(a.record["line"], a.reasons, a.window_percentile, a.score)
               for a in alerts_from_rows(rows, NORM)]
    assert insider in [line for line, *_ in offline]
    windows: dict[int, list[dict]] = {}
    for r in rows:
        windows.setdefault(r.window, []).append({
            "source": {"topic": "", "partition": 0, "offset": 0}, "line": r.line,
            "event_time": r.event_time, "window": r.window, "entities": r.entities,
            "loss": r.loss, "raw": ""})
    engine, got = AlertEngine(NORM), []
    for w in sorted(windows):
        records = sorted(windows[w], key=event_order)
        if w == 3:  # a restart between windows: everything the score needs is in the state
            engine, _ = decode_state(encode_state(engine, {}), NORM)
        if engine.realtime:
            alerts = [a for r in records if (a := engine.judge_event(w, r)) is not None]
        else:
            alerts = engine.judge_complete(w, records)
        engine.close_window(w, iter([(r["loss"], r["entities"]) for r in records]))  # one pass
        got += [(a.record["line"], a.reasons, a.window_percentile, a.score) for a in alerts]
    assert got == offline


def test_top_alerts_and_report_from_the_command_line(tmp_path):
    rows, newcomer, insider = with_newcomer_and_insider(history())
    path = tmp_path / "scores.csv.gz"
    write_rows(path, ["line", "event_time", "window", "user", "src_host", "dst_host", "loss",
                      "loss_total"],
               ([str(r.line), format_number(r.event_time), str(r.window), *r.entities.values(),
                 repr(r.loss) if r.loss is not None else "", format_loss(r.loss_total)]
                for r in rows))
    top = CliRunner().invoke(cli, ["top", "--scores", str(path), "-n", "3"])
    assert top.exit_code == 0, top.output
    lines = top.output.splitlines()
    assert lines[0].split()[:3] == ["rank", "score", "loss"]
    assert lines[1].split()[3] == str(insider)  # rank, score, loss, line
    raw = CliRunner().invoke(cli, ["top", "--scores", str(path), "-n", "3",
                                   "--set", "alerting.normalise=[]"])
    assert raw.output.splitlines()[1].split()[2] == str(newcomer)  # rank, loss, line
    alerts = CliRunner().invoke(cli, ["alerts", "--scores", str(path), "-n", "1"])
    assert alerts.exit_code == 0 and "by normalised score" in alerts.output
    assert f"line {insider} " in alerts.output.splitlines()[1]
    bad = CliRunner().invoke(cli, ["top", "--scores", str(path), "--set", "alerting.normalise=[who]"])
    assert bad.exit_code == 2 and "alerting.normalise[0]" in bad.output
    assert "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1
    html_rows = rows
    result = build_report(html_rows, tmp_path / "report.html", top_n=3, alerting=NORM)
    html = (tmp_path / "report.html").read_text()
    assert result["top_events"] == 3 and "<th>score</th>" in html
    assert html.index(f'<td class="num">{insider}</td>') < html.index("top-users")


def test_the_entity_must_be_configured():
    with pytest.raises(ConfigError, match=r"alerting\.normalise\[1\]: expected one of input\.entities"):
        config_from_dict({"alerting": {"normalise": ["user", "nobody"]}})
    assert config_from_dict({"alerting": {"normalise": []}}).alerting.normalise == []
    # auto (the default): the user where there is one, else the raw loss (a text log's config)
    assert config_from_dict({}).alerting.normalise == ["user"]
    hosts_only = {"input": {"entities": {"src_host": "src_computer"}}}
    assert config_from_dict(hosts_only).alerting.normalise == []
    with pytest.raises(ConfigError, match=r"alerting\.normalise\[0\].*got 'user'"):
        config_from_dict({**hosts_only, "alerting": {"normalise": ["user"]}})
