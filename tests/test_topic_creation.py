"""``pipeline produce`` and ``pipeline create-topics`` over a real broker: salka's topics are
made with the config's partition counts before the first record, and a topic with another
count is one line and exit 1, before anything is written (the stages would refuse it later,
with advice that did not fix it)."""

from __future__ import annotations

import dataclasses

from helpers import TOPIC_ROLES, invoke, stream_config

from pipeline.config import config_to_dict
from pipeline.kafka import make_admin, partition_count, topic_plan
from pipeline.topicread import TopicReader


def saved(config, path):
    import yaml

    path.write_text(yaml.safe_dump(config_to_dict(config)))
    return path


def read_all(config, topic: str) -> list:
    with TopicReader(config, [topic], "check") as reader:
        records = []
        while not reader.at_end:
            records += reader.poll()
    return records


def test_produce_makes_the_topics_first_and_refuses_a_partition_count_the_config_does_not_say(
        kafka_bootstrap, tmp_path):
    config, _ = stream_config(tmp_path, kafka_bootstrap)  # its topics exist: 3 partitions each
    log = tmp_path / "log.csv"
    log.write_text("".join(f"{t},U1@D,U1@D,C1,C2,Kerberos,Network,LogOn,Success\n" for t in range(5)))
    fresh = dataclasses.replace(config, topics=dataclasses.replace(
        config.topics, **{role: f"{getattr(config.topics, role)}-fresh" for role in TOPIC_ROLES}))
    result = invoke("produce", "--config", saved(fresh, tmp_path / "fresh.yaml"), "--input", log)
    assert result.exit_code == 0, result.output
    assert f"produce: created the missing topics {fresh.topics.raw}" in result.output
    admin = make_admin(fresh)
    for name, parts in topic_plan(fresh).items():
        assert partition_count(admin, name) == parts, name
    # streaming.end_of_input: false (a shared bus): produce sends no end-of-input records
    result = invoke("produce", "--config", tmp_path / "fresh.yaml", "--input", log,
                    "--set", "streaming.end_of_input=false")
    assert result.exit_code == 0, result.output
    assert len(read_all(fresh, fresh.topics.raw)) == 2 * 5 + 3  # one end-of-input per partition, once
    try:
        five = dataclasses.replace(config, topics=dataclasses.replace(config.topics, partitions=5))
        five_path = saved(five, tmp_path / "five.yaml")
        for args in (["create-topics"], ["produce", "--input", log]):
            result = invoke(args[0], "--config", five_path, *args[1:])
            assert result.exit_code == 1, result.output
            assert (f"Error: topic {config.topics.raw} has 3 partitions where the config says 5 "
                    f"(topics.partitions)") in result.output
        assert read_all(config, config.topics.raw) == []  # nothing was written
    finally:
        admin.delete_topics(list(topic_plan(fresh)), operation_timeout=10)
