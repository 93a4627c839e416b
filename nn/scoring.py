"""Per-event anomaly scores: masked per-token cross-entropy, mean and total (nats)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from nn.device import autocast
from nn.tokenizers import PAD


def pad_batch(seqs: Sequence[Sequence[int]], pin_memory: bool = False) -> torch.Tensor:
    """(B, T) LongTensor, right-padded with PAD to the longest sequence (ids: ints, or objects
    whose ``int()`` and ``__index__`` agree, as numpy's and torch's do). ``pin_memory``: in
    page-locked memory, so that a ``non_blocking`` copy to a GPU does not stall the host.

    One pass over the ids in C, one vectorised assignment: a tensor per row cost ~15 us each,
    which at GPU batch sizes (4096) kept the GPU waiting for the host."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = _flat_ids(seqs, int(lengths.sum()))
    T = int(lengths.max())
    out = torch.full((len(seqs), T), PAD, dtype=torch.long, pin_memory=pin_memory)
    out.numpy()[np.arange(T) < lengths[:, None]] = flat  # the mask is row-major, as flat is
    return out


def pad_batch_on_device(seqs: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """``pad_batch(seqs)`` built on ``device``: the host sends only the ids, back to back (one
    byte an id where ``_flat_ids`` packs them), and the rows' lengths, from pinned memory; the
    device lays them out. On a GPU that spares the host the (B, T) int64 batch, its fill and its
    transfer (~8x the bytes of the packed ids), which the GPU otherwise waits for. No step here
    waits for the device: every size is known on the host."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    total = int(lengths.sum())
    flat = _flat_ids(seqs, total)
    if flat.size != total:  # rows and lengths that disagree: pad_batch's error, as it gives it
        return pad_batch(seqs).to(device)
    pin = device.type == "cuda"
    ids = _staged(flat, pin).to(device, non_blocking=True)
    row_lengths = _staged(lengths, pin).to(device, non_blocking=True)
    width = int(lengths.max())
    rows = torch.repeat_interleave(torch.arange(len(seqs), device=device), row_lengths, output_size=total)
    row_starts = torch.cumsum(row_lengths, 0) - row_lengths  # where each row's ids begin in ``ids``
    # An id's place in the flattened (B, width) batch: its row's start there, plus how far it is
    # into its row.
    places = torch.arange(total, device=device) + rows * width - row_starts[rows]
    out = torch.full((len(seqs), width), PAD, dtype=torch.long, device=device)
    return out.view(-1).scatter_(0, places, ids.long()).view(len(seqs), width)


def _staged(array: np.ndarray, pin: bool) -> torch.Tensor:
    """A CPU tensor holding a copy of ``array``, in page-locked memory when ``pin`` (the caching
    host allocator keeps it until an asynchronous copy from it has finished)."""
    dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
    tensor = torch.empty(array.shape, dtype=dtype, pin_memory=pin)
    tensor.numpy()[...] = array
    return tensor


def _flat_ids(seqs: Sequence[Sequence[int]], total: int) -> np.ndarray:
    """Every id, row after row. Rows of ``bytes`` (the char tokenizer's ids, one a byte) are
    joined as they are; lists and tuples of ids in 0..255 (char ids read from a topic, without
    entity context) go through ``bytes``, which packs them in C at about half the cost of
    np.fromiter over Python ints (0.75 against 1.5 us a 58-token event): on a GPU that host work
    is what the device waits for. Anything else (larger or negative ids, arrays: ``bytes`` of an
    array would copy its raw memory) takes np.fromiter."""
    kinds = set(map(type, seqs))  # in C: a generator over the rows cost as much as the join
    if kinds == {bytes}:
        return np.frombuffer(b"".join(seqs), dtype=np.uint8)
    if kinds <= {bytes, list, tuple}:
        try:  # a list's or tuple's bytes() is one byte an id (``total`` of them); bytes are ids
            return np.frombuffer(b"".join(map(bytes, seqs)), dtype=np.uint8)
        except (ValueError, TypeError):  # an id outside 0..255, or not an int
            pass
    return np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=total)


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


def _launch(model: torch.nn.Module, batch: torch.Tensor, precision: str, per_token: bool):
    """Start scoring one batch; returns what ``_collect`` needs. On a GPU nothing here waits: the
    results go to pinned host memory asynchronously and an event marks when they are there, so
    the host pads the next batch while the GPU works on this one."""
    losses, mask = token_losses(model, batch, precision)
    losses = losses * mask
    # The reductions run where the losses are, in the order they always did (CPU: bit-identical).
    parts = [losses.sum(1), mask.sum(1), *((losses, mask) if per_token else ())]
    if batch.device.type != "cuda":
        return parts, None
    parts = [t.to("cpu", non_blocking=True) for t in parts]
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(batch.device))
    return parts, done


def _collect(launched, per_token: bool) -> list[tuple[float, float, tuple[float, ...]]]:
    """(mean, total, per-token losses) per row of a launched batch, as Python floats: one
    ``.tolist()`` per batch for each, never one per row. Tuples of floats only: the garbage
    collector stops tracking them, where lists made its full passes over a growing result
    list cost up to ~0.1 s per batch of 4096 (measured on an H200 host)."""
    parts, done = launched
    if done is not None:
        done.synchronize()
    # The means in float64 numpy: the very floats Python's total / max(count, 1) gives (IEEE
    # division of the same doubles), at a fraction of a Python loop's host time per row.
    totals64, counts64 = parts[0].numpy().astype(np.float64), parts[1].numpy()
    means, totals = (totals64 / np.maximum(counts64, 1)).tolist(), totals64.tolist()
    if not per_token:
        return list(zip(means, totals, itertools.repeat((), len(totals))))
    losses, mask = parts[2], parts[3]
    # The real positions, row after row (any mask shape); numpy's boolean indexing, ~10x
    # torch's on the CPU here (0.09 against 0.9 us an event of 60 tokens).
    flat = losses.numpy()[mask.numpy()].tolist()
    counts = counts64.tolist()
    ends = itertools.accumulate(counts)
    return [(mean, total, tuple(flat[end - count : end]))
            for mean, total, count, end in zip(means, totals, counts, ends)]


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module, seqs: Sequence[Sequence[int]], batch_size: int = 256,
    device: torch.device | None = None, precision: str = "fp32", per_token: bool = True,
) -> list[tuple[float, float, tuple[float, ...]]]:
    """(mean loss, total loss, per-token losses) per sequence, in order, in eval mode. Batches go
    to ``device`` (the model's; None: the CPU); the results come back as Python floats.
    ``per_token=False``: the per-token tuples are empty (the means and totals are the same floats),
    and no per-token data leaves the device. On a GPU, batch k+1 is padded and launched before
    the results of batch k are read, so host and device work side by side.

    On the CPU the batches are cut in length order (shortest first, ties in input order): a
    batch is padded to its longest sequence, and char events of 45-93 tokens in input order
    pad a batch of 256 to 1.57x their tokens, in length order to 1.01x. A sequence's result
    depends on its batch only through float rounding (padding is masked; tests/test_models.py):
    ~1e-6 of a loss, more on high losses, within the 1e-5 that streaming and replay agree to.
    On a GPU the model's ``gpu_scores_in_length_order`` decides (a GPT: yes, an RNN: no; the
    measurements are beside them), the batches are laid out on the GPU (pad_batch_on_device),
    and each new batch width costs the GPU libraries a set-up once per process."""
    was_training = model.training
    model.eval()
    cuda = device is not None and device.type == "cuda"
    length_order = not cuda or getattr(model, "gpu_scores_in_length_order", False)
    order = by_length(seqs) if length_order else None
    results: list[tuple[float, float, tuple[float, ...]]] = []
    pending = None
    try:
        for start in range(0, len(seqs), batch_size):
            rows = (seqs[start : start + batch_size] if order is None
                    else [seqs[i] for i in order[start : start + batch_size]])
            if cuda:
                batch = pad_batch_on_device(rows, device)
            else:
                batch = pad_batch(rows) if device is None else pad_batch(rows).to(device)
            launched = _launch(model, batch, precision, per_token)
            if pending is not None:
                results += _collect(pending, per_token)
            pending = launched
        if pending is not None:
            results += _collect(pending, per_token)
    finally:
        model.train(was_training)
    return results if order is None else in_input_order(results, order)


def in_input_order(results: list, order: list[int]) -> list:
    """The results of sequences taken in ``order`` (their indices), back in input order."""
    in_order: list = [None] * len(results)
    for position, index in enumerate(order):
        in_order[index] = results[position]
    return in_order


def by_length(seqs: Sequence[Sequence[int]]) -> list[int] | None:
    """Indices of ``seqs`` by length, ties in input order; None when that is input order
    (sequences of one length, as the word tokenizer's are, or already sorted)."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    if len(lengths) < 2 or bool((lengths[1:] >= lengths[:-1]).all()):
        return None
    return np.argsort(lengths, kind="stable").tolist()
