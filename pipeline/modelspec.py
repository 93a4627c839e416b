"""What the config says the tokenizer and the model are: Config -> nn's constructor arguments.

No torch here, so the tokenizer stage and ``pipeline check`` can build a tokenizer without it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from nn.masking import Masker
from nn.tokenizers import AnyTokenizer, Fields, build_tokenizer, encode_event
from pipeline.config import Config


def make_masker(config: Config) -> Masker | None:
    """The masker of ``tokenizer.mask``, or None when masking is off. Every place that makes the
    model's text (LineParser, record_to_event) takes it, so all stages and replay mask alike."""
    mask = config.tokenizer.mask
    return Masker([(p.name, p.regex) for p in mask.patterns]) if mask.enabled else None


def make_tokenizer(config: Config) -> AnyTokenizer:
    tc = config.tokenizer
    if tc.kind == "word":
        return build_tokenizer("word", **vars(tc.word))
    if tc.kind == "bpe":
        return build_tokenizer("bpe", **vars(tc.bpe))
    if tc.kind == "template":
        return build_tokenizer("template", **vars(tc.template))
    return build_tokenizer("char")


def fixed_encoder(config: Config) -> Callable[[Fields], Sequence[int]] | None:
    """An event's BOS..EOS ids from its text fields, for a tokenizer that needs no window to
    learn from (char): the tokenizer stage sends them with each event. None for the others,
    whose vocabulary the trainer learns: it encodes those events itself."""
    if config.tokenizer.kind != "char":
        return None
    return partial(encode_event, make_tokenizer(config), max_tokens=config.tokenizer.max_tokens)


def model_args_for(config: Config, vocab_size: int) -> dict:
    """The ``model_args`` dict nn.training.build_model takes (and checkpoints store)."""
    mc = config.model
    # Encoded events are BOS + at most max_tokens tokens + EOS. The GPT reads all but the last
    # (EOS is only a target), so max_tokens + 1 positions would do; block_size is the whole
    # sequence's length, one spare position, because changing it would change the seeded
    # initialisation of every GPT, and so every score of an existing configuration.
    block_size = config.tokenizer.max_tokens + 2
    if mc.context.entity:  # BOS, k context events and the event, each at most max_tokens + 1
        block_size = (mc.context.events + 1) * (config.tokenizer.max_tokens + 1) + 2
    if mc.kind == "gpt":
        g = mc.gpt
        return {
            "kind": "gpt", "vocab_size": vocab_size, "block_size": block_size,
            "n_layer": g.n_layer, "n_head": g.n_head, "n_embd": g.n_embd, "dropout": g.dropout,
        }
    r = mc.rnn
    return {
        "kind": "rnn", "vocab_size": vocab_size, "cell": r.cell, "hidden_size": r.hidden_size,
        "n_layer": r.n_layer, "bidirectional": r.bidirectional, "dropout": r.dropout,
        "attention": r.attention, "block_size": block_size,
    }
