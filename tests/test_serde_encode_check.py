"""The encoder's compiled check (pipeline/serde.py ``encode_check``) against fastavro's validate.

Broker-free. A differential fuzz: for every schema in schemas/, its representative records and
many mutations of them (every value of every field, item and map value replaced by a wrong type,
a bool, a float, an int at and beyond the 32/64-bit edges, None, tuple notation...; fields removed
and added; several mutations at once) must get the same verdict from the compiled check as from
``fastavro.validation.validate(record, schema, raise_errors=False)``, the reference the encoder
used before. Then AvroCodec.encode: valid records no longer go through validate, misfits still
raise EncodeError with validate's detailed message.
"""

from __future__ import annotations

import array
import collections
import copy
import decimal
import fractions
import random
import uuid
from collections.abc import Mapping

import numpy as np
import pytest
from fastavro.validation import ValidationError, validate
from test_serde import RECORDS

import pipeline.serde as serde
from pipeline.serde import EncodeError, codec, encode_check

SCHEMA_NAMES = sorted(codec().schemas)
BASES = {name: [record for n, _, record in RECORDS if n == name] for name in SCHEMA_NAMES}


class Frozen(Mapping):
    """A Mapping that is not a dict (validate takes any Mapping for a record or map)."""

    def __init__(self, data):
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)


class Text(str):
    pass


class Count(int):
    pass


EDGES = [-(2**63) - 1, -(2**63), -(2**31) - 1, -(2**31), -1, 0, 1, 2**31 - 1, 2**31, 2**40,
         2**63 - 1, 2**63, 2**64]
# Values put in place of any value of a record: wrong types, look-alikes and range edges.
POOL = [
    None, True, False, *EDGES, 2.5, 2.0, -0.0, float("nan"), float("inf"), 10**400,
    "", "x", "7", Text("t"), b"", b"x", bytearray(b"x"), memoryview(b"x"),
    [], [1], [2**31], [-(2**31) - 1], [2**63], [1.5], [True], [None], ["a"], [b"a"], [[1]], [{}],
    (1, 2), (), array.array("i", [1, 2]), array.array("d", [1.5]), range(3), "abc",
    {}, {"a": "b"}, {"a": 1}, {"a": None}, {1: "a"}, {"a": [1]}, Frozen({"a": "b"}),
    collections.OrderedDict(a="b"),
    ("long", 5), ("long", 2**63), ("int", 5), ("null", None), ("double", 1), ("double", "x"),
    ("string", "s"), ("bytes", b"b"), ("float", 1.5), ("nope", 1), ("long",), (1, 2, 3),
    np.int64(5), np.int32(-3), np.int64(2**40), np.float32(1.5), np.float64(2.5), np.bool_(True),
    fractions.Fraction(1, 2), decimal.Decimal("1.5"), uuid.UUID(int=5), Count(3), Count(2**40),
    object(),
]


def outcome(check, record):
    """'fits', 'misfit', or the exception type (validate raises e.g. ValueError for a 3-tuple
    in a union: the encoder turns that into EncodeError either way)."""
    try:
        return "fits" if check(record) else "misfit"
    except ValidationError:
        return "misfit"
    except Exception as exc:
        return type(exc).__name__


def reference(name):
    schema = codec().schemas[name]
    return lambda record: validate(record, schema, raise_errors=False)


def paths(value, path=()):
    """Every position in a record: dict keys and list items, at any depth."""
    out = []
    if isinstance(value, dict):
        for key, item in value.items():
            out.append((*path, key))
            out += paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out.append((*path, i))
            out += paths(item, (*path, i))
    return out


def dict_paths(value, path=()):
    """Every dict in a record (the record itself included)."""
    out = [path] if isinstance(value, dict) else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += dict_paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += dict_paths(item, (*path, i))
    return out


def node(record, path):
    for key in path:
        record = record[key]
    return record


def replaced(record, path, value):
    record = copy.deepcopy(record)
    node(record, path[:-1])[path[-1]] = value
    return record


def mutations(record):
    """Single mutations: each position set to each pool value; each dict without each of its
    keys, with an extra key, and with fastavro's "-type" hint, right and wrong."""
    for path in paths(record):
        for value in POOL:
            yield replaced(record, path, value)
    for path in dict_paths(record):
        target = node(record, path)
        for key in target:
            smaller = copy.deepcopy(record)
            del node(smaller, path)[key]
            yield smaller
        for key, value in [("extra", 1), ("-type", "salka.Nothing"), ("-type", None)]:
            bigger = copy.deepcopy(record)
            node(bigger, path)[key] = value
            yield bigger


def random_mutations(record, rng, count):
    """Two to four mutations at once (also inside values the pool put there)."""
    for _ in range(count):
        mutated = copy.deepcopy(record)
        for _ in range(rng.randint(2, 4)):
            where = paths(mutated)
            if not where:
                break
            path = rng.choice(where)
            if rng.random() < 0.15 and isinstance(node(mutated, path[:-1]), dict):
                del node(mutated, path[:-1])[path[-1]]
            else:
                value = rng.choice(POOL)  # copied where later mutations could reach into it
                fresh = copy.deepcopy(value) if isinstance(value, (list, dict)) else value
                node(mutated, path[:-1])[path[-1]] = fresh
        yield mutated


def whole_record_swaps(name):
    """Each schema's records as another schema's (right shape, wrong fields) and odd tops."""
    return [record for other in SCHEMA_NAMES if other != name for record in BASES[other]] + [
        None, [], "x", 1, (), Frozen(BASES[name][0]), ("salka.Nothing", BASES[name][0]),
    ]


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_compiled_check_gives_validates_verdict(name):
    check, ref = codec().encode_checks[name], reference(name)
    assert check is not None, f"{name}: encode_check did not compile it"
    rng = random.Random(name)
    seen = collections.Counter()
    disagree = []
    candidates = list(BASES[name]) + whole_record_swaps(name)
    for base in BASES[name]:
        candidates += list(mutations(base))
        candidates += list(random_mutations(base, rng, 400))
    for record in candidates:
        expected, got = outcome(ref, record), outcome(check, record)
        seen[expected] += 1
        if got != expected:
            disagree.append((expected, got, record))
    assert not disagree, f"{len(disagree)} of {len(candidates)} differ, e.g. {disagree[:3]}"
    # The fuzz must bite: plenty of both verdicts (and the bases themselves fit).
    assert all(outcome(ref, base) == "fits" for base in BASES[name])
    assert seen["fits"] >= 20 and seen["misfit"] >= 200, seen


def test_fuzz_reaches_validates_corner_cases():
    """Control: the pool holds values where validate's verdict is not the obvious one, and the
    compiled check follows it there too."""
    name = "salka.ScoredEvent"
    base = BASES[name][0]
    check, ref = codec().encode_checks[name], reference(name)
    cases = {
        ("window",): [(2**63 - 1, "fits"), (2**63, "misfit"), (np.int64(5), "fits"), (True, "misfit"),
                      (2.0, "misfit"), (Count(3), "fits")],
        ("source", "partition"): [(2**31 - 1, "fits"), (2**31, "misfit"), (-(2**31), "fits"),
                                  (-(2**31) - 1, "misfit"), (False, "misfit")],
        ("loss",): [(1, "fits"), (10**400, "fits"), (fractions.Fraction(1, 2), "fits"),
                    (decimal.Decimal("1.5"), "misfit"), (("double", 1), "fits"), (("long", 5), "misfit"),
                    (("null", None), "fits"), ((1, 2, 3), "ValueError"), (True, "misfit")],
        ("line",): [(("long", 5), "fits"), (("int", 5), "misfit"), (2.5, "misfit")],
        # bytes is a Sequence (of ints): it fits an array of floats
        ("token_losses",): [([1, 2.5], "fits"), ([True], "misfit"), (b"ab", "fits"),
                            (array.array("d", [1.5]), "fits"), (("nope", 1), "misfit")],
        ("entities",): [(Frozen({"a": "b"}), "fits"), ({1: "a"}, "misfit"), ({"a": Text("t")}, "fits")],
        ("raw",): [(Text("t"), "fits"), (uuid.UUID(int=5), "misfit"), (b"x", "misfit")],
    }
    for path, values in cases.items():
        for value, verdict in values:
            record = replaced(base, path, value)
            assert outcome(ref, record) == verdict, (path, value)
            assert outcome(check, record) == verdict, (path, value)
    token_ids = "salka.TokenizedEvent"
    tok = BASES[token_ids][0]
    for value, verdict in [(b"\x01\x02", "fits"), (range(3), "fits"), ([1, 2**31], "misfit"),
                           ([True], "misfit"), ([np.int32(1)], "fits"), ([1.0], "misfit")]:
        record = replaced(tok, ("token_ids",), value)
        assert outcome(reference(token_ids), record) == verdict, value
        assert outcome(codec().encode_checks[token_ids], record) == verdict, value


OTHER_CONSTRUCTS = {
    "type": "record", "name": "t.Many", "fields": [
        {"name": "colour", "type": {"type": "enum", "name": "t.Colour", "symbols": ["RED", "GREEN"]}},
        {"name": "digest", "type": {"type": "fixed", "name": "t.Digest", "size": 2}},
        {"name": "either", "type": ["null", "int", "string", "t.Colour",
                                    {"type": "record", "name": "t.Pair",
                                     "fields": [{"name": "a", "type": "float"}]}]},
        {"name": "mixed", "type": {"type": "array", "items": ["long", "boolean", "bytes"]}},
        {"name": "nested", "type": {"type": "map", "values": {"type": "array", "items": "t.Pair"}}},
        {"name": "flag", "type": "boolean", "default": True},
        {"name": "nothing", "type": "null"},
    ],
}


def test_constructs_our_schemas_do_not_use_agree_too():
    """Enum, fixed, a wide union (tuple notation naming a record), arrays of unions, maps of
    arrays of records, a default: the compiled check follows validate beyond schemas/ too."""
    from fastavro import parse_schema

    named: dict = {}
    schema = parse_schema(OTHER_CONSTRUCTS, named_schemas=named)
    check = encode_check(schema, named)
    assert check is not None
    base = {"colour": "RED", "digest": b"ab", "either": {"a": 1.5}, "mixed": [1, True, b"x"],
            "nested": {"k": [{"a": 2}]}, "flag": False, "nothing": None}
    extra = ["RED", "GREEN", "BLUE", b"abc", bytearray(b"ab"), ("t.Pair", {"a": 1}),
             ("t.Colour", "RED"), ("t.Colour", "BLUE"), ("int", 2**31), [1, False, b""],
             {"k": []}, {"k": [{"a": "x"}]}, {"a": True}, {"a": 1, "-type": "t.Pair"}]
    rng = random.Random(5)
    candidates = [base, *mutations(base), *random_mutations(base, rng, 1500)]
    candidates += [replaced(base, (key,), value) for key in base for value in extra]
    verdicts = collections.Counter()
    for record in candidates:
        expected = outcome(lambda r: validate(r, schema, raise_errors=False), record)
        verdicts[expected] += 1
        assert outcome(check, record) == expected, record
    assert verdicts["fits"] >= 50 and verdicts["misfit"] >= 500, verdicts


def test_a_logical_type_is_left_to_validate():
    schema = {"type": "record", "name": "T", "fields": [
        {"name": "when", "type": {"type": "long", "logicalType": "timestamp-millis"}}]}
    assert encode_check(schema, {}) is None
    plain = {"type": "record", "name": "T", "fields": [{"name": "n", "type": {"type": "long"}}]}
    check = encode_check(plain, {})
    assert check({"n": 5}) and not check({"n": 2.5}) and not check({"n": 2**63})


def test_recursive_schema_compiles():
    schema = {"type": "record", "name": "x.Node", "fields": [
        {"name": "value", "type": "int"}, {"name": "next", "type": ["null", "x.Node"]}]}
    check = encode_check(schema, {"x.Node": schema})
    for record, verdict in [
        ({"value": 1, "next": {"value": 2, "next": None}}, True),
        ({"value": 1, "next": {"value": 2, "next": {"value": 2**31, "next": None}}}, False),
        ({"value": 1, "next": {"value": 2}}, True),  # a missing field reads as None: fits the union
        ({"value": 1, "next": ("x.Node", {"value": 3, "next": None})}, True),
        ({"value": 1, "next": {"value": 2.5, "next": None}}, False),
    ]:
        assert check(record) is verdict
        assert validate(record, schema, raise_errors=False) is verdict


@pytest.mark.parametrize("name, variant, record", RECORDS, ids=[f"{n}-{v}" for n, v, _ in RECORDS])
def test_valid_records_encode_without_validate(name, variant, record, monkeypatch):
    """The point of the compiled check: fastavro's validate is not run for a record that fits."""
    expected = codec().encode(name, record)

    def no_validate(*args, **kwargs):
        raise AssertionError("fastavro validate ran for a valid record")

    monkeypatch.setattr(serde, "validate", no_validate)
    assert codec().encode(name, record) == expected


SRC = BASES["salka.SourceRef"][0]
TOK = BASES["salka.TokenizedEvent"][0]
SCORED = BASES["salka.ScoredEvent"][0]
DEAD = BASES["salka.DeadLetter"][0]
CLASSIC = [
    ("float-for-int", "salka.SourceRef", {**SRC, "partition": 2.5}),
    ("whole-float-for-int", "salka.SourceRef", {**SRC, "partition": 2.0}),
    ("float-for-long", "salka.SourceRef", {**SRC, "offset": 1.5}),
    ("bool-for-int", "salka.SourceRef", {**SRC, "partition": True}),
    ("bool-for-long", "salka.SourceRef", {**SRC, "offset": False}),
    ("int-past-32-bits", "salka.SourceRef", {**SRC, "partition": 2**31}),
    ("int-below-32-bits", "salka.SourceRef", {**SRC, "partition": -(2**31) - 1}),
    ("long-past-64-bits", "salka.SourceRef", {**SRC, "offset": 2**63}),
    ("long-below-64-bits", "salka.SourceRef", {**SRC, "offset": -(2**63) - 1}),
    ("token-id-past-32-bits", "salka.TokenizedEvent", {**TOK, "token_ids": [1, 2**40, 2]}),
    ("bool-token-id", "salka.TokenizedEvent", {**TOK, "token_ids": [1, True, 2]}),
    ("none-not-nullable", "salka.ScoredEvent", {**SCORED, "raw": None}),
    ("missing-field", "salka.ScoredEvent", {k: v for k, v in SCORED.items() if k != "window"}),
    ("str-for-bytes", "salka.DeadLetter", {**DEAD, "payload": "x"}),
    ("bytes-for-string", "salka.DeadLetter", {**DEAD, "reason": b"x"}),
    ("str-for-double", "salka.ScoredEvent", {**SCORED, "loss": "1.5"}),
    ("bool-for-double", "salka.ScoredEvent", {**SCORED, "loss": True}),
    ("int-for-boolean", "salka.ScoredEvent", {**SCORED, "late": 1}),
    ("non-str-map-key", "salka.ScoredEvent", {**SCORED, "entities": {1: "a"}}),
]


@pytest.mark.parametrize("case, name, record", CLASSIC, ids=[c for c, _, _ in CLASSIC])
def test_misfit_raises_encode_error_with_validates_message(case, name, record):
    with pytest.raises(ValidationError) as reference_error:
        validate(record, codec().schemas[name], raise_errors=True)
    with pytest.raises(EncodeError) as info:
        codec().encode(name, record)
    assert str(info.value) == f"record does not fit {name}: {reference_error.value}"
