"""Reading a topic to its end (pipeline/topicread.py), the one event sort key, and the broker
tests' own topics (tests/helpers.py)."""

from __future__ import annotations

import random

import pytest
from helpers import delete_topics, stream_config, wait_for

from pipeline.kafka import make_admin, make_producer
from pipeline.parsing import Event
from pipeline.topicread import TopicReader, read_topic
from pipeline.windowing import event_order


def _event(time: float | None, line: int, source: tuple[str, int, int] | None) -> Event:
    return Event(line=line, time=time, fields={}, text_fields=(), source=source)


def _record(event: Event) -> dict:
    """The event as the scores topic carries it (the fields event_order reads)."""
    topic, partition, offset = event.source or ("", 0, 0)
    return {"event_time": event.time, "line": event.line or None,
            "source": {"topic": topic, "partition": partition, "offset": offset}}


def test_an_event_and_its_topic_record_sort_the_same():
    rng = random.Random(3)
    events = [_event(rng.choice([None, 0.0, 5.5, 7.0]), rng.randint(0, 3),
                     ("raw", rng.randint(0, 2), offset)) for offset in range(200)]
    by_event = sorted(events, key=event_order)
    by_record = sorted(events, key=lambda e: event_order(_record(e)))
    assert [e.source for e in by_event] == [e.source for e in by_record]
    assert by_event != events  # the shuffle did something to sort


def test_read_topic_reads_every_partition_to_its_end(tmp_path, kafka_bootstrap):
    config, _ = stream_config(tmp_path, kafka_bootstrap, {"topics": {"partitions": 3}})
    topic = config.topics.raw
    producer = make_producer(config)
    for i in range(300):  # partition 2 stays empty: its end is offset 0
        producer.produce(topic, str(i).encode(), partition=i % 2)
    producer.flush(10)
    values = sorted(int(m.value()) for m in read_topic(config, topic, timeout=30))
    assert values == list(range(300))
    assert len(list(read_topic(config, topic, count=7, timeout=30))) == 7
    assert list(read_topic(config, config.topics.late, timeout=30)) == []  # empty topic: at once

    with TopicReader(config, [topic]) as reader:  # a live reader: at the end, then not, then again
        wait_for(lambda: reader.poll() is not None and reader.at_end, 30, 0, "the end")
        producer.produce(topic, b"300", partition=2)
        producer.flush(10)
        wait_for(lambda: reader.poll() is not None and reader.count == 301, 30, 0, "the new record")
        wait_for(lambda: reader.poll() is not None and reader.at_end, 30, 0, "the new end")


def test_read_topic_waiting_for_records_that_never_come_times_out(tmp_path, kafka_bootstrap):
    config, _ = stream_config(tmp_path, kafka_bootstrap)
    with pytest.raises(TimeoutError, match="0 records read, not 1 records"):
        list(read_topic(config, config.topics.alerts, count=1, timeout=1))


def test_each_broker_test_gets_its_own_topics_and_they_are_deleted(tmp_path, kafka_bootstrap):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, _ = stream_config(tmp_path / "a", kafka_bootstrap)
    second, _ = stream_config(tmp_path / "b", kafka_bootstrap)
    names = [vars(c.topics)[role] for c in (first, second)
             for role in ("raw", "tokens", "windows", "scores", "dead_letters", "late", "alerts")]
    assert len(set(names)) == len(names)  # the alerts topic included
    assert all("each-broker-test-gets-its-own" in name for name in names)
    admin = make_admin(first)
    assert set(names) <= set(admin.list_topics(timeout=10).topics)
    # A client that has seen a topic asks for it by name later, and the embedded broker creates a
    # topic it is asked about: only clients that never looked at them may check they are gone.
    del admin
    delete_topics(first)
    gone = [vars(first.topics)[role] for role in ("raw", "alerts")]
    admin = make_admin(second)
    wait_for(lambda: not set(gone) & set(admin.list_topics(timeout=10).topics), 30,
             what="the deleted topics to go")
