"""The char tokenizer's ids as ``bytes`` (nn/tokenizers.py ``_CHAR_IDS``) change nothing downstream.

``CharTokenizer.encode`` gives ``bytes`` (one id a byte, made by ``bytes.translate``) where it gave
a list of ints, and ``encode_event`` gives BOS + ids + EOS as ``bytes``. Everything that reads them
must see what it saw before: the same ids as ints, padded batches, bit-identical CPU losses and
training, the same Avro bytes on the tokens topic, the same learner scores, explanations, entity
context history and checkpoints, the same ``pipeline check`` report and ``pipeline replay`` files.

The reference is the old code written out here (``ref_encode``, ``ref_event``: lists of ints).
When the change was made, the tree from before it was also run side by side (learner scores,
explanations, history, checkpoints, ``pipeline check`` and ``pipeline replay`` files with the char
tokenizer, with and without entity context): all identical; that comparison needed a second tree
and is not kept here.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from nn.context import with_context
from nn.scoring import _flat_ids, pad_batch, score_sequences
from nn.tokenizers import BOS, EOS, N_SPECIAL, CharTokenizer, encode_event, join_fields
from nn.training import build_model, make_optimizer, train_sequences
from pipeline.parsing import Event
from pipeline.serde import codec
from pipeline.tokenwire import SCHEMA, TokenizedEventWriter
from pipeline.topicrecords import event_to_record

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ the old code, written out


def ref_encode(fields) -> list[int]:
    """CharTokenizer.encode before the change."""
    return [N_SPECIAL + b for b in join_fields(fields).encode("utf-8")]


def ref_event(fields, max_tokens) -> list[int]:
    """encode_event before the change."""
    return [BOS, *ref_encode(fields)[:max_tokens], EOS]


def outcome(call, *args):
    """("ok", value) or ("err", exception type, message): so that raising is compared too."""
    try:
        return ("ok", call(*args))
    except Exception as exc:  # noqa: BLE001 - every kind of failure is part of the behaviour
        return ("err", type(exc).__name__, str(exc))


# ------------------------------------------------------------------ hostile inputs

# Every UTF-8 length and lead byte: NUL and controls, 0x7F, two-byte (C2, C3, DF), three-byte
# (E0, E2, EF: U+FEFF, U+FFFF, U+FFFD, line separator), four-byte with each lead F0..F4 (U+10000,
# U+40000 F1, U+80000 F2, U+C0000 F3, U+100000 and U+10FFFF F4), combining marks, the separator.
PIECES = ["a", "Z", "0", ",", " ", "@", '"', "\\", "\n", "\r", "\t", "\x00", "\x01", "\x1f", "\x7f",
          "\x80", "\xa0", "\xff", "é", "\u07ff", "\u0301", "\u0800", "\u200b", "\u2028", "\ufeff",
          "\ufffd", "\uffff", "\u4e2d", "\U00010000", "\U0001f600", "\U0003ffff", "\U00040000",
          "\U00080000", "\U000c0000", "\U000fffff", "\U00100000", "\U0010ffff"]
LONE = ["\ud800", "\udfff", "a\udc80b", "\ud83d\ude00", "x,\udbff"]  # no UTF-8 for these
MAX_TOKENS = [0, 1, 2, 3, 4, 5, 7, 17, 40, 63, 64, 65, 120, 255, 256, 257, 1000, 10**9, 10**30,
              -1, -2, -3, -7, -10**30, True, False, None]


def value(rnd: random.Random) -> str:
    n = rnd.choice([0, 0, 1, 2, 3, 7, 12, 40, 130, 600])
    return "".join(rnd.choice(PIECES) for _ in range(n))


def hostile_fields(seed: int = 11, n: int = 90) -> list[list[tuple[str, str]]]:
    rnd = random.Random(seed)
    cases = [[], [("f", "")], [("f", ""), ("g", "")], [("f", "\x00")], [("f", "\U0010ffff")],
             [("f", "\U0010ffff" * 40)], [("a", "é" * 3), ("b", "\U00100000")],
             [("x", "".join(chr(c) for c in range(1, 128)))],
             [("x", "".join(chr(c) for c in range(0x80, 0x800, 7)))],
             [("user", "U1@DOM1"), ("host", "C1"), ("auth", "Kerberos")]]
    for _ in range(n):
        cases.append([(rnd.choice(["user", "host", "", "é", "\x00"]), value(rnd))
                      for _ in range(rnd.choice([1, 1, 2, 3, 5]))])
    return cases


def bad_fields() -> list[list]:
    """Inputs both versions must refuse, the same way."""
    cases = [[("f", s)] for s in LONE] + [[("f", "ok"), ("g", s)] for s in LONE]
    cases += [[("f", None)], [("f", b"bytes")], [("f", 5)], [("f", "a"), ("g", ["x"])]]
    return cases


def test_the_hostile_inputs_reach_every_utf8_byte_class():
    """Control: the generated text has NUL, every lead byte 0xF0..0xF4, continuation bytes, and
    events long enough for every max_tokens to cut inside a multi-byte character."""
    seen = set()
    cut_inside = set()
    for fields in hostile_fields():
        data = join_fields(fields).encode("utf-8")
        seen.update(data)
        for m in MAX_TOKENS:
            if isinstance(m, int) and 0 < m < len(data) and 0x80 <= data[m] < 0xC0:
                cut_inside.add(m)
    assert {0x00, 0x7F, 0x80, 0xBF, 0xC2, 0xDF, 0xE0, 0xEF, 0xF0, 0xF1, 0xF2, 0xF3, 0xF4} <= seen
    assert max(seen) == 0xF4  # nothing above: the table's last entries are unused, as claimed
    assert len(cut_inside) >= 5
    assert any(len(join_fields(f).encode()) > 1000 for f in hostile_fields())


# ------------------------------------------------------------------ ids against the written-out old code


def test_char_ids_are_the_old_ids_as_bytes():
    tok = CharTokenizer()
    for fields in hostile_fields():
        ids, expected = tok.encode(fields), ref_encode(fields)
        assert type(ids) is bytes
        assert list(ids) == expected, fields
        assert len(ids) == len(expected)
        assert all(type(i) is int for i in ids)
        for k in (0, 1, -1, -2, len(expected) // 2):  # indexing gives the old ints
            if -len(expected) <= k < len(expected):
                assert ids[k] == expected[k]
        assert tok.decode(ids) == tok.decode(expected)
        assert "".join(tok.decode(ids)).encode("latin-1") == join_fields(fields).encode("utf-8")


def test_every_byte_maps_as_before():
    """All 256 bytes through the table (the test strings only reach 0x00..0xF4): the reachable
    ones are byte + 4; what str.encode cannot give is not compared."""
    from nn.tokenizers import _CHAR_IDS

    for b in range(0xF5):
        assert bytes([b]).translate(_CHAR_IDS)[0] == N_SPECIAL + b
    text = "".join(chr(c) for c in range(0x10000) if not 0xD800 <= c < 0xE000)
    text += "".join(chr(c) for c in range(0x10000, 0x110000, 97)) + "\U0010ffff"
    assert list(CharTokenizer().encode([("x", text)])) == ref_encode([("x", text)])


def test_encode_event_is_the_old_sequence_for_every_max_tokens():
    tok = CharTokenizer()
    for fields in hostile_fields():
        for m in MAX_TOKENS:
            got, expected = outcome(encode_event, tok, fields, m), outcome(ref_event, fields, m)
            assert got[0] == expected[0] == "ok"
            assert type(got[1]) is bytes
            assert list(got[1]) == expected[1], (fields, m)
            assert got[1][0] == BOS and got[1][-1] == EOS
            assert list(got[1][1:-1]) == expected[1][1:-1]  # the history's slice
            assert tuple(got[1][1:-1]) == tuple(expected[1][1:-1])


def test_bad_values_raise_as_before():
    tok = CharTokenizer()
    for fields in bad_fields():
        for got, expected in ((outcome(tok.encode, fields), outcome(ref_encode, fields)),
                              (outcome(encode_event, tok, fields, 3), outcome(ref_event, fields, 3))):
            assert expected[0] == "err", fields  # control: the old code refused it
            assert got == expected, fields
    # A max_tokens that is no slice index: the same refusal
    fields = [("f", "abc")]
    for bad in (1.5, "3", [2]):
        assert outcome(encode_event, tok, fields, bad) == outcome(ref_event, fields, bad)
        assert outcome(ref_event, fields, bad)[0] == "err"


# ------------------------------------------------------------------ batches, scores, training


def tiny_models() -> dict[str, torch.nn.Module]:
    vocab = CharTokenizer.vocab_size
    rnn = {"kind": "rnn", "vocab_size": vocab, "cell": "lstm", "hidden_size": 12, "n_layer": 1,
           "dropout": 0.0}
    args = {"lstm": {**rnn, "bidirectional": False},
            "bi-lstm": {**rnn, "bidirectional": True},
            "gru-syntax": {**rnn, "cell": "gru", "bidirectional": False, "attention": "syntax",
                           "block_size": 80},
            "gpt": {"kind": "gpt", "vocab_size": vocab, "block_size": 80, "n_layer": 1, "n_head": 2,
                    "n_embd": 16, "dropout": 0.0}}
    models = {}
    for i, (name, a) in enumerate(args.items()):
        torch.manual_seed(100 + i)
        models[name] = build_model(a).eval()
    return models


def sequences(max_tokens_list=(0, 1, 5, 40)) -> tuple[list[bytes], list[list[int]]]:
    tok = CharTokenizer()
    new, old = [], []
    for fields in hostile_fields(seed=3, n=30):
        for m in max_tokens_list:
            new.append(encode_event(tok, fields, m))
            old.append(ref_event(fields, m))
    return new, old


def mixed_rows(new: list[bytes]) -> list:
    """A batch of bytes rows beside rows a topic or entity context gives: lists and tuples (one
    with ids 256..259, past a byte), and context rows (negative ids)."""
    return [new[0], list(new[1]), tuple(new[2]), [BOS, 256, 257, 259, EOS], new[3],
            with_context(new[4], [tuple(new[5][1:-1]), tuple(new[6][1:-1])]), new[7]]


def test_pad_batch_of_bytes_rows_is_the_old_batch():
    new, old = sequences()
    assert all(type(r) is bytes for r in new) and all(type(r) is list for r in old)
    for start in range(0, len(new), 13):
        got, expected = pad_batch(new[start:start + 13]), pad_batch(old[start:start + 13])
        assert got.dtype == expected.dtype == torch.long
        assert torch.equal(got, expected)
    # the flat ids are the bytes joined (the fast path), equal to the lists'
    assert _flat_ids(new[:20], sum(map(len, new[:20]))).tolist() == [i for r in old[:20] for i in r]
    mixed = mixed_rows(new)
    mixed_old = [list(r) if isinstance(r, (bytes, tuple)) else r for r in mixed]
    assert torch.equal(pad_batch(mixed), pad_batch(mixed_old))
    assert pad_batch(mixed).min() < 0 and pad_batch(mixed).max() == 259  # control: both kinds there
    # control: one id changed in one row changes the batch
    changed = [bytes([BOS, 5, EOS])] + new[1:13]
    assert not torch.equal(pad_batch(changed), pad_batch(old[:13]))


def _hexes(results):
    return [(m.hex(), t.hex(), tuple(x.hex() for x in per)) for m, t, per in results]


def test_scores_of_bytes_rows_are_bit_identical():
    new, old = sequences()
    ctx_new = [with_context(new[i], [tuple(new[i - 1][1:-1])]) for i in range(1, len(new), 3)]
    ctx_old = [with_context(old[i], [tuple(old[i - 1][1:-1])]) for i in range(1, len(old), 3)]
    assert ctx_new == ctx_old  # with_context of bytes: the same list of ints
    for name, model in tiny_models().items():
        for seqs_new, seqs_old in ((new, old), (ctx_new, ctx_old), (mixed_rows(new), mixed_rows(old))):
            got = score_sequences(model, seqs_new, batch_size=11, per_token=True)
            expected = score_sequences(model, seqs_old, batch_size=11, per_token=True)
            assert _hexes(got) == _hexes(expected), name
            short = score_sequences(model, seqs_new, batch_size=11, per_token=False)
            assert [(m.hex(), t.hex()) for m, t, _ in short] == [(m, t) for m, t, _ in _hexes(expected)]
        # control: the losses are not all alike, and one changed id changes them
        means = {m for m, _, _ in _hexes(score_sequences(model, new, per_token=False))}
        assert len(means) > 10, name
        other = score_sequences(model, [bytes([BOS, 70, 71, EOS]), bytes([BOS, 70, 72, EOS])], per_token=True)
        assert other[0][2] != other[1][2]


def test_training_on_bytes_rows_is_bit_identical():
    new, old = sequences((3, 40))
    for name, model in tiny_models().items():
        if name == "gru-syntax":
            continue
        state = {k: v.clone() for k, v in model.state_dict().items()}
        results = []
        for seqs in (new, old, new[::-1]):
            model.load_state_dict(state)
            optimizer = make_optimizer(model, 1e-2, 0.0)
            loss = train_sequences(model, optimizer, seqs, epochs=2, batch_size=16, grad_clip=1.0, seed=9)
            results.append((loss.hex(), [p.detach().clone() for p in model.parameters()]))
        (loss_new, p_new), (loss_old, p_old), (loss_rev, p_rev) = results
        assert loss_new == loss_old, name
        assert all(torch.equal(a, b) for a, b in zip(p_new, p_old)), name
        # control: another order of the same rows trains to other weights
        assert loss_rev != loss_new or not all(torch.equal(a, b) for a, b in zip(p_new, p_rev))


# ------------------------------------------------------------------ the tokens topic


def _event(i, fields):
    return Event(line=i + 1, time=86400.0 + i / 3, fields=dict(fields), text_fields=tuple(fields),
                 source=("raw", i % 3, i))


def test_tokens_topic_bytes_are_the_old_records():
    tok = CharTokenizer()
    fast, slow = TokenizedEventWriter(), TokenizedEventWriter()
    slow.fast = False
    assert fast.fast  # control: the hand-written path is on
    count = 0
    for i, fields in enumerate(hostile_fields(seed=5, n=60)):
        for m in (0, 1, 3, 120, 10**6):
            ids, old_ids = encode_event(tok, fields, m), ref_event(fields, m)
            event = _event(i, fields)
            raw = join_fields(fields)
            generic = codec().encode(SCHEMA, event_to_record(
                dataclasses.replace(event, raw=raw, token_ids=tuple(old_ids))))
            for writer in (fast, slow):
                for given in (ids, old_ids):
                    assert writer.write_fields(event.line, event.time, event.fields, event.source,
                                               raw, given) == generic, (fields, m)
            # and the codec reads the old ids back
            assert codec().decode(generic)[1]["token_ids"] == old_ids
            count += 1
    assert count == 5 * 70
    # control: one id changed changes the record
    fields = [("f", "abc")]
    event = _event(0, fields)
    a = fast.write_fields(1, 1.0, event.fields, event.source, "abc", encode_event(tok, fields, 9))
    other = bytes([BOS, 5 + N_SPECIAL, 99, 103, EOS])
    b = fast.write_fields(1, 1.0, event.fields, event.source, "abc", other)
    assert a != b

