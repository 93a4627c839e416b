"""Scoring on arrival (issue 13): scorer replicas, the model hand-off through the model store and
the models topic, and the invariant that the archive still equals `pipeline replay`.

Broker tests run every stage as its own OS process over a real broker (embedded Tansu, or
KAFKA_BOOTSTRAP_SERVERS)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import signal
from pathlib import Path

import pytest
import torch
from helpers import read_records, stream_config, wait_for
from test_stream import archived_rows, assert_same_scores

from pipeline.audit import audit
from pipeline.config import config_from_dict
from pipeline.demo import StageProcesses
from pipeline.generate import GenerateSpec, write_log
from pipeline.learner import WindowLearner, training_sample
from pipeline.modelstore import ModelRefused, announcement, config_fingerprint, load, publish
from pipeline.produce import produce_file
from pipeline.replay import parse_file, replay
from pipeline.scorefile import read_scores
from pipeline.stages.scorer import ModelIndex
from pipeline.windowing import event_order

ROW = "{},U{}@DOM1,U{}@DOM1,C{},C{},Kerberos,Network,LogOn,Success"


def small_log(path: Path, days: int = 3, per_day: int = 400, seed: int = 5) -> Path:
    write_log(GenerateSpec(users=10, computers=25, days=days, events_per_day=per_day,
                           redteam_events=0, seed=seed), path, path.with_suffix(".labels.csv"))
    return path


def log_says(log_dir: Path, name: str, pattern: str) -> bool:
    path = log_dir / f"{name}.log"
    return path.exists() and re.search(pattern, path.read_text()) is not None


def assert_archive_equals_replay(log: Path, config, tmp_path: Path) -> None:
    """The streamed archive holds replay's events with replay's losses (1e-5)."""
    replay_out = tmp_path / "replay.csv.gz"
    replay(log, replay_out, config, progress=False)
    assert_same_scores(read_scores(Path(config.streaming.archive_dir)), read_scores(replay_out))


def scored_counts(log_dir: Path, stage: str, instances: int) -> list[int]:
    counts = []
    for i in range(instances):
        found = re.findall(r"'scored': (\d+)", (log_dir / f"{stage}-{i}.log").read_text())
        counts.append(int(found[-1]) if found else 0)
    return counts


# ------------------------------------------------------------------ which model scores a window


def test_model_index_picks_the_model_trained_through_the_window_before():
    index = ModelIndex()
    index.add(announcement(None, 3))          # windows <= 3: no model yet
    index.add(announcement(3, 4, "m3", "a"))  # trained through 3, serves 4
    index.add(announcement(4, 5, "m4", "b"))
    assert index.find(2)["trained_through"] is None
    assert index.find(3)["trained_through"] is None  # window 3 itself is scored before training on it
    assert index.find(4)["trained_through"] == 3
    assert index.find(5)["trained_through"] == 4
    assert index.find(6) is None  # window 5 not closed yet: nobody knows
    index.add(announcement(4, 8, "m4", "b"))  # windows 5..7 closed empty
    assert index.find(8)["trained_through"] == 4
    index.add(announcement(4, 6, "m4", "b"))  # an older, shorter announcement read later
    assert index.find(8)["trained_through"] == 4  # a closed window never reopens


# ------------------------------------------------------------------ the model store


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A learner trained on the first window of a small log, and the events of the second."""
    tmp = tmp_path_factory.mktemp("store")
    config = config_from_dict({"model": {"rnn": {"hidden_size": 16}},
                               "streaming": {"state_dir": str(tmp / "state")}})
    windows, _ = parse_file(small_log(tmp / "auth.csv", days=2, per_day=150), config)
    learner = WindowLearner(config)
    learner.train(0, windows[0])
    return config, learner, windows[1]


def test_a_published_model_scores_exactly_as_the_trainer_would(trained):
    config, learner, events = trained
    record = publish(config, learner, serves_through=1)
    assert record["trained_through"] == 0 and record["serves_through"] == 1
    data = Path(record["url"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["sha256"]
    assert record["fingerprint"] == config_fingerprint(config)
    served = load(config, record)
    assert [s.loss for s in served.score(1, events)] == [s.loss for s in learner.score(1, events)]
    assert all(s.loss is not None for s in served.score(1, events))


def test_no_model_yet_scores_empty_losses(trained):
    config, _, events = trained
    served = load(config, announcement(None, 0, fingerprint=config_fingerprint(config)))
    assert {s.loss for s in served.score(0, events)} == {None}


def test_an_object_store_url_works_like_a_directory(trained):
    """Any fsspec URL (s3://, gs://, ...); memory:// stands in for an object store here."""
    config, learner, events = trained
    url_config = dataclasses.replace(config, streaming=dataclasses.replace(
        config.streaming, model_store="memory://salka-test/models"))
    record = publish(url_config, learner, serves_through=1)
    assert record["url"].startswith("memory://salka-test/models/model-000000000000-")
    assert load(url_config, record).score(1, events[:5])[0].loss == learner.score(1, events[:5])[0].loss


def test_a_relative_model_store_is_announced_as_a_path_any_directory_reads(trained, tmp_path,
                                                                           monkeypatch):
    # The default store is <state_dir>/models, and state_dir defaults to a relative path: a
    # scorer started in another directory than the trainer must still find the file.
    config, learner, events = trained
    (tmp_path / "trainer").mkdir()
    (tmp_path / "scorer").mkdir()
    relative = dataclasses.replace(config, streaming=dataclasses.replace(
        config.streaming, state_dir="salka-state", model_store=""))
    monkeypatch.chdir(tmp_path / "trainer")
    record = publish(relative, learner, serves_through=1)
    assert Path(record["url"]).is_absolute()
    assert Path(record["url"]).parent == tmp_path / "trainer" / "salka-state" / "models"
    monkeypatch.chdir(tmp_path / "scorer")
    assert load(relative, record).score(1, events[:5])[0].loss == learner.score(1, events[:5])[0].loss


@pytest.mark.parametrize("damage, message", [
    ("flip", "does not match its announced SHA-256"),
    ("missing", "cannot be read"),
    ("foreign", "made by another configuration"),
    ("garbage", "cannot be loaded"),
    ("wrong window", "not the announced salka model of window 7"),
])
def test_a_damaged_or_foreign_model_is_refused(trained, damage, message):
    config, learner, _ = trained
    record = publish(config, learner, serves_through=1)
    path = Path(record["url"])
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "missing":
        path.unlink()
    elif damage == "foreign":  # a model of another configuration (another seed): other numbers
        record = {**record, "fingerprint": config_fingerprint(dataclasses.replace(config, seed=99))}
    elif damage == "garbage":  # bytes that match their announced hash but are no model
        path.write_bytes(b"not a model")
        record = {**record, "sha256": hashlib.sha256(b"not a model").hexdigest()}
    else:  # the file of window 0 announced as window 7's
        record = {**record, "trained_through": 7, "serves_through": 8}
    with pytest.raises(ModelRefused, match=re.escape(message)):
        load(config, record)


# ------------------------------------------------------------------ training.sample_events


def test_the_training_sample_is_the_same_whatever_order_events_came_in(trained):
    _, _, events = trained
    ordered = sorted(events, key=event_order)
    sample = training_sample(ordered, 40, seed=1)
    assert len(sample) == 40 and all(e in ordered for e in sample)
    assert sample == sorted(sample, key=event_order)  # kept in training order
    shuffled = list(reversed(events))
    assert training_sample(sorted(shuffled, key=event_order), 40, seed=1) == sample
    assert training_sample(ordered, 40, seed=2) != sample  # the seed decides it
    assert training_sample(ordered, 0, seed=1) == ordered
    assert training_sample(ordered, len(ordered) + 5, seed=1) == ordered


def test_sample_events_trains_on_the_sample_alone(trained):
    config, _, events = trained
    sampled = dataclasses.replace(config, training=dataclasses.replace(config.training, sample_events=25))
    a, b = WindowLearner(sampled), WindowLearner(config)
    a.train(0, events)
    b.train(0, training_sample(sorted(events, key=event_order), 25, config.seed))
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name
    c = WindowLearner(config)
    c.train(0, events)  # all of them: another model
    assert not torch.equal(a.model.state_dict()["wte.weight"], c.model.state_dict()["wte.weight"])


# ------------------------------------------------------------------ over the broker


def test_an_event_is_scored_while_its_window_is_still_open(kafka_bootstrap, tmp_path):
    """Window 0 closes when the first event of window 1 arrives (no allowed lateness); the
    trainer trains on it and announces the model; window 1's events are scored with it at once,
    although nothing closes window 1 (no end of input, no later event)."""
    config, config_path = stream_config(tmp_path, kafka_bootstrap, {
        "topics": {"partitions": 1}, "window": {"size_seconds": 3600},
        "training": {"sample_events": 30}})  # trains on a sample of window 0, as replay does
    first = [ROW.format(10 + 60 * i, i % 4, i % 4, i % 5, (i + 1) % 5) for i in range(50)]
    second = [ROW.format(3700 + 60 * i, i % 4, i % 4, i % 5, (i + 2) % 5) for i in range(20)]
    log = tmp_path / "auth.csv"
    log.write_text("\n".join(first + second) + "\n")
    stages = StageProcesses(config_path, tmp_path / "logs")
    try:
        for stage in ("tokenizer", "windower", "trainer", "scorer"):
            stages.start(stage)
        produce_file(config, log, end_marker=False)
        scores = read_records(config, config.topics.scores, expected=len(first) + len(second) + 1,
                              timeout=90)
        windows = read_records(config, config.topics.windows)
        assert not stages.dead(), stages.dead()
    finally:
        stages.stop()
    open_window = [r for name, r in scores if name == "salka.ScoredEvent" and r["window"] == 1]
    assert len(open_window) == len(second)
    assert all(r["loss"] is not None and not r["late"] for r in open_window)
    closed = {r["window"] for name, r in windows if name == "salka.WindowComplete" and r["count"]}
    assert closed == {0}  # window 1 is still open, yet all of its events have scores
    # the same numbers as replay, which scores window 1 with the model trained on window 0
    replay_out = tmp_path / "replay.csv.gz"
    replay(log, replay_out, config, progress=False)
    replayed = {int(r["line"]): r["loss"] for r in read_scores(replay_out) if r["window"] == "1"}
    assert len(replayed) == len(second)
    for record in open_window:
        assert abs(record["loss"] - float(replayed[record["line"]])) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    {},
    # Entity context (pipeline/context.py): each scorer scores with the history table of the
    # model it loaded; the trainer updates it from the window read back from its spill files.
    {"model": {"context": {"entity": "user", "events": 3}}, "streaming": {"spill_events": 64}},
], ids=["plain", "entity-context"])
def test_two_scorers_over_three_partitions_equal_replay(kafka_bootstrap, tmp_path, extra):
    log = small_log(tmp_path / "auth.csv", days=3, per_day=500, seed=3)
    config, config_path = stream_config(tmp_path, kafka_bootstrap, {"topics": {"partitions": 3}, **extra})
    stages = StageProcesses(config_path, tmp_path / "logs")
    archive = Path(config.streaming.archive_dir)
    try:
        for stage in ("tokenizer", "windower", "trainer", "scorer", "scorer", "archiver"):
            stages.start(stage, sum(1 for name, _ in stages.processes if name.startswith(stage)))
        wait_for(lambda: all(log_says(tmp_path / "logs", f"scorer-{i}", r"scorer assigned \[.+\]")
                             for i in range(2)), 60, what="both scorers assigned")
        report = produce_file(config, log)
        wait_for(lambda: archived_rows(archive) >= report.records or stages.dead(), 180,
                 what="every event archived")
        assert not stages.dead(), stages.dead()
    finally:
        stages.stop()
    assert all(n > 0 for n in scored_counts(tmp_path / "logs", "scorer", 2))  # both did work
    assert_archive_equals_replay(log, config, tmp_path)
    assert audit(config).ok


@pytest.mark.slow
def test_killed_scorers_and_trainer_restart_without_a_wrong_model(kafka_bootstrap, tmp_path):
    """SIGKILL a scorer and the trainer mid-stream and start new ones: every event is still
    scored by the model of its window's predecessor (equal to replay), none lost, none doubled."""
    log = small_log(tmp_path / "auth.csv", days=4, per_day=400, seed=8)
    lines = log.read_text().splitlines()
    times = [int(line.split(",")[0]) for line in lines[1:]]
    first_part = range(1, 2 + sum(1 for t in times if t < 2 * 86400) + 5)
    config, config_path = stream_config(tmp_path, kafka_bootstrap, {
        "topics": {"partitions": 3}, "streaming": {"spill_events": 50}})  # windows spill to disk
    stages = StageProcesses(config_path, tmp_path / "logs")
    archive = Path(config.streaming.archive_dir)
    try:
        for stage, instance in (("tokenizer", 0), ("windower", 0), ("trainer", 0), ("scorer", 0),
                                ("scorer", 1), ("archiver", 0)):
            stages.start(stage, instance)
        produce_file(config, log, lines=first_part, end_marker=False)
        wait_for(lambda: (archive / "window-000000.csv.gz").exists(), 120, what="window 0 archived")
        for name, process in stages.processes:
            if name in ("trainer-0", "scorer-0"):
                process.send_signal(signal.SIGKILL)
                process.wait(30)
        stages.processes = [(n, p) for n, p in stages.processes if n not in ("trainer-0", "scorer-0")]
        stages.start("trainer", 1)
        stages.start("scorer", 2)
        produce_file(config, log, lines=range(first_part.stop, len(lines) + 1))
        wait_for(lambda: archived_rows(archive) >= len(times) or stages.dead(), 180,
                 what="every event archived")
        assert not stages.dead(), stages.dead()
    finally:
        stages.stop()
    assert_archive_equals_replay(log, config, tmp_path)
    assert audit(config).ok


@pytest.mark.slow
def test_a_corrupt_model_is_refused_and_the_scorer_recovers_when_it_is_good(kafka_bootstrap, tmp_path):
    """The trainer announces every model; the first real one is then damaged in the store. A
    scorer started now scores the first window (no model needed) but refuses the damaged model
    with one error line and leaves the next window's events waiting in Kafka; once the file is
    good again, it takes it and everything is scored as replay scores it."""
    log = small_log(tmp_path / "auth.csv", days=3, per_day=300, seed=4)
    config, config_path = stream_config(tmp_path, kafka_bootstrap, {"topics": {"partitions": 1}})
    stages = StageProcesses(config_path, tmp_path / "logs")
    archive = Path(config.streaming.archive_dir)
    try:
        for stage in ("tokenizer", "windower", "trainer", "archiver"):
            stages.start(stage)
        report = produce_file(config, log)
        models = read_records(config, config.topics.models, expected=4, timeout=120)
        first = next(r for _, r in models if r["trained_through"] == 0)
        path = Path(first["url"])
        good = path.read_bytes()
        path.write_bytes(good[: len(good) // 2])
        stages.start("scorer")
        logs = tmp_path / "logs"
        refused = r"refusing model .* does not match its announced SHA-256"
        wait_for(lambda: log_says(logs, "scorer-0", refused), 60, what="the damaged model refused")
        wait_for(lambda: (archive / "window-000000.csv.gz").exists(), 60, what="window 0 archived")
        assert not (archive / "window-000001.csv.gz").exists()  # its model was refused
        path.write_bytes(good)
        wait_for(lambda: archived_rows(archive) >= report.records or stages.dead(), 120,
                 what="every event archived")
        assert not stages.dead(), stages.dead()
    finally:
        stages.stop()
    assert len(re.findall(r"refusing model", (logs / "scorer-0.log").read_text())) == 1  # said once
    assert_archive_equals_replay(log, config, tmp_path)


def test_keys_added_since_models_were_announced_change_the_fingerprint_only_when_used():
    """A scorer of this release takes the models an earlier trainer announced (and the reverse):
    the fingerprint of a config that leaves model.rnn.attention, model.context and
    tokenizer.template unused is the one computed without those keys; using one changes it."""
    from pipeline.config import config_to_dict

    unused = {"model": {"rnn": {"attention": "none"}}}
    config = config_from_dict(unused)
    sections = config_to_dict(config)
    del sections["model"]["rnn"]["attention"], sections["model"]["context"], sections["tokenizer"]["template"]
    before = {name: sections[name] for name in ("model", "tokenizer", "seed")}
    assert config_fingerprint(config) == hashlib.sha256(
        json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    for used in ({"model": {"rnn": {"attention": "fixed"}}},
                 {"model": {"rnn": {"attention": "none"}, "context": {"entity": "user"}}},
                 {"model": {"rnn": {"attention": "none"}}, "tokenizer": {"kind": "template"}}):
        assert config_fingerprint(config_from_dict(used)) != config_fingerprint(config), used
