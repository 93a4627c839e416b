"""Language models: causality / no target leakage, weight tying, padding, learning,
determinism, and checkpoint safety. Tiny models only (CPU, a few seconds in all)."""

from __future__ import annotations

import io
import pickle
import random

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from nn.gpt import GPT, GPTConfig
from nn.rnn import RNNLM, RNNLMConfig
from nn.scoring import pad_batch, score_sequences, token_losses
from nn.tokenizers import BOS, EOS, N_SPECIAL, PAD, CharTokenizer, encode_event
from nn.training import (
    CheckpointError,
    build_model,
    load_checkpoint,
    make_optimizer,
    model_args_of,
    save_checkpoint,
    train_sequences,
)
from pipeline.config import config_from_dict
from pipeline.learner import WindowLearner
from pipeline.parsing import Event, LineParser

V = 48  # vocabulary of the random models
H = 16  # hidden / embedding size
UNI = ["gpt", "lstm", "gru", "rnn"]
BI = ["bi-lstm", "bi-gru"]
ALL = UNI + BI


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(kind: str, seed: int = 0, n_layer: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "gpt":
        model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=n_layer, n_head=2, n_embd=H))
    else:
        bidirectional = kind.startswith("bi-")
        cell = kind.removeprefix("bi-")
        model = RNNLM(RNNLMConfig(V, cell, H, n_layer, bidirectional=bidirectional))
    return model.eval()


def is_bidirectional(model: torch.nn.Module) -> bool:
    return isinstance(model, RNNLM) and model.config.bidirectional


def random_events(lengths, seed: int = 0) -> list[list[int]]:
    """BOS + ``n`` random non-special ids + EOS, for each n."""
    g = torch.Generator().manual_seed(seed)
    return [[BOS, *torch.randint(N_SPECIAL, V, (n,), generator=g).tolist(), EOS] for n in lengths]


def other_id(i: int) -> int:
    """A different non-special id."""
    return (i - N_SPECIAL + 1) % (V - N_SPECIAL) + N_SPECIAL


def logits_of(model, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx, targets = model.inputs_and_targets(seq)
    with torch.no_grad():
        logits, _ = model(idx)
    return logits, targets


# ---------------------------------------------------------------------------- 1. causality


def assert_causal(model: torch.nn.Module, vocab_size: int = V, T: int = 12) -> None:
    """Changing token k never changes the logits at positions < k. Control: the changed
    position itself moves in every row, and so does the next one (information flows forward,
    not just from the current token)."""
    idx = torch.randint(N_SPECIAL, vocab_size, (3, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base, _ = model(idx)
        for k in range(T):
            changed = idx.clone()
            changed[:, k] = (idx[:, k] - N_SPECIAL + 1) % (vocab_size - N_SPECIAL) + N_SPECIAL
            out, _ = model(changed)
            assert torch.allclose(out[:, :k], base[:, :k], atol=1e-6, rtol=0), k
            diff = (out - base).abs().amax(dim=-1)  # (B, T)
            assert (diff[:, k] > 1e-4).all(), (k, diff[:, k])
            if k + 1 < T:
                assert (diff[:, k + 1] > 1e-5).all(), (k, diff[:, k + 1])


@pytest.mark.parametrize("kind", UNI)
def test_unidirectional_models_are_causal(kind):
    assert_causal(make_model(kind))


@pytest.mark.parametrize("kind", ALL)
def test_no_prediction_sees_its_own_target(kind):
    """For every real token j of a padded batch: the logits rows that predict token j (found via
    ``inputs_and_targets``) do not change when token j changes; some other row does."""
    model = make_model(kind)
    seq = pad_batch(random_events([4, 9, 6]))
    base, targets = logits_of(model, seq)
    lengths = (seq != PAD).sum(1).tolist()
    for b, n in enumerate(lengths):
        for j in range(1, n):
            changed = seq.clone()
            changed[b, j] = other_id(int(seq[b, j])) if j < n - 1 else N_SPECIAL
            out, new_targets = logits_of(model, changed)
            predicts_j = new_targets != targets  # exactly the rows whose target is token j
            if is_bidirectional(model) and j == n - 1:
                assert not predicts_j.any()  # EOS is not predicted by the bidirectional model
            else:
                assert predicts_j.sum() == 1 and predicts_j[b].any(), (b, j)
            assert torch.allclose(out[predicts_j], base[predicts_j], atol=1e-6, rtol=0), (b, j)
            # Other events in the batch never see this one.
            others = [r for r in range(len(lengths)) if r != b]
            assert torch.allclose(out[others], base[others], atol=1e-6, rtol=0), (b, j)
            diff = (out[b] - base[b]).abs().amax(dim=-1)
            if is_bidirectional(model) or j < seq.size(1) - 1:
                assert diff.max() > 1e-4, (b, j)  # control: the event's other predictions move


@pytest.mark.parametrize("kind", UNI)
def test_unidirectional_alignment(kind):
    model = make_model(kind)
    events = random_events([3, 7])
    seq = pad_batch(events)
    idx, targets = model.inputs_and_targets(seq)
    assert torch.equal(idx, seq[:, :-1])
    for b, ev in enumerate(events):
        n = len(ev)
        assert targets[b, : n - 1].tolist() == ev[1:]  # every token after BOS, EOS included
        assert (targets[b, n - 1 :] == -1).all()


# ---------------------------------------------------------------------------- 2. bidirectional


@pytest.mark.parametrize("kind", BI)
def test_bidirectional_targets_are_the_inner_tokens(kind):
    model = make_model(kind)
    events = random_events([1, 5, 8])
    seq = pad_batch(events)
    idx, targets = model.inputs_and_targets(seq)
    assert torch.equal(idx, seq)
    for b, ev in enumerate(events):
        n = len(ev)
        assert targets[b, 0] == -1 and targets[b, n - 1] == -1  # BOS and EOS
        assert targets[b, 1 : n - 1].tolist() == ev[1:-1]
        assert (targets[b, n - 1 :] == -1).all()


@pytest.mark.parametrize("kind", BI)
def test_bidirectional_never_sees_token_t_but_sees_its_neighbours(kind):
    model = make_model(kind)
    short, *longer = random_events([6, 11, 9], seed=3)
    for batch in ([short], [short, *longer]):  # alone, and padded among longer events
        seq = pad_batch(batch)
        base, targets = logits_of(model, seq)
        n = len(short)
        for t in range(1, n - 1):  # every real token, the one next to EOS included
            changed = seq.clone()
            changed[0, t] = other_id(int(seq[0, t]))
            out, new_targets = logits_of(model, changed)
            row = (new_targets[0] != targets[0]).nonzero().flatten().tolist()
            assert row == [t]  # logits[:, t] predicts token t
            assert torch.allclose(out[0, t], base[0, t], atol=1e-6, rtol=0), t
            diff = (out[0] - base[0]).abs().amax(dim=-1)
            for neighbour in (t - 1, t + 1):
                if 1 <= neighbour <= n - 2:  # control: the neighbours' predictions do change
                    assert diff[neighbour] > 1e-4, (t, neighbour, diff)


@pytest.mark.parametrize("kind", BI)
def test_bidirectional_padding_is_invisible(kind):
    model = make_model(kind)
    short, *longer = random_events([5, 12, 9], seed=4)
    alone, _ = logits_of(model, pad_batch([short]))
    batched, _ = logits_of(model, pad_batch([short, *longer]))
    n = len(short)
    assert torch.allclose(alone[0, 1 : n - 1], batched[0, 1 : n - 1], atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- 3. weight tying


def expected_param_count(model: torch.nn.Module) -> int:
    """Unique parameters from the architecture, the tied output matrix counted once."""
    if isinstance(model, GPT):
        c = model.config
        C = c.n_embd
        block = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C)
        block += 4 * C * C + C
        return c.vocab_size * C + c.block_size * C + c.n_layer * block + 2 * C
    c = model.config
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[c.cell]
    h = c.hidden_size
    layer = gates * (2 * h * h + 2 * h)
    stacks = 2 if c.bidirectional else 1
    merge = (2 * h * h + h) if c.bidirectional else 0
    return c.vocab_size * h + stacks * c.n_layer * layer + merge + 2 * h


def assert_tied(model):
    assert model.lm_head.weight is model.wte.weight
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


@pytest.mark.parametrize("kind", ALL)
def test_tied_at_construction_and_parameters_counted_once(kind):
    model = make_model(kind)
    assert_tied(model)
    unique = sum(p.numel() for p in model.parameters())
    assert unique == expected_param_count(model)
    with_duplicates = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert with_duplicates == unique + model.wte.weight.numel()
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert "lm_head.weight" in names and "wte.weight" in names


@pytest.mark.parametrize("kind", ALL)
def test_tied_after_an_optimizer_step(kind):
    model = make_model(kind).train()
    optimizer = make_optimizer(model, learning_rate=1e-2, weight_decay=0.1)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    before = model.wte.weight.detach().clone()
    idx, targets = model.inputs_and_targets(pad_batch(random_events([5, 8])))
    _, loss = model(idx, targets)
    loss.backward()
    assert model.wte.weight.grad is not None
    optimizer.step()
    assert_tied(model)
    assert not torch.allclose(model.wte.weight, before)  # the embedding did change
    # The output layer uses the updated matrix: logits are ln_f(h) @ wte.weight^T.
    with torch.no_grad():
        logits, _ = model.eval()(idx)
        zero = torch.zeros_like(model.wte.weight)
        model.wte.weight.copy_(zero)
        zeroed, _ = model(idx)
    assert logits.abs().max() > 0 and zeroed.abs().max() == 0


@pytest.mark.parametrize("kind", ALL)
def test_tied_after_build_model_and_load_state_dict(kind):
    model = make_model(kind, seed=1)
    args = model_args_of(model)
    assert args["kind"] == ("gpt" if kind == "gpt" else "rnn")
    torch.manual_seed(99)
    clone = build_model(args).eval()
    assert_tied(clone)
    assert model_args_of(clone) == args
    seq = pad_batch(random_events([4, 7]))
    mine, _ = logits_of(model, seq)
    theirs, _ = logits_of(clone, seq)
    assert not torch.allclose(mine, theirs)  # control: a fresh model differs
    clone.load_state_dict(model.state_dict())
    assert_tied(clone)
    theirs, _ = logits_of(clone, seq)
    assert torch.equal(mine, theirs)


# ---------------------------------------------------------------------------- learner helpers

TEMPLATES = [
    "{t},U{u}@DOM1,U{u}@DOM1,C{c},C{c},Negotiate,Batch,LogOn,Success",
    "{t},U{u}@DOM1,U{u}@DOM1,C{c},C{d},Kerberos,Network,LogOn,Success",
    "{t},ANONYMOUS LOGON@C{c},ANONYMOUS LOGON@C{c},C{d},C{c},NTLM,Network,LogOn,Success",
    "{t},C{c}$@DOM1,C{c}$@DOM1,C{c},C{c},?,?,TGS,Success",
]


def synthetic_lines(n: int, start_time: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        rng.choice(TEMPLATES).format(
            t=start_time + i, u=rng.randint(1, 4), c=rng.randint(1, 4), d=rng.randint(1, 4)
        )
        for i in range(n)
    ]


def tiny_config(kind: str = "rnn", seed: int = 1234, **training):
    data = {
        "seed": seed,
        "tokenizer": {"kind": "char", "max_tokens": 80},
        "model": {
            "kind": "rnn" if kind.endswith("rnn") else "gpt",
            "rnn": {"cell": "lstm", "hidden_size": H, "n_layer": 1,
                    "bidirectional": kind == "bi-rnn", "dropout": 0.1},
            "gpt": {"n_layer": 1, "n_head": 2, "n_embd": H, "dropout": 0.1},
        },
        "training": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-2, **training},
    }
    return config_from_dict(data)


def parse_events(config, lines: list[str], first_line: int = 1) -> list[Event]:
    parser = LineParser(config.input)
    events = [parser.parse(line, first_line + i) for i, line in enumerate(lines)]
    assert all(isinstance(e, Event) for e in events), events
    return events


DAY = 86400


def window_events(config, window: int, n: int = 40) -> list[Event]:
    lines = synthetic_lines(n, start_time=window * DAY, seed=window)
    return parse_events(config, lines, first_line=1 + window * n)


def mean_scores(scores) -> list[tuple[float, float]]:
    return [(s.loss, s.loss_total) for s in scores]


# ---------------------------------------------------------------- tying through checkpoints


@pytest.mark.parametrize("kind", ["rnn", "bi-rnn", "gpt"])
def test_learner_checkpoint_keeps_tying_and_resumes_exactly(kind, tmp_path):
    config = tiny_config(kind)
    learner = WindowLearner(config)
    learner.train(0, window_events(config, 0))
    path = tmp_path / "ckpt" / "learner.pt"
    learner.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["learner.pt"]  # no temp files left

    loaded = WindowLearner.load(path, config)
    assert_tied(loaded.model)
    assert loaded.last_window == 0
    probe = window_events(config, 1)
    assert mean_scores(loaded.score(1, probe)) == mean_scores(learner.score(1, probe))

    # Resuming from the checkpoint repeats the uninterrupted run (optimizer state included).
    learner.train(1, probe)
    loaded.train(1, probe)
    assert_tied(loaded.model)
    later = window_events(config, 2)
    assert mean_scores(loaded.score(2, later)) == mean_scores(learner.score(2, later))
    for (name, a), b in zip(learner.model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_config_differences_name_each_setting_once():
    from pipeline.learner import config_differences

    saved = {"mask": {"patterns": ["a", "b" * 200, "c"]}, "kind": "word", "gone": 1}
    now = {"mask": {"patterns": ["a", "B", "c"]}, "kind": "word", "new": 2}
    assert config_differences(saved, now, "tokenizer") == [
        "tokenizer.gone is 1 there, not set here",
        f"tokenizer.mask.patterns[1] is {repr('b' * 200)[:70]}... (202 characters) there, 'B' here",
        "tokenizer.new is not set there, 2 here"]
    assert config_differences(3, 4, "seed") == ["seed is 3 there, 4 here"]


def test_checkpoint_of_an_earlier_release_with_rnn_layers_still_resumes(tmp_path):
    """model.rnn.layers was renamed n_layer: a checkpoint whose config says ``layers`` is the same
    configuration, not a foreign one; a different value still is."""
    config = tiny_config("rnn")
    learner = WindowLearner(config)
    learner.train(0, window_events(config, 0))
    path = tmp_path / "learner.pt"
    learner.save(path)
    data = load_checkpoint(path)
    rnn = data["config"]["model"]["rnn"]
    rnn["layers"] = rnn.pop("n_layer")
    save_checkpoint(path, **{k: v for k, v in data.items() if k != "format"})
    probe = window_events(config, 1)
    resumed = WindowLearner.load(path, config)
    assert mean_scores(resumed.score(1, probe)) == mean_scores(learner.score(1, probe))
    rnn["layers"] = 2
    save_checkpoint(path, **{k: v for k, v in data.items() if k != "format"})
    # the setting that differs, both ways (once: the whole saved section, no advice)
    with pytest.raises(CheckpointError, match=r"another model configuration: model\.rnn\.n_layer is 2 "
                                              r"there, 1 here; use the config it was made with"):
        WindowLearner.load(path, config)


# ---------------------------------------------------------------------------- 4. padding


@pytest.mark.parametrize("kind", ALL)
def test_scores_do_not_depend_on_batch_padding(kind):
    model = make_model(kind)
    events = random_events([3, 14, 6, 1, 10], seed=5)
    alone = [score_sequences(model, [ev])[0] for ev in events]
    for batch_size in (len(events), 2):
        together = score_sequences(model, events, batch_size=batch_size)
        assert len(together) == len(events)
        for ev, a, b in zip(events, alone, together):
            assert a[0] == pytest.approx(b[0], abs=1e-5)
            assert a[1] == pytest.approx(b[1], abs=1e-5)
            assert b[2] == pytest.approx(a[2], abs=1e-5)
            predicted = len(ev) - (2 if is_bidirectional(model) else 1)
            assert len(b[2]) == predicted
            assert b[1] == pytest.approx(sum(b[2]), abs=1e-5)
            assert b[0] == pytest.approx(b[1] / max(predicted, 1), abs=1e-6)
    # Control: the scores are about the events (not one constant).
    assert len({round(m, 4) for m, _, _ in alone if m > 0}) > 2
    assert model.training is False


def reference_pad_batch(seqs) -> torch.Tensor:
    """The per-row loop pad_batch replaced: its output is the contract."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def reference_scores(model, seqs, batch_size: int) -> list[tuple[float, float, tuple[float, ...]]]:
    """score_sequences before batches were read back with one ``.tolist()``: per-row indexing,
    over the batches it scores on the CPU (cut in length order, ties in input order)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    results = {}
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            rows = order[start : start + batch_size]
            losses, mask = token_losses(model, reference_pad_batch([seqs[i] for i in rows]))
            losses = losses * mask
            totals, counts = losses.sum(1).tolist(), mask.sum(1).clamp(min=1).tolist()
            for i, row, real, total, count in zip(rows, losses, mask, totals, counts):
                results[i] = (total / count, total, tuple(row[real].tolist()))
    return [results[i] for i in range(len(seqs))]


def test_pad_batch_equals_the_per_row_reference_on_ragged_input():
    rng = random.Random(3)
    for trial in range(30):
        rows = rng.choice([1, 2, 7, 64])
        seqs = [[rng.randrange(N_SPECIAL, 300) for _ in range(rng.choice([1, 2, rng.randrange(1, 90)]))]
                for _ in range(rows)]
        if trial % 3 == 0:
            seqs = [tuple(s) for s in seqs]  # any sequence of ints, as the docstring says
        got, want = pad_batch(seqs), reference_pad_batch(seqs)
        assert got.dtype == torch.long and got.shape == want.shape and torch.equal(got, want), trial
        assert (got[:, -1] != PAD).any()  # control: padded to the longest row, no wider


@pytest.mark.parametrize("ids", ["char", "word", "context", "numpy", "mixed", "late_big"])
def test_pad_batch_equals_the_reference_on_every_kind_of_id(ids):
    """pad_batch packs lists of ids in 0..255 through bytes; everything else must take the general
    path and give the same batch (bytes of an int64 array would be its raw memory, 8 ids a row id)."""
    rng = random.Random(7)
    seqs = [[rng.randrange(N_SPECIAL, 256) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    if ids == "word":
        seqs = [[rng.randrange(N_SPECIAL, 5000) for _ in s] for s in seqs]
    elif ids == "context":  # entity context: negative ids before the event
        seqs = [[-rng.randrange(1, 9), *s] for s in seqs]
    elif ids == "numpy":
        seqs = [np.array(s, dtype=np.int64) for s in seqs]
    elif ids == "mixed":
        seqs = [np.array(s, dtype=np.int64) if i % 2 else s for i, s in enumerate(seqs)]
    elif ids == "late_big":  # every id small but one in the last row
        seqs[-1][-1] = 256
    got, want = pad_batch(seqs), reference_pad_batch(seqs)
    assert got.dtype == torch.long and torch.equal(got, want)
    assert int(got.max()) == max(int(max(s)) for s in seqs)  # control: the ids, not their bytes


@pytest.mark.parametrize("kind", ALL)
def test_per_token_losses_off_gives_the_very_same_means_and_totals(kind):
    model = make_model(kind)
    events = random_events([1, 3, 14, 6, 0, 10, 2, 9, 5], seed=8)  # 0 and 1: nothing to predict
    for batch_size in (4, len(events)):
        want = reference_scores(model, events, batch_size)
        with_tokens = score_sequences(model, events, batch_size=batch_size)
        without = score_sequences(model, events, batch_size=batch_size, per_token=False)
        assert with_tokens == want  # exact floats, per-token lists included
        assert [(m, t) for m, t, _ in without] == [(m, t) for m, t, _ in want]
        assert all(per_token == () for _, _, per_token in without)
    assert sum(len(p) for _, _, p in want) > 30 and len({t for _, t, _ in want}) > 5  # control


@pytest.mark.parametrize("kind", ALL)
def test_training_loss_ignores_padding(kind):
    model = make_model(kind)
    short, longer = random_events([4, 11], seed=6)

    def loss_and_count(seq):
        idx, targets = model.inputs_and_targets(seq)
        with torch.no_grad():
            _, loss = model(idx, targets)
        return loss, int((targets != -1).sum())

    alone, n_short = loss_and_count(pad_batch([short]))
    padded_seq = pad_batch([short, longer])[:1]  # the short event, padded to the long length
    assert padded_seq.size(1) > len(short)
    padded, n_padded = loss_and_count(padded_seq)
    assert n_padded == n_short
    assert torch.allclose(padded, alone, atol=1e-5, rtol=0)

    long_loss, n_long = loss_and_count(pad_batch([longer]))
    both, n_both = loss_and_count(pad_batch([short, longer]))
    assert n_both == n_short + n_long
    expected = (alone * n_short + long_loss * n_long) / n_both  # mean over real tokens only
    assert torch.allclose(both, expected, atol=1e-5, rtol=0)

    # Control: scoring the padding as if PAD were a target would change the loss.
    idx, targets = model.inputs_and_targets(padded_seq)
    unmasked = targets.clone()
    unmasked[0, n_short + (1 if is_bidirectional(model) else 0) :] = PAD
    with torch.no_grad():
        logits, _ = model(idx)
    wrong = F.cross_entropy(logits.reshape(-1, V), unmasked.reshape(-1), ignore_index=-1)
    assert not torch.allclose(wrong, alone, atol=1e-4, rtol=0)

    # token_losses agrees with the model's own loss.
    losses, mask = token_losses(model, padded_seq)
    assert mask.sum() == n_short
    assert torch.allclose(losses[mask].mean(), alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- 5. learning


@pytest.mark.parametrize("kind", ["rnn", "gpt"])
def test_loss_falls_on_a_repetitive_log(kind):
    config = tiny_config(kind)
    tokenizer = CharTokenizer()
    parser = LineParser(config.input)

    def encode(lines):
        return [encode_event(tokenizer, parser.parse(line, 1).text_fields, 80) for line in lines]

    train = encode(synthetic_lines(300, 0, seed=10))
    held_out = encode(synthetic_lines(40, 5000, seed=11))
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(GPTConfig(vocab_size=260, block_size=82, n_layer=1, n_head=2, n_embd=32))
    else:
        model = RNNLM(RNNLMConfig(vocab_size=260, cell="lstm", hidden_size=32, n_layer=1))
    before = sum(m for m, _, _ in score_sequences(model, held_out)) / len(held_out)
    optimizer = make_optimizer(model, learning_rate=1e-2, weight_decay=0.0)
    train_loss = train_sequences(
        model, optimizer, train, epochs=3, batch_size=32, grad_clip=1.0, seed=0
    )
    after = sum(m for m, _, _ in score_sequences(model, held_out)) / len(held_out)
    assert before > 4.0  # an untrained model is near uniform over 260 ids (log 260 = 5.56)
    assert after < 0.5 * before, (before, after)
    assert train_loss < before


# ---------------------------------------------------------------------------- 6. determinism


def trained_scores(config) -> list[tuple[float, float]]:
    learner = WindowLearner(config)
    for window in (0, 1):
        learner.process_window(window, window_events(config, window))
    return mean_scores(learner.score(2, window_events(config, 2)))


@pytest.mark.parametrize("kind", ["rnn", "gpt"])
def test_same_seed_same_scores_other_seed_other_scores(kind):
    first = trained_scores(tiny_config(kind, seed=5))
    second = trained_scores(tiny_config(kind, seed=5))
    other = trained_scores(tiny_config(kind, seed=6))
    assert all(m is not None and m > 0 for m, _ in first)
    assert first == second  # exactly, not approximately
    assert first != other
    assert max(abs(a[0] - b[0]) for a, b in zip(first, other)) > 1e-4


# ---------------------------------------------------------------------------- 7. checkpoint safety


def test_checkpoint_roundtrip(tmp_path):
    path = tmp_path / "good.pt"
    save_checkpoint(path, weights=torch.arange(5.0), note="hello", nested={"a": [1, 2]})
    data = load_checkpoint(path)
    assert data["format"] == "salka-checkpoint-v1"
    assert torch.equal(data["weights"], torch.arange(5.0))
    assert data["note"] == "hello" and data["nested"] == {"a": [1, 2]}


def assert_refused(path):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_truncated_checkpoint_is_refused(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, weights=torch.randn(64, 64))
    data = good.read_bytes()
    for size in (len(data) // 2, len(data) - 10, 10):
        cut = tmp_path / f"cut{size}.pt"
        cut.write_bytes(data[:size])
        assert_refused(cut)
    assert load_checkpoint(good)["weights"].shape == (64, 64)  # control: the whole file loads


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    assert_refused(path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_refused(empty)


def test_torch_file_without_salka_format_is_refused(tmp_path):
    for name, obj in [
        ("plain.pt", {"model": {"w": torch.zeros(2)}}),
        ("wrong.pt", {"format": "other-v9", "model": {}}),
        ("list.pt", [1, 2, 3]),
    ]:
        path = tmp_path / name
        torch.save(obj, path)
        assert_refused(path)


MARKER = "salka-test-payload-ran"


class Payload:
    """Unpickling this calls print(MARKER): harmless, but visible if code runs."""

    def __reduce__(self):
        return (print, (MARKER,))


def test_pickled_code_is_refused_without_running(tmp_path, capsys):
    raw = pickle.dumps({"format": "salka-checkpoint-v1", "model": Payload()}, protocol=2)
    # Control: the payload is live; a plain unpickler runs it.
    pickle.loads(raw)
    assert MARKER in capsys.readouterr().out

    plain = tmp_path / "plain-pickle.pt"
    plain.write_bytes(raw)
    buffer = io.BytesIO()
    torch.save({"format": "salka-checkpoint-v1", "model": Payload()}, buffer)
    zipped = tmp_path / "torch-zip.pt"
    zipped.write_bytes(buffer.getvalue())
    for path in (plain, zipped):
        assert_refused(path)
    assert MARKER not in capsys.readouterr().out
