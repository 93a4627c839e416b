"""Reading topics from their start to their end: the audit, the demo's counters, tests, benchmarks.

Every partition is assigned directly, from the beginning, in no consumer group (a new group's join
is held for session.timeout.ms / 2 by the embedded broker, and nothing is committed). "The end" is
where the broker's fetch responses say a partition ends: librdkafka reports a partition EOF when
its fetch position reaches the high watermark of a fetch response, the same number
``get_watermark_offsets(cached=True)`` returns. The embedded broker answers ListOffsets ("latest")
wrongly (KAFKA-NOTES.md), so no end offset is asked for up front.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Sequence

from confluent_kafka import OFFSET_BEGINNING, KafkaError, Message, TopicPartition

from pipeline.config import Config
from pipeline.kafka import make_consumer, partition_count


class TopicReader:
    """Every record of ``topics`` from the start, a batch per ``poll()``; ``at_end`` once every
    partition has been read up to its end as the broker last reported it."""

    def __init__(self, config: Config, topics: Sequence[str], name: str = "reader"):
        self.consumer = make_consumer(config, f"{name}-{uuid.uuid4().hex[:10]}",
                                      **{"enable.partition.eof": True})
        assigned = [TopicPartition(topic, p, OFFSET_BEGINNING) for topic in topics
                    for p in range(partition_count(self.consumer, topic))]
        self.partitions = {(tp.topic, tp.partition) for tp in assigned}
        self.ended: set[tuple[str, int]] = set()
        self.count = 0  # records returned so far
        self.consumer.assign(assigned)

    def poll(self, timeout: float = 0.2, max_records: int = 1000) -> list[Message]:
        """The next records (errors left out; a partition's EOF marks it ended until more comes)."""
        records = []
        for msg in self.consumer.consume(max_records, timeout=timeout):
            err, where = msg.error(), (msg.topic(), msg.partition())
            if err is None:
                self.ended.discard(where)
                records.append(msg)
            elif err.code() == KafkaError._PARTITION_EOF:
                self.ended.add(where)
        self.count += len(records)
        return records

    @property
    def at_end(self) -> bool:
        return self.ended >= self.partitions

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_topic(config: Config, topic: str, *, count: int | None = None,
               timeout: float = 300.0) -> Iterator[Message]:
    """Every record of ``topic`` from the start to its end; with ``count``, the first ``count``
    records instead, waiting for them to be written. TimeoutError when neither happens within
    ``timeout`` seconds (the records read so far were yielded)."""
    deadline = time.monotonic() + timeout
    read = 0
    with TopicReader(config, [topic]) as reader:
        while True:
            for msg in reader.poll():
                yield msg
                read += 1
                if read == count:
                    return
            if count is None and reader.at_end:
                return
            if time.monotonic() >= deadline:
                wanted = f"{count} records" if count is not None else "its end"
                raise TimeoutError(f"topic {topic}: {read} records read, not {wanted} "
                                   f"after {timeout:.0f}s")
