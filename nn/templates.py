"""Template tokenizer: an event -> (template id, its parameters' ids), templates mined by drain3.

drain3 (IBM's streaming Drain) mines templates from the first window only, in event order, and is
then frozen: later lines are matched to the mined templates and never change them, so ids depend
on the first window alone, whatever order later events arrive in, and replay and streaming agree.
The frozen state is plain JSON-able data (the templates in id order and the parameter vocabulary),
not drain3's pickled tree: matching after fit is done here, by drain3's own match rule (same token
count, every non-wildcard token equal), with a deterministic choice when several templates match
(fewest wildcards, then lowest id). Rebuilding drain3's prefix tree from the final templates could
route a line differently from the tree that mined them, and so change ids across a restart.

Variable parts are best masked first (``tokenizer.mask``: ``<num>``, ``<ipv4>``, ...): the
parameters a template leaves then read as their mask names, and lines that differ only in masked
values get the same tokens. An event's tokens:

    [template id] + [one id per wildcard position: the word there]

Words have one vocabulary, the first window's most frequent words (all of them, not only those at
wildcards), plus stable-hash OOV buckets. A line no template matches gets an unknown-template
bucket (hashed from its token count and first word) followed by all its words, which then still
read as known words: on the BGL sample, whose first daily window holds 7 lines, this took ROC AUC
from 0.70 to 0.75 (benchmarks/detect_text.py). Pure; no torch, no Kafka.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from nn.tokenizers import N_SPECIAL, SPECIAL_TOKENS, Fields, stable_bucket

WILDCARD = "<*>"  # drain3's parameter marker (its param_str); a literal one in a log is escaped
_CACHE_SIZE = 100_000  # token tuples -> matches kept (cleared whole when full)


def line_words(fields: Fields) -> tuple[str, ...]:
    """The event's words: its fields' values in model order, split on whitespace. A literal
    "<*>" becomes "<<*>" so log text cannot pose as a wildcard (the mask escape, nn/masking.py)."""
    words = " ".join(value for _, value in fields).split()
    return tuple("<" + w if w == WILDCARD else w for w in words)


class TemplateMatcher:
    """Frozen templates (tuples with None at wildcard positions) -> the best one for a line."""

    def __init__(self, templates: Sequence[Sequence[str | None]]):
        self.templates = [tuple(t) for t in templates]
        # Per token count, candidates most specific first (fewest wildcards), then by id.
        self.by_length: dict[int, list[tuple[int, tuple[str | None, ...]]]] = {}
        for tid, template in enumerate(self.templates):
            self.by_length.setdefault(len(template), []).append((tid, template))
        for candidates in self.by_length.values():
            candidates.sort(key=lambda c: (sum(t is None for t in c[1]), c[0]))
        self._cache: dict[tuple[str, ...], int | None] = {}

    def match(self, words: tuple[str, ...]) -> int | None:
        """The template id of ``words``, or None when no template matches them."""
        if words in self._cache:
            return self._cache[words]
        found = None
        for tid, template in self.by_length.get(len(words), ()):
            if all(t is None or t == w for t, w in zip(template, words)):
                found = tid
                break
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[words] = found
        return found


def mine_templates(lines: Iterable[tuple[str, ...]], sim_threshold: float, depth: int,
                   max_children: int, max_templates: int) -> list[tuple[str | None, ...]]:
    """drain3's templates for ``lines`` (in the order given), at most ``max_templates``: the
    largest clusters, ties by first appearance. Duplicate templates (drain3 can leave the same
    template in two tree leaves) are kept once."""
    from drain3.drain import Drain  # only where templates are mined: the import costs ~50 ms

    drain = Drain(depth=depth, sim_th=sim_threshold, max_children=max_children, param_str=WILDCARD)
    for words in lines:
        drain.add_log_message(" ".join(words))
    sizes: dict[tuple[str | None, ...], int] = {}
    first: dict[tuple[str | None, ...], int] = {}
    for cluster in sorted(drain.clusters, key=lambda c: c.cluster_id):
        template = tuple(None if t == WILDCARD else t for t in cluster.log_template_tokens)
        sizes[template] = sizes.get(template, 0) + cluster.size
        first.setdefault(template, cluster.cluster_id)
    ranked = sorted(sizes, key=lambda t: (-sizes[t], first[t]))[:max_templates]
    return sorted(ranked, key=lambda t: first[t])  # ids in order of first appearance


class TemplateTokenizer:
    """Template id + parameter words; templates and word vocabulary learned from the first
    window and frozen (see the module docstring for the id layout's why)."""

    kind = "template"

    def __init__(self, sim_threshold: float = 0.4, depth: int = 4, max_children: int = 100,
                 max_templates: int = 1000, parameters: str = "word",
                 max_word_vocab: int = 5000, oov_buckets: int = 8):
        self.sim_threshold = sim_threshold
        self.depth = depth
        self.max_children = max_children
        self.max_templates = max_templates
        self.parameters = parameters
        self.max_word_vocab = max_word_vocab
        self.oov_buckets = oov_buckets
        self.templates: list[tuple[str | None, ...]] = []
        self.word_vocab: list[str] = []
        self.fitted = False
        self._rebuild()

    def _rebuild(self) -> None:
        self.matcher = TemplateMatcher(self.templates)
        self.template_oov_start = N_SPECIAL + len(self.templates)
        self.param_start = self.template_oov_start + self.oov_buckets
        self.param_index = {w: self.param_start + i for i, w in enumerate(self.word_vocab)}
        self.param_oov_start = self.param_start + len(self.word_vocab)
        self.vocab_size = self.param_oov_start + self.oov_buckets

    def fit(self, samples: Iterable[Fields]) -> None:
        if self.fitted:
            raise RuntimeError("templates are frozen once learned")
        # Distinct lines with their counts: masked logs repeat most lines, so this stays far
        # smaller than the window (a line that never repeats costs one entry, until fit ends).
        lines: Counter[tuple[str, ...]] = Counter()

        def counted() -> Iterable[tuple[str, ...]]:
            for fields in samples:
                words = line_words(fields)
                lines[words] += 1
                yield words

        self.templates = mine_templates(counted(), self.sim_threshold, self.depth,
                                        self.max_children, self.max_templates)
        counts: Counter[str] = Counter()
        if self.parameters == "word":
            for words, n in lines.items():
                for w in words:
                    counts[w] += n
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        self.word_vocab = [w for w, _ in ranked[: self.max_word_vocab]]
        self.fitted = True
        self._rebuild()

    @staticmethod
    def _parameter_words(matcher: TemplateMatcher, words: tuple[str, ...]) -> tuple[int | None, list[str]]:
        tid = matcher.match(words)
        if tid is None:
            return None, list(words)
        return tid, [w for t, w in zip(matcher.templates[tid], words) if t is None]

    def encode(self, fields: Fields) -> list[int]:
        if not self.fitted:
            raise RuntimeError("template tokenizer used before fit()")
        words = line_words(fields)
        tid, params = self._parameter_words(self.matcher, words)
        if tid is None:
            shape = f"{len(words)}:{words[0] if words else ''}"
            ids = [self.template_oov_start + stable_bucket(shape, self.oov_buckets)]
        else:
            ids = [N_SPECIAL + tid]
        if self.parameters == "word":
            for w in params:
                token = self.param_index.get(w)
                ids.append(token if token is not None
                           else self.param_oov_start + stable_bucket(w, self.oov_buckets))
        return ids

    def template_text(self, tid: int) -> str:
        return " ".join(WILDCARD if t is None else t for t in self.templates[tid])

    def decode(self, ids: Sequence[int]) -> list[str]:
        out = []
        for i in ids:
            if i < N_SPECIAL:
                out.append(SPECIAL_TOKENS[i])
            elif i < self.template_oov_start:
                out.append(f"<T{i - N_SPECIAL}: {self.template_text(i - N_SPECIAL)}>")
            elif i < self.param_start:
                out.append(f"<template:oov{i - self.template_oov_start}>")
            elif i < self.param_oov_start:
                out.append(self.word_vocab[i - self.param_start])
            elif i < self.vocab_size:
                out.append(f"<param:oov{i - self.param_oov_start}>")
            else:
                out.append("[?]")
        return out

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "sim_threshold": self.sim_threshold,
            "depth": self.depth,
            "max_children": self.max_children,
            "max_templates": self.max_templates,
            "parameters": self.parameters,
            "max_word_vocab": self.max_word_vocab,
            "oov_buckets": self.oov_buckets,
            "fitted": self.fitted,
            # Wildcards as null: JSON-able, and no string in a log can be mistaken for one.
            "templates": [list(t) for t in self.templates],
            "word_vocab": list(self.word_vocab),
        }

    @classmethod
    def from_state(cls, state: dict) -> TemplateTokenizer:
        tok = cls(state["sim_threshold"], state["depth"], state["max_children"], state["max_templates"],
                  state["parameters"], state["max_word_vocab"], state["oov_buckets"])
        tok.templates = [tuple(t) for t in state["templates"]]
        tok.word_vocab = list(state["word_vocab"])
        tok.fitted = bool(state["fitted"])
        tok._rebuild()
        return tok
