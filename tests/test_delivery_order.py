"""DeliveryTracker's order check: an idempotent producer's acknowledgements come in offset order
per partition, so one without an offset or at an offset not past the last is a lost record
(tests/test_outage.py shows the embedded broker doing it after a SIGKILL)."""

from __future__ import annotations

import pytest
from stage_fakes import FakeMessage

from pipeline.config import config_from_dict
from pipeline.kafka import DeliveryTracker, acknowledges_in_order, producer_config


def ack(tracker: DeliveryTracker, topic: str, partition: int, offset: int | None) -> None:
    tracker(None, FakeMessage(topic, partition, offset, b"v"))


def test_acknowledgements_in_offset_order_pass_per_partition():
    tracker = DeliveryTracker(in_order=True)
    for topic, partition, offset in [("a", 0, 0), ("a", 1, 0), ("a", 0, 1), ("b", 0, 0), ("a", 1, 7),
                                     ("a", 0, 5)]:
        ack(tracker, topic, partition, offset)
    assert tracker.failures == []


@pytest.mark.parametrize(("offset", "why"), [
    (None, "acknowledged without an offset after offset 4 (as a duplicate, or as possibly stored): "
           "whether the broker stored it is unknown"),
    (-1, "acknowledged without an offset after offset 4 (as a duplicate, or as possibly stored): "
         "whether the broker stored it is unknown"),
    (0, "acknowledged at offset 0, not past offset 4: the broker lost records it had acknowledged"),
    (4, "acknowledged at offset 4, not past offset 4: the broker lost records it had acknowledged"),
])
def test_an_acknowledgement_not_past_the_last_is_a_failure(offset, why):
    tracker = DeliveryTracker(in_order=True)
    ack(tracker, "scores", 0, 3)
    ack(tracker, "scores", 0, 4)
    ack(tracker, "scores", 0, offset)
    assert tracker.failures == [f"scores [0]: {why}"]
    ack(tracker, "scores", 0, 5)  # the order goes on from the last good offset
    assert len(tracker.failures) == 1


def test_a_first_acknowledgement_without_an_offset_is_a_failure():
    tracker = DeliveryTracker(in_order=True)
    ack(tracker, "scores", 0, None)
    assert tracker.failures == ["scores [0]: acknowledged without an offset after offset None (as a "
                                "duplicate, or as possibly stored): whether the broker stored it is "
                                "unknown"]


def test_without_idempotence_the_order_is_not_checked():
    """A retried batch of a producer without idempotence may land after a later one."""
    tracker = DeliveryTracker()
    for offset in (5, 3, None):
        ack(tracker, "scores", 0, offset)
    assert tracker.failures == []


def test_errors_are_failures_as_before():
    class Error:
        def str(self) -> str:
            return "Broker: Message size too large"

    tracker = DeliveryTracker(in_order=True)
    tracker(Error(), FakeMessage("raw", 2, None, b"v"))
    assert tracker.failures == ["raw [2]: Broker: Message size too large"]


@pytest.mark.parametrize(("kafka", "explicit", "expected"), [
    ({}, {}, True),  # salka's default producer is idempotent
    ({"enable.idempotence": False}, {}, False),
    ({"enable.idempotence": "false"}, {}, False),
    ({"enable.idempotence": "true"}, {}, True),
    ({"enable.idempotence": 1}, {}, True),  # librdkafka reads 1, "1" and "t" as true too
    ({"enable.idempotence": "1"}, {}, True),
    ({"enable.idempotence": "t"}, {}, True),
    ({"enable.idempotence": 0}, {}, False),
    ({}, {"transactional.id": "t"}, True),
])
def test_which_producers_acknowledge_in_order(kafka, explicit, expected):
    config = config_from_dict({"kafka": {"bootstrap.servers": "127.0.0.1:9", **kafka}})
    assert acknowledges_in_order(producer_config(config, **explicit)) is expected


def test_stage_runners_check_the_order_of_their_acknowledgements(tmp_path):
    """The wiring: a StageRunner's tracker checks the order with salka's (idempotent) producer
    defaults, and not when a user turns idempotence off. Clients connect lazily: no broker."""
    from pipeline.runner import StageRunner
    from pipeline.stages.windower import WindowerStage

    for kafka, expected in (({}, True), ({"enable.idempotence": False}, False)):
        config = config_from_dict({"kafka": {"bootstrap.servers": "127.0.0.1:9", **kafka},
                                   "streaming": {"state_dir": str(tmp_path)}})
        runner = StageRunner(config, lambda config=config: WindowerStage(config))
        try:
            assert runner.tracker.in_order is expected
            assert runner.out.tracker is runner.tracker
        finally:
            runner._discard()
