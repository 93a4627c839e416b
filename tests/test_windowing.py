"""Pure event-time windowing (pipeline/windowing.py): window indices, window ends, event order and the
watermark. Randomised checks use seeded ``random.Random`` (hypothesis is not installed)."""

from __future__ import annotations

import math
import random

import pytest
from helpers import LANL_LINE

from pipeline.config import WindowConfig, config_from_dict
from pipeline.parsing import MAX_EPOCH_SECONDS, Event, LineParser, Malformed
from pipeline.windowing import OUTAGE_GRACE, Watermark, event_clock, event_order, window_end, window_of

INF = math.inf


def timed(t: float, line: int = 1, source=None) -> Event:
    return Event(line=line, time=t, fields={}, text_fields=(), source=source)


def untimed(line: int, source=None) -> Event:
    return Event(line=line, time=None, fields={}, text_fields=(), source=source)


def seconds(size: float) -> WindowConfig:
    return WindowConfig(size_seconds=size)


def lines(size: int) -> WindowConfig:
    return WindowConfig(size_lines=size)


# ---------------------------------------------------------------------------- window_of


@pytest.mark.parametrize(
    "size, t, window",
    [
        (3600.0, 0.0, 0),
        (3600.0, -0.0, 0),  # parse_time accepts "-0" (not negative)
        (3600.0, 1e-9, 0),
        (3600.0, 3599.999, 0),
        (3600.0, math.nextafter(3600.0, 0), 0),
        (3600.0, 3600.0, 1),
        (3600.0, 7199.5, 1),
        (3600.0, 7200.0, 2),
        (86400.0, 86399.999999, 0),
        (86400.0, 86400.0, 1),
        (86400.0, 1_700_000_000.0, 19675),  # aligned to the epoch, not to the first event
        (86400.0, MAX_EPOCH_SECONDS, 84006),
        (1.0, 0.5, 0),
        (1.0, 12345.0, 12345),
        (0.5, 0.75, 1),
        (0.5, 1.0, 2),
    ],
)
def test_window_of_timed_events_is_floor_of_time_over_size(size, t, window):
    assert window_of(timed(t, line=999), seconds(size)) == window


def test_parsed_times_are_never_negative():
    parser = LineParser(config_from_dict({}).input)
    for raw in ["-1,U1,U1,C1,C2,K,N,L,S", "-0.001,U1,U1,C1,C2,K,N,L,S", "-inf,U1,U1,C1,C2,K,N,L,S"]:
        assert isinstance(parser.parse(raw, 2), Malformed)
    event = parser.parse(LANL_LINE, 2)
    assert window_of(event, config_from_dict({}).window) == 0  # time 3600 < one day


# Sizes whose multiples are exact in binary floating point, and sizes that are not.
EXACT_SIZES = [1.0, 60.0, 3600.0, 86400.0, 0.5, 0.25, 86400.5, 604800.0]
# Sizes whose multiples are not exact in binary floating point.
INEXACT_SIZES = [0.1, 7.3, 123.456]


@pytest.mark.parametrize("size", EXACT_SIZES + INEXACT_SIZES)
def test_time_on_a_boundary_goes_to_the_window_it_starts(size):
    rng = random.Random(f"boundary-{size}")
    ks = [0, 1, 2, 10, 184730957] + [rng.randrange(0, int(MAX_EPOCH_SECONDS / size)) for _ in range(2000)]
    wrong = [(k, window_of(timed(k * size), seconds(size))) for k in ks
             if window_of(timed(k * size), seconds(size)) != k]
    assert not wrong[:5]


@pytest.mark.parametrize(
    "size, line, window",
    [
        (3, 1, 0), (3, 2, 0), (3, 3, 0), (3, 4, 1), (3, 6, 1), (3, 7, 2),
        (1, 1, 0), (1, 2, 1), (1, 1000, 999),
        (10000, 1, 0), (10000, 10000, 0), (10000, 10001, 1), (10000, 25000, 2),
    ],
)
def test_window_of_untimed_events_counts_lines(size, line, window):
    assert window_of(untimed(line), lines(size)) == window


def test_untimed_windows_ignore_size_seconds_and_timed_ignore_size_lines():
    config = WindowConfig(size_seconds=1.0, size_lines=5)
    assert window_of(untimed(7), config) == 1
    assert window_of(timed(7.0, line=1), config) == 7


# ---------------------------------------------------------------------------- window_end


def _random_times(rng: random.Random, size: float, n: int) -> list[float]:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.3:
            out.append(rng.uniform(0, MAX_EPOCH_SECONDS))
        elif r < 0.5:
            out.append(rng.uniform(0, 100 * size))
        else:  # on and right next to a boundary
            t = rng.randrange(0, int(MAX_EPOCH_SECONDS / size)) * size
            out.append(rng.choice([t, math.nextafter(t, INF), math.nextafter(t, -INF)]))
    return [t for t in out if 0 <= t <= MAX_EPOCH_SECONDS]


@pytest.mark.parametrize("size", EXACT_SIZES + INEXACT_SIZES)
def test_window_end_agrees_with_window_of_for_timed_events(size):
    rng = random.Random(f"end-{size}")
    config = seconds(size)
    wrong = []
    for t in _random_times(rng, size, 3000):
        event = timed(t)
        w = window_of(event, config)
        start, end = window_end(w - 1, config, timed=True), window_end(w, config, timed=True)
        if not start <= event_clock(event) < end:
            wrong.append((t, w, start, end))
    assert not wrong[:5]


@pytest.mark.parametrize("size", [1, 3, 7, 10000])
def test_window_end_agrees_with_window_of_for_untimed_events(size):
    config = lines(size)
    for line in [*range(1, 5 * size + 3), *random.Random(size).sample(range(1, 10**9), 500)]:
        event = untimed(line)
        w = window_of(event, config)
        start, end = window_end(w - 1, config, timed=False), window_end(w, config, timed=False)
        assert start <= event_clock(event) < end, (line, w, start, end)


def test_window_end_values():
    config = WindowConfig(size_seconds=3600.0, size_lines=10)
    assert window_end(0, config, timed=True) == 3600.0
    assert window_end(4, config, timed=True) == 18000.0
    assert window_end(0, config, timed=False) == 11.0  # lines 1..10, exclusive end on the line clock
    assert window_end(2, config, timed=False) == 31.0


def test_event_clock_is_time_else_line():
    assert event_clock(timed(12.5, line=3)) == 12.5
    assert event_clock(timed(0.0, line=3)) == 0.0
    assert event_clock(untimed(42)) == 42.0 and isinstance(event_clock(untimed(42)), float)


# ---------------------------------------------------------------------------- event_order

# Already in the order event_order must give: time, then line, then source (numerically per part).
TIMED_ORDER = [
    timed(0.0, line=50, source=("raw", 9, 9)),
    timed(1.0, line=2, source=None),  # no source sorts before any source
    timed(1.0, line=2, source=("raw", 0, 9)),
    timed(1.0, line=2, source=("raw", 0, 10)),  # offsets compare as numbers, not strings
    timed(1.0, line=2, source=("raw", 1, 0)),
    timed(1.0, line=2, source=("raw2", 0, 0)),
    timed(1.0, line=3, source=("a", 0, 0)),  # line beats source
    timed(1.0, line=10, source=("a", 0, 0)),  # lines compare as numbers
    timed(1.5, line=1, source=("a", 0, 0)),  # time beats line
    timed(2.0, line=0, source=("a", 0, 0)),
    timed(10.0, line=0, source=("a", 0, 0)),  # times compare as numbers
    timed(86400.0, line=1, source=("a", 0, 0)),
]
UNTIMED_ORDER = [
    untimed(0, source=("raw", 0, 5)),
    untimed(1, source=None),
    untimed(1, source=("raw", 0, 1)),
    untimed(1, source=("raw", 2, 0)),
    untimed(2, source=("raw", 0, 0)),
    untimed(10, source=("raw", 0, 0)),
    untimed(11, source=("a", 0, 0)),
]


@pytest.mark.parametrize("expected", [TIMED_ORDER, UNTIMED_ORDER], ids=["timed", "untimed"])
def test_event_order_is_independent_of_arrival_order(expected):
    rng = random.Random(len(expected))
    for _ in range(200):
        shuffled = expected[:]
        rng.shuffle(shuffled)
        assert sorted(shuffled, key=event_order) == expected
    assert sorted(reversed(expected), key=event_order) == expected


def test_event_order_keys_are_distinct_for_distinct_identities():
    keys = [event_order(e) for e in TIMED_ORDER + UNTIMED_ORDER]
    assert len(set(keys)) == len(keys)


# ---------------------------------------------------------------------------- Watermark


def test_watermark_waits_for_every_partition():
    mark = Watermark(3)
    assert mark.value == -INF
    mark.observe(0, 100.0)
    mark.observe(1, 50.0)
    assert mark.value == -INF
    mark.observe(2, 70.0)
    assert mark.value == 50.0


def test_watermark_is_min_over_partitions_of_the_newest_clock():
    mark = Watermark(2)
    mark.observe(0, 10.0)
    mark.observe(1, 20.0)
    assert mark.value == 10.0
    mark.observe(0, 30.0)
    assert mark.value == 20.0
    mark.observe(1, 40.0)
    assert mark.value == 30.0


def test_watermark_subtracts_the_allowed_lateness():
    mark = Watermark(2, lateness=15.0)
    mark.observe(0, 100.0)
    assert mark.value == -INF
    mark.observe(1, 60.0)
    assert mark.value == 45.0


def test_an_older_clock_never_lowers_a_partition():
    mark = Watermark(1)
    mark.observe(0, 100.0)
    for older in [99.0, 0.0, -5.0, -INF]:
        mark.observe(0, older)
        assert mark.value == 100.0
    mark.observe(0, 100.0)
    assert mark.value == 100.0


def test_end_of_input_stops_holding_the_watermark_back():
    mark = Watermark(3, lateness=5.0)
    mark.observe(0, 100.0)
    mark.observe(1, 10.0)
    assert mark.value == -INF  # partition 2 has no data yet
    mark.end_of_input(2)  # ...and never will: no longer holds it back
    assert mark.value == 5.0
    mark.end_of_input(1)
    assert mark.value == 95.0


def test_all_partitions_ended_is_plus_infinity():
    mark = Watermark(2, lateness=3600.0)
    mark.observe(0, 5.0)
    mark.end_of_input(0)
    mark.end_of_input(1)
    assert mark.value == INF


def test_data_after_end_of_input_makes_a_partition_live_again():
    mark = Watermark(2)
    mark.observe(0, 100.0)
    mark.observe(1, 200.0)
    mark.end_of_input(1)
    assert mark.value == 100.0
    mark.end_of_input(0)
    assert mark.value == INF
    mark.observe(0, 60.0)  # older than before the end: its newest clock is now that data
    assert mark.value == 60.0
    mark.observe(0, 50.0)  # and live again, older data no longer lowers it
    assert mark.value == 60.0
    mark.observe(1, 150.0)
    assert mark.value == 60.0
    mark.observe(0, 500.0)
    assert mark.value == 150.0


def test_end_of_input_twice_and_ending_a_partition_with_no_data():
    mark = Watermark(2)
    mark.end_of_input(0)
    mark.end_of_input(0)
    assert mark.value == -INF  # partition 1 still has no data
    mark.observe(1, 7.0)
    assert mark.value == 7.0


def test_watermark_matches_a_model_over_random_observations():
    rng = random.Random(99)
    for partitions in [1, 2, 5]:
        lateness = rng.choice([0.0, 1.5, 3600.0])
        mark = Watermark(partitions, lateness=lateness)
        newest = [-INF] * partitions
        previous = -INF
        for _ in range(400):
            p = rng.randrange(partitions)
            clock = rng.uniform(0, 1000)
            mark.observe(p, clock)
            newest[p] = max(newest[p], clock)
            assert mark.value == min(newest) - lateness
            assert mark.value >= previous  # monotone while no partition ends
            previous = mark.value


# ---------------------------------------------------------------------------- idle partitions


def test_a_silent_partition_stops_holding_the_watermark_back_and_counts_again_when_heard():
    mark = Watermark(3, lateness=5.0, idle_after=60.0, now=0.0)
    for now, clock in [(10.0, 100.0), (30.0, 120.0), (50.0, 150.0)]:
        mark.observe(0, clock)
        mark.heard(0, now)
        mark.observe(1, clock + 1)
        mark.heard(1, now)
    assert mark.find_idle(59.9) == [] and mark.value == -INF  # partition 2: no data, not yet idle
    assert mark.find_idle(60.0) == [2]
    assert mark.value == 145.0  # min(150, 151) - 5
    assert mark.find_idle(70.0) == []  # said once
    mark.observe(2, 120.0)  # its next event: it counts again, from its own clock
    assert mark.heard(2, 80.0) is True
    assert mark.value == 115.0
    assert mark.heard(2, 81.0) is False


def test_a_partition_is_not_idle_while_it_has_events_and_never_when_idle_after_is_zero():
    busy = Watermark(2, idle_after=30.0, now=0.0)
    never = Watermark(2, idle_after=0.0, now=0.0)
    for now in range(0, 300, 10):
        for mark in (busy, never):
            mark.observe(0, float(now))
            mark.heard(0, float(now))
            mark.observe(1, float(now) + 0.5)
            mark.heard(1, float(now))
            assert mark.find_idle(float(now) + 5) == []
    assert never.find_idle(10_000.0) == []
    never.observe(0, 500.0)
    never.heard(0, 10_000.0)
    assert never.find_idle(20_000.0) == [] and never.value == 290.5


def test_after_silence_everywhere_the_others_have_a_grace_before_they_are_idle():
    # A broker away (or a quiet night) for longer than idle_after: the first partition heard
    # afterwards must not make the others idle at once; their backlog may be on its way.
    mark = Watermark(2, idle_after=60.0, now=0.0)
    for p in (0, 1):
        mark.observe(p, 10.0)
        mark.heard(p, 1.0)
    assert mark.find_idle(500.0) == []  # nobody was heard for 499 s: proves nothing
    mark.observe(0, 900.0)
    mark.heard(0, 500.0)
    assert mark.find_idle(500.0) == [] and mark.find_idle(529.0) == [] and mark.value == 10.0
    assert mark.find_idle(530.0) == [1]  # half of idle_after, even when partition 0 went quiet
    assert mark.value == 900.0


def test_a_broker_away_makes_no_partition_idle_while_it_is_away():
    # Ticked every second through an outage of 400 s: partition 1, last heard 5 s before
    # partition 0, must not be idle when partition 0's backlog comes back first.
    mark = Watermark(2, idle_after=300.0, now=0.0)
    for now in range(0, 100, 10):
        for p in (0, 1):
            mark.observe(p, float(now))
            mark.heard(p, float(now) + 5 * (1 - p))
    for now in range(100, 500):
        assert mark.find_idle(float(now)) == []
    mark.observe(0, 480.0)
    mark.heard(0, 500.0)
    assert mark.find_idle(500.0) == [] and mark.find_idle(500.0 + OUTAGE_GRACE - 1) == []
    assert mark.value == 90.0  # waits for partition 1's backlog
    mark.observe(1, 470.0)
    mark.heard(1, 500.5)
    assert mark.value == 470.0


def test_a_shorter_silence_everywhere_also_gives_the_others_their_grace():
    mark = Watermark(2, idle_after=300.0, now=0.0)
    mark.observe(1, 1.0)
    mark.heard(1, 0.0)  # partition 1: a sparse source
    for now in range(0, 250, 10):
        mark.observe(0, float(now))
        mark.heard(0, float(now))
    mark.observe(0, 500.0)
    mark.heard(0, 450.0)  # after 210 s of silence everywhere (shorter than idle_after)
    assert mark.find_idle(450.0) == [] and mark.find_idle(479.0) == []
    assert mark.find_idle(480.0) == [1]
    long = Watermark(2, idle_after=3600.0, now=0.0)
    long.observe(0, 5.0)
    long.heard(0, 7200.0)
    assert long.find_idle(7200.0 + OUTAGE_GRACE - 0.1) == []
    assert long.find_idle(7200.0 + OUTAGE_GRACE) == [1]  # at most OUTAGE_GRACE


def test_an_ended_partition_is_never_idle_and_an_idle_one_can_end():
    mark = Watermark(3, idle_after=10.0, now=0.0)
    mark.end_of_input(0)
    mark.heard(0, 1.0)
    mark.observe(1, 50.0)
    mark.heard(1, 5.0)
    # partition 0 ended (not idle), partition 2 silent
    assert mark.find_idle(9.9) == [] and mark.find_idle(10.0) == [2]
    assert mark.value == 50.0
    mark.end_of_input(2)
    assert mark.heard(2, 16.0) is True
    assert mark.value == 50.0


def test_idle_partitions_match_a_model_over_random_events():
    rng = random.Random(7)
    for partitions in [2, 3, 5]:
        idle_after = rng.choice([5.0, 20.0])
        mark = Watermark(partitions, idle_after=idle_after, now=0.0)
        newest, heard, last_any, idle = [-INF] * partitions, [0.0] * partitions, 0.0, set()
        grace = idle_after / 2
        now = 0.0
        for _ in range(600):
            now += rng.expovariate(0.5)
            if rng.random() < 0.7:
                p = rng.choice(range(partitions - 1) if rng.random() < 0.9 else range(partitions))
                clock = rng.uniform(0, 1000)
                mark.observe(p, clock)
                newest[p] = max(newest[p], clock)
                if now - last_any >= grace:  # after silence everywhere: a grace for all
                    heard = [max(h, now + grace - idle_after) for h in heard]
                heard[p], last_any = now, now
                assert mark.heard(p, now) is (p in idle)
                idle.discard(p)
            judged = min(now, last_any + grace)
            found = [p for p in range(partitions)
                     if p not in idle and judged - heard[p] >= idle_after - 1e-9]  # rounding
            assert mark.find_idle(now) == found
            idle.update(found)
            live = [c for p, c in enumerate(newest) if p not in idle]
            assert mark.value == min(live or newest)
