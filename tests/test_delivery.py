"""Delivery options against a real broker: the exactly-once (transactional) commit path."""

from __future__ import annotations

import re
import uuid

import pytest
from confluent_kafka import TopicPartition
from helpers import delete_topics, read_records, stream_config, wait_for

from pipeline.demo import StageProcesses
from pipeline.kafka import make_consumer
from pipeline.produce import produce_file


def committed_offsets(config, group_stage: str, topic: str, partitions: int) -> list[int]:
    consumer = make_consumer(config, group_stage, **{"client.id": f"check-{uuid.uuid4().hex[:6]}"})
    try:
        return [tp.offset for tp in consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=30)]
    finally:
        consumer.close()


@pytest.mark.slow
def test_exactly_once_tokenizer_commits_offsets_inside_its_transactions(kafka_bootstrap, tmp_path):
    config, config_path = stream_config(
        tmp_path, kafka_bootstrap,
        {"topics": {"partitions": 2}, "streaming": {"delivery": "exactly_once"}})
    log = tmp_path / "log.csv"
    rows = [f"{t},U{t % 5}@DOM1,U{t % 5}@DOM1,C{t % 7},C2,Kerberos,Network,LogOn,Success"
            for t in range(0, 3000, 10)]
    log.write_text("\n".join(rows + ["a malformed line"]) + "\n")
    stages = StageProcesses(config_path, tmp_path / "logs")
    try:
        stages.start("tokenizer")
        report = produce_file(config, log)
        # read_committed (librdkafka's default): only records of committed transactions
        tokens = read_records(config, config.topics.tokens, expected=len(rows))
        dead = read_records(config, config.topics.dead_letters, expected=1)
        wait_for(lambda: sum(committed_offsets(config, "tokenizer", config.topics.raw, 2))
                 >= report.records + 2, 60, what="the tokenizer's offsets committed")
    finally:
        stages.stop()
    log_text = (tmp_path / "logs" / "tokenizer-0.log").read_text()
    # read before the topics go: deleting a topic drops its committed offsets too
    committed = sum(committed_offsets(config, "tokenizer", config.topics.raw, 2))
    delete_topics(config)
    assert len(tokens) == len(rows) and {name for name, _ in tokens} == {"salka.TokenizedEvent"}
    assert len(dead) == 1 and dead[0][1]["reason"].startswith("expected 9 CSV columns")
    # every raw record (and the two end-of-input markers) consumed and committed, through
    # send_offsets_to_transaction: the group's committed offsets are the partitions' ends
    assert committed == report.records + 2
    assert "transaction failed" not in log_text
    assert "exactly-once delivery, transactional.id" in log_text
    assert re.search(r"stopped cleanly after \d+ records in [1-9]\d* transactions", log_text)
