"""Prometheus metrics and Kubernetes-style health endpoints for one stage process.

Every stage serves, on one port (``--metrics-port`` / ``metrics.port``; 0 = off):

- ``/metrics``: the Prometheus exposition of this process's own ``CollectorRegistry`` (never the
  library's global one, so that several runners in one test process stay apart);
- ``/healthz``: 200 while the stage loop has iterated within ``metrics.stuck_seconds`` (or is
  waiting for an unreachable broker, which a restart would not cure), else 503;
- ``/readyz``: 200 when the consumer holds partitions and the broker answers, else 503.

The hot path stays cheap: the runner calls ``StageMetrics.after_batch`` once per consume batch,
which folds that batch into the counters and reads the stage's own tallies (``stage.counts``) and
the consumer's positions. Stage-specific figures come from ``observe_*`` probes below, or, where a
stage must say something the runner cannot see (a window trained, alerts judged), through the
stage's ``observer`` attribute (None when metrics are off). No label takes an unbounded value:
labels are topics, partitions and entity kinds, never users or hosts.
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

# Batch handling: a tokenizer batch takes milliseconds, a trainer batch that completes a window
# takes minutes.
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                 120, 300, 600, 1800)
# Window scoring / training / checkpointing: seconds to hours.
WINDOW_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
# Event forwarded -> scored (a scorer waits in Kafka for its window's model: up to a window's
# training), and window closed -> its model announced.
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
WINDOW_RULE = "window"  # entity_kind label of alerts raised by the window-percentile rule


class Health:
    """Liveness and readiness from plain facts the stage loop updates; ``clock`` is injectable so
    a test can make the loop look stuck without waiting."""

    def __init__(self, stuck_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.stuck_seconds = stuck_seconds
        self.clock = clock
        self.last_beat = clock()
        self.assigned = False
        # Read from the HTTP thread: a plain attribute read, set by the stage loop.
        self.broker_reachable: Callable[[], bool | None] = lambda: None

    def beat(self) -> None:
        self.last_beat = self.clock()

    def live(self) -> tuple[bool, str]:
        idle = self.clock() - self.last_beat
        if idle <= self.stuck_seconds:
            return True, "ok"
        if self.broker_reachable() is not True:
            # Waiting for the broker is deliberate (flush / start-up); a restart would not help.
            return True, f"waiting for the broker for {idle:.0f}s"
        return False, f"stage loop has not iterated for {idle:.0f}s (metrics.stuck_seconds " \
                      f"{self.stuck_seconds:g})"

    def ready(self) -> tuple[bool, str]:
        if self.broker_reachable() is not True:
            return False, "broker not reachable"
        if not self.assigned:
            return False, "no partitions assigned"
        return True, "ok"


class _LagCollector:
    """Consumer lag per partition from the latest snapshot the stage loop took (a dict swapped
    whole, so the HTTP thread never sees one half-updated); revoked partitions disappear."""

    def __init__(self, name: str):
        self.name = name
        self.snapshot: dict[tuple[str, int], int] = {}

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, "Records behind the partition's high watermark "
                                   "(high watermark - consumer position)", labels=["topic", "partition"])
        for (topic, partition), lag in sorted(self.snapshot.items()):
            family.add_metric([topic, str(partition)], lag)
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return self.collect()


class _Deltas:
    """Turns a stage's running tallies into counter increments; a rebuilt stage object (the runner
    starts over after a delivery failure) starts its tallies at zero again."""

    def __init__(self) -> None:
        self.owner: object | None = None
        self.last: dict = {}

    def take(self, owner: object, values: dict) -> dict:
        if owner is not self.owner:
            self.owner, self.last = owner, {}
        out = {}
        for key, value in values.items():
            delta = value - self.last.get(key, 0)
            if delta > 0:
                out[key] = delta
            self.last[key] = value
        return out


class StageMetrics:
    """The metric families of one stage process, named ``salka_<stage>_...``."""

    def __init__(self, stage: str, stuck_seconds: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, process_metrics: bool = True):
        self.stage = stage
        self.registry = CollectorRegistry(auto_describe=True)
        self.health = Health(stuck_seconds, clock)
        p, r = f"salka_{stage}", self.registry
        if process_metrics:  # process_resident_memory_bytes, process_cpu_seconds_total, ...
            ProcessCollector(registry=r)
        self.records_in = Counter(f"{p}_records_in", "Records consumed", ["topic"], registry=r)
        self.records_out = Counter(f"{p}_records_out", "Records produced", ["topic"], registry=r)
        self.dead_lettered = Counter(f"{p}_records_dead_lettered", "Input records sent to the "
                                     "dead-letter topic, by the topic they came from", ["topic"],
                                     registry=r)
        self.late = Counter(f"{p}_records_late", "Input records routed to the late-events topic, by "
                            "the topic they came from", ["topic"], registry=r)
        self.batch_seconds = Histogram(f"{p}_batch_processing_seconds", "Time to handle one consumed "
                                       "batch (handle, tick, commit)", registry=r,
                                       buckets=BATCH_BUCKETS)
        self.commit_failures = Counter(f"{p}_commit_failures", "Offset commits that failed (retried)",
                                       registry=r)
        self.delivery_failures = Counter(f"{p}_delivery_failures", "Produced records the broker "
                                         "refused permanently", registry=r)
        self.broker_up = Gauge(f"{p}_broker_up", "1 when the broker answered the last look, else 0",
                               registry=r)
        self.assigned = Gauge(f"{p}_assigned_partitions", "Input partitions assigned", registry=r)
        self.lag = _LagCollector(f"{p}_consumer_lag")
        r.register(self.lag)
        self._probe = _PROBES.get(stage, lambda metrics, stage: None)
        self._families = _FAMILIES.get(stage, lambda metrics: None)(self)
        self._stage_counts = _Deltas()
        self._out = _Deltas()
        self._failures = _Deltas()
        self._stage: object | None = None

    # ---------------------------------------------------------------- runner hooks

    def after_batch(self, runner, msgs: list, started: float) -> None:
        """Once per loop iteration, in the loop's thread: fold in the batch and take readings."""
        if runner.stage is not self._stage:  # new stage object: tell it where to report
            self._stage = runner.stage
            if hasattr(runner.stage, "observer"):
                runner.stage.observer = _OBSERVERS.get(self.stage, _Observer)(self)
            watch = runner.watch
            self.health.broker_reachable = lambda: watch.reachable
        if msgs:
            self.batch_seconds.observe(time.perf_counter() - started)
            by_topic: dict[str, int] = {}
            for msg in msgs:
                if not msg.error():
                    topic = msg.topic()
                    by_topic[topic] = by_topic.get(topic, 0) + 1
            for topic, count in by_topic.items():
                self.records_in.labels(topic).inc(count)
        for topic, count in self._out.take(runner.out, runner.out.by_topic).items():
            self.records_out.labels(topic).inc(count)
        failures = self._failures.take(runner.tracker, {"n": len(runner.tracker.failures)})
        if failures:
            self.delivery_failures.inc(failures["n"])
        counts = getattr(runner.stage, "counts", None)
        if isinstance(counts, dict):
            deltas = self._stage_counts.take(runner.stage, counts)
            source = ",".join(runner.stage.topics())
            if deltas.get("dead_letters"):
                self.dead_lettered.labels(source).inc(deltas["dead_letters"])
            if deltas.get("late") and self.stage in _ROUTES_LATE:
                self.late.labels(source).inc(deltas["late"])
            self._probe(self, runner.stage, deltas)
        self.broker_up.set(1 if runner.watch.reachable else 0)
        self._read_lag(runner.consumer)
        self.health.beat()

    def commit_failed(self) -> None:
        self.commit_failures.inc()

    def _read_lag(self, consumer) -> None:
        lags = {}
        try:
            assigned = consumer.assignment()
            positions = consumer.position(assigned) if assigned else []
            for tp in positions:
                # cached: the high watermark of the last fetch response. The embedded broker's
                # ListOffsets answer is too low (KAFKA-NOTES.md), so it is never asked.
                low, high = consumer.get_watermark_offsets(tp, cached=True)
                if high is None or high < 0:
                    continue
                if tp.offset >= 0:
                    lags[(tp.topic, tp.partition)] = max(0, high - tp.offset)
                elif low is not None and low >= 0 and high == low:  # empty partition
                    lags[(tp.topic, tp.partition)] = 0
        except RuntimeError:  # consumer closed while stopping
            return
        except Exception as exc:  # a reading must never stop the stage
            log.debug("%s: consumer lag not read: %s", self.stage, exc)
            return
        self.lag.snapshot = lags
        self.assigned.set(len(positions))
        self.health.assigned = bool(positions)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# ------------------------------------------------------------------------ per-stage figures


def _windower_families(m: StageMetrics) -> None:
    r = m.registry
    m.watermark = Gauge("salka_windower_watermark_seconds", "Watermark (event time; a line count "
                        "when the input has no time field)", registry=r)
    m.open_windows = Gauge("salka_windower_open_windows", "Windows still open", registry=r)
    # The name predates forwarding on arrival: the events are counted, not held in memory.
    m.events_buffered = Gauge("salka_windower_events_buffered", "Events forwarded into windows "
                              "still open (counted only: the windower holds no events)", registry=r)
    m.windows_closed = Counter("salka_windower_windows_closed", "Windows closed and emitted",
                               registry=r)
    m.idle_partitions = Gauge("salka_windower_idle_partitions", "Tokens partitions the watermark "
                              "no longer waits for (no event for streaming.idle_partition_seconds)",
                              registry=r)


def _windower_probe(m: StageMetrics, stage, deltas: dict) -> None:
    mark = stage.watermark.value if stage.watermark is not None else -math.inf
    if math.isfinite(mark):
        m.watermark.set(mark)
    m.open_windows.set(len(stage.open))
    m.idle_partitions.set(len(stage.watermark.idle) if stage.watermark is not None else 0)
    m.events_buffered.set(sum(stage.open.values()))  # open window -> events forwarded
    if deltas.get("windows"):
        m.windows_closed.inc(deltas["windows"])


def _trainer_families(m: StageMetrics) -> None:
    r = m.registry
    m.train_seconds = Histogram("salka_trainer_window_train_seconds", "Time to train on one window",
                                registry=r, buckets=WINDOW_BUCKETS)
    # The scorer stage scores now (salka_scorer_*); the trainer's three scoring metrics keep their
    # names for existing dashboards and stay empty / 0.
    m.score_seconds = Histogram("salka_trainer_window_score_seconds", "Always empty: the scorer "
                                "stage scores (salka_scorer_events_scored_total)", registry=r,
                                buckets=WINDOW_BUCKETS)
    m.checkpoint_seconds = Histogram("salka_trainer_checkpoint_seconds", "Time to write a checkpoint "
                                     "(the model handed on)", registry=r, buckets=WINDOW_BUCKETS)
    m.train_loss = Gauge("salka_trainer_train_loss", "Mean training loss of the last window (nats "
                         "per token)", registry=r)
    m.model_window = Gauge("salka_trainer_model_window", "Last window the model was trained on",
                           registry=r)
    m.events_trained = Counter("salka_trainer_events_trained", "Events trained on", registry=r)
    m.events_left_out = Counter("salka_trainer_events_left_out", "Events left out of training as "
                                "the most surprising of their window (training.exclude_top_fraction)",
                                registry=r)
    m.events_scored = Counter("salka_trainer_events_scored", "Always 0: the scorer stage scores "
                              "(salka_scorer_events_scored_total)", registry=r)
    m.windows_trained = Counter("salka_trainer_windows_trained", "Windows trained", registry=r)
    m.score_latency = Histogram("salka_trainer_score_latency_seconds", "Always empty: the scorer "
                                "stage scores (salka_scorer_score_latency_seconds)", registry=r,
                                buckets=LATENCY_BUCKETS)
    m.model_latency = Histogram("salka_trainer_model_latency_seconds", "Per window: from the "
                                "windower publishing its completion record to the model trained "
                                "on it being announced (scorers of the next window wait this long)",
                                registry=r, buckets=LATENCY_BUCKETS)


def _trainer_probe(m: StageMetrics, stage, deltas: dict) -> None:
    if stage.learner.last_window is not None:
        m.model_window.set(stage.learner.last_window)


def _alerter_families(m: StageMetrics) -> None:
    m.alerts = Counter("salka_alerter_alerts", "Alerts published, by the entity kind whose robust "
                       f"z-score flagged them ({WINDOW_RULE!r}: the window percentile rule)",
                       ["entity_kind"], registry=m.registry)
    m.windows_judged = Counter("salka_alerter_windows_judged", "Windows judged", registry=m.registry)


def _alerter_probe(m: StageMetrics, stage, deltas: dict) -> None:
    if deltas.get("windows"):
        m.windows_judged.inc(deltas["windows"])


def _archiver_families(m: StageMetrics) -> None:
    m.rows_archived = Counter("salka_archiver_rows_archived", "Score rows written to window files",
                              registry=m.registry)
    m.windows_archived = Counter("salka_archiver_windows_archived", "Window files written",
                                 registry=m.registry)
    m.late_skipped = Counter("salka_archiver_late_skipped", "Scores of late events left out of "
                             "the window files", registry=m.registry)


def _archiver_probe(m: StageMetrics, stage, deltas: dict) -> None:
    if deltas.get("rows"):
        m.rows_archived.inc(deltas["rows"])
    if deltas.get("windows"):
        m.windows_archived.inc(deltas["windows"])
    if deltas.get("late"):
        m.late_skipped.inc(deltas["late"])


def _tokenizer_families(m: StageMetrics) -> None:
    m.events = Counter("salka_tokenizer_events", "Raw records parsed into events",
                       registry=m.registry)


def _tokenizer_probe(m: StageMetrics, stage, deltas: dict) -> None:
    if deltas.get("events"):
        m.events.inc(deltas["events"])


def _scorer_families(m: StageMetrics) -> None:
    r = m.registry
    m.events_scored = Counter("salka_scorer_events_scored", "Events scored (late ones included)",
                              registry=r)
    m.late_scored = Counter("salka_scorer_late", "Late events scored (marked late: not archived, "
                            "never trained on)", registry=r)
    m.waits = Counter("salka_scorer_waits", "Times a partition was paused to wait in Kafka for the "
                      "model of its next event's window", registry=r)
    m.models_refused = Counter("salka_scorer_models_refused", "Announced models refused (file "
                               "missing or damaged, or made by another configuration)", registry=r)
    m.waiting = Gauge("salka_scorer_waiting_partitions", "Input partitions paused until a model "
                      "is announced", registry=r)
    m.model_window = Gauge("salka_scorer_model_window", "Window the newest model this scorer "
                           "loaded was trained through", registry=r)
    m.announced_through = Gauge("salka_scorer_announced_through", "Last window an announced model "
                                "serves (events of later windows wait)", registry=r)
    m.score_latency = Histogram("salka_scorer_score_latency_seconds", "Per event: from the "
                                "windower forwarding it (the consumed record's timestamp) to its "
                                "score being sent", registry=r, buckets=LATENCY_BUCKETS)


def _scorer_probe(m: StageMetrics, stage, deltas: dict) -> None:
    for key, counter in (("scored", m.events_scored), ("late", m.late_scored), ("waits", m.waits),
                         ("refused", m.models_refused)):
        if deltas.get(key):
            counter.inc(deltas[key])
    m.waiting.set(len(stage.waiting))
    trained = [through for through, _ in stage.models if through is not None]
    if trained:
        m.model_window.set(max(trained))
    served = [record["serves_through"] for record in stage.index.by_model.values()]
    if served:
        m.announced_through.set(max(served))


_FAMILIES = {"windower": _windower_families, "trainer": _trainer_families,
             "scorer": _scorer_families, "alerter": _alerter_families,
             "archiver": _archiver_families, "tokenizer": _tokenizer_families}
_PROBES = {"windower": _windower_probe, "trainer": _trainer_probe, "scorer": _scorer_probe,
           "alerter": _alerter_probe, "archiver": _archiver_probe, "tokenizer": _tokenizer_probe}
# Stages whose ``counts["late"]`` are input records routed to the late topic (records_late); the
# scorer's and archiver's count late events scored / skipped instead.
_ROUTES_LATE = {"windower"}


class _Observer:
    """What a stage tells its metrics from inside ``handle`` (set as ``stage.observer``)."""

    def __init__(self, metrics: StageMetrics):
        self.metrics = metrics


class TrainerObserver(_Observer):
    def window_done(self, window: int, events: int, score_seconds: float, train_seconds: float,
                    loss: float, published: float | None, announced_at: float,
                    left_out: int = 0) -> None:
        """A window trained and its model announced; ``published``: when the windower sent the
        window's completion record. ``score_seconds`` is ignored: the scorer stage scores.
        ``left_out``: of ``events``, those training.exclude_top_fraction kept out."""
        m = self.metrics
        m.train_seconds.observe(train_seconds)
        if loss is not None and math.isfinite(loss):
            m.train_loss.set(loss)
        m.events_trained.inc(events)
        m.events_left_out.inc(left_out)
        m.windows_trained.inc()
        m.model_window.set(window)
        if published is not None:
            m.model_latency.observe(max(0.0, announced_at - published))

    def checkpoint_done(self, seconds: float) -> None:
        self.metrics.checkpoint_seconds.observe(seconds)

    def training(self, report: Callable[[int, float, float], None]) -> Callable[[int, float, float], None]:
        """Wrap a training progress callback so that a window that trains for longer than
        metrics.stuck_seconds still counts as a live loop."""
        beat = self.metrics.health.beat

        def progress(epoch: int, epoch_fraction: float, window_fraction: float) -> None:
            beat()
            report(epoch, epoch_fraction, window_fraction)

        return progress


class AlerterObserver(_Observer):
    def alerts_published(self, alerts: list, z_threshold: float) -> None:
        for alert in alerts:
            for kind in alert_kinds(alert, z_threshold):
                self.metrics.alerts.labels(kind).inc()


class ScorerObserver(_Observer):
    """Score latency per event: the consumed record's timestamp (the windower's produce time) to
    the end of the batch that scored it. Events that wait for their model are consumed again
    later and timed from the same timestamp, so waiting counts."""

    def __init__(self, metrics: StageMetrics):
        super().__init__(metrics)
        self.pending: list[float] = []  # produce times (epoch s) of events in the current batch

    def consumed(self, msg) -> None:
        kind, ms = msg.timestamp()
        if kind != TIMESTAMP_NOT_AVAILABLE and ms > 0:
            self.pending.append(ms / 1000)

    def scored(self) -> None:
        now, histogram = time.time(), self.metrics.score_latency
        for published in self.pending:
            histogram.observe(max(0.0, now - published))
        self.pending = []


_OBSERVERS = {"trainer": TrainerObserver, "scorer": ScorerObserver, "alerter": AlerterObserver}


def alert_kinds(alert, z_threshold: float) -> list[str]:
    """The rules that raised an alert: entity kinds whose z-score crossed the threshold, and
    ``window`` when the window-percentile rule did (a bounded set of label values)."""
    kinds = sorted({s["kind"] for s in alert.entity_stats if s["z"] >= z_threshold})
    if len(kinds) < len(alert.reasons):  # the remaining reason is the percentile rule
        kinds.insert(0, WINDOW_RULE)
    return kinds


# ------------------------------------------------------------------------ HTTP


class _Handler(BaseHTTPRequestHandler):
    metrics: StageMetrics  # set on the subclass made per server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, text = (self.metrics.health.live() if path == "/healthz"
                        else self.metrics.health.ready())
            self._send(200 if ok else 503, (text + "\n").encode(), "text/plain; charset=utf-8")
        else:
            self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass  # one line per scrape on stderr would drown the stage's log (and break JSON logs)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # socketserver prints a traceback to stderr when a scraper hangs up early (broken pipe):
        # not the stage's problem, and not a log line.
        log.debug("metrics client %s went away", client_address[0], exc_info=True)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` served from a daemon thread."""

    def __init__(self, metrics: StageMetrics, port: int, host: str = "0.0.0.0"):
        handler = type("Handler", (_Handler,), {"metrics": metrics})
        self.httpd = _QuietServer((host, port), handler)  # OSError: port taken
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="salka-metrics",
                                       daemon=True)

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class MetricsPortError(ValueError):
    """The metrics port cannot be listened on (one line for the user)."""


def serve(stage: str, port: int, host: str = "0.0.0.0", stuck_seconds: float = 300.0
          ) -> tuple[StageMetrics, MetricsServer]:
    """Metrics for ``stage`` and the server for them, listening (OSError when it cannot)."""
    metrics = StageMetrics(stage, stuck_seconds)
    server = MetricsServer(metrics, port, host).start()
    log.info("%s: metrics on http://%s:%d/metrics (and /healthz, /readyz)", stage, host, server.port,
             extra={"metrics_port": server.port})
    return metrics, server


def start_metrics(config, stage: str, port: int | None = None) -> StageMetrics | None:
    """Serve ``stage``'s metrics on ``port`` (None: ``metrics.port``); None when that is 0 (off)."""
    port = config.metrics.port if port is None else port
    if not port:
        return None
    host = config.metrics.host
    try:
        metrics, _ = serve(stage, port, host, config.metrics.stuck_seconds)
    except socket.gaierror as exc:  # the name, not the port: say so
        raise MetricsPortError(
            f"metrics.host {host!r}: not an address of this host ({exc.strerror or exc}); set "
            f"metrics.host to one (0.0.0.0: every interface; 127.0.0.1: this host only)") from exc
    except OSError as exc:
        raise MetricsPortError(
            f"metrics.port {port}: cannot listen on {host}:{port} ({exc.strerror or exc}); choose a "
            f"free port with --metrics-port or metrics.port (0 turns metrics off)") from exc
    return metrics
