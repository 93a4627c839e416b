"""Text-log normalisation: mask the variable parts of the model's text (numbers, ids, addresses).

``Masker.mask`` replaces every match of an ordered list of named regexes by ``<name>``, so that
"took 3512 ms" and "took 17 ms" read the same to every tokenizer (char, word, BPE). It runs where
the model's text is made (``pipeline.parsing.LineParser`` and ``pipeline.topicrecords``), so the
tokenizer stage, the trainer and replay see the same text.

Log text is attacker-controlled, so a mask token must never be forgeable by literal text: in the
parts that are *not* masked, every ``<`` is written twice. A literal ``<num>`` in a log line thus
reaches the tokenizer as ``<<num>``, and a single ``<`` followed by a name is always a mask
(reading left to right, ``<<`` is a literal ``<``; mask names never start with ``<``).

Patterns apply in order. Each later pattern only sees the parts no earlier pattern masked, each
part on its own (as if it were the whole line: a masked part acts as the edge of the line for
lookarounds, ``^`` and ``$``). Empty matches are ignored. Pure; no torch, no Kafka.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# A mask token is "<name>": names are identifiers, so none starts with "<" or contains ">".
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

# Most specific first: a later pattern never sees what an earlier one masked. "Not next to a
# letter or digit" boundaries keep words such as "x86", "sha256" or "R02-M1" whole; a hex word
# needs a digit and a letter a-f (so "accede" and "facade" stay words) and 6+ characters.
DEFAULT_PATTERNS: tuple[tuple[str, str], ...] = (
    ("uuid", r"(?<![0-9A-Za-z])[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-"
             r"[0-9A-Fa-f]{12}(?![0-9A-Za-z])"),
    ("blk", r"(?<![0-9A-Za-z])blk_-?\d+"),
    # Eight groups, or fewer with "::" (an IPv4 tail allowed, ::ffff:10.0.0.1), with a digit;
    # "12:34:56", MAC addresses and C++'s "a::b" are none of these.
    ("ipv6", r"(?<![0-9A-Za-z:.])(?=[0-9A-Fa-f:.]*\d)(?=[0-9A-Fa-f:.]*::|(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f])"
             r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{0,4})"
             r"(?![0-9A-Za-z:.])"),
    ("ipv4", r"(?<![0-9A-Za-z.])(?:\d{1,3}\.){3}\d{1,3}(?![0-9A-Za-z.])"),
    # Unix paths with at least one name after the slash, and Windows drive paths.
    ("path", r"(?<![0-9A-Za-z_./\\])(?:/|[A-Za-z]:\\)(?:[\w.@+-]+[/\\])*[\w.@+-]+[/\\]?"),
    ("hex", r"(?<![0-9A-Za-z])(?:0[xX][0-9A-Fa-f]+|(?=[0-9A-Fa-f]*\d)(?=[0-9A-Fa-f]*[A-Fa-f])"
            r"[0-9A-Fa-f]{6,})(?![0-9A-Za-z])"),
    ("num", r"(?<![0-9A-Za-z])[-+]?\d+(?:\.\d+)?(?![0-9A-Za-z])"),
)

_CACHE_SIZE = 100_000  # masked field values kept (cleared whole when full): logs repeat values
# Only values this short are kept: a hostile source's megabyte fields would otherwise hold up to
# _CACHE_SIZE of them (100k x 1 MB); a long value is masked again each time, as it is new anyway.
_CACHED_MAX_CHARS = 128


def pattern_problem(name: object, regex: object) -> str | None:
    """What is wrong with one {name, regex} pattern (a phrase for a config error), or None."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        return f"name: expected a name of letters, digits and _ (starting with a letter), got {name!r}"
    if not isinstance(regex, str) or not regex:
        return f"regex: expected a regular expression, got {regex!r}"
    try:
        compiled = re.compile(regex)
    except re.error as exc:
        return (f"regex: not a valid regular expression: {exc.msg} at position {exc.pos} of "
                f"{regex!r}; fix it (Python re syntax)")
    if compiled.fullmatch(""):
        return f"regex: {regex!r} matches the empty string; make it match at least one character"
    return None


class Masker:
    """Replaces the matches of ordered (name, regex) patterns by ``<name>``, escaping ``<``."""

    def __init__(self, patterns: Sequence[tuple[str, str]] = DEFAULT_PATTERNS):
        for name, regex in patterns:
            problem = pattern_problem(name, regex)
            if problem:
                raise ValueError(f"mask pattern {name!r}: {problem}")
        self.patterns = [(name, re.compile(regex)) for name, regex in patterns]
        self._cache: dict[str, str] = {}

    def mask(self, text: str) -> str:
        masked = self._cache.get(text)
        if masked is None:
            masked = self._mask(text)
            if len(text) <= _CACHED_MAX_CHARS:
                if len(self._cache) >= _CACHE_SIZE:
                    self._cache.clear()
                self._cache[text] = masked
        return masked

    def _mask(self, text: str) -> str:
        # Parts of the line: (text, None) still literal, or (matched text, name) masked.
        parts: list[tuple[str, str | None]] = [(text, None)]
        for name, pattern in self.patterns:
            split: list[tuple[str, str | None]] = []
            for part, tag in parts:
                if tag is not None:
                    split.append((part, tag))
                    continue
                pos = 0
                for match in pattern.finditer(part):
                    if match.end() == match.start():
                        continue  # zero-width (a lookaround-only pattern): nothing to mask
                    if match.start() > pos:
                        split.append((part[pos:match.start()], None))
                    split.append((match.group(), name))
                    pos = match.end()
                if pos < len(part):
                    split.append((part[pos:], None))
            parts = split
        return "".join(f"<{tag}>" if tag else part.replace("<", "<<") for part, tag in parts)

    def mask_fields(self, fields: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
        """(name, value) pairs with every value masked (names are the config's, not log text)."""
        return tuple((name, self.mask(value)) for name, value in fields)
