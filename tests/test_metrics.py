"""Metrics, health endpoints and JSON logs (pipeline/metrics.py, pipeline/logs.py).

The broker test runs every stage as its own process with ``--metrics-port`` and
``--log-format json`` and checks the scraped counters against the records that went through."""

from __future__ import annotations

import io
import json
import logging
import math
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from helpers import delete_topics, read_records, stream_config, wait_for
from prometheus_client.parser import text_string_to_metric_families

from pipeline.alerting import Alert
from pipeline.broker import free_port
from pipeline.cli import cli
from pipeline.demo import ArchiveCounter, stage_env
from pipeline.generate import GenerateSpec, write_log
from pipeline.logs import JsonFormatter, SecretFilter
from pipeline.metrics import MetricsServer, StageMetrics, alert_kinds
from pipeline.produce import produce_file

DASHBOARD = Path(__file__).resolve().parent.parent / "docker/grafana/dashboards/salka.json"
STAGES = ("tokenizer", "windower", "trainer", "scorer", "archiver", "alerter")


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def exposed_names(text: str) -> set[str]:
    """Every metric name the exposition shows: sample names and the names on TYPE lines (a
    labelled counter nobody has incremented yet has the latter only)."""
    names = {name for name, _ in samples(text)}
    names |= set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    return names


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def dashboard_metric_names() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    return {name for e in exprs for name in re.findall(r"\bsalka_[a-z_]+\b", e)}


# ---------------------------------------------------------------------------- no broker


def test_healthz_turns_unhealthy_when_the_loop_is_stuck_and_readyz_follows_the_facts():
    now = [1000.0]
    metrics = StageMetrics("tokenizer", stuck_seconds=30, clock=lambda: now[0], process_metrics=False)
    reachable = [True]
    metrics.health.broker_reachable = lambda: reachable[0]
    server = MetricsServer(metrics, 0, "127.0.0.1").start()
    try:
        assert get(server.port, "/healthz")[0] == 200
        now[0] += 29
        assert get(server.port, "/healthz")[0] == 200
        now[0] += 2  # 31 s without a loop iteration
        status, body = get(server.port, "/healthz")
        assert status == 503 and "31s" in body
        reachable[0] = False  # waiting for an absent broker is not stuck: a restart cannot help
        assert get(server.port, "/healthz")[0] == 200
        reachable[0] = True
        metrics.health.beat()
        assert get(server.port, "/healthz")[0] == 200

        assert get(server.port, "/readyz") == (503, "no partitions assigned\n")
        metrics.health.assigned = True
        assert get(server.port, "/readyz")[0] == 200
        reachable[0] = False
        assert get(server.port, "/readyz") == (503, "broker not reachable\n")
        assert get(server.port, "/nothing")[0] == 404
        status, text = get(server.port, "/metrics")
        assert status == 200 and "salka_tokenizer_records_in_total" in text
    finally:
        server.stop()


def test_registries_are_per_process_object_not_global():
    a, b = StageMetrics("windower", process_metrics=False), StageMetrics("windower", process_metrics=False)
    a.commit_failed()
    assert value(samples(a.exposition().decode()), "salka_windower_commit_failures_total") == 1
    assert value(samples(b.exposition().decode()), "salka_windower_commit_failures_total") == 0


def test_alert_kinds_name_the_rules_that_fired():
    def alert(reasons, stats):
        return Alert({}, 99.0, reasons, stats)

    stats = [{"kind": "user", "z": 5.0}, {"kind": "src_host", "z": 1.0}, {"kind": "pair", "z": 4.5}]
    assert alert_kinds(alert(["user", "pair"], stats), 4.0) == ["pair", "user"]
    assert alert_kinds(alert(["percentile", "user", "pair"], stats), 4.0) == ["window", "pair", "user"]
    assert alert_kinds(alert(["percentile"], []), 4.0) == ["window"]


def test_json_logs_parse_line_by_line_with_fields_and_no_secrets():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SecretFilter())
    logger = logging.getLogger(f"salka-test-{uuid.uuid4().hex}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.info("window %d closed", 3, extra={"window": 3, "watermark": float("inf")})
    logger.warning("bad record\nsecond line", extra={"topic": "t", "partition": 2, "offset": 41})
    logger.debug("consumer settings: %s", {"bootstrap.servers": "b:9092", "sasl.password": "hunter2",
                                            "ssl.key.password": "k3y"})
    logger.info("extra secret", extra={"sasl_password": "hunter2"})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    text = stream.getvalue()
    assert "hunter2" not in text and "k3y" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 5
    for entry in lines:
        assert {"time", "level", "stage", "message"} <= entry.keys()
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", entry["time"])
    assert lines[0]["window"] == 3 and lines[0]["message"] == "window 3 closed"
    assert lines[0]["watermark"] == "inf"
    assert (lines[1]["partition"], lines[1]["offset"], lines[1]["level"]) == (2, 41, "WARNING")
    assert "b:9092" in lines[2]["message"] and "***" in lines[2]["message"]
    assert lines[3]["sasl_password"] == "***"
    assert "ValueError: boom" in lines[4]["exception"]


def test_a_taken_metrics_port_is_one_line_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["run", "tokenizer", "--metrics-port", str(port),
                                          "--set", "metrics.host=127.0.0.1",
                                          "--set", f"streaming.state_dir={tmp_path}"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert f"metrics.port {port}" in lines[0] and "--metrics-port" in lines[0]


def test_an_unresolvable_metrics_host_is_named_not_the_port(tmp_path):
    """A host name that does not resolve was blamed on the port ("choose a free port")."""
    result = CliRunner().invoke(cli, ["run", "tokenizer", "--metrics-port", "9555",
                                      "--set", "metrics.host=no-such-host.invalid",
                                      "--set", f"streaming.state_dir={tmp_path}"])
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: metrics.host 'no-such-host.invalid': not an address of this host")


class PausingConsumer:
    """What a scorer asks of its consumer: pause / seek / resume, recorded."""

    def __init__(self):
        self.paused: set[tuple[str, int]] = set()

    def pause(self, partitions) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def seek(self, partition) -> None:
        pass

    def resume(self, partitions) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in partitions}

    def assignment(self) -> list:
        return []


def test_scorer_metrics_count_scored_late_waits_refusals_and_latency(tmp_path):
    """The scorer driven in-process (no broker): what it scores, marks late, leaves waiting in
    Kafka and refuses shows in its metrics, and each scored event's latency from the consumed
    record's timestamp is observed once."""
    from stage_fakes import FakeMessage, RecordingOutput, encoded, tokenized_record

    from pipeline.config import config_from_dict
    from pipeline.metrics import ScorerObserver
    from pipeline.modelstore import announcement, config_fingerprint
    from pipeline.stages.scorer import ScorerStage

    config = config_from_dict({"streaming": {"state_dir": str(tmp_path / "state")}})
    t = config.topics
    metrics = StageMetrics("scorer", process_metrics=False)
    stage = ScorerStage(config)
    stage.consumer = PausingConsumer()  # no on_assign: no models-topic reader, announcements below
    out = RecordingOutput()
    runner = SimpleNamespace(stage=stage, out=out, watch=SimpleNamespace(reachable=True),
                             tracker=SimpleNamespace(failures=[]), consumer=stage.consumer)
    metrics.after_batch(runner, [], time.perf_counter())
    assert isinstance(stage.observer, ScorerObserver)  # set by the metrics, as for the trainer

    # No model before window 0 (its events get empty losses); the model for window 1 comes from
    # another configuration and is refused, so window 1 waits.
    stage.index.add(announcement(None, 0, fingerprint=config_fingerprint(config)))
    stage.index.add(announcement(0, 1, url=str(tmp_path / "model.pt"), sha256="0" * 64,
                                 fingerprint="not-ours"))
    forwarded_ms = int(time.time() * 1000) - 2000  # the windower sent them 2 s ago

    def event(offset: int) -> dict:
        return tokenized_record(f"e{offset}", float(offset), ("raw", 0, offset))

    msgs = [
        FakeMessage(t.windows, 0, 0, encoded("salka.WindowedEvent", {"window": 0, "event": event(0)}),
                    timestamp_ms=forwarded_ms),
        FakeMessage(t.windows, 1, 0, encoded("salka.WindowedEvent", {"window": 0, "event": event(1)}),
                    timestamp_ms=forwarded_ms),
        FakeMessage(t.late, 0, 0, encoded("salka.LateEvent", {
            "window": 0, "watermark": 99.0, "lateness_seconds": 9.0, "event": event(2)}),
                    timestamp_ms=forwarded_ms),
        FakeMessage(t.windows, 2, 0, encoded("salka.WindowedEvent", {"window": 1, "event": event(3)}),
                    timestamp_ms=forwarded_ms),
    ]
    started = time.perf_counter()
    for msg in msgs:
        stage.handle(msg, out)
    stage.tick(out)
    metrics.after_batch(runner, msgs, started)

    scores = out.records(t.scores)
    assert [(name, r["late"]) for name, r in scores] == [("salka.ScoredEvent", False)] * 2 + [
        ("salka.ScoredEvent", True)]
    found = samples(metrics.exposition().decode())
    assert value(found, "salka_scorer_events_scored_total") == 3
    assert value(found, "salka_scorer_late_total") == 1
    assert value(found, "salka_scorer_waits_total") == 1
    assert value(found, "salka_scorer_models_refused_total") == 1
    assert value(found, "salka_scorer_waiting_partitions") == 1
    assert stage.consumer.paused == {(t.windows, 2)}
    assert value(found, "salka_scorer_announced_through") == 1
    # scored late events are not "routed to the late topic" (the windower's records_late)
    assert value(found, "salka_scorer_records_late_total", topic=f"{t.windows},{t.late}") == 0
    assert value(found, "salka_scorer_records_in_total", topic=t.windows) == 3
    assert value(found, "salka_scorer_score_latency_seconds_count") == 3  # the waiting one: not yet
    latency = value(found, "salka_scorer_score_latency_seconds_sum")
    assert 3 * 2.0 <= latency < 3 * 60.0, latency
    assert value(found, "salka_scorer_score_latency_seconds_bucket", le="1.0") == 0


def test_metrics_port_is_validated_with_its_key_path():
    result = CliRunner().invoke(cli, ["run", "tokenizer", "--set", "metrics.port=70000"])
    assert result.exit_code == 2
    assert "metrics.port: expected a port in 0..65535" in result.output


# ---------------------------------------------------------------------------- over the broker


@pytest.fixture(scope="module")
def scraped_pipeline(kafka_bootstrap, tmp_path_factory):
    """Every stage as its own process with a metrics port and JSON logs; the log streamed through;
    each stage's exposition scraped once all its input is consumed."""
    tmp = tmp_path_factory.mktemp("metrics")
    log, labels = tmp / "auth.csv", tmp / "labels.csv"
    summary = write_log(GenerateSpec(users=10, computers=24, days=3, events_per_day=300,
                                     redteam_events=6, seed=5), log, labels, header=False)
    lines = log.read_text().splitlines()
    lines[100:100] = ["not,enough,columns", "notatime,U1@D,U1@D,C1,C2,K,N,LogOn,Success"]
    log.write_text("\n".join(lines) + "\n")
    run = uuid.uuid4().hex[:8]
    config, config_path = stream_config(tmp, kafka_bootstrap, {
        "topics": {"partitions": 3, "alerts": f"m{run}.alerts"},
        "alerting": {"window_percentile": 99.0}})  # a few alerts from this small log
    ports = {stage: free_port() for stage in STAGES}
    processes = {}
    logs = tmp / "logs"
    logs.mkdir()
    try:
        for stage in STAGES:
            with open(logs / f"{stage}.log", "ab") as out:
                processes[stage] = subprocess.Popen(
                    [sys.executable, "-m", "pipeline", "--log-format", "json", "run", stage,
                     "--config", str(config_path), "--metrics-port", str(ports[stage]),
                     "--set", "metrics.host=127.0.0.1"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=stage_env())
        for stage in STAGES:  # ready: partitions assigned and the broker answering
            wait_for(lambda s=stage: _ready(ports[s], processes[s]), timeout=90, what=f"{stage} ready")
        produce_file(config, log)
        events, windows = summary["events"], 3
        archive = ArchiveCounter(Path(config.streaming.archive_dir))
        wait_for(lambda: archive.count()[0] >= events, timeout=300, what="every event archived")

        def settled(stage: str, done) -> dict | None:
            found = samples(get(ports[stage], "/metrics")[1])
            lags = [v for (name, _), v in found.items() if name == f"salka_{stage}_consumer_lag"]
            return found if lags and not any(lags) and done(found) else None

        done = {
            "tokenizer": lambda f: _in(f, "tokenizer") >= len(lines) + 3,
            "windower": lambda f: value(f, "salka_windower_windows_closed_total") >= windows,
            "trainer": lambda f: value(f, "salka_trainer_windows_trained_total") >= windows,
            "scorer": lambda f: value(f, "salka_scorer_events_scored_total") >= events,
            "archiver": lambda f: value(f, "salka_archiver_rows_archived_total") >= events,
            "alerter": lambda f: value(f, "salka_alerter_windows_judged_total") >= windows,
        }
        scraped = {stage: wait_for(lambda s=stage: settled(s, done[s]), timeout=120,
                                   what=f"{stage} lag 0") for stage in STAGES}
        texts = {stage: get(ports[stage], "/metrics")[1] for stage in STAGES}
        health = {stage: (get(ports[stage], "/healthz")[0], get(ports[stage], "/readyz")[0])
                  for stage in STAGES}
        # completion records with count 0 (windows closed empty): how many depends on when the
        # watermark first became finite, so they are counted, not assumed
        progress = sum(1 for name, record in read_records(config, config.topics.windows)
                       if name == "salka.WindowComplete" and record["count"] == 0)
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        delete_topics(config)
    yield {"config": config, "scraped": scraped, "texts": texts, "health": health, "logs": logs,
           "events": events, "windows": windows, "progress": progress, "raw": len(lines), "bad": 2,
           "exits": {s: p.returncode for s, p in processes.items()}}


def _ready(port: int, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"stage exited with {process.returncode}")
    try:
        return get(port, "/readyz")[0] == 200
    except OSError:  # not listening yet
        return False


def _in(found: dict, stage: str) -> float:
    return sum(v for (name, _), v in found.items() if name == f"salka_{stage}_records_in_total")


@pytest.mark.slow
def test_stage_counters_match_the_records_they_processed(scraped_pipeline):
    r = scraped_pipeline
    t, f = r["config"].topics, r["scraped"]
    events, windows, partitions = r["events"], r["windows"], t.partitions
    tok = f["tokenizer"]
    assert value(tok, "salka_tokenizer_records_in_total", topic=t.raw) == r["raw"] + partitions
    assert value(tok, "salka_tokenizer_records_dead_lettered_total", topic=t.raw) == r["bad"]
    assert value(tok, "salka_tokenizer_records_out_total", topic=t.dead_letters) == r["bad"]
    assert value(tok, "salka_tokenizer_records_out_total", topic=t.tokens) == events + partitions
    assert value(tok, "salka_tokenizer_events_total") == events
    win = f["windower"]
    assert value(win, "salka_windower_records_in_total", topic=t.tokens) == events + partitions
    assert value(win, "salka_windower_records_out_total", topic=t.windows) == (
        events + windows + r["progress"])
    assert value(win, "salka_windower_open_windows") == 0
    assert value(win, "salka_windower_events_buffered") == 0
    assert value(win, "salka_windower_idle_partitions") == 0  # every partition had events
    assert value(win, "salka_windower_records_late_total", topic=t.tokens) == 0
    tr = f["trainer"]
    assert value(tr, "salka_trainer_records_in_total", topic=t.windows) == (
        events + windows + r["progress"])
    # a completion record per window to the scores topic; the events' scores come from the scorer
    assert value(tr, "salka_trainer_records_out_total", topic=t.scores) == windows
    assert value(tr, "salka_trainer_records_out_total", topic=t.models) >= windows + 1
    assert value(tr, "salka_trainer_events_scored_total") == 0  # kept for dashboards: always 0
    assert value(tr, "salka_trainer_score_latency_seconds_count") == 0
    assert value(tr, "salka_trainer_events_trained_total") == events
    # training.exclude_top_fraction (1% by default) of every window trained after the first
    left_out = value(tr, "salka_trainer_events_left_out_total")
    assert 0 < left_out <= math.ceil(0.01 * events) + windows, left_out
    assert value(tr, "salka_trainer_model_latency_seconds_count") == windows
    assert value(tr, "salka_trainer_window_train_seconds_count") == windows
    assert value(tr, "salka_trainer_checkpoint_seconds_count") >= 1
    assert value(tr, "salka_trainer_model_window") == max(_windows(r["config"]))
    assert 0 < value(tr, "salka_trainer_train_loss") < 20
    sc = f["scorer"]
    assert value(sc, "salka_scorer_records_in_total", topic=t.windows) >= events + windows
    assert value(sc, "salka_scorer_records_out_total", topic=t.scores) == events
    assert value(sc, "salka_scorer_events_scored_total") == events
    assert value(sc, "salka_scorer_late_total") == 0
    assert value(sc, "salka_scorer_models_refused_total") == 0
    assert value(sc, "salka_scorer_waiting_partitions") == 0
    assert value(sc, "salka_scorer_score_latency_seconds_count") == events
    # the last model (trained through the last window) serves no event: the newest one used is
    # the one before it
    assert value(sc, "salka_scorer_model_window") == max(_windows(r["config"])) - 1
    assert value(sc, "salka_scorer_announced_through") >= max(_windows(r["config"]))
    assert value(f["archiver"], "salka_archiver_rows_archived_total") == events
    assert value(f["archiver"], "salka_archiver_late_skipped_total") == 0
    assert value(f["archiver"], "salka_archiver_records_in_total", topic=t.scores) == events + windows
    al = f["alerter"]
    alerts_out = value(al, "salka_alerter_records_out_total", topic=t.alerts)
    by_kind = sum(v for (name, _), v in al.items() if name == "salka_alerter_alerts_total")
    assert by_kind >= alerts_out > 0  # each alert counts under every rule that raised it
    for stage in STAGES:
        found = f[stage]
        lags = {(dict(labels)["topic"], dict(labels)["partition"]): v
                for (name, labels), v in found.items() if name == f"salka_{stage}_consumer_lag"}
        # the scorer reads every windows partition and the late topic's one
        expected = {"tokenizer": partitions, "windower": partitions, "scorer": partitions + 1,
                    "trainer": partitions}.get(stage, 1)
        assert len(lags) == expected and not any(lags.values()), (stage, lags)
        assert value(found, f"salka_{stage}_broker_up") == 1
        assert value(found, f"salka_{stage}_commit_failures_total") == 0
        assert value(found, f"salka_{stage}_delivery_failures_total") == 0
        assert value(found, f"salka_{stage}_batch_processing_seconds_count") >= 1
        assert r["health"][stage] == (200, 200)
    assert all(code == 0 for code in r["exits"].values()), r["exits"]


def _windows(config) -> list[int]:
    return [int(p.name[7:13]) for p in Path(config.streaming.archive_dir).glob("window-*.csv.gz")]


@pytest.mark.slow
def test_dashboard_queries_name_metrics_the_stages_export(scraped_pipeline):
    exported = set().union(*(exposed_names(text) for text in scraped_pipeline["texts"].values()))
    missing = sorted(dashboard_metric_names() - exported)
    assert not missing, f"dashboard metrics not exported: {missing}"


@pytest.mark.slow
def test_stage_json_logs_parse_line_by_line(scraped_pipeline):
    fields = set()
    for stage in STAGES:
        text = (scraped_pipeline["logs"] / f"{stage}.log").read_text()
        entries = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert entries, stage
        for entry in entries:
            assert entry["stage"] == stage and entry["level"] and entry["time"]
            assert isinstance(entry["message"], str)
        fields |= {k for entry in entries for k in entry}
        assert any("stopped cleanly" in e["message"] for e in entries), stage
    assert {"window", "partition", "offset", "topic"} <= fields
