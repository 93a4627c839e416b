"""Token ids that came with an event (a char tokenizer stage sends them) are used only when they
are this model's: BOS, at most tokenizer.max_tokens ids of its vocabulary, EOS. Anyone who can
write to the windows topic can send others; they must neither crash a scorer or trainer nor be
scored as they are: the event is encoded again from its text."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from nn.tokenizers import BOS, EOS, encode_event
from pipeline.config import config_from_dict
from pipeline.learner import WindowLearner, usable_ids
from pipeline.parsing import LineParser

CONFIG = {"tokenizer": {"kind": "char", "max_tokens": 40}, "model": {"rnn": {"hidden_size": 16}},
          "training": {"epochs": 1}}


@pytest.fixture(scope="module")
def learner_and_events():
    config = config_from_dict(CONFIG)
    parser = LineParser(config.input)
    lines = [f"{3600 * (i // 40) + i},U{i % 7}@DOM1,U{i % 7}@DOM1,C{i % 5},C{i % 3},Kerberos,"
             f"Network,LogOn,Success" for i in range(80)]
    events = [parser.parse(line, n + 1) for n, line in enumerate(lines)]
    learner = WindowLearner(config)
    learner.train(0, events[:40])
    return learner, [dataclasses.replace(e, source=("raw", 0, i)) for i, e in enumerate(events[40:])]


def _own_ids(learner, event) -> list[int]:
    return encode_event(learner.tokenizer, event.text_fields, learner.config.tokenizer.max_tokens)


def test_the_tokenizer_stages_ids_are_used_as_they_are(learner_and_events):
    learner, events = learner_and_events
    sent = [dataclasses.replace(e, token_ids=tuple(_own_ids(learner, e))) for e in events]
    assert all(usable_ids(e.token_ids, learner.tokenizer.vocab_size, 40) for e in sent)
    before = learner.unusable_ids
    assert [s.loss for s in learner.score(1, sent)] == [s.loss for s in learner.score(1, events)]
    assert learner.unusable_ids == before


def test_ids_read_as_bytes_train_and_score_as_the_text_does(learner_and_events):
    """The scorer's and trainer's reader give the char tokenizer's ids as ``bytes``: the same
    losses, and the same weights after training, as ids encoded from the text."""
    learner, events = learner_and_events
    as_bytes = [dataclasses.replace(e, token_ids=bytes(_own_ids(learner, e))) for e in events]
    before = learner.unusable_ids
    assert [s.loss for s in learner.score(1, as_bytes)] == [s.loss for s in learner.score(1, events)]
    trained = []
    for window_events in (events, as_bytes):
        fresh = WindowLearner(config_from_dict(CONFIG))
        fresh.train(0, window_events)
        trained.append(fresh.model.state_dict())
    assert all(torch.equal(trained[0][name], trained[1][name]) for name in trained[0])
    assert learner.unusable_ids == before


def _foreign(ids: list[int], vocab_size: int) -> list[tuple[str, tuple[int, ...]]]:
    inner = ids[1:-1]
    return [
        ("an id past the vocabulary", (BOS, *inner[:-1], vocab_size, EOS)),
        ("an id far past it", (BOS, 10**6, *inner, EOS)),
        ("the largest Avro int", (BOS, 2**31 - 1, EOS)),
        ("a negative id", (BOS, -5, *inner, EOS)),
        ("more than max_tokens ids", (BOS, *(inner * 3)[:41], EOS)),
        ("a million ids", (BOS, *([inner[0]] * 10**6), EOS)),
        ("no BOS", (*inner, EOS)),
        ("no EOS", (BOS, *inner)),
        ("nothing", ()),
    ]


def test_ids_that_are_not_the_models_are_encoded_again_from_the_text(learner_and_events, caplog):
    learner, events = learner_and_events
    vocab_size = learner.tokenizer.vocab_size
    expected = {s.event.source: s.loss for s in learner.score(1, events)}
    cases = _foreign(_own_ids(learner, events[0]), vocab_size)
    hostile = [dataclasses.replace(e, token_ids=ids)
               for e, (_, ids) in zip(events, cases)]
    before = learner.unusable_ids
    with caplog.at_level(logging.WARNING, logger="pipeline.learner"):
        scores = learner.score(1, hostile)  # raised IndexError (or ran out of memory) before
    assert learner.unusable_ids - before == len(cases)
    for (what, _), score in zip(cases, sorted(scores, key=lambda s: s.event.source)):
        assert score.loss == expected[score.event.source], what
    assert sum("token ids are not this model's" in r.getMessage() for r in caplog.records) <= 1


@pytest.mark.parametrize("ids, ok", [
    ((BOS, 4, 5, EOS), True),
    ((BOS, EOS), True),
    ((BOS, 259, EOS), True),
    ((BOS, 260, EOS), False),
    ((BOS, -1, EOS), False),
    ((BOS, *[4] * 40, EOS), True),
    ((BOS, *[4] * 41, EOS), False),
    ((4, EOS), False),
    ((BOS, 4), False),
    ((BOS,), False),
])
def test_usable_ids(ids, ok):
    assert usable_ids(ids, 260, 40) is ok
