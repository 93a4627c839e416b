"""No reachable broker (a free, closed port): every command that needs one says so once, in one
line, after a few seconds. One-shot commands exit 1; a stage keeps retrying quietly, says when
the broker is back, and stops on SIGTERM. These tests need no broker of their own, so they run
the same when KAFKA_BOOTSTRAP_SERVERS names an external cluster (the variable is removed from
the commands' environment so that the closed port is what they try)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import LANL_LINE, wait_for

from pipeline.broker import EmbeddedBroker, free_port
from pipeline.brokerwatch import RepeatFilter
from pipeline.config import config_from_dict, config_to_dict

ROOT = Path(__file__).resolve().parent.parent


def message(port: int) -> str:
    return (f"cannot reach the Kafka broker at 127.0.0.1:{port}: is it running? set "
            f"KAFKA_BOOTSTRAP_SERVERS or kafka.bootstrap.servers")


def closed_port_config(tmp_path: Path) -> tuple[int, Path]:
    port = free_port()
    config = config_from_dict({
        "kafka": {"bootstrap.servers": f"127.0.0.1:{port}"},
        "streaming": {"state_dir": str(tmp_path / "state"), "archive_dir": str(tmp_path / "archive")},
    })
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return port, path


def command_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def pipeline_command(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, env=command_env(), cwd=ROOT, timeout=120)
    return done, time.monotonic() - started


def assert_one_clear_line(done: subprocess.CompletedProcess, port: int, seconds: float) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert output.count(message(port)) == 1, output
    assert f"Error: {message(port)}" in done.stderr
    assert "Traceback" not in output
    assert output.count("Connection refused") <= 2, output  # librdkafka's lines, rate-limited
    assert seconds < 60, seconds  # a few seconds' wait plus interpreter start-up


@pytest.mark.parametrize("args", [
    ["create-topics"],  # the fast suite keeps one; each takes the few seconds' wait
    pytest.param(["produce", "--input", "LOG"], marks=pytest.mark.slow),
    pytest.param(["audit"], marks=pytest.mark.slow),
], ids=["create-topics", "produce", "audit"])
def test_one_shot_command_says_so_once_and_exits_1(tmp_path, args):
    port, config = closed_port_config(tmp_path)
    log = tmp_path / "auth.csv"
    log.write_text(LANL_LINE + "\n")
    args = [str(log) if a == "LOG" else a for a in args]
    done, seconds = pipeline_command(*args, "--config", str(config))
    assert_one_clear_line(done, port, seconds)


def test_audit_of_a_demo_workdir_whose_broker_stopped(tmp_path):
    """`pipeline audit --workdir demo` after the demo: its embedded broker is gone with it."""
    from pipeline.demo import effective_config

    port = free_port()
    workdir = tmp_path / "demo"
    (workdir / "archive").mkdir(parents=True)
    effective_config(config_from_dict({}), workdir, f"127.0.0.1:{port}")
    done, seconds = pipeline_command("audit", "--workdir", str(workdir))
    assert_one_clear_line(done, port, seconds)


def test_repeat_filter_lets_one_connection_error_through_per_broker_and_period():
    logger = logging.getLogger("test-repeat-filter")
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Collect())
    logger.addFilter(RepeatFilter(every=0.5))
    fail = "[thrd:127.0.0.1:9/bootstrap]: 127.0.0.1:9/bootstrap: Connect to 127.0.0.1:9 failed"
    for _ in range(50):
        logger.error("%s [%s] %s", "FAIL", "rdkafka#consumer-1", fail)
    logger.error("%s [%s] %s", "FAIL", "rdkafka#consumer-1", fail.replace(":9", ":10"))
    logger.info("%s [%s] %s", "PARTCNT", "rdkafka#consumer-1", "partition count changed")
    logger.info("%s [%s] %s", "PARTCNT", "rdkafka#consumer-1", "partition count changed")
    assert len(seen) == 4  # one per broker, other facilities untouched
    time.sleep(0.6)
    logger.error("%s [%s] %s", "FAIL", "rdkafka#consumer-1", fail)
    assert len(seen) == 5  # after the period, said again


def test_a_tls_or_sasl_failure_is_named_in_the_unreachable_line(monkeypatch):
    from pipeline import brokerwatch

    failures = brokerwatch.ConnectionFailures()
    monkeypatch.setattr(brokerwatch, "CONNECTION_FAILURES", failures)
    record = logging.LogRecord("librdkafka", logging.ERROR, "", 0, "%s [%s] %s", (
        "FAIL", "rdkafka#producer-1", "[thrd:sasl_ssl://kafka:9093/1]: sasl_ssl://kafka:9093/1: SASL "
        "authentication error: Authentication failed: Invalid username or password (after 5ms in "
        "state AUTH_REQ)"), None)
    assert failures.filter(record) is True  # recorded, never dropped
    line = brokerwatch.unreachable_message("kafka:9093")
    assert line == ("cannot connect to the Kafka broker at kafka:9093: SASL authentication error: "
                    "Authentication failed: Invalid username or password; check kafka.sasl.mechanism, "
                    "kafka.sasl.username and kafka.sasl.password, and kafka.security.protocol")
    refused = logging.LogRecord("librdkafka", logging.ERROR, "", 0, "%s [%s] %s", (
        "FAIL", "rdkafka#producer-1", "[thrd:kafka:9093/1]: kafka:9093/1: Connect to ipv4#10.0.0.1:9093 "
        "failed: Connection refused (after 0ms in state CONNECT)"), None)
    failures.clear()  # a broker answered since: the SASL failure explains nothing to come
    assert brokerwatch.unreachable_message("kafka:9093").startswith("cannot reach the Kafka broker")
    failures.filter(refused)  # a broker that is down: the usual line
    usual = "is it running? set KAFKA_BOOTSTRAP_SERVERS or kafka.bootstrap.servers"
    assert brokerwatch.unreachable_message("kafka:9093").endswith(usual)


@pytest.mark.skipif(bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")),
                    reason="what a cluster answers a SASL client on a plaintext listener varies; "
                           "the embedded broker refuses the handshake")
def test_a_command_with_sasl_settings_the_broker_refuses_says_why(tmp_path):
    with EmbeddedBroker() as broker:
        done, seconds = pipeline_command(
            "status", "--set", f"kafka.bootstrap.servers={broker.bootstrap}",
            "--set", "kafka.security.protocol=SASL_PLAINTEXT", "--set", "kafka.sasl.mechanism=PLAIN",
            "--set", "kafka.sasl.username=operator", "--set", "kafka.sasl.password=not-the-password")
    assert done.returncode == 1
    [line] = done.stderr.strip().splitlines()  # one line: the client's own lines are not printed
    assert line.startswith(f"Error: cannot connect to the Kafka broker at {broker.bootstrap}: SASL")
    assert "check kafka.sasl.mechanism, kafka.sasl.username and kafka.sasl.password" in line
    assert "not-the-password" not in done.stderr + done.stdout and "Traceback" not in done.stderr


@pytest.mark.slow
def test_stage_says_so_once_keeps_running_and_says_when_the_broker_is_back(tmp_path):
    port, config = closed_port_config(tmp_path)
    out = tmp_path / "stage.log"
    with open(out, "wb") as handle:
        stage = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "tokenizer",
                                  "--config", str(config)], stdout=handle, stderr=subprocess.STDOUT,
                                 env=command_env(), cwd=ROOT)
    broker = None
    try:
        wait_for(lambda: message(port) in out.read_text(), 90, what="the unreachable line")
        time.sleep(8)  # retrying quietly: still running, nothing said again
        text = out.read_text()
        assert stage.poll() is None, text
        assert text.count(message(port)) == 1, text
        assert text.count("Connection refused") <= 2, text
        broker = EmbeddedBroker(port=port).start()
        wait_for(lambda: "is reachable again" in out.read_text(), 60, what="the broker-back line")
        stage.send_signal(signal.SIGTERM)
        assert stage.wait(30) == 0, out.read_text()
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait()
        if broker is not None:
            broker.stop()
    assert "Traceback" not in out.read_text()
