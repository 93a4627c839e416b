"""Offline workflow: a log file -> windows -> train-then-score -> gzip CSV of scores."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from tqdm import tqdm

from pipeline.config import Config
from pipeline.errors import InputError
from pipeline.interrupt import interruptible
from pipeline.learner import WindowLearner
from pipeline.modelspec import make_masker
from pipeline.parsing import Event, HeaderRow, LineParser, Malformed, read_lines
from pipeline.score import Score
from pipeline.scorefile import explain_cells, format_loss, format_number, score_columns, write_rows
from pipeline.sessions import SESSION_COLUMNS, SessionScore, session_row
from pipeline.windowing import window_of

log = logging.getLogger(__name__)

MAX_REPORTED_ERRORS = 20  # malformed lines logged one by one; the rest are counted per reason
MAX_REASON_KINDS = 10


@dataclass
class ParseReport:
    events: int = 0
    header_rows: int = 0
    errors: list[Malformed] = field(default_factory=list)

    def log_summary(self, source: str) -> None:
        for error in self.errors[:MAX_REPORTED_ERRORS]:
            log.warning("%s line %d skipped: %s", source, error.line, error.reason)
        if len(self.errors) > MAX_REPORTED_ERRORS:
            kinds = reason_counts(self.errors)
            log.warning("%s: all %d malformed lines by reason:", source, len(self.errors))
            for kind, (count, first) in list(kinds.items())[:MAX_REASON_KINDS]:
                log.warning("  %d x %s (first at line %d)", count, kind, first)
            if len(kinds) > MAX_REASON_KINDS:
                rest = sum(count for count, _ in list(kinds.values())[MAX_REASON_KINDS:])
                log.warning("  %d lines with %d other reasons", rest, len(kinds) - MAX_REASON_KINDS)
        if self.errors:
            log.warning("%s: %d of %d lines skipped as malformed", source, len(self.errors),
                        self.events + len(self.errors) + self.header_rows)


def reason_kind(reason: str) -> str:
    """A reason with its quoted values masked, so that lines failing the same way count
    together ("bad time in field 'time': time '-5' is negative": time '…' is negative)."""
    return re.sub(r"(?<=[ (])(?<!field )'[^']*'(?=[:,;) ]|$)", "'…'", reason)


def reason_counts(errors: list[Malformed]) -> dict[str, tuple[int, int]]:
    """Reason kind -> (lines, first line), most frequent first."""
    counts = Counter(reason_kind(e.reason) for e in errors)
    first: dict[str, int] = {}
    for error in errors:
        first.setdefault(reason_kind(error.reason), error.line)
    return {kind: (count, first[kind]) for kind, count in counts.most_common()}


def malformed_problem(report: ParseReport, source: str, max_fraction: float) -> str | None:
    """Why the file gave nothing worth scoring (the config does not fit it), or None."""
    bad = len(report.errors)
    lines = report.events + bad
    hint = (f"check input.format, the columns / pattern and input.time_format against the file "
            f"(pipeline check --config ... --input {source} shows what each line gives)")
    if lines == 0:
        return f"{source}: no events (the file is empty or only header / comment lines)"
    if report.events == 0 or bad / lines > max_fraction:
        kind, (_, first) = next(iter(reason_counts(report.errors).items()))
        share = "all" if report.events == 0 else f"more than input.max_malformed_fraction ({max_fraction:g})"
        return (f"{source}: {bad} of {lines} lines malformed ({share}), most often line {first}: "
                f"{kind}; {hint}")
    return None


def parse_file(path: str | Path, config: Config,
               limit: int | None = None) -> tuple[dict[int, list[Event]], ParseReport]:
    """Events grouped by window, and what could not be parsed (never fatal); only the first
    ``limit`` lines when given."""
    parser = LineParser(config.input, masker=make_masker(config))
    windows: dict[int, list[Event]] = defaultdict(list)
    report = ParseReport()
    for number, raw in islice(read_lines(path), limit):
        result = parser.parse(raw, number)
        if isinstance(result, HeaderRow):
            report.header_rows += 1
        elif isinstance(result, Malformed):
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
    windows: dict[int, list[Event]], config: Config, progress: bool | None = None,
    learner: WindowLearner | None = None,
    on_sessions: Callable[[list[SessionScore]], None] | None = None,
) -> Iterator[Score]:
    """Score each window with the model trained on the windows before it, then train on it
    (with ``learner`` when given, so the caller can save the final model). ``on_sessions``: the
    window's session scores (sessions.entity), after each window."""
    learner = learner or WindowLearner(config)
    total = sum(len(v) for v in windows.values())
    show = sys.stderr.isatty() if progress is None else progress
    started = time.monotonic()
    # A bar over events (rate and ETA in events/s) that moves with every training batch, not
    # once per window: a window can take minutes.
    with tqdm(total=total, unit="ev", disable=not show, dynamic_ncols=True) as bar:
        done = 0
        for index in sorted(windows):
            events = windows[index]
            bar.set_description_str(f"window {index} scoring", refresh=False)
            scores = learner.score(index, events)
            yield from scores
            losses = [s.loss for s in scores if s.loss is not None]
            train_loss = learner.train(index, events, _advance(bar, done, len(events), index,
                                                               config.training.epochs))
            if on_sessions is not None and config.sessions.entity:
                on_sessions(learner.session_scores)
            done += len(events)
            bar.update(done - bar.n)
            bar.set_postfix(window=index, score_loss=_mean(losses), train_loss=f"{train_loss:.3f}")
            log.info("window %d: %d events, mean score %s, train loss %.4f",
                     index, len(events), _mean(losses), train_loss)
    elapsed = time.monotonic() - started
    log.info("replayed %d events in %.1fs (%.0f events/s)", total, elapsed, total / max(elapsed, 1e-9))


def _advance(bar: tqdm, done: int, size: int, window: int, epochs: int):
    """Training progress through a window of ``size`` events -> the bar's event count."""
    def on_progress(epoch: int, epoch_fraction: float, window_fraction: float) -> None:
        bar.set_description_str(f"window {window} epoch {epoch}/{epochs}", refresh=False)
        bar.update(done + int(size * window_fraction) - bar.n)
    return on_progress


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.3f}" if values else "-"


@interruptible("replay")  # SIGTERM cleans up like Ctrl-C: no hidden .OUT.csv.gz.*.tmp left
def replay(input_path: str | Path, output_path: str | Path, config: Config,
           progress: bool | None = None,
           save_model: str | Path | None = None,
           sessions_output: str | Path | None = None) -> tuple[int, ParseReport]:
    """``save_model``: also checkpoint the final model there (for ``pipeline report --model``);
    ``sessions_output``: also write the session scores there (needs sessions.entity)."""
    windows, report = parse_file(input_path, config)
    report.log_summary(str(input_path))
    problem = malformed_problem(report, str(input_path), config.input.max_malformed_fraction)
    if problem:
        raise InputError(problem)
    learner = WindowLearner(config)
    sessions: list[SessionScore] = []  # kept only when asked for: one row per session and window
    count = write_scores(output_path, config, replay_scores(
        windows, config, progress, learner, sessions.extend if sessions_output else None))
    if sessions_output:
        write_rows(sessions_output, SESSION_COLUMNS, map(session_row, sessions))
    if save_model:
        learner.save(save_model)
    if len(windows) == 1:  # every score needs a model of earlier windows: there are none
        key = "window.size_seconds" if config.input.time_field else "window.size_lines"
        size = config.window.size_seconds if config.input.time_field else config.window.size_lines
        log.warning("%s: every event is in one window (%s: %g), the first, which no model has "
                    "seen before: no event has a loss; set a smaller %s so that earlier windows "
                    "train a model for later ones", input_path, key, size, key)
    return count, report
