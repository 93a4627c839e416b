"""Broker-free stand-ins for driving a stage object in-process: a consumed message, a consumer
(metadata and assignment only) and an ``Output`` that records what a stage sends.

Values are real Avro bytes from ``pipeline.serde``, so a stage decodes exactly what it would read
from Kafka, and what it sends is decoded back with the same codec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from confluent_kafka import TIMESTAMP_CREATE_TIME, TopicPartition

from pipeline.serde import codec

RAW_TOPIC = "raw"
LANL_COLUMNS = ["time", "src_user", "dst_user", "src_computer", "dst_computer", "auth_type",
                "logon_type", "auth_orientation", "success"]


class FakeMessage:
    """The part of ``confluent_kafka.Message`` the stages read."""

    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None, *,
                 key: bytes | None = None, headers: list | None = None, timestamp_ms: int = 0):
        self._topic, self._partition, self._offset = topic, partition, offset
        self._value, self._key, self._headers = value, key, headers
        self._timestamp_ms = timestamp_ms

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def headers(self) -> list | None:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return (TIMESTAMP_CREATE_TIME, self._timestamp_ms)

    def error(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"FakeMessage({self._topic}[{self._partition}]@{self._offset})"


class FakeConsumer:
    """Answers the metadata a stage asks for in ``on_assign`` and records its assignment (and
    the partitions it pauses, rewinds and resumes)."""

    def __init__(self, partitions: dict[str, int]):
        self.partitions = partitions  # topic -> partition count
        self.assigned: list[TopicPartition] = []
        self.paused: set[tuple[str, int]] = set()
        self.seeks: list[tuple[str, int, int]] = []

    def list_topics(self, topic: str | None = None, timeout: float = -1):
        topics = {name: SimpleNamespace(error=None, partitions={p: None for p in range(n)})
                  for name, n in self.partitions.items()}
        return SimpleNamespace(topics=topics)

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = list(partitions)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in partitions}

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))


@dataclass
class Sent:
    topic: str
    value: bytes | None
    key: bytes | None = None
    partition: int | None = None
    headers: list | None = None


@dataclass
class RecordingOutput:
    """Same methods as ``pipeline.runner.Output``; keeps what was sent instead of producing it."""

    sent: list[Sent] = field(default_factory=list)
    by_topic: dict[str, int] = field(default_factory=dict)
    dead_letters: list[dict] = field(default_factory=list)

    def send(self, topic: str, value: bytes | None, *, key: bytes | None = None,
             partition: int | None = None, headers: list | None = None) -> None:
        self.sent.append(Sent(topic, value, key, partition, headers))
        self.by_topic[topic] = self.by_topic.get(topic, 0) + 1

    def send_record(self, topic: str, schema: str, record: dict, **kwargs) -> None:
        self.send(topic, codec().encode(schema, record), **kwargs)

    def send_dead_letter(self, topic: str, record: dict, *, key: bytes | None = None,
                         max_bytes: int | None = None) -> None:
        self.dead_letters.append(record)
        self.send(topic, codec().encode("salka.DeadLetter", record), key=key)

    def resend_refused(self) -> bool:
        return False

    def records(self, topic: str) -> list[tuple[str, dict]]:
        """(schema name, record) of everything sent to ``topic``, in order."""
        return [codec().decode(s.value) for s in self.sent if s.topic == topic]

    def messages(self, topic: str, start: int = 0) -> list[FakeMessage]:
        """What was sent to ``topic`` as the messages a downstream stage would consume, in the
        order sent (offsets numbered from ``start`` in each partition; no partition: 0)."""
        messages, next_offset = [], {}
        for s in self.sent:
            if s.topic == topic:
                p = s.partition or 0
                next_offset[p] = next_offset.get(p, start) + 1
                messages.append(FakeMessage(topic, p, next_offset[p] - 1, s.value, key=s.key,
                                            headers=s.headers))
        return messages


def tokenized_record(name: str, time: float | None, source: tuple[str, int, int], *,
                     user: str = "U1", src: str = "C1", dst: str = "C2", line: int | None = None
                     ) -> dict:
    """A salka.TokenizedEvent of a LANL-style event; ``name`` is its raw text (to find it again)."""
    values = {"time": "" if time is None else repr(time), "src_user": f"{user}@DOM1",
              "dst_user": f"{user}@DOM1", "src_computer": src, "dst_computer": dst,
              "auth_type": "Kerberos", "logon_type": "Network", "auth_orientation": "LogOn",
              "success": "Success"}
    topic, partition, offset = source
    return {"source": {"topic": topic, "partition": partition, "offset": offset}, "line": line,
            "event_time": time, "fields": [{"name": c, "value": values[c]} for c in LANL_COLUMNS],
            "token_ids": None, "raw": name}


def scored_record(name: str, window: int, loss: float | None, offset: int, *,
                  user: str = "U1", src: str = "C1", dst: str = "C2", late: bool = False) -> dict:
    """A salka.ScoredEvent as a scorer publishes it (``late``: an event of the late topic)."""
    return {"source": {"topic": RAW_TOPIC, "partition": 0, "offset": offset}, "line": offset + 1,
            "event_time": window * 86400.0 + offset, "window": window,
            "entities": {"user": user, "src_host": src, "dst_host": dst}, "loss": loss,
            "loss_total": None if loss is None else loss * 10, "raw": name, "tokens": None,
            "token_losses": None, "late": late}


def encoded(schema: str, record: dict) -> bytes:
    return codec().encode(schema, record)
