"""Tokenizers: fixed special ids, per-field word vocabularies with stable OOV buckets, BPE,
state round trips, and ids that do not depend on the process (PYTHONHASHSEED)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from nn.tokenizers import (
    BOS,
    EOS,
    N_SPECIAL,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    BpeTokenizer,
    CharTokenizer,
    WordTokenizer,
    build_tokenizer,
    encode_event,
    needs_fit,
    stable_bucket,
    tokenizer_from_state,
)

REPO = Path(__file__).resolve().parents[1]
FIELDS = ("src_user", "dst_user", "src_computer", "dst_computer", "auth_type")


def lanl_sample(n: int = 120, seed: int = 7) -> list[tuple[tuple[str, str], ...]]:
    """LANL-like events, as (field, value) pairs, from a fixed RNG (same in every process)."""
    rng = random.Random(seed)
    events = []
    for _ in range(n):
        user = f"U{rng.randint(1, 6)}@DOM1"
        src, dst = f"C{rng.randint(1, 5)}", f"C{rng.randint(1, 5)}"
        auth = rng.choice(["Kerberos", "NTLM", "Negotiate"])
        events.append(tuple(zip(FIELDS, (user, user, src, dst, auth))))
    return events


def unseen_events() -> list[tuple[tuple[str, str], ...]]:
    """Events with values never in ``lanl_sample`` (OOV for the word tokenizer)."""
    return [
        tuple(zip(FIELDS, (f"U{900 + i}@DOM9", "U1@DOM1", f"C{700 + i}", "C1", "Kerberos")))
        for i in range(5)
    ] + [tuple(zip(FIELDS, ("ANONYMOUS LOGON@C586", "é ü", "C1", "C1", "MICROSOFT_AUTH")))]


# ---------------------------------------------------------------------------- specials / char


def test_special_ids_are_fixed():
    assert (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
    assert SPECIAL_TOKENS == ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
    assert N_SPECIAL == 4


def test_char_ids_are_utf8_bytes_past_the_specials():
    tok = CharTokenizer()
    assert tok.vocab_size == 260
    assert not needs_fit(tok)
    # "A" is byte 65, "," byte 44, "é" the two bytes 0xC3 0xA9; each offset by the 4 specials.
    # The ids come as bytes, one id a byte (indexing and iterating give the ints).
    assert tok.encode([("f", "A")]) == bytes([69])
    assert list(tok.encode([("f", "A"), ("g", "b")])) == [69, 48, 102]
    assert list(tok.encode([("f", "é")])) == [0xC3 + 4, 0xA9 + 4]
    text = "U1@DOM1,C1,Kerberos"
    ids = tok.encode([("a", "U1@DOM1"), ("b", "C1"), ("c", "Kerberos")])
    assert "".join(tok.decode(ids)) == text
    assert all(N_SPECIAL <= i < 260 for i in ids)
    assert tok.decode([PAD, BOS, EOS, UNK]) == SPECIAL_TOKENS


def test_char_ids_do_not_depend_on_fit_or_instance():
    sample = lanl_sample()
    fresh = CharTokenizer()
    fitted = CharTokenizer()
    fitted.fit(sample[:10])
    fitted.fit(unseen_events())  # fitting is a no-op, even twice
    for fields in sample + unseen_events():
        assert fitted.encode(fields) == fresh.encode(fields)
    every_byte = "".join(chr(b) for b in range(1, 128))
    ids = fresh.encode([("x", every_byte)])
    assert list(ids) == list(range(N_SPECIAL + 1, N_SPECIAL + 128))
    # The top of UTF-8: U+10FFFF is F4 8F BF BF, the highest byte any text encodes to
    top = "\U0010ffff\u00ff"
    assert list(fresh.encode([("x", top)])) == [N_SPECIAL + b for b in top.encode()]


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_encode_event_adds_bos_eos_and_truncates(kind):
    tok = build_tokenizer(kind)
    sample = lanl_sample()
    tok.fit(sample)
    fields = sample[0]
    body = tok.encode(fields)
    assert len(body) > 3
    whole = encode_event(tok, fields, max_tokens=1000)
    assert list(whole) == [BOS, *body, EOS]
    assert type(whole) is type(body)  # bytes from char (one id a byte), lists from the others
    cut = encode_event(tok, fields, max_tokens=3)
    assert list(cut) == [BOS, *body[:3], EOS]
    assert len(cut) == 5
    assert list(encode_event(tok, fields, max_tokens=len(body))) == [BOS, *body, EOS]


# ---------------------------------------------------------------------------- word


def field_range(tok: WordTokenizer, name: str) -> range:
    start = tok.offsets[name]
    return range(start, start + len(tok.vocabs[name]) + tok.oov_buckets)


def test_word_vocab_is_per_field_and_ordered_by_count_then_text():
    sample = [
        (("user", "bob"), ("host", "C1")),
        (("user", "alice"), ("host", "C1")),
        (("user", "bob"), ("host", "C2")),
        (("user", "carol"), ("host", "bob")),
    ]
    tok = WordTokenizer(oov_buckets=4)
    tok.fit(sample)
    assert tok.vocabs == {"user": ["bob", "alice", "carol"], "host": ["C1", "C2", "bob"]}
    assert tok.vocab_size == N_SPECIAL + (3 + 4) + (3 + 4)
    users, hosts = field_range(tok, "user"), field_range(tok, "host")
    assert set(users).isdisjoint(hosts)
    assert min(users) == N_SPECIAL and max(hosts) == tok.vocab_size - 1
    # "bob" is a user and a host: two different ids, each inside its own field's range.
    bob_user, bob_host = tok.encode([("user", "bob"), ("host", "bob")])
    assert bob_user != bob_host
    assert bob_user in users and bob_host in hosts
    # Known values get distinct ids, and decode names them.
    ids = [tok.encode([("user", u)])[0] for u in ("bob", "alice", "carol")]
    assert len(set(ids)) == 3
    assert tok.decode(ids) == ["bob", "alice", "carol"]
    # A field never seen in fit is UNK.
    assert tok.encode([("nonsense", "x")]) == [UNK]


def test_word_vocab_does_not_depend_on_event_order():
    sample = lanl_sample()
    shuffled = list(sample)
    random.Random(3).shuffle(shuffled)
    assert shuffled != sample
    a, b = WordTokenizer(), WordTokenizer()
    a.fit(sample)
    b.fit(shuffled)
    assert a.vocabs == b.vocabs
    for fields in sample + unseen_events():
        assert a.encode(fields) == b.encode(fields)


def test_word_oov_values_hash_into_their_fields_buckets():
    tok = WordTokenizer(oov_buckets=8)
    tok.fit(lanl_sample())
    known = {i for fields in lanl_sample() for i in tok.encode(fields)}
    user_oov = range(tok.offsets["src_user"] + len(tok.vocabs["src_user"]),
                     field_range(tok, "src_user").stop)
    host_oov = range(tok.offsets["src_computer"] + len(tok.vocabs["src_computer"]),
                     field_range(tok, "src_computer").stop)
    assert len(user_oov) == len(host_oov) == 8
    user_ids, host_ids = set(), set()
    for i in range(200):
        value = f"never-seen-{i}"
        (u,) = tok.encode([("src_user", value)])
        (h,) = tok.encode([("src_computer", value)])
        assert u in user_oov and h in host_oov
        assert u not in known and h not in known
        assert u != UNK and h != UNK
        # The same unseen value always lands in the same bucket, in either field.
        assert tok.encode([("src_user", value)]) == [u]
        assert u - user_oov.start == h - host_oov.start == stable_bucket(value, 8)
        user_ids.add(u)
        host_ids.add(h)
    assert user_ids.isdisjoint(host_ids)
    assert len(user_ids) == 8 and len(host_ids) == 8  # 200 values spread over every bucket
    assert tok.decode([user_oov.start]) == ["<src_user:oov0>"]


def test_word_vocabulary_is_frozen_after_fit():
    sample = lanl_sample()
    tok = WordTokenizer()
    assert needs_fit(tok)
    tok.fit(sample[:40])
    assert not needs_fit(tok)
    before_size = tok.vocab_size
    probe = sample + unseen_events()
    before = [tok.encode(f) for f in probe]
    with pytest.raises(RuntimeError, match="frozen"):
        tok.fit(unseen_events())
    assert tok.vocab_size == before_size
    assert [tok.encode(f) for f in probe] == before
    # A value first seen after fitting stays out of the vocabulary.
    new_user = unseen_events()[0][0][1]
    (i,) = tok.encode([("src_user", new_user)])
    assert i >= tok.offsets["src_user"] + len(tok.vocabs["src_user"])


def test_word_min_count_max_vocab_and_whitespace_split():
    sample = [(("f", "a"),)] * 3 + [(("f", "b"),)] * 2 + [(("f", "c"),)]
    tok = WordTokenizer(min_count=2)
    tok.fit(sample)
    assert tok.vocabs == {"f": ["a", "b"]}
    capped = WordTokenizer(max_vocab_per_field=1)
    capped.fit(sample)
    assert capped.vocabs == {"f": ["a"]}
    words = WordTokenizer(split="whitespace")
    words.fit([(("msg", "open file ok"),), (("msg", "close file"),)])
    assert words.vocabs == {"msg": ["file", "close", "ok", "open"]}
    ids = words.encode([("msg", "open file  now")])
    assert len(ids) == 3
    assert words.decode(ids[:2]) == ["open", "file"]


# ---------------------------------------------------------------------------- BPE


def test_bpe_fit_and_encode():
    sample = lanl_sample()
    tok = BpeTokenizer(vocab_size=400, min_frequency=2)
    assert needs_fit(tok)
    with pytest.raises(RuntimeError):
        tok.encode(sample[0])
    tok.fit(sample)
    assert not needs_fit(tok)
    # 4 specials + 256 byte alphabet, plus some learned merges, within the requested size.
    assert N_SPECIAL + 256 < tok.vocab_size <= 400
    assert tok.decode([PAD, BOS, EOS, UNK]) == SPECIAL_TOKENS
    char = CharTokenizer()
    seen: dict[tuple[int, ...], str] = {}
    for fields in sample + unseen_events():
        ids = tok.encode(fields)
        text = ",".join(v for _, v in fields)
        assert all(N_SPECIAL <= i < tok.vocab_size for i in ids)
        assert len(ids) <= len(char.encode(fields))
        # Byte-level: nothing is lost, not even unseen text: different texts, different ids.
        assert seen.setdefault(tuple(ids), text) == text
    assert len(seen) > 20
    ascii_text = "U1@DOM1,C586,Kerberos"
    assert "".join(tok.decode(tok.encode([("f", ascii_text)]))) == ascii_text
    # Merges were learned from the sample: frequent events take clearly fewer ids than bytes.
    bpe_total = sum(len(tok.encode(f)) for f in sample)
    assert bpe_total < 0.8 * sum(len(char.encode(f)) for f in sample)
    with pytest.raises(RuntimeError, match="frozen"):
        tok.fit(sample)


def test_bpe_never_emits_special_ids_for_log_text():
    """Log text is data: a field that happens to contain "[PAD]" or "[EOS]" must not become
    the PAD / EOS id (PAD inside a sequence is dropped from scoring and shortens the length
    the bidirectional RNN computes; EOS would end the event early)."""
    tok = BpeTokenizer(vocab_size=400)
    tok.fit(lanl_sample())
    for text in ("x[PAD]y", "[EOS]", "[BOS]", "[UNK]"):
        ids = tok.encode([("f", text)])
        assert all(i >= N_SPECIAL for i in ids), (text, ids)


# ---------------------------------------------------------------------------- state round trip


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_state_roundtrip_gives_identical_ids(kind):
    sample = lanl_sample()
    tok = build_tokenizer(kind)
    tok.fit(sample)
    state = tok.state_dict()
    assert state["kind"] == kind
    # Checkpoints hold plain data only: the state survives JSON unchanged.
    restored = tokenizer_from_state(json.loads(json.dumps(state)))
    assert type(restored) is type(tok)
    assert restored.vocab_size == tok.vocab_size
    assert not needs_fit(restored) or kind == "char"
    probe = sample + unseen_events()
    original_ids = [tok.encode(f) for f in probe]
    assert [restored.encode(f) for f in probe] == original_ids
    assert restored.state_dict() == state
    # Control: the probe really exercises the vocabulary (not all ids the same).
    assert len({i for ids in original_ids for i in ids}) > 10


def test_unknown_tokenizer_state_is_rejected():
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizer_from_state({"kind": "sentencepiece"})


# ---------------------------------------------------------------------------- across processes

CHILD = """
import json, random
from nn.tokenizers import BpeTokenizer, CharTokenizer, WordTokenizer
FIELDS = ("src_user", "dst_user", "src_computer", "dst_computer", "auth_type")
def lanl_sample(n=120, seed=7):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        user = f"U{rng.randint(1, 6)}@DOM1"
        src, dst = f"C{rng.randint(1, 5)}", f"C{rng.randint(1, 5)}"
        auth = rng.choice(["Kerberos", "NTLM", "Negotiate"])
        out.append(tuple(zip(FIELDS, (user, user, src, dst, auth))))
    return out
sample = lanl_sample()
probe = sample + [tuple(zip(FIELDS, (f"U{900 + i}@DOM9", "x y", f"C{700 + i}", "C1", "Z")))
                  for i in range(20)]
result = {"hash": hash("U1@DOM1,C1")}
for tok in (CharTokenizer(), WordTokenizer(oov_buckets=8), BpeTokenizer(vocab_size=400)):
    tok.fit(sample)
    result[tok.kind] = [list(tok.encode(f)) for f in probe]
    result[tok.kind + "_state"] = tok.state_dict()
print(json.dumps(result))
"""


def run_child(hash_seed: str) -> dict:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_ids_are_identical_across_processes_with_different_hash_seeds():
    one, two = run_child("1"), run_child("2")
    # Control: the two processes really hash strings differently.
    assert one["hash"] != two["hash"]
    for kind in ("char", "word", "bpe"):
        assert one[kind] == two[kind], kind
        assert one[kind + "_state"] == two[kind + "_state"], kind
    # And they agree with this process (a third hash seed).
    sample = lanl_sample()
    word = WordTokenizer(oov_buckets=8)
    word.fit(sample)
    assert one["word_state"] == json.loads(json.dumps(word.state_dict()))
    assert one["word"][: len(sample)] == [word.encode(f) for f in sample]
    # The OOV part of the probe did hit buckets (the hash-sensitive path was exercised).
    oov = [ids[0] for ids in one["word"][len(sample):]]
    assert all(i >= word.offsets["src_user"] + len(word.vocabs["src_user"]) for i in oov)
    assert len(set(oov)) > 1


# ---------------------------------------------------------------------------- BPE fast path


def _fuzz_texts(n: int, seed: int) -> list[str]:
    """Text built to stress the pre-tokenizer: contractions, runs and mixes of whitespace
    (including \\x1c-\\x1f, whitespace to Python but not to Unicode), digits, punctuation, and
    some non-ASCII lines (which take the library path)."""
    rng = random.Random(seed)
    atoms = ["a", "Zq", "U1@DOM1", "9", "042", " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x0c",
             "\x1c", "\x1f", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'", "''S", ",", "[PAD]",
             ".:;", "-_", "!?", "{}", "\\", "/", "=", "%", "é", "ü", "\u00a0", "\u2028", "日本"]
    texts = []
    for _ in range(n):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 14)))
        texts.append(text if rng.random() < 0.8 else text.encode("ascii", "ignore").decode())
    return texts


@pytest.mark.parametrize("fit_on", ["lanl", "fuzz"])
def test_bpe_piece_cache_gives_exactly_the_librarys_ids(fit_on, monkeypatch):
    """The cached path cuts ASCII text itself: every id must equal the library's own encoding
    of the whole text, cold and warm, also right after a cache was cleared for size."""
    import nn.tokenizers as tokenizers

    texts = _fuzz_texts(3000, seed=11) + [",".join(v for _, v in f) for f in lanl_sample(300)]
    tok = BpeTokenizer(vocab_size=600, min_frequency=2)
    tok.fit(lanl_sample() if fit_on == "lanl" else [[("t", t)] for t in texts[:1500]])
    expected = [tok._tok.encode(t, add_special_tokens=False).ids for t in texts]
    assert sum(len(e) for e in expected) < sum(len(t.encode()) for t in texts)  # merges apply
    monkeypatch.setattr(tokenizers, "_PIECE_CACHE_SIZE", 50)  # clears many times on the way
    monkeypatch.setattr(tokenizers, "_LINE_CACHE_SIZE", 700)
    for _ in range(2):
        got = [tok.encode([("t", t)]) for t in texts]
        bad = [(t, g, e) for t, g, e in zip(texts, got, expected) if g != e]
        assert not bad, bad[:3]
    got[0].append(-1)  # a caller's list is its own: the cache is not changed through it
    assert tok.encode([("t", texts[0])]) == expected[0]


def test_bpe_asks_the_library_only_for_unseen_pieces():
    tok = BpeTokenizer(vocab_size=400)
    tok.fit(lanl_sample())
    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def encode(self, text, **kwargs):
            calls.append(text)
            return self.inner.encode(text, **kwargs)

    tok._tok = Counting(tok._tok)
    events = lanl_sample(2000, seed=3)
    first = [tok.encode(f) for f in events]
    distinct_pieces = len(set(calls))
    assert len(calls) == distinct_pieces < 60  # U1..U6, @, DOM, C1..C5, ... once each
    assert [tok.encode(f) for f in events] == first
    assert len(calls) == distinct_pieces  # all warm now
