"""Scorer stage: each event scored as it arrives, with the model trained through its window's
predecessor. Any number of replicas share the windows partitions (and the late topic) in one
consumer group.

The models topic says which model scores which windows (pipeline/modelstore.py). An event whose
model is not announced yet is not held in memory: its partition is paused and rewound to it, so it
waits in Kafka (back-pressure) and is read again once the model comes. A model whose file does not
match its announcement, or that another configuration made, is refused with one error line, and
its windows wait for a good one: a scorer never scores with the wrong model.

Late events (their window had closed when they came) are scored the same way, with their window's
predecessor model, and marked late; nobody trains on them and the archiver leaves them out.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict

from confluent_kafka import Message, TopicPartition

from pipeline import scorewire
from pipeline.config import Config
from pipeline.learner import WindowLearner
from pipeline.modelspec import fixed_encoder, make_masker
from pipeline.modelstore import ModelRefused, load
from pipeline.parsing import LineParser
from pipeline.runner import Output, decode_or_dead_letter
from pipeline.scorewire import ScoredEventWriter, WindowedEventReader, Wire
from pipeline.serde import DecodeError, codec
from pipeline.stages.base import BaseStage
from pipeline.topicrecords import record_to_event

log = logging.getLogger(__name__)
EVENT, LATE, COMPLETE = "salka.WindowedEvent", "salka.LateEvent", "salka.WindowComplete"
MODELS_CACHED = 4  # partitions may be a window apart; a late event may need an older model
RETRY_REFUSED_SECONDS = 10.0  # a missing file may yet appear (an object store's delay)


class ModelIndex:
    """The announcements read so far, one per model: which one scores a window."""

    def __init__(self) -> None:
        self.by_model: dict[int | None, dict] = {}
        # find() per window until the next add(): it scans every model, and runs once per record
        # (measured: a scan of 1,000 announcements ~85 us per record, of 10,000 ~1.4 ms)
        self.found: dict[int, dict | None] = {}

    def add(self, record: dict) -> None:
        key = record["trained_through"]
        known = self.by_model.get(key)
        if known is not None:  # a window closed empty stays closed: a range never shrinks
            record = {**record, "serves_through": max(record["serves_through"], known["serves_through"])}
        self.by_model[key] = record
        self.found.clear()

    def find(self, window: int) -> dict | None:
        """The announcement of the model for ``window``: trained through an earlier window,
        serving every window after it up to at least this one. None: not known yet."""
        if window not in self.found:
            if len(self.found) >= 4096:  # windows of hostile event times: stay bounded
                self.found.clear()
            self.found[window] = self._scan(window)
        return self.found[window]

    def _scan(self, window: int) -> dict | None:
        best = None
        for through, record in self.by_model.items():
            low = -math.inf if through is None else through
            if low < window <= record["serves_through"] and (best is None or low > best[0]):
                best = (low, record)
        return best[1] if best else None


class ScorerStage(BaseStage):
    name = "scorer"

    def __init__(self, config: Config):
        super().__init__(config)
        self.model_fields = LineParser(config.input).model_fields
        self.masker = make_masker(config)
        # Avro by hand (pipeline/scorewire.py): the codec's results at a fraction of its cost
        self.wire_reader = WindowedEventReader(self.model_fields, self.masker, fixed_encoder(config))
        self.wire_writer = ScoredEventWriter(config)
        log.info("scorer: records read and written by pipeline/scorewire.py, %s", "compiled (setup.py)"
                 if scorewire.COMPILED else "as Python (not compiled at install, or SALKA_PURE_PYTHON)")
        self.index = ModelIndex()
        self.models: OrderedDict[tuple, WindowLearner] = OrderedDict()  # (through, sha256) -> model
        self.refused: dict[tuple, float] = {}  # announcement identity -> when refused
        self.reader = None  # the models topic, from its start (pipeline/topicread.py)
        self.consumer = None
        # (window, late, Event, its model, its value's spans or None) to score at the end of this batch
        self.batch: list[tuple[int, bool, object, WindowLearner, Wire | None]] = []
        # window -> its model, until the next tick reads announcements: model_for once per
        # window and batch, not once per record
        self.batch_models: dict[int, WindowLearner] = {}
        self.waiting: dict[tuple[str, int], int] = {}  # paused partition -> window it waits for
        self.next_offsets: dict[tuple[str, int], int] = {}
        self.counts = {"scored": 0, "late": 0, "waits": 0, "refused": 0, "dead_letters": 0}
        self.observer = None  # pipeline/metrics.ScorerObserver when metrics are on

    def topics(self) -> list[str]:
        return [self.config.topics.windows, self.config.topics.late]

    def consume_batch(self) -> int:
        # Every record of a call is scored together at its tick (one group a window), cut into
        # batches in length order: over a backlog, larger groups pad less (char d128 scorer over
        # 40k events: 2.9k events/s with 500, 3.6k with 2000; offline, whole windows: 4.4k).
        return self.config.streaming.score_poll_batch

    def on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        self.consumer = consumer
        # librdkafka keeps a partition paused across a rebalance: one this scorer paused before
        # it was revoked would never be read again once it comes back.
        consumer.assign(partitions)
        consumer.resume(partitions)
        if self.reader is None:
            from pipeline.topicread import TopicReader

            self.reader = TopicReader(self.config, [self.config.topics.models], "scorer-models")

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.waiting.pop((tp.topic, tp.partition), None)
            self.next_offsets.pop((tp.topic, tp.partition), None)

    # ------------------------------------------------------------------ models

    def read_announcements(self) -> None:
        if self.reader is None:
            return
        for msg in self.reader.poll(timeout=0):
            try:
                _, record = codec().decode(msg.value(), expected=("salka.ModelAnnouncement",))
            except DecodeError as exc:
                log.error("scorer: %s[%d]@%d is not a model announcement (%s): ignored",
                          msg.topic(), msg.partition(), msg.offset(), exc)
                continue
            self.index.add(record)

    def model_for(self, window: int) -> WindowLearner | None:
        """The checked model for ``window``, or None while there is none to use."""
        record = self.index.find(window)
        if record is None:
            return None
        key = (record["trained_through"], record["sha256"])
        model = self.models.get(key)
        if model is not None:
            self.models.move_to_end(key)
            return model
        refused_at = self.refused.get((*key, record["url"], record["fingerprint"]))
        if refused_at is not None and time.monotonic() - refused_at < RETRY_REFUSED_SECONDS:
            return None
        try:
            model = load(self.config, record)
        except ModelRefused as exc:
            if refused_at is None:
                log.error("scorer: refusing %s; its windows wait for a good model", exc)
                self.counts["refused"] += 1
            self.refused[(*key, record["url"], record["fingerprint"])] = time.monotonic()
            return None
        log.info("scorer: model trained through window %s loaded for windows up to %d",
                 record["trained_through"], record["serves_through"])
        self.models[key] = model
        while len(self.models) > MODELS_CACHED:
            self.models.popitem(last=False)
        return model

    # ------------------------------------------------------------------ records

    def handle(self, msg: Message, out: Output) -> None:
        where = (msg.topic(), msg.partition())
        if where in self.waiting:  # paused and rewound: this batch's rest is read again later
            return
        fast = self.wire_reader.read(msg.value())  # None: not a plain WindowedEvent, or in doubt
        decoded = decode_or_dead_letter(self, msg, out, (EVENT, LATE, COMPLETE)) if fast is None else None
        if fast is not None or (decoded is not None and decoded[0] != COMPLETE):
            if fast is not None:
                (window, event, wire), late = fast, False
            else:
                name, record = decoded
                window, event, wire, late = record["window"], None, None, name == LATE
            model = self.batch_models.get(window)
            if model is None:
                model = self.model_for(window)
                if model is None:
                    self._wait(msg, window)
                    return
                self.batch_models[window] = model
            if event is None:
                event = record_to_event(record["event"], self.model_fields, self.masker)
            self.batch.append((window, late, event, model, wire))
            if self.observer is not None:  # score latency is timed from this record's timestamp
                self.observer.consumed(msg)
        self.next_offsets[where] = msg.offset() + 1

    def _wait(self, msg: Message, window: int) -> None:
        """Leave this record and the rest of its partition in Kafka until the model comes."""
        tp = TopicPartition(msg.topic(), msg.partition(), msg.offset())
        self.consumer.pause([tp])
        self.consumer.seek(tp)
        self.waiting[(msg.topic(), msg.partition())] = window
        self.counts["waits"] += 1
        log.debug("scorer: %s[%d]@%d waits for the model of window %d", msg.topic(),
                  msg.partition(), msg.offset(), window)

    def tick(self, out: Output) -> bool:
        self._score_batch(out)
        self.batch_models.clear()  # announcements may change which model serves a window
        self.read_announcements()
        ready = [where for where, window in self.waiting.items() if self.model_for(window) is not None]
        if ready:
            self.consumer.resume([TopicPartition(topic, partition) for topic, partition in ready])
            for where in ready:
                del self.waiting[where]
        return False

    def _score_batch(self, out: Output) -> None:
        groups: dict[tuple[int, bool], tuple[WindowLearner, list]] = {}
        wires: dict[int, Wire] = {}  # id(Event) -> its spans: the batch holds every Event meanwhile
        for window, late, event, model, wire in self.batch:
            groups.setdefault((window, late), (model, []))[1].append(event)
            if wire is not None:
                wires[id(event)] = wire
        self.batch = []
        topic, write = self.config.topics.scores, self.wire_writer.write
        for (window, late), (model, events) in sorted(groups.items()):
            for score in model.score(window, events):
                out.send(topic, write(score, late, wires.get(id(score.event))), partition=0)
            self.counts["scored"] += len(events)
            self.counts["late"] += len(events) if late else 0
        if self.observer is not None:
            self.observer.scored()

    def safe_offsets(self) -> list[TopicPartition]:
        return [TopicPartition(t, p, o) for (t, p), o in sorted(self.next_offsets.items())]

    def close(self, out: Output) -> None:
        self._score_batch(out)
        if self.reader is not None:
            self.reader.close()
        super().close(out)
