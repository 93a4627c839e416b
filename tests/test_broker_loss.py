"""A broker that lost data is said, not waited on: a restarted in-memory broker (its topics
recreated, offsets back at 0) stops a running stage, and a restarted stage, with a clear "lost
data" error; topics auto-created with other partition counts are refused at start-up; the audit
says a topic is missing instead of waiting for it; `pipeline broker` says whether its storage is
durable.

The restart tests start their own embedded broker on a fixed port and are skipped against an
external cluster (KAFKA_BOOTSTRAP_SERVERS), which a test cannot restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from helpers import stream_config, wait_for

from pipeline.broker import EmbeddedBroker, free_port
from pipeline.brokerwatch import TopicState, partition_mismatches, positions_past_end, topic_problems
from pipeline.config import config_from_dict, config_to_dict
from pipeline.generate import GenerateSpec, write_log
from pipeline.kafka import create_topics
from pipeline.produce import produce_file

ROOT = Path(__file__).resolve().parent.parent
embedded_only = pytest.mark.skipif(bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")),
                                   reason="restarts the broker: embedded broker only")
LOST = "lost data"


@pytest.mark.parametrize("seen, known, expected", [
    ({"raw": TopicState("A", 3)}, {"raw": "A"}, []),
    ({"raw": TopicState("A", 3)}, {}, []),  # first sight: remembered, nothing to compare
    ({"raw": None}, {}, []),  # not created yet: the stage waits for create-topics
    ({"raw": None}, {"raw": "A"}, ["topic raw no longer exists"]),
    ({"raw": TopicState("B", 3)}, {"raw": "A"}, ["topic raw was deleted and created again"]),
    ({"raw": TopicState("A", 4)}, {}, []),  # another partition count: not a loss (below)
    ({"raw": TopicState(None, 3)}, {"raw": "A"}, []),  # a broker without topic ids
], ids=["same", "new", "absent", "gone", "recreated", "auto-created", "no-ids"])
def test_topic_problems(seen, known, expected):
    problems = topic_problems({"raw": 3}, seen, known)
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected):
        assert problem.startswith(start), problem


def test_partition_mismatches_name_each_topic_whose_count_is_not_the_configs():
    seen = {"raw": TopicState("A", 4), "tokens": TopicState("B", 3), "windows": None}
    assert partition_mismatches({"raw": 3, "tokens": 3, "windows": 3}, seen) == [("raw", 4, 3)]


def test_a_mismatch_of_a_one_partition_topic_is_not_fixed_by_topics_partitions():
    # The broker auto-created every topic with 6 partitions and topics.partitions is 6: the
    # models topic should have one, and no topics.partitions fixes that.
    from pipeline.brokerwatch import TopicsMismatch

    line = TopicsMismatch("trainer", [("salka.models", 6, 1)], configured=6).format_message()
    assert "set topics.partitions" not in line and "delete them and run `pipeline create-topics`" in line
    line = TopicsMismatch("tokenizer", [("salka.raw", 2, 3), ("salka.tokens", 2, 3)], 3).format_message()
    assert "set topics.partitions to 2, or" in line


def test_positions_past_end():
    rows = [("t", 0, 100, 100), ("t", 1, -1001, 5), ("t", 2, 7, -1001), ("t", 3, 100, 0)]
    assert positions_past_end(rows) == ["t[3] ends at offset 0 but this stage already read up to 100"]


def command_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def start_stage(stage: str, config_path: Path, out: Path, env: dict | None = None) -> subprocess.Popen:
    with open(out, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "run", stage, "--config",
                                 str(config_path)], stdout=handle, stderr=subprocess.STDOUT,
                                env=env or command_env(), cwd=ROOT)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def test_broker_command_says_whether_its_storage_is_durable():
    port = free_port()
    broker = subprocess.Popen([sys.executable, "-m", "pipeline", "broker", "--port", str(port)],
                              stderr=subprocess.PIPE, text=True, env=command_env(), cwd=ROOT)
    try:
        line = broker.stderr.readline()
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(20)
    from pipeline.broker import port_in_use
    assert not port_in_use(port), "the command left a broker running after it stopped"
    assert f"127.0.0.1:{port}" in line
    assert "memory://tansu/ is not durable: data is lost when the broker stops" in line


@pytest.mark.slow
def test_stage_refuses_topics_with_other_partition_counts(tmp_path, kafka_bootstrap):
    """As when the broker auto-created the topics before `pipeline create-topics` ran."""
    config, _ = stream_config(tmp_path, kafka_bootstrap, {"topics": {"partitions": 2}})
    data = config_to_dict(config)
    data["topics"]["partitions"] = 3
    path = tmp_path / "three.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config_from_dict(data))))
    out = tmp_path / "tokenizer.log"
    stage = start_stage("tokenizer", path, out, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        code = stage.wait(60)
    finally:
        stop(stage)
    text = out.read_text()
    assert code == 2, text  # a config problem
    [line] = [x for x in text.splitlines() if x.startswith("Error:")]
    assert f"topic {config.topics.raw} has 2 partitions where the config says 3" in line
    # A config that does not match the topics: nothing is lost, and nothing should be deleted
    # but, at most, the topics the broker made on its own.
    assert "set topics.partitions to 2, or" in line and LOST not in line
    assert "delete streaming.state_dir" not in line
    assert "Traceback" not in text


def small_log(tmp_path: Path) -> Path:
    log = tmp_path / "auth.csv"
    write_log(GenerateSpec(users=5, computers=20, days=1, events_per_day=300, redteam_events=0,
                           seed=3), log, tmp_path / "labels.csv")
    return log


@pytest.mark.slow
@embedded_only
def test_running_stage_stops_when_the_in_memory_broker_restarts(tmp_path):
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    stage = None
    try:
        config, path = stream_config(tmp_path, broker.bootstrap)
        log = small_log(tmp_path)
        out = tmp_path / "tokenizer.log"
        stage = start_stage("tokenizer", path, out)
        wait_for(lambda: "assigned" in out.read_text(), 60, what="the tokenizer to join")
        produce_file(config, log, end_marker=False)
        time.sleep(2)
        broker.kill()
        broker = EmbeddedBroker(port=port).start()
        produce_file(config, log, end_marker=False)  # output it will never see acknowledged
        started = time.monotonic()
        code = stage.wait(90)
        seconds = time.monotonic() - started
    finally:
        if stage is not None:
            stop(stage)
        broker.stop()
    text = out.read_text()
    assert code == 1, text
    assert f"the Kafka broker at 127.0.0.1:{port} {LOST}" in text
    assert "Traceback" not in text
    print(f"stage stopped {seconds:.1f}s after the restart")


@pytest.mark.slow
@embedded_only
def test_restarted_stage_notices_topics_recreated_while_it_was_down(tmp_path):
    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    try:
        config, path = stream_config(tmp_path, broker.bootstrap)
        out = tmp_path / "tokenizer.log"
        stage = start_stage("tokenizer", path, out)
        try:
            wait_for(lambda: "started" in out.read_text(), 60, what="the tokenizer to start")
            stage.send_signal(signal.SIGTERM)
            assert stage.wait(30) == 0, out.read_text()
        finally:
            stop(stage)
        broker.kill()
        broker = EmbeddedBroker(port=port).start()
        create_topics(config)  # fresh topics, right partition counts, other ids
        stage = start_stage("tokenizer", path, out)
        try:
            code = stage.wait(60)
        finally:
            stop(stage)
    finally:
        broker.stop()
    text = out.read_text()
    assert code == 1, text
    assert LOST in text and "was deleted and created again" in text
    assert "Traceback" not in text


@embedded_only
def test_audit_after_an_in_memory_restart_says_the_topic_is_gone(tmp_path):
    from pipeline.cli import cli

    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    try:
        config, path = stream_config(tmp_path, broker.bootstrap)
        broker.kill()
        broker = EmbeddedBroker(port=port).start()
        started = time.monotonic()
        result = CliRunner().invoke(cli, ["audit", "--config", str(path)],
                                    env={"KAFKA_BOOTSTRAP_SERVERS": None})
        seconds = time.monotonic() - started
    finally:
        broker.stop()
    assert result.exit_code == 1, result.output
    assert (f"topic {config.topics.raw} does not exist on the Kafka broker at 127.0.0.1:{port}"
            in result.output)
    assert seconds < 20, seconds
