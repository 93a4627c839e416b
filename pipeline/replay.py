"""Offline workflow: a log file -> windows -> train-then-score -> gzip CSV of scores."""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.config import Config
from pipeline.learner import Score, WindowLearner
from pipeline.parsing import Event, HeaderRow, LineParser, ParseError, read_lines
from pipeline.scorefile import explain_cells, format_loss, format_number, score_columns, write_rows
from pipeline.windowing import window_of

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 20


@dataclass
class ParseReport:
    events: int = 0
    header_rows: int = 0
    errors: list[ParseError] = field(default_factory=list)

    def log_summary(self, source: str) -> None:
        for error in self.errors[:MAX_REPORTED_ERRORS]:
            log.warning("%s line %d skipped: %s", source, error.line, error.reason)
        if len(self.errors) > MAX_REPORTED_ERRORS:
            log.warning("... and %d more bad lines", len(self.errors) - MAX_REPORTED_ERRORS)
        if self.errors:
            log.warning("%s: %d of %d lines skipped as malformed", source, len(self.errors),
                        self.events + len(self.errors) + self.header_rows)


def parse_file(path: str | Path, config: Config) -> tuple[dict[int, list[Event]], ParseReport]:
    """Events grouped by window, and what could not be parsed (never fatal)."""
    parser = LineParser(config.input)
    windows: dict[int, list[Event]] = defaultdict(list)
    report = ParseReport()
    for number, raw in read_lines(path):
        result = parser.parse(raw, number)
        if isinstance(result, HeaderRow):
            report.header_rows += 1
        elif isinstance(result, ParseError):
            report.errors.append(result)
        else:
            windows[window_of(result, config.window)].append(result)
            report.events += 1
    return dict(windows), report


def score_row(score: Score, config: Config) -> list[str]:
    event = score.event
    entities = [event.entity(name, config.input) for name in config.input.entities]
    row = [
        str(event.line), format_number(event.time), str(score.window), *entities,
        format_loss(score.loss), format_loss(score.loss_total),
    ]
    if config.scores.explain:
        row += explain_cells(score.tokens, score.token_losses)
    return row


def write_scores(path: str | Path, config: Config, scores: Iterable[Score]) -> int:
    return write_rows(path, score_columns(config), (score_row(s, config) for s in scores))


def replay_scores(
    windows: dict[int, list[Event]], config: Config, progress: bool | None = None
) -> Iterator[Score]:
    """Score each window with the model trained on the windows before it, then train on it."""
    learner = WindowLearner(config)
    total = sum(len(v) for v in windows.values())
    show = sys.stderr.isatty() if progress is None else progress
    started = time.monotonic()
    with tqdm(total=total, unit="ev", disable=not show, dynamic_ncols=True) as bar:
        for index in sorted(windows):
            events = windows[index]
            scores = learner.score(index, events)
            yield from scores
            losses = [s.loss for s in scores if s.loss is not None]
            train_loss = learner.train(index, events)
            bar.update(len(events))
            bar.set_postfix(window=index, score_loss=_mean(losses), train_loss=f"{train_loss:.3f}")
            log.info("window %d: %d events, mean score %s, train loss %.4f",
                     index, len(events), _mean(losses), train_loss)
    elapsed = time.monotonic() - started
    log.info("replayed %d events in %.1fs (%.0f events/s)", total, elapsed, total / max(elapsed, 1e-9))


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f}" if values else "-"


def replay(input_path: str | Path, output_path: str | Path, config: Config,
           progress: bool | None = None) -> tuple[int, ParseReport]:
    windows, report = parse_file(input_path, config)
    report.log_summary(str(input_path))
    count = write_scores(output_path, config, replay_scores(windows, config, progress))
    return count, report
