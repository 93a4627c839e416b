"""Model construction, the training loop over one window, and checkpoints.

Checkpoints hold only tensors and plain data (model args, state dicts, tokenizer state) and are
read with ``torch.load(weights_only=True)``, so loading one can never execute code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from nn.gpt import GPT, GPTConfig
from nn.rnn import RNNLM, RNNLMConfig
from nn.scoring import pad_batch
from pipeline.atomic import atomic_write

CHECKPOINT_FORMAT = "salka-checkpoint-v1"


def build_model(model_args: dict) -> torch.nn.Module:
    """Rebuild a model from the plain ``model_args`` dict stored next to its weights."""
    args = dict(model_args)
    kind = args.pop("kind")
    if kind == "rnn":
        return RNNLM(RNNLMConfig(**args))
    if kind == "gpt":
        return GPT(GPTConfig(**args))
    raise ValueError(f"unknown model kind {kind!r}")


def model_args_of(model: torch.nn.Module) -> dict:
    kind = "gpt" if isinstance(model, GPT) else "rnn"
    return {"kind": kind, **asdict(model.config)}


def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float):
    return torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)


def train_sequences(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    seqs: Sequence[Sequence[int]],
    *,
    epochs: int,
    batch_size: int,
    grad_clip: float,
    seed: int,
    on_batch: Callable[[int, int, int], None] | None = None,
) -> float:
    """Train on ``seqs`` (shuffled by ``seed``, so runs repeat exactly); mean batch loss.
    ``on_batch(epoch, batches done in it, batches per epoch)`` follows progress (epoch from 0)."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    losses = []
    batches = -(-len(seqs) // batch_size)
    for epoch in range(epochs):
        order = torch.randperm(len(seqs), generator=generator).tolist()
        for number, start in enumerate(range(0, len(order), batch_size), start=1):
            if on_batch is not None and number > 1:  # here, so a skipped batch counts as done
                on_batch(epoch, number - 1, batches)
            batch = pad_batch([seqs[i] for i in order[start : start + batch_size]])
            idx, targets = model.inputs_and_targets(batch)
            if not (targets != -1).any():
                continue
            _, loss = model(idx, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            losses.append(loss.item())
        if on_batch is not None:
            on_batch(epoch, batches, batches)
    return sum(losses) / len(losses) if losses else float("nan")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or not salka's."""


def save_checkpoint(path: str | Path, **payload: Any) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    with atomic_write(path) as handle:
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, handle)


def load_checkpoint(path: str | Path) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises many kinds for a damaged or hostile file
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a salka checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return data
