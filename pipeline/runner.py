"""The one consume -> process -> produce -> flush -> commit loop every stage runs.

A stage is a plain object (see ``Stage``); this module owns the Kafka clients, signals and
commits. Input offsets are committed only after every output produced so far is acknowledged
(flush, then check for delivery failures), and only up to what the stage says is safe, so a crash
at any instant means redelivery, never loss.
"""

from __future__ import annotations

import gc
import logging
import math
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from pipeline import poison
from pipeline.brokerwatch import UNREACHABLE_CODES, BrokerLost, TopicsMismatch, stage_watch
from pipeline.config import Config
from pipeline.kafka import (
    DeliveryTracker,
    delivery_tracker,
    make_consumer,
    make_producer,
    partition_count,
    produce,
)
from pipeline.serde import DecodeError, codec
from pipeline.topicrecords import LINE_HEADER, dead_letter, line_number
from pipeline.transactional import FENCED, TransactionalId

if TYPE_CHECKING:
    from pipeline.metrics import StageMetrics

log = logging.getLogger(__name__)


class Output:
    """What a stage may do with its results: produce records (Avro-encoded or raw bytes)."""

    def __init__(self, producer, tracker: DeliveryTracker, limit: int = 8_388_608):
        self.producer = producer
        self.tracker = tracker
        self.by_topic: dict[str, int] = {}  # records sent per topic (pipeline/metrics.py reads it)
        self.limit = limit  # the producer's message.max.bytes
        self._refused: list[tuple[str, dict, bytes | None, int]] = []  # dead letters to cut

    def send(self, topic: str, value: bytes | None, *, key: bytes | None = None,
             partition: int | None = None, headers: list | None = None) -> None:
        produce(self.producer, topic, value, key, partition, headers, on_delivery=self.tracker)
        self.by_topic[topic] = self.by_topic.get(topic, 0) + 1

    def send_record(self, topic: str, schema: str, record: dict, **kwargs) -> None:
        self.send(topic, codec().encode(schema, record), **kwargs)

    def send_dead_letter(self, topic: str, record: dict, *, key: bytes | None = None,
                         max_bytes: int | None = None) -> None:
        """Send a dead letter whole, or cut to fit (pipeline.poison): never fail for its size.
        A broker that refuses it as too large gets it again smaller (``resend_refused``)."""
        if key is not None and poison.budget(self.limit, key) < self.limit // 2:
            key = None  # a hostile writer's key would leave the letter no room: the letter names its source
        max_bytes = min(max_bytes or self.limit, poison.budget(self.limit, key))
        data, _ = poison.fit_dead_letter(record, max_bytes)

        def delivered(err, msg) -> None:
            if err is not None and poison.is_size_error(err) and max_bytes > poison.RESEND_FLOOR:
                log.warning("%s refused a %d-byte dead letter as too large: sending it cut",
                            msg.topic(), len(msg.value() or b""))
                self._refused.append((topic, record, key, max(poison.RESEND_FLOOR, min(
                    poison.RESEND_FIRST, max_bytes // 2))))
            else:
                self.tracker(err, msg)

        produce(self.producer, topic, data, key=key, on_delivery=delivered)
        self.by_topic[topic] = self.by_topic.get(topic, 0) + 1

    def resend_refused(self) -> bool:
        """Send again, smaller, the dead letters the broker refused as too large; True if any."""
        refused, self._refused = self._refused, []
        for topic, record, key, max_bytes in refused:
            self.send_dead_letter(topic, record, key=key, max_bytes=max_bytes)
        return bool(refused)


class Stage(Protocol):
    name: str

    def topics(self) -> list[str]: ...

    def consume_batch(self) -> int:
        """Records to ask for per consume() call."""

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
ACK_STALL_SECONDS = 60.0  # a reachable broker that acknowledges nothing this long: start over
ABORT_SECONDS = 10.0  # how long a failed exactly-once stage waits to abort its transaction
UNASSIGNED_SECONDS = 60.0  # a stage with no partition this long says so (once)


class StageRunner:
    """Runs one stage. ``make_stage`` builds the stage object (state loaded from disk), so that
    after an output delivery failure the runner can start over from the last commit in-process,
    exactly as a restarted process would."""

    def __init__(self, config: Config, make_stage: Callable[[], Stage], stop: StopFlag | None = None,
                 metrics: StageMetrics | None = None):
        self.config = config
        self.make_stage = make_stage
        self.stop = stop or StopFlag()
        self.metrics = metrics  # pipeline/metrics.py; None: metrics off
        self.transactional = config.streaming.delivery == "exactly_once"
        self.processed = 0
        self.transactions = 0
        self.transactional_id: TransactionalId | None = None  # pipeline/transactional.py
        self.fenced = False
        self._in_rebalance = False  # in the consumer's assign / revoke callback
        self._held = False  # partitions paused: given only some of those it must read
        self._warned: dict[str, float] = {}
        self._open()

    def _open(self) -> None:
        self.stage = self.make_stage()
        extra = {"client.id": f"salka-{self.stage.name}"}
        if self.transactional:
            if self.transactional_id is None:  # kept across restarts in this process
                self.transactional_id = TransactionalId(self.config, self.stage.name)
            extra["transactional.id"] = self.transactional_id.value
        self.producer = make_producer(self.config, **extra)
        self.tracker = delivery_tracker(self.config, **extra)
        self.out = Output(self.producer, self.tracker, poison.message_limit(self.config))
        self.consumer = make_consumer(self.config, self.stage.name,
                                      **{"client.id": f"salka-{self.stage.name}"})
        self.watch = stage_watch(self.config, self.stage.name, self.consumer)
        if self.transactional:
            self.watch.wait_for_topics(lambda: self.stop.stopped)  # not a 60 s timeout traceback
            self.producer.init_transactions(60)
            self.producer.begin_transaction()
            log.info("%s: exactly-once delivery, transactional.id %s", self.stage.name,
                     extra["transactional.id"])
        self._last_commit = time.monotonic()

    def _stop_if_fenced(self, exc: Exception) -> None:
        """Fenced: another process took this one's transactional.id. Stop, not start over. The
        client raises that once, from whichever call meets it first, and then only "fatal
        error" (or, from flush(), a SystemError); a transactional call says which again."""
        if not self.transactional:
            return
        error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
        if not (isinstance(error, KafkaError) and error.code() in FENCED):
            if isinstance(error, KafkaError) and not (error.fatal() or error.code() == KafkaError._FATAL):
                return
            try:
                self.producer.abort_transaction(1)
                return
            except KafkaException as probe:
                error = probe.args[0] if probe.args else None
            if not (isinstance(error, KafkaError) and error.code() in FENCED):
                return
        self.fenced = True  # leave the group at once, committing nothing on the way out
        if not self._in_rebalance:  # a consumer is not closed from its own callback
            try:
                self.consumer.close()
            except (KafkaException, RuntimeError, SystemError):
                pass
        raise self.transactional_id.fenced() from None

    def _learn_if_fenced(self, consumer, partitions: list[TopicPartition]) -> None:
        """Exactly-once, given only some partitions: the other process of this stage took this
        one's transactional.id if it started later. A transaction that reaches the coordinator
        (the group's own offsets, committed again; 0 where none) tells the fenced one now, so
        that it stops and the newer one goes on, instead of both waiting."""
        offsets = [TopicPartition(tp.topic, tp.partition, max(tp.offset, 0))
                   for tp in consumer.committed(partitions, timeout=10)]
        try:
            self.producer.send_offsets_to_transaction(offsets, consumer.consumer_group_metadata(), 30)
            self.producer.commit_transaction(30)
            self.producer.begin_transaction()
        except KafkaException as exc:
            self._stop_if_fenced(exc)
            raise

    def _discard(self) -> None:
        """Drop clients and in-memory state without committing anything. Exactly-once: abort
        the open transaction first, so that read_committed consumers of its partitions go on at
        once (the next clients' init_transactions, with the same transactional.id, would abort
        it too, but only once the broker answers again)."""
        if self.transactional:
            try:  # purges what is still queued, as purge() below does
                self.producer.abort_transaction(ABORT_SECONDS)
            except KafkaException as exc:  # e.g. broker away, or a fatal producer error
                self._stop_if_fenced(exc)
                log.warning("%s: could not abort the open transaction (%s); the broker ends it "
                            "after transaction.timeout.ms", self.stage.name, exc.args[0].str())
        try:
            self.producer.purge()
            self.producer.flush(0)
            self.consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("%s: closing clients after a failure: %s", self.stage.name, exc)

    def flush(self) -> None:
        """Wait until every output so far is acknowledged, however long the broker is away."""
        waited, stalled, before = 0.0, 0.0, None
        while (remaining := self.producer.flush(5.0)) > 0:
            waited += 5.0
            # Raises BrokerLost when the topics were recreated (a restarted in-memory broker
            # never acknowledges); an unreachable broker is said once by the watch.
            if self.watch.check(force=True):
                log.warning("%s: %d output records not yet acknowledged after %.0fs; waiting for "
                            "the broker", self.stage.name, remaining, waited)
                stalled = stalled + 5.0 if remaining == before else 0.0
                if stalled >= ACK_STALL_SECONDS:
                    raise DeliveryFailed(f"the broker acknowledged none of {remaining} records "
                                         f"in {stalled:.0f}s")
            before = remaining
            if self.stop.stopped and waited >= STOP_FLUSH_SECONDS:
                # Asked to stop and the broker is away: exit without committing; the input is
                # redelivered to whoever runs next.
                raise DeliveryFailed(f"{remaining} output records unacknowledged while stopping")
        if self.out.resend_refused():  # dead letters the broker refused as too large, now cut
            return self.flush()
        if self.tracker.failures:  # permanent errors only (message.timeout.ms is infinite)
            failures = self.tracker.failures
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise DeliveryFailed(f"output delivery failed: {failures[0]}{more}")

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
                if self.metrics is not None:
                    self.metrics.commit_failed()
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
            self._stop_if_fenced(exc)  # an abort would wait its whole timeout, then fail
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
        if partitions:
            self._unassigned_since = None
        self._in_rebalance = True
        try:
            self.watch.check(force=True)  # a rebalance follows a broker restart: look before reading
            self.stage.on_assign(consumer, partitions)
            self._hold_if_partial(consumer, partitions)
        finally:
            self._in_rebalance = False

    def _hold_if_partial(self, consumer, partitions: list[TopicPartition]) -> None:
        """A stage that must read every partition of its topics (``needs_every_partition``: the
        windower's watermark, the trainer's windows) given only some: another one of it runs in
        the group. It reads nothing until it is given them all (the other one stops)."""
        if not getattr(self.stage, "needs_every_partition", False) or not partitions:
            return
        wanted = {(topic, p) for topic in self.stage.topics()
                  for p in range(partition_count(consumer, topic))}
        if {(tp.topic, tp.partition) for tp in partitions} >= wanted:
            if self._held:  # a partition paused before stays paused when assigned again
                consumer.assign(partitions)
                consumer.resume(partitions)
                self._held = False
                log.info("%s: given every partition: reading", self.stage.name)
            return
        consumer.assign(partitions)
        consumer.pause(partitions)
        self._held = True
        if self.transactional:
            self._learn_if_fenced(consumer, partitions)
        log.error("%s: the group gave this process %d of the %d partitions it must read: another "
                  "member of group %s holds the rest: a second %s (only one may run: each would see "
                  "part of the stream, and they share state_dir), or one just stopped that the group "
                  "drops within session.timeout.ms. Reading nothing until this one has them all",
                  self.stage.name, len(partitions), len(wanted),
                  f"{self.config.streaming.group_prefix}.{self.stage.name}", self.stage.name)

    def _on_revoke(self, consumer, partitions) -> None:
        log.info("%s revoked %s", self.stage.name, [f"{p.topic}[{p.partition}]" for p in partitions])
        if self.fenced:
            return
        self._in_rebalance = True
        try:
            self.commit()
        except KafkaException as exc:  # losing the group: redelivery covers it
            log.warning("%s: commit on revoke failed: %s", self.stage.name, exc)
        finally:
            self._in_rebalance = False
        self.stage.on_revoke(partitions)

    def run(self) -> int:
        self.stop.install()
        settle_start_up_objects()
        backoff, processed_at_failure = 1.0, -1
        while True:
            try:
                self._loop()
                break
            except DeliveryFailed as exc:
                if self.processed > processed_at_failure:  # progress since the last one: a new outage
                    backoff = 1.0
                processed_at_failure = self.processed
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
            except (BrokerLost, TopicsMismatch):
                self._discard()  # commit nothing: the user must reset or fix (the message says how)
                raise
            except SystemError as exc:  # confluent-kafka's flush() of a producer in a fatal state
                self._stop_if_fenced(exc)
                raise
            except KafkaException as exc:
                self._stop_if_fenced(exc)
                # A fatal producer error (e.g. an idempotent producer's sequence refused by a
                # restarted broker): say "lost data" when that is the cause.
                if exc.args and isinstance(exc.args[0], KafkaError) and exc.args[0].fatal():
                    self.watch.check(force=True)
                raise
        log.info("%s stopped cleanly after %d records%s", self.stage.name, self.processed,
                 f" in {self.transactions} transactions" if self.transactional else "")
        return 0

    def _loop(self) -> None:
        # Says once if the broker is unreachable; TopicsMismatch for wrong partition counts,
        # BrokerLost for topics recreated since this stage last ran.
        self.watch.wait_for_topics(lambda: self.stop.stopped)
        if self.stop.stopped:  # stopped before the broker answered: nothing read, nothing to commit
            self.consumer.close()
            return
        self._unassigned_since: float | None = time.monotonic()
        self.consumer.subscribe(self.stage.topics(), on_assign=self._on_assign,
                                on_revoke=self._on_revoke)
        interval = self.config.streaming.commit_interval_seconds
        batch = self.stage.consume_batch()
        wait = self.config.streaming.poll_wait_seconds
        log.info("%s started, reading %s", self.stage.name, ", ".join(self.stage.topics()))
        while not self.stop.stopped:
            msgs = self.consumer.consume(batch, timeout=wait)
            started = time.perf_counter()
            for msg in msgs:
                if msg.error():
                    self._consumer_error(msg.error())
                    continue
                self._handle(msg)
                self.processed += 1
            self.producer.poll(0)
            self.watch.check()  # every few seconds: reachable? topics and offsets intact?
            self._say_if_unassigned()
            for said in dead_letter_logs(self.stage):
                said.tick(self.stage.name)
            wants_commit = self.stage.tick(self.out)
            if wants_commit or time.monotonic() - self._last_commit >= interval:
                self.commit()
            if self.metrics is not None:
                self.metrics.after_batch(self, msgs, started)
        self.stage.close(self.out)
        for said in dead_letter_logs(self.stage):
            said.tick(self.stage.name, final=True)
        self.commit()
        if self.metrics is not None:  # the final figures, for a scrape while stopping
            self.metrics.after_batch(self, [], time.perf_counter())
        self.consumer.close()

    def _say_if_unassigned(self) -> None:
        """Once, when the group has given this stage no partition for UNASSIGNED_SECONDS: a
        replica beyond the partition count waits so (by design), but a stuck group does too."""
        since = self._unassigned_since
        if since is not None and time.monotonic() - since >= UNASSIGNED_SECONDS:
            self._unassigned_since = None
            log.warning("%s: no partition assigned after %.0fs in group %s: fine for a replica "
                        "beyond its topics' partition count, which waits as a standby; otherwise "
                        "another member holds them (a stage of the same name running elsewhere?) "
                        "or the group is stuck (`pipeline status` shows its members)",
                        self.stage.name, UNASSIGNED_SECONDS,
                        f"{self.config.streaming.group_prefix}.{self.stage.name}")

    def _handle(self, msg: Message) -> None:
        """A stage whose records are independent (``isolates_records``) dead-letters a record it
        fails on, cut to fit if need be, and goes on: a restart would only meet it again.
        Stateful stages fail as before; their input is salka's own, decoded and checked."""
        try:
            self.stage.handle(msg, self.out)
        except Exception as exc:
            if (not getattr(self.stage, "isolates_records", False) or isinstance(exc, DeliveryFailed)
                    or not poison.is_poison(exc)):
                raise
            reason = f"{self.stage.name} failed on this record: {type(exc).__name__}: {exc}"
            send_to_dead_letters(self.stage, msg, self.out, poison.truncate(reason),
                                 line_number(header(msg, LINE_HEADER)) or None, failure=exc)

    def _consumer_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.fatal():
            raise KafkaException(err)
        if err.code() in UNREACHABLE_CODES:  # the watch says it once, and when it is back
            return
        self._warn(f"consume-{err.code()}", f"consumer error (librdkafka retries): {err.str()}")


def settle_start_up_objects() -> None:
    """Move what exists after start-up (imports, torch's objects, the config; hundreds of
    thousands) out of the garbage collector's reach, for the life of the process. Every event
    leaves a few objects alive for a batch, so full collections come about once a second in a
    busy scorer, and each one walked that whole heap: ~90 ms, 7% of a word d128 scorer's time
    (benchmarks/throughput.py with gc.callbacks timing). Garbage is collected first, so none of
    it is kept."""
    gc.collect()
    gc.freeze()


def header(msg: Message, name: str) -> str | None:
    for key, value in msg.headers() or []:
        if key == name and value is not None:
            return value.decode("utf-8", errors="replace")
    return None


def coordinates(msg: Message) -> dict:
    """A record's source as structured log fields (``extra=``; see pipeline/logs.py)."""
    return {"topic": msg.topic(), "partition": msg.partition(), "offset": msg.offset()}


def decode_or_dead_letter(stage, msg: Message, out: Output,
                          expected: tuple[str, ...]) -> tuple[str, dict] | None:
    """Decode an internal-topic record; one that is not a record of ``expected`` schemas goes to
    the dead-letter topic with the reason (and counts in ``stage.counts``), and the stage goes on."""
    try:
        return codec().decode(msg.value(), expected=expected)
    except DecodeError as exc:
        send_to_dead_letters(stage, msg, out, str(exc))
        return None


SHOWN_DEAD_LETTERS = 20  # as replay logs its first malformed lines


class DeadLetterLog:
    """Whether a dead letter is logged one by one: the first ``shown`` of a burst, then one line
    a period with how many more went (also when the burst is over: ``tick``). A source that
    sends nothing but bad records (another format, a config that does not fit) would otherwise
    write a log line per record; the dead-letter topic keeps every one. A period without any
    starts a new burst, with its own ``shown``."""

    def __init__(self, what: str = "records dead-lettered", shown: int = SHOWN_DEAD_LETTERS,
                 every: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.what, self.shown, self.every, self.clock = what, shown, every, clock
        self.logged = 0  # one by one, in this burst
        self.unsaid = 0
        self.total = 0
        self._last = self._said_at = -math.inf

    def one_by_one(self, stage: str) -> bool:
        now = self.clock()
        if now - self._last >= self.every and not self.unsaid:  # quiet for a period: a new burst
            self.logged, self._said_at = 0, -math.inf
        self._last = now
        self.total += 1
        if self.logged < self.shown:
            self.logged += 1
            return True
        if self._said_at == -math.inf:
            log.warning("%s: more than %d %s: further ones are counted here once a minute (the "
                        "dead-letter topic has every one)", stage, self.shown, self.what)
            self._said_at = now
        self.unsaid += 1
        self.tick(stage)
        return False

    def tick(self, stage: str, final: bool = False) -> None:
        """Say how many went unsaid, once a period (``final``: now, as the stage stops)."""
        if self.unsaid and (final or self.clock() - self._said_at >= self.every):
            log.warning("%s: %d more %s since the last such line (%d in all)", stage, self.unsaid,
                        self.what, self.total)
            self._said_at, self.unsaid = self.clock(), 0


def dead_letter_logs(stage) -> tuple[DeadLetterLog, DeadLetterLog]:
    """A stage's two logs of dead letters: bad input, and records it failed on (an error with its
    traceback, a bug maybe): twenty bad lines must not hide the first traceback."""
    logs = getattr(stage, "dead_letter_logs", None)
    if logs is None:
        logs = stage.dead_letter_logs = (DeadLetterLog(),
                                         DeadLetterLog("records the stage failed on (dead-lettered)"))
    return logs


def send_to_dead_letters(stage, msg: Message, out: Output, reason: str, line: int | None = None,
                         failure: Exception | None = None) -> None:
    """The one way an input record goes to the dead-letter topic: logged with its coordinates
    (``failure``: an error with its traceback, not bad input; the first few, then counted: see
    DeadLetterLog), sent whole or cut to fit (``Output.send_dead_letter``), counted in
    ``stage.counts``; the stage goes on."""
    reason = poison.truncate(reason)  # it may quote the record: logged once per record
    where = f"{stage.name}: {msg.topic()}[{msg.partition()}]@{msg.offset()}"
    fields = {**coordinates(msg), **({"line": line} if line else {})}
    said = dead_letter_logs(stage)[failure is not None]
    if said.one_by_one(stage.name):
        if failure is None:
            log.warning("%s%s: %s", where, f" (line {line})" if line else "", reason, extra=fields)
        else:
            log.error("%s: %s", where, reason, exc_info=failure, extra=fields)
    record = dead_letter(stage.name, msg.topic(), msg.partition(), msg.offset(), reason,
                         msg.value(), line or None)
    out.send_dead_letter(stage.config.topics.dead_letters, record, key=msg.key())
    stage.counts["dead_letters"] = stage.counts.get("dead_letters", 0) + 1
