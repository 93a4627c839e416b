"""Progress that moves: replay's bar counts events and advances inside a window, the trainer's
progress callback covers the window in order, its log lines are throttled, and the demo's status
follows whichever stage logged last."""

from __future__ import annotations

import logging

import pytest

import pipeline.replay as replay_module
from pipeline.config import load_config
from pipeline.generate import GenerateSpec, generate_events
from pipeline.learner import WindowLearner
from pipeline.parsing import LineParser
from pipeline.progress import LogTail, parse_log_line, stage_name, training_logger
from pipeline.windowing import window_of

SMALL = ["model.rnn.hidden_size=8", "training.batch_size=32", "window.size_seconds=21600"]


def small_windows(config, events_per_day=600):
    parser = LineParser(config.input)
    spec = GenerateSpec(users=8, computers=20, days=1, events_per_day=events_per_day,
                        redteam_events=0, seed=5)
    windows: dict[int, list] = {}
    for number, (row, _) in enumerate(generate_events(spec), start=1):
        event = parser.parse(",".join(row), number)
        windows.setdefault(window_of(event, config.window), []).append(event)
    return windows


class RecordingBar:
    """Stands in for tqdm: records every position the bar is moved to."""

    instances: list[RecordingBar] = []

    def __init__(self, total, **kwargs):
        self.total, self.n, self.positions, self.descriptions = total, 0, [], []
        RecordingBar.instances.append(self)

    def update(self, n):
        self.n += n
        self.positions.append(self.n)

    def set_description_str(self, text, refresh=True):
        self.descriptions.append(text)

    def set_postfix(self, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_replay_bar_counts_events_and_moves_inside_each_window(monkeypatch):
    config = load_config(None, SMALL)
    windows = small_windows(config)
    sizes = [len(windows[w]) for w in sorted(windows)]
    assert len(sizes) >= 3 and min(sizes) > 2 * 32  # several batches per window
    monkeypatch.setattr(replay_module, "tqdm", RecordingBar)
    RecordingBar.instances.clear()
    scores = list(replay_module.replay_scores(windows, config, progress=True))
    bar = RecordingBar.instances[-1]
    assert bar.total == len(scores) == sum(sizes)  # counted in events, not windows
    assert bar.positions == sorted(bar.positions) and bar.positions[-1] == bar.total
    boundaries = {sum(sizes[: i + 1]) for i in range(len(sizes))}
    inside = [p for p in bar.positions if p not in boundaries and p > 0]
    assert len(inside) >= 2 * len(sizes)  # it moved within every window, batch by batch
    assert f"window {max(windows)} epoch 2/2" in bar.descriptions


@pytest.mark.parametrize("chunk", [200000, 100])
def test_training_progress_covers_the_window_in_order(chunk):
    config = load_config(None, [*SMALL, f"training.max_chunk_events={chunk}"])
    window, events = max(small_windows(config).items(), key=lambda item: len(item[1]))
    assert len(events) > 200  # several batches; with chunk=100, several chunks
    calls = []
    WindowLearner(config).train(window, events, lambda *args: calls.append(args))
    fractions = [f for _, _, f in calls]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert 0 < fractions[0] < 0.2
    assert {e for e, _, _ in calls} == {1, 2}
    assert all(0 < part <= 1 for _, part, _ in calls)
    # each epoch (of each chunk) ends complete
    chunks = -(-len(events) // chunk)
    assert sum(1 for _, part, _ in calls if part == 1) == 2 * chunks


def test_training_logger_says_window_epoch_and_percent_and_is_throttled(caplog):
    log = logging.getLogger("test.trainer")
    with caplog.at_level(logging.INFO, logger="test.trainer"):
        chatty = training_logger(log, window=3, epochs=2, every=0.0)
        chatty(2, 0.416, 0.7)
        chatty(2, 1.0, 1.0)  # the window is done: the stage logs its own summary line
        quiet = training_logger(log, window=4, epochs=2, every=3600.0)
        quiet(1, 0.5, 0.25)
    assert [r.getMessage() for r in caplog.records] == ["window 3: training, 41% of epoch 2 of 2"]


def test_log_tail_shows_the_newest_line_of_any_stage(tmp_path):
    (tmp_path / "trainer-0.log").write_text("2026-01-01 10:00:00,000 INFO x: from an earlier run\n")
    tail = LogTail(tmp_path)
    assert tail.newest() is None  # what was there before is not news
    with open(tmp_path / "trainer-0.log", "a") as trainer, \
            open(tmp_path / "windower-0.log", "a") as windower:
        windower.write("2026-01-01 10:00:05,000 INFO pipeline.stages.windower: window 0 closed\n")
        trainer.write("2026-01-01 10:00:06,500 INFO pipeline.stages.trainer: window 0: training, "
                      "41% of epoch 2 of 2\n")
        windower.write("2026-01-01 10:00:06,000 INFO pipeline.runner: windower assigned\n")
        trainer.write("Traceback (most recent call last):\n")
        trainer.write("2026-01-01 10:00:07,000 INFO pipeline.stages.trainer: half a li")
    assert tail.newest() == "trainer: window 0: training, 41% of epoch 2 of 2"
    assert tail.newest() is None
    with open(tmp_path / "trainer-0.log", "a") as trainer:
        trainer.write("ne\n")
    assert tail.newest() == "trainer: half a line"
    (tmp_path / "tokenizer-1.log").write_text("2026-01-01 10:00:08,000 WARNING a.b: bad record\n")
    assert tail.newest() == "tokenizer-1: bad record"
    assert stage_name(tmp_path / "tokenizer-0.log") == "tokenizer"
    assert parse_log_line("not a log line") is None
