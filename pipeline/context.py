"""Entity context (``model.context``): each event is read after its entity's recent history.

The history table maps an entity value (a user name, say) to the token ids of its last k events
among the windows already trained on, oldest first. It is learner state, like the weights:
updated after training on a window with all of that window's events in event order, saved in
the checkpoint and in every published model, so a scorer replica holds the table of the model it
scores with. The context of an event of window w is therefore its entity's last k events of
windows < w: causal (never a later event, nor another entity's events except through the
weights) and the same in replay and streaming, whatever order the events arrived in.

Memory: a dict entry, the key string and k tuples of ids per entity value (measured ~0.6 KB
for k=4 and 8-token events; README).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from pipeline.config import Config
from pipeline.parsing import Event

Ids = tuple[int, ...]


class EntityHistory:
    """Entity value -> its last ``events`` events' own token ids (no BOS/EOS), oldest first."""

    def __init__(self, entity: str, field: str, events: int):
        self.entity = entity  # the name in input.entities
        self.field = field  # the event field holding its value
        self.events = events
        self.table: dict[str, tuple[Ids, ...]] = {}

    @classmethod
    def for_config(cls, config: Config) -> EntityHistory | None:
        """The empty table ``model.context`` asks for; None when context is off."""
        mc = config.model.context
        if not mc.entity:
            return None
        return cls(mc.entity, config.input.entities[mc.entity], mc.events)

    def value(self, event: Event) -> str:
        return event.fields.get(self.field, "")

    def context(self, event: Event) -> tuple[Ids, ...]:
        """The event's context: its entity's remembered events; none without an entity value
        (events without one share no history)."""
        value = self.value(event)
        return self.table.get(value, ()) if value else ()

    def remember(self, events: Iterable[tuple[Event, Sequence[int]]]) -> None:
        """Append each (event, its BOS..EOS ids), in the order given, to its entity's history."""
        k, table = self.events, self.table
        for event, ids in events:
            value = self.value(event)
            if value:
                table[value] = (*table.get(value, ()), tuple(ids[1:-1]))[-k:]

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Plain strings and int tensors (no pickled objects; a ``weights_only`` load reads it,
        and a few million ids load as one tensor, not as millions of Python ints)."""
        keys = list(self.table)
        counts = [len(self.table[key]) for key in keys]
        lengths = [len(ids) for key in keys for ids in self.table[key]]
        flat = [i for key in keys for ids in self.table[key] for i in ids]
        return {"entity": self.entity, "events": self.events, "keys": keys,
                "counts": torch.tensor(counts, dtype=torch.int32),
                "lengths": torch.tensor(lengths, dtype=torch.int32),
                "ids": torch.tensor(flat, dtype=torch.int64)}

    @classmethod
    def from_state(cls, state: dict | None, config: Config) -> EntityHistory | None:
        """The table saved with a model; ValueError when it does not belong to ``config``."""
        history = cls.for_config(config)
        if history is None:
            return None
        if not isinstance(state, dict) or (state["entity"], state["events"]) != (
                history.entity, history.events):
            raise ValueError(f"no history table of model.context {history.entity!r} / {history.events}")
        counts, lengths, flat = state["counts"].tolist(), state["lengths"].tolist(), state["ids"].tolist()
        if len(counts) != len(state["keys"]) or sum(counts) != len(lengths) or sum(lengths) != len(flat):
            raise ValueError("history table sizes do not add up")
        at = event = 0
        for key, count in zip(state["keys"], counts):
            entries = []
            for length in lengths[event:event + count]:
                entries.append(tuple(flat[at:at + length]))
                at += length
            event += count
            history.table[key] = tuple(entries)
        return history

