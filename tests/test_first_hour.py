"""Issue 10's table of first-hour mistakes: each gets one line naming the key / file / row and
what to do, a non-zero exit where nothing useful was produced, and never a traceback."""

import gzip
import logging
from datetime import datetime, timezone

import pytest
from helpers import ROOT, TINY_MODEL, invoke, one_error_line, write_small_scores

from pipeline.cli import cli
from pipeline.config import config_from_dict
from pipeline.parsing import HeaderRow, LineParser, Malformed
from pipeline.replay import ParseReport

EXAMPLES, DATA = ROOT / "examples", ROOT / "tests" / "data"
TINY = TINY_MODEL


@pytest.fixture
def scores(tmp_path):
    """A small scores file: lines 2..21, loss rising with the line; lines 19..21 anomalous."""
    return write_small_scores(tmp_path / "scores.csv.gz", 21)


def test_syslog_timestamps_without_a_year_are_scored_in_input_default_year(tmp_path):
    out = tmp_path / "scores.csv.gz"
    result = invoke("replay", "--config", EXAMPLES / "syslog-rfc3164.yaml", "--input",
                    DATA / "syslog-rfc3164.log", "--output", out, "--set", "input.default_year=2023",
                    *TINY)
    assert result.exit_code == 0, result.output
    assert "scored 9 events" in result.output
    with gzip.open(out, "rt") as handle:
        first = handle.read().splitlines()[1].split(",")
    assert float(first[1]) == datetime(2023, 3, 5, 8, 15, 2, tzinfo=timezone.utc).timestamp()


def test_text_time_field_that_is_not_a_group_of_the_regex():
    error = one_error_line(invoke("check", "--config", EXAMPLES / "apache.yaml", "--input",
                                  DATA / "apache.log", "--set", "input.time_field=timestamp"), 2)
    assert "input.time_field: expected one of the named groups of input.text.pattern" in error
    assert "got 'timestamp'" in error and "add a group (?P<name>...)" in error


def test_text_format_with_an_invalid_regex():
    error = one_error_line(invoke("check", "--input", DATA / "apache.log", "--set",
                                  "input.format=text", "--set", "input.text.pattern=(?P<time>[0-9+"), 2)
    assert "input.text.pattern: not a valid regular expression: unterminated character set" in error
    assert "fix it (Python re syntax" in error


@pytest.mark.parametrize("config, overrides, message", [
    ("apache.yaml", ["input.entities.dst_host=server"],
     "input.entities.dst_host: expected one of the named groups of input.text.pattern"),
    ("lanl.yaml", ["input.model_fields=[src_user, nosuch]"],
     "input.model_fields[1]: expected one of input.csv.columns"),
    ("jsonl.yaml", ["input.entities.user=user.id"],
     "input.entities.user: expected one of input.json.fields"),
])
def test_entities_or_model_fields_naming_a_field_that_does_not_exist(config, overrides, message):
    sets = [a for o in overrides for a in ("--set", o)]
    error = one_error_line(invoke("check", "--config", EXAMPLES / config, "--input",
                                  DATA / "apache.log", *sets), 2)
    assert message in error and "fix the name" in error


def test_every_line_malformed_fails_and_writes_nothing(tmp_path):
    out = tmp_path / "scores.csv.gz"
    result = invoke("replay", "--input", DATA / "apache.log", "--output", out, *TINY)
    error = one_error_line(result, 1)
    assert f"{DATA / 'apache.log'}: 9 of 9 lines malformed (all), most often line 1" in error
    assert "expected 9 CSV columns" in error and "pipeline check" in error
    assert not out.exists()


def test_more_than_the_malformed_fraction_fails_unless_raised(tmp_path):
    log = tmp_path / "auth.csv"
    good = (DATA / "lanl.csv").read_text().splitlines()[1:4]
    log.write_text("\n".join([*good, "oops", "1,2", "", "x,y,z"]) + "\n")
    out = tmp_path / "scores.csv.gz"
    error = one_error_line(invoke("replay", "--input", log, "--output", out, *TINY), 1)
    assert "4 of 7 lines malformed (more than input.max_malformed_fraction (0.5))" in error
    assert not out.exists()
    result = invoke("replay", "--input", log, "--output", out, *TINY,
                    "--set", "input.max_malformed_fraction=0.6")
    assert result.exit_code == 0 and "scored 3 events" in result.output


LABELS_CASES = {
    "other headers": ("lineno,is_attack\n19,1\n", "labels.csv:1: header 'lineno,is_attack' does "
                                                  "not name the columns line and label"),
    "no header": ("19,1\n20,1\n", "labels.csv:1: header '19,1' does not name"),
    "yes/no": ("line,label\n19,yes\n20,no\n", "labels.csv:2: label 'yes' is not 0/1 or true/false"),
    "semicolons": ("line;label\n19;1\n", "(';' separated? use commas)"),
    "line not a number": ("line,label\n19,1\nC586,0\n", "labels.csv:3: line 'C586' is not a line number"),
    "short row": ("line,label\n19,1\n20\n", "labels.csv:3: 1 columns, the header has 2"),
    "twice": ("line,label\n19,1\n19,0\n", "labels.csv:3: line 19 is labelled again (first at row 2)"),
}


@pytest.mark.parametrize("case", LABELS_CASES)
def test_labels_file_that_is_not_line_label_is_an_error_naming_the_row(case, scores, tmp_path):
    content, message = LABELS_CASES[case]
    labels = tmp_path / "labels.csv"
    labels.write_text(content)
    error = one_error_line(invoke("eval", "--scores", scores, "--labels", labels), 1)
    assert message in error
    assert "labels 0/1 or true/false" in error or "give each line once" in error


def test_labels_are_read_by_column_name_so_swapped_columns_give_the_same_result(scores, tmp_path):
    plain, swapped = tmp_path / "plain.csv", tmp_path / "swapped.csv"
    plain.write_text("line,label\n19,1\n20,true\n21,1\n5,0\n")
    swapped.write_text("\ufefflabel,line,note\nTRUE,21,x\n1,19,y\n1,20,\nfalse,5,z\n")
    a = invoke("eval", "--scores", scores, "--labels", plain, "--json")
    b = invoke("eval", "--scores", scores, "--labels", swapped, "--json")
    assert a.exit_code == b.exit_code == 0, a.output + b.output
    assert a.output == b.output and '"roc_auc": 1.0' in a.output and '"positives": 3' in a.output


@pytest.mark.parametrize("command", [["eval", "--labels", "LABELS"], ["top"], ["alerts"],
                                     ["report", "--output", "r.html"]])
def test_a_log_file_passed_as_scores(command, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("line,label\n3,1\n")
    command = [labels if arg == "LABELS" else arg for arg in command]
    args = [command[0], "--scores", DATA / "lanl.csv", *command[1:]]
    error = one_error_line(invoke(*args), 1)
    assert f"{DATA / 'lanl.csv'}: not a scores file (no 'line' column" in error
    assert "pass the file written by pipeline replay --output" in error
    fake = tmp_path / "auth.csv.gz"
    fake.write_bytes((DATA / "lanl.csv").read_bytes())  # named .gz, not gzip
    error = one_error_line(invoke(command[0], "--scores", fake, *command[1:]), 1)
    assert "not a readable scores file" in error


def test_set_a_kafka_key_with_dots_is_one_librdkafka_key():
    config = config_from_dict({}, ["kafka.bootstrap.servers=h:9092", "kafka.sasl.mechanism=PLAIN"])
    assert config.kafka == {"bootstrap.servers": "h:9092", "sasl.mechanism": "PLAIN"}
    result = invoke("check", "--input", DATA / "lanl.csv", "-n", "2",
                    "--set", "kafka.bootstrap.servers=h:9092")
    assert result.exit_code == 0, result.output


def test_every_command_takes_config_and_set():
    """The README's promise: every command (but init, which only prints a file) takes both."""
    for name, command in cli.commands.items():
        options = {opt for param in command.params for opt in param.opts}
        if name != "init":
            assert {"--config", "--set"} <= options, name


# Required options of each, so that the call reaches --config / --set handling.
REQUIRED = {"top": ["--scores", DATA / "lanl.csv"], "report": ["--scores", DATA / "lanl.csv",
            "--output", "x.html"], "eval": ["--scores", DATA / "lanl.csv", "--labels", DATA / "lanl.csv"],
            "generate": ["--output", "x.csv", "--labels", "y.csv"], "broker": []}


@pytest.mark.parametrize("command", ["top", "report", "eval", "generate", "broker"])
def test_commands_once_refusing_config_now_validate_it(command):
    error = one_error_line(invoke(command, "--config", ROOT / "config.yaml", "--set",
                                  "nosuch.key=1", *REQUIRED[command]), 2)
    assert "nosuch: unknown key" in error


def test_top_eval_and_report_run_with_config(scores, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("line,label\n21,1\n")
    config = ["--config", ROOT / "config.yaml"]
    assert invoke("top", "--scores", scores, *config).exit_code == 0
    assert invoke("eval", "--scores", scores, "--labels", labels, *config).exit_code == 0
    report = invoke("report", "--scores", scores, "--output", tmp_path / "r.html", *config)
    assert report.exit_code == 0 and (tmp_path / "r.html").exists()


def test_malformed_lines_are_logged_one_by_one_to_a_cap_then_counted_per_reason(caplog):
    errors = [Malformed(n, f"expected 9 CSV columns, got {n % 2 + 4}") for n in range(2, 40)]
    errors += [Malformed(n, f"bad time in field 'time': time '-{n}' is negative") for n in range(40, 47)]
    with caplog.at_level(logging.WARNING):
        ParseReport(events=100, errors=errors).log_summary("auth.csv")
    text = caplog.text
    assert text.count(" skipped: ") == 20 and "auth.csv line 21 skipped" in text
    assert "auth.csv: all 45 malformed lines by reason:" in text
    assert "19 x expected 9 CSV columns, got 4 (first at line 2)" in text
    assert "19 x expected 9 CSV columns, got 5 (first at line 3)" in text
    assert "7 x bad time in field 'time': time '…' is negative (first at line 40)" in text


def test_a_utf8_bom_before_the_csv_header_is_not_data():
    parser = LineParser(config_from_dict({}).input)
    header = "time,src_user,dst_user,src_computer,dst_computer,auth_type,logon_type,auth_orientation,success"
    assert isinstance(parser.parse(b"\xef\xbb\xbf" + header.encode() + b"\r\n", 1), HeaderRow)
    event = parser.parse("\ufeff3600,U1,U1,C1,C2,K,N,L,S", 1)
    assert event.time == 3600.0 and event.fields["src_user"] == "U1"
