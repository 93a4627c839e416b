"""``pipeline status``: how far behind each stage is, and which window the model last trained on.

Per stage consumer group (``<group_prefix>.<stage>``): each input partition's committed offset,
end offset and lag (end - committed; a group that never committed lags by the whole partition, as
it would start from the beginning). Plus the trainer's newest checkpoint (the last trained window)
and the newest model announced to the scorers on the models topic.

End offsets come from fetch responses, not from a "latest" ListOffsets answer: the embedded broker
answers that with the start of the last batch + 1 (KAFKA-NOTES). A throwaway consumer, in no group,
fetches from just before that answer and reads the high watermark the response carries
(``get_watermark_offsets(cached=True)``); on Apache Kafka both agree.

No torch here: the model window is read from the checkpoint's file name, not from its contents,
and the announcement is a plain Avro record.
"""

from __future__ import annotations

import datetime
import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, TopicPartition

from pipeline.brokerwatch import require_broker
from pipeline.config import Config, model_store_location
from pipeline.kafka import bootstrap_servers, make_admin, make_consumer

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(-?\d+)\.pt$")  # stages/trainer.py: after_flush
WATERMARK_WAIT = 5.0  # seconds to wait for a fetch response per partition before falling back


def stage_inputs(config: Config) -> dict[str, list[str]]:
    """Stage -> the topics its consumer group reads (each stage's ``topics()``)."""
    t = config.topics
    return {"tokenizer": [t.raw], "windower": [t.tokens], "trainer": [t.windows],
            "scorer": [t.windows, t.late], "archiver": [t.scores], "alerter": [t.scores]}


def group_id(config: Config, stage: str) -> str:
    return f"{config.streaming.group_prefix}.{stage}"  # as pipeline/kafka.py consumer_config


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    start: int  # the partition's first offset (low watermark)
    end: int  # the offset the next record will get (high watermark)
    committed: int | None  # None: the group committed nothing here
    exact: bool = True  # False: the end offset is the broker's ListOffsets answer (no fetch came)

    @property
    def lag(self) -> int:
        return partition_lag(self.committed, self.start, self.end)


def partition_lag(committed: int | None, start: int, end: int) -> int:
    """Records the group has still to read: from its committed offset, or from the partition's
    start when it committed nothing (auto.offset.reset=earliest); never negative."""
    position = start if committed is None else max(committed, start)
    return max(0, end - position)


@dataclass
class GroupStatus:
    stage: str
    group: str
    partitions: list[PartitionLag] = field(default_factory=list)
    missing_topics: list[str] = field(default_factory=list)
    state: str | None = None  # the broker's group state (Stable, Empty, ...), None if unknown
    members: int | None = None

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)

    @property
    def committed_any(self) -> bool:
        return any(p.committed is not None for p in self.partitions)


@dataclass(frozen=True)
class ModelStatus:
    directory: str
    window: int | None = None  # the last window the model trained on
    checkpoint: str | None = None
    saved_at: str | None = None  # ISO 8601, UTC
    checkpoints: int = 0


@dataclass
class StatusReport:
    bootstrap: str
    groups: list[GroupStatus]
    model: ModelStatus
    store: str = ""  # streaming.model_store, where scorers read models
    announced: dict | None = None  # the newest salka.ModelAnnouncement (None: none yet)

    @property
    def total_lag(self) -> int:
        return sum(g.lag for g in self.groups)

    def as_dict(self) -> dict:
        return {
            "bootstrap": self.bootstrap,
            "total_lag": self.total_lag,
            "groups": [{**{k: v for k, v in asdict(g).items() if k != "partitions"},
                        "lag": g.lag,
                        "partitions": [{**asdict(p), "lag": p.lag} for p in g.partitions]}
                       for g in self.groups],
            "model": asdict(self.model),
            "model_store": self.store,
            "announced": self.announced,
        }

    def format(self) -> str:
        return format_report(self)


def last_checkpoint(directory: Path) -> ModelStatus:
    """The newest trainer checkpoint by window, from the file names alone."""
    found = []
    if directory.is_dir():
        for path in directory.iterdir():
            match = CHECKPOINT_NAME.match(path.name)
            if match and path.is_file():
                found.append((int(match.group(1)), path))
    if not found:
        return ModelStatus(str(directory))
    window, path = max(found)
    try:
        saved = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
        saved_at = saved.isoformat(timespec="seconds")
    except OSError:  # rotated away by the trainer just now
        saved_at = None
    return ModelStatus(str(directory), window, path.name, saved_at, len(found))


# ---------------------------------------------------------------------------- formatting


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def lag_line(report: StatusReport) -> str:
    """One line for the demo's summary: each stage group's lag."""
    groups = ", ".join(f"{g.stage} {g.lag}" for g in report.groups)
    return f"consumer lag per group: {groups} (total {report.total_lag}; pipeline status for more)"


def format_report(report: StatusReport) -> str:
    lines = [f"Kafka at {report.bootstrap}; total lag {report.total_lag} record(s)", ""]
    header = f"{'stage':<10} {'group':<28} {'topic':<28} {'part':>4} {'committed':>10} {'end':>10} {'lag':>8}"
    lines.append(header)
    for group in report.groups:
        for p in group.partitions:
            end = f"{'~' if not p.exact else ''}{p.end}"
            lines.append(f"{group.stage:<10} {group.group:<28} {p.topic:<28} {p.partition:>4} "
                         f"{_cell(p.committed):>10} {end:>10} {p.lag:>8}")
        notes = []
        if group.state is not None:
            notes.append(f"{group.members} member(s), {group.state}")
        if group.partitions and not group.committed_any:
            notes.append("no offsets committed yet (stage not started?)")
        notes += [f"topic {t} does not exist: run `pipeline create-topics`" for t in group.missing_topics]
        lines.append(f"{group.stage:<10} {'lag ' + str(group.lag):<28} {'; '.join(notes)}".rstrip())
    if any(not p.exact for g in report.groups for p in g.partitions):
        lines.append("~: end offset as the broker's ListOffsets answer (no fetch response in time)")
    lines.append("")
    model = report.model
    if model.window is None:
        lines.append(f"model: no checkpoint in {model.directory} (no window trained yet, or the "
                     f"trainer's streaming.state_dir is elsewhere)")
    else:
        lines.append(f"model: trained through window {model.window} ({model.checkpoint} in "
                     f"{model.directory}, saved {model.saved_at}; {model.checkpoints} kept)")
    lines.append(announced_line(report.announced, report.store))
    return "\n".join(lines)


def announced_line(record: dict | None, store: str) -> str:
    if record is None:
        return f"scorers: no model announced yet (model store {store})"
    through = record["trained_through"]
    model = ("no model yet (empty losses)" if through is None
             else f"the model trained through window {through}")
    return (f"scorers: {model} scores windows up to {record['serves_through']}"
            f"{' (' + record['url'] + ')' if record['url'] else ''}; model store {store}")


def newest_announcement(config: Config, timeout: float = 10.0) -> dict | None:
    """The announcement serving the latest windows, read from the models topic (None: none, or
    the topic could not be read in ``timeout`` seconds)."""
    from pipeline.serde import DecodeError, codec
    from pipeline.topicread import read_topic

    newest = None
    try:
        for msg in read_topic(config, config.topics.models, timeout=timeout):
            try:
                _, record = codec().decode(msg.value(), expected=("salka.ModelAnnouncement",))
            except DecodeError:
                continue
            if newest is None or record["serves_through"] >= newest["serves_through"]:
                newest = record
    except TimeoutError:
        pass
    return newest


# ---------------------------------------------------------------------------- Kafka


def end_offsets(config: Config, partitions: list[tuple[str, int]],
                wait: float = WATERMARK_WAIT) -> dict[tuple[str, int], tuple[int, int, bool]]:
    """(topic, partition) -> (start, end, exact): the end from a fetch response's high watermark."""
    if not partitions:
        return {}
    # In no group, commits nothing; a hint past the end (some broker) resets near the end instead
    # of re-reading the whole partition.
    consumer = make_consumer(config, f"status-{uuid.uuid4().hex[:12]}",
                             **{"auto.offset.reset": "latest", "client.id": "salka-status"})
    try:
        hints = {}
        for topic, partition in partitions:
            hints[(topic, partition)] = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=10)
        consumer.assign([TopicPartition(t, p, max(low, high - 1)) for (t, p), (low, high) in hints.items()])
        found: dict[tuple[str, int], int] = {}
        deadline = time.monotonic() + wait
        while len(found) < len(hints) and time.monotonic() < deadline:
            consumer.consume(500, timeout=0.1)  # the records are dropped; only watermarks matter
            for (topic, partition) in hints:
                if (topic, partition) in found:
                    continue
                _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
                if high is not None and high >= 0:
                    found[(topic, partition)] = high
        return {key: (low, found.get(key, high), key in found) for key, (low, high) in hints.items()}
    finally:
        consumer.close()


def committed_offsets(admin, group: str,
                      partitions: list[tuple[str, int]]) -> dict[tuple[str, int], int | None]:
    """The group's committed offset per partition; None where it committed nothing."""
    if not partitions:
        return {}
    request = ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in partitions])
    (future,) = admin.list_consumer_group_offsets([request]).values()
    result = future.result()
    return {(tp.topic, tp.partition): (None if tp.offset < 0 else tp.offset)
            for tp in result.topic_partitions}


def group_states(admin, groups: list[str]) -> dict[str, tuple[str, int]]:
    """Group -> (state, members); groups the broker cannot describe are left out."""
    states = {}
    try:
        futures = admin.describe_consumer_groups(groups, request_timeout=10)
    except (KafkaException, NotImplementedError) as exc:
        log.debug("describe_consumer_groups failed: %s", exc)
        return states
    for group, future in futures.items():
        try:
            described = future.result()
        except KafkaException as exc:
            log.debug("describe %s failed: %s", group, exc)
            continue
        state = str(getattr(described.state, "name", described.state)).title()
        states[group] = (state, len(described.members))
    return states


def checkpoint_directory(config: Config) -> Path:
    return Path(config.streaming.state_dir) / "trainer"  # stages/trainer.py: checkpoint_dir


def collect(config: Config) -> StatusReport:
    """Ask the broker; ``BrokerUnreachable`` (one line, exit 1) when it does not answer."""
    admin = make_admin(config)
    bootstrap = bootstrap_servers(config)
    metadata = require_broker(admin, bootstrap)  # every topic: asking for one would auto-create it
    groups, wanted = [], {}
    for stage, topics in stage_inputs(config).items():
        status = GroupStatus(stage, group_id(config, stage))
        status.missing_topics = [t for t in topics if t not in metadata.topics]
        wanted[stage] = [(t, p) for t in topics if t in metadata.topics
                         for p in sorted(metadata.topics[t].partitions)]
        groups.append(status)
    ends = end_offsets(config, sorted({tp for parts in wanted.values() for tp in parts}))
    states = group_states(admin, [g.group for g in groups])
    for status in groups:
        committed = committed_offsets(admin, status.group, wanted[status.stage])
        status.partitions = [PartitionLag(t, p, ends[(t, p)][0], ends[(t, p)][1],
                                          committed.get((t, p)), ends[(t, p)][2])
                             for t, p in wanted[status.stage]]
        status.state, status.members = states.get(status.group, (None, None))
    announced = newest_announcement(config) if config.topics.models in metadata.topics else None
    return StatusReport(bootstrap, groups, last_checkpoint(checkpoint_directory(config)),
                        model_store_location(config.streaming), announced)
