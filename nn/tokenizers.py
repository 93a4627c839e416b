"""Tokenizers: an event's fields -> token ids that never change between processes or runs.

Every tokenizer reserves the same special ids, so models and batching need not know which one
made a sequence. State is plain JSON-able data (saved inside checkpoints, loaded with
``weights_only=True``); nothing depends on Python's per-process ``hash()`` seed.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]
N_SPECIAL = len(SPECIAL_TOKENS)
MIN_FREE_SLOTS = 16  # a growing word field reserves at least this many ids for later values

Fields = Sequence[tuple[str, str]]  # (field name, value) pairs, in model order


def join_fields(fields: Fields) -> str:
    return ",".join(value for _, value in fields)


# UTF-8 byte b -> its char id N_SPECIAL + b. Valid UTF-8 (what str.encode gives) has no byte above
# 0xF4, so every id fits a byte; the table's last entries (0xFC-0xFF) are never used.
_CHAR_IDS = bytes(min(N_SPECIAL + b, 0xFF) for b in range(256))


class CharTokenizer:
    """UTF-8 bytes, offset past the specials: a fixed vocabulary that needs no fitting."""

    kind = "char"
    vocab_size = N_SPECIAL + 256

    def fit(self, samples: Iterable[Fields]) -> None:
        pass

    def encode(self, fields: Fields) -> bytes:
        """The ids as ``bytes``, one id a byte: made in C (``bytes.translate``), and packed into a
        batch with no conversion of Python ints (on an H200 host, scoring a char LSTM went from
        518k to 890k events/s with ids as bytes instead of lists)."""
        return join_fields(fields).encode("utf-8").translate(_CHAR_IDS)

    def decode(self, ids: Sequence[int]) -> list[str]:
        """One display string per id (a byte may be part of a multi-byte character)."""
        return [
            SPECIAL_TOKENS[i] if i < N_SPECIAL else bytes([i - N_SPECIAL]).decode("latin-1")
            for i in ids
        ]

    def state_dict(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def from_state(cls, state: dict) -> CharTokenizer:
        return cls()


def stable_bucket(value: str, buckets: int) -> int:
    """A hash that is the same in every process (unlike ``hash()`` under PYTHONHASHSEED)."""
    return zlib.crc32(value.encode("utf-8")) % buckets


class WordTokenizer:
    """Field-aware words: a vocabulary per field, learned from the first window, plus OOV buckets.

    With ``grow`` (tokenizer.word.grow), field f owns the fixed id range [offset_f, offset_f +
    capacity_f + oov_buckets), allocated at fit: ``grow()`` gives values first seen later the
    field's next free ids, so vocab_size (the model's size) never changes and old ids never
    move. capacity_f is the first window's n_f values plus max(ceil(grow_reserve * n_f), 16)
    free slots, at most max_vocab_per_field: a field of two values does not reserve thousands
    (every slot is a row of the output softmax, which every token pays for). Without ``grow``
    (and in checkpoints older than growth) capacity_f = n_f and the vocabulary is frozen. An
    unseen value hashes into one of its field's buckets, so "new user" and "new host" stay
    distinguishable.
    """

    kind = "word"

    def __init__(
        self,
        split: str = "field",
        max_vocab_per_field: int = 5000,
        min_count: int = 1,
        oov_buckets: int = 8,
        grow: bool = False,
        grow_reserve: float = 1.0,
    ):
        self.split = split
        self.max_vocab_per_field = max_vocab_per_field
        self.min_count = min_count
        self.oov_buckets = oov_buckets
        self.grow_enabled = grow
        self.grow_reserve = grow_reserve
        self.vocabs: dict[str, list[str]] = {}
        self.capacities: dict[str, int] = {}  # fixed at fit when growing
        self._rebuild()

    def capacity(self, name: str) -> int:
        """Id slots of field ``name`` before its OOV buckets."""
        return self.capacities[name] if self.grow_enabled else len(self.vocabs[name])

    def oov_start(self, name: str) -> int:
        return self.offsets[name] + self.capacity(name)

    def _rebuild(self) -> None:
        self.offsets: dict[str, int] = {}
        self.index: dict[str, dict[str, int]] = {}
        next_id = N_SPECIAL
        for name, words in self.vocabs.items():
            self.offsets[name] = next_id
            self.index[name] = {w: next_id + i for i, w in enumerate(words)}
            next_id += self.capacity(name) + self.oov_buckets
        self.vocab_size = next_id

    def _words(self, value: str) -> list[str]:
        return value.split() if self.split == "whitespace" else [value]

    def fit(self, samples: Iterable[Fields]) -> None:
        if self.vocabs:
            raise RuntimeError("word vocabulary is frozen once learned")
        counts: dict[str, Counter] = {}
        for fields in samples:
            for name, value in fields:
                counts.setdefault(name, Counter()).update(self._words(value))
        for name, counter in counts.items():
            # Sort by count then text so ties break the same way in every process.
            ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
            self.vocabs[name] = [
                w for w, c in ranked[: self.max_vocab_per_field] if c >= self.min_count
            ]
            n = len(self.vocabs[name])
            free = max(math.ceil(self.grow_reserve * n), MIN_FREE_SLOTS)
            self.capacities[name] = min(self.max_vocab_per_field, n + free)
        self._rebuild()

    def grow(self, samples: Iterable[Fields]) -> dict[str, list[str]]:
        """Give values not yet in the vocabulary, seen at least ``min_count`` times in
        ``samples``, their field's next free ids (by count, then text: the same in every
        process), until the field's capacity is full; the rest stay in the OOV buckets.
        Returns the values added per field. A no-op before fit, without ``grow``, and for fields
        fit never saw (they have no id range)."""
        if not self.grow_enabled or not self.vocabs:
            return {}
        counts: dict[str, Counter] = {name: Counter() for name in self.vocabs}
        for fields in samples:
            for name, value in fields:
                index = self.index.get(name)
                if index is not None:
                    counts[name].update(w for w in self._words(value) if w not in index)
        added: dict[str, list[str]] = {}
        for name, counter in counts.items():
            free = self.capacity(name) - len(self.vocabs[name])
            ranked = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
            new = [w for w, c in ranked if c >= self.min_count][:max(free, 0)]
            if new:
                start = self.offsets[name] + len(self.vocabs[name])
                self.vocabs[name].extend(new)
                self.index[name].update((w, start + i) for i, w in enumerate(new))
                added[name] = new
        return added

    def encode(self, fields: Fields) -> list[int]:
        ids = []
        for name, value in fields:
            if name not in self.index:
                ids.extend(UNK for _ in self._words(value))
                continue
            vocab, oov_start = self.index[name], self.oov_start(name)
            for word in self._words(value):
                token = vocab.get(word)
                ids.append(token if token is not None else oov_start + stable_bucket(word, self.oov_buckets))
        return ids

    def decode(self, ids: Sequence[int]) -> list[str]:
        names = {}
        for name, words in self.vocabs.items():
            start = self.offsets[name]
            names.update({start + i: w for i, w in enumerate(words)})
            names.update({self.oov_start(name) + b: f"<{name}:oov{b}>" for b in range(self.oov_buckets)})
        return [SPECIAL_TOKENS[i] if i < N_SPECIAL else names.get(i, "[?]") for i in ids]

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "split": self.split,
            "max_vocab_per_field": self.max_vocab_per_field,
            "min_count": self.min_count,
            "oov_buckets": self.oov_buckets,
            # The id layout: True, fixed capacity per field; False, frozen (len(vocab) per field).
            "grow": self.grow_enabled,
            "grow_reserve": self.grow_reserve,
            "capacities": dict(self.capacities),
            "vocabs": {name: list(words) for name, words in self.vocabs.items()},
        }

    @classmethod
    def from_state(cls, state: dict) -> WordTokenizer:
        # A state saved before growth existed has no "grow": it keeps its frozen layout, so its
        # ids, vocab_size and model stay valid.
        tok = cls(state["split"], state["max_vocab_per_field"], state["min_count"], state["oov_buckets"],
                  bool(state.get("grow", False)), state.get("grow_reserve", 1.0))
        tok.vocabs = {name: list(words) for name, words in state["vocabs"].items()}
        tok.capacities = {name: int(n) for name, n in state.get("capacities", {}).items()}
        tok._rebuild()
        return tok


# The GPT-2 pre-tokenization regex that the ByteLevel pre-tokenizer applies, restricted to ASCII:
# \p{L} -> [A-Za-z], \p{N} -> [0-9], \s -> the six ASCII White_Space characters (not Python's
# \s, which also takes \x1c-\x1f). On ASCII text it cuts exactly where Hugging Face cuts
# (tests/test_tokenizers.py fuzzes this), and byte-level BPE encodes each piece on its own.
_WS = " \t\n\x0b\x0c\r"
_ASCII_PIECES = re.compile(
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
# Bounds of the two encode caches (each ~20 MB when full; cleared whole, then refilled).
_PIECE_CACHE_SIZE = 100_000  # pre-tokenized pieces
_LINE_CACHE_SIZE = 50_000  # whole event texts: auth logs repeat most events


class BpeTokenizer:
    """Byte-level BPE (Hugging Face ``tokenizers``), merges learned once from the first window.

    Encoding goes through two caches: whole event texts (auth logs repeat most events), then
    pre-tokenized pieces (log lines repeat their words). The library spends most of its time per
    call and per character (measured ~15-40k lines/s), not in the merges. ASCII lines are cut into
    pieces here and only unseen pieces reach the library; other lines go to it whole. The ids are
    the library's either way.
    """

    kind = "bpe"

    def __init__(self, vocab_size: int = 1000, min_frequency: int = 2):
        self.target_vocab_size = vocab_size
        self.min_frequency = min_frequency
        self._tok = None
        self._piece_ids: dict[str, list[int]] = {}
        self._line_ids: dict[str, tuple[int, ...]] = {}

    @property
    def vocab_size(self) -> int:
        if self._tok is None:
            raise RuntimeError("BPE tokenizer used before fit()")
        return self._tok.get_vocab_size()

    def fit(self, samples: Iterable[Fields]) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if self._tok is not None:
            raise RuntimeError("BPE merges are frozen once learned")
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self.target_vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=SPECIAL_TOKENS,  # first, so they get ids 0..3 like every tokenizer
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator((join_fields(f) for f in samples), trainer)
        self._tok = tok
        self._freeze_specials()

    def _freeze_specials(self) -> None:
        # Log text is attacker-controlled: a literal "[PAD]" in a field must not become id 0.
        # (The flag is not part of the saved JSON, so it is set again after every load.)
        self._tok.encode_special_tokens = True

    def encode(self, fields: Fields) -> list[int]:
        if self._tok is None:
            raise RuntimeError("BPE tokenizer used before fit()")
        text = join_fields(fields)
        ids = self._line_ids.get(text)
        if ids is None:
            if len(self._line_ids) >= _LINE_CACHE_SIZE:
                self._line_ids.clear()
            ids = self._line_ids[text] = tuple(self._encode_text(text))
        return list(ids)

    def _encode_text(self, text: str) -> list[int]:
        if not text.isascii():
            return self._tok.encode(text, add_special_tokens=False).ids
        cache = self._piece_ids
        if len(cache) >= _PIECE_CACHE_SIZE:
            cache.clear()
        ids: list[int] = []
        for piece in _ASCII_PIECES.findall(text):
            piece_ids = cache.get(piece)
            if piece_ids is None:
                piece_ids = cache[piece] = self._tok.encode(piece, add_special_tokens=False).ids
            ids += piece_ids
        return ids

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.decode([i], skip_special_tokens=False) for i in ids]

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "vocab_size": self.target_vocab_size,
            "min_frequency": self.min_frequency,
            "tokenizer_json": self._tok.to_str() if self._tok is not None else None,
        }

    @classmethod
    def from_state(cls, state: dict) -> BpeTokenizer:
        from tokenizers import Tokenizer

        tok = cls(state["vocab_size"], state["min_frequency"])
        if state["tokenizer_json"] is not None:
            tok._tok = Tokenizer.from_str(state["tokenizer_json"])
            tok._freeze_specials()
        return tok


TOKENIZERS = {cls.kind: cls for cls in (CharTokenizer, WordTokenizer, BpeTokenizer)}
# nn/templates.py's TemplateTokenizer ("template") too; typed loosely here, because that module
# imports this one (it is looked up when asked for, below).
AnyTokenizer = CharTokenizer | WordTokenizer | BpeTokenizer


def _tokenizer_class(kind: object) -> type | None:
    if kind == "template":
        from nn.templates import TemplateTokenizer

        return TemplateTokenizer
    return TOKENIZERS.get(kind)


def build_tokenizer(kind: str, **options) -> AnyTokenizer:
    return _tokenizer_class(kind)(**options)


def tokenizer_from_state(state: dict) -> AnyTokenizer:
    kind = state.get("kind")
    cls = _tokenizer_class(kind)
    if cls is None:
        raise ValueError(f"unknown tokenizer kind {kind!r} in saved state")
    return cls.from_state(state)


def needs_fit(tokenizer: AnyTokenizer) -> bool:
    if isinstance(tokenizer, WordTokenizer):
        return not tokenizer.vocabs
    if isinstance(tokenizer, BpeTokenizer):
        return tokenizer._tok is None
    if getattr(tokenizer, "kind", None) == "template":
        return not tokenizer.fitted
    return False


_BOS, _EOS = bytes((BOS,)), bytes((EOS,))


def encode_event(tokenizer: AnyTokenizer, fields: Fields, max_tokens: int) -> Sequence[int]:
    """BOS + at most ``max_tokens`` ids + EOS: the sequence every model reads (``bytes`` from the
    char tokenizer, a list from the others)."""
    ids = tokenizer.encode(fields)[:max_tokens]
    if type(ids) is bytes:
        return _BOS + ids + _EOS
    return [BOS, *ids, EOS]
