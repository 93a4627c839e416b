"""``pipeline status``: committed offsets, end offsets and lag per stage group, and the last
trained window; over the embedded broker (or KAFKA_BOOTSTRAP_SERVERS)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from helpers import delete_topics, stream_config, wait_for

from pipeline.broker import free_port
from pipeline.cli import cli
from pipeline.config import config_from_dict
from pipeline.demo import ArchiveCounter, StageProcesses
from pipeline.generate import GenerateSpec, write_log
from pipeline.kafka import make_admin, make_producer
from pipeline.produce import produce_file
from pipeline.scorefile import read_scores
from pipeline.status import (
    PartitionLag,
    StatusReport,
    collect,
    format_report,
    last_checkpoint,
    partition_lag,
    stage_inputs,
)


def status_json(config_path: Path) -> dict:
    result = CliRunner().invoke(cli, ["status", "--config", str(config_path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


# ---------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("committed, start, end, lag", [
    (None, 0, 10, 10),  # nothing committed: the stage would read the whole partition
    (None, 4, 10, 6),  # ... from its first offset still there
    (7, 0, 10, 3),
    (10, 0, 10, 0),
    (2, 5, 10, 5),  # committed offset deleted by retention: reads from the start
    (12, 0, 10, 0),  # never negative
])
def test_partition_lag(committed, start, end, lag):
    assert partition_lag(committed, start, end) == lag


def test_last_checkpoint_is_the_highest_window_by_file_name(tmp_path):
    assert last_checkpoint(tmp_path / "absent").window is None
    for name in ("checkpoint-000000000007.pt", "checkpoint-000000000012.pt",
                 "checkpoint-000000000009.pt", "checkpoint-000000000099.pt.tmp", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    model = last_checkpoint(tmp_path)
    assert (model.window, model.checkpoint, model.checkpoints) == (12, "checkpoint-000000000012.pt", 3)
    assert model.saved_at and model.saved_at.endswith("+00:00")


def test_stage_inputs_are_the_topics_each_stage_reads(tmp_path):
    from pipeline.cli import STAGES, make_stage

    config = config_from_dict({"streaming": {"state_dir": str(tmp_path / "state")}})
    inputs = stage_inputs(config)
    assert set(inputs) == set(STAGES)
    for stage in STAGES:
        assert inputs[stage] == make_stage(stage, config).topics(), stage


def test_text_report_names_every_group_and_marks_uncommitted_ones():
    from pipeline.status import GroupStatus, ModelStatus

    groups = [GroupStatus("tokenizer", "p.tokenizer", [PartitionLag("raw", 0, 0, 50, 20),
                                                       PartitionLag("raw", 1, 0, 40, 40)], [], "Stable", 2),
              GroupStatus("windower", "p.windower", [PartitionLag("tokens", 0, 0, 9, None, exact=False)],
                          ["tokens2"])]
    text = format_report(StatusReport("h:9092", groups, ModelStatus("st/trainer", 3, "c.pt", "t", 1)))
    assert "total lag 39 record(s)" in text
    assert "lag 30" in text and "2 member(s), Stable" in text
    assert "no offsets committed yet" in text and "topic tokens2 does not exist" in text
    assert "~9" in text and "trained through window 3" in text


# ---------------------------------------------------------------------------- over the broker


def test_unreachable_broker_is_one_line_and_exit_1():
    result = CliRunner().invoke(cli, ["status", "--set", f"kafka.bootstrap.servers=127.0.0.1:{free_port()}"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: cannot reach the Kafka broker at 127.0.0.1:")
    assert "Traceback" not in result.output


def test_end_offsets_are_the_real_ends_not_the_brokers_latest_answer(kafka_bootstrap, tmp_path):
    """Committed offsets set through the admin API; ends from fetch responses. On the embedded
    broker a "latest" ListOffsets answer is the start of the last batch + 1: here it would be
    below 500 on both partitions, and the lags wrong."""
    config, config_path = stream_config(tmp_path, kafka_bootstrap, {"topics": {"partitions": 2}})
    try:
        producer = make_producer(config)
        for i in range(1000):
            producer.produce(config.topics.raw, b"x" * 20, partition=i % 2)
            if i % 150 == 0:
                producer.flush()  # several batches per partition
        assert producer.flush(30) == 0
        group = f"{config.streaming.group_prefix}.tokenizer"
        admin = make_admin(config)  # kept referenced until the answer came
        (future,) = admin.alter_consumer_group_offsets([ConsumerGroupTopicPartitions(
            group, [TopicPartition(config.topics.raw, 0, 120), TopicPartition(config.topics.raw, 1, 500)])
        ]).values()
        future.result()
        report = status_json(config_path)
    finally:
        delete_topics(config)
    groups = {g["stage"]: g for g in report["groups"]}
    raw = {p["partition"]: p for p in groups["tokenizer"]["partitions"]}
    assert [(raw[p]["committed"], raw[p]["end"], raw[p]["lag"], raw[p]["exact"]) for p in (0, 1)] == [
        (120, 500, 380, True), (500, 500, 0, True)]
    assert groups["tokenizer"]["lag"] == 380
    assert groups["windower"]["partitions"][0]["committed"] is None  # never ran
    assert report["model"]["window"] is None
    assert report["announced"] is None  # no trainer ran: nothing announced


@pytest.mark.slow
def test_after_a_finished_streaming_run_every_group_has_lag_0(kafka_bootstrap, tmp_path):
    config, config_path = stream_config(tmp_path, kafka_bootstrap, {"topics": {"partitions": 2}})
    log, labels = tmp_path / "auth.csv", tmp_path / "labels.csv"
    write_log(GenerateSpec(users=8, computers=20, days=3, events_per_day=300, redteam_events=4,
                           seed=5), log, labels)
    stages = StageProcesses(config_path, tmp_path / "logs")
    try:
        for stage in ("tokenizer", "windower", "trainer", "scorer", "archiver", "alerter"):
            stages.start(stage)
        report = produce_file(config, log)
        archive = Path(config.streaming.archive_dir)
        wait_for(lambda: (archive.exists() and ArchiveCounter(archive).count()[0] >= report.records)
                 or stages.dead(), 180, what="every event archived")
        assert not stages.dead(), stages.dead()
        # the alerter (and every commit) may trail the archive by a moment
        wait_for(lambda: collect(config).total_lag == 0 or stages.dead(), 60, what="lag 0")
    finally:
        stages.stop()
    try:
        status = status_json(config_path)  # after a clean stop: the final commits
    finally:
        delete_topics(config)
    groups = {g["stage"]: g for g in status["groups"]}
    assert set(groups) == {"tokenizer", "windower", "trainer", "scorer", "archiver", "alerter"}
    for stage, group in groups.items():
        assert group["partitions"], stage
        for part in group["partitions"]:
            if part["topic"] == config.topics.late:  # the scorers' second input: empty here
                assert stage == "scorer" and part["end"] == 0, (stage, part)
                assert part["committed"] in (None, 0) and not part["lag"], (stage, part)
                continue
            assert part["exact"], (stage, part)
            assert part["committed"] == part["end"] and part["lag"] == 0, (stage, part)
        assert group["lag"] == 0
    assert status["total_lag"] == 0
    # the ends are the real ones: every produced record plus one end marker per raw partition
    raw_end = sum(p["end"] for p in groups["tokenizer"]["partitions"])
    assert raw_end == report.records + config.topics.partitions
    windows = {int(r["window"]) for r in read_scores(Path(config.streaming.archive_dir))}
    assert status["model"]["window"] == max(windows)
    assert status["model"]["checkpoint"] == f"checkpoint-{max(windows):012d}.pt"
    assert os.path.isdir(status["model"]["directory"])
    # the newest model announced to the scorers: trained through the last window, in the store
    announced = status["announced"]
    assert announced["trained_through"] == max(windows)
    assert announced["serves_through"] == max(windows) + 1
    assert os.path.isfile(announced["url"]) and announced["url"].startswith(status["model_store"])


def test_the_scorers_line_says_which_model_serves_the_newest_windows():
    from pipeline.status import announced_line

    assert announced_line(None, "/s/models") == "scorers: no model announced yet (model store /s/models)"
    record = {"trained_through": 7, "serves_through": 9, "url": "/s/models/model-7.pt"}
    assert announced_line(record, "/s/models") == (
        "scorers: the model trained through window 7 scores windows up to 9 (/s/models/model-7.pt); "
        "model store /s/models")
    first = {"trained_through": None, "serves_through": 3, "url": None}
    assert announced_line(first, "s3://b/m").startswith("scorers: no model yet (empty losses) scores "
                                                         "windows up to 3; model store s3://b/m")
