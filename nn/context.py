"""Entity context inside a token sequence: the entity's earlier events read before the event.

A sequence with context is ``[BOS] ctx_1 [EOS] ctx_2 [EOS] ... ctx_j [EOS] event [EOS]`` (oldest
first; EOS separates, so no id moves and a config without context keeps its vocabulary). The
context positions are stored as ``~id`` (negative), so that batching (nn/scoring.py pad_batch)
carries them unchanged and the models' ``inputs_and_targets`` can tell them apart: they are read
as their ids but are never targets. Without context nothing is negative and every tensor is
what it was before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from nn.tokenizers import BOS, EOS, PAD


def with_context(event: Sequence[int], history: Iterable[Sequence[int]]) -> list[int]:
    """``event`` (BOS..EOS ids) preceded by the ``history`` events (their own ids, no BOS/EOS,
    oldest first), each followed by a separator, all marked as context."""
    prefix = [BOS]
    for ids in history:
        prefix += [~i for i in ids]
        prefix.append(~EOS)
    if len(prefix) == 1:
        return list(event)
    return prefix + list(event[1:])


def event_ids(seq: Sequence[int]) -> list[int]:
    """The event's own BOS..EOS ids of a sequence that may carry context."""
    return [i for i in seq if i >= 0]


def split_context(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids with the context marks undone, where context is): (B, T) each."""
    context = seq < 0
    return torch.where(context, ~seq, seq), context


def next_token_targets(seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of a left-to-right LM: every next token that is the event's own,
    -1 for padding and context (read, never predicted)."""
    seq, context = split_context(seq)
    targets = seq[:, 1:].masked_fill((seq[:, 1:] == PAD) | context[:, 1:], -1)
    return seq[:, :-1], targets
