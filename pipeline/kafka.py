"""confluent-kafka clients built in one place: salka's defaults, then the user's librdkafka
settings from ``kafka:`` (TLS/SASL included, passed through unchanged), then what a stage must
set itself (group id, offset handling). Secrets are never logged."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Collection
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.brokerwatch import (
    CONNECTION_FAILURES,
    RepeatFilter,
    TopicState,
    librdkafka_line,
    mismatch_problem,
    partition_mismatches,
    require_broker,
)
from pipeline.config import Config, ConfigError
from pipeline.logs import redact

log = logging.getLogger(__name__)
# librdkafka repeats a connection error on every reconnect (~20 lines/s while a broker is down).
LIBRDKAFKA_LOG = logging.getLogger("librdkafka")
LIBRDKAFKA_LOG.addFilter(CONNECTION_FAILURES)  # first: it sees the repeats the next one drops
LIBRDKAFKA_LOG.addFilter(RepeatFilter())


class SharedSectionFilter(logging.Filter):
    """Drops librdkafka's CONFWARN that a producer property is ignored by a consumer (or the
    reverse): the one ``kafka:`` section configures every client, so a user's ``linger.ms`` or
    ``fetch.wait.max.ms`` is meant for the other kind, and each stage would otherwise start with
    such a line. Other CONFWARN lines (a deprecated or unused property) still show."""

    IGNORED = re.compile(r"is an? (producer|consumer) property and will be ignored by this "
                         r"(consumer|producer) instance")

    def filter(self, record: logging.LogRecord) -> bool:
        facility, text = librdkafka_line(record)
        return facility != "CONFWARN" or self.IGNORED.search(text) is None


LIBRDKAFKA_LOG.addFilter(SharedSectionFilter())

CONSUMER_DEFAULTS: dict[str, Any] = {
    "auto.offset.reset": "earliest",
    # The embedded broker holds a group join for session.timeout.ms / 2: keep it short.
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
    # A waiting fetch is not woken by new data on the embedded broker: a hop costs ~half of this,
    # and every idle consumer's fetches cost the broker CPU. benchmarks/latency.py, 4 alternating
    # runs each on 2 cores: 20 ms gave broker 13.1-13.4 CPU s and model-ready p99 0.84-1.32 s
    # (median 1.15); 50 ms 10.4-11.4 s and 0.53-1.04 s (median 0.74), the same p50.
    "fetch.wait.max.ms": 50,
    # A trainer may spend minutes on one window between polls.
    "max.poll.interval.ms": 1_800_000,
    # Records fetched ahead of the stage, so that a backlog costs a stage the same memory whether
    # it holds 100k events or 3M. The queue caps below are only checked before a fetch: what
    # bounds the prefetch is the size of a fetch answer, 256 KB a partition, 1 MB in all
    # (librdkafka: 1 MB / 50 MB). benchmarks/memory.py, tokenizer and windower over a backlog of
    # 100k / 1M events: 16 MB / 10k records a partition and librdkafka's fetch sizes peaked at
    # 61/110 and 59/104 MB; 4 MB / 2k alone at 68/98 and 69/89; with these fetch sizes, 59/59
    # and 51/56 MB. A user's fetch.max.bytes below message.max.bytes is refused by librdkafka:
    # consumer_config raises this default with a larger message.max.bytes.
    "max.partition.fetch.bytes": 262_144,
    "fetch.max.bytes": 1_048_576,
    "queued.max.messages.kbytes": 4096,  # librdkafka: 64 MB
    "queued.min.messages": 2000,  # a partition (librdkafka: 100k)
    # After a fetch that fills the queue past those caps, librdkafka waits this long before the
    # next fetch of that partition (its default, 1000 ms, idles a stage that drains a small queue
    # in less: a consumer spending 15 us a record over a 500k-record backlog read 19k records/s
    # with 16 MB / 10k records, 14k with small fetches as well, 60k with both and 10 ms).
    "fetch.queue.backoff.ms": 10,
}
PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "compression.type": "lz4",
    "message.max.bytes": 8_388_608,
    # Never give up on a record while the broker is away: a stage waits (flush blocks, with log
    # lines) rather than dropping output or committing input whose output was lost.
    "message.timeout.ms": 0,
    # Records produced and not yet acknowledged, held in RAM: 20k / 32 MB (librdkafka: 100k /
    # 1 GB). A stage's commit flushes every streaming.commit_interval_seconds, so in a steady run
    # the queue holds about one interval of output (a tokenizer over a 1M-line backlog peaked at
    # the same RSS with a 10k / 16 MB cap as without); the cap bounds the rest (a long interval,
    # a slow broker). produce() waits on a full queue: back-pressure, never loss. The byte cap
    # must stay above message.max.bytes, or a record of the largest size never fits:
    # producer_config raises this default with a larger message.max.bytes.
    "queue.buffering.max.messages": 20_000,
    "queue.buffering.max.kbytes": 32_768,
}
# Settings a stage relies on for at-least-once: never overridable from the config.
CONSUMER_FORCED: dict[str, Any] = {"enable.auto.commit": False, "enable.auto.offset.store": False}
# A kafka: section (or one --set kafka.KEY) adds to these, as every other section adds to its
# defaults: --set kafka.client.id=x alone must not lose bootstrap.servers.
DEFAULT_SETTINGS: dict[str, Any] = dict(Config().kafka)


def user_settings(config: Config) -> dict[str, Any]:
    # KAFKA_BOOTSTRAP_SERVERS is read with the config (pipeline/configenv.py), below --set.
    return {**DEFAULT_SETTINGS, **config.kafka}


def redacted(settings: dict[str, Any]) -> dict[str, Any]:
    return redact(settings)  # the one list of secret-named keys: pipeline/logs.py


def message_max_bytes(settings: dict[str, Any]) -> int | None:
    """``message.max.bytes`` in ``settings`` (0 when unset), written as a number or as a string
    ("100000000" in YAML, which librdkafka takes too); None when it is no number, which
    client() then reports in one line."""
    try:
        return int(settings.get("message.max.bytes", 0))
    except (TypeError, ValueError):
        return None


def consumer_config(config: Config, group: str, **explicit: Any) -> dict[str, Any]:
    chosen = {**user_settings(config), "group.id": f"{config.streaming.group_prefix}.{group}",
              **explicit}
    settings = {**CONSUMER_DEFAULTS, **chosen, **CONSUMER_FORCED}
    largest = message_max_bytes(chosen)  # librdkafka's default is below our fetch cap
    if "fetch.max.bytes" not in chosen and largest is not None:  # our cap only
        settings["fetch.max.bytes"] = max(settings["fetch.max.bytes"], largest)
    return settings


def producer_config(config: Config, **explicit: Any) -> dict[str, Any]:
    chosen = {**user_settings(config), **explicit}
    settings = {**PRODUCER_DEFAULTS, **chosen}
    largest = message_max_bytes(settings)
    if "queue.buffering.max.kbytes" not in chosen and largest is not None:  # our cap only
        settings["queue.buffering.max.kbytes"] = max(
            settings["queue.buffering.max.kbytes"], -(-largest // 1024) + 1024)
    return settings


def client(factory, settings: dict[str, Any]):
    """``factory(settings)`` (Producer, Consumer, AdminClient); a setting librdkafka refuses
    (a ``kafka:`` typo or bad value) is a ConfigError naming it, not a traceback."""
    try:
        return factory(settings)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else None
        if not isinstance(error, KafkaError) or error.code() != KafkaError._INVALID_ARG:
            raise
        raise ConfigError(f"kafka: {error.str()}: fix or remove it under kafka: (librdkafka's "
                          f"CONFIGURATION.md lists its settings and values){_set_by(error.str())}") from None


def _set_by(problem: str) -> str:
    """Which environment variable set the key librdkafka names (in quotes), if one did."""
    from pipeline.configenv import variable_for

    named = re.search(r'"([^"]+)"', problem)
    try:
        variable = named and variable_for(("kafka", named.group(1)), os.environ)
    except ConfigError:  # a malformed variable is said where the config is read
        return ""
    return f"; it comes from the environment variable {variable}" if variable else ""


def make_consumer(config: Config, group: str, **explicit: Any) -> Consumer:
    settings = consumer_config(config, group, **explicit)
    log.debug("consumer settings: %s", redacted(settings))
    return client(Consumer, {**settings, "logger": LIBRDKAFKA_LOG})


def make_producer(config: Config, **explicit: Any) -> Producer:
    settings = producer_config(config, **explicit)
    log.debug("producer settings: %s", redacted(settings))
    return client(Producer, {**settings, "logger": LIBRDKAFKA_LOG})


def make_admin(config: Config) -> AdminClient:
    # With a logger, librdkafka's lines go through logging (served by poll), not raw to stderr.
    return client(AdminClient, {**user_settings(config), "logger": LIBRDKAFKA_LOG})


def bootstrap_servers(config: Config) -> str:
    return str(user_settings(config).get("bootstrap.servers", "?"))


def require_reachable(config: Config) -> None:
    """For one-shot commands: ``BrokerUnreachable`` (one line, exit 1) after a few seconds."""
    require_broker(make_admin(config), bootstrap_servers(config))


def topic_plan(config: Config) -> dict[str, int]:
    """Topic -> partitions. Windows has as many as tokens (the windower forwards each event to its
    tokens partition's number; scorers share them); scores keeps one: the archiver reads it whole.
    Sessions only with sessions.entity: a deployment without session scores neither creates it
    nor has its stages wait for it (pipeline/brokerwatch.py watches these topics)."""
    t = config.topics
    return {
        t.raw: t.partitions,
        t.tokens: t.partitions,
        t.windows: t.partitions,
        t.models: 1,
        t.scores: 1,
        t.dead_letters: 1,
        t.late: 1,
        t.alerts: 1,
        **({t.sessions: 1} if config.sessions.entity else {}),
    }


class TopicMismatch(RuntimeError):
    """A topic of salka's exists with another partition count than the config's."""


def create_topics(config: Config, timeout: float = 30.0, only: Collection[str] | None = None) -> list[str]:
    """Create salka's topics (``only``: those of them) that do not exist yet; returns the names
    created. Raises TopicMismatch, creating nothing, when one exists with another partition
    count: the stages would stop on it (pipeline/brokerwatch.py), and a broker that creates a
    topic on first use (as the embedded one does for ``pipeline produce`` before
    ``create-topics``) makes one so."""
    admin = make_admin(config)
    metadata = require_broker(admin, bootstrap_servers(config)).topics
    existing = set(metadata)
    plan = {name: parts for name, parts in topic_plan(config).items() if only is None or name in only}
    # No partitions yet: being created (by a create-topics beside this one), not wrong.
    seen = {name: TopicState(None, len(found.partitions)) for name, found in metadata.items()
            if found.partitions}
    mismatched = partition_mismatches(plan, seen)  # as the stages check them
    if mismatched:
        raise TopicMismatch(mismatch_problem(mismatched, config.topics.partitions))
    # Only the newest announcement per model matters; a broker that ignores the setting (the
    # embedded one) keeps them all, which scorers read the same way. Session scores are keyed
    # "<window>/<session>" and a window re-trained after a restart sends the same values again:
    # compaction drops only those repeats, and keeps every window's scores (no time retention).
    compact = {"cleanup.policy": "compact"}
    settings = {config.topics.models: compact, config.topics.sessions: compact}
    wanted = [
        NewTopic(name, num_partitions=parts, replication_factor=config.topics.replication_factor,
                 config=settings.get(name, {}))
        for name, parts in plan.items()
        if name not in existing
    ]
    created = []
    if not wanted:
        return created
    for name, future in admin.create_topics(wanted, operation_timeout=timeout).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    wait_for_topics(admin, [t.topic for t in wanted], timeout)
    return created


def wait_for_topics(admin: AdminClient, names: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        topics = admin.list_topics(timeout=timeout).topics
        if all(n in topics and topics[n].partitions and not topics[n].error for n in names):
            return
        time.sleep(0.1)
    raise TimeoutError(f"topics {names} not visible after {timeout}s")


def partition_count(client: Consumer | Producer | AdminClient, topic: str, timeout: float = 30.0) -> int:
    metadata = client.list_topics(topic, timeout=timeout).topics[topic]
    if metadata.error is not None:
        raise KafkaException(metadata.error)
    return len(metadata.partitions)


class DeliveryTracker:
    """Collects failed produce acknowledgements; a stage commits input offsets only when nothing
    failed.

    ``in_order`` (an idempotent producer's tracker): a partition's acknowledgements must come in
    offset order, and one at an offset not past the last, or without an offset, is a failure
    too. The embedded broker (Tansu on s3://), SIGKILLed while an idempotent producer had batches
    in flight, answered their retries as duplicates and never stored them (at every one of 8
    restarts): librdkafka then reports such a batch delivered, its first record without an
    offset and the others at offsets it counts from 0. A real cluster answers so only for a
    retry it did store, and librdkafka also reports a request that may have been stored as
    delivered without an offset once a later one succeeds. Counted as a failure, the stage
    starts over from its last commit and sends its output again (the sinks drop what was stored
    twice), where it would otherwise commit past lost records."""

    def __init__(self, in_order: bool = False) -> None:
        self.failures: list[str] = []
        self.in_order = in_order
        self._last: dict[tuple[str, int], int] = {}  # (topic, partition) -> last offset acknowledged

    def __call__(self, err: KafkaError | None, msg) -> None:
        if err is not None:
            self._fail(msg, err.str())
        elif self.in_order:
            where, offset = (msg.topic(), msg.partition()), msg.offset()
            last = self._last.get(where)
            if offset is None or offset < 0:
                self._fail(msg, f"acknowledged without an offset after offset {last} (as a "
                                "duplicate, or as possibly stored): whether the broker stored it "
                                "is unknown")
            elif last is not None and offset <= last:
                self._fail(msg, f"acknowledged at offset {offset}, not past offset {last}: the "
                                "broker lost records it had acknowledged")
            else:
                self._last[where] = offset

    def _fail(self, msg, why: str) -> None:
        self.failures.append(f"{msg.topic()} [{msg.partition()}]: {why}")
        # One cause (a purged queue, a fenced producer) fails every queued record: say a few.
        if len(self.failures) <= LOGGED_FAILURES:
            log.error("delivery failed to %s [%s]: %s%s", msg.topic(), msg.partition(), why,
                      "; further failures are counted, not logged"
                      if len(self.failures) == LOGGED_FAILURES else "")


LOGGED_FAILURES = 5  # delivery failures a tracker logs one by one


def delivery_tracker(config: Config, **explicit: Any) -> DeliveryTracker:
    """The tracker for ``make_producer(config, **explicit)``'s deliveries: it checks their order
    when that producer acknowledges in order."""
    return DeliveryTracker(in_order=acknowledges_in_order(producer_config(config, **explicit)))


def acknowledges_in_order(settings: dict[str, Any]) -> bool:
    """Whether a producer with these settings gets each partition's acknowledgements in offset
    order: an idempotent one does (a transactional one is idempotent); without idempotence a
    retried batch may land after a later one."""
    idempotent = str(settings.get("enable.idempotence", False)).strip().lower()
    return idempotent in {"true", "t", "1"} or "transactional.id" in settings  # librdkafka's trues


def produce(producer: Producer, topic: str, value: bytes | None, key: bytes | str | None = None,
            partition: int | None = None, headers: list | None = None, *, on_delivery,
            **kwargs) -> None:
    """Produce, waiting (serving delivery reports) while the local queue is full: never drop.
    Topic, value, key and partition go to the client positionally (partition -1 is librdkafka's
    "let the partitioner choose", its default): a tokenizer produces ~50k records/s, and
    building keyword dicts per record cost it ~2.5 us each."""
    partition = -1 if partition is None else partition
    while True:
        try:
            producer.produce(topic, value, key, partition, on_delivery=on_delivery, headers=headers,
                             **kwargs)
            return
        except BufferError:
            if len(producer) == 0:  # nothing queued and still no room: it would wait forever
                raise BufferError(
                    f"a {len(value or b'')}-byte record to {topic} is larger than the producer's "
                    "queue: raise kafka: queue.buffering.max.kbytes above message.max.bytes / 1024"
                ) from None
            producer.poll(0.1)
