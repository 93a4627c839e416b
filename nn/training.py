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

from nn.device import autocast, to_cpu
from nn.gpt import GPT, GPTConfig
from nn.rnn import RNNLM, RNNLMConfig
from nn.scoring import pad_batch
from nn.tokenizers import PAD
from pipeline.atomic import atomic_write

CHECKPOINT_FORMAT = "salka-checkpoint-v1"


# model_args["kind"] -> (config dataclass, model class); a new model registers here.
MODELS: dict[str, tuple[type, type[torch.nn.Module]]] = {
    "rnn": (RNNLMConfig, RNNLM),
    "gpt": (GPTConfig, GPT),
}


def build_model(model_args: dict) -> torch.nn.Module:
    """Rebuild a model from the plain ``model_args`` dict stored next to its weights."""
    args = dict(model_args)
    kind = args.pop("kind")
    if kind not in MODELS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {sorted(MODELS)}")
    config_class, model_class = MODELS[kind]
    return model_class(config_class(**args))


def model_args_of(model: torch.nn.Module) -> dict:
    kinds = [kind for kind, (_, model_class) in MODELS.items() if type(model) is model_class]
    if not kinds:
        raise ValueError(f"{type(model).__name__} is not a registered model ({sorted(MODELS)})")
    return {"kind": kinds[0], **asdict(model.config)}


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's two groups: weight decay on the matrices of linear and recurrent layers only;
    none on biases, LayerNorm and embeddings (the embedding is also the tied output projection)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # a tied parameter appears once
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, learning_rate: float, weight_decay: float):
    return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=learning_rate)


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module, state: dict) -> None:
    """Load a saved optimizer state; one saved with a single group over ``model.parameters()``
    (checkpoints from before ``parameter_groups``) is mapped onto the groups, so it still resumes
    (with its saved hyperparameters, as any checkpoint does; decay now spares the no-decay group)."""
    if len(state["param_groups"]) == 1 < len(optimizer.param_groups):
        position = {id(p): i for i, p in enumerate(model.parameters())}
        grouped = [position[id(p)] for group in optimizer.param_groups for p in group["params"]]
        saved, (old,) = state["state"], state["param_groups"]
        groups = [{**old, "params": g["params"], "weight_decay": old["weight_decay"] if i == 0 else 0.0}
                  for i, g in enumerate(optimizer.state_dict()["param_groups"])]
        state = {"state": {new: saved[i] for new, i in enumerate(grouped) if i in saved},
                 "param_groups": groups}
    optimizer.load_state_dict(state)


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
    device: torch.device | None = None,
    precision: str = "fp32",
) -> float:
    """Train on ``seqs`` (shuffled by ``seed``, so runs repeat exactly); mean batch loss.
    ``on_batch(epoch, batches done in it, batches per epoch)`` follows progress (epoch from 0).
    Batches go to ``device`` (the model's; None: leave them on the CPU); ``precision`` is the
    forward pass's (nn/device.py: bf16 autocast, fp32 master weights)."""
    model.train()
    generator = torch.Generator().manual_seed(seed)
    cuda = device is not None and device.type == "cuda"
    batches = -(-len(seqs) // batch_size)
    # Batch losses written into one tensor made up front: a small new tensor kept after each
    # batch's activations were freed pinned the allocator's heap (glibc), so a trainer held about
    # 4 MB per batch until the chunk ended (1.6 GB peak RSS; benchmarks/memory.py).
    losses = torch.empty(epochs * batches, device=device)
    done = 0
    for epoch in range(epochs):
        order = torch.randperm(len(seqs), generator=generator).tolist()
        padded = (pad_batch([seqs[i] for i in order[start : start + batch_size]], pin_memory=cuda)
                  for start in range(0, len(order), batch_size))
        upcoming = None
        for number in range(1, batches + 1):
            if on_batch is not None and number > 1:  # here, so a skipped batch counts as done
                on_batch(epoch, number - 1, batches)
            batch = upcoming if upcoming is not None else next(padded)
            upcoming = None
            inputs = _inputs_and_targets(model, batch, device, cuda)
            if inputs is None:  # nothing to predict: a NaN loss
                continue
            idx, targets = inputs
            with autocast(idx.device, precision):
                _, loss = model(idx, targets)
            if cuda and number < batches:
                # The next batch is padded while the GPU runs this forward pass, not after the
                # host's own share of the backward pass (an H200's LSTM training: 0.81-0.88x of a
                # plain loop, then 0.90-0.96x). Not on a CPU: a batch made among the activations
                # could pin the heap there, as the batch losses once did.
                upcoming = next(padded)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            losses[done] = loss.detach()  # no .item() here: that waits for a GPU every step
            done += 1
        if on_batch is not None:
            on_batch(epoch, batches, batches)
    values = losses[:done].tolist()  # the same floats .item() gives
    return sum(values) / len(values) if values else float("nan")


def _inputs_and_targets(model: torch.nn.Module, batch: torch.Tensor, device: torch.device | None,
                        cuda: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A padded CPU batch's inputs and targets on ``device``; None when it has no target."""
    if cuda:  # one copy from pinned memory: the host goes on while it runs
        if not has_targets(model, batch):
            return None
        return model.inputs_and_targets(batch.to(device, non_blocking=True))
    idx, targets = model.inputs_and_targets(batch)
    if not (targets != -1).any():
        return None
    if device is not None:
        idx, targets = idx.to(device), targets.to(device)
    return idx, targets


def has_targets(model: torch.nn.Module, batch: torch.Tensor) -> bool:
    """Whether any row of a padded CPU batch has a token to predict (a batch without one would
    give a NaN loss). A longest row is asked first: one row costs little of the host time a GPU
    waits for, where the whole batch's targets on the CPU cost ~2 ms per 4096 events; the whole
    batch only when that row has none."""
    longest = [int(row) for row in (batch[:, -1] != PAD).nonzero()[:1]]
    for rows in (*(batch[row : row + 1] for row in longest), batch):
        if (model.inputs_and_targets(rows)[1] != -1).any():
            return True
    return False


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, corrupt or not salka's."""


def save_checkpoint(path: str | Path, **payload: Any) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one. Tensors
    are saved on the CPU, so a checkpoint written on a GPU resumes on a machine without one."""
    with atomic_write(path) as handle:
        torch.save({"format": CHECKPOINT_FORMAT, **to_cpu(payload)}, handle)


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
