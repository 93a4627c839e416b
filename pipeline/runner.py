"""The one consume -> process -> produce -> flush -> commit loop every stage runs.

A stage is a plain object (see ``Stage``); this module owns the Kafka clients, signals and
commits. Input offsets are committed only after every output produced so far is acknowledged
(flush, then check for delivery failures), and only up to what the stage says is safe, so a crash
at any instant means redelivery, never loss.
"""

from __future__ import annotations

import logging
import signal
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, Message, TopicPartition

from pipeline.config import Config
from pipeline.kafka import DeliveryTracker, make_consumer, make_producer, produce
from pipeline.serde import DecodeError, codec

log = logging.getLogger(__name__)


class Output:
    """What a stage may do with its results: produce records (Avro-encoded or raw bytes)."""

    def __init__(self, producer, tracker: DeliveryTracker):
        self.producer = producer
        self.tracker = tracker
        self.sent = 0

    def send(self, topic: str, value: bytes | None, *, key: bytes | None = None,
             partition: int | None = None, headers: list | None = None) -> None:
        kwargs = {"key": key, "headers": headers}
        if partition is not None:
            kwargs["partition"] = partition
        produce(self.producer, topic, value, on_delivery=self.tracker, **kwargs)
        self.sent += 1

    def send_record(self, topic: str, schema: str, record: dict, **kwargs) -> None:
        self.send(topic, codec().encode(schema, record), **kwargs)


class Stage(Protocol):
    name: str

    def topics(self) -> list[str]: ...

    def handle(self, msg: Message, out: Output) -> None:
        """Process one input record (never raises for bad input: dead-letter it)."""

    def tick(self, out: Output) -> bool:
        """Called after each batch; do timed work. True asks for a commit now."""

    def after_flush(self) -> None:
        """Everything produced so far is acknowledged: save local state (before the commit)."""

    def safe_offsets(self) -> list[TopicPartition]:
        """Offsets to commit once all output so far is delivered."""

    def on_assign(self, consumer, partitions: list[TopicPartition]) -> None: ...

    def on_revoke(self, partitions: list[TopicPartition]) -> None: ...

    def close(self, out: Output) -> None: ...


class StopFlag:
    """SIGTERM / SIGINT ask the loop to stop after the current batch; a second Ctrl-C kills."""

    def __init__(self) -> None:
        self.stopped = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        log.info("signal %s: finishing the current batch, then committing and exiting", signum)
        self.stopped = True
        signal.signal(signal.SIGINT, signal.default_int_handler)


class DeliveryFailed(RuntimeError):
    pass


STOP_FLUSH_SECONDS = 30.0  # how long a stopping stage waits for an absent broker


class StageRunner:
    """Runs one stage. ``make_stage`` builds the stage object (state loaded from disk), so that
    after an output delivery failure the runner can start over from the last commit in-process,
    exactly as a restarted process would."""

    def __init__(self, config: Config, make_stage: Callable[[], Stage], stop: StopFlag | None = None):
        self.config = config
        self.make_stage = make_stage
        self.stop = stop or StopFlag()
        self.transactional = config.streaming.delivery == "exactly_once"
        self.processed = 0
        self.transactions = 0
        self._warned: dict[str, float] = {}
        self._open()

    def _open(self) -> None:
        self.stage = self.make_stage()
        self.tracker = DeliveryTracker()
        extra = {"client.id": f"salka-{self.stage.name}"}
        if self.transactional:
            # Unique per process: with KIP-447 fencing is by consumer group generation, so the
            # id need not survive restarts.
            extra["transactional.id"] = (f"{self.config.streaming.group_prefix}.{self.stage.name}."
                                         f"{uuid.uuid4().hex[:12]}")
        self.producer = make_producer(self.config, **extra)
        self.out = Output(self.producer, self.tracker)
        self.consumer = make_consumer(self.config, self.stage.name,
                                      **{"client.id": f"salka-{self.stage.name}"})
        if self.transactional:
            self.producer.init_transactions(60)
            self.producer.begin_transaction()
            log.info("%s: exactly-once delivery, transactional.id %s", self.stage.name,
                     extra["transactional.id"])
        self._last_commit = time.monotonic()

    def _discard(self) -> None:
        """Drop clients and in-memory state without committing anything."""
        try:
            self.producer.purge()
            self.producer.flush(0)
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("%s: closing clients after a failure: %s", self.stage.name, exc)

    def flush(self) -> None:
        """Wait until every output so far is acknowledged, however long the broker is away."""
        waited = 0.0
        while (remaining := self.producer.flush(5.0)) > 0:
            waited += 5.0
            log.warning("%s: %d output records not yet acknowledged after %.0fs; waiting for the "
                        "broker", self.stage.name, remaining, waited)
            if self.stop.stopped and waited >= STOP_FLUSH_SECONDS:
                # Asked to stop and the broker is away: exit without committing; the input is
                # redelivered to whoever runs next.
                raise DeliveryFailed(f"{remaining} output records unacknowledged while stopping")
        if self.tracker.failures:  # permanent errors only (message.timeout.ms is infinite)
            raise DeliveryFailed(f"output delivery failed: {self.tracker.failures[0]}")

    def commit(self) -> None:
        """Flush outputs, refuse to commit past anything undelivered, then commit."""
        if self.transactional:
            return self._commit_transaction()
        self.flush()
        self.stage.after_flush()  # outputs are durable: stage state may now move forward
        offsets = self.stage.safe_offsets()
        if offsets:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:  # broker away or group rebalancing: retried next time
                self._warn("commit", f"offset commit failed, will retry: {exc.args[0].str()}")
                return
            log.debug("%s committed %s", self.stage.name, [(tp.partition, tp.offset) for tp in offsets])
        self._last_commit = time.monotonic()

    def _commit_transaction(self) -> None:
        """Exactly-once: this batch's outputs and its input offsets commit atomically
        (consume-transform-produce, KIP-447). A failure aborts the transaction and stops the
        stage; a restart resumes from the last committed transaction."""
        self.flush()
        offsets = self.stage.safe_offsets()
        try:
            if offsets:
                self.producer.send_offsets_to_transaction(
                    offsets, self.consumer.consumer_group_metadata(), 60)
            self.producer.commit_transaction(60)
        except KafkaException as exc:
            log.error("%s: transaction failed (%s): aborting", self.stage.name, exc.args[0].str())
            if exc.args[0].txn_requires_abort():
                self.producer.abort_transaction(60)
            raise
        self.stage.after_flush()  # outputs are committed: stage state may now move forward
        self.transactions += 1
        self.producer.begin_transaction()
        self._last_commit = time.monotonic()

    def _warn(self, key: str, text: str, every: float = 10.0) -> None:
        """Log a recurring problem once per ``every`` seconds, not once per poll."""
        now = time.monotonic()
        if now - self._warned.get(key, -every) >= every:
            self._warned[key] = now
            log.warning("%s: %s", self.stage.name, text)

    def _on_assign(self, consumer, partitions) -> None:
        log.info("%s assigned %s", self.stage.name, [f"{p.topic}[{p.partition}]" for p in partitions])
        self.stage.on_assign(consumer, partitions)

    def _on_revoke(self, consumer, partitions) -> None:
        log.info("%s revoked %s", self.stage.name, [f"{p.topic}[{p.partition}]" for p in partitions])
        try:
            self.commit()
        except KafkaException as exc:  # losing the group: redelivery covers it
            log.warning("%s: commit on revoke failed: %s", self.stage.name, exc)
        self.stage.on_revoke(partitions)

    def run(self) -> int:
        self.stop.install()
        backoff = 1.0
        while True:
            try:
                self._loop()
                break
            except DeliveryFailed as exc:
                # E.g. a broker that lost an idempotent producer's state on restart ("out of
                # order sequence number"). Nothing past the last commit is trusted: start over
                # from it with fresh clients and state, as a restarted process would.
                log.error("%s: %s; restarting from the last commit in %.0fs", self.stage.name,
                          exc, backoff)
                self._discard()
                if self.stop.stopped:
                    return 1
                time.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                self._open()
        log.info("%s stopped cleanly after %d records%s", self.stage.name, self.processed,
                 f" in {self.transactions} transactions" if self.transactional else "")
        return 0

    def _loop(self) -> None:
        self.consumer.subscribe(self.stage.topics(), on_assign=self._on_assign,
                                on_revoke=self._on_revoke)
        interval = self.config.streaming.commit_interval_seconds
        batch = self.config.streaming.poll_batch
        log.info("%s started, reading %s", self.stage.name, ", ".join(self.stage.topics()))
        while not self.stop.stopped:
            for msg in self.consumer.consume(batch, timeout=0.2):
                if msg.error():
                    self._consumer_error(msg.error())
                    continue
                self.stage.handle(msg, self.out)
                self.processed += 1
            self.producer.poll(0)
            wants_commit = self.stage.tick(self.out)
            if wants_commit or time.monotonic() - self._last_commit >= interval:
                self.commit()
        self.stage.close(self.out)
        self.commit()
        self.consumer.close()

    def _consumer_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        self._warn(f"consume-{err.code()}", f"consumer error (librdkafka retries): {err.str()}")


def header(msg: Message, name: str) -> str | None:
    for key, value in msg.headers() or []:
        if key == name and value is not None:
            return value.decode("utf-8", errors="replace")
    return None


def decode_or_dead_letter(stage, msg: Message, out: Output,
                          expected: tuple[str, ...]) -> tuple[str, dict] | None:
    """Decode an internal-topic record; one that is not a record of ``expected`` schemas goes to
    the dead-letter topic with the reason (and counts in ``stage.counts``), and the stage goes on."""
    from pipeline.records import dead_letter  # records imports the learner: keep this module light

    try:
        return codec().decode(msg.value(), expected=expected)
    except DecodeError as exc:
        log.warning("%s: %s[%d]@%d: %s", stage.name, msg.topic(), msg.partition(), msg.offset(), exc)
        record = dead_letter(stage.name, msg.topic(), msg.partition(), msg.offset(), str(exc),
                             msg.value())
        out.send_record(stage.config.topics.dead_letters, "salka.DeadLetter", record)
        stage.counts["dead_letters"] += 1
        return None


def assign_from(consumer, partitions: list[TopicPartition], offset: int | None) -> None:
    """Take the assigned partitions from the position a stage saved with its state (None: from
    the start), not from the group's committed offset, so state and input position agree."""
    for tp in partitions:
        tp.offset = offset if offset is not None else OFFSET_BEGINNING
    consumer.assign(partitions)
