import pytest
from helpers import LANL_LINE

from pipeline.config import config_from_dict
from pipeline.parsing import Event, HeaderRow, LineParser, Malformed, parse_time
from pipeline.windowing import event_order, window_of

HEADER = "time,src_user,dst_user,src_computer,dst_computer,auth_type,logon_type,auth_orientation,success"


def parser(*overrides):
    return LineParser(config_from_dict({}, list(overrides)).input)


def test_lanl_line_parses_into_time_entities_and_model_fields():
    event = parser().parse(LANL_LINE + "\n", 7)
    assert isinstance(event, Event)
    assert event.line == 7 and event.time == 3600.0
    assert event.fields["src_user"] == "U1@DOM1" and event.fields["dst_computer"] == "C2"
    # the time is not part of what the model reads
    assert [value for _, value in event.text_fields] == [
        "U1@DOM1", "U1@DOM1", "C1", "C2", "Kerberos", "Network", "LogOn", "Success"]
    assert "time" not in dict(event.text_fields)


def test_header_row_is_skipped_on_line_1_and_an_error_elsewhere():
    p = parser()
    assert isinstance(p.parse(HEADER, 1), HeaderRow)
    mid = p.parse(HEADER, 500)
    assert isinstance(mid, Malformed) and not isinstance(mid, HeaderRow)
    assert "header" in mid.reason
    forced = parser("input.csv.header=true").parse(LANL_LINE, 1)
    assert isinstance(forced, HeaderRow)
    assert isinstance(parser("input.csv.header=false").parse(LANL_LINE, 1), Event)


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("", "empty"),
        ("   \t ", "empty"),
        ("1,U1,U1,C1", "expected 9 CSV columns, got 4"),
        (LANL_LINE + ",extra", "expected 9 CSV columns, got 10"),
        ("abc,U1,U1,C1,C2,K,N,L,S", "bad time in field 'time'"),
        ("-5,U1,U1,C1,C2,K,N,L,S", "negative"),
        ("99999999999,U1,U1,C1,C2,K,N,L,S", "too far in the future"),
        ("nan,U1,U1,C1,C2,K,N,L,S", "not a finite number"),
        ('1,"U1,U1,C1,C2,K,N,L,S', "CSV"),
        ("1,U1\x00,U1,C1,C2,K,N,L,S", "NUL"),
        (b"1,U1\xff\xfe,U1,C1,C2,K,N,L,S", "invalid UTF-8"),
    ],
)
def test_malformed_lines_give_a_reason_with_the_line_number(raw, reason):
    result = parser().parse(raw, 42)
    assert isinstance(result, Malformed), result
    assert result.line == 42
    assert reason in result.reason


def test_time_formats():
    assert parse_time("1700000000.5", "epoch") == 1700000000.5
    assert parse_time("2024-01-02T03:04:05Z", "iso8601") == 1704164645.0
    assert parse_time("2024-01-02T03:04:05+01:00", "iso8601") == 1704164645.0 - 3600
    assert parse_time("02/Jan/2024:03:04:05 +0000", "%d/%b/%Y:%H:%M:%S %z") == 1704164645.0
    # naive times are UTC whatever the host's zone is
    assert parse_time("2024-01-02 03:04:05", "%Y-%m-%d %H:%M:%S") == 1704164645.0
    with pytest.raises(ValueError):
        parse_time("yesterday", "iso8601")


def test_free_text_lines_with_a_time_regex():
    p = parser(
        "input.format=text",
        r"input.text.pattern=^(?P<host>\S+) \S+ (?P<user>\S+) \[(?P<time>[^\]]+)\] (?P<request>.*)$",
        "input.time_format=%d/%b/%Y:%H:%M:%S %z",
        "input.entities={user: user, src_host: host}",
    )
    event = p.parse('10.0.0.1 - bob [02/Jan/2024:03:04:05 +0000] "GET / HTTP/1.1" 200', 3)
    assert isinstance(event, Event)
    assert event.time == 1704164645.0
    assert event.fields["user"] == "bob"
    assert [name for name, _ in event.text_fields] == ["host", "user", "request"]
    missing = p.parse("garbage", 4)
    assert isinstance(missing, Malformed) and "pattern" in missing.reason


def test_text_without_time_windows_by_line_count():
    config = config_from_dict({}, ["input.format=text", "input.time_field=", "input.entities={}",
                                   "window.size_lines=10"])
    p = LineParser(config.input)
    windows = [window_of(p.parse(f"event number {n}", n), config.window) for n in range(1, 31)]
    assert windows == [0] * 10 + [1] * 10 + [2] * 10


def test_window_assignment_and_order_are_by_event_time_then_line():
    config = config_from_dict({}, ["window.size_seconds=3600"])
    p = LineParser(config.input)
    a = p.parse("3599,U1,U1,C1,C2,K,N,L,S", 5)
    b = p.parse("3600,U1,U1,C1,C2,K,N,L,S", 2)
    c = p.parse("3600,U1,U1,C1,C2,K,N,L,S", 1)
    assert [window_of(e, config.window) for e in (a, b, c)] == [0, 1, 1]
    assert sorted([a, b, c], key=event_order) == [a, c, b]
