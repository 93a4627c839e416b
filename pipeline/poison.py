"""Poison pills: records a stage cannot process, or cannot dead-letter whole.

A dead letter carries the bad record's value. When that value is close to the message size limit,
the dead letter (value + reason + source) is over it, and Kafka refuses it: locally at
``produce()`` (the producer's ``message.max.bytes``) or in the delivery report (the broker's or
topic's limit, which may be lower). Either way the stage must not fail on it, or it restarts from
its last commit, meets the same record and fails again, forever. So a dead letter that does not
fit is cut to fit: a prefix of the value, its original size and SHA-256 (set by
``topicrecords.dead_letter``) and the reason. Nothing here imports torch or talks to Kafka.
"""

from __future__ import annotations

from confluent_kafka import KafkaError, KafkaException

from pipeline.config import Config
from pipeline.kafka import producer_config
from pipeline.serde import EncodeError, codec

DEAD_LETTER = "salka.DeadLetter"
# Kafka's per-record framing (record batch header, varints, attributes) beyond key, value and
# headers; librdkafka counts ~100 bytes, and a margin costs nothing in a dead letter.
WIRE_OVERHEAD = 512
REASON_MAX = 2000  # characters: a reason quoting the bad input must not itself be the problem
# What a broker that refused a dead letter as too large gets next: halving each time, down to
# this, then it is a delivery failure like any other.
RESEND_FIRST = 1_000_000
RESEND_FLOOR = 1024
# Error codes that mean "this one record is too large", locally or from the broker.
SIZE_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE})


def message_limit(config: Config) -> int:
    """The producer's ``message.max.bytes`` as salka's clients will use it (user settings win)."""
    return int(producer_config(config)["message.max.bytes"])


def budget(limit: int, key: bytes | None = None, headers: list | None = None) -> int:
    """Bytes left for a value in one message of at most ``limit`` bytes."""
    extra = len(key or b"") + sum(len(k) + len(v or b"") for k, v in headers or [])
    return max(0, limit - extra - WIRE_OVERHEAD)


def is_size_error(exc: BaseException | KafkaError) -> bool:
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else exc
    return isinstance(err, KafkaError) and err.code() in SIZE_ERRORS


def is_poison(exc: Exception) -> bool:
    """Did processing fail because of the record itself (dead-letter it and go on), rather than
    the world around the stage (let the stage stop or restart, and retry the record later)?
    Broker, disk and memory trouble are the world's; an output too large for Kafka, a record
    that breaks an encoder or a bug on odd input are the record's."""
    if isinstance(exc, KafkaException):
        return is_size_error(exc)
    if isinstance(exc, (OSError, MemoryError)) or type(exc).__name__.endswith("OutOfMemoryError"):
        return False
    return True


def truncate(text: str, limit: int = REASON_MAX) -> str:
    return text if len(text) <= limit else text[: limit - 30] + f"... [{len(text)} characters]"


def fit_dead_letter(record: dict, max_bytes: int) -> tuple[bytes, dict]:
    """Encode a dead letter whole if it fits ``max_bytes``; else with a long reason shortened and
    the payload cut to the longest prefix that fits. Returns (bytes, the record as encoded)."""
    data = codec().encode(DEAD_LETTER, record)
    if len(data) <= max_bytes:
        return data, record
    cut = {**record, "reason": truncate(record["reason"])}
    payload = record["payload"]
    if payload is not None:
        cut["payload"] = b""
        fixed = len(codec().encode(DEAD_LETTER, cut))  # everything but the payload's bytes
        # The payload's length prefix grows with it: at most 10 bytes of varint.
        cut["payload"] = payload[: max(0, max_bytes - fixed - 10)]
    data = codec().encode(DEAD_LETTER, cut)
    if len(data) > max_bytes:
        raise EncodeError(f"a dead letter cannot fit {max_bytes} bytes even without its payload")
    return data, cut
