"""What every stage shares: the runner's hooks (pipeline/runner.py ``Stage``) as no-ops, so a stage
writes only the ones it needs."""

from __future__ import annotations

import logging

from confluent_kafka import Message, TopicPartition

from pipeline.config import Config
from pipeline.runner import Output


class BaseStage:
    name: str = "stage"
    # True: the stage must read every partition of its topics, so one process runs it; a second
    # one in the group makes both wait (runner.StageRunner._hold_if_partial).
    needs_every_partition: bool = False

    def __init__(self, config: Config):
        self.config = config
        self.counts: dict[str, int] = {"dead_letters": 0}  # totals (a stage sets its own), logged on close

    def topics(self) -> list[str]:
        raise NotImplementedError

    def consume_batch(self) -> int:
        """Records asked for per consume() call."""
        return self.config.streaming.poll_batch

    def handle(self, msg: Message, out: Output) -> None:
        raise NotImplementedError

    def on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        """Nothing to do: the group's committed offsets say where to read."""

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        pass

    def tick(self, out: Output) -> bool:
        return False  # no timed work; commit on the runner's interval

    def after_flush(self) -> None:
        pass  # no local state to save

    def safe_offsets(self) -> list[TopicPartition]:
        return []

    def close(self, out: Output) -> None:
        # Through the stage's own module logger, as its other lines.
        logging.getLogger(type(self).__module__).info("%s totals: %s", self.name, self.counts)
