"""Alerter stage: scores -> alerts (Avro salka.Alert) with their reasons, as the scores arrive.

An event's score is judged the moment it arrives when every earlier window whose completion
record the stage has seen is closed (the scorer publishes window w+1's scores only after the
trainer forwarded w's completion record, so that is every earlier window with events); otherwise
it waits in memory (as many as the scorers are ahead) until they close. Until some window had
losses there is no threshold to judge by: the first window with losses is judged whole when it
completes. Each window's scores wait on disk (pipeline/spill.py) until its completion record and
all of them are there; then it is closed: their losses join the entity histories and give the
next windows' threshold (pipeline/alerting.py). Losses are judged as score files keep them (6
decimals, pipeline/scorefile.py ``stored_loss``), so that the stage decides as ``pipeline alerts``
over the archive does, to the last digit.

The per-entity history (bounded: see pipeline/alerting.py; its kept losses in a scratch file,
pipeline/losstore.py) is saved in a compact binary state file
(alerter.npz), atomically, together with the last window judged and the scores-topic position
to resume from (as the trainer's checkpoint does), so a restart neither forgets history nor judges
a window twice. The state also holds, for windows not closed yet, the throttle's counts and the
events alerted on, so that events read again after a restart are not alerted twice. It is saved
when a window closes and at every commit (``streaming.commit_interval_seconds``): a crash can
repeat the alerts of the last interval (at-least-once), a clean stop repeats none. A state file
that cannot be read (or of an older format) is moved aside (pipeline/atomic.py) and the
alerter starts over from the committed offsets with empty histories.
"""

from __future__ import annotations

import logging
from pathlib import Path

from confluent_kafka import Message

from pipeline.alerting import (
    Alert,
    AlertEngine,
    StateFormatError,
    alert_record,
    decode_state,
    state_last_window,
    write_state,
)
from pipeline.atomic import atomic_write, quarantine
from pipeline.config import Config
from pipeline.runner import Output
from pipeline.scorefile import stored_loss
from pipeline.spill import SpilledWindow
from pipeline.stages.collect import WindowStage, spill_directory
from pipeline.windowing import event_order

# What an alert needs of a score (its tokens and per-token losses are left behind while it waits).
ALERT_FIELDS = ("source", "line", "event_time", "window", "raw", "loss", "entities")

log = logging.getLogger(__name__)


class AlerterStage(WindowStage):
    name = "alerter"
    record_schema = "salka.ScoredEvent"
    resumes_from_state = True  # alerter.npz holds the position its histories were saved at

    def __init__(self, config: Config):
        # A window's scores wait on disk until it closes (pipeline/spill.py): closing it reads
        # their losses and entities back, so memory does not grow with the window.
        super().__init__(config, config.topics.scores, "scores")
        self.state_path = state_path(config)
        # The entities' kept losses wait on disk too (pipeline/losstore.py), beside the spills.
        losses_dir = str(spill_directory(config, self.name))
        self.engine = AlertEngine(config.alerting, losses_dir)
        if self.state_path.exists():
            try:
                with open(self.state_path, "rb") as handle:
                    self.engine, extra = decode_state(handle, config.alerting, losses_dir)
                self.resume_offset = extra["resume_offset"]
                log.info("alerter resumes after window %s with %d entity histories",
                         self.engine.last_window, len(self.engine.histories))
            except (StateFormatError, KeyError, TypeError) as exc:
                self.engine, self.resume_offset = AlertEngine(config.alerting, losses_dir), None
                quarantine(self.state_path, f"unreadable alerter state ({exc})",
                           "starting with empty histories from the committed offsets")
        self.unsaved = False  # the engine changed since the state was saved
        self.closed_unsaved = False  # ... by closing a window: commit (and save) now
        # window -> its scores waiting for earlier windows to close, in arrival order
        self.held: dict[int, dict[tuple, dict]] = {}
        # windows with scores that came before any threshold existed (not held: on disk)
        self.unjudged: set[int] = set()
        self.outbox: list[Alert] = []  # judged while handling a record; sent once it is handled
        self.window_alerts: dict[int, int] = {}  # alerts sent per window not closed (for the log)
        self.counts = {"windows": 0, "alerts": 0, "dead_letters": 0, "skipped": 0}
        self.observer = None  # pipeline/metrics.AlerterObserver when metrics are on

    def already_done(self, window: int) -> bool:
        last = self.engine.last_window  # judged before a restart: its alerts went out already
        return last is not None and window <= last

    def ready(self, window: int) -> bool:
        """Whether an event of ``window`` can be judged now: a threshold exists, and no earlier
        window with a completion record seen is still open (the engine has their state)."""
        return self.engine.realtime and all(w >= window for w in self.completions)

    def item(self, record: dict, msg: Message) -> tuple[tuple, tuple] | None:
        if record["late"]:  # its window was closed without it
            return None
        record["loss"] = stored_loss(record["loss"])
        window = record["window"]
        if record["loss"] is not None:
            if self.ready(window):
                self._judge(window, record)
            elif self.engine.realtime:  # an earlier window is still open: a short wait
                kept = {name: record[name] for name in ALERT_FIELDS}
                self.held.setdefault(window, {})[event_order(record)] = kept
            else:  # no threshold yet: judged from disk when its window completes
                self.unjudged.add(window)
        return super().item(record, msg)  # what closing the window reads back

    def record(self, value: bytes) -> dict:
        """A closing window's score read back: its loss as the archive keeps it, as on arrival."""
        record = super().record(value)
        record["loss"] = stored_loss(record["loss"])
        return record

    def _judge(self, window: int, record: dict) -> None:
        alert = self.engine.judge_event(window, record)
        if alert is not None:
            self._queue(window, [alert])

    def _queue(self, window: int, alerts: list[Alert]) -> None:
        self.outbox += alerts
        self.window_alerts[window] = self.window_alerts.get(window, 0) + len(alerts)

    def handle(self, msg: Message, out: Output) -> None:
        super().handle(msg, out)
        if self.outbox:
            self._send(out, self.outbox)
            self.outbox = []

    def _send(self, out: Output, alerts: list[Alert]) -> None:
        for alert in alerts:
            out.send_record(self.config.topics.alerts, "salka.Alert", alert_record(alert),
                            key=str(alert.record["window"]).encode())
        self.counts["alerts"] += len(alerts)
        if self.observer is not None:
            self.observer.alerts_published(alerts, self.config.alerting.z_threshold)
        self.unsaved = True

    def window_complete(self, out: Output, window: int, items: SpilledWindow, msg: Message,
                        complete: dict) -> None:
        held = self.held.pop(window, {})
        if not self.engine.realtime:  # no earlier window had losses: judged whole, now
            self._queue(window, self.engine.judge_complete_read(window, lambda: self.records(items)))
        elif window in self.unjudged:  # came before the threshold: one by one, in event order
            for record in self.records(items):
                self._judge(window, record)  # (those alerted on already are not again)
        else:  # (none wait here: they were let go when the window before closed)
            for record in held.values():
                self._judge(window, record)
        self.unjudged = {w for w in self.unjudged if w > window}
        # A function, not a generator: the first window with losses is read twice (its mean
        # loss comes before its normalised scores), from disk both times.
        self.engine.close_window(
            window, lambda: ((r["loss"], r["entities"]) for r in self.records(items)))
        self.counts["windows"] += 1
        alerts = self.window_alerts.pop(window, 0)
        if alerts:
            log.info("window %d: %d alerts from %d scores", window, alerts, complete["count"],
                     extra={"window": window, "alerts": alerts})
        self.unsaved = self.closed_unsaved = True
        # The scores that waited for this window: judged now, in the order they came.
        for w in sorted(self.held):
            if self.ready(w):
                for record in self.held.pop(w).values():
                    self._judge(w, record)

    def on_revoke(self, partitions) -> None:
        super().on_revoke(partitions)
        self.held.clear()  # read again from the saved position
        self.unjudged.clear()

    def tick(self, out: Output) -> bool:
        return self.closed_unsaved

    def after_flush(self) -> None:
        if not self.unsaved:
            return
        self.resume_offset = self.safe_positions()
        # Written as it is encoded: the state (mostly kept losses) is not held a second time.
        with atomic_write(self.state_path) as handle:
            write_state(self.engine, {"resume_offset": self.resume_offset}, handle)
        self.unsaved = self.closed_unsaved = False

    def close(self, out: Output) -> None:
        log.info("alerter totals: %s; %d entity histories, %d evicted", self.counts,
                 len(self.engine.histories), self.engine.evicted)


def state_path(config: Config) -> Path:
    return Path(config.streaming.state_dir) / "alerter.npz"


def judged_through(config: Config) -> int | None:
    """The last window the alerter has judged, from its state file (None: none yet / unreadable)."""
    try:
        with open(state_path(config), "rb") as handle:
            return state_last_window(handle)
    except (OSError, StateFormatError):
        return None
