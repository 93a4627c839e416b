"""A word vocabulary that grows (tokenizer.word.grow): new values get ids of their own from the
window after the one they first appear in; old ids, vocab_size and the model's size never change."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from nn.tokenizers import N_SPECIAL, WordTokenizer, stable_bucket, tokenizer_from_state
from nn.training import load_checkpoint, save_checkpoint
from pipeline.config import config_from_dict
from pipeline.learner import WindowLearner
from pipeline.parsing import Event, LineParser
from pipeline.replay import replay
from pipeline.scorefile import read_scores

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400


def fields(user: str, host: str) -> tuple[tuple[str, str], ...]:
    return (("user", user), ("host", host))


def oov_range(tok: WordTokenizer, name: str) -> range:
    return range(tok.oov_start(name), tok.oov_start(name) + tok.oov_buckets)


# ------------------------------------------------------------------------ tokenizer


def test_growth_keeps_old_ids_and_vocab_size_and_survives_a_state_roundtrip():
    tok = WordTokenizer(max_vocab_per_field=10, oov_buckets=4, grow=True)
    tok.fit([fields("bob", "C1"), fields("alice", "C1"), fields("bob", "C2")])
    # Capacity is allocated up front: 10 slots + 4 buckets per field, whatever fit saw.
    assert tok.vocab_size == N_SPECIAL + 2 * (10 + 4)
    size = tok.vocab_size
    old = {v: tok.encode(fields(v, v)) for v in ("bob", "alice", "C1", "C2")}
    (dave_before,) = tok.encode([("user", "dave")])
    assert dave_before in oov_range(tok, "user")

    added = tok.grow([fields("dave", "C9"), fields("dave", "C1"), fields("erin", "C9")])
    assert added == {"user": ["dave", "erin"], "host": ["C9"]}
    assert tok.vocab_size == size
    assert {v: tok.encode(fields(v, v)) for v in old} == old
    (dave,) = tok.encode([("user", "dave")])
    assert dave == tok.offsets["user"] + 2  # the field's next free id
    assert dave not in oov_range(tok, "user") and tok.decode([dave]) == ["dave"]

    again = tokenizer_from_state(json.loads(json.dumps(tok.state_dict())))
    assert again.vocab_size == size and again.grow_enabled
    probe = [fields(u, h) for u in ("bob", "alice", "dave", "erin", "zed") for h in ("C1", "C2", "C9", "C0")]
    assert [again.encode(f) for f in probe] == [tok.encode(f) for f in probe]
    # Growing the restored tokenizer continues at the same next id.
    tok.grow([fields("frank", "C1")])
    again.grow([fields("frank", "C1")])
    assert again.encode([("user", "frank")]) == tok.encode([("user", "frank")])


def test_growth_order_min_count_and_capacity_exhaustion():
    tok = WordTokenizer(max_vocab_per_field=4, min_count=2, oov_buckets=8, grow=True)
    tok.fit([fields("a", "h")] * 2)
    assert tok.vocabs["user"] == ["a"]
    # By count desc, then text; "once" is below min_count; only 3 slots are free.
    window = (
        [fields("zz", "h")] * 3
        + [fields("yy", "h")] * 2
        + [fields("xx", "h")] * 2
        + [fields("ww", "h")] * 2
        + [fields("once", "h")]
    )
    tok.grow(window)
    assert tok.vocabs["user"] == ["a", "zz", "ww", "xx"]  # full: "yy" did not fit
    for value in ("yy", "once", "later"):
        (i,) = tok.encode([("user", value)])
        assert i == tok.oov_start("user") + stable_bucket(value, 8)
    # A full field grows no more; "once", seen twice now, would otherwise qualify.
    assert tok.grow([fields("once", "h")] * 5) == {}
    assert tok.vocab_size == N_SPECIAL + 2 * (4 + 8)


def test_frozen_layout_without_grow_and_for_states_older_than_growth():
    sample = [fields("bob", "C1"), fields("alice", "C2")]
    frozen = WordTokenizer(oov_buckets=4, grow=False)
    frozen.fit(sample)
    assert frozen.vocab_size == N_SPECIAL + 2 * (2 + 4)
    assert frozen.grow([fields("carol", "C3")]) == {}
    # A state written before growth existed has no "grow" key: same compact layout, same ids.
    state = frozen.state_dict()
    del state["grow"]
    old = tokenizer_from_state(state)
    assert not old.grow_enabled and old.vocab_size == frozen.vocab_size
    probe = sample + [fields("carol", "C3")]
    assert [old.encode(f) for f in probe] == [frozen.encode(f) for f in probe]


GROW_SCRIPT = """
import json, sys
from nn.tokenizers import WordTokenizer
tok = WordTokenizer(max_vocab_per_field=50, oov_buckets=4, grow=True, grow_reserve=100)
tok.fit([(("user", "u0"), ("host", "h0"))])
# Values arrive in set order (which PYTHONHASHSEED changes), with ties in their counts.
users = {f"user{i}" for i in range(30)}
hosts = {f"h{i}" for i in range(30)}
tok.grow([(("user", u), ("host", h)) for u, h in zip(users, hosts)] * 2)
print(json.dumps({"state": tok.state_dict(),
                  "ids": [tok.encode([("user", u), ("host", u)]) for u in sorted(users)]}))
"""


def test_growth_is_the_same_under_any_hash_seed():
    def run(seed: str) -> dict:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", GROW_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, check=True
        )
        return json.loads(out.stdout)

    a, b = run("1"), run("4242")
    assert a == b
    assert a["state"]["vocabs"]["user"][1:] == sorted(f"user{i}" for i in range(30))


# ------------------------------------------------------------------------ learner


def tiny_word_config(grow: bool = True, **word):
    return config_from_dict(
        {
            "seed": 99,
            "tokenizer": {
                "kind": "word",
                "max_tokens": 20,
                "word": {"max_vocab_per_field": 20, "grow": grow, **word},
            },
            "model": {"kind": "rnn", "rnn": {"cell": "lstm", "hidden_size": 16, "n_layer": 1}},
            "training": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-2},
        }
    )


def auth_lines(window: int, n: int, seed: int, extra_users: tuple[str, ...] = ()) -> list[str]:
    rng = random.Random(seed)
    users = [f"U{i}" for i in range(1, 5)] + list(extra_users)
    return [
        f"{window * DAY + i},{u}@DOM1,{u}@DOM1,C{rng.randint(1, 4)},C{rng.randint(1, 4)},"
        f"Kerberos,Network,LogOn,Success"
        for i, u in enumerate(rng.choice(users) for _ in range(n))
    ]


def events_of(config, lines: list[str], first_line: int) -> list[Event]:
    parser = LineParser(config.input)
    events = [parser.parse(line, first_line + i) for i, line in enumerate(lines)]
    assert all(isinstance(e, Event) for e in events), events
    return events


def test_new_value_is_oov_in_its_window_and_known_in_the_next_and_after_a_checkpoint(tmp_path):
    config = tiny_word_config()
    learner = WindowLearner(config)
    w0 = events_of(config, auth_lines(0, 60, seed=1), 1)
    w1 = events_of(config, auth_lines(1, 60, seed=2, extra_users=("NEW",)), 100)
    assert any("NEW@DOM1" in e.text_fields[0][1] for e in w1)
    new_event = [e for e in w1 if e.text_fields[0][1] == "NEW@DOM1"][:1]
    learner.train(0, w0)
    tok = learner.tokenizer
    size, rows = tok.vocab_size, learner.model.wte.weight.shape[0]
    known = {e.line: learner.encode([e]) for e in w0}
    name = new_event[0].text_fields[0][0]
    # Window 1 is scored before growth: the new user is in its field's OOV buckets.
    assert learner.encode(new_event)[0][1] in oov_range(tok, name)
    learner.score(1, w1)
    learner.train(1, w1)
    new_id = learner.encode(new_event)[0][1]
    assert new_id not in oov_range(tok, name) and tok.decode([new_id]) == ["NEW@DOM1"]
    assert tok.vocab_size == size and learner.model.wte.weight.shape[0] == rows
    assert {e.line: learner.encode([e]) for e in w0} == known

    path = tmp_path / "learner.pt"
    learner.save(path)
    loaded = WindowLearner.load(path, config)
    assert {e.line: loaded.encode([e]) for e in w0} == known
    assert loaded.encode(new_event) == learner.encode(new_event)
    w2 = events_of(config, auth_lines(2, 40, seed=3, extra_users=("NEW",)), 200)
    assert [s.loss for s in loaded.score(2, w2)] == [s.loss for s in learner.score(2, w2)]


def test_checkpoint_from_before_growth_still_loads_frozen(tmp_path):
    """An older checkpoint (no tokenizer.word.grow in its config, no "grow" in its tokenizer
    state) resumes under grow: true with its frozen layout, scores unchanged."""
    frozen_config = tiny_word_config(grow=False)
    learner = WindowLearner(frozen_config)
    learner.train(0, events_of(frozen_config, auth_lines(0, 60, seed=1), 1))
    path = tmp_path / "old.pt"
    learner.save(path)
    data = load_checkpoint(path)
    for key in ("grow", "grow_reserve"):
        del data["config"]["tokenizer"]["word"][key]
    for key in ("grow", "grow_reserve", "capacities"):
        del data["tokenizer"][key]
    save_checkpoint(path, **{k: v for k, v in data.items() if k != "format"})

    loaded = WindowLearner.load(path, tiny_word_config(grow=True))
    assert not loaded.tokenizer.grow_enabled
    assert loaded.tokenizer.vocab_size == learner.tokenizer.vocab_size
    probe = events_of(frozen_config, auth_lines(1, 40, seed=2, extra_users=("NEW",)), 100)
    assert [s.loss for s in loaded.score(1, probe)] == [s.loss for s in learner.score(1, probe)]
    loaded.train(1, probe)  # grows nothing: the layout has no free slots
    assert loaded.tokenizer.vocab_size == learner.tokenizer.vocab_size


def test_replay_with_growth_knows_a_returning_new_users_habits(tmp_path):
    """A user onboarded in window 1 returns in window 2 with the same habits. With growth its
    own id (trained on window 1) predicts its host; without, its bucket (shared with strangers
    who go elsewhere) does not. The user token itself costs more with growth (a bucket carries
    the mass of all its members), so the mean loss is not lower in general: on this log
    grow/frozen means are about equal (0.40 / 0.39); the host's loss is what must drop."""
    lines = []
    for window in range(3):
        body = auth_lines(window, 300, seed=10 + window)
        if window:  # the newcomer always logs on from C3 to C4
            body += [
                f"{window * DAY + 5000 + i},NEWBIE@DOM1,NEWBIE@DOM1,C3,C4,Kerberos,Network,LogOn,Success"
                for i in range(40)
            ]
        # Strangers, seen once each (below min_count: never in the vocabulary), always C1 -> C2.
        body += [
            f"{window * DAY + 6000 + i},X{window}_{i}@DOM1,X{window}_{i}@DOM1,C1,C2,Kerberos,"
            f"Network,LogOn,Success"
            for i in range(100)
        ]
        lines += sorted(body, key=lambda line: int(line.split(",")[0]))
    log = tmp_path / "auth.csv"
    log.write_text("\n".join(lines) + "\n")
    host_loss, losses = {}, {}
    for grow in (True, False):
        out = tmp_path / f"scores-{grow}.csv.gz"
        config = tiny_word_config(grow=grow, oov_buckets=1, min_count=2)
        replay(
            log,
            out,
            dataclasses.replace(
                config,
                scores=dataclasses.replace(config.scores, explain=True),
                training=dataclasses.replace(config.training, epochs=2),
            ),
            progress=False,
        )
        rows = [r for r in read_scores(out) if r["user"] == "NEWBIE@DOM1" and r["window"] == "2"]
        assert len(rows) == 40
        tokens = json.loads(rows[0]["tokens"])
        assert tokens[:3] == (
            ["NEWBIE@DOM1", "NEWBIE@DOM1", "C3"] if grow else ["<src_user:oov0>", "<dst_user:oov0>", "C3"]
        )
        host_loss[grow] = sum(json.loads(r["token_losses"])[2] for r in rows) / len(rows)
        losses[grow] = [r["loss"] for r in rows]
    assert losses[True] != losses[False]
    assert host_loss[True] < 0.5 * host_loss[False], host_loss


def test_grow_copies_the_bucket_row_into_the_new_id():
    config = tiny_word_config()
    learner = WindowLearner(config)
    learner.train(0, events_of(config, auth_lines(0, 60, seed=1), 1))
    event = events_of(config, [f"{DAY},NEW@DOM1,NEW@DOM1,C1,C2,Kerberos,Network,LogOn,Success"], 100)
    assert event[0].text_fields[0][1] == "NEW@DOM1"
    bucket = learner.encode(event)[0][1]
    row = learner.model.wte.weight[bucket].detach().clone()
    assert learner.grow(event) == 2  # the new user in two fields (src and dst user)
    new_id = learner.encode(event)[0][1]
    assert new_id != bucket
    assert torch.equal(learner.model.wte.weight[new_id], row)
