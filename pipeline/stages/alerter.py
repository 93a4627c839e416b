"""Alerter stage: complete windows of scores -> alerts (Avro salka.Alert) with their reasons.

The per-entity history (bounded: see pipeline/alerting.py) lives in a compact binary state file
(alerter.npz) saved atomically together with the last window judged and the scores-topic position
to resume from (as the trainer's checkpoint does), so a restart neither forgets history nor judges
a window twice. A state file that cannot be read is moved aside (pipeline/atomic.py) and the
alerter starts over from the committed offsets with empty histories.
"""

from __future__ import annotations

import logging
from pathlib import Path

from confluent_kafka import Message

from pipeline.alerting import AlertEngine, StateFormatError, alert_record, decode_state, encode_state
from pipeline.atomic import quarantine, write_bytes_atomic
from pipeline.config import Config
from pipeline.runner import Output
from pipeline.stages.collect import WindowStage

log = logging.getLogger(__name__)


class AlerterStage(WindowStage):
    name = "alerter"
    record_schema = "salka.ScoredEvent"
    resumes_from_state = True  # alerter.npz holds the position its histories were saved at

    def __init__(self, config: Config):
        super().__init__(config, config.topics.scores, "scores")
        self.state_path = state_path(config)
        self.engine = AlertEngine(config.alerting)
        if self.state_path.exists():
            try:
                self.engine, extra = decode_state(self.state_path.read_bytes(), config.alerting)
                self.resume_offset = extra["resume_offset"]
                log.info("alerter resumes after window %s with %d entity histories",
                         self.engine.last_window, len(self.engine.histories))
            except (StateFormatError, KeyError, TypeError) as exc:
                self.engine, self.resume_offset = AlertEngine(config.alerting), None
                quarantine(self.state_path, f"unreadable alerter state ({exc})",
                           "starting with empty histories from the committed offsets")
        self.unsaved = False
        self.counts = {"windows": 0, "alerts": 0, "dead_letters": 0, "skipped": 0}
        self.observer = None  # pipeline/metrics.AlerterObserver when metrics are on

    def already_done(self, window: int) -> bool:
        last = self.engine.last_window  # judged before a restart: its alerts went out already
        return last is not None and window <= last

    def item(self, record: dict, msg: Message) -> tuple[tuple, dict] | None:
        return None if record["late"] else super().item(record, msg)  # its window was judged whole

    def window_complete(self, out: Output, window: int, items: list, msg: Message,
                        complete: dict) -> None:
        alerts = self.engine.judge_window(window, items)
        for alert in alerts:
            out.send_record(self.config.topics.alerts, "salka.Alert", alert_record(alert),
                            key=str(window).encode())
        self.counts["windows"] += 1
        self.counts["alerts"] += len(alerts)
        if alerts:
            log.info("window %d: %d alerts from %d scores", window, len(alerts), len(items),
                     extra={"window": window, "alerts": len(alerts)})
        if self.observer is not None:
            self.observer.alerts_published(alerts, self.config.alerting.z_threshold)
        self.unsaved = True

    def tick(self, out: Output) -> bool:
        return self.unsaved

    def after_flush(self) -> None:
        if not self.unsaved:
            return
        self.resume_offset = self.safe_positions()
        write_bytes_atomic(self.state_path,
                           encode_state(self.engine, {"resume_offset": self.resume_offset}))
        self.unsaved = False

    def close(self, out: Output) -> None:
        log.info("alerter totals: %s; %d entity histories, %d evicted", self.counts,
                 len(self.engine.histories), self.engine.evicted)


def state_path(config: Config) -> Path:
    return Path(config.streaming.state_dir) / "alerter.npz"


def judged_through(config: Config) -> int | None:
    """The last window the alerter has judged, from its state file (None: none yet / unreadable)."""
    try:
        engine, _ = decode_state(state_path(config).read_bytes(), config.alerting)
    except (OSError, StateFormatError):
        return None
    return engine.last_window
