"""A broker outage mid-run: the embedded broker on durable storage (Tansu s3:// against a local
moto server) is SIGKILLed and restarted while every stage runs. Nothing is lost or duplicated,
no stage dies, and the scores equal an uninterrupted replay.

Only with the embedded broker: an external cluster (KAFKA_BOOTSTRAP_SERVERS) cannot be killed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import read_records, wait_for

from pipeline.audit import audit
from pipeline.demo import ArchiveCounter, StageProcesses
from pipeline.generate import GenerateSpec, write_log
from pipeline.produce import produce_file
from pipeline.replay import replay
from pipeline.scorefile import read_scores

pytestmark = pytest.mark.skipif(bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS")),
                                reason="kills the broker: embedded broker only")


@pytest.mark.slow
def test_stages_ride_out_a_broker_restart(tmp_path):
    import yaml

    from pipeline.broker import DurableBroker
    from pipeline.config import config_from_dict, config_to_dict
    from pipeline.kafka import create_topics

    log, labels = tmp_path / "auth.csv", tmp_path / "labels.csv"
    write_log(GenerateSpec(users=10, computers=30, days=3, events_per_day=600, redteam_events=0,
                           seed=9), log, labels)
    times = [int(line.split(",")[0]) for line in log.read_text().splitlines()[1:]]
    broker = DurableBroker(tmp_path)
    try:
        config = config_from_dict({
            "kafka": {"bootstrap.servers": broker.bootstrap, "linger.ms": 50, "fetch.wait.max.ms": 200},
            "model": {"rnn": {"hidden_size": 32}},
            "streaming": {"state_dir": str(tmp_path / "state"), "archive_dir": str(tmp_path / "archive"),
                          "commit_interval_seconds": 0.5},
        })
        config_path = tmp_path / "config.yaml"
        config_path.write_text(yaml.safe_dump(config_to_dict(config)))
        create_topics(config)
        stages = StageProcesses(config_path, tmp_path / "logs")
        archive = Path(config.streaming.archive_dir)
        try:
            for stage in ("tokenizer", "windower", "trainer", "scorer", "archiver"):
                stages.start(stage)
            half = 2 + sum(1 for t in times if t < 86400 + 43200)
            produce_file(config, log, lines=range(1, half), end_marker=False)
            wait_for(lambda: (archive / "window-000000.csv.gz").exists(), 120, what="window 0 archived")
            broker.restart(2.0)
            time.sleep(1.0)
            produce_file(config, log, lines=range(half, len(times) + 2))
            wait_for(lambda: ArchiveCounter(archive).count()[0] >= len(times) or stages.dead(), 240,
                     what="every event archived after the restart")
            assert not stages.dead(), stages.dead()
            report = audit(config)
            late = read_records(config, config.topics.late, timeout=10)
        finally:
            stages.stop()
        assert all(p.returncode == 0 for _, p in stages.processes)  # clean exits, no crash
    finally:
        broker.stop()
    print(report.format())
    assert report.ok and report.total.archived == len(times) and not late
    replay_out = tmp_path / "replay.csv.gz"
    replay(log, replay_out, config, progress=False)
    expected = {r["line"]: r["loss"] for r in read_scores(replay_out)}
    got = {r["line"]: r["loss"] for r in read_scores(archive)}
    assert got.keys() == expected.keys()
    assert all((got[k] == "") == (expected[k] == "") for k in got)
    assert max(abs(float(got[k]) - float(expected[k])) for k in got if got[k]) <= 1e-5
    logs = " ".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "Connection refused" in logs or "Disconnected" in logs  # the outage was seen


@pytest.mark.slow
def test_records_the_broker_acknowledged_and_lost_are_caught(tmp_path):
    """An idempotent producer writes without pause while the durable broker is SIGKILLed and
    restarted, three times. Tansu has answered retried batches as duplicates and never stored
    them (at every one of 8 restarts on an idle machine, at none of 5 under a test run's load;
    librdkafka reports them delivered without an offset or at offsets counted from 0): every
    record the tracker did not flag must be stored, so a stage never commits past a lost one
    (it starts over from its last commit instead). Skipped when the broker lost nothing."""
    import threading
    import uuid

    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    from pipeline.broker import DurableBroker
    from pipeline.kafka import DeliveryTracker

    broker = DurableBroker(tmp_path)
    try:
        topic = f"acks-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
        tracker = DeliveryTracker(in_order=True)
        unflagged, flagged = {}, {}  # value -> acknowledged offset

        def delivered(err, msg) -> None:
            before = len(tracker.failures)
            tracker(err, msg)
            if err is None:
                (flagged if len(tracker.failures) > before else unflagged)[int(msg.value())] = msg.offset()

        producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True,
                             "acks": "all", "linger.ms": 20, "message.timeout.ms": 120_000})
        stop = threading.Event()

        def write() -> None:
            n = 0
            while not stop.is_set():
                try:
                    producer.produce(topic, str(n).encode(), on_delivery=delivered)
                    n += 1
                except BufferError:
                    pass
                producer.poll(0)
                time.sleep(0.0002)  # batches in flight at every moment, with the GIL to spare

        writer = threading.Thread(target=write)
        writer.start()
        try:
            for _ in range(3):
                time.sleep(3)
                broker.restart(2.0)
            time.sleep(3)
        finally:
            stop.set()
            writer.join()
        assert producer.flush(120) == 0
        reader = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"check-{topic}"})
        reader.assign([TopicPartition(topic, 0, 0)])
        stored, idle = set(), time.monotonic()
        while time.monotonic() - idle < 5:
            msg = reader.poll(0.2)
            if msg is not None and not msg.error():
                stored.add(int(msg.value()))
                idle = time.monotonic()
        reader.close()
    finally:
        broker.stop()
    print(f"{len(unflagged)} acknowledged in order, {len(flagged)} flagged, "
          f"{len(set(flagged) - stored)} of those lost")
    assert len(unflagged) > 1000  # control: it wrote across the restarts
    assert sorted(set(unflagged) - stored) == []
    if not set(flagged) - stored:
        pytest.skip("the broker lost no acknowledged record this run: the check was not exercised")
