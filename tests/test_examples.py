"""examples/: each ready-made config reads its sample in tests/data without a malformed line,
and `pipeline init` / `pipeline check` serve them."""

import time
from datetime import datetime, timezone

import pytest
import yaml
from click.testing import CliRunner
from helpers import ROOT

from pipeline.cli import cli
from pipeline.config import config_from_dict, load_config
from pipeline.formats import example_config, format_names
from pipeline.parsing import CommentRow, Event, HeaderRow, LineParser, Malformed, read_lines
from pipeline.replay import replay

EXAMPLES = ROOT / "examples"
DATA = ROOT / "tests" / "data"
YEAR_2000 = 946684800.0


def sample(name):
    (path,) = DATA.glob(f"{name}.*")
    return path


def parse_sample(name, *overrides):
    config = load_config(EXAMPLES / f"{name}.yaml", overrides)
    parser = LineParser(config.input)
    return config, [parser.parse(raw, number) for number, raw in read_lines(sample(name))]


def test_the_shipped_formats_are_the_example_files():
    assert format_names() == sorted(p.stem for p in EXAMPLES.glob("*.yaml"))
    assert {"lanl", "apache", "syslog-rfc3164", "syslog-rfc5424", "jsonl", "zeek-conn",
            "windows-events", "hdfs", "bgl"} <= set(format_names())


@pytest.mark.parametrize("name", format_names())
def test_example_parses_its_sample_with_zero_malformed_lines(name):
    config, results = parse_sample(name)
    malformed = [r for r in results if isinstance(r, Malformed) and not isinstance(r, HeaderRow)]
    assert malformed == []
    events = [r for r in results if isinstance(r, Event)]
    assert len(events) >= 5
    # sensible times: LANL counts seconds from the start of the data set, the others are dates
    low, high = (0, 10 * 86400) if name == "lanl" else (YEAR_2000, time.time() + 86400)
    assert all(e.time is not None and low <= e.time <= high for e in events)
    # every entity is filled on some event, every event gives the model something to read
    for entity in config.input.entities:
        assert any(e.entity(entity, config.input) not in ("", "-") for e in events), entity
    assert all(any(v for _, v in e.text_fields) for e in events)


@pytest.mark.parametrize("name, line, field, value, when", [
    ("apache", 4, "request", "GET /admin/ HTTP/2.0", "2024-03-05T08:01:17"),
    ("apache", 6, "request", 'GET /search?q=\\"quoted\\" HTTP/1.1', "2024-03-05T09:02:56"),
    ("syslog-rfc5424", 2, "app", "myproc", "2024-03-05T15:15:03.000003"),
    ("syslog-rfc5424", 6, "msg", "alice : TTY=pts/0 ; COMMAND=/usr/bin/id", "2024-03-05T09:01:18"),
    ("jsonl", 4, "event.action", "sudo", "2024-03-05T09:00:00"),  # a key that holds a dot
    ("jsonl", 3, "source.ip", "", "2024-03-05T07:16:00"),  # null reads as empty
    ("zeek-conn", 9, "id.resp_p", "53", "2024-03-05T08:15:02.123456"),
    ("windows-events", 2, "TargetUserName", "alice", "2024-03-05T08:15:02.123456"),
    ("hdfs", 1, "component", "dfs.DataNode$PacketResponder", "2008-11-09T20:36:15"),
    ("bgl", 4, "label", "KERNDTLB", "2005-06-12T00:32:07"),
])
def test_example_fields_and_times(name, line, field, value, when):
    _, results = parse_sample(name)
    event = results[line - 1]
    assert isinstance(event, Event) and event.fields[field] == value
    assert datetime.fromtimestamp(event.time, timezone.utc).isoformat().startswith(when)


def test_bgl_label_is_never_read_by_the_model():
    config, results = parse_sample("bgl")
    assert "label" not in [name for name, _ in results[0].text_fields]


def test_syslog_without_a_year_takes_input_default_year():
    _, results = parse_sample("syslog-rfc3164", "input.default_year=2023")
    assert results[0].time == datetime(2023, 3, 5, 8, 15, 2, tzinfo=timezone.utc).timestamp()
    leap = LineParser(config_from_dict(yaml.safe_load(example_config("syslog-rfc3164")),
                                       ["input.default_year=2024"]).input)
    assert leap.parse("Feb 29 12:00:00 h app: x", 1).time == datetime(
        2024, 2, 29, 12, tzinfo=timezone.utc).timestamp()


def test_syslog_year_defaults_to_this_year_or_last_for_a_later_date():
    config = load_config(EXAMPLES / "syslog-rfc3164.yaml")
    now = datetime(2025, 1, 2, 12, tzinfo=timezone.utc).timestamp()
    parser = LineParser(config.input, clock=lambda: now)
    january = parser.parse("Jan  2 08:00:00 h app: x", 1)
    december = parser.parse("Dec 31 23:00:00 h app: x", 2)
    assert datetime.fromtimestamp(january.time, timezone.utc).year == 2025
    assert datetime.fromtimestamp(december.time, timezone.utc).year == 2024


def test_zeek_fields_line_that_disagrees_with_the_columns_is_malformed():
    config = load_config(EXAMPLES / "zeek-conn.yaml")
    parser = LineParser(config.input)
    assert isinstance(parser.parse("#path\tconn", 5), CommentRow)
    wrong = parser.parse("#fields\tts\tuid\tid.orig_h", 7)
    assert isinstance(wrong, Malformed) and not isinstance(wrong, HeaderRow)
    assert "#fields line names" in wrong.reason and "input.csv.columns" in wrong.reason


@pytest.mark.parametrize("name", ["apache", "zeek-conn", "lanl"])
def test_init_writes_the_example_config(name, tmp_path):
    result = CliRunner().invoke(cli, ["init", "--format", name])
    assert result.exit_code == 0, result.output
    assert result.output == (EXAMPLES / f"{name}.yaml").read_text()
    written = tmp_path / "my.yaml"
    written.write_text(result.output)
    assert load_config(written) == load_config(EXAMPLES / f"{name}.yaml")


def test_init_lanl_is_the_default_config():
    assert load_config(EXAMPLES / "lanl.yaml") == load_config(None)


def test_check_shows_fields_times_windows_entities_and_tokens():
    result = CliRunner().invoke(cli, ["check", "--config", str(EXAMPLES / "apache.yaml"),
                                      "--input", str(sample("apache")), "-n", "4"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "line 1: time 2024-03-05T08:15:02Z (1709626502), window 474896" in out
    assert 'entities: user="-" src_host="10.0.0.7"' in out
    assert 'model:    request="GET / HTTP/1.1" status="200"' in out
    assert "tokens (bpe, " in out and "[BOS]" in out
    assert "4 lines read: 4 events, 0 malformed" in out
    assert "line 5" not in out


def test_check_shows_why_lines_are_malformed():
    result = CliRunner().invoke(cli, ["check", "--input", str(sample("apache")), "-n", "3"])
    assert result.exit_code == 0, result.output  # the first lines only: not replay's verdict
    assert "line 1: MALFORMED: expected 9 CSV columns, got" in result.output
    assert "replay would stop if the whole file were like its first 3 lines:" in result.output
    assert "3 of 3 lines malformed (all)" in result.output
    whole = CliRunner().invoke(cli, ["check", "--input", str(sample("apache"))])
    assert whole.exit_code == 1, whole.output  # replay would stop: a script can tell
    assert whole.output.splitlines()[-1].startswith("replay would stop: ")


def test_a_json_lone_surrogate_is_a_malformed_line_not_a_crash(tmp_path):
    """"\\ud800" is valid JSON but no text: the line is malformed (a dead letter in the stage),
    and replay skips it as it does, instead of failing when it writes the scores file."""
    config = load_config(EXAMPLES / "jsonl.yaml")
    good = sample("jsonl").read_text().splitlines()
    hostile = good[0].replace('"alice"', '"al\\ud800ice"')
    assert hostile != good[0]
    result = LineParser(config.input).parse(hostile.encode(), 2)
    assert isinstance(result, Malformed) and "lone UTF-16 surrogate" in result.reason
    assert "'user.name'" in result.reason
    log = tmp_path / "events.jsonl"
    log.write_text("\n".join([good[0], hostile, *good[1:]]) + "\n")
    count, report = replay(log, tmp_path / "scores.csv.gz", config, progress=False)
    assert count == len(good) and [e.line for e in report.errors] == [2]
