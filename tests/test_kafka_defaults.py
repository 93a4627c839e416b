"""The producer's local queue and the consumer's prefetch are bounded by default, a user's kafka:
settings override the bounds, a full queue is back-pressure (produce() waits), never loss, and a
record larger than a fetch's cap still comes through, against a real broker."""

from __future__ import annotations

import time
import uuid

import pytest
from helpers import stream_config

from pipeline.config import ConfigError, config_from_dict
from pipeline.kafka import (
    LIBRDKAFKA_LOG,
    DeliveryTracker,
    consumer_config,
    make_consumer,
    make_producer,
    produce,
    producer_config,
)
from pipeline.topicread import TopicReader

LIBRDKAFKA_QUEUE = {"queue.buffering.max.messages": 100_000, "queue.buffering.max.kbytes": 1_048_576}
# librdkafka's defaults for what a consumer fetches ahead of the stage, and the wait after a
# fetch that filled its queue (CONFIGURATION.md).
LIBRDKAFKA_PREFETCH = {"fetch.max.bytes": 52_428_800, "max.partition.fetch.bytes": 1_048_576,
                       "queued.max.messages.kbytes": 65_536, "queued.min.messages": 100_000,
                       "fetch.queue.backoff.ms": 1000}


def test_producer_queue_is_bounded_by_default():
    settings = producer_config(config_from_dict({}))
    for key, librdkafka_default in LIBRDKAFKA_QUEUE.items():
        assert settings[key] < librdkafka_default / 4, key
    # A record of the largest size the producer accepts must fit the byte cap.
    assert settings["queue.buffering.max.kbytes"] * 1024 >= settings["message.max.bytes"]


def test_user_kafka_settings_override_the_queue_bound():
    config = config_from_dict({"kafka": {"queue.buffering.max.messages": 123_456,
                                         "queue.buffering.max.kbytes": 99}})
    settings = producer_config(config)
    assert settings["queue.buffering.max.messages"] == 123_456
    assert settings["queue.buffering.max.kbytes"] == 99


def test_a_larger_message_max_bytes_raises_the_default_byte_cap_with_it():
    """A user who raises message.max.bytes past our 32 MB cap still gets the largest record
    queued (a cap below it would refuse such a record for ever); their own cap stays theirs."""
    big = 64 * 1024 * 1024
    settings = producer_config(config_from_dict({"kafka": {"message.max.bytes": big}}))
    assert settings["queue.buffering.max.kbytes"] * 1024 > big
    quoted = producer_config(config_from_dict({"kafka": {"message.max.bytes": str(big)}}))  # YAML "..."
    assert quoted["queue.buffering.max.kbytes"] == settings["queue.buffering.max.kbytes"]
    assert producer_config(config_from_dict({}))["queue.buffering.max.kbytes"] == 32_768  # default kept
    mine = producer_config(config_from_dict({"kafka": {"message.max.bytes": big,
                                                       "queue.buffering.max.kbytes": 4096}}))
    assert mine["queue.buffering.max.kbytes"] == 4096


def test_consumer_prefetch_is_bounded_by_default():
    settings = consumer_config(config_from_dict({}), "tokenizer")
    for key, librdkafka_default in LIBRDKAFKA_PREFETCH.items():
        assert settings[key] <= librdkafka_default / 4, key
    make_consumer(config_from_dict({}), "tokenizer").close()  # librdkafka takes them together


def test_user_kafka_settings_override_the_consumer_prefetch():
    mine = {"fetch.max.bytes": 52_428_800, "max.partition.fetch.bytes": 2_097_152,
            "queued.max.messages.kbytes": 65_536, "queued.min.messages": 50_000,
            "fetch.queue.backoff.ms": 500}
    config = config_from_dict({"kafka": mine})
    settings = consumer_config(config, "windower")
    assert {key: settings[key] for key in mine} == mine
    # A stage's own arguments win over the user's; the at-least-once settings over both.
    explicit = consumer_config(config, "windower", **{"queued.min.messages": 7,
                                                      "enable.auto.commit": True})
    assert explicit["queued.min.messages"] == 7 and explicit["enable.auto.commit"] is False


def test_a_larger_message_max_bytes_raises_the_consumer_fetch_cap_with_it():
    """librdkafka refuses a consumer whose fetch.max.bytes is below message.max.bytes: a user who
    raises message.max.bytes (for producers and consumers alike) must still get consumers."""
    big = 16 * 1024 * 1024
    for written in (big, str(big)):  # YAML "..." too
        config = config_from_dict({"kafka": {"message.max.bytes": written}})
        assert consumer_config(config, "archiver")["fetch.max.bytes"] >= big
        make_consumer(config, "archiver").close()
    assert consumer_config(config_from_dict({}), "archiver")["fetch.max.bytes"] == 1_048_576
    # The user's own fetch.max.bytes stays theirs; librdkafka's refusal is one config line.
    mine = config_from_dict({"kafka": {"message.max.bytes": big, "fetch.max.bytes": 2_000_000}})
    assert consumer_config(mine, "archiver")["fetch.max.bytes"] == 2_000_000
    with pytest.raises(ConfigError, match="kafka: .*fetch.max.bytes"):
        make_consumer(mine, "archiver")


def test_a_record_larger_than_the_fetch_caps_is_still_read(kafka_bootstrap, tmp_path):
    """A 2 MB record between small ones: above both default fetch caps (256 KB a partition, 1 MB
    a fetch), the broker still returns it whole, in order, to a consumer with the defaults."""
    config, _ = stream_config(tmp_path, kafka_bootstrap)
    assert consumer_config(config, "reader")["fetch.max.bytes"] < 2_000_000
    topic = config.topics.dead_letters  # one partition: the read-back order is the sent order
    producer = make_producer(config)
    tracker = DeliveryTracker()
    sent = ([f"a{i}".encode() * 40 for i in range(3000)] + [b"x" * 2_000_000]
            + [f"b{i}".encode() * 40 for i in range(3000)])
    for value in sent:
        produce(producer, topic, value, on_delivery=tracker)
    assert producer.flush(30) == 0 and tracker.failures == []
    assert _read_values(config, topic, len(sent)) == sent


def _read_values(config, topic: str, expected: int) -> list[bytes]:
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    with TopicReader(config, [topic], "test-reader") as reader:
        while len(values) < expected and time.monotonic() < deadline:
            values += [m.value() for m in reader.poll() if m.value() is not None]
    return values


def test_a_full_queue_is_back_pressure_not_loss(kafka_bootstrap, tmp_path):
    # A user's cap of 50 records reaches librdkafka: the 51st unacknowledged record is refused
    # by the client itself, and produce() waits for room instead of dropping it.
    config, _ = stream_config(tmp_path, kafka_bootstrap,
                              {"kafka": {"queue.buffering.max.messages": 50}})
    topic = config.topics.dead_letters  # one partition: the read-back order is the sent order
    producer = make_producer(config, **{"client.id": f"t-{uuid.uuid4().hex[:6]}"})
    for _ in range(50):
        producer.produce(topic, b"x", on_delivery=DeliveryTracker())
    with pytest.raises(BufferError):
        producer.produce(topic, b"x")
    assert producer.flush(30) == 0
    tracker = DeliveryTracker()
    sent = [f"r{i}".encode() for i in range(2000)]
    for value in sent:
        produce(producer, topic, value, on_delivery=tracker)
    assert producer.flush(30) == 0
    assert tracker.failures == []
    assert _read_values(config, topic, 2050)[50:] == sent


def test_a_record_larger_than_the_queue_is_an_error_not_a_hang(kafka_bootstrap, tmp_path):
    config, _ = stream_config(tmp_path, kafka_bootstrap,
                              {"kafka": {"queue.buffering.max.kbytes": 1}})
    producer = make_producer(config)
    with pytest.raises(BufferError, match="queue.buffering.max.kbytes"):
        produce(producer, config.topics.dead_letters, b"x" * 4096, on_delivery=DeliveryTracker())
    produce(producer, config.topics.dead_letters, b"x" * 100, on_delivery=DeliveryTracker())
    assert producer.flush(30) == 0


def test_a_kafka_setting_librdkafka_refuses_is_one_config_line_not_a_traceback():
    """A typo under kafka: is only found when a client is made: still the config error's one
    line and exit 2, as for any other key, from every client (here the producer and admin)."""
    import subprocess
    import sys

    from pipeline.config import ConfigError
    from pipeline.kafka import make_admin

    with pytest.raises(ConfigError, match="kafka: .*linger|kafka: .*queue.buffering.max.ms"):
        make_producer(config_from_dict({"kafka": {"linger.ms": "abc"}}))
    with pytest.raises(ConfigError, match='kafka: No such configuration property: "bogus.key"'):
        make_admin(config_from_dict({"kafka": {"bogus.key": "1"}}))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "trainer", "--set", "kafka.linger.ms=abc"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [next(line for line in proc.stderr.splitlines()
                                                     if line.startswith("Error: kafka: "))]


def _librdkafka_lines(client, caplog) -> list[str]:
    """What the client logged through salka's librdkafka logger, polled until its refused
    connection is among it (poll serves the lines) or 5 s passed."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        client.poll(0.1)
        lines = [r.getMessage() for r in caplog.records if r.name == "librdkafka"]
        if any(line.startswith("FAIL") for line in lines):
            break
    return lines


def test_a_property_for_the_other_client_kind_is_not_warned_about(caplog):
    """One kafka: section serves producers and consumers: librdkafka's "is a producer property
    and will be ignored by this consumer instance" (and the reverse) is noise there; a CONFWARN
    of another kind still shows. Unreachable bootstrap: the lines come at creation."""
    caplog.set_level("DEBUG", logger="librdkafka")

    def config(port: int):  # a broker each: one refused connection line per broker gets through
        return config_from_dict({"kafka": {"bootstrap.servers": f"127.0.0.1:{port}", "linger.ms": 7,
                                           "fetch.wait.max.ms": 40}})

    consumer = make_consumer(config(1), "confwarn")
    try:
        consumer_lines = _librdkafka_lines(consumer, caplog)
    finally:
        consumer.close()
    caplog.clear()
    producer = make_producer(config(2))
    producer_lines = _librdkafka_lines(producer, caplog)
    producer.flush(0)
    for lines in (consumer_lines, producer_lines):
        assert lines  # control: librdkafka's lines do come through (the refused connection)
        assert not [line for line in lines if "will be ignored by this" in line], lines
    # A CONFWARN that is not about the other kind of client passes the filter.
    record = LIBRDKAFKA_LOG.makeRecord("librdkafka", 30, __file__, 1, "%s [%s] %s",
                                       ("CONFWARN", "rdkafka#producer-1",
                                        "[thrd:app]: Configuration property x is deprecated"), None)
    ignored = LIBRDKAFKA_LOG.makeRecord("librdkafka", 30, __file__, 1, "%s [%s] %s",
                                        ("CONFWARN", "rdkafka#producer-1", "[thrd:app]: Configuration "
                                         "property fetch.wait.max.ms is a consumer property and will "
                                         "be ignored by this producer instance"), None)
    assert LIBRDKAFKA_LOG.filter(record) and not LIBRDKAFKA_LOG.filter(ignored)
