"""``pipeline produce``: publish a log file to the raw topic, one record per line.

Each record's value is the raw line, its key and ``salka.line`` header the physical line number
(the event's identity, carried to the archive's ``line`` column), and its timestamp the event
time when the line parses. A header row is file metadata, not an event, and is not published.
Malformed lines are published as they are: the tokenizer dead-letters them with the reason.
At the end, an end-of-input control record on every partition lets the windower close the last
windows of a finite file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.kafka import DeliveryTracker, make_producer, partition_count, produce
from pipeline.parsing import Event, HeaderRow, LineParser, read_lines
from pipeline.records import CONTROL_HEADER, END_OF_INPUT, LINE_HEADER

log = logging.getLogger(__name__)


@dataclass
class ProduceReport:
    records: int = 0
    header_rows: int = 0
    seconds: float = 0.0


def produce_file(config: Config, path: str | Path, rate: float | None = None,
                 end_marker: bool = True, lines: range | None = None) -> ProduceReport:
    """Publish the file (only the physical ``lines`` in the given range, when set)."""
    parser = LineParser(config.input)
    producer = make_producer(config, **{"client.id": "salka-produce"})
    tracker = DeliveryTracker()
    topic = config.topics.raw
    report = ProduceReport()
    started = time.monotonic()
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
        produce(producer, topic, value, key=line, headers=[(LINE_HEADER, line)],
                on_delivery=tracker, **timestamp)
        report.records += 1
        producer.poll(0)
        if rate:  # paced replay: sleep until this record's slot
            delay = started + report.records / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    if end_marker:
        for partition in range(partition_count(producer, topic)):
            produce(producer, topic, None, partition=partition,
                    headers=[(CONTROL_HEADER, END_OF_INPUT.encode())], on_delivery=tracker)
    remaining = producer.flush(60)
    report.seconds = time.monotonic() - started
    if remaining or tracker.failures:
        raise RuntimeError(f"{remaining} records undelivered, {len(tracker.failures)} failed: "
                           f"{tracker.failures[:1]}")
    log.info("produced %d records from %s to %s in %.1fs", report.records, path, topic, report.seconds)
    return report
