"""``pipeline produce`` and ``pipeline create-topics`` over a real broker: salka's topics are
made with the config's partition counts before the first record, and a topic with another
count is one line and exit 1, before anything is written (the stages would refuse it later,
with advice that did not fix it)."""

from __future__ import annotations

import dataclasses
import re
import signal
import subprocess
import sys
import time

from helpers import ROOT, TOPIC_ROLES, invoke, stream_config

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
    # the raw and dead-letter topics only (where produce writes): a producer may be allowed no more
    assert f"produce: created the missing topics {fresh.topics.raw}\n" in result.output
    assert f"produce: created the missing topics {fresh.topics.dead_letters}\n" in result.output
    admin = make_admin(fresh)
    assert partition_count(admin, fresh.topics.raw) == fresh.topics.partitions == 3
    assert partition_count(admin, fresh.topics.dead_letters) == 1
    assert fresh.topics.tokens not in admin.list_topics(timeout=10).topics
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


def test_produce_interrupted_flushes_what_it_sent_and_says_how_far_it_got(kafka_bootstrap, tmp_path):
    """Ctrl-C during `produce --rate` printed "Aborted!" (exit 1), dropped the records still
    queued in the client and did not say how far it had got."""
    config, config_path = stream_config(tmp_path, kafka_bootstrap)
    log = tmp_path / "log.csv"
    log.write_text("".join(f"{t},U1@D,U1@D,C1,C2,Kerberos,Network,LogOn,Success\n" for t in range(400)))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "produce", "--config", str(config_path),
                             "--input", str(log), "--rate", "40"], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(4)  # the client connects, then about 40 records a second
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    match = re.search(r"interrupted by SIGINT: (\d+) records acknowledged \(through line (\d+)\), 0 "
                      r"more unacknowledged; no end-of-input sent", stderr)
    assert match and 0 < int(match[1]) < 400 and match[1] == match[2], stderr
    assert len(read_all(config, config.topics.raw)) == int(match[1])  # each one sent arrived


def test_produce_of_a_gzip_log_that_ends_early_flushes_what_it_sent_and_says_so(kafka_bootstrap, tmp_path):
    """A truncated .gz stopped produce with the client's queue dropped: none of its lines on the
    topic and no word of what was sent (a rerun then duplicated the part that was)."""
    import gzip

    config, config_path = stream_config(tmp_path, kafka_bootstrap)
    text = "".join(f"{t},U{t % 7}@D,U1@D,C{t % 13},C2,Kerberos,Network,LogOn,Success\n"
                   for t in range(20_000))
    packed = gzip.compress(text.encode(), compresslevel=1)
    log = tmp_path / "log.csv.gz"
    log.write_bytes(packed[: len(packed) // 2])
    result = invoke("produce", "--config", config_path, "--input", log)
    assert result.exit_code == 1, result.output
    match = re.search(r"stopped reading \(.*a gzip file that is truncated or corrupt.*\): (\d+) records "
                      r"acknowledged \(through line (\d+)\), 0 more unacknowledged", result.output)
    assert match and 0 < int(match[1]) < 20_000 and match[1] == match[2], result.output
    assert len(read_all(config, config.topics.raw)) == int(match[1])
