"""The Avro records on salka's topics: built from Events / Scores and read back, plus the
header names and control values the stages agree on.

Plain functions without I/O; only ``dead_letter`` reads the wall clock (its ``time_ms``).
Nothing here imports torch, so the Kafka-only stages stay light.
"""

from __future__ import annotations

import hashlib
import time

from nn.masking import Masker
from pipeline.config import Config
from pipeline.parsing import Event
from pipeline.score import Score

LINE_HEADER = "salka.line"  # raw record header: physical line number in the produced file
CONTROL_HEADER = "salka.control"  # raw/tokens record header marking a control record
END_OF_INPUT = "end-of-input"  # control: this partition will receive no more events
LAST_LINE = 2**63 - 1  # the largest line number an Avro long (the records' ``line``) holds


def line_number(value: bytes | str | None) -> int:
    """The line number in a raw record's LINE_HEADER value, 0 for none. ``pipeline produce``
    writes ASCII digits; anything else is read as ``int()`` reads its text (decoded with
    replacement), and a value that is no number, or none a record can carry (below 1, past an
    Avro long), is none: any writer of the raw topic sets this header, a hostile one too."""
    if value is None:
        return 0
    try:
        number = int(value)  # ASCII digits: no decode
    except ValueError:
        try:
            number = int(value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value)
        except ValueError:  # also past int()'s 4300 digits
            return 0
    return number if 1 <= number <= LAST_LINE else 0


def source_ref(topic: str, partition: int, offset: int) -> dict:
    return {"topic": topic, "partition": partition, "offset": offset}


def event_to_record(event: Event) -> dict:
    topic, partition, offset = event.source
    return {
        "source": source_ref(topic, partition, offset),
        "line": event.line or None,
        "event_time": event.time,
        "fields": [{"name": k, "value": v} for k, v in event.fields.items()],
        "token_ids": list(event.token_ids) if event.token_ids is not None else None,
        "raw": event.raw,
    }


def record_to_event(record: dict, model_fields: list[str], masker: Masker | None = None) -> Event:
    """The Event back; ``masker`` (tokenizer.mask) masks its model text as LineParser does."""
    fields = {f["name"]: f["value"] for f in record["fields"]}
    text_fields = tuple((name, fields.get(name, "")) for name in model_fields)
    source = record["source"]
    ids = record["token_ids"]
    return Event(
        line=record["line"] or 0,
        time=record["event_time"],
        fields=fields,
        text_fields=masker.mask_fields(text_fields) if masker is not None else text_fields,
        token_ids=tuple(ids) if ids is not None else None,
        source=(source["topic"], source["partition"], source["offset"]),
        raw=record["raw"],
    )


def identity(record: dict) -> tuple[str, int, int]:
    """An event's identity everywhere downstream: its raw record's Kafka coordinates."""
    source = record["source"]
    return (source["topic"], source["partition"], source["offset"])


def score_to_record(score: Score, config: Config, late: bool = False) -> dict:
    event = score.event
    topic, partition, offset = event.source
    fields = event.fields  # Event.entity, without a call per entity (a scorer runs this per event)
    return {
        "source": source_ref(topic, partition, offset),
        "line": event.line or None,
        "event_time": event.time,
        "window": score.window,
        "entities": {name: fields.get(field, "") for name, field in config.input.entities.items()},
        "loss": score.loss,
        "loss_total": score.loss_total,
        "raw": event.raw,
        "tokens": list(score.tokens) if score.token_losses else None,
        "token_losses": list(score.token_losses) if score.token_losses else None,
        "late": late,
    }


def dead_letter(stage: str, topic: str, partition: int, offset: int, reason: str,
                payload: bytes | None, line: int | None = None) -> dict:
    return {
        "stage": stage,
        "source": source_ref(topic, partition, offset),
        "line": line,
        "reason": reason,
        "payload": payload,
        "time_ms": int(time.time() * 1000),
        # Identify the original even when the payload must be cut to fit (pipeline.poison).
        "payload_size": len(payload) if payload is not None else None,
        "payload_sha256": hashlib.sha256(payload).hexdigest() if payload is not None else None,
    }
