"""Is the broker there, and is it still the broker we wrote to?

- An unreachable broker is said once, in one line, after a short wait: one-shot commands exit 1
  (``BrokerUnreachable``), stages keep retrying quietly and say when it is back.
- librdkafka's repeated connection errors (about 20 lines/s while a broker is down) are logged
  once per ``LOG_REPEAT_SECONDS`` (``RepeatFilter``).
- Broker data loss (an in-memory broker restarted, topics deleted and auto-created again) is
  detected by topic id and partition count (``TopicGuard``) and by a consumer position beyond the
  partition's log end; the stage stops with ``BrokerLost`` instead of waiting forever for
  acknowledgements or for records that will never come.

Both exceptions are ``click.ClickException``s: every command prints ``Error: <one line>`` and
exits 1 without a traceback, with no per-command handling. This module imports nothing from
``pipeline.kafka`` (which installs the log filter from here): clients come in as arguments.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import click
from confluent_kafka import KafkaError, KafkaException, TopicCollection

from pipeline.atomic import write_bytes_atomic  # the one atomic writer (fsync, rename, fsync dir)
from pipeline.safetext import printable

log = logging.getLogger(__name__)

REACH_TIMEOUT = 4.0  # how long a one-shot command tries before saying the broker is unreachable
PROBE_TIMEOUT = 3.0  # one metadata request of a stage's periodic check
CHECK_EVERY = 5.0  # seconds between a stage's checks of the broker and its topics
LOG_REPEAT_SECONDS = 30.0
UNREACHABLE_CODES = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
                     KafkaError._RESOLVE, KafkaError._MSG_TIMED_OUT}
NO_TOPIC_ID = "AAAAAAAAAAAAAAAAAAAAAA"  # brokers before Kafka 2.8 send the zero UUID


class BrokerUnreachable(click.ClickException):
    """No broker answered: the one line every command prints."""

    def __init__(self, bootstrap: str):
        super().__init__(unreachable_message(bootstrap))


class BrokerLost(click.ClickException):
    """The broker no longer holds what this pipeline wrote to it."""

    def __init__(self, bootstrap: str, problem: str):
        super().__init__(
            f"the Kafka broker at {bootstrap} lost data: {problem}. Nothing past the last commit "
            f"is trusted; stop every stage, delete streaming.state_dir and the archive, then run "
            f"`pipeline create-topics` and `pipeline produce` again (a memory:// broker loses "
            f"everything when it stops; s3:// storage is durable)")


def unreachable_message(bootstrap: str) -> str:
    """Why no broker answered, in one line: the last connection failure librdkafka logged when
    it was a TLS or SASL one (a wrong password is not a broker that is down)."""
    reason = CONNECTION_FAILURES.recent()
    if reason and SECURITY_FAILURE.search(reason):
        hint = ("check kafka.sasl.mechanism, kafka.sasl.username and kafka.sasl.password, and "
                "kafka.security.protocol" if "SASL" in reason or "uthenticat" in reason else
                "check kafka.security.protocol (SSL or SASL_SSL for a TLS listener, PLAINTEXT or "
                "SASL_PLAINTEXT otherwise) and kafka.ssl.ca.location")
        return f"cannot connect to the Kafka broker at {bootstrap}: {printable(reason)}; {hint}"
    return (f"cannot reach the Kafka broker at {bootstrap}: is it running? set "
            f"KAFKA_BOOTSTRAP_SERVERS or kafka.bootstrap.servers")


SECURITY_FAILURE = re.compile(r"SASL|SSL|TLS|[Aa]uthenticat|certificate|security\.protocol|handshake")


class ConnectionFailures(logging.Filter):
    """Keeps the last connection failure librdkafka logged (FAIL lines: the reason behind a
    "transport failure"), for unreachable_message; lets every line through."""

    RECENT_SECONDS = 60.0
    BROKER_PREFIX = re.compile(r"^\[thrd:[^\]]*\]: (\S+: )?")
    STATE_SUFFIX = re.compile(r" \(after \d+ms in state \w+\)$")

    def __init__(self):
        super().__init__()
        self.last: tuple[float, str] | None = None
        self.quiet = False  # while drain() serves a client's queue: record, print nothing

    def filter(self, record: logging.LogRecord) -> bool:
        facility, text = librdkafka_line(record)
        if facility == "FAIL":
            reason = self.STATE_SUFFIX.sub("", self.BROKER_PREFIX.sub("", text))
            self.last = (time.monotonic(), reason)
        return not self.quiet

    def drain(self, client) -> None:
        """Serve ``client``'s queued log lines to learn the reason, without printing them: the
        one line that follows says it."""
        self.quiet = True
        try:
            client.poll(0)
        finally:
            self.quiet = False

    def clear(self) -> None:
        """A broker answered: an older failure explains nothing to come."""
        self.last = None

    def recent(self) -> str | None:
        if self.last is None or time.monotonic() - self.last[0] > self.RECENT_SECONDS:
            return None
        return self.last[1]


CONNECTION_FAILURES = ConnectionFailures()  # on the librdkafka logger (pipeline/kafka.py)


def is_unreachable(exc: KafkaException) -> bool:
    err = exc.args[0] if exc.args else None
    return isinstance(err, KafkaError) and err.code() in UNREACHABLE_CODES


def librdkafka_line(record: logging.LogRecord) -> tuple[str, str]:
    """(facility, text) of a librdkafka log record: confluent-kafka logs
    ``"%s [%s] %s" % (facility, client, text)``."""
    args = record.args if isinstance(record.args, tuple) else ()
    if not args:
        return "", record.getMessage()
    return str(args[0]), str(args[-1])


class RepeatFilter(logging.Filter):
    """Lets one librdkafka connection-error line through per broker and ``every`` seconds:
    FAIL / ERROR facilities repeat on every reconnect attempt while a broker is down."""

    def __init__(self, every: float = LOG_REPEAT_SECONDS):
        super().__init__()
        self.every = every
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        facility, text = librdkafka_line(record)
        if facility not in ("FAIL", "ERROR"):
            return True
        key = f"{facility}:{text.split(']', 1)[0]}"  # "[thrd:host:port/id]" names the broker
        now = time.monotonic()
        if now - self._last.get(key, -self.every) < self.every:
            return False
        self._last[key] = now
        return True


def require_broker(admin, bootstrap: str, timeout: float = REACH_TIMEOUT):
    """The cluster metadata, or ``BrokerUnreachable`` after ``timeout`` seconds."""
    CONNECTION_FAILURES.clear()  # only this attempt's failures explain it
    try:
        metadata = admin.list_topics(timeout=timeout)
    except KafkaException as exc:
        if is_unreachable(exc):
            CONNECTION_FAILURES.drain(admin)  # the reason, for the message
            raise BrokerUnreachable(bootstrap) from None
        raise
    return metadata


@dataclass(frozen=True)
class TopicState:
    topic_id: str | None  # None: the broker does not send topic ids
    partitions: int


def describe_topics(admin, names: list[str], timeout: float = PROBE_TIMEOUT) -> dict[str, TopicState | None]:
    """Topic -> its id and partition count, or None where the broker does not have it. Raises
    KafkaException when the broker cannot be asked. Never creates a topic."""
    futures = admin.describe_topics(TopicCollection(names), request_timeout=timeout)
    states: dict[str, TopicState | None] = {}
    for name, future in futures.items():
        try:
            found = future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise
            states[name] = None
            continue
        topic_id = str(found.topic_id) if found.topic_id is not None else None
        states[name] = TopicState(None if topic_id == NO_TOPIC_ID else topic_id, len(found.partitions))
    return states


def topic_problems(expected: dict[str, int], seen: dict[str, TopicState | None],
                   known_ids: dict[str, str]) -> list[str]:
    """What says the broker lost data: a known topic gone or with another id."""
    problems = []
    for name in expected:
        state = seen.get(name)
        if state is None:
            if name in known_ids:
                problems.append(f"topic {name} no longer exists")
        elif name in known_ids and state.topic_id and state.topic_id != known_ids[name]:
            problems.append(f"topic {name} was deleted and created again (id {known_ids[name]}, "
                            f"now {state.topic_id})")
    return problems


def partition_mismatches(expected: dict[str, int],
                         seen: dict[str, TopicState | None]) -> list[tuple[str, int, int]]:
    """(topic, partitions it has, partitions the config gives it) where they differ: a config
    that does not match the topics, or topics the broker auto-created before `pipeline
    create-topics` ran."""
    return [(name, state.partitions, partitions) for name, partitions in expected.items()
            if (state := seen.get(name)) is not None and state.partitions != partitions]


def mismatch_problem(mismatches: list[tuple[str, int, int]], configured: int) -> str:
    """``partition_mismatches`` in one line, with the fix: ``configured`` is topics.partitions
    (salka's other topics have one partition, which no setting changes)."""
    said = [f"topic {name} has {has} partitions where the config says {wants}"
            f"{' (topics.partitions)' if wants == configured else ''}" for name, has, wants in mismatches]
    more = f"; and {len(said) - 2} more" if len(said) > 2 else ""
    counts = {has for _, has, _ in mismatches}
    if all(wants == configured for _, _, wants in mismatches) and len(counts) == 1:
        fix = (f"set topics.partitions to {counts.pop()}, or, if the broker created them on "
               f"first use (before `pipeline create-topics` ran), delete them and run "
               f"`pipeline create-topics`")
    else:  # salka's one-partition topics, or several counts: only new topics fix it
        fix = ("the broker created them on first use (before `pipeline create-topics` ran) or "
               "another config did: delete them and run `pipeline create-topics`")
    return f"{'; '.join(said[:2])}{more}: {fix}"


class TopicsMismatch(click.ClickException):
    """The topics' partition counts are not the config's: nothing is lost, the config or the
    topics are wrong."""

    exit_code = 2  # a config problem, as those found when the config is read

    def __init__(self, stage: str, mismatches: list[tuple[str, int, int]], configured: int):
        super().__init__(f"{stage}: {mismatch_problem(mismatches, configured)}")


def positions_past_end(positions: list[tuple[str, int, int, int]]) -> list[str]:
    """(topic, partition, position, log end) -> the partitions read past their log end: the
    records this consumer already read are no longer there. A log end < 0 is not known yet."""
    return [f"{topic}[{partition}] ends at offset {end} but this stage already read up to {position}"
            for topic, partition, position, end in positions if end >= 0 and position > end]


class TopicGuard:
    """Remembers the ids of a stage's topics (also across restarts, in ``id_file``) and reports
    whatever says the broker lost them."""

    def __init__(self, expected: dict[str, int], id_file: Path | None):
        self.expected = expected
        self.id_file = id_file
        self.known: dict[str, str] = {}
        if id_file is not None and id_file.exists():
            try:
                self.known = {str(k): str(v) for k, v in json.loads(id_file.read_text()).items()}
            except (OSError, ValueError, AttributeError):
                log.warning("ignoring unreadable %s", id_file)

    def remember(self, seen: dict[str, TopicState | None]) -> None:
        """The ids of topics found whole, for the next look (and the next process)."""
        new = {name: s.topic_id for name, s in seen.items() if s is not None and s.topic_id
               and self.known.get(name) != s.topic_id}
        if new:
            self.known.update(new)
            self._save()

    def missing(self, seen: dict[str, TopicState | None]) -> list[str]:
        return [name for name in self.expected if seen.get(name) is None]

    def _save(self) -> None:
        if self.id_file is None:
            return
        write_bytes_atomic(self.id_file, json.dumps(self.known, indent=1, sort_keys=True).encode())


class BrokerWatch:
    """A stage's periodic look at its broker: says once when it cannot be reached and when it is
    back, and raises ``BrokerLost`` when its topics or offsets say the data is gone.

    ``positions`` returns (topic, partition, position, log end) of the stage's consumer."""

    def __init__(self, name: str, admin, bootstrap: str, guard: TopicGuard,
                 positions: Callable[[], list[tuple[str, int, int, int]]] = list,
                 every: float = CHECK_EVERY, grace: float = REACH_TIMEOUT - PROBE_TIMEOUT,
                 configured_partitions: int = 1):
        self.name = name
        self.configured_partitions = configured_partitions  # topics.partitions
        self.admin = admin
        self.bootstrap = bootstrap
        self.guard = guard
        self.positions = positions
        self.every = every
        self.grace = grace
        self.reachable: bool | None = None  # None: not asked yet
        self.announced = False
        self._down_since: float | None = None
        self._next = 0.0
        self._said_missing = False
        self._said_unchecked = False

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def check(self, force: bool = False) -> bool:
        """Look now (or when due); True when the broker answered and the topics are whole."""
        if not force and not self.due():
            return bool(self.reachable)
        started = time.monotonic()
        try:
            seen = describe_topics(self.admin, list(self.guard.expected))
        except KafkaException as exc:
            self._next = time.monotonic() + self.every
            if not is_unreachable(exc):
                # E.g. no Describe permission on a cluster with ACLs: work on without the checks.
                if not self._said_unchecked:
                    log.warning("%s: cannot check the topics for broker data loss: %s",
                                self.name, exc.args[0].str() if exc.args else exc)
                    self._said_unchecked = True
                return True
            self._down(started)
            return False
        self._next = time.monotonic() + self.every
        self._up()
        missing = self.guard.missing(seen)
        problems = topic_problems(self.guard.expected, seen, self.guard.known)
        problems += positions_past_end(self.positions())
        if problems:
            more = f"; and {len(problems) - 2} more" if len(problems) > 2 else ""
            raise BrokerLost(self.bootstrap, "; ".join(problems[:2]) + more)
        mismatched = partition_mismatches(self.guard.expected, seen)
        if mismatched:  # before the ids are remembered: these topics may well be deleted
            raise TopicsMismatch(self.name, mismatched, self.configured_partitions)
        self.guard.remember(seen)
        if missing:
            if not self._said_missing:
                log.warning("%s: topics %s do not exist yet: run `pipeline create-topics`; "
                            "waiting", self.name, ", ".join(missing))
                self._said_missing = True
            return False
        return True

    def wait_for_topics(self, stopped: Callable[[], bool]) -> None:
        """Start-up: wait (quietly, saying it once) until the broker answers with every topic,
        then check their partition counts."""
        while not stopped() and not self.check(force=True):
            time.sleep(max(0.0, self._next - time.monotonic()))

    def _down(self, started: float) -> None:
        self.reachable = False
        if self._down_since is None:
            self._down_since = started
        if not self.announced and time.monotonic() - self._down_since >= self.grace:
            CONNECTION_FAILURES.drain(self.admin)  # the reason, for the message
            log.error("%s: %s; retrying quietly", self.name, unreachable_message(self.bootstrap))
            self.announced = True

    def _up(self) -> None:
        CONNECTION_FAILURES.clear()
        if self.announced:
            log.warning("%s: the Kafka broker at %s is reachable again", self.name, self.bootstrap)
        self.reachable = True
        self.announced = False
        self._down_since = None


def consumer_positions(consumer) -> list[tuple[str, int, int, int]]:
    """(topic, partition, position, log end) per assigned partition; the log end is the one the
    last fetch response carried (-1001 before any): the embedded broker's ListOffsets answer is
    too low, so it is not asked."""
    assigned = consumer.assignment()
    if not assigned:
        return []
    rows = []
    for tp in consumer.position(assigned):
        try:
            _, end = consumer.get_watermark_offsets(tp, cached=True)
        except KafkaException:
            continue
        rows.append((tp.topic, tp.partition, tp.offset, end if end is not None else -1))
    return rows


def stage_watch(config, name: str, consumer) -> BrokerWatch:
    """The watch over every salka topic for stage ``name``, remembering topic ids in its state
    directory so that a restarted stage also notices a broker that lost its topics meanwhile."""
    from pipeline.kafka import bootstrap_servers, make_admin, topic_plan  # kafka imports this module

    guard = TopicGuard(topic_plan(config), Path(config.streaming.state_dir) / f"{name}.topic-ids.json")
    return BrokerWatch(name, make_admin(config), bootstrap_servers(config), guard,
                       positions=lambda: consumer_positions(consumer),
                       configured_partitions=config.topics.partitions)
