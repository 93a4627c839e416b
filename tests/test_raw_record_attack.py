"""A hostile writer of the raw topic: records that once stopped the tokenizer or a later stage,
or reached a terminal unescaped. Each is driven through a real ``StageRunner`` (its real
producer checks sizes locally; clients connect lazily, so no broker is needed) or the real log
formatter."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

import pytest
from stage_fakes import FakeMessage

from pipeline.config import config_from_dict
from pipeline.logs import JsonFormatter, TextFormatter
from pipeline.runner import DeadLetterLog, StageRunner
from pipeline.stages.tokenizer import TokenizerStage
from pipeline.topicrecords import CONTROL_HEADER, END_OF_INPUT, LINE_HEADER

GOOD = b"7200,U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success"


@pytest.fixture
def tokenizer(tmp_path):
    made = []

    def make(end_of_input: bool = True, **kafka) -> StageRunner:
        config = config_from_dict({"kafka": {"bootstrap.servers": "127.0.0.1:9", **kafka},
                                   "streaming": {"state_dir": str(tmp_path), "end_of_input": end_of_input}})
        runner = StageRunner(config, lambda: TokenizerStage(config))
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner._discard()


def sent(runner: StageRunner) -> dict[str, int]:
    return {topic.split(".")[-1]: n for topic, n in runner.out.by_topic.items()}


@pytest.mark.parametrize("line", [b"9223372036854775808", "\u00b2".encode(), b"9" * 5000])
def test_a_line_header_no_record_can_carry_is_no_line(tokenizer, line):
    """A line number past an Avro long made the dead letter fail to encode, and "\u00b2" (a digit
    to str.isdigit(), not to int()) broke the runner's dead-lettering: the tokenizer crash-looped
    on one record. Now the record is dead-lettered without a line and the next one goes on."""
    runner = tokenizer()
    runner._handle(FakeMessage("raw", 0, 0, b"junk", headers=[(LINE_HEADER, line)]))
    runner._handle(FakeMessage("raw", 0, 1, GOOD, headers=[(LINE_HEADER, b"2")]))
    assert sent(runner) == {"dead-letters": 1, "tokens": 1}
    assert runner.stage.counts == {"events": 1, "dead_letters": 1, "control": 0}


def test_a_record_whose_handling_fails_with_an_odd_line_header_is_dead_lettered(tokenizer, monkeypatch):
    runner = tokenizer()

    def fail(*args):
        raise UnicodeError("a bug on odd input")

    monkeypatch.setattr(runner.stage.parser, "parse_fields", fail)
    runner._handle(FakeMessage("raw", 0, 0, GOOD, headers=[(LINE_HEADER, "\u00b2".encode())]))
    assert sent(runner) == {"dead-letters": 1}


def test_a_key_that_fills_a_message_does_not_stop_the_dead_letter(tokenizer):
    """An 8.39 MB key left the dead letter 0 bytes (poison.budget): EncodeError, crash loop."""
    runner = tokenizer()
    runner._handle(FakeMessage("raw", 0, 0, b"junk", key=b"k" * 8_388_200, headers=[(LINE_HEADER, b"1")]))
    runner._handle(FakeMessage("raw", 0, 1, GOOD, key=b"k" * 8_388_200, headers=[(LINE_HEADER, b"2")]))
    runner._handle(FakeMessage("raw", 0, 2, GOOD, key=b"host-7", headers=[(LINE_HEADER, b"3")]))
    assert sent(runner) == {"dead-letters": 2, "tokens": 1}


def test_an_event_over_half_the_message_limit_is_dead_lettered_by_the_tokenizer(tokenizer, caplog):
    """The windower wraps a tokens record and the scorer copies its line, entities and tokens:
    a tokens record that filled a message made the windower's output too large, and the
    windower, which keeps state, stopped on it (and with it every source). The tokenizer keeps
    events to half the limit, and says so."""
    runner = tokenizer(**{"message.max.bytes": 100_000})

    def line(big_fields: int) -> bytes:  # each big field is in the event twice: raw and fields
        return ",".join(["7200", *("F" * 20_000 if i < big_fields else "x" for i in range(8))]).encode()

    runner._handle(FakeMessage("raw", 0, 0, line(1), headers=[(LINE_HEADER, b"1")]))  # ~40 KB event
    runner._handle(FakeMessage("raw", 0, 1, line(2), headers=[(LINE_HEADER, b"2")]))  # ~80 KB event
    assert sent(runner) == {"tokens": 1, "dead-letters": 1}
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert re.match(r"tokenizer: raw\[0\]@1 \(line 2\): its event is 80\d{3} bytes", warning)
    assert "over 50000 (half of kafka message.max.bytes" in warning
    assert "shorten the line or raise message.max.bytes" in warning


def test_a_source_of_nothing_but_bad_records_does_not_write_a_log_line_per_record(tokenizer, caplog):
    """A source in another format (or a config that does not fit it): every record a dead
    letter. The first 20 are logged one by one, then a line a minute says how many more went;
    the dead-letter topic gets every one."""
    runner = tokenizer()
    now = [0.0]
    runner.stage.dead_letter_logs = (DeadLetterLog(clock=lambda: now[0]), DeadLetterLog())
    with caplog.at_level(logging.WARNING, logger="pipeline.runner"):
        for offset in range(500):
            now[0] = offset * 0.2  # 5 a second: 100 s in all
            runner._handle(FakeMessage("raw", 0, offset, b"not a LANL line",
                                       headers=[(LINE_HEADER, str(offset + 1).encode())]))
    assert sent(runner) == {"dead-letters": 500}
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.runner"]
    assert sum("expected 9 CSV columns" in x for x in lines) == 20
    assert "tokenizer: more than 20 records dead-lettered: further ones are counted" in lines[20]
    # the 21st came at 4 s; a minute later, at the 321st:
    assert lines[21:] == ["tokenizer: 301 more records dead-lettered since the last such line (321 in all)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.runner"):
        now[0] = 130.0  # the burst is over: its count is said once a period has passed
        runner.stage.dead_letter_logs[0].tick("tokenizer")
        runner.stage.dead_letter_logs[0].tick("tokenizer")
        now[0] = 400.0  # a quiet period later, a new burst: its first ones are shown again
        runner._handle(FakeMessage("raw", 0, 500, b"still not LANL", headers=[(LINE_HEADER, b"501")]))
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.runner"]
    assert lines[0] == "tokenizer: 179 more records dead-lettered since the last such line (500 in all)"
    assert len(lines) == 2 and "(line 501): expected 9 CSV columns" in lines[1]


def test_twenty_bad_lines_do_not_hide_the_traceback_of_a_record_the_stage_fails_on(
        tokenizer, caplog, monkeypatch):
    runner = tokenizer()
    for offset in range(25):
        runner._handle(FakeMessage("raw", 0, offset, b"junk", headers=[(LINE_HEADER, b"1")]))

    def fail(*args):
        raise UnicodeError("a bug on odd input")

    monkeypatch.setattr(runner.stage.parser, "parse_fields", fail)
    with caplog.at_level(logging.WARNING, logger="pipeline.runner"):
        runner._handle(FakeMessage("raw", 0, 25, GOOD, headers=[(LINE_HEADER, b"26")]))
    [failed] = [r for r in caplog.records if r.exc_info]
    assert "tokenizer failed on this record: UnicodeError: a bug on odd input" in failed.getMessage()


def test_a_stage_the_group_gives_no_partition_says_so_once(tokenizer, caplog):
    runner = tokenizer()
    runner._unassigned_since = time.monotonic() - 59.0
    with caplog.at_level(logging.WARNING, logger="pipeline.runner"):
        runner._say_if_unassigned()
        assert not caplog.records  # not yet
        runner._unassigned_since -= 1.0
        runner._say_if_unassigned()
        runner._say_if_unassigned()
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("tokenizer: no partition assigned after 60s in group salka.tokenizer: "
                           "fine for a replica beyond its topics' partition count")


HOSTILE = "2024-01-01 00:00:00\x1b[2J\x1b]0;owned\x07\x1b[1;32mALL CLEAR\x1b[0m\nforged line"


def hostile_record() -> logging.LogRecord:
    return logging.LogRecord("pipeline.runner", logging.WARNING, __file__, 1,
                             "tokenizer: raw[0]@5 (line 6): bad time: %s", (HOSTILE,), None)


def test_text_log_lines_show_control_characters_as_escapes():
    """A reason quoting a hostile time field (strptime's "unconverted data remains: ...") put
    ESC, OSC and BEL on the terminal that showed the stage's log, and a newline forged a line."""
    text = TextFormatter().format(hostile_record())
    assert "\x1b" not in text and "\x07" not in text and "\n" not in text
    assert text.endswith("bad time: 2024-01-01 00:00:00\\x1b[2J\\x1b]0;owned\\x07\\x1b[1;32mALL "
                         "CLEAR\\x1b[0m\\nforged line")


def test_json_log_lines_keep_the_message_as_data():
    text = JsonFormatter().format(hostile_record())
    assert "\x1b" not in text and "\n" not in text  # JSON escapes control characters itself
    assert json.loads(text)["message"].endswith(HOSTILE)


def test_an_end_of_input_record_is_refused_where_the_config_says_so(tokenizer):
    """Any writer of the raw topic could send the end-of-input control record that
    `pipeline produce` sends after a file, and close every open window (later events then late).
    On a shared bus, streaming.end_of_input: false makes it a dead letter."""
    control = [(CONTROL_HEADER, END_OF_INPUT.encode()), (LINE_HEADER, b"7")]
    trusting = tokenizer()
    trusting._handle(FakeMessage("raw", 0, 0, b"", headers=control))
    assert sent(trusting) == {"tokens": 1}
    refusing = tokenizer(end_of_input=False)
    refusing._handle(FakeMessage("raw", 0, 0, b"", headers=control))
    refusing._handle(FakeMessage("raw", 0, 1, GOOD, headers=[(LINE_HEADER, b"8")]))
    assert sent(refusing) == {"dead-letters": 1, "tokens": 1}
    assert refusing.stage.counts == {"events": 1, "dead_letters": 1, "control": 0}


def error_with(message: str) -> logging.LogRecord:
    """An error log record carrying a ValueError(message) with its traceback."""
    try:
        raise ValueError(message)
    except ValueError:
        return logging.LogRecord("pipeline.runner", logging.ERROR, __file__, 1, "failed", (),
                                 sys.exc_info())


def test_a_traceback_keeps_its_lines_and_escapes_a_quoted_record():
    text = TextFormatter().format(error_with("bad field '\x1b]0;owned\x07'"))
    assert "\x1b" not in text and "\x07" not in text
    assert text.splitlines()[1] == "Traceback (most recent call last):"
    assert text.splitlines()[-1] == "ValueError: bad field '\\x1b]0;owned\\x07'"


def test_an_exception_message_cannot_forge_a_log_line():
    forged = "2026-11-28 01:00:00,000 INFO pipeline.trainer: window 999: forged"
    lines = TextFormatter().format(error_with(f"x\n{forged}")).splitlines()
    assert not any(re.match(r"\d{4}-\d\d-\d\d ", line) for line in lines[1:])
    assert f"  {forged}" in lines
