"""Progress that moves: the trainer's log lines during a window, and the demo's one-line status.

A window can take minutes to train, so "done with window 2" alone leaves a user staring at a
frozen screen. The trainer logs how far it is into the current epoch every few seconds; the demo
shows whichever stage logged last (its stages write one log file each), so the status line says
which stage is busy and changes as they work. Pure helpers, no Kafka and no torch.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path

TRAINING_LOG_SECONDS = 2.0

# "2026-11-26 18:04:13,676 INFO pipeline.stages.windower: window 0 closed: ..." (cli's log format)
_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) [A-Z]+ [\w.]+: (.*)$")


def training_logger(log: logging.Logger, window: int, epochs: int,
                    every: float = TRAINING_LOG_SECONDS) -> Callable[[int, float, float], None]:
    """A ``WindowLearner.train`` progress callback that logs at most once per ``every`` seconds,
    e.g. "window 3: training, 41% of epoch 2 of 2"."""
    last = time.monotonic()

    def report(epoch: int, epoch_fraction: float, window_fraction: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every and window_fraction < 1.0:
            last = now
            log.info("window %d: training, %d%% of epoch %d of %d", window,
                     int(100 * epoch_fraction), epoch, epochs)

    return report


def stage_name(log_path: Path) -> str:
    """trainer-0.log -> "trainer"; a second instance keeps its number: tokenizer-1."""
    stem = log_path.stem
    return stem[:-2] if stem.endswith("-0") else stem


def parse_log_line(line: str) -> tuple[str, str] | None:
    """(timestamp, message) of one stage log line, or None for anything else (a traceback)."""
    match = _LOG_LINE.match(line.rstrip("\n"))
    return (match.group(1), match.group(2)) if match else None


class LogTail:
    """Follows every ``*.log`` in a directory; ``newest()`` is the latest line written since the
    previous call, as "stage: message" (None when nothing new). Lines already in the files when
    it starts are skipped (the demo appends to the logs of earlier runs)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.offsets: dict[Path, int] = {path: path.stat().st_size for path in directory.glob("*.log")}

    def newest(self) -> str | None:
        best: tuple[str, str] | None = None  # (timestamp, "stage: message")
        for path in sorted(self.directory.glob("*.log")):
            for line in self._new_lines(path):
                parsed = parse_log_line(line)
                if parsed is not None and (best is None or parsed[0] >= best[0]):
                    best = (parsed[0], f"{stage_name(path)}: {parsed[1]}")
        return best[1] if best else None

    def _new_lines(self, path: Path) -> list[str]:
        try:
            with open(path, "rb") as handle:
                handle.seek(self.offsets.get(path, 0))
                data = handle.read()
        except OSError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a half-written last line waits for next time
        self.offsets[path] = self.offsets.get(path, 0) + len(complete)
        return complete.decode("utf-8", "replace").splitlines()


def shorten(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
