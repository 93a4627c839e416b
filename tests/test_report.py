"""Terminal top tables (events, users, hosts) and the self-contained HTML report."""

from __future__ import annotations

import base64
import csv
import gzip
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.evaluate import read_labels
from pipeline.ranking import entity_ranking, format_top
from pipeline.scorefile import read_scores

COLUMNS = ["line", "event_time", "window", "user", "src_host", "dst_host", "loss", "loss_total"]
ARCHIVE_COLUMNS = [*COLUMNS, "source_topic", "source_partition", "source_offset"]
EXPLAINED_COLUMNS = [*COLUMNS, "tokens", "token_losses"]
SCRIPT = "<script>alert(1)</script>"
WINDOW = 3600


def constructed_events() -> list[dict]:
    """Three one-hour windows of 6 ordinary events (window 0 unscored, losses 1.0..2.45) plus a planted
    user U666 from host C9: loss 4.0 in window 1 and 9.5 in window 2, the latter with a hostile field.

    Expected rankings (max loss, ties by name):
      users: U666 (9.5), U3 (2.45), U2 (2.2), U1 (1.95)
      hosts: C1 (9.5, planted dst), C9 (9.5), C2 (4.0, planted dst), C3 (2.45), C4 (1.95)
    """
    events = []
    for window in range(3):
        for i in range(6):
            events.append({
                "time": window * WINDOW + 60 * i + 30, "window": window, "user": f"U{1 + i % 3}",
                "src": f"C{1 + i % 4}", "dst": f"C{1 + (i + 1) % 4}", "field": "Kerberos",
                "loss": None if window == 0 else 1.0 + 0.25 * i + 0.1 * window,
            })
        if window == 1:
            events.insert(len(events) - 3, {"time": WINDOW + 200, "window": 1, "user": "U666", "src": "C9",
                                            "dst": "C2", "field": "NTLM", "loss": 4.0, "planted": True})
        if window == 2:
            events.insert(len(events) - 2, {"time": 2 * WINDOW + 250, "window": 2, "user": "U666",
                                            "src": "C9", "dst": "C1", "field": SCRIPT, "loss": 9.5,
                                            "planted": True})
    for number, event in enumerate(events, start=2):  # line 1 of the log is its header
        event["line"] = number
        event["raw"] = (f"{event['time']},{event['user']}@DOM1,{event['user']}@DOM1,{event['src']},"
                        f"{event['dst']},{event['field']},Network,LogOn,Success")
        if event["loss"] is not None and (event.get("planted") or number % 5 == 0):
            tokens = [str(event["time"]), f"{event['user']}@DOM1", f"{event['user']}@DOM1", event["src"],
                      event["dst"], event["field"], "Network", "LogOn", "Success"]
            hot = 7.25 if event.get("planted") else 1.5
            event["tokens"] = tokens
            event["token_losses"] = [0.1, hot, hot - 0.5, 3.0, 2.0, 12.0 if event["field"] == SCRIPT else 0.4,
                                     0.2, 0.1, 0.05]
    return events


def score_row(event: dict, columns: list[str]) -> list[str]:
    loss = event["loss"]
    values = {"line": str(event["line"]), "event_time": str(event["time"]), "window": str(event["window"]),
              "user": event["user"], "src_host": event["src"], "dst_host": event["dst"],
              "loss": "" if loss is None else f"{loss:.6f}",
              "loss_total": "" if loss is None else f"{9 * loss:.6f}",
              "source_topic": "salka.scores", "source_partition": "0",
              "source_offset": str(event["line"] - 2),
              "tokens": json.dumps(event["tokens"]) if "tokens" in event else "",
              "token_losses": json.dumps(event["token_losses"]) if "token_losses" in event else ""}
    return [values[c] for c in columns]


def write_scores(path: Path, events: list[dict], columns: list[str]) -> Path:
    with gzip.open(path, "wt", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(score_row(e, columns) for e in events)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("report")
    events = constructed_events()
    log = tmp / "auth.csv"
    log.write_text("time,src_user,dst_user,src_computer,dst_computer,auth_type,logon_type,auth_orientation,"
                   "success\n" + "".join(e["raw"] + "\n" for e in events), encoding="utf-8")
    labels = tmp / "labels.csv"
    labels.write_text("line,label\n" + "".join(f"{e['line']},1\n" for e in events if e.get("planted")))
    scores = write_scores(tmp / "scores.csv.gz", events, COLUMNS)
    explained = write_scores(tmp / "explained.csv.gz", events, EXPLAINED_COLUMNS)
    archive = tmp / "archive"
    archive.mkdir()
    for window in (1, 2):
        write_scores(archive / f"window-{window:06d}.csv.gz", [e for e in events if e["window"] == window],
                     ARCHIVE_COLUMNS)
    return {"tmp": tmp, "events": events, "log": log, "labels": labels, "scores": scores,
            "explained": explained, "archive": archive}


USERS = ["U666", "U3", "U2", "U1"]
HOSTS = ["C1", "C9", "C2", "C3", "C4"]


@pytest.mark.parametrize("source", ["scores", "explained", "archive"])
def test_entity_ranking_orders_by_max_loss_then_name(data, source):
    rows = read_scores(data[source])
    users = entity_ranking(rows, "user", 10)
    assert [u["entity"] for u in users] == USERS
    planted = users[0]
    assert planted["max_loss"] == pytest.approx(9.5)
    assert planted["mean_loss"] == pytest.approx((9.5 + 4.0) / 2)
    assert (planted["scored"], planted["top1pct"]) == (2, 1)  # 14 scored events: the top 1% is one event
    assert planted["worst_window"] == 2
    assert planted["worst_line"] == next(e["line"] for e in data["events"] if e["loss"] == 9.5)
    assert all(u["top1pct"] == 0 for u in users[1:])
    hosts = entity_ranking(rows, "host", 10)
    assert [h["entity"] for h in hosts] == HOSTS  # src_host and dst_host together; a tie breaks by name
    assert [h["entity"] for h in entity_ranking(rows, "host", 2)] == HOSTS[:2]
    assert [h["entity"] for h in entity_ranking(rows, "src_host", 10)][:2] == ["C9", "C2"]


def test_entity_ranking_counts_unscored_events_but_ranks_scored_ones(data):
    rows = read_scores(data["scores"])
    users = {u["entity"]: u for u in entity_ranking(rows, "user", None)}
    assert (users["U1"]["events"], users["U1"]["scored"]) == (6, 4)
    assert users["U1"]["mean_loss"] == pytest.approx((1.1 + 1.85 + 1.2 + 1.95) / 4)
    assert entity_ranking([r for r in rows if r["window"] == "0"], "user", 5) == []


def test_format_top_tables(data):
    rows = read_scores(data["archive"])
    lines = format_top(rows, 3, by="user").splitlines()
    assert lines[0].split() == ["rank", "user", "max", "loss", "mean", "loss", "scored", "top", "1%", "worst",
                                "line", "window"]
    assert [line.split()[1] for line in lines[1:]] == USERS[:3]
    assert lines[1].split()[2:6] == ["9.500", "6.750", "2", "1"]
    assert len({len(line) for line in lines[:2]}) == 1  # aligned columns (right-aligned numbers)
    hosts = format_top(rows, 10, by="host", input_path=data["log"]).splitlines()
    assert [line.split()[1] for line in hosts[1:]] == HOSTS
    assert hosts[0].rstrip().endswith("raw line") and SCRIPT in hosts[1]
    events = format_top(rows, 2, by="event", input_path=data["log"]).splitlines()
    assert events[0].split()[:7] == ["rank", "loss", "line", "window", "user", "src_host", "dst_host"]
    assert "source_topic" not in events[0] and "tokens" not in events[0]
    planted_line = str(next(e["line"] for e in data["events"] if e["loss"] == 9.5))
    assert events[1].split()[:5] == ["1", "9.500", planted_line, "2", "U666"]
    assert format_top(read_scores(data["explained"]), 2, by="event") == format_top(rows, 2, by="event")
    with pytest.raises(ValueError, match="no entity column matches 'process'"):
        format_top(rows, 3, by="process")
    assert format_top([r for r in rows if r["window"] == "9"], 3, by="user") == "no scored events"


def png_payloads(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


@pytest.fixture(scope="module")
def report(data) -> dict:
    from pipeline.htmlreport import build_report

    path = data["tmp"] / "report.html"
    result = build_report(read_scores(data["explained"]), path, labels=read_labels(data["labels"]),
                          raw_lines=data["log"], top_n=10, title="salka <test> report")
    return {"path": path, "result": result, "html": path.read_text(encoding="utf-8")}


def test_html_report_sections_and_summary(report):
    html, result = report["html"], report["result"]
    for ident in ("summary", "loss-by-window", "top-events", "top-users", "top-hosts", "labels", "roc", "pr",
                  "window-auc", "top-events-table", "top-users-table", "top-hosts-table"):
        assert f'id="{ident}"' in html, ident
    assert result == {"path": str(report["path"]), "events": 20, "scored": 14, "windows": 3, "plots": 5,
                      "top_events": 10, "explained": 4, "top_users": 4, "top_hosts": 5, "has_labels": True,
                      "positives": 2, "roc_auc": 1.0, "average_precision": 1.0, "windows_evaluated": 2}
    assert "<title>salka &lt;test&gt; report</title>" in html
    assert '<dd id="roc-auc">1.0000</dd>' in html
    users_table = html.split('id="top-users-table"')[1].split("</table>")[0]
    assert [users_table.index(f"<td>{u}</td>") for u in USERS] == sorted(users_table.index(f"<td>{u}</td>")
                                                                        for u in USERS)


def test_html_report_is_self_contained_and_escaped(report):
    html = report["html"]
    assert "http://" not in html and "https://" not in html
    for attribute in re.findall(r'(?:src|href)\s*=\s*["\']?([^"\'\s>]*)', html, flags=re.IGNORECASE):
        assert attribute.startswith("data:image/png;base64,"), attribute[:60]
    assert "<script" not in html.lower() and "url(" not in html and "@import" not in html
    assert "Content-Security-Policy" in html
    # The hostile field shows as text, in the raw line and as a token.
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    images = png_payloads(html)
    assert len(images) == report["result"]["plots"]
    assert all(image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 2000 for image in images)


def test_html_report_token_heatmap(report):
    top = report["html"].split('id="top-events-table"')[1].split("</table>")[0]
    first = top.split("<tr>")[2]  # header row, then the rank-1 event
    assert "9.500" in first
    spans = re.findall(r'<span class="tok" style="background: rgba\(220,38,38,([0-9.]+)\)[^"]*" '
                       r'title="([^"]*)">', first)
    assert len(spans) == 9
    alphas = [float(alpha) for alpha, _ in spans]
    assert max(alphas) == alphas[5] == pytest.approx(0.9)  # the 12-nat hostile token is the hottest
    assert spans[5][1] == "&lt;script&gt;alert(1)&lt;/script&gt;: 12.000 nats"
    assert alphas[1] > alphas[6]
    assert top.count('class="tok"') == 4 * 9


def test_html_report_without_labels_or_explanations(data, tmp_path):
    from pipeline.htmlreport import build_report

    raw = {e["line"]: e["raw"] for e in data["events"]}
    result = build_report(read_scores(data["archive"]), tmp_path / "plain.html", raw_lines=raw, top_n=3)
    html = (tmp_path / "plain.html").read_text(encoding="utf-8")
    assert result["has_labels"] is False and result["explained"] == 0 and result["plots"] == 3
    assert 'id="labels"' not in html and 'class="tok"' not in html
    assert f'<div class="event">{SCRIPT.replace("<", "&lt;").replace(">", "&gt;")},Network' not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;,Network,LogOn,Success</div>" in html
    empty = build_report([], tmp_path / "empty.html")
    assert (empty["events"], empty["plots"], empty["top_events"]) == (0, 0, 0)
    assert "no scored events" in (tmp_path / "empty.html").read_text(encoding="utf-8")


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=False)


def test_html_report_renders_in_headless_chromium(report, tmp_path):
    if CHROMIUM is None:
        pytest.skip("headless browser check needs Chromium: apt-get install chromium")
    from PIL import Image

    url = report["path"].resolve().as_uri()
    dom = chromium("--dump-dom", url, profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    for ident in ("summary", "loss-by-window", "top-events", "top-users", "top-hosts", "roc", "pr"):
        assert f'id="{ident}"' in dom.stdout, ident
    assert dom.stdout.count("<img") == report["result"]["plots"]
    assert "<script" not in dom.stdout  # the hostile line stayed text
    assert all(image.startswith(b"\x89PNG") for image in png_payloads(dom.stdout))

    shot = tmp_path / "shot.png"
    run = chromium(f"--screenshot={shot}", "--window-size=1200,3000", url, profile=tmp_path / "profile-shot")
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, plots and shading, not a blank page
