"""training.exclude_top_fraction (pipeline/surprising.py): a window's events that the alerter's
score ranks highest are left out of its training, and only those; the ranking's state survives a
checkpoint; with the key at 0 nothing changes. Tiny models on the CPU; streaming == replay with
it on is tests/test_stream.py's main run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.alerting import AlertEngine
from pipeline.config import ConfigError, config_from_dict, config_to_dict
from pipeline.generate import GenerateSpec, write_log
from pipeline.learner import WindowLearner, training_sample
from pipeline.replay import parse_file
from pipeline.windowing import event_order

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FRACTION = 0.02


def make_config(fraction: float, tmp_path: Path | None = None):
    data = {"model": {"rnn": {"hidden_size": 16, "attention": "none"}},
            "training": {"epochs": 1, "batch_size": 32, "exclude_top_fraction": fraction}}
    if tmp_path is not None:
        data["streaming"] = {"state_dir": str(tmp_path / "state")}
    return config_from_dict(data)


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    """Three days of the realistic profile (red team over hosts normal traffic uses), by window,
    each in event order."""
    tmp = tmp_path_factory.mktemp("surprising")
    log = tmp / "auth.csv"
    write_log(GenerateSpec(users=12, computers=32, days=3, events_per_day=500, redteam_events=12,
                           seed=5, profile="realistic"), log, tmp / "labels.csv")
    parsed, _ = parse_file(log, make_config(FRACTION))
    assert len(parsed) == 3
    return {w: sorted(events, key=event_order) for w, events in parsed.items()}


def entities(event, config) -> dict[str, str]:
    return {name: event.entity(name, config.input) for name in config.input.entities}


def expected_left_out(config, windows, losses: list[float]) -> set[int]:
    """The indices of window 1 the alerter ranks highest (scores from its engine, as `pipeline
    top` ranks them), ceil(fraction x scored) of them."""
    engine = AlertEngine(config.alerting)
    engine.close_window(0, [(None, entities(e, config)) for e in windows[0]])
    records = [{"loss": loss, "entities": entities(e, config)} for e, loss in zip(windows[1], losses)]
    scores = engine.window_scores(1, records)
    count = math.ceil(FRACTION * len(scores))
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return {i for i in ranked[:count] if scores[i] > 0}


def same_weights(a: WindowLearner, b: WindowLearner) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_top_scores_are_left_out_and_nothing_else(windows):
    """Training window 1 with the key on gives exactly the weights of training, with the key
    off, on window 1 without the events the alerter ranks highest."""
    on = make_config(FRACTION)
    learner = WindowLearner(on)
    learner.process_window(0, windows[0])
    losses = [s.loss for s in learner.score(1, windows[1])]
    learner.train(1, windows[1])

    left_out = expected_left_out(on, windows, losses)
    assert len(left_out) == math.ceil(FRACTION * len(windows[1])) > 0  # all of them positive
    plain = WindowLearner(make_config(0.0))
    plain.process_window(0, windows[0])
    assert plain.surprise is None
    plain.train(1, [e for i, e in enumerate(windows[1]) if i not in left_out])
    assert same_weights(learner, plain)

    everything = WindowLearner(make_config(0.0))  # and leaving them out made a difference
    everything.process_window(0, windows[0])
    everything.train(1, windows[1])
    assert not same_weights(learner, everything)


def test_the_highest_loss_is_not_what_decides(windows):
    """The ranking is the alerter's normalised score, not the raw loss: an entity's usual level
    counts (this log's onboarded users have the highest raw losses and score 0)."""
    on = make_config(FRACTION)
    learner = WindowLearner(on)
    learner.process_window(0, windows[0])
    losses = learner.losses(lambda: iter(windows[1]), len(windows[1]))
    by_loss = set(np.argsort(-losses, kind="stable")[:math.ceil(FRACTION * len(losses))].tolist())
    assert by_loss != expected_left_out(on, windows, losses.tolist())


def test_a_resumed_run_leaves_out_what_an_uninterrupted_one_does(windows, tmp_path):
    config = make_config(FRACTION, tmp_path)
    straight = WindowLearner(config)
    for w in (0, 1, 2):
        straight.process_window(w, windows[w])

    first = WindowLearner(config)
    for w in (0, 1):
        first.process_window(w, windows[w])
    first.save(tmp_path / "ckpt.pt")
    resumed = WindowLearner.load(tmp_path / "ckpt.pt", config)
    assert resumed.surprise.engine.last_window == 1
    resumed.process_window(2, windows[2])
    assert same_weights(resumed, straight)

    forgetful = WindowLearner.load(tmp_path / "ckpt.pt", config)  # the ranking's state matters
    forgetful.surprise = type(forgetful.surprise)(config)
    forgetful.process_window(2, windows[2])
    assert not same_weights(forgetful, straight)


def test_nothing_is_left_out_when_nothing_is_above_its_usual(windows, tmp_path):
    """A checkpoint from before the key has no ranking state: every entity is new and scores
    0, and no event is left out for it (not the first 1% of the window by event order)."""
    config = make_config(FRACTION)
    before = WindowLearner(make_config(0.0))
    before.process_window(0, windows[0])
    before.save(tmp_path / "ckpt.pt")
    upgraded = WindowLearner.load(tmp_path / "ckpt.pt", config)
    assert upgraded.surprise is not None and upgraded.surprise.engine.last_window is None
    upgraded.train(1, windows[1])
    before.train(1, windows[1])
    assert same_weights(upgraded, before)


def test_key_off_keeps_no_state(windows, tmp_path):
    config = make_config(0.0)
    learner = WindowLearner(config)
    learner.process_window(0, windows[0])
    learner.save(tmp_path / "ckpt.pt")
    assert learner.surprise is None
    assert WindowLearner.load(tmp_path / "ckpt.pt", config).surprise is None


@pytest.mark.parametrize("value", [1, 1.5, -0.1])
def test_the_fraction_is_checked(value):
    with pytest.raises(ConfigError, match="training.exclude_top_fraction"):
        config_from_dict({"training": {"exclude_top_fraction": value}})


def test_with_a_sample_only_the_sample_is_scored_and_ranked(windows):
    """training.sample_events: the exclusion pass scores and ranks the sample alone (what could
    be trained on), not the whole window: the weights are those of training on each window's
    sample minus the top of that sample, and the pass scored just the sample's events."""
    size = 300  # of about 500 events a window
    on = config_from_dict({**config_to_dict(make_config(FRACTION)), "training": {
        **config_to_dict(make_config(FRACTION))["training"], "sample_events": size}})
    learner = WindowLearner(on)
    scored, real = [], learner.losses
    learner.losses = lambda read, total: scored.append(total) or real(read, total)
    learner.train(0, windows[0])
    sample0, sample1 = (training_sample(windows[w], size, on.seed) for w in (0, 1))
    assert len(windows[1]) > size == len(sample1)
    losses = [s.loss for s in learner.score(1, sample1)]
    learner.train(1, windows[1])
    assert scored == [size, size]  # window 0 has no model to score with, window 1 the sample

    engine = AlertEngine(on.alerting)  # the ranking's state knows the samples only
    engine.close_window(0, [(None, entities(e, on)) for e in sample0])
    records = [{"loss": loss, "entities": entities(e, on)} for e, loss in zip(sample1, losses)]
    scores = engine.window_scores(1, records)
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    left_out = {i for i in ranked[:math.ceil(FRACTION * size)] if scores[i] > 0}
    assert learner.left_out == len(left_out) > 0

    plain = WindowLearner(make_config(0.0))
    plain.train(0, sample0)
    plain.train(1, [e for i, e in enumerate(sample1) if i not in left_out])
    assert same_weights(learner, plain)
    assert set(learner.timings) == {"sample", "exclude", "train"}
