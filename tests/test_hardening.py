"""Issue 9 hardening: far-future times (watermark hijack), non-finite config values, report
labels with math text, and control characters / formulas from log text reaching a terminal or a
spreadsheet."""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import delete_topics, read_records, stream_config, wait_for

from pipeline.cli import cli
from pipeline.config import ConfigError, InputConfig, config_from_dict, load_config
from pipeline.parsing import MAX_EPOCH_SECONDS, Event, LineParser, Malformed, future_problem
from pipeline.ranking import format_top
from pipeline.safetext import csv_cell, csv_uncell, printable
from pipeline.scorefile import read_scores

NOW = 1_800_000_000.0  # a fixed "wall clock" (2027) for the parser
DAY = 86400.0
ROW = "{},U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success"

# Terminal attacks: SGR colour, clear screen, OSC 0 window title, OSC 8 hyperlink, OSC 52
# clipboard write, CSI cursor up + erase line, 8-bit CSI (C1), bare CR, BEL, backspace,
# right-to-left override (Trojan Source), line separator.
TERMINAL_ATTACKS = [
    "\x1b[31mRED\x1b[0m", "\x1b[2J\x1b[H", "\x1b]0;pwned\x07", "\x1b]8;;http://evil/\x1b\\click\x1b]8;;\x1b\\",
    "\x1b]52;c;cm0gLXJmIH4=\x07", "\x1b[1A\x1b[2K", "\x9b31m", "ok\rFAKE", "\x07bell", "abc\x08\x08\x08",
    "admin\u202e", "a\u2028b", "tab\there",
]
FORMULAS = ["=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1:A2)", "\t=1+1", "\r=1+1", "'quoted"]


def no_control_chars(text: str) -> bool:
    """Nothing a terminal would act on: only printable characters, spaces and newlines."""
    return all(c == "\n" or c == " " or c.isprintable() for c in text)


# ---------------------------------------------------------------------------- D1 far-future times


def test_future_problem_bounds_event_time_by_the_wall_clock():
    assert future_problem(NOW, NOW, DAY) is None
    assert future_problem(NOW + DAY, NOW, DAY) is None  # exactly at the bound: accepted
    assert future_problem(NOW - 50 * 365 * DAY, NOW, DAY) is None  # history is fine
    problem = future_problem(NOW + DAY + 1, NOW, DAY)
    assert problem and "too far in the future" in problem and "input.max_future_seconds" in problem
    assert future_problem(NOW + 1, NOW, 0.0) is not None


def test_a_year_2199_time_is_refused_below_the_hard_limit():
    """The reproduction of D1: year 2199 passed parse_time's 2200 limit and hijacked the watermark."""
    t2199 = MAX_EPOCH_SECONDS - 200 * DAY
    parser = LineParser(InputConfig(), clock=lambda: NOW)
    result = parser.parse(ROW.format(int(t2199)), 7)
    assert isinstance(result, Malformed), result
    assert result.line == 7
    assert "too far in the future" in result.reason and "max_future_seconds" in result.reason
    ok = parser.parse(ROW.format(int(NOW - 3600)), 8)
    assert isinstance(ok, Event) and ok.time == NOW - 3600


def test_max_future_seconds_is_configurable_and_read_at_parse_time():
    clock = [NOW]
    parser = LineParser(config_from_dict({"input": {"max_future_seconds": 60}}).input,
                        clock=lambda: clock[0])
    assert isinstance(parser.parse(ROW.format(int(NOW + 61)), 1), Malformed)
    assert isinstance(parser.parse(ROW.format(int(NOW + 60)), 1), Event)
    clock[0] += 120  # the clock moved on: the same time is no longer in the future
    assert isinstance(parser.parse(ROW.format(int(NOW + 61)), 1), Event)


def test_far_future_bound_applies_to_iso_times_too():
    config = config_from_dict({"input": {"time_format": "iso8601", "max_future_seconds": 3600}})
    parser = LineParser(config.input, clock=lambda: NOW)
    assert isinstance(parser.parse(ROW.format("2027-01-15T08:00:00Z"), 2), Event)  # before NOW
    refused = parser.parse(ROW.format("2199-01-01T00:00:00Z"), 3)
    assert isinstance(refused, Malformed) and "too far in the future" in refused.reason


def test_replay_refuses_the_far_future_line_and_scores_the_rest(tmp_path):
    from pipeline.replay import parse_file

    lines = [ROW.format(t) for t in (10, 20, 5000)]
    lines.insert(1, ROW.format(int(MAX_EPOCH_SECONDS - 200 * DAY)))
    log = tmp_path / "log.csv"
    log.write_text("\n".join(lines) + "\n")
    windows, report = parse_file(log, config_from_dict({"window": {"size_seconds": 3600}}))
    assert [e.line for e in report.errors] == [2]
    assert "too far in the future" in report.errors[0].reason
    assert sorted(windows) == [0, 1]  # no window near 2199
    assert report.events == 3


# ---------------------------------------------------------------------------- D9 non-finite values


@pytest.mark.parametrize("yaml_value", [".inf", "-.inf", ".nan", ".NaN", ".Inf"])
@pytest.mark.parametrize("key", ["window.allowed_lateness_seconds", "window.size_seconds",
                                 "training.learning_rate", "alerting.z_threshold",
                                 "input.max_future_seconds"])
def test_non_finite_numbers_are_refused_with_the_key_path(tmp_path, key, yaml_value):
    section, name = key.split(".")
    path = tmp_path / "config.yaml"
    path.write_text(f"{section}:\n  {name}: {yaml_value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{key}: expected a finite number"), message


def test_non_finite_values_in_free_form_sections_and_overrides_are_refused():
    with pytest.raises(ConfigError, match=r"^kafka\.linger\.ms: expected a finite number"):
        config_from_dict({"kafka": {"bootstrap.servers": "x:1", "linger.ms": float("inf")}})
    with pytest.raises(ConfigError, match=r"^window\.allowed_lateness_seconds: expected a finite"):
        config_from_dict({}, ["window.allowed_lateness_seconds=.inf"])
    # finite values still pass
    config = config_from_dict({"window": {"allowed_lateness_seconds": 1e9}})
    assert config.window.allowed_lateness_seconds == 1e9


def test_non_finite_lateness_is_one_line_and_no_traceback_on_the_cli(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("window:\n  allowed_lateness_seconds: .inf\n")
    log = tmp_path / "log.csv"
    log.write_text(ROW.format(10) + "\n")
    # replay, not a stage: without the check it would run (and a stage would wait for a broker)
    result = CliRunner().invoke(cli, ["replay", "--config", str(path), "--input", str(log),
                                      "--output", str(tmp_path / "s.csv.gz")])
    assert result.exit_code != 0
    assert "window.allowed_lateness_seconds" in result.output and "finite" in result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------- D4 report math text

MATH_NAMES = ["$x^2$", r"$\frac$", r"\n", "$", "$$", r"a\$b$", "$\\undefinedmacro{x}$", "$_$",
              "price $5 and $6", r"$\sqrt{$"]


def write_scores(path: Path, users: list[str], raw: str = "") -> None:
    """A small scores file: two windows; every user has events in both, the second one scored."""
    with gzip.open(path, "wt", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["line", "event_time", "window", "user", "src_host", "dst_host", "loss",
                         "loss_total"])
        line = 2
        for window in range(2):
            for i, user in enumerate(users):
                loss = "" if window == 0 else f"{1.0 + i * 0.5:.6f}"
                writer.writerow([line, window * 3600 + i, window, user, f"H{user}", "C1", loss,
                                 loss and f"{float(loss) * 9:.6f}"])
                line += 1


def test_report_renders_user_and_host_names_that_look_like_math_text(tmp_path):
    from pipeline.htmlreport import build_report

    scores = tmp_path / "scores.csv.gz"
    write_scores(scores, MATH_NAMES)
    out = tmp_path / "report.html"
    summary = build_report(read_scores(scores), out, top_n=len(MATH_NAMES))
    assert summary["plots"] >= 2
    html = out.read_text(encoding="utf-8")
    assert "$x^2$" in html and r"$\frac$" in html  # shown as written in the tables


def test_plot_labels_keep_the_names_literal():
    """The escaping shows exactly the name: matplotlib's own parser sees no math in it."""
    from matplotlib.text import Text

    from pipeline.htmlreport import _plain_label

    for name in MATH_NAMES:
        text = Text(0, 0, _plain_label(name))
        shown, is_math = text._preprocess_math(text.get_text())
        assert (shown, is_math) == (name, False), name


# ---------------------------------------------------------------------------- D8 terminal and CSV


def test_printable_escapes_every_terminal_attack_visibly():
    for attack in TERMINAL_ATTACKS:
        shown = printable(attack)
        assert shown.isprintable(), repr(shown)
        assert "\x1b" not in shown and "\r" not in shown and "\x9b" not in shown
    assert printable("\x1b[31mRED") == "\\x1b[31mRED"
    assert printable("ok\rFAKE") == "ok\\rFAKE"
    assert printable("admin\u202e") == "admin\\u202e"
    # ordinary text, non-ASCII names and Windows paths are left alone
    for plain in ("U1@DOM1", "Zoë Ünal", "用户", "DOM\\user", "a b  c", ""):
        assert printable(plain) == plain


def test_csv_cell_neutralises_formulas_reversibly():
    for value in FORMULAS:
        cell = csv_cell(value)
        assert cell.startswith("'"), value
        assert csv_uncell(cell) == value
    for value in ("U1@DOM1", "3.5", "", "C1", "a=b"):
        assert csv_cell(value) == value
        assert csv_uncell(csv_cell(value)) == value


def hostile_scores(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A log whose user names are terminal attacks and formulas, and its scores file."""
    users = [f"U{i}{attack}" for i, attack in enumerate(TERMINAL_ATTACKS)] + FORMULAS
    scores = tmp_path / "scores.csv.gz"
    write_scores(scores, users)
    log = tmp_path / "log.csv"
    lines = ["time,src_user,dst_user,src_computer,dst_computer,auth_type,logon_type,auth_orientation,"
             "success"]
    for window in range(2):
        for i, user in enumerate(users):
            lines.append(f"{window * 3600 + i},{user},{user},H{user},C1,K,N,L,S")
    log.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return scores, log, users


@pytest.mark.parametrize("by", ["event", "user", "host"])
def test_top_prints_no_control_characters(tmp_path, by):
    scores, log, users = hostile_scores(tmp_path)
    text = format_top(read_scores(scores), 100, by, log)
    assert no_control_chars(text), [line for line in text.splitlines() if not no_control_chars(line)]
    assert "\\x1b[31mRED" in text and "ok\\rFAKE" in text and "\\u202e" in text
    result = CliRunner().invoke(cli, ["top", "--scores", str(scores), "--input", str(log),
                                      "-n", "100", "--by", by])
    assert result.exit_code == 0, result.output
    assert no_control_chars(result.output)
    # every event still has one row of its own: escaping adds no lines
    assert len(result.output.strip().splitlines()) == 1 + (len(users) if by != "host" else len(users) + 1)


def test_alerts_print_no_control_characters(tmp_path):
    scores, log, users = hostile_scores(tmp_path)
    config = tmp_path / "config.yaml"
    # every scored event is an alert: the window percentile is low enough
    config.write_text("alerting:\n  window_percentile: 1\n  min_history: 1\n")
    result = CliRunner().invoke(cli, ["alerts", "--config", str(config), "--scores", str(scores),
                                      "--input", str(log), "-n", "100"])
    assert result.exit_code == 0, result.output
    assert no_control_chars(result.output), [x for x in result.output.splitlines()
                                             if not no_control_chars(x)]
    assert "\\x1b]0;pwned\\x07" in result.output  # shown, not obeyed
    assert re.search(r"^\s+- ", result.output, re.M)  # reasons were printed


def test_top_csv_export_neutralises_formulas(tmp_path):
    scores, log, users = hostile_scores(tmp_path)
    out = tmp_path / "top.csv"
    result = CliRunner().invoke(cli, ["top", "--scores", str(scores), "--input", str(log),
                                      "-n", "100", "--by", "user", "--csv", str(out)])
    assert result.exit_code == 0, result.output
    with open(out, encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:2] == ["rank", "user"]
    cells = [cell for row in rows for cell in row]
    assert not [c for c in cells if c.startswith(("=", "+", "-", "@", "\t", "\r"))]
    names = {csv_uncell(row[1]) for row in rows[1:]}
    assert names == set(users)  # reversible: the exact names come back
    assert rows[0][-1] == "raw line"
    log_lines = set(log.read_bytes().decode("utf-8").split("\n"))
    assert all(csv_uncell(row[-1]) in log_lines for row in rows[1:])


def test_top_csv_makes_a_missing_directory_and_under_a_file_is_one_line(tmp_path):
    """As every output (the atomic writer): missing directories are made; a path through a file
    is one line naming it, before anything is written."""
    scores, _, _ = hostile_scores(tmp_path)
    made = tmp_path / "no" / "such" / "top.csv"
    result = CliRunner().invoke(cli, ["top", "--scores", str(scores), "--csv", str(made)])
    assert result.exit_code == 0 and made.read_text().startswith("rank,")
    blocked = tmp_path / "no" / "such" / "top.csv" / "top.csv"
    result = CliRunner().invoke(cli, ["top", "--scores", str(scores), "--csv", str(blocked)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: {made}: Not a directory; check the path" in result.output


def test_scores_files_keep_raw_values(tmp_path):
    """The scores file is a machine format (eval, top, alerts, report, pandas): values stay exact."""
    from pipeline.replay import replay

    log = tmp_path / "log.csv"
    log.write_text("\n".join(ROW.replace("U1@DOM1", user).format(t)
                             for t, user in ((10, "=1+1"), (20, "@SUM(A1)"), (4000, "-x"))) + "\n")
    out = tmp_path / "scores.csv.gz"
    replay(log, out, config_from_dict({"window": {"size_seconds": 3600},
                                       "model": {"rnn": {"hidden_size": 8}}}), progress=False)
    assert [r["user"] for r in read_scores(out)] == ["=1+1", "@SUM(A1)", "-x"]


# ---------------------------------------------------------------------------- D1 over the broker


@pytest.mark.slow
def test_far_future_event_is_dead_lettered_and_later_events_are_scored(kafka_bootstrap, tmp_path):
    """An attacker's year-2199 event on every raw partition used to push the watermark to 2199, so
    every later event went to the late topic unscored. Now it is dead-lettered with the reason,
    no event is late and every later event is archived with a loss."""
    from pipeline.demo import ArchiveCounter, StageProcesses
    from pipeline.produce import produce_file

    config, config_path = stream_config(
        tmp_path, kafka_bootstrap,
        {"topics": {"partitions": 2}, "window": {"size_seconds": 3600},
         "tokenizer": {"kind": "char"}, "training": {"epochs": 1}})
    future = int(MAX_EPOCH_SECONDS - 200 * DAY)
    lines = [ROW.replace("C2", f"C{i % 5}").format(10 + i) for i in range(40)]  # window 0
    lines += [ROW.format(future)] * 4  # the attack: with 2 partitions, both get one
    lines += [ROW.replace("C2", f"C{i % 5}").format(3700 + i) for i in range(40)]  # window 1
    lines += [ROW.replace("C2", f"C{i % 5}").format(7300 + i) for i in range(40)]  # window 2
    log = tmp_path / "attack.csv"
    log.write_text("\n".join(lines) + "\n")
    attack_lines = {i + 1 for i, text in enumerate(lines) if text.startswith(str(future))}
    good = len(lines) - len(attack_lines)

    stages = StageProcesses(config_path, tmp_path / "logs")
    archive = Path(config.streaming.archive_dir)
    try:
        stages.start("tokenizer")
        for stage in ("windower", "trainer", "scorer", "archiver"):
            stages.start(stage)
        produce_file(config, log)
        wait_for(lambda: ArchiveCounter(archive).count()[0] >= good or stages.dead(), 180,
                 what="every good event archived")
        assert not stages.dead(), stages.dead()
        dead = read_records(config, config.topics.dead_letters, expected=len(attack_lines))
        late = read_records(config, config.topics.late, timeout=5.0)
    finally:
        stages.stop()
        delete_topics(config)
    letters = {r["line"]: r for name, r in dead if name == "salka.DeadLetter"}
    assert set(letters) == attack_lines
    for record in letters.values():
        assert "too far in the future" in record["reason"]
    assert late == []
    rows = read_scores(archive)
    assert len(rows) == good
    assert {int(r["line"]) for r in rows}.isdisjoint(attack_lines)
    later = [r for r in rows if int(r["window"]) >= 1]
    assert len(later) == 80 and all(r["loss"] for r in later)  # scored, not late
