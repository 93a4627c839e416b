"""Trainer stage: complete windows, in order -> one score per event, then train on the window.

Per window: score with the model trained through the previous window, publish the scores and a
completion record, train, then (once the scores are acknowledged) checkpoint model + optimizer +
tokenizer + last window + the input position to resume from, atomically, and only then commit the
input offsets. The checkpoint, not the group's committed offset, decides where a restarted trainer
reads from, so model and input position always agree: a crash anywhere, or falling back to an
older checkpoint because the newest is damaged, replays windows from that checkpoint and gives the
same scores again; the archiver deduplicates them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from nn.training import CheckpointError
from pipeline.atomic import quarantine
from pipeline.config import Config
from pipeline.learner import WindowLearner
from pipeline.modelspec import make_masker
from pipeline.parsing import Event, LineParser
from pipeline.progress import training_logger
from pipeline.runner import Output
from pipeline.stages.collect import WindowStage
from pipeline.topicrecords import identity, record_to_event, score_to_record

log = logging.getLogger(__name__)

def published_at(msg: Message) -> float | None:
    """When the record was produced (epoch seconds), when the broker says."""
    kind, ms = msg.timestamp()
    return ms / 1000 if kind != TIMESTAMP_NOT_AVAILABLE and ms > 0 else None


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


class TrainerStage(WindowStage):
    name = "trainer"
    record_schema = "salka.WindowedEvent"
    resumes_from_state = True  # the checkpoint holds the position its model stopped reading at

    def __init__(self, config: Config):
        super().__init__(config, config.topics.windows, "events")
        self.model_fields = LineParser(config.input).model_fields
        self.masker = make_masker(config)  # the model text as the tokenizer stage / replay make it
        self.learner = load_newest_checkpoint(config) or WindowLearner(config)
        # Where the checkpoint's model stopped reading; None: from the start of the topic.
        self.resume_offset = self.learner.resume_offset
        self.unsaved = False
        self.counts = {"windows": 0, "scored": 0, "dead_letters": 0, "skipped": 0}
        self.observer = None  # pipeline/metrics.TrainerObserver when metrics are on

    def already_done(self, window: int) -> bool:
        last = self.learner.last_window  # a re-emitted or redelivered window: trained already
        return last is not None and window <= last

    def item(self, record: dict) -> tuple[tuple, Event]:
        return identity(record["event"]), record_to_event(record["event"], self.model_fields, self.masker)

    def window_complete(self, out: Output, window: int, items: list, msg: Message,
                        complete: dict) -> None:
        self._process(out, window, items, complete["watermark"], published=published_at(msg))

    def _process(self, out: Output, window: int, events: list[Event], watermark,
                 published: float | None = None) -> None:
        started = time.monotonic()
        scores = self.learner.score(window, events)
        for score in scores:
            out.send_record(self.config.topics.scores, "salka.ScoredEvent",
                            score_to_record(score, self.config), partition=0)
        out.send_record(self.config.topics.scores, "salka.WindowComplete",
                        {"window": window, "count": len(scores), "watermark": watermark,
                         "stage": self.name}, partition=0)
        scored, scored_at = time.monotonic(), time.time()
        progress = training_logger(log, window, self.config.training.epochs)
        if self.observer is not None:  # a long training still counts as a live loop
            progress = self.observer.training(progress)
        loss = self.learner.train(window, events, progress)
        self.unsaved = True
        self.counts["windows"] += 1
        self.counts["scored"] += len(scores)
        log.info("window %d: scored %d events in %.1fs, trained in %.1fs (loss %.4f)", window,
                 len(scores), scored - started, time.monotonic() - scored, loss,
                 extra={"window": window, "events": len(scores), "loss": loss})
        if self.observer is not None:
            self.observer.window_done(window, len(events), scored - started, time.monotonic() - scored,
                                      loss, published, scored_at)

    def tick(self, out: Output) -> bool:
        return self.unsaved  # commit (and so checkpoint) right after each window

    def after_flush(self) -> None:
        if not self.unsaved:
            return
        window = self.learner.last_window
        path = checkpoint_dir(self.config) / f"checkpoint-{window:012d}.pt"
        started = time.monotonic()
        self.learner.save(path, resume_offset=self.safe_offset)
        self.resume_offset = self.safe_offset  # where a revoked trainer reads from again
        if self.observer is not None:
            self.observer.checkpoint_done(time.monotonic() - started)
        for old in checkpoint_files(self.config)[self.config.streaming.keep_checkpoints:]:
            old.unlink(missing_ok=True)
        self.unsaved = False
