"""Per-event anomaly scores: masked per-token cross-entropy, mean and total (nats)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from nn.device import autocast
from nn.tokenizers import PAD


def pad_batch(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, T) LongTensor, right-padded with PAD to the longest sequence."""
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def token_losses(model: torch.nn.Module, seq: torch.Tensor,
                 precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy at every predicted position, (B, L), and the mask of real targets. The
    forward pass runs in ``precision``; the loss is always taken in fp32 (a no-op for fp32)."""
    idx, targets = model.inputs_and_targets(seq)
    with autocast(seq.device, precision):
        logits, _ = model(idx)
    logits = logits.float()
    losses = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction="none"
    ).view(targets.shape)
    return losses, targets != -1


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module, seqs: Sequence[Sequence[int]], batch_size: int = 256,
    device: torch.device | None = None, precision: str = "fp32",
) -> list[tuple[float, float, list[float]]]:
    """(mean loss, total loss, per-token losses) per sequence, in order, in eval mode. Batches go
    to ``device`` (the model's; None: the CPU); the results come back as Python floats."""
    was_training = model.training
    model.eval()
    results = []
    try:
        for start in range(0, len(seqs), batch_size):
            batch = pad_batch(seqs[start : start + batch_size])
            if device is not None:
                batch = batch.to(device, non_blocking=True)
            losses, mask = token_losses(model, batch, precision)
            if losses.device.type != "cpu":  # one transfer per batch, not one per .tolist()
                losses, mask = losses.cpu(), mask.cpu()
            losses = losses * mask
            totals = losses.sum(1).tolist()
            counts = mask.sum(1).clamp(min=1).tolist()
            for row, real, total, count in zip(losses, mask, totals, counts):
                results.append((total / count, total, row[real].tolist()))
    finally:
        model.train(was_training)
    return results
