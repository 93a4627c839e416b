"""``pipeline demo``: the streaming pipeline end to end on one machine.

Embedded broker -> topics -> every stage as its own OS process -> produce the log -> wait until
every event is archived, dead-lettered or late -> summary -> stop everything, also on Ctrl-C.
"""

from __future__ import annotations

import ctypes
import gzip
import logging
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import click
import numpy as np
import yaml
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE

from pipeline.audit import audit
from pipeline.broker import EmbeddedBroker
from pipeline.config import Config, config_to_dict
from pipeline.generate import GenerateSpec
from pipeline.kafka import create_topics
from pipeline.progress import LogTail, shorten
from pipeline.safetext import printable
from pipeline.scorefile import window_files
from pipeline.serde import DecodeError, codec
from pipeline.status import collect as collect_status
from pipeline.status import lag_line
from pipeline.topicread import TopicReader, read_topic
from pipeline.topicrecords import identity

log = logging.getLogger(__name__)

STAGE_ORDER = ("alerter", "archiver", "scorer", "trainer", "windower", "tokenizer")
# The generated log: 3 days of ~2,000 events with 40 planted red-team events tells the whole story
# (alerts, ROC AUC ~0.99, audit) in well under a minute on 2 cores; `pipeline generate` makes more.
DEMO_DATA = GenerateSpec(days=3, events_per_day=2000, redteam_events=40)
STATUS_HEARTBEAT_SECONDS = 10.0  # an unchanged status line is repeated this often, no more
# Scorers started: one per windows partition at most (more sit idle in the group), and no more than
# 2: each is a torch process, and on a 2-core machine a third only competes with the trainer whose
# models every scorer waits for. Two still show the group sharing the partitions.
MAX_DEMO_SCORERS = 2


def _die_with_parent() -> None:
    """Linux: a stage gets SIGTERM if the demo process dies, so nothing is left running."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def stage_env() -> dict[str, str]:
    """One torch / OpenMP thread per stage unless the user chose otherwise: five processes share
    the machine, and OpenMP threads spinning against each other on 2 busy cores made the trainer
    several times slower (measured 6x for a char-LSTM)."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


class StageProcesses:
    """The stage processes, started with one effective config file, stopped in pipeline order."""

    def __init__(self, config_path: Path, log_dir: Path, code: Path | None = None,
                 env: dict[str, str] | None = None):
        """``code``: run the stages of another checkout of salka (a benchmark's baseline, e.g.
        ``git archive HEAD | tar -x -C DIR``): ``python -m pipeline`` finds its package first.
        ``env``: more environment for the stages (a benchmark's SALKA_PURE_PYTHON=1)."""
        self.config_path = config_path
        self.log_dir = log_dir
        self.code = code
        self.env = env or {}
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self, stage: str, instance: int = 0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        name = f"{stage}-{instance}"
        env = {**stage_env(), **self.env}
        if self.code is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.code), env.get("PYTHONPATH")]))
        with open(self.log_dir / f"{name}.log", "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", stage, "--config", str(self.config_path)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=self.code, start_new_session=True, preexec_fn=_die_with_parent,
            )
        self.processes.append((name, process))

    def dead(self) -> list[str]:
        return [f"{name} (exit {p.returncode})" for name, p in self.processes if p.poll() is not None]

    def stop(self, timeout: float = 30.0) -> None:
        for stage in STAGE_ORDER[::-1]:  # upstream first, so nothing new flows downstream
            for name, process in self.processes:
                if name.startswith(stage) and process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, process in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in time: killing it", name)
                process.kill()
                process.wait()


class ArchiveCounter:
    """Rows in the archive's window files (each file appears whole, by rename)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.rows: dict[Path, tuple[float, int]] = {}

    def count(self) -> tuple[int, int]:
        for path in window_files(self.directory):
            mtime = path.stat().st_mtime
            if path not in self.rows or self.rows[path][0] != mtime:
                with gzip.open(path, "rt") as handle:
                    self.rows[path] = (mtime, sum(1 for _ in handle) - 1)
        return sum(r for _, r in self.rows.values()), len(self.rows)


class SideTopicCounter:
    """Distinct raw records that ended as dead letters or late events."""

    def __init__(self, config: Config):
        self.config = config
        self.reader = TopicReader(config, [config.topics.dead_letters, config.topics.late],
                                  "demo-counter")
        self.dead: set = set()
        self.late: set = set()
        self.reasons: dict[str, int] = {}

    def poll(self) -> None:
        for msg in self.reader.poll():
            try:
                name, record = codec().decode(msg.value())
            except DecodeError:
                continue
            if name == "salka.DeadLetter":
                self.dead.add(identity(record))
                reason = record["reason"].split(":")[0]
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
            elif name == "salka.LateEvent":
                self.late.add(identity(record["event"]))

    def close(self) -> None:
        self.reader.close()


def effective_config(config: Config, workdir: Path, bootstrap: str) -> tuple[Config, Path]:
    kafka = {**config.kafka, "bootstrap.servers": bootstrap}
    # end_of_input: the demo's last windows close on the end-of-input records it produces
    streaming = replace(config.streaming, state_dir=str(workdir / "state"),
                        archive_dir=str(workdir / "archive"), end_of_input=True)
    config = replace(config, kafka=kafka, streaming=streaming)
    path = workdir / "effective-config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return config, path


def run_demo(config: Config, workdir: Path, input_path: Path | None, labels_path: Path | None,
             tokenizers: int = 2, timeout: float = 1800.0, scorers: int | None = None) -> int:
    from pipeline.alertview import alert_lines, precision_line
    from pipeline.evaluate import evaluate, format_report, read_labels
    from pipeline.generate import write_log
    from pipeline.produce import produce_file
    from pipeline.ranking import format_top_events, normalised
    from pipeline.scorefile import read_scores

    workdir.mkdir(parents=True, exist_ok=True)
    for old in ("state", "archive"):  # a demo always starts from scratch
        _clear(workdir / old)
    if input_path is None:
        input_path, labels_path = workdir / "auth.csv", workdir / "labels.csv"
        summary = write_log(DEMO_DATA, input_path, labels_path)
        click.echo(f"generated {summary['events']} events ({summary['redteam']} red-team) "
                   f"-> {input_path}")
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None if external else EmbeddedBroker(log_file=workdir / "broker.log")
    stages = None
    try:
        if broker is not None:
            broker.start()
        bootstrap = external or broker.bootstrap
        click.echo(f"broker: {bootstrap}{' (embedded tansu)' if broker else ''}")
        config, config_path = effective_config(config, workdir, bootstrap)
        create_topics(config)
        stages = StageProcesses(config_path, workdir / "logs")
        for i in range(tokenizers):
            stages.start("tokenizer", i)
        if scorers is None:
            scorers = min(config.topics.partitions, MAX_DEMO_SCORERS)
        for stage in ("windower", "trainer", "archiver", "alerter"):
            stages.start(stage)
        for i in range(scorers):
            stages.start("scorer", i)
        click.echo(f"started {tokenizers} tokenizer(s), windower, trainer, {scorers} scorer(s), "
                   f"archiver, alerter; logs in {workdir / 'logs'}")
        started = time.monotonic()
        produced = produce_file(config, input_path)
        click.echo(f"produced {produced.records} records in {produced.seconds:.1f}s")
        archive = Path(config.streaming.archive_dir)
        counts = _wait_until_accounted(config, stages, archive, produced.records, started, timeout)
        elapsed = time.monotonic() - started
        alerts = _wait_for_alerts(config, archive)
        stages.stop()  # stopped cleanly before the audit reads the topics
        latency = latency_line(score_latencies(config))
        audit_report = audit(config, input_path=input_path)  # and against the file, line by line
        lag = collect_status(config)  # the final commits, while the broker is still there
    finally:
        if stages is not None:
            stages.stop()
        if broker is not None:
            broker.stop()
    archived, windows, dead, late, reasons = counts
    rows = read_scores(archive)
    scored = sum(1 for r in rows if r.loss is not None)
    click.echo("")
    click.echo(f"events produced: {produced.records}   windows: {windows}   archived: {archived} "
               f"(scored {scored}, first window unscored {archived - scored})")
    click.echo(f"dead letters: {dead} {printable(str(reasons)) if reasons else ''}   late: {late}")
    click.echo(f"end to end: {elapsed:.1f}s, {produced.records / elapsed:.0f} events/s")
    click.echo(latency)
    ranked_by = "score (loss for its entity, alerting.normalise)" if normalised(config.alerting) else "loss"
    click.echo(f"\ntop 10 events by {ranked_by} (archive: {archive}):")
    click.echo(format_top_events(rows, 10, input_path, config.alerting))
    labels = read_labels(labels_path) if labels_path is not None else None
    click.echo(f"\nalerts: {len(alerts)} (topic {config.topics.alerts}); the 5 highest:")
    for line in alert_lines(alerts, 5):
        click.echo(line)
    if labels is not None:
        click.echo(precision_line(alerts, labels, 20))
        click.echo("")
        # Both rankings: the normalised score the alerts use, and the raw loss beside it.
        click.echo(format_report(evaluate(archive, labels_path, alerting=config.alerting)))
    click.echo("")
    click.echo(audit_report.format())
    click.echo(lag_line(lag))
    click.echo(next_steps(config_path, input_path, archive, labels_path))
    return 0 if audit_report.ok else 1


def next_steps(config_path: Path, log: Path, archive: Path, labels: Path | None) -> str:
    """Where to go from here, with this run's paths filled in (copy-paste ready)."""
    with_labels = f" --labels {labels}" if labels is not None else ""
    lines = [
        "",
        "next steps:",
        f"  pipeline replay --config {config_path} --input {log} --output scores.csv.gz"
        "   # the same job offline",
        *([f"  pipeline eval --scores scores.csv.gz{with_labels}   # ROC AUC, precision@k"]
          if labels is not None else []),
        f"  pipeline report --archive {archive} --input {log}{with_labels} --output report.html",
        f"  pipeline top --archive {archive} --by user   # the most anomalous users",
        "  pipeline demo --config examples/apache.yaml --input YOUR.log   # your own logs; examples/",
        "     has configs for syslog, JSON lines, Zeek, Windows events, HDFS/BGL",
        "  README.md: every command, stage and config key; benchmarks/: throughput",
    ]
    return "\n".join(lines)


def first_produce_times(messages, schema: str) -> dict[tuple[str, int, int], float]:
    """Event identity -> the earliest CreateTime (epoch s) of its ``schema`` records among
    ``messages`` (a redelivered event appears more than once: its first copy counts)."""
    times: dict[tuple[str, int, int], float] = {}
    for msg in messages:
        kind, ms = msg.timestamp()
        if msg.value() is None or kind == TIMESTAMP_NOT_AVAILABLE or ms <= 0:
            continue  # control records (end of input) carry no event
        try:
            name, record = codec().decode(msg.value())
        except DecodeError:
            continue
        if name == schema:
            key = identity(record)
            times[key] = min(ms / 1000, times.get(key, math.inf))
    return times


def latencies(produced: dict, scored: dict) -> np.ndarray:
    """Seconds from each event's tokens record to its score, for events that have both."""
    return np.array([scored[key] - produced[key] for key in scored.keys() & produced.keys()])


def latency_line(seconds: np.ndarray) -> str:
    if not len(seconds):
        return "score latency: no event scored"
    p50, p99 = np.percentile(seconds, [50, 99])
    return (f"score latency: p50 {p50:.2f} s, p99 {p99:.2f} s ({len(seconds)} events, "
            f"tokenizer output -> score)")


def score_latencies(config: Config, timeout: float = 60.0) -> np.ndarray:
    """Per event: the scores record's timestamp (the scorer's produce, wall clock) minus its
    tokens record's (the tokenizer's produce). This measures tokenizer output -> score, windower
    and waiting for the model included; raw records carry the event time as their timestamp, so
    the raw producer's send cannot be the start."""
    topics = (config.topics.tokens, config.topics.scores)
    messages = []
    deadline = time.monotonic() + timeout
    with TopicReader(config, topics, "demo-latency") as reader:
        while not reader.at_end and time.monotonic() < deadline:
            messages += reader.poll(max_records=10_000)
    by_topic = {topic: [m for m in messages if m.topic() == topic] for topic in topics}
    return latencies(first_produce_times(by_topic[topics[0]], "salka.TokenizedEvent"),
                     first_produce_times(by_topic[topics[1]], "salka.ScoredEvent"))


def _wait_for_alerts(config: Config, archive: Path, timeout: float = 120.0) -> list[dict]:
    """Once the alerter has judged the last archived window, every alert it will raise."""
    from pipeline.stages.alerter import judged_through

    last = max((int(p.name[len("window-"):-len(".csv.gz")]) for p in window_files(archive)),
               default=None)
    if last is None:  # every event dead-lettered or late: no window to wait for
        return []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if judged_through(config) == last:
            break
        time.sleep(0.3)
    else:
        click.echo(f"warning: the alerter did not judge window {last} within {timeout:.0f}s")
    alerts = []
    for msg in read_topic(config, config.topics.alerts):
        try:
            alerts.append(codec().decode(msg.value(), expected=("salka.Alert",))[1])
        except DecodeError:
            continue
    return alerts


def _wait_until_accounted(config, stages, archive, expected, started, timeout):
    side = SideTopicCounter(config)
    counter = ArchiveCounter(archive)
    tail = LogTail(stages.log_dir)  # the stage that logged last is the one at work
    busy, shown, last_print = "stages starting", None, 0.0
    try:
        while True:
            side.poll()
            archived, windows = counter.count()
            now = time.monotonic()
            accounted = archived + len(side.dead) + len(side.late)
            busy = tail.newest() or busy
            status = (f"archived {archived}/{expected} in {windows} windows, dead letters "
                      f"{len(side.dead)}, late {len(side.late)} | {shorten(busy, 80)}")
            # A line when something changed (at most one a second), else a heartbeat.
            if (status != shown and now - last_print >= 1.0) or accounted >= expected \
                    or now - last_print >= STATUS_HEARTBEAT_SECONDS:
                click.echo(f"  [{now - started:5.1f}s] {status}")
                shown, last_print = status, now
            if accounted >= expected:
                return archived, windows, len(side.dead), len(side.late), side.reasons
            dead = stages.dead()
            if dead:
                raise click.ClickException(f"stage process died: {', '.join(dead)} (see logs)")
            if now - started > timeout:
                raise click.ClickException(f"not every event accounted for after {timeout:.0f}s")
            time.sleep(0.3)
    finally:
        side.close()


def _clear(path: Path) -> None:
    if not path.exists():
        return
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()
