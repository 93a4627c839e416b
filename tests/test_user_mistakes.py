"""User mistakes beyond issue 10's table: bad --set syntax, a missing or binary or empty input, a
directory where a file belongs (and the other way round), an output that cannot be written, a
config that is not YAML, the demo's --input / --labels. Each is one ``Error:`` line naming the
file or key, a non-zero exit, never a traceback, and nothing left half-written."""

import json
import os
import re
import stat

import pytest
from helpers import ROOT, TINY_MODEL, invoke, one_error_line, write_small_scores

DATA = ROOT / "tests" / "data"
TINY = TINY_MODEL


@pytest.fixture
def scores(tmp_path):
    return write_small_scores(tmp_path / "scores.csv.gz", 11)


@pytest.mark.parametrize("setting, message", [
    ("model.kind", "--set 'model.kind': expected key.path=value"),
    ("=3", "--set '=3': empty key in path"),
    ("nosuch.key=1", "nosuch: unknown key"),
    ("window.size_seconds=-5", "window.size_seconds: expected a positive number, got -5"),
    # once: every line malformed, in words that hid the format
    ("input.time_format=%Q", "input.time_format: expected 'epoch', 'iso8601' or a strptime format "
                             "that reads the times it writes ('Q' is a bad directive in format '%Q')"),
    ("kafka.bootstrap.servers=", "kafka: expected bootstrap.servers as host:port[,host:port...] (not "
                                 "empty; or KAFKA_BOOTSTRAP_SERVERS)"),  # once: "cannot reach ... at :"
])
def test_bad_set_syntax_names_the_setting(setting, message):
    error = one_error_line(invoke("check", "--input", DATA / "lanl.csv", "--set", setting), 2)
    assert message in error


@pytest.mark.parametrize("name, path", [("missing", "nothere.csv"), ("directory", ".")])
def test_input_that_is_missing_or_a_directory(name, path, tmp_path):
    error = one_error_line(invoke("replay", "--input", tmp_path / path, "--output",
                                  tmp_path / "s.csv.gz"), 2)
    assert "Invalid value for '--input'" in error
    assert ("does not exist" if name == "missing" else "is a directory") in error


@pytest.mark.parametrize("content, message", [
    (b"", "no events (the file is empty or only header / comment lines)"),
    (b"\x7fELF\x02\x01\x01\x00\xf0\x9f\x00\xff\xfe\n\x00\x01\x02\xc3\x28\n",
     "2 of 2 lines malformed (all), most often line 1: invalid UTF-8"),
])
def test_empty_or_binary_input_to_replay_writes_nothing(content, message, tmp_path):
    log, out = tmp_path / "in.log", tmp_path / "s.csv.gz"
    log.write_bytes(content)
    error = one_error_line(invoke("replay", "--input", log, "--output", out, *TINY), 1)
    assert f"{log}: {message}" in error
    assert not out.exists() and os.listdir(tmp_path) == ["in.log"]


def test_output_under_a_file_is_one_line_for_every_command_that_writes(scores, tmp_path):
    """A path whose directory is a file (ENOTDIR / EEXIST: no root needed to make one)."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory\n")
    commands = {
        "replay": ["--input", DATA / "lanl.csv", "--output", blocker / "s.csv.gz", *TINY],
        "report": ["--scores", scores, "--output", blocker / "r.html"],
        "generate": ["--output", blocker / "a.csv", "--labels", blocker / "l.csv", "--days", "1",
                     "--events-per-day", "100"],
    }
    for name, args in commands.items():
        error = one_error_line(invoke(name, *args), 1)
        assert error.startswith(f"Error: {blocker}") and "; check the path" in error, (name, error)
    assert blocker.read_text() == "not a directory\n" and os.listdir(tmp_path) == ["file.txt",
                                                                                  "scores.csv.gz"]


def test_output_onto_a_fifo_or_a_device_streams_into_it_and_leaves_it_alone(tmp_path):
    """Renaming over it (as root, over /dev/full) would replace the special file itself; and
    `generate --labels /dev/null`, `top --csv /dev/stdout` are what a Unix user writes. A FIFO
    or a character device is written straight, as a stream; a socket is still refused."""
    import gzip
    import socket
    import threading

    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    assert invoke("replay", "--input", DATA / "lanl.csv", "--output", fifo, *TINY).exit_code == 0
    reader.join(10)
    assert gzip.decompress(got[0]).startswith(b"line,event_time,window,")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    result = invoke("generate", "--days", "1", "--output", tmp_path / "a.csv", "--labels", os.devnull)
    assert result.exit_code == 0 and stat.S_ISCHR(os.stat(os.devnull).st_mode)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(tmp_path / "s.sock"))
        error = one_error_line(invoke("generate", "--days", "1", "--output", tmp_path / "s.sock",
                                      "--labels", tmp_path / "l.csv"), 1)
    assert f"{tmp_path / 's.sock'}: exists and is not a regular file" in error


def test_output_through_a_symlink_writes_its_target_and_keeps_the_link(tmp_path):
    target, link = tmp_path / "real.csv.gz", tmp_path / "link.csv.gz"
    target.write_bytes(b"old")
    link.symlink_to(target.name)
    result = invoke("replay", "--input", DATA / "lanl.csv", "--output", link, *TINY)
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and target.read_bytes()[:2] == b"\x1f\x8b"  # gzip now


@pytest.mark.parametrize("content, message", [
    ("model:\n  kind: rnn\n   x: 1\n", "cfg.yaml:3:5: not valid YAML: mapping values are not allowed here"),
    ("model:\n  kind: [\n", "cfg.yaml:3:1: not valid YAML: expected the node content"),
    ("a: b\n\tc: d\n", "cfg.yaml:2:1: not valid YAML: found character '\\t' that cannot start any token"),
    # YAML's last-one-wins would drop the first section silently
    ("model:\n  kind: gpt\nwindow: {}\nmodel:\n  rnn: {hidden_size: 8}\n",
     "cfg.yaml:4:1: not valid YAML: key 'model' given twice (first on line 1): the second would "
     "replace the first; keep one"),
    ("model:\n  rnn: {hidden_size: 8, hidden_size: 16}\n", "cfg.yaml:2:25: not valid YAML: key "
     "'hidden_size' given twice (first on line 2)"),
])
def test_yaml_syntax_error_is_one_line_with_line_and_column(content, message, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(content)
    error = one_error_line(invoke("check", "--config", config, "--input", DATA / "lanl.csv"), 2)
    assert message in error and error.endswith("fix the YAML syntax there")


def test_binary_config_is_one_line(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_bytes(b"model:\n  kind: \xff\xfe\n")
    error = one_error_line(invoke("check", "--config", config, "--input", DATA / "lanl.csv"), 2)
    assert f"{config}: not a YAML config (not UTF-8 text at byte 15)" in error


@pytest.mark.parametrize("command", [["top", "--archive"], ["report", "--output", "r.html", "--archive"],
                                     ["eval", "--labels", "LABELS", "--scores"], ["alerts", "--scores"]])
def test_a_directory_without_window_files_is_not_an_archive(command, tmp_path):
    """The demo's workdir instead of its archive: not "no scored events" and exit 0."""
    labels = tmp_path / "labels.csv"
    labels.write_text("line,label\n3,1\n")
    (tmp_path / "archive").mkdir()
    args = [labels if a == "LABELS" else tmp_path / a if a == "r.html" else a for a in command]
    error = one_error_line(invoke(*args, tmp_path), 1)
    assert f"{tmp_path}: no window-*.csv.gz files, so not a score archive" in error
    assert "e.g. demo/archive" in error


def test_demo_checks_its_input_and_labels_before_starting_anything(tmp_path):
    workdir = tmp_path / "demo"
    error = one_error_line(invoke("demo", "--input", DATA / "apache.log", "--workdir", workdir), 1)
    assert f"{DATA / 'apache.log'}: 9 of 9 lines malformed (all)" in error and "pipeline check" in error
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_text("line;label\n3;1\n")
    error = one_error_line(invoke("demo", "--input", DATA / "lanl.csv", "--labels", bad_labels,
                                  "--workdir", workdir), 1)
    assert f"{bad_labels}:1: header" in error
    error = one_error_line(invoke("demo", "--labels", bad_labels, "--workdir", workdir), 2)
    assert "--labels goes with --input" in error
    assert not workdir.exists()  # no broker, no stage, no generated log


def test_scores_file_named_without_gz_is_still_read(tmp_path):
    """Replay writes gzip whatever the name; the readers used to go by the suffix and refused
    replay's own output as "not a readable scores file"."""
    out, labels = tmp_path / "scores.csv", tmp_path / "labels.csv"
    assert invoke("replay", "--input", DATA / "lanl.csv", "--output", out, *TINY).exit_code == 0
    assert out.read_bytes()[:2] == b"\x1f\x8b"
    labels.write_text("line,label\n9,1\n")
    top = invoke("top", "--scores", out, "-n", "3")
    assert top.exit_code == 0 and top.output.splitlines()[0].startswith("rank"), top.output
    evaluated = invoke("eval", "--scores", out, "--labels", labels)  # read (one window: unscored)
    assert "not a readable" not in evaluated.output and "scored" in evaluated.output, evaluated.output


def test_broker_on_a_port_in_use_says_so_instead_of_reporting_the_other_listener():
    """It used to wait for the port, find the other listener open, print "listening", then
    "broker exited with code 0"."""
    import socket

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        error = one_error_line(invoke("broker", "--port", port), 1)
    assert f"port {port} on 127.0.0.1 is already in use (another broker?)" in error


def test_broker_with_a_storage_engine_it_does_not_have():
    error = one_error_line(invoke("broker", "--storage", "file:///tmp/x"), 2)
    assert "--storage: 'file:///tmp/x': the embedded broker stores in memory://NAME/ or s3://BUCKET/" in error


def test_an_output_that_names_an_input_is_refused_before_anything_is_written(scores, tmp_path):
    """`replay --output` equal to `--input` replaced the log with scores (exit 0); so did
    `report --output` the scores file and `generate --labels` the log. However the two are
    spelled (a link, a `..` through a directory yet to be made), nothing is read or written."""
    log = tmp_path / "auth.csv"
    log.write_bytes((DATA / "lanl.csv").read_bytes())
    (tmp_path / "link.csv").symlink_to(log)
    os.link(scores, tmp_path / "hard.csv.gz")
    archive = tmp_path / "archive"
    archive.mkdir()
    (archive / "window-000002.csv.gz").write_bytes(scores.read_bytes())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    cases = [
        (["replay", "--input", log, "--output", log, *TINY], "--output", "--input"),
        (["replay", "--input", tmp_path / "link.csv", "--output", tmp_path / "new" / ".." / "auth.csv",
          *TINY], "--output", "--input"),
        (["replay", "--input", log, "--output", tmp_path / "s.csv.gz", "--save-model", log, *TINY],
         "--save-model", "--input"),
        (["replay", "--input", log, "--output", tmp_path / "s.csv.gz", "--save-model",
          tmp_path / "s.csv.gz", *TINY], "--save-model", "--output"),
        (["report", "--scores", scores, "--output", tmp_path / "hard.csv.gz"], "--output", "--scores"),
        (["top", "--scores", scores, "--input", log, "--csv", log], "--csv", "--input"),
        (["generate", "--output", log, "--labels", log, "--days", "1"], "--labels", "--output"),
        (["top", "--archive", archive, "--csv", archive / "window-000002.csv.gz"], "--csv", "--archive"),
    ]
    for args, output, other in cases:
        error = one_error_line(invoke(*args), 2)
        assert f"is the same file as {other}: writing it would replace that file" in error, args
        assert error.startswith(f"Error: {output} "), args
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert (archive / "window-000002.csv.gz").read_bytes() == scores.read_bytes()


def test_an_unwritable_extra_output_stops_replay_before_it_trains(tmp_path):
    """`--save-model` and `--sessions` were first written after the whole replay: a bad path
    cost the run, and the scores file was replaced before the error."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for option in ("--save-model", "--sessions"):
        extra = (["--set", "sessions.entity=user", "--set", "tokenizer.kind=template"]
                 if option == "--sessions" else [])
        result = invoke("replay", "--input", DATA / "lanl.csv", "--output", tmp_path / "s.csv.gz",
                        option, blocker / "out", *TINY, *extra)
        assert one_error_line(result, 1) == f"Error: {blocker}: Not a directory; check the path"
        assert "window 0" not in result.output  # nothing trained
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def test_a_merge_key_may_still_be_overridden():
    import yaml

    from pipeline.config import UniqueKeyLoader

    assert yaml.load("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n", Loader=UniqueKeyLoader) == {
        "a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}
    # an override inside an anchored mapping merged again (PyYAML flattens it in place, and
    # the check once saw both keys): read as safe_load reads it
    nested = "profiles: {base: &b {x: 1}, mid: &m {<<: *b, x: 2}}\ntop: {<<: *m}\n"
    assert yaml.load(nested, Loader=UniqueKeyLoader) == yaml.safe_load(nested)


@pytest.mark.parametrize("doc", ["a: 1\n01: 2\n1: 3\n", "true: 1\nyes: 2\n", "1.0: a\n1: b\n"])
def test_keys_equal_once_read_are_one_key_given_twice(doc):
    """Written differently, read as one key: the mapping would keep the last one only."""
    import yaml

    from pipeline.config import UniqueKeyLoader

    with pytest.raises(yaml.YAMLError, match="given twice"):
        yaml.load(doc, Loader=UniqueKeyLoader)


def test_a_gzip_log_is_read_decompressed_and_a_truncated_one_is_one_line(tmp_path):
    """Logs are shipped compressed (LANL's auth.txt.gz): read as text, every line was malformed
    ("invalid UTF-8 ... check input.format"). Now read decompressed, whatever the file's name;
    the same scores as the plain log, lines numbered as zcat numbers them."""
    import gzip

    plain = (DATA / "lanl.csv").read_bytes()
    packed = tmp_path / "auth.log"  # no .gz: known by its first bytes
    packed.write_bytes(gzip.compress(plain))
    scores = {}
    for name, path in (("plain", DATA / "lanl.csv"), ("gzip", packed)):
        result = invoke("replay", "--input", path, "--output", tmp_path / f"{name}.csv.gz", *TINY)
        assert result.exit_code == 0, result.output
        scores[name] = gzip.decompress((tmp_path / f"{name}.csv.gz").read_bytes())
    assert scores["gzip"] == scores["plain"]
    assert "0 malformed" in invoke("check", "--input", packed).output
    truncated = tmp_path / "cut.csv.gz"
    truncated.write_bytes(packed.read_bytes()[:-20])
    for command in (["check"], ["replay", "--output", tmp_path / "t.csv.gz", *TINY]):
        args = [command[0], "--input", truncated, *command[1:]]
        assert one_error_line(invoke(*args), 1).startswith(
            f"Error: {truncated}: a gzip file that is truncated or corrupt (")
    assert not (tmp_path / "t.csv.gz").exists()


def test_check_and_eval_exit_1_when_they_give_no_answer(scores, tmp_path):
    """`check` said "replay would stop" and `eval` "cannot evaluate" with exit 0: a script
    running them could not tell. A header-only log now gets replay's verdict too."""
    header_only = tmp_path / "h.csv"
    header_only.write_text("time,src_user,dst_user,src_computer,dst_computer,auth_type,logon_type,"
                           "auth_orientation,success\n")
    result = invoke("check", "--input", header_only)
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == (f"replay would stop: {header_only}: no events (the file is "
                                              f"empty or only header / comment lines)")
    result = invoke("check", "--input", DATA / "lanl.csv", "-n", "1")  # its header: read on
    assert result.exit_code == 0 and "read more of them with -n" in result.output
    other_log = tmp_path / "labels.csv"
    other_log.write_text("line,label\n" + "".join(f"{n},{n % 2}\n" for n in range(500, 520)))
    result = invoke("eval", "--scores", scores, "--labels", other_log)
    assert result.exit_code == 1 and "cannot evaluate: " in result.output, result.output
    result = invoke("eval", "--scores", scores, "--labels", other_log, "--json")
    assert result.exit_code == 1 and json.loads(result.output)["error"], result.output
    good = tmp_path / "good.csv"
    good.write_text("line,label\n" + "".join(f"{n},{int(n > 8)}\n" for n in range(2, 12)))
    assert invoke("eval", "--scores", scores, "--labels", good).exit_code == 0


def test_a_replay_of_one_window_says_that_nothing_could_be_scored(tmp_path, caplog):
    """A log shorter than one window "succeeded" with no loss at all; top, eval and report then
    had nothing to show and did not say why."""
    result = invoke("replay", "--input", DATA / "lanl.csv", "--output", tmp_path / "s.csv.gz", *TINY,
                    "--set", "window.size_seconds=100000000")
    assert result.exit_code == 0
    assert ("every event is in one window (window.size_seconds: 1e+08), the first, which no model "
            "has seen before: no event has a loss; set a smaller window.size_seconds") in caplog.text
    caplog.clear()
    assert invoke("replay", "--input", DATA / "lanl.csv", "--output", tmp_path / "t.csv.gz", *TINY,
                  "--set", "window.size_seconds=60").exit_code == 0
    assert "every event is in one window" not in caplog.text


def test_generate_says_when_it_planted_no_red_team_event(tmp_path):
    one_day = invoke("generate", "--days", "1", "--output", tmp_path / "a.csv",
                     "--labels", tmp_path / "l.csv")
    assert one_day.exit_code == 0 and "(0 red-team)" in one_day.output
    assert "no red-team events planted: the first day is the clean day" in one_day.output
    two_days = invoke("generate", "--days", "2", "--events-per-day", "500", "--output", tmp_path / "b.csv",
                      "--labels", tmp_path / "m.csv")
    assert two_days.exit_code == 0 and "no red-team events planted" not in two_days.output


def test_top_with_a_log_that_is_not_the_scored_one_says_so(scores, tmp_path, caplog):
    """A --input shorter than the scored log only blanked the raw-line column, without a word."""
    short = tmp_path / "short.csv"
    short.write_text("a\nb\nc\n")
    result = invoke("top", "--scores", scores, "--input", short, "-n", "3")
    assert result.exit_code == 0
    assert re.search(rf"{re.escape(str(short))} has no line \d+( nor \d+ more)?: is it the log these "
                     r"scores came from\?", caplog.text), caplog.text
    caplog.clear()
    assert invoke("top", "--scores", scores, "--input", DATA / "lanl.csv", "-n", "3").exit_code == 0
    assert "is it the log" not in caplog.text


def test_a_directory_given_as_scores_points_to_archive(tmp_path):
    for command in ("top", "report", "alerts"):
        args = ["--output", tmp_path / "r.html"] if command == "report" else []
        if command == "alerts":  # alerts reads an archive from --scores DIR too (as eval does)
            error = one_error_line(invoke(command, "--scores", tmp_path), 1)
            assert "no window-*.csv.gz files, so not a score archive" in error, error
            continue
        error = one_error_line(invoke(command, "--scores", tmp_path, *args), 2)
        assert error == f"Error: Invalid value for --scores: {tmp_path} is a directory; an archive " \
                        f"directory goes to --archive DIR", error


@pytest.mark.parametrize("compressed", [False, True])
def test_a_log_read_from_a_pipe(tmp_path, compressed):
    """<(zcat log.gz) or a FIFO: the gzip check must not seek (a pipe cannot), plain or not."""
    import gzip
    import threading

    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    data = (DATA / "lanl.csv").read_bytes()

    def feed() -> None:
        with open(fifo, "wb") as pipe:
            pipe.write(gzip.compress(data) if compressed else data)

    writer = threading.Thread(target=feed)
    writer.start()
    result = invoke("check", "--input", fifo)
    writer.join(10)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "replay would accept lines like these"


def test_check_of_exactly_n_lines_has_read_the_whole_file(tmp_path):
    log = tmp_path / "three.csv"
    log.write_text("a\nb\nc\n")
    assert invoke("check", "--input", log, "-n", "3").exit_code == 1  # the whole file: replay's verdict
    assert invoke("check", "--input", log, "-n", "2").exit_code == 0  # its first lines only


def test_a_gzip_log_from_a_pipe_that_sends_its_first_byte_alone(tmp_path):
    """peek() on a pipe returns what one read gives: one byte, and the gzip went unnoticed."""
    import gzip
    import threading
    import time

    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    packed = gzip.compress((DATA / "lanl.csv").read_bytes())

    def feed() -> None:
        with open(fifo, "wb", buffering=0) as pipe:
            pipe.write(packed[:1])
            time.sleep(0.3)
            pipe.write(packed[1:])

    writer = threading.Thread(target=feed)
    writer.start()
    result = invoke("check", "--input", fifo)
    writer.join(10)
    assert result.output.splitlines()[-1] == "replay would accept lines like these", result.output


def test_with_json_logs_an_error_is_a_json_line_too(tmp_path):
    """`--log-format json` for a log shipper: the final `Error:` was the one plain-text line."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipeline", "--log-format", "json", "check", "--input",
                           DATA / "lanl.csv", "--set", "window.size_seconds=-1"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    entry = json.loads(line)
    assert (entry["level"], entry["exit_code"]) == ("ERROR", 2)
    assert entry["message"] == "window.size_seconds: expected a positive number, got -1"


def test_torch_info_lines_are_not_shown_unless_debugging():
    """Ctrl-C while torch loaded showed three of its INFO lines before salka's one line."""
    import subprocess
    import sys

    code = ("import logging, sys; from pipeline.logs import configure_logging; "
            "configure_logging(int(sys.argv[1])); print(logging.getLogger('torch.x').getEffectiveLevel())")
    levels = [subprocess.run([sys.executable, "-c", code, str(level)], capture_output=True, text=True,
                             cwd=ROOT, timeout=60).stdout.strip() for level in (20, 10)]
    assert levels == ["30", "10"]  # INFO run: torch at WARNING; -vv: torch's debug lines too
