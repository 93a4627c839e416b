"""Differential attack on the GPU host-path changes (pad_batch's bytes packing, _collect's float64
numpy means, train_sequences' batch generator and CUDA look-ahead) against the code of d7124bb,
copied here verbatim as the references: same tensors, same floats bit for bit, same exceptions."""

from __future__ import annotations

import array
import enum
import itertools
import math
import random
import struct
import types
from collections.abc import Callable, Sequence
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch

from nn import scoring, training
from nn.device import autocast
from nn.scoring import _collect, _flat_ids, pad_batch, pad_batch_on_device, score_sequences
from nn.tokenizers import BOS, EOS, N_SPECIAL, PAD
from nn.training import build_model, has_targets, make_optimizer, train_sequences

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- the d7124bb code, verbatim (the contract) ---------------------------------------------------

def old_pad_batch(seqs: Sequence[Sequence[int]], pin_memory: bool = False) -> torch.Tensor:
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    T = int(lengths.max())
    out = torch.full((len(seqs), T), PAD, dtype=torch.long, pin_memory=pin_memory)
    out.numpy()[np.arange(T) < lengths[:, None]] = flat  # the mask is row-major, as flat is
    return out


def old_collect(launched, per_token: bool) -> list[tuple[float, float, tuple[float, ...]]]:
    parts, done = launched
    if done is not None:
        done.synchronize()
    totals, counts = parts[0].tolist(), parts[1].tolist()
    if not per_token:
        return [(total / max(count, 1), total, ()) for total, count in zip(totals, counts)]
    losses, mask = parts[2], parts[3]
    flat = losses[mask].tolist()  # the real positions, row after row (any mask shape)
    ends = list(itertools.accumulate(counts))
    return [(total / max(count, 1), total, tuple(flat[end - count : end]))
            for total, count, end in zip(totals, counts, ends)]


def old_train_sequences(
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
    model.train()
    generator = torch.Generator().manual_seed(seed)
    cuda = device is not None and device.type == "cuda"
    batches = -(-len(seqs) // batch_size)
    losses = torch.empty(epochs * batches, device=device)
    done = 0
    for epoch in range(epochs):
        order = torch.randperm(len(seqs), generator=generator).tolist()
        for number, start in enumerate(range(0, len(order), batch_size), start=1):
            if on_batch is not None and number > 1:  # here, so a skipped batch counts as done
                on_batch(epoch, number - 1, batches)
            batch = old_pad_batch([seqs[i] for i in order[start : start + batch_size]], pin_memory=cuda)
            if cuda:  # one copy from pinned memory: the host pads the next batch meanwhile
                if not has_targets(model, batch):
                    continue
                idx, targets = model.inputs_and_targets(batch.to(device, non_blocking=True))
            else:
                idx, targets = model.inputs_and_targets(batch)
                if not (targets != -1).any():
                    continue
                if device is not None:
                    idx, targets = idx.to(device), targets.to(device)
            with autocast(idx.device, precision):
                _, loss = model(idx, targets)
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


# ---- pad_batch -----------------------------------------------------------------------------------

def outcome(function, seqs):
    """The batch as nested lists, or the exception's type, message and context (the bytes attempt
    must leave no trace in a traceback)."""
    try:
        out = function(seqs)
    except Exception as exc:  # noqa: BLE001 - the exception is the result compared
        return "raised", type(exc), str(exc), type(exc.__context__), exc.__suppress_context__
    assert out.dtype == torch.long
    return "ok", out.tolist()


class Colour(enum.IntEnum):
    RED = 7
    WHITE = 255


class Bits(enum.IntFlag):
    LOW = 1
    HIGH = 128


class Row(list):
    """A list subclass whose iteration disagrees with its list storage: never the bytes path."""

    def __iter__(self):
        return iter([x + 1 for x in list.__iter__(self)])


CASES = {  # name: (batch, whether _flat_ids may take the bytes path)
    "ids 0..255": ([[0, 1, 254, 255], [N_SPECIAL], [BOS, 100, EOS]], True),
    "tuples": ([(BOS, 9, EOS), (BOS, EOS)], True),
    "list and tuple": ([[BOS, 9, EOS], (BOS, 200, 201, EOS)], True),
    "255 then 256": ([[255], [256]], False),
    "256 first": ([[256, 1], [1]], False),
    "negative context ids": ([[-3, -1, BOS, 5, EOS], [BOS, EOS]], False),
    "bools": ([[True, False, True]], True),
    "numpy ints in a list": ([[np.int64(5), np.uint8(255), np.int32(0)], [np.int16(3)]], True),
    "numpy ints over 255": ([[np.int64(5), np.uint16(256)]], False),
    "negative numpy int": ([[np.int8(-1), 3]], False),
    "numpy bools": ([[np.True_, np.False_]], False),  # np.bool has no __index__
    "numpy 0-d arrays": ([[np.array(5), np.array(200, dtype=np.uint8)]], True),
    "torch scalars": ([[torch.tensor(5), torch.tensor(True), torch.tensor(7, dtype=torch.uint8)]], True),
    "torch 1-element tensor": ([[torch.tensor([5])]], True),
    "torch scalar over 255": ([[torch.tensor(300)]], False),
    "torch float scalar": ([[torch.tensor(5.7)]], False),
    "IntEnum and IntFlag": ([[Colour.RED, Colour.WHITE, Bits.LOW | Bits.HIGH]], True),
    "floats": ([[1.0, 2.7, 255.9]], False),
    "numpy floats": ([[np.float64(3.9), np.float32(2.5)]], False),
    "Fraction and Decimal": ([[Fraction(7, 2), Decimal(3)]], False),
    "digit strings": ([["5", "17"]], False),
    "a bytes row": ([b"\x01\xff", [3]], True),  # bytes are ids (the char tokenizer's encode)
    "a bytearray row": ([bytearray(b"\x05\x06")], False),
    "a memoryview row": ([memoryview(b"\x05\x06")], False),
    "a range row": ([range(250, 258)], False),
    "array.array B": ([array.array("B", [1, 2, 255])], False),
    "array.array q": ([array.array("q", [1, 2, 3]), [4]], False),  # bytes() would be 24 raw bytes
    "array.array h negative": ([array.array("h", [-1, 300])], False),
    "numpy uint8 rows": ([np.array([1, 2, 255], dtype=np.uint8), [7]], False),
    "numpy int64 rows": ([np.array([1, 2, 3], dtype=np.int64)], False),  # bytes(): raw memory
    "a numpy 2-d batch": (np.array([[1, 2], [3, 4]], dtype=np.int64), False),
    "a torch 2-d batch": (torch.tensor([[1, 2], [3, 4]]), False),
    "list subclass": ([Row([1, 2]), [3]], False),
    "a dict row": ([{1: 2}, [3]], False),
    "tuple of lists": (([1, 2], [3]), True),
    "empty rows": ([[], (), [5]], True),
    "all rows empty": ([[], ()], True),
    "one row": ([[BOS, 42, EOS]], True),
    "one id": ([[0]], True),
    # the old code raised on all of these; the new one must too, with the same exception
    "empty batch": ([], None),
    "huge int": ([[1, 2**70]], None),
    "huge negative int": ([[-(2**70)]], None),
    "huge int after small rows": ([[1, 2], [3, 2**64]], None),
    "uint64 over int64": ([[np.uint64(2**63 + 5)]], None),
    "None": ([[1, None]], None),
    "NaN": ([[float("nan")]], None),
    "inf": ([[float("inf")]], None),
    "complex": ([[1 + 0j]], None),
    "non-digit str": ([["x"]], None),
    "a str row": (["abc"], None),
    "numpy 1-d element": ([[np.array([5])]], None),
    "nested list": ([[[1, 2]]], None),
}


@pytest.mark.parametrize("name", CASES)
def test_pad_batch_gives_what_d7124bb_gave(name):
    seqs, fast = CASES[name]
    want, got = outcome(old_pad_batch, seqs), outcome(pad_batch, seqs)
    assert got == want
    if fast is None:  # control: the case is one that raises
        assert want[0] == "raised"
    else:  # control: the case goes down the path it is meant to test
        total = sum(len(row) for row in seqs)
        assert (_flat_ids(seqs, total).dtype == np.uint8) is fast


@pytest.mark.parametrize("name", CASES)
def test_padding_on_the_device_gives_pad_batch_on_every_case(name):
    """pad_batch_on_device (the GPU scoring path; here on the CPU) on the same odd rows: the same
    batch, or the same exception."""
    seqs, _ = CASES[name]
    on_device = outcome(lambda rows: pad_batch_on_device(rows, torch.device("cpu")), seqs)
    assert on_device == outcome(pad_batch, seqs)


def test_pad_batch_matches_on_random_mixed_batches():
    """Random batches around the 0..255 edge, of every row type at once (1-row batches included)."""
    rng = random.Random(3)
    makers = [list, tuple, lambda r: np.array(r, dtype=np.int64), lambda r: array.array("q", r),
              lambda r: [np.int64(x) for x in r]]
    paths = set()
    for _ in range(400):
        high = rng.choice([255, 255, 256, 300, 5000])
        low = rng.choice([0, 0, 0, -2])
        kinds = rng.choice([makers[:1], makers[:2], makers[:2], makers])
        seqs = [rng.choice(kinds)([rng.randint(low, high) for _ in range(rng.randrange(0, 12))])
                for _ in range(rng.randrange(1, 6))]
        assert outcome(pad_batch, seqs) == outcome(old_pad_batch, seqs), seqs
        paths.add(_flat_ids(seqs, sum(map(len, seqs))).dtype == np.uint8)
    assert paths == {True, False}  # control: both paths were taken


def test_pad_batch_pin_memory_behaves_as_before():
    """pin_memory goes to torch.full as before: where pinning is impossible both raise the same."""
    seqs = [[BOS, 5, EOS]]
    assert outcome(lambda s: pad_batch(s, pin_memory=True), seqs) == \
        outcome(lambda s: old_pad_batch(s, pin_memory=True), seqs)


# ---- _collect ------------------------------------------------------------------------------------

def bits(value):
    """A float's exact bits (NaN payload and sign, -0.0), and that it is a Python float."""
    assert type(value) is float
    return struct.pack("<d", value)


def as_bits(results):
    return [(bits(mean), bits(total), tuple(bits(x) for x in per)) for mean, total, per in results]


def f32(word: int) -> float:
    return struct.unpack("<f", struct.pack("<I", word))[0]


SPECIAL_TOTALS = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan"),
                  f32(0x7FC12345), f32(0xFFC00001), f32(0x7F812345),  # NaN payloads, a signalling one
                  f32(0x00000001), f32(0x807FFFFF), 3.4028234663852886e38, 1e-30, 0.1, 2.5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_collect_means_and_totals_are_the_old_floats_bit_for_bit(dtype):
    rng = random.Random(5)
    counts = [0, 1, 2, 3, 7, 10, 2**24 + 1, 2**53 + 1, 2**53 + 3, 2**62 + 1, 2**63 - 1, -4]
    totals = SPECIAL_TOTALS + [rng.uniform(-1e6, 1e6) for _ in range(200)] + [rng.expovariate(1e-3)
                                                                              for _ in range(200)]
    pairs = [(t, c) for t in totals for c in counts] + [
        (rng.uniform(0, 1e4), rng.randrange(0, 2**63)) for _ in range(2000)]
    parts = [torch.tensor([t for t, _ in pairs], dtype=dtype), torch.tensor([c for _, c in pairs])]
    got, want = _collect((parts, None), False), old_collect((parts, None), False)
    assert as_bits(got) == as_bits(want)
    assert len(got) == len(pairs) and all(per == () for _, _, per in got)
    assert any(math.isnan(m) for m, _, _ in got)  # control: the special values went through
    assert any(m == 0 and math.copysign(1, m) < 0 for m, _, _ in got)


@pytest.mark.parametrize("shape", ["2-d", "3-d", "one row", "no rows"])
def test_collect_per_token_tuples_are_the_old_ones(shape):
    g = torch.Generator().manual_seed(1)
    B, L = {"2-d": (9, 13), "3-d": (6, 10), "one row": (1, 5), "no rows": (0, 4)}[shape]
    losses = torch.rand(B, L, generator=g, dtype=torch.float32) * 10
    mask = torch.rand(B, L, generator=g) < 0.6
    if B > 2:
        mask[1] = False  # a row with nothing to predict: mean total / 1
        losses[2, 0] = float("nan")
        losses[0, 1] = -0.0
    if shape == "3-d":  # _collect reads any mask shape, row after row
        losses, mask = losses.view(B, 2, L // 2), mask.view(B, 2, L // 2)
    losses = losses * mask
    parts = [losses.flatten(1).sum(1), mask.flatten(1).sum(1), losses, mask]
    got, want = _collect((parts, None), True), old_collect((parts, None), True)
    assert as_bits(got) == as_bits(want)
    assert len(got) == B and sum(len(per) for _, _, per in got) == int(mask.sum())


@pytest.mark.parametrize(("per_token", "precision"), [(True, "fp32"), (False, "fp32"), (True, "bf16")])
@pytest.mark.parametrize("kind", ["gpt", "bi-lstm"])
def test_score_sequences_gives_the_old_floats(monkeypatch, kind, per_token, precision):
    """End to end on a tiny model: the d7124bb pad_batch and _collect give the very same results."""
    if kind == "gpt":
        model = build_model({"kind": "gpt", "vocab_size": 300, "block_size": 32, "n_layer": 1,
                             "n_head": 2, "n_embd": 8})
    else:
        model = build_model({"kind": "rnn", "cell": "lstm", "vocab_size": 300, "hidden_size": 8,
                             "n_layer": 1, "bidirectional": True})
    rng = random.Random(11)
    seqs = [[BOS, *(rng.randrange(N_SPECIAL, 299 if i % 7 == 0 else 256) for _ in range(rng.randrange(20))),
             EOS] for i in range(70)]
    seqs[3] = [BOS, EOS]  # nothing to predict for the bidirectional model
    got = score_sequences(model, seqs, batch_size=16, per_token=per_token, precision=precision)
    monkeypatch.setattr(scoring, "pad_batch", old_pad_batch)
    monkeypatch.setattr(scoring, "_collect", old_collect)
    want = score_sequences(model, seqs, batch_size=16, per_token=per_token, precision=precision)
    assert as_bits(got) == as_bits(want) and len(got) == 70


# ---- train_sequences -----------------------------------------------------------------------------

def tiny_rnn(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model({"kind": "rnn", "cell": "gru", "vocab_size": 32, "hidden_size": 8, "n_layer": 1,
                        "bidirectional": True})


def run_training(function, seqs, **kwargs):
    model = tiny_rnn()
    optimizer = make_optimizer(model, 3e-3, 0.01)
    progress = []
    loss = function(model, optimizer, seqs, grad_clip=1.0, seed=4,
                    on_batch=lambda *step: progress.append(step), **kwargs)
    return loss, model.state_dict(), optimizer.state_dict()["state"], progress


def assert_same_training(got, want):
    loss, weights, state, progress = got
    assert bits(loss) == bits(want[0])
    assert progress == want[3]
    assert weights.keys() == want[1].keys() and all(torch.equal(weights[k], want[1][k]) for k in weights)
    for key in want[2]:
        assert all(torch.equal(state[key][n], want[2][key][n]) for n in want[2][key])
    assert state.keys() == want[2].keys()


def events(n: int, empty_every: int | None = None, seed: int = 0) -> list[list[int]]:
    """BOS ids EOS rows; every ``empty_every``-th one BOS EOS (nothing to predict, bidirectional)."""
    rng = random.Random(seed)
    return [[BOS, EOS] if empty_every and i % empty_every == 0 else
            [BOS, *(rng.randrange(N_SPECIAL, 32) for _ in range(rng.randrange(1, 6))), EOS] for i in range(n)]


TRAINING = {  # name: (seqs, epochs, batch_size, device)
    "plain": (events(23), 2, 4, None),
    "empty rows here and there": (events(30, empty_every=2), 3, 2, None),
    "first batch empty": ([[BOS, EOS]] * 3 + events(9), 1, 3, None),  # randperm puts them anywhere
    "one row a batch, many empty": (events(12, empty_every=3), 2, 1, None),
    "batch larger than the data": (events(5, empty_every=4), 3, 64, None),
    "every batch empty": ([[BOS, EOS]] * 7, 2, 3, None),
    "no data": ([], 2, 4, None),
    "a cpu device": (events(10, empty_every=2), 2, 3, torch.device("cpu")),
}


@pytest.mark.parametrize("name", TRAINING)
def test_train_sequences_on_the_cpu_is_the_old_loop(name):
    seqs, epochs, batch_size, device = TRAINING[name]
    kwargs = {"epochs": epochs, "batch_size": batch_size, "device": device}
    got = run_training(train_sequences, seqs, **kwargs)
    want = run_training(old_train_sequences, seqs, **kwargs)
    if math.isnan(want[0]):
        assert math.isnan(got[0]) and not want[2]  # nothing was trained
        got, want = (0.0, *got[1:]), (0.0, *want[1:])
    assert_same_training(got, want)
    assert len(want[3]) == epochs * -(-len(seqs) // batch_size) + (epochs if not seqs else 0)


def test_skips_happen_in_the_training_controls():
    """Control for the cases above: some batches are skipped and some are trained on."""
    seqs, epochs, batch_size, _ = TRAINING["empty rows here and there"]
    model, steps = tiny_rnn(), []
    optimizer = make_optimizer(model, 3e-3, 0.0)
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    train_sequences(model, optimizer, seqs, epochs=epochs, batch_size=batch_size, grad_clip=1.0, seed=4)
    assert 0 < len(steps) < epochs * len(seqs) // batch_size


class FakeCuda:
    """A device that calls itself cuda: the loop takes its CUDA branch, the work stays on the CPU."""

    type = "cuda"


def fake_cuda_torch():
    """nn.training's torch, but torch.empty ignores the fake device."""
    module = types.ModuleType("torch")
    module.__getattr__ = lambda name: getattr(torch, name)

    def empty(*size, device=None, **kwargs):
        return torch.empty(*size, **kwargs)

    module.empty = empty
    return module


@pytest.mark.parametrize("name", [n for n in TRAINING if n != "a cpu device"])
def test_the_cuda_look_ahead_trains_on_every_batch_once_in_order(monkeypatch, name):
    """The CUDA branch, run on the CPU: every batch padded exactly once and in the old order (no
    StopIteration, no batch lost or repeated, the last one trained), pinned, padded ahead while
    the forward pass runs, and the same losses, weights and progress as the old loop."""
    seqs, epochs, batch_size, _ = TRAINING[name]
    log, padded = [], []

    def pad(rows, pin_memory=False):
        assert pin_memory  # the CUDA branch pins its batches
        log.append("pad")
        padded.append(rows)
        return pad_batch(rows)

    real = training._inputs_and_targets

    def inputs_and_targets(model, batch, device, cuda):
        assert isinstance(device, FakeCuda) and cuda
        return real(model, batch, None, True)  # the CUDA branch, with .to(None): stays on the CPU

    monkeypatch.setattr(training, "torch", fake_cuda_torch())
    monkeypatch.setattr(training, "pad_batch", pad)
    monkeypatch.setattr(training, "_inputs_and_targets", inputs_and_targets)

    model = tiny_rnn()
    optimizer = make_optimizer(model, 3e-3, 0.01)
    model.register_forward_hook(lambda *_: log.append("forward"))
    optimizer.register_step_post_hook(lambda *_: log.append("step"))
    progress = []
    loss = train_sequences(model, optimizer, seqs, epochs=epochs, batch_size=batch_size, grad_clip=1.0,
                           seed=4, device=FakeCuda(), on_batch=lambda *step: progress.append(step))
    got = (loss, model.state_dict(), optimizer.state_dict()["state"], progress)
    monkeypatch.undo()

    want = run_training(old_train_sequences, seqs, epochs=epochs, batch_size=batch_size, device=None)
    if math.isnan(want[0]):
        assert math.isnan(got[0])
        got, want = (0.0, *got[1:]), (0.0, *want[1:])
    assert_same_training(got, want)
    generator = torch.Generator().manual_seed(4)
    orders = [torch.randperm(len(seqs), generator=generator).tolist() for _ in range(epochs)]
    assert padded == [[seqs[i] for i in order[s : s + batch_size]]
                      for order in orders for s in range(0, len(seqs), batch_size)]
    # the look-ahead: a trained batch's forward pass is followed by the next batch's padding,
    # before its step, unless it is its epoch's last batch
    per_epoch, pads, ahead = -(-len(seqs) // batch_size), 0, 0
    for event, following in zip(log, log[1:] + ["end"]):
        pads += event == "pad"
        if event == "forward":
            last = pads % per_epoch == 0
            assert following == ("step" if last else "pad"), log
            ahead += not last
    assert log.count("step") == log.count("forward") and log.count("pad") == len(padded)
    assert ahead > 0 or per_epoch == 1 or "forward" not in log  # control: the look-ahead was seen


def test_no_look_ahead_on_the_cpu(monkeypatch):
    """On the CPU each batch is padded after the previous batch's step, as before (a batch made
    among the activations could pin the heap): pad, forward, step, never forward, pad."""
    seqs, epochs, batch_size, _ = TRAINING["empty rows here and there"]
    log = []

    def pad(rows, pin_memory=False):
        assert not pin_memory
        log.append("pad")
        return pad_batch(rows)

    monkeypatch.setattr(training, "pad_batch", pad)
    model = tiny_rnn()
    optimizer = make_optimizer(model, 3e-3, 0.0)
    model.register_forward_hook(lambda *_: log.append("forward"))
    optimizer.register_step_post_hook(lambda *_: log.append("step"))
    train_sequences(model, optimizer, seqs, epochs=epochs, batch_size=batch_size, grad_clip=1.0, seed=4)
    following = [b for a, b in zip(log, log[1:] + ["end"]) if a == "forward"]
    assert following and set(following) == {"step"}
    assert log.count("pad") == epochs * -(-len(seqs) // batch_size)
