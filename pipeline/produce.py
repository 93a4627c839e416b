"""``pipeline produce``: publish a log file to the raw topic, one record per line.

Each record's value is the raw line, its key and ``salka.line`` header the physical line number
(the event's identity, carried to the archive's ``line`` column), and its timestamp the event
time when the line parses. A header row is file metadata, not an event, and is not published.
Malformed lines are published as they are: the tokenizer dead-letters them with the reason.
At the end, an end-of-input control record on every partition lets the windower close the last
windows of a finite file.

A line too large for one Kafka message (over the producer's ``message.max.bytes``, or refused
by the broker as too large) is not published: it is dead-lettered (stage ``produce``, its line
number, a prefix of it with its size and SHA-256; source partition and offset -1) and the rest of
the file goes on, end marker included. That is the same policy as for a malformed line, so such
lines do not make ``pipeline produce`` fail; only a record that reached neither the raw topic nor
the dead-letter topic does (``ProduceError``, after everything else is flushed).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import KafkaException

from pipeline import poison
from pipeline.config import Config
from pipeline.errors import UnreadableLog
from pipeline.kafka import DeliveryTracker, delivery_tracker, make_producer, partition_count, produce
from pipeline.parsing import Event, HeaderRow, LineParser, read_lines
from pipeline.topicrecords import CONTROL_HEADER, END_OF_INPUT, LINE_HEADER, dead_letter

log = logging.getLogger(__name__)


@dataclass
class ProduceReport:
    records: int = 0
    header_rows: int = 0
    seconds: float = 0.0
    dead_lettered: list[int] = field(default_factory=list)  # line numbers too large to publish


class ProduceError(RuntimeError):
    """Records that reached neither the raw topic nor the dead-letter topic."""


class ProduceInterrupted(ProduceError):
    """Ctrl-C (or SIGTERM, under ``interrupt.interruptible``) while publishing: what was sent so
    far is flushed and counted."""

    def __init__(self, text: str, signum: int):
        super().__init__(text)
        self.signum = signum


INTERRUPT_FLUSH_SECONDS = 10.0


class _Refusals:
    """Delivery callback: a raw record the broker refused as too large is kept for a dead letter
    (its value and key, the line number, come back in the report); anything else is tracked."""

    def __init__(self, topic: str, tracker: DeliveryTracker):
        self.topic, self.tracker = topic, tracker
        self.refused: list[tuple[int, bytes]] = []
        self.acknowledged, self.last_line = 0, 0  # raw records the broker took, and the last line

    def __call__(self, err, msg) -> None:
        if err is not None and poison.is_size_error(err) and msg.topic() == self.topic and msg.key():
            self.refused.append((int(msg.key()), msg.value() or b""))
            return
        self.tracker(err, msg)
        if err is None and msg.topic() == self.topic and msg.key():
            self.acknowledged += 1
            self.last_line = max(self.last_line, int(msg.key()))


def _dead_letter_line(config: Config, producer, tracker: DeliveryTracker, number: int,
                      value: bytes, why: str) -> None:
    log.warning("line %d: %d bytes, %s: not published; dead-lettered to %s (a prefix, its size "
                "and SHA-256)", number, len(value), why, config.topics.dead_letters)
    record = dead_letter("produce", config.topics.raw, -1, -1, f"line too large for Kafka: {why}",
                         value, number)
    key = str(number).encode()
    # At most ~1 MB: what a Kafka broker accepts by default, whatever the producer's limit.
    max_bytes = min(poison.RESEND_FIRST, poison.budget(poison.message_limit(config), key))
    data, _ = poison.fit_dead_letter(record, max_bytes)
    produce(producer, config.topics.dead_letters, data, key=key, on_delivery=tracker)


def produce_file(config: Config, path: str | Path, rate: float | None = None,
                 end_marker: bool = True, lines: range | None = None) -> ProduceReport:
    """Publish the file (only the physical ``lines`` in the given range, when set)."""
    parser = LineParser(config.input)
    settings = {"client.id": "salka-produce"}
    producer = make_producer(config, **settings)
    tracker = delivery_tracker(config, **settings)
    refusals = _Refusals(config.topics.raw, tracker)
    limit = poison.message_limit(config)
    topic = config.topics.raw
    report = ProduceReport()
    started = time.monotonic()
    try:
        for number, raw in read_lines(path):
            if lines is not None and number not in lines:
                continue
            value = raw.rstrip(b"\r\n")
            parsed = parser.parse(value, number)
            if isinstance(parsed, HeaderRow):
                report.header_rows += 1
                continue
            timestamp = {}
            if isinstance(parsed, Event) and parsed.time is not None:
                timestamp = {"timestamp": int(parsed.time * 1000)}
            line = str(number).encode()
            headers = [(LINE_HEADER, line)]
            too_large = len(value) > poison.budget(limit, line, headers)
            if not too_large:
                try:
                    produce(producer, topic, value, key=line, headers=headers, on_delivery=refusals,
                            **timestamp)
                except KafkaException as exc:  # librdkafka's own size arithmetic disagreed with ours
                    if not poison.is_size_error(exc):
                        raise
                    too_large = True
            if too_large:
                _dead_letter_line(config, producer, tracker, number, value,
                                  f"over the producer's message.max.bytes ({limit})")
                report.dead_lettered.append(number)
                continue
            report.records += 1
            producer.poll(0)
            if rate:  # paced replay: sleep until this record's slot
                delay = started + report.records / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
    except (KeyboardInterrupt, UnreadableLog, OSError) as exc:
        # What was sent so far still reaches the broker (a destroyed client drops its queue),
        # and the user learns how far it got.
        remaining = producer.flush(INTERRUPT_FLUSH_SECONDS)
        refused = f", {len(refusals.refused)} refused as too large" if refusals.refused else ""
        sent = (f"{refusals.acknowledged} records acknowledged (through line {refusals.last_line}), "
                f"{remaining} more unacknowledged{refused}; no end-of-input sent; `pipeline audit "
                f"--input {path}` lists what reached the topic")
        if not isinstance(exc, KeyboardInterrupt):
            raise ProduceError(f"stopped reading ({exc}): {sent}") from exc
        signum = getattr(exc, "signum", signal.SIGINT)
        raise ProduceInterrupted(f"interrupted by {signal.Signals(signum).name}: {sent}", signum) from None
    if end_marker:
        for partition in range(partition_count(producer, topic)):
            produce(producer, topic, None, partition=partition,
                    headers=[(CONTROL_HEADER, END_OF_INPUT.encode())], on_delivery=tracker)
    remaining = producer.flush(60)
    for number, value in refusals.refused:
        _dead_letter_line(config, producer, tracker, number, value, "refused by the broker as too large")
        report.records -= 1
        report.dead_lettered.append(number)
    if refusals.refused:
        remaining = producer.flush(60)
    report.dead_lettered.sort()
    report.seconds = time.monotonic() - started
    if remaining or tracker.failures:
        hint = (f"; `pipeline audit --input {path}` lists the lines lost or stored twice"
                if tracker.failures else "")
        raise ProduceError(f"{remaining} records undelivered after 60 s, {len(tracker.failures)} "
                           f"failed{': ' + tracker.failures[0] if tracker.failures else ''}{hint}")
    log.info("produced %d records from %s to %s in %.1fs", report.records, path, topic, report.seconds)
    return report
