"""tokenizer.mask: variable parts of the model's text become "<name>" tokens (nn/masking.py), the
same way in replay, the tokenizer stage and the trainer, and log text cannot forge them."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import stream_config
from test_stream import streamed_equal_to_replay

from nn.masking import DEFAULT_PATTERNS, Masker
from nn.tokenizers import encode_event
from pipeline.cli import cli
from pipeline.config import ConfigError, config_from_dict
from pipeline.modelspec import make_masker, make_tokenizer
from pipeline.parsing import Event, LineParser
from pipeline.topicrecords import event_to_record, record_to_event

TEXT_INPUT = {
    "format": "text",
    "text": {"pattern": r"^(?P<time>\d+) (?P<host>\S+) (?P<msg>.*)$"},
    "entities": {"src_host": "host"},
    "model_fields": ["msg"],
}
KINDS = {"char": [], "word": ["tokenizer.word.split=whitespace"], "bpe": ["tokenizer.bpe.min_frequency=1"]}
LINES = [
    "3600 h1 Receiving block blk_-1608999687919862906 src: /10.250.19.102:54106 dest: /10.250.19.102:50010",
    "3601 h2 took 3512 ms for job 123e4567-e89b-12d3-a456-426614174000 at 0x00004ed8",
    "3602 h3 chdir(/p/gb1/stella/RAPTOR/2183/equilibration) failed from fe80::1ff:fe23:4567:890a",
    "3603 h1 literal <num> and <<ipv4> and a<b in the text",
]


def config_for(kind: str, enabled: bool = True, *overrides: str):
    return config_from_dict({"input": TEXT_INPUT}, [f"tokenizer.kind={kind}",
                                                     f"tokenizer.mask.enabled={str(enabled).lower()}",
                                                     *KINDS[kind], *overrides])


def parse_all(config, lines=LINES) -> list[Event]:
    parser = LineParser(config.input, masker=make_masker(config))
    return [parser.parse(line, n) for n, line in enumerate(lines, start=1)]


def fitted_tokenizer(config, events):
    tokenizer = make_tokenizer(config)
    tokenizer.fit([e.text_fields for e in events])
    return tokenizer


def tokens_of(config, tokenizer, event) -> list[int]:
    return encode_event(tokenizer, event.text_fields, config.tokenizer.max_tokens)


def mask_structure(text: str) -> list[tuple[str, str]]:
    """Read masked text back, left to right: ("lit", char) or ("mask", name). ``<<`` is a literal
    ``<``; ``<name>`` a mask. Raises on anything else (a lone ``<`` the masker never writes)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("<<", i):
            out.append(("lit", "<"))
            i += 2
        elif text[i] == "<":
            match = re.compile(r"<([A-Za-z][A-Za-z0-9_]*)>").match(text, i)
            assert match, f"a lone '<' at {i} of {text!r}"
            out.append(("mask", match.group(1)))
            i = match.end()
        else:
            out.append(("lit", text[i]))
            i += 1
    return out


# ---------------------------------------------------------------------------- the default patterns

@pytest.mark.parametrize("name, examples", [
    ("uuid", ["123e4567-e89b-12d3-a456-426614174000", "A0B1C2D3-0000-4000-8000-ABCDEFABCDEF"]),
    ("blk", ["blk_-1608999687919862906", "blk_38865049064139660"]),
    ("ipv6", ["2001:db8::1", "fe80::1ff:fe23:4567:890a", "::1", "::ffff:192.0.2.1",
              "2001:0db8:85a3:0000:0000:8a2e:0370:7334"]),
    ("ipv4", ["10.250.19.102", "192.168.0.1"]),
    ("path", ["/p/gb1/stella/RAPTOR/2183/equilibration", "/var/log/messages", "/tmp",
              "C:\\Windows\\System32\\drivers\\x.sys"]),
    ("hex", ["0x00004ed8", "0XDEADBEEF", "3dfa9c0", "deadbeef01"]),
    ("num", ["3512", "-17", "+5", "3.25", "0"]),
])
def test_each_default_pattern_masks_what_it_should(name, examples):
    masker = Masker()
    for example in examples:
        for text, expected in [(example, f"<{name}>"), (f"at {example} now", f"at <{name}> now"),
                               (f"({example}),", f"(<{name}>),")]:
            assert masker.mask(text) == expected, (name, text)


@pytest.mark.parametrize("text", [
    "instruction cache parity error corrected", "accede to a facade decade", "deadbeef cafe",
    "x86 sha256 utf8 ipv4 md5", "R02-M1-N0-C:J12-U11", "std::vector and a::b",
    "and/or KB/s http://example.com/a/b", "double-hummer alignment exceptions",
])
def test_ordinary_words_are_left_alone(text):
    masked = Masker().mask(text)
    assert masked == text, masked


def test_composite_values_mask_part_by_part():
    masker = Masker()
    assert masker.mask("src: /10.250.19.102:50010") == "src: /<ipv4>:<num>"
    assert masker.mask("at 12:34:56 from 00:1a:2b") == "at <num>:<num>:<num> from <num>:1a:2b"
    assert masker.mask("blk_-42.meta") == "<blk>.meta"


def test_patterns_apply_in_order_and_later_ones_never_see_masked_parts():
    masker = Masker([("word", r"b\w+"), ("num", r"\d+")])
    assert masker.mask("blk_123 7") == "<word> <num>"
    assert Masker([("num", r"\d+"), ("word", r"b\w+")]).mask("blk_123 7") == "<word><num> <num>"
    assert Masker([("num", r"\d+"), ("edge", r"^x")]).mask("1x") == "<num><edge>"  # a part is a line


# ---------------------------------------------------------------------------- forgery

@pytest.mark.parametrize("literal", ["<num>", "<<num>", "<num", "num>", "<<", "<", "<>", "<ipv4>x"])
def test_literal_mask_text_cannot_forge_a_mask_token(literal):
    masker = Masker()
    assert [kind for kind, _ in mask_structure(masker.mask(literal))] == ["lit"] * len(literal)
    assert "".join(c for _, c in mask_structure(masker.mask(literal))) == literal


def test_random_hostile_text_reads_back_as_its_literals_and_masks():
    """Any text over '<', '>', letters, digits and spaces reads back unambiguously: literal
    characters in order, a mask exactly where a number was, never a mask from literal text."""
    rng = random.Random(5)
    masker = Masker([("num", DEFAULT_PATTERNS[-1][1])])
    num = re.compile(DEFAULT_PATTERNS[-1][1])
    for _ in range(3000):
        text = "".join(rng.choice("<<>>num 7x") for _ in range(rng.randint(0, 16)))
        read = mask_structure(masker.mask(text))
        literal = "".join(c if kind == "lit" else "\0" for kind, c in read)
        assert literal == num.sub("\0", text), text
        assert all(name == "num" for kind, name in read if kind == "mask")


@pytest.mark.parametrize("kind", KINDS)
def test_a_literal_mask_token_tokenizes_differently_from_a_masked_value(kind):
    config = config_for(kind)
    events = parse_all(config, ["3600 h1 took <num> ms", "3601 h1 took 5 ms", "3602 h1 took 77 ms"])
    tokenizer = fitted_tokenizer(config, events)
    literal, five, seventy_seven = (tokens_of(config, tokenizer, e) for e in events)
    assert five == seventy_seven  # masking: both numbers read the same
    assert literal != five  # the literal "<num>" is no number


# ---------------------------------------------------------------------------- tokens

@pytest.mark.parametrize("kind", KINDS)
def test_the_same_line_always_gives_the_same_tokens(kind):
    config = config_for(kind)
    events = parse_all(config)
    tokenizer = fitted_tokenizer(config, events)
    again = parse_all(config)  # a fresh parser and masker: nothing depends on a cache
    # The trainer's path: the record the tokenizer stage publishes, read back and masked.
    streamed = [record_to_event(event_to_record(dataclasses.replace(e, source=("t", 0, i))),
                                ["msg"], make_masker(config)) for i, e in enumerate(events)]
    for a, b, c in zip(events, again, streamed):
        assert a.text_fields == b.text_fields == c.text_fields
        ids = [tokens_of(config, tokenizer, e) for e in (a, b, c)]
        assert ids[0] == ids[1] == ids[2]
    assert parse_all(config_for(kind, False))[0].text_fields != events[0].text_fields  # masking is on


@pytest.mark.parametrize("kind", KINDS)
def test_masked_parts_are_not_in_the_tokens(kind):
    config = config_for(kind)
    events = parse_all(config)
    tokenizer = fitted_tokenizer(config, events)
    glue = " " if kind == "word" else ""  # word tokens are words; char / BPE ones are pieces
    text = " ".join(glue.join(tokenizer.decode(tokens_of(config, tokenizer, e)[1:-1])) for e in events)
    for secret in ["1608999687919862906", "10.250.19.102", "54106", "3512", "e89b", "4ed8",
                   "stella", "RAPTOR", "fe80", "890a"]:
        assert secret not in text, (kind, secret, text)
    for token in ["<blk>", "<ipv4>", "<num>", "<uuid>", "<hex>", "<path>", "<ipv6>"]:
        assert token in text, (kind, token, text)
    assert "<<num>" in text and "a<<b" in text  # the literal ones, escaped


def test_long_values_are_masked_every_time_and_never_held():
    """A hostile source's long fields must not fill the cache (100k of them would be gigabytes);
    short ones, which logs repeat, are kept. Either way the same masked text comes back."""
    masker = Masker()
    long_values = [f"user{i} from 10.0.0.{i % 250} " + "x" * 5000 for i in range(50)]
    short = "port 8080 on 10.1.2.3"
    for value in [*long_values, short, *long_values, short]:
        assert masker.mask(value) == Masker()._mask(value)
    assert sum(map(len, masker._cache)) <= len(short)  # only the short value held


def test_masking_off_leaves_the_text_as_it_was():
    config = config_for("char", False)
    assert make_masker(config) is None
    assert [e.text_fields[0][1] for e in parse_all(config)] == [line.split(" ", 2)[2] for line in LINES]


# ---------------------------------------------------------------------------- config errors

@pytest.mark.parametrize("patterns, message", [
    ([{"name": "num", "regex": "(\\d+"}], "tokenizer.mask.patterns[0].regex: not a valid regular "
                                          "expression: missing ), unterminated subpattern at position 0"),
    ([{"name": "num", "regex": "\\d+"}, {"name": "x", "regex": "[a-"}],
     "tokenizer.mask.patterns[1].regex: not a valid regular expression"),
    ([{"name": "num", "regex": "\\d*"}],
     "tokenizer.mask.patterns[0].regex: '\\\\d*' matches the empty string"),
    ([{"name": "n<um>", "regex": "\\d+"}], "tokenizer.mask.patterns[0].name: expected a name of letters"),
    ([{"name": "num", "regex": "\\d+"}, {"name": "num", "regex": "x"}],
     "tokenizer.mask.patterns[1].name: 'num' is already the name of patterns[0]"),
    ([{"name": "num"}], "tokenizer.mask.patterns[0].regex: expected a regular expression"),
    ([{"name": "num", "regex": "x", "colour": "red"}], "tokenizer.mask.patterns[0].colour: unknown key"),
    (["\\d+"], "tokenizer.mask.patterns[0]: expected a mapping of settings"),
])
def test_bad_mask_patterns_name_the_key(patterns, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"tokenizer": {"mask": {"enabled": True, "patterns": patterns}}})
    assert message in str(info.value)


def test_a_bad_regex_is_one_error_line_from_the_cli(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("\n".join(LINES) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"input": TEXT_INPUT, "tokenizer": {"mask": {
        "enabled": True, "patterns": [{"name": "num", "regex": "([0-9]+"}]}}}))
    result = CliRunner().invoke(cli, ["replay", "--config", str(config), "--input", str(log),
                                      "--output", str(tmp_path / "s.csv.gz")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    assert "tokenizer.mask.patterns[0].regex: not a valid regular expression" in errors[0]
    assert not (tmp_path / "s.csv.gz").exists()


# ---------------------------------------------------------------------------- streaming == replay

def text_log(path: Path, lines: int = 240, seed: int = 3) -> None:
    """Three hours of free-text lines full of numbers, addresses and ids, a literal "<num>" too."""
    rng = random.Random(seed)
    templates = [
        "Receiving block blk_{b} src: /10.{a}.{c}.{d}:{p} dest: /10.{a}.{d}.{c}:50010",
        "took {p} ms for job {u} at 0x{h:08x}",
        "chdir(/p/gb{a}/user{c}/run) failed code {d}",
        "literal <num> says {p}",
    ]
    with open(path, "w") as out:
        for i in range(lines):
            out.write(f"{i * 45} h{rng.randint(1, 4)} " + rng.choice(templates).format(
                b=rng.randint(-10**18, 10**18), a=rng.randint(0, 255), c=rng.randint(0, 255),
                d=rng.randint(0, 255), p=rng.randint(1, 65535), h=rng.getrandbits(32),
                u=f"{rng.getrandbits(32):08x}-0000-4000-8000-{rng.getrandbits(48):012x}") + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["char", "word"])
def test_stream_archive_equals_replay_with_masking(kafka_bootstrap, tmp_path, kind):
    """char tokens are made in the tokenizer stage, word tokens in the trainer: both mask as
    replay does, and the tokens the model read hold mask tokens, not the numbers."""
    log = tmp_path / "app.log"
    text_log(log)
    config, config_path = stream_config(
        tmp_path, kafka_bootstrap,
        {"input": TEXT_INPUT, "window": {"size_seconds": 3600}, "scores": {"explain": True},
         "training": {"epochs": 1}, "topics": {"partitions": 2}},
        (f"tokenizer.kind={kind}", "tokenizer.mask.enabled=true", *KINDS[kind]))
    streamed = streamed_equal_to_replay(config, config_path, log, tmp_path, 240)
    tokens = " ".join("".join(json.loads(r["tokens"])) for r in streamed if r["tokens"])
    assert "<num>" in tokens and "<ipv4>" in tokens and "<<num>" in tokens
    assert not re.search(r"\d{3}", tokens), tokens[:300]


# ---------------------------------------------------------------------------- checkpoints

def test_a_checkpoint_from_before_masking_resumes_only_with_masking_off(tmp_path):
    import torch

    from nn.training import CheckpointError, load_checkpoint
    from pipeline.learner import WindowLearner

    off = config_for("char", False, "model.rnn.hidden_size=8", "training.epochs=1")
    learner = WindowLearner(off)
    learner.train(0, parse_all(off))
    path = tmp_path / "old.pt"
    learner.save(path)
    data = load_checkpoint(path)
    del data["config"]["tokenizer"]["mask"]  # as a checkpoint written before tokenizer.mask
    torch.save(data, path)
    assert WindowLearner.load(path, off).last_window == 0
    with pytest.raises(CheckpointError, match="another tokenizer configuration"):
        WindowLearner.load(path, config_for("char", True, "model.rnn.hidden_size=8", "training.epochs=1"))
    learner = WindowLearner(config_for("char", True, "model.rnn.hidden_size=8", "training.epochs=1"))
    learner.train(0, parse_all(learner.config))
    learner.save(path)  # a masked model is refused without masking, and the other way round
    with pytest.raises(CheckpointError, match="another tokenizer configuration"):
        WindowLearner.load(path, off)
