"""The one scores-file reader (typed rows), the statistics module, and the one way alerts are
printed (``pipeline alerts`` and the demo)."""

from __future__ import annotations

import csv
import gzip
import random
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.alerting import AlertEngine, alert_record
from pipeline.alertview import alert_lines, offline_report, precision_line
from pipeline.cli import cli
from pipeline.config import AlertingConfig, config_from_dict
from pipeline.scorefile import (
    FIXED_COLUMNS,
    explain_cells,
    format_loss,
    format_number,
    read_scores,
    score_columns,
    write_rows,
)
from pipeline.serde import codec
from pipeline.stats import detection_scores, midrank_percentiles


def archive_rows() -> list[list[str]]:
    """Rows as the archiver writes them: Kafka input without a line number, a fractional event time,
    an unscored event, explanations, and log text that looks like a number or a formula."""
    return [
        ["", format_number(1.5), "0", "U1@DOM1", "C1", "C2", "", "", "raw", "0", "7", "", ""],
        ["12", format_number(3600.0), "1", "=1+1", "C1", "", format_loss(2.25), format_loss(20.25),
         "raw", "2", "9", *explain_cells(["a", "b"], [0.5, 4.0])],
        ["13", format_number(1.7e9 + 0.25), "1", "007", "C3", "C3", format_loss(0.1234567),
         format_loss(1.0), "raw", "1", "10", "", ""],
    ]


@pytest.fixture()
def archive_file(tmp_path):
    config = config_from_dict({"scores": {"explain": True}})
    columns = score_columns(config, with_source=True)
    assert columns[3:6] == ["user", "src_host", "dst_host"]
    path = tmp_path / "window-000001.csv.gz"
    write_rows(path, columns, archive_rows())
    return path


def test_read_scores_types_every_column_and_gives_the_written_cells_back(archive_file):
    rows = read_scores(archive_file)
    first, second, third = rows
    assert (first.line, first.event_time, first.window, first.loss, first.loss_total) == (None, 1.5, 0, None,
                                                                                          None)
    assert first.source == ("raw", 0, 7) and first.entities == {"user": "U1@DOM1", "src_host": "C1",
                                                                "dst_host": "C2"}
    assert (second.line, second.window, second.loss, second.loss_total) == (12, 1, 2.25, 20.25)
    assert second.entities["user"] == "=1+1" and second.entities["dst_host"] == ""
    assert second.extras == {"tokens": '["a", "b"]', "token_losses": "[0.5, 4.0]"}
    assert third.loss == 0.123457 and third.entities["user"] == "007"  # text stays text
    assert set(FIXED_COLUMNS).isdisjoint(third.entities)
    # row[column] is the cell exactly as written, every column of every row.
    with gzip.open(archive_file, "rt", newline="") as handle:
        cells = list(csv.DictReader(handle))
    assert [{c: row[c] for c in cell} for row, cell in zip(rows, cells)] == cells
    assert second.get("process") is None
    with pytest.raises(KeyError):
        second["process"]
    # An archive directory reads its window files in window order.
    write_rows(archive_file.parent / "window-000000.csv.gz", list(cells[0]), [archive_rows()[0]])
    assert [r.line for r in read_scores(archive_file.parent)] == [None, None, 12, 13]


@pytest.mark.parametrize("column, value, message", [
    ("loss", "abc", "loss 'abc' is not a number"),
    ("line", "1.5", "line '1.5' is not a number"),
    ("window", "", "window is empty"),
])
def test_a_damaged_cell_stops_with_one_line_naming_the_file_and_row(tmp_path, column, value, message):
    columns = ["line", "event_time", "window", "user", "loss", "loss_total"]
    good = ["2", "10", "0", "U1", "", ""]
    bad = [value if c == column else cell for c, cell in zip(columns, ["3", "20", "0", "U2", "1.5", "3.0"])]
    path = tmp_path / "scores.csv.gz"
    write_rows(path, columns, [good, bad])
    result = CliRunner().invoke(cli, ["top", "--scores", str(path)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"Error: {path}:3: {message}; a scores file is written "
                                                  "by pipeline replay --output or the archiver"]


def test_midrank_percentiles_count_ties_half_whatever_the_order():
    assert midrank_percentiles([1.0, 2.0, 2.0, 3.0]).tolist() == [12.5, 50.0, 50.0, 87.5]
    assert midrank_percentiles([7.0]).tolist() == [50.0]
    assert midrank_percentiles([]).tolist() == []
    rng = random.Random(3)
    values = [rng.choice([0.5, 1.0, 1.25, 2.0]) + rng.choice([0.0, 1e-9]) for _ in range(500)]
    ranks = midrank_percentiles(values)
    shuffled = list(range(len(values)))
    rng.shuffle(shuffled)
    assert np.array_equal(midrank_percentiles([values[i] for i in shuffled]), ranks[shuffled])
    expected = [100.0 * (sum(v < x for v in values) + 0.5 * sum(v == x for v in values)) / len(values)
                for x in values]
    assert np.allclose(ranks, expected, rtol=0, atol=1e-12)


def test_detection_scores_of_perfect_chance_and_one_class_labels():
    assert detection_scores([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == (1.0, 1.0)
    auc, ap = detection_scores([0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0])  # all tied: chance
    assert auc == 0.5 and ap == 0.5
    assert detection_scores([0, 0], [0.1, 0.2]) is None
    assert detection_scores([1, 1], [0.1, 0.2]) is None
    assert detection_scores([], []) is None


def scored_records(seed: int = 5) -> list[list[dict]]:
    """Four windows of ordinary events, a few entities; one extreme event in window 3."""
    rng = random.Random(seed)
    windows = []
    for w in range(4):
        windows.append([{"source": {"topic": "raw", "partition": 0, "offset": w * 100 + i},
                         "line": None if i == 5 else w * 100 + i + 2, "event_time": w * 3600.0 + i,
                         "window": w, "entities": {"user": f"U{i % 4}", "src_host": f"C{i % 3}"},
                         "loss": rng.gauss(1.0, 0.05), "raw": f"event <{w}:{i}>\x1b[31m"}
                        for i in range(60)])
    windows[3][7]["loss"] = 5.0
    windows[3][5]["loss"] = 4.0  # the event without a line number
    return windows


def test_alerts_print_the_same_from_the_engine_and_from_the_alerts_topic():
    """`pipeline alerts` formats the engine's alerts; the demo formats the alerter's Avro records
    read back from the topic: the same lines, log text made printable."""
    config = AlertingConfig(window_percentile=99.0, min_history=20, history=500, normalise=[])
    engine = AlertEngine(config)
    records = [alert_record(a) for w, window in enumerate(scored_records())
               for a in engine.judge_window(w, window)]
    assert len(records) >= 2
    topic = [codec().decode(codec().encode("salka.Alert", r))[1] for r in records]
    lines = alert_lines(records, 3)
    assert alert_lines(topic, 3) == lines
    assert lines[0].startswith("  1. loss 5.000  line 309  window 3  user=U3 src_host=C1")
    assert "\x1b" not in "".join(lines) and "event <3:7>" in lines[1]
    assert any(line.startswith("  2. loss 4.000  line None  window 3") for line in lines)
    labels = {309: 1}
    assert precision_line(topic, labels, 1) == "precision of the top 1 alerts: 1.00"
    assert precision_line(topic, labels, 100) == f"precision of the top {len(topic)} alerts: " \
                                                 f"{1 / len(topic):.2f}"


def test_pipeline_alerts_prints_the_offline_report(tmp_path):
    columns = ["line", "event_time", "window", "user", "src_host", "loss", "loss_total"]
    rows = [[str(r["line"] or ""), format_number(r["event_time"]), str(r["window"]), r["entities"]["user"],
             r["entities"]["src_host"], format_loss(r["loss"]), ""]
            for window in scored_records() for r in window]
    path = tmp_path / "scores.csv.gz"
    write_rows(path, columns, rows)
    labels = tmp_path / "labels.csv"
    labels.write_text("line,label\n309,1\n")
    result = CliRunner().invoke(cli, ["alerts", "--scores", str(path), "-n", "2", "--labels", str(labels),
                                      "--set", "alerting.window_percentile=99.0",
                                      "--set", "alerting.normalise=[]"])  # ranked by loss
    assert result.exit_code == 0, result.output
    config = replace(config_from_dict({}).alerting, window_percentile=99.0, normalise=[])
    assert result.output == offline_report(path, config, 2, labels={309: 1}) + "\n"
    lines = result.output.splitlines()
    assert lines[0].startswith(f"{lines[0].split()[0]} alerts from 240 events; top 2 by loss:")
    assert lines[1].startswith("  1. loss 5.000  line 309  window 3")
    assert lines[-1] == "precision of the top 2 alerts: 0.50"
