"""Issue 13 (score latency): what the stages do on the way from a window's close to the model that
scores the next one, where the scorers' backlog grows.

The trainer reads a closed window back with the scorer's hand-written reader
(pipeline/scorewire.py), not the generic codec: the events it trains on must be the codec's, masked
alike, and a record that reader is in doubt about must still come through the codec.
"""

from __future__ import annotations

import pytest
from stage_fakes import RecordingOutput, encoded
from test_stages_inprocess import drive, make_config, window_events, windows_topic

from pipeline.learner import WindowLearner
from pipeline.modelspec import make_masker
from pipeline.parsing import LineParser
from pipeline.serde import codec
from pipeline.stages.trainer import TrainerStage
from pipeline.topicrecords import record_to_event
from pipeline.windowing import event_order


def trained_on(monkeypatch, stage: TrainerStage, messages) -> dict[int, list]:
    """Window -> the events ``read()`` gave the learner, in the order it gave them."""
    seen: dict[int, list] = {}
    real = WindowLearner.train_ordered

    def spy(self, window, read, total, on_progress=None):
        seen[window] = list(read())
        return real(self, window, read, total, on_progress)

    monkeypatch.setattr(WindowLearner, "train_ordered", spy)
    drive(stage, messages, RecordingOutput())
    return seen


def codec_events(config, messages) -> dict[int, list]:
    """What the trainer read before: every WindowedEvent through the codec and record_to_event,
    one per event identity, in event order."""
    fields, masker = LineParser(config.input).model_fields, make_masker(config)
    windows: dict[int, dict] = {}
    for msg in messages:
        name, record = codec().decode(msg.value())
        if name == "salka.WindowedEvent":
            event = record_to_event(record["event"], fields, masker)
            windows.setdefault(record["window"], {})[event.source] = event
    return {w: sorted(events.values(), key=event_order) for w, events in windows.items()}


@pytest.mark.parametrize("masked", [False, True])
def test_trainer_reads_a_window_back_as_the_codec_would(tmp_path, monkeypatch, masked):
    config = make_config(tmp_path, tokenizer={"mask": {"enabled": masked}})
    events = {w: window_events(w) for w in range(2)}
    for i, record in enumerate(events[1]):  # model text the masker rewrites: numbers, a path, an IP
        for field in record["fields"]:
            if field["name"] in ("auth_type", "dst_computer"):
                field["value"] = f"{field['value']} {i} /var/log/x{i} 10.0.0.{i}"
    messages = windows_topic(config, events, repeat=2)
    got = trained_on(monkeypatch, TrainerStage(config), messages)
    assert got == codec_events(config, messages)
    assert [len(got[w]) for w in (0, 1)] == [10, 10]
    masks = any("<num>" in value for e in got[1] for _, value in e.text_fields)
    assert masks == masked


def test_a_record_the_fast_reader_doubts_comes_through_the_codec(tmp_path, monkeypatch):
    config = make_config(tmp_path)
    messages = windows_topic(config, {0: window_events(0)})
    stage = TrainerStage(config)
    read = stage.wire_reader.read
    doubted = []

    class Doubting:  # every other record: what a schema change or an odd value gets
        def read(self, value):
            if len(doubted) % 2 == 0:
                doubted.append(value)
                return None
            doubted.append(None)
            return read(value)

    # the reader itself, not its method: the compiled build's (setup.py) allows no attribute
    monkeypatch.setattr(stage, "wire_reader", Doubting())
    got = trained_on(monkeypatch, stage, messages)
    assert any(v is not None for v in doubted)
    assert got == codec_events(config, messages)


def test_the_completion_record_is_not_read_by_the_fast_reader(tmp_path):
    """The reader takes WindowedEvent bytes only: a completion record (what the collector hands
    the trainer besides events) is refused, not misread as an event."""
    config = make_config(tmp_path)
    stage = TrainerStage(config)
    complete = encoded("salka.WindowComplete", {"window": 0, "count": 1, "watermark": None,
                                                "stage": "windower"})
    assert stage.wire_reader.read(complete) is None
    event = encoded("salka.WindowedEvent", {"window": 3, "event": window_events(3, 1)[0]})
    window, got, _ = stage.wire_reader.read(event)
    assert window == 3 and got == record_to_event(window_events(3, 1)[0],
                                                  LineParser(config.input).model_fields)
