"""Tokenizer stage: raw log records -> parsed, tokenized events (or dead letters).

Stateless, so several instances share the raw partitions in one consumer group. Each event goes
to the tokens partition with the number of its raw partition, which keeps per-partition event
order and so lets the windower's watermark be taken per partition.
"""

from __future__ import annotations

import logging

from confluent_kafka import Message, TopicPartition

from pipeline import poison
from pipeline.config import Config
from pipeline.kafka import partition_count
from pipeline.modelspec import fixed_encoder, make_masker
from pipeline.parsing import LineParser, Malformed
from pipeline.runner import Output, send_to_dead_letters
from pipeline.stages.base import BaseStage
from pipeline.tokenwire import TokenizedEventWriter
from pipeline.topicrecords import CONTROL_HEADER, LINE_HEADER, line_number

log = logging.getLogger(__name__)


class TokenizerStage(BaseStage):
    name = "tokenizer"
    isolates_records = True  # stateless: the runner dead-letters a record handle() fails on

    def __init__(self, config: Config):
        super().__init__(config)
        self.parser = LineParser(config.input, masker=make_masker(config))
        self.encode = fixed_encoder(config)  # None: the trainer learns the vocabulary first
        self.tokens_topic = config.topics.tokens
        self.writer = TokenizedEventWriter()
        # The windower wraps an event and the scorer copies its line, entities and tokens into
        # a score: an event that fills a message here would not fit one there, and those
        # stages, which keep state, would stop on it. Half the limit leaves them the room.
        self.event_limit = poison.message_limit(config) // 2
        self.next_offsets: dict[tuple[str, int], int] = {}
        self.tokens_partitions: int | None = None
        self.counts = {"events": 0, "dead_letters": 0, "control": 0}

    def topics(self) -> list[str]:
        return [self.config.topics.raw]

    def on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        if self.tokens_partitions is None:
            self.tokens_partitions = partition_count(consumer, self.config.topics.tokens)
            raw = partition_count(consumer, self.config.topics.raw)
            if self.tokens_partitions < raw:
                log.warning("topic %s has %d partitions, fewer than %s (%d): partitions will be "
                            "shared and event order within them mixed", self.config.topics.tokens,
                            self.tokens_partitions, self.config.topics.raw, raw)

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.next_offsets.pop((tp.topic, tp.partition), None)

    def handle(self, msg: Message, out: Output) -> None:
        topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
        self.next_offsets[(topic, partition)] = offset + 1
        tokens_partition = partition % (self.tokens_partitions or 1)
        control, line_value = _control_and_line(msg.headers())
        if control and not self.config.streaming.end_of_input:
            send_to_dead_letters(self, msg, out, "a control record (end of input), refused: "
                                 "streaming.end_of_input is false", line_number(line_value))
            return
        if control:
            out.send(self.config.topics.tokens, None, partition=tokens_partition, headers=msg.headers())
            self.counts["control"] += 1
            return
        line = line_number(line_value)
        value = msg.value()
        # parse_fields: parse() without the Event and the model text, which only a fixed
        # tokenizer reads (~3 us an event).
        result = (self.parser.parse_fields(value, line) if value is not None
                  else Malformed(line, "null value"))
        if isinstance(result, Malformed):  # header rows too: every raw record is accounted for
            send_to_dead_letters(self, msg, out, result.reason, line)
            return
        raw, time, fields = result
        token_ids = None
        if self.encode is not None:
            token_ids = self.encode(self.parser.text_fields(fields))
        # Written directly, byte for byte what codec().encode(event_to_record(...)) gives.
        record = self.writer.write_fields(line, time, fields, (topic, partition, offset), raw, token_ids)
        key = msg.key()
        size = len(record) + len(key or b"")
        if size > self.event_limit:
            send_to_dead_letters(self, msg, out, f"its event is {size} bytes, over {self.event_limit} (half "
                                 f"of kafka message.max.bytes, the room later stages need): shorten "
                                 f"the line or raise message.max.bytes", line)
            return
        out.send(self.tokens_topic, record, key=key, partition=tokens_partition)
        self.counts["events"] += 1

    def safe_offsets(self) -> list[TopicPartition]:
        return [TopicPartition(t, p, o) for (t, p), o in self.next_offsets.items()]


def _control_and_line(headers: list | None) -> tuple[bool, bytes | None]:
    """Whether a record is a control record, and its line header's value: one pass over the
    headers, each found as ``runner.header`` finds it (the first one with a value)."""
    control, line = False, None
    for key, value in headers or ():
        if value is None:
            continue
        if key == CONTROL_HEADER:
            control = True
        elif key == LINE_HEADER and line is None:
            line = value
    return control, line
