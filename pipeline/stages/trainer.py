"""Trainer stage: closed windows, in order, read back from the windows topic -> train on each,
hand the model to the scorers.

Per window: publish its completion record (how many scores the archiver is to expect), make sure
the model that scores it is announced, train, write the new model to the model store and announce
it on the models topic (pipeline/modelstore.py) as the one for the next window; then (once all of
that is acknowledged) checkpoint model + optimizer + tokenizer + last window + the input positions
to resume from, atomically, and only then commit the input offsets. The checkpoint, not the group's
committed offsets, decides where a restarted trainer reads from, so model and input position always
agree: a crash anywhere, or falling back to an older checkpoint because the newest is damaged,
replays windows from that checkpoint and trains the same models again.

The scorers, not the trainer, score: each event as it arrives, with the announced model.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from nn.training import CheckpointError
from pipeline.atomic import quarantine
from pipeline.config import Config
from pipeline.learner import WindowLearner
from pipeline.modelspec import fixed_encoder, make_masker
from pipeline.modelstore import announcement, announcement_key, config_fingerprint, publish
from pipeline.parsing import Event, LineParser
from pipeline.progress import training_logger
from pipeline.runner import Output
from pipeline.scorewire import WindowedEventReader
from pipeline.sessions import SessionScore
from pipeline.spill import SpilledWindow
from pipeline.stages.collect import WindowStage
from pipeline.topicrecords import record_to_event
from pipeline.warmup import preload_training

log = logging.getLogger(__name__)

def published_at(msg: Message) -> float | None:
    """When the record was produced (epoch seconds), when the broker says."""
    kind, ms = msg.timestamp()
    return ms / 1000 if kind != TIMESTAMP_NOT_AVAILABLE and ms > 0 else None


def session_key(score: SessionScore) -> bytes:
    """The sessions topic's compaction key: the window (digits, so the first "/" ends it), then
    the session value whole."""
    return f"{score.window}/{score.session}".encode()


def session_record(score: SessionScore) -> dict:
    """A session score as a salka.SessionScore record (the same fields, in the same units)."""
    return dataclasses.asdict(score)


def checkpoint_dir(config: Config) -> Path:
    return Path(config.streaming.state_dir) / "trainer"


def checkpoint_files(config: Config) -> list[Path]:
    """Checkpoints, newest (highest window) first."""
    return sorted(checkpoint_dir(config).glob("checkpoint-*.pt"), reverse=True)


def load_newest_checkpoint(config: Config) -> WindowLearner | None:
    """The newest checkpoint that loads; damaged or foreign ones are moved aside (one error line
    each, pipeline/atomic.py) and the previous one is tried."""
    refused = 0
    for path in checkpoint_files(config):
        try:
            learner = WindowLearner.load(path, config)
        except CheckpointError as exc:
            quarantine(path, f"refusing checkpoint ({exc})", "trying the previous one")
            refused += 1
            continue
        log.info("resumed from %s: trained through window %s", path, learner.last_window)
        return learner
    if refused:
        log.error("no usable checkpoint in %s: retraining from the first window",
                  checkpoint_dir(config))
    return None


def read_once(read: Callable[[], Iterator[Event]], limit: int) -> Callable[[], Iterator[Event]]:
    """A window's events decoded once and held, when there are at most ``limit`` (training holds
    a chunk this large at once anyway), so train_ordered's passes (sample, exclusion scoring and
    ranking, vocabulary, training) do not each decode the spill again (~0.1 s per 1,000 events
    each); else ``read`` itself. Never more than ``limit + 1`` events are held, whatever the
    window's completion record says its count is."""
    head = list(itertools.islice(read(), limit + 1))
    if len(head) > limit:
        return read
    return lambda: iter(head)


class TrainerStage(WindowStage):
    name = "trainer"
    needs_every_partition = True  # one process: a second one waits (runner)
    record_schema = "salka.WindowedEvent"
    resumes_from_state = True  # the checkpoint holds the positions its model stopped reading at

    def __init__(self, config: Config):
        super().__init__(config, config.topics.windows, "events")
        self.model_fields = LineParser(config.input).model_fields
        self.masker = make_masker(config)  # the model text as the tokenizer stage / replay make it
        # The window is read back on the way to its model, while the scorers' backlog grows: the
        # scorer's hand-written reader gives the codec's Event at half its cost (10k events:
        # 0.33-0.48 -> 0.17-0.22 CPU s; benchmarks/latency.py's close-to-model 0.80 -> 0.62 s).
        # Char ids come back as the bytes the learner batches fastest (the scorer's reader too)
        self.wire_reader = WindowedEventReader(self.model_fields, self.masker, fixed_encoder(config))
        self.learner = load_newest_checkpoint(config) or WindowLearner(config)
        # Where the checkpoint's model stopped reading; None: from the start of the topic.
        self.resume_offset = self.learner.resume_offset
        self.unsaved = False
        # The announcement of the model now serving (the learner's), once made.
        self.serving: dict | None = None
        self.counts = {"windows": 0, "trained": 0, "models": 0, "sessions": 0, "dead_letters": 0,
                       "skipped": 0}
        self.observer = None  # pipeline/metrics.TrainerObserver when metrics are on
        preload_training()  # seconds of lazy imports paid now, not by the first models

    def already_done(self, window: int) -> bool:
        last = self.learner.last_window  # a re-emitted or redelivered window: trained already
        return last is not None and window <= last

    def item(self, record: dict, msg: Message) -> tuple[tuple, tuple]:
        return self.kept(record["event"], msg)

    def window_complete(self, out: Output, window: int, items: SpilledWindow, msg: Message,
                        complete: dict) -> None:
        if not complete["count"]:  # windows through this one closed empty: the model serves
            self._serve_through(out, window + 1)  # the next one too
            return

        def read() -> Iterator[Event]:
            fast = self.wire_reader.read
            for value in items.read():
                got = fast(value)  # None: not a plain WindowedEvent, or in doubt: the codec's way
                yield got[1] if got is not None else record_to_event(
                    self.record(value)["event"], self.model_fields, self.masker)

        started = time.monotonic()
        if complete["count"] <= self.config.training.max_chunk_events:
            read = read_once(read, self.config.training.max_chunk_events)

        self._process(out, window, read, complete["count"], complete["watermark"],
                      published=published_at(msg), read_s=time.monotonic() - started)

    def _announce(self, out: Output, record: dict) -> None:
        out.send_record(self.config.topics.models, "salka.ModelAnnouncement", record,
                        key=announcement_key(record["trained_through"]), partition=0)
        self.serving = record

    def _serve_through(self, out: Output, window: int) -> None:
        """Announce that the current model (or no model, before the first window) scores the
        windows up to ``window``: every window between it and its training data is closed."""
        if self.serving is not None and self.serving["serves_through"] >= window:
            return
        if self.serving is not None and self.serving["trained_through"] == self.learner.last_window:
            self._announce(out, {**self.serving, "serves_through": window})
        elif self.learner.ready:  # resumed from a checkpoint: its model goes to the store again
            self._announce(out, publish(self.config, self.learner, window))
        else:
            self._announce(out, announcement(None, window, fingerprint=config_fingerprint(self.config)))

    def _process(self, out: Output, window: int, read: Callable[[], Iterator[Event]], count: int,
                 watermark: float | None, published: float | None = None,
                 read_s: float = 0.0) -> None:
        """Train on the window's ``count`` events, which ``read()`` yields in event order
        (``read_s``: seconds it took to read them back from the spill, for the log)."""
        started = time.monotonic()
        self._serve_through(out, window)  # its events are scored with the model so far
        out.send_record(self.config.topics.scores, "salka.WindowComplete",
                        {"window": window, "count": count, "watermark": watermark,
                         "stage": self.name}, partition=0)
        progress = training_logger(log, window, self.config.training.epochs)
        if self.observer is not None:  # a long training still counts as a live loop
            progress = self.observer.training(progress)
        loss = self.learner.train_ordered(window, read, count, progress)
        trained = time.monotonic()
        self._send_sessions(out)
        self._announce(out, publish(self.config, self.learner, window + 1))
        self.unsaved = True
        self.counts["windows"] += 1
        self.counts["trained"] += count
        self.counts["models"] += 1
        log.info("window %d: trained on %d events in %.1fs (loss %.4f), model published in %.1fs",
                 window, count, trained - started, loss, time.monotonic() - trained,
                 extra={"window": window, "events": count, "loss": loss})
        log.debug("window %d: read back %.2fs, then %s, model published %.2fs", window, read_s,
                  ", ".join(f"{k} {v:.2f}s" for k, v in self.learner.timings.items()),
                  time.monotonic() - trained)
        if self.observer is not None:
            self.observer.window_done(window, count, 0.0, trained - started, loss, published,
                                      time.time(), self.learner.left_out)

    def _send_sessions(self, out: Output) -> None:
        """The session scores of the window just trained (sessions.entity). Acknowledged, like
        the model announcement, before the checkpoint that moves past the window: a trainer that
        restarts before it trains the window again and sends the same keys with the same values."""
        if not self.config.sessions.entity:
            return
        for score in self.learner.session_scores:
            out.send_record(self.config.topics.sessions, "salka.SessionScore",
                            session_record(score), key=session_key(score))
        self.counts["sessions"] += len(self.learner.session_scores)

    def tick(self, out: Output) -> bool:
        return self.unsaved  # commit (and so checkpoint) right after each window

    def after_flush(self) -> None:
        if not self.unsaved:
            return
        window = self.learner.last_window
        path = checkpoint_dir(self.config) / f"checkpoint-{window:012d}.pt"
        started = time.monotonic()
        positions = self.safe_positions()
        self.learner.save(path, resume_offset=positions)
        self.resume_offset = positions  # where a revoked trainer reads from again
        if self.observer is not None:
            self.observer.checkpoint_done(time.monotonic() - started)
        for old in checkpoint_files(self.config)[self.config.streaming.keep_checkpoints:]:
            old.unlink(missing_ok=True)
        self.unsaved = False
