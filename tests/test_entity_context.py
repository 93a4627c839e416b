"""Entity context (model.context, pipeline/context.py, nn/context.py): causality, context never
a target, the history table through checkpoints and published models, and nothing changed with
context off. Tiny models on the CPU; the streaming == replay case is in tests/test_scorer.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from nn.context import with_context
from nn.scoring import pad_batch, score_sequences
from nn.tokenizers import BOS, EOS, N_SPECIAL, encode_event
from nn.training import CheckpointError, build_model, load_checkpoint, save_checkpoint
from pipeline.compute import score_batch_size
from pipeline.config import ConfigError, config_from_dict, config_to_dict
from pipeline.learner import WindowLearner
from pipeline.modelspec import model_args_for
from pipeline.modelstore import config_fingerprint, load, publish
from pipeline.replay import parse_file, replay, replay_scores
from pipeline.scorefile import read_scores
from pipeline.windowing import event_order

ROW = "{},U{}@DOM1,U{}@DOM1,C{},C{},Kerberos,Network,LogOn,{}"
HOUR = 3600
TARGET_TIME = 2 * HOUR + 1800  # the event under test: user U1, window 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_config(tmp_path: Path | None = None, **context):
    data = {"window": {"size_seconds": HOUR}, "model": {"rnn": {"hidden_size": 16},
                                                        "gpt": {"n_embd": 16, "n_layer": 1},
                                                        "context": {"entity": "user", **context}},
            "training": {"epochs": 3, "batch_size": 16}}
    if tmp_path is not None:
        data["streaming"] = {"state_dir": str(tmp_path / "state")}
    return config_from_dict(data)


def habits(window: int, count: int = 200) -> list[str]:
    """Four users, each on its own two hosts, spread over the window's hour."""
    return [ROW.format(window * HOUR + HOUR // count * i, i % 4, i % 4, 10 + i % 4,
                       20 + (i % 4) * 2 + i // 4 % 2, "Success") for i in range(count)]


def windows_of(lines: list[str], tmp_path: Path, config, name: str = "auth.csv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return parse_file(path, config)[0]


def target(events) -> list:
    return [e for e in events if e.time == TARGET_TIME]


def loss_of(learner: WindowLearner, window: int, events) -> dict:
    """(time, model text) -> loss of each scored event."""
    return {(e.time, e.text_fields): s.loss for s, e in zip(learner.score(window, events),
                                                            sorted(events, key=event_order))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A context learner trained on windows 0 and 1; window 2 holds the event under test."""
    tmp = tmp_path_factory.mktemp("ctx")
    config = make_config(tmp, events=3)
    lines = habits(0) + habits(1) + [ROW.format(TARGET_TIME, 1, 1, 11, 22, "Success")]
    windows = windows_of(lines, tmp, config)
    learner = WindowLearner(config)
    for w in (0, 1):
        learner.process_window(w, windows[w])
    return config, learner, windows, tmp


# ----------------------------------------------------------------------------- causality


def test_the_table_holds_each_entity_s_last_k_events_of_trained_windows(trained):
    config, learner, windows, _ = trained
    for user in range(4):
        value = f"U{user}@DOM1"
        mine = sorted((e for w in (0, 1) for e in windows[w] if e.fields["src_user"] == value),
                      key=event_order)[-3:]
        assert learner.history.table[value] == tuple(tuple(ids[1:-1]) for ids in learner.encode_own(mine))
    assert set(learner.history.table) == {f"U{u}@DOM1" for u in range(4)}


def test_a_score_ignores_later_and_same_window_events_and_other_entities(trained):
    config, learner, windows, tmp = trained
    alone = loss_of(learner, 2, target(windows[2]))
    crowd = windows_of(
        habits(0) + habits(1) + [ROW.format(TARGET_TIME, 1, 1, 11, 22, "Success")]
        + [ROW.format(2 * HOUR + 60 * i, 1, 1, 13, 29, "Fail") for i in range(1, 60)]  # U1, before and after
        + [ROW.format(2 * HOUR + 30 + 60 * i, 2 + i % 2, 0, 12, 25, "Success") for i in range(50)],
        tmp, config, "crowd.csv")[2]
    assert len(crowd) > 100
    with_crowd = loss_of(learner, 2, crowd)
    (key,) = alone
    assert abs(with_crowd[key] - alone[key]) <= 1e-6
    # Later windows: replaying windows 0..3 gives the event the same score whatever window 3 holds.
    def replayed(window_3: list[str], name: str) -> float:
        lines = habits(0) + habits(1) + [ROW.format(TARGET_TIME, 1, 1, 11, 22, "Success")] + window_3
        scores = list(replay_scores(windows_of(lines, tmp, config, name), config, progress=False))
        (score,) = [s for s in scores if s.event.time == TARGET_TIME]
        return score.loss

    assert replayed(habits(3), "later-a.csv") == replayed(
        [ROW.format(3 * HOUR + 60 * i, 1, 1, 19, 39, "Fail") for i in range(40)], "later-b.csv")


def test_a_score_depends_on_its_own_entity_s_earlier_events(trained):
    config, learner, windows, _ = trained
    events = windows[2] + habits_events(windows)
    before = loss_of(learner, 2, events)
    saved = dict(learner.history.table)
    try:  # the same weights, U1 with another history: only U1's scores move
        odd = [e for e in windows[1] if e.fields["src_user"] == "U3@DOM1"][-3:]
        learner.history.table["U1@DOM1"] = tuple(tuple(ids[1:-1]) for ids in learner.encode_own(odd))
        after = loss_of(learner, 2, events)
    finally:
        learner.history.table = saved
    for (time, fields), loss in before.items():
        moved = abs(after[(time, fields)] - loss)
        # (this tiny model leans little on context: each event names its user anyway)
        assert moved > 1e-5 if dict(fields)["src_user"] == "U1@DOM1" else moved == 0, (fields, moved)


def habits_events(windows) -> list:
    """Window 1's events moved to window 2's hour: events of every user to score in window 2."""
    from dataclasses import replace

    return [replace(e, time=e.time + HOUR) for e in windows[1]]


def test_changing_an_entity_s_earlier_window_changes_its_score(tmp_path):
    config = make_config(tmp_path, events=3)
    x = ROW.format(TARGET_TIME, 1, 1, 11, 22, "Success")
    other = [line.replace("C11,", "C17,") if ",U1@DOM1,U1@DOM1," in line else line for line in habits(1)]
    scores = []
    for name, window_1 in (("a.csv", habits(1)), ("b.csv", other)):
        replayed = replay_scores(windows_of(habits(0) + window_1 + [x], tmp_path, config, name),
                                 config, progress=False)
        scores.append([s.loss for s in replayed if s.event.time == TARGET_TIME][0])
    assert abs(scores[0] - scores[1]) > 1e-3


def test_the_table_takes_every_event_not_only_the_training_sample(tmp_path):
    config = config_from_dict({**config_to_dict(make_config(tmp_path)), "training": {"sample_events": 5}})
    windows = windows_of(habits(0), tmp_path, config)
    learner = WindowLearner(config)
    learner.train(0, windows[0])
    assert set(learner.history.table) == {f"U{u}@DOM1" for u in range(4)}
    assert all(len(v) == 4 for v in learner.history.table.values())


# ----------------------------------------------------------------- context is never a target


def tiny_model(kind: str):
    rnn = {"kind": "rnn", "vocab_size": 40, "cell": "lstm", "hidden_size": 16, "n_layer": 1,
           "bidirectional": kind == "bi-lstm", "dropout": 0.0}
    gpt = {"kind": "gpt", "vocab_size": 40, "block_size": 64, "n_layer": 1, "n_head": 2,
           "n_embd": 16, "dropout": 0.0}
    torch.manual_seed(0)
    return build_model(gpt if kind == "gpt" else rnn).eval()


EVENTS = [[BOS, 5, 6, 7, EOS], [BOS, 8, 9, EOS], [BOS, 10, 11, 12, 13, EOS]]
HISTORIES = [[(20, 21), (22,)], [], [(30, 31, 32)]]


@pytest.mark.parametrize("kind", ["lstm", "bi-lstm", "gpt"])
def test_context_positions_are_read_but_never_targets(kind):
    model = tiny_model(kind)
    seqs = [with_context(e, h) for e, h in zip(EVENTS, HISTORIES)]
    assert seqs[1] == EVENTS[1]  # no history: the plain sequence
    seq = pad_batch(seqs)
    idx, targets = model.inputs_and_targets(seq)
    assert (idx >= 0).all()
    bi = kind == "bi-lstm"
    for b, (event, history) in enumerate(zip(EVENTS, HISTORIES)):
        start = 1 + sum(len(h) + 1 for h in history)  # the event's first own token
        plain = [BOS, *(i for h in history for i in (*h, EOS)), *event[1:]]
        assert idx[b, :len(plain) - (0 if bi else 1)].tolist() == plain[:len(plain) - (0 if bi else 1)]
        row = targets[b].tolist()
        predicted = [(t, i) for t, i in enumerate(row) if i != -1]
        # Exactly the event's own tokens (and EOS, unidirectional), each at its own position.
        own = event[1:-1] if bi else event[1:]
        assert [i for _, i in predicted] == own
        first = start if bi else start - 1
        assert [t for t, _ in predicted] == list(range(first, first + len(own)))


@pytest.mark.parametrize("kind", ["lstm", "bi-lstm", "gpt"])
def test_with_context_no_prediction_sees_its_target_and_the_context_is_read(kind):
    model = tiny_model(kind)
    seq = pad_batch([with_context(e, h) for e, h in zip(EVENTS, HISTORIES)])

    def logits(s):
        idx, targets = model.inputs_and_targets(s)
        with torch.no_grad():
            return model(idx)[0], targets

    base, targets = logits(seq)
    for b in range(len(EVENTS)):
        for t in (targets[b] != -1).nonzero().flatten().tolist():
            j = t if kind == "bi-lstm" else t + 1  # the position of the token row t predicts
            changed = seq.clone()
            changed[b, j] = N_SPECIAL + (int(changed[b, j]) + 1) % 30
            out, _ = logits(changed)
            assert torch.allclose(out[b, t], base[b, t], atol=1e-6, rtol=0), (b, t)
    # A context token changes the predictions of its event's own tokens.
    changed = seq.clone()
    changed[0, 1] = ~torch.tensor(25)
    out, _ = logits(changed)
    own = targets[0] != -1
    assert (out[0][own] - base[0][own]).abs().max() > 1e-5


def test_block_size_covers_k_context_events_only_when_context_is_on():
    on, off = make_config(events=3), config_from_dict({})
    assert model_args_for(off, 100)["block_size"] == off.tokenizer.max_tokens + 2
    assert model_args_for(on, 100)["block_size"] == 4 * (on.tokenizer.max_tokens + 1) + 2


# ------------------------------------------------------------------ checkpoints and models


def test_the_table_survives_a_checkpoint_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    config = make_config(tmp_path, events=2)
    lines = [line for w in range(4) for line in habits(w, 40)]
    lines += [ROW.format(3 * HOUR + 7 + 60 * i, 1, 1, 15, 35, "Fail") for i in range(5)]
    windows = windows_of(lines, tmp_path, config)
    whole = WindowLearner(config)
    uninterrupted = [s.loss for w in range(4) for s in whole.process_window(w, windows[w])]
    first = WindowLearner(config)
    resumed = [s.loss for w in range(2) for s in first.process_window(w, windows[w])]
    first.save(tmp_path / "ckpt.pt")
    assert isinstance(load_checkpoint(tmp_path / "ckpt.pt")["history"]["ids"], torch.Tensor)
    again = WindowLearner.load(tmp_path / "ckpt.pt", config)
    assert again.history.table == first.history.table and len(again.history.table) == 4
    resumed += [s.loss for w in (2, 3) for s in again.process_window(w, windows[w])]
    assert resumed == uninterrupted
    assert again.history.table == whole.history.table


def test_a_published_model_carries_the_table_and_scores_as_the_trainer(trained):
    config, learner, windows, _ = trained
    served = load(config, publish(config, learner, serves_through=2))
    assert served.history.table == learner.history.table
    events = windows[2] + habits_events(windows)
    assert [s.loss for s in served.score(2, events)] == [s.loss for s in learner.score(2, events)]


def test_checkpoints_of_another_context_are_refused_and_old_ones_load_with_context_off(tmp_path):
    off = config_from_dict({"model": {"rnn": {"hidden_size": 16}}})
    windows = windows_of(habits(0), tmp_path, off)
    learner = WindowLearner(off)
    learner.train(0, windows[0])
    learner.save(tmp_path / "new.pt")
    data = load_checkpoint(tmp_path / "new.pt")  # as written before model.context existed
    del data["config"]["model"]["context"], data["history"]
    save_checkpoint(tmp_path / "old.pt", **{k: v for k, v in data.items() if k != "format"})
    for path in ("new.pt", "old.pt"):
        assert WindowLearner.load(tmp_path / path, off).history is None
        assert WindowLearner.load(tmp_path / path, config_from_dict(
            {"model": {"rnn": {"hidden_size": 16}, "context": {"events": 9}}})).last_window == 0
        with pytest.raises(CheckpointError, match="another model configuration"):
            WindowLearner.load(tmp_path / path, make_config())
    on = make_config(events=2)
    with_table = WindowLearner(on)
    with_table.train(0, windows[0])
    with_table.save(tmp_path / "ctx.pt")
    for other in (off, make_config(events=3)):
        with pytest.raises(CheckpointError, match="another model configuration"):
            WindowLearner.load(tmp_path / "ctx.pt", other)


# ------------------------------------------------------------------------- context off


def test_context_off_reads_plain_events_with_the_fingerprint_of_before(tmp_path):
    config = config_from_dict({"model": {"rnn": {"hidden_size": 16}}, "window": {"size_seconds": HOUR}})
    assert config.model.context.entity == ""
    sections = config_to_dict(config)
    # the fingerprint as computed before model.context (and the other keys added with it, unused)
    del sections["model"]["context"], sections["tokenizer"]["template"]
    if sections["model"]["rnn"]["attention"] == "none":
        del sections["model"]["rnn"]["attention"]
    before = {name: sections[name] for name in ("model", "tokenizer", "seed")}
    assert config_fingerprint(config) == hashlib.sha256(
        json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    windows = windows_of(habits(0) + habits(1), tmp_path, config)
    learner = WindowLearner(config)
    learner.train(0, windows[0])
    plain = [encode_event(learner.tokenizer, e.text_fields, config.tokenizer.max_tokens)
             for e in sorted(windows[1], key=event_order)]
    assert learner.encode(sorted(windows[1], key=event_order)) == plain
    # replay's scores are the plain sequences' scores
    replay(tmp_path / "auth.csv", tmp_path / "out.csv.gz", config, progress=False)
    replayed = [float(r["loss"]) for r in read_scores(tmp_path / "out.csv.gz") if r["window"] == "1"]
    expected = [mean for mean, _, _ in score_sequences(  # as replay batches them, where it runs
        learner.model, plain, score_batch_size(config.training, learner.device), device=learner.device)]
    assert replayed == pytest.approx(expected, abs=5e-7)  # the file keeps 6 decimals


def test_an_entity_without_history_is_scored_as_without_context(tmp_path):
    """Window 1 is scored after training on window 0 with an empty table: with an RNN (whose
    weights do not depend on block_size) the scores equal those of context off, bit for bit."""
    on = make_config(tmp_path)
    off = config_from_dict({**config_to_dict(on), "model": {"rnn": {"hidden_size": 16}}})
    windows = windows_of(habits(0) + habits(1), tmp_path, on)
    a, b = WindowLearner(on), WindowLearner(off)
    a.train(0, windows[0])
    b.train(0, windows[0])
    fresh = [e for e in windows[1] if e.fields["src_user"] == "U0@DOM1"]
    a.history.table.pop("U0@DOM1")
    assert [s.loss for s in a.score(1, fresh)] == [s.loss for s in b.score(1, fresh)]
    assert [s.loss for s in a.score(1, windows[1])] != [s.loss for s in b.score(1, windows[1])]


def test_an_unknown_context_entity_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^model\.context\.entity: expected one of input\.entities"):
        config_from_dict({"model": {"context": {"entity": "usr"}}})
    with pytest.raises(ConfigError, match=r"^model\.context\.events: expected a positive integer"):
        config_from_dict({"model": {"context": {"entity": "user", "events": 0}}})


def test_explained_scores_show_the_event_s_own_tokens_only(trained):
    config, learner, windows, _ = trained
    explain = config_from_dict({**config_to_dict(config), "scores": {"explain": True}})
    learner.config, saved = explain, learner.config
    try:
        (score,) = learner.score(2, target(windows[2]))
    finally:
        learner.config = saved
    own = learner.encode_own(target(windows[2]))[0]
    assert score.tokens == tuple(learner.tokenizer.decode(own[1:]))  # no context token, EOS last
    assert len(score.token_losses) == len(own) - 1
