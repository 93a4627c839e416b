"""pipeline/spill.py: a window's records on disk, read back sorted and without duplicates."""

from __future__ import annotations

import random

import pytest

from pipeline import spill
from pipeline.spill import SpilledWindow


def records(n: int, seed: int = 0) -> list[tuple[tuple, bytes]]:
    rng = random.Random(seed)
    out = []
    for offset in range(n):
        source = (rng.choice(["raw", "rå-topic"]), rng.randrange(3), offset)
        key = (float(rng.randrange(50)), rng.randrange(3), source)
        out.append((key, bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))))
    return out


@pytest.mark.parametrize("run_size, max_runs", [(1000, 64), (7, 64), (5, 3)])
def test_reads_every_distinct_record_once_in_key_order(tmp_path, monkeypatch, run_size, max_runs):
    monkeypatch.setattr(spill, "MAX_RUNS", max_runs)
    data = records(300)
    arrivals = data + random.Random(1).sample(data, 120)  # redeliveries
    random.Random(2).shuffle(arrivals)
    window = SpilledWindow(tmp_path / "w", run_size)
    for key, value in arrivals:
        window.add(key, value)
    expected = [value for _, value in sorted(data, key=lambda kv: kv[0])]
    assert list(window.read()) == expected
    assert list(window.read()) == expected  # as often as asked
    assert window.distinct() == len(data) and window.received == len(arrivals)
    if run_size < len(arrivals):
        assert window.runs and len(window.runs) <= max_runs  # on disk, few files
    window.discard()
    assert not (tmp_path / "w").exists() and list(window.read()) == []


def test_small_windows_never_touch_the_disk(tmp_path):
    window = SpilledWindow(tmp_path / "w", 1000)
    for key, value in records(50):
        window.add(key, value)
    assert not (tmp_path / "w").exists() and len(list(window.read())) == 50
