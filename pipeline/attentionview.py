"""Attention explanations for the report (model.rnn.attention, Brown et al. 2018).

The report recomputes them for its top events from a model checkpoint (``pipeline report --model``)
rather than carrying a T x T weight matrix per event through scores, Kafka records and files: only
a few dozen events are ever shown, and every stage and file format stays as it is. The weights come
from the checkpoint given (a trainer checkpoint, or ``pipeline replay --save-model``), which may be
later than the model that scored the event; the report says which window it was trained through.

Torch is imported only here (``pipeline report`` without ``--model`` never loads it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config
from pipeline.scorefile import ScoreRow


class AttentionUnavailable(ValueError):
    """The --model checkpoint cannot explain: unreadable, another configuration, no attention."""


@dataclass(frozen=True)
class AttentionView:
    """Why the model found an event's most surprising token surprising: the weights of the states
    it read for that prediction, one per input token."""

    target: str  # the worst-predicted token
    loss: float  # its cross-entropy (nats)
    context: list[tuple[str, float | None]]  # input token, attention weight (None: not readable)
    trained_through: int | None  # the window the explaining model was trained through


def explain_ids(model, decode, ids: Sequence[int],
                trained_through: int | None = None) -> AttentionView | None:
    """The attention view of one encoded event (BOS..EOS ids); None when nothing is predicted."""
    from nn.rnn import attention_weights
    from nn.scoring import pad_batch
    from nn.tokenizers import PAD

    seq = pad_batch([ids]).to(next(model.parameters()).device)
    weights, losses, targets = attention_weights(model, seq)
    weights, losses, targets = weights[0].cpu(), losses[0].cpu(), targets[0].cpu()
    real = targets != -1
    if not real.any():
        return None
    t = int(losses.masked_fill(~real, -1.0).argmax())
    idx, _ = model.inputs_and_targets(seq.cpu())
    texts = decode(idx[0].tolist())
    # The states position t may read (attention_mask); the others are shown without a weight.
    readable = [j != t if model.config.bidirectional else j <= t for j in range(len(texts))]
    context = [(text, float(weights[t, j]) if ok else None)
               for j, (text, ok) in enumerate(zip(texts, readable)) if int(idx[0, j]) != PAD]
    return AttentionView(decode([int(targets[t])])[0], float(losses[t]), context, trained_through)


def attention_for_rows(config: Config, model_path: str | Path, rows: Sequence[ScoreRow],
                       raw: Mapping[int, str]) -> dict[int, AttentionView]:
    """Line -> attention view for the ``rows`` whose raw line is in ``raw``, from the checkpoint at
    ``model_path``. AttentionUnavailable (one line) when the checkpoint is not usable for this config or its
    model has no attention."""
    from nn.training import CheckpointError
    from pipeline.learner import WindowLearner
    from pipeline.modelspec import make_masker
    from pipeline.parsing import Event, LineParser
    from pipeline.ranking import line_number

    try:
        learner = WindowLearner.load(model_path, config)
    except (CheckpointError, FileNotFoundError) as exc:
        raise AttentionUnavailable(f"--model {model_path}: {exc}") from exc
    model = learner.model
    if model is None or getattr(model.config, "attention", "none") == "none":
        raise AttentionUnavailable(f"--model {model_path}: its model has no attention to show "
                         f"(model.rnn.attention: none); train one with fixed or syntax")
    parser = LineParser(config.input, masker=make_masker(config))
    views: dict[int, AttentionView] = {}
    for row in rows:
        line = line_number(row)
        if line not in raw:
            continue
        event = parser.parse(raw[line], line)
        if not isinstance(event, Event):  # a header or a line the config cannot read
            continue
        view = explain_ids(model, learner.tokenizer.decode, learner.encode([event])[0],
                           learner.last_window)
        if view is not None:
            views[line] = view
    return views
