"""RNN attention (Brown et al. 2018, model.rnn.attention): off changes nothing, on keeps causality
and tying, the weights are a distribution over the allowed states, config and checkpoints.
Tiny models only (CPU, a few seconds in all)."""

from __future__ import annotations

import pytest
import torch
from test_models import assert_causal

from nn.rnn import RNNLM, RNNLMConfig, attention_mask, attention_weights
from nn.scoring import pad_batch, score_sequences
from nn.tokenizers import BOS, EOS, N_SPECIAL, PAD
from nn.training import build_model, load_checkpoint, make_optimizer, model_args_of, save_checkpoint
from pipeline.config import ConfigError, config_from_dict
from pipeline.learner import WindowLearner
from pipeline.modelspec import model_args_for

V = 48
H = 16
BLOCK = 32
ATTENTION = ["fixed", "syntax"]
CELLS = ["lstm", "gru"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(cell: str, attention: str, bidirectional: bool = False, seed: int = 0,
               n_layer: int = 2) -> RNNLM:
    torch.manual_seed(seed)
    model = RNNLM(RNNLMConfig(V, cell, H, n_layer, bidirectional=bidirectional,
                              attention=attention, block_size=BLOCK))
    if attention != "none":
        # Trained-looking queries: the zero start attends uniformly, which would hide a mask bug
        # behind equal weights.
        with torch.no_grad():
            model.attention.query.normal_(0.0, 1.0)
    return model.eval()


def random_events(lengths, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[BOS, *torch.randint(N_SPECIAL, V, (n,), generator=g).tolist(), EOS] for n in lengths]


def other_id(i: int) -> int:
    return (i - N_SPECIAL + 1) % (V - N_SPECIAL) + N_SPECIAL


def logits_of(model, seq):
    idx, targets = model.inputs_and_targets(seq)
    with torch.no_grad():
        logits, _ = model(idx)
    return logits, targets


# ------------------------------------------------------------------------- off: byte-identical


@pytest.mark.parametrize("bidirectional", [False, True])
def test_attention_none_creates_nothing_and_draws_nothing(bidirectional):
    """attention: none (and block_size, which only syntax reads) builds today's model: the same
    parameters, the same random draws, the same logits, bit for bit."""
    def build(**extra):
        torch.manual_seed(3)
        model = RNNLM(RNNLMConfig(V, "lstm", H, 2, bidirectional=bidirectional, **extra))
        return model, torch.rand(4)  # the generator's state after construction

    today, after_today = build()
    off, after_off = build(attention="none", block_size=BLOCK)
    on, after_on = build(attention="fixed", block_size=BLOCK)
    assert not hasattr(off, "attention")
    assert torch.equal(after_today, after_off)
    assert list(off.state_dict()) == list(today.state_dict())
    for (name, a), b in zip(today.state_dict().items(), off.state_dict().values()):
        assert torch.equal(a, b), name
    seq = pad_batch(random_events([5, 9]))
    a, _ = logits_of(today.eval(), seq)
    b, _ = logits_of(off.eval(), seq)
    assert torch.equal(a, b)
    # Controls: attention on does add parameters and consume random draws.
    assert any(n.startswith("attention.") for n in on.state_dict())
    assert not torch.equal(after_today, after_on)


def test_config_default_is_syntax_and_model_args_carry_it():
    """syntax is the default: benchmarks/detect.py chose it (README, Entity-normalised scores)."""
    config = config_from_dict({})
    assert config.model.rnn.attention == "syntax"
    none = config_from_dict({"model": {"rnn": {"attention": "none"}}})
    args = model_args_for(none, vocab_size=100)
    assert args["attention"] == "none"
    assert args["block_size"] == config.tokenizer.max_tokens + 2
    model = build_model(model_args_for(config, vocab_size=100))
    assert model.attention.query.shape == (config.tokenizer.max_tokens + 2, 128)  # one per position


@pytest.mark.parametrize("value", ["semantic", "yes", 1])
def test_unknown_attention_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^model\.rnn\.attention: "):
        config_from_dict({"model": {"rnn": {"attention": value}}})


# ----------------------------------------------------------------------------- causality


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("cell", CELLS)
def test_unidirectional_attention_is_causal(cell, attention):
    """Changing token j never changes the logits at positions < j; it changes position j and,
    through the attention context and the recurrence, the positions after it."""
    assert_causal(make_model(cell, attention), V)


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("cell", CELLS)
def test_bidirectional_attention_never_reads_the_target(cell, attention):
    """For every real token t of a padded batch, the bidirectional model's prediction of t does
    not move when t changes (the attended states exclude every state that read t), while its
    neighbours' predictions do; other events in the batch never move."""
    model = make_model(cell, attention, bidirectional=True)
    seq = pad_batch(random_events([6, 11, 9], seed=3))
    base, targets = logits_of(model, seq)
    lengths = (seq != PAD).sum(1).tolist()
    for b, n in enumerate(lengths):
        for t in range(1, n - 1):
            changed = seq.clone()
            changed[b, t] = other_id(int(seq[b, t]))
            out, new_targets = logits_of(model, changed)
            assert (new_targets != targets).nonzero().tolist() == [[b, t]]
            assert torch.allclose(out[b, t], base[b, t], atol=1e-6, rtol=0), (b, t)
            others = [r for r in range(len(lengths)) if r != b]
            assert torch.allclose(out[others], base[others], atol=1e-6, rtol=0), (b, t)
            diff = (out[b] - base[b]).abs().amax(dim=-1)
            for neighbour in (t - 1, t + 1):
                if 1 <= neighbour <= n - 2:  # control
                    assert diff[neighbour] > 1e-4, (b, t, neighbour)


def test_the_mask_is_what_the_causality_tests_rely_on():
    """Control for the tests above: a mask that lets position t read its own target's state
    breaks the bidirectional test's invariant (so the test can fail)."""
    model = make_model("lstm", "fixed", bidirectional=True)
    seq = pad_batch(random_events([7], seed=2))
    idx, _ = model.inputs_and_targets(seq)
    T = idx.size(1)
    leaky = attention_mask((idx != PAD).sum(1), T, True).clone()
    leaky[:, :, :T] |= torch.eye(T, dtype=torch.bool)  # forward state t has read token t

    def logits(ids, mask):
        x = model.wte(ids)
        h = model.forward_rnn(x)
        from nn.rnn import reverse_each
        lengths = (ids != PAD).sum(1)
        back = reverse_each(model.backward_rnn(reverse_each(x, lengths)), lengths)
        zero = h.new_zeros(h.size(0), 1, h.size(2))
        merged = model.merge(torch.cat([torch.cat([zero, h[:, :-1]], 1),
                                        torch.cat([back[:, 1:], zero], 1)], dim=-1))
        out, _ = model.attention(merged, torch.cat([h, back], 1), mask)
        return model.lm_head(model.ln_f(out))

    with torch.no_grad():
        changed = idx.clone()
        changed[0, 3] = other_id(int(idx[0, 3]))
        honest = attention_mask((idx != PAD).sum(1), T, True)
        assert torch.allclose(logits(idx, honest)[0, 3], logits(changed, honest)[0, 3], atol=1e-6)
        assert torch.allclose(logits(idx, honest), model(idx)[0], atol=1e-6)  # the same computation
        assert not torch.allclose(logits(idx, leaky)[0, 3], logits(changed, leaky)[0, 3], atol=1e-4)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("attention", ATTENTION)
def test_scores_do_not_depend_on_batch_padding(attention, bidirectional):
    model = make_model("lstm", attention, bidirectional)
    events = random_events([3, 14, 6, 1, 10], seed=5)
    alone = [score_sequences(model, [ev])[0] for ev in events]
    together = score_sequences(model, events, batch_size=len(events))
    for a, b in zip(alone, together):
        assert a[0] == pytest.approx(b[0], abs=1e-5)
        assert b[2] == pytest.approx(a[2], abs=1e-5)
    assert len({round(m, 4) for m, _, _ in alone if m > 0}) > 2  # control


# ------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("attention", ATTENTION)
def test_weights_are_a_distribution_over_the_allowed_states(attention, bidirectional):
    model = make_model("gru", attention, bidirectional)
    events = random_events([4, 9, 6], seed=7)
    seq = pad_batch(events)
    weights, losses, targets = attention_weights(model, seq)
    B, T = targets.shape
    assert weights.shape == (B, T, T)
    real = targets != -1
    assert torch.allclose(weights[real].sum(-1), torch.ones(int(real.sum())), atol=1e-5)
    for b, ev in enumerate(events):
        n = len(ev)
        for t in range(T):
            if targets[b, t] == -1:
                continue
            if bidirectional:  # never the target's own position, nothing past the event
                assert weights[b, t, t] == 0 and weights[b, t, n:].sum() == 0
            else:  # only the states that read up to the input token t
                assert weights[b, t, t + 1 :].sum() == 0
    # The same losses score_sequences reports, in the same order.
    per_token = [p for _, _, p in score_sequences(model, events)]
    assert [pytest.approx(list(p), abs=1e-5) for p in per_token] == [
        losses[b][real[b]].tolist() for b in range(B)]
    if attention == "syntax":  # control: a query per position gives different rows
        assert not torch.allclose(weights[1, 2, :2], weights[1, 3, :2] / weights[1, 3, :2].sum()
                                  * weights[1, 2, :2].sum(), atol=1e-3)
    assert model.training is False


def test_attention_weights_refuses_a_model_without_attention():
    with pytest.raises(ValueError, match="no attention"):
        attention_weights(make_model("lstm", "none"), pad_batch(random_events([3])))


# ------------------------------------------------------------------------- tying, training


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("attention", ATTENTION)
def test_tying_survives_attention_training_and_rebuild(attention, bidirectional):
    model = make_model("lstm", attention, bidirectional).train()
    assert model.lm_head.weight is model.wte.weight
    optimizer = make_optimizer(model, learning_rate=1e-2, weight_decay=0.1)
    query = model.attention.query.detach().clone()
    idx, targets = model.inputs_and_targets(pad_batch(random_events([5, 8])))
    _, loss = model(idx, targets)
    loss.backward()
    optimizer.step()
    assert model.lm_head.weight is model.wte.weight
    assert not torch.equal(model.attention.query, query)  # the attention is trained
    clone = build_model(model_args_of(model))
    clone.load_state_dict(model.state_dict())
    assert clone.lm_head.weight is clone.wte.weight
    a, _ = logits_of(model.eval(), pad_batch(random_events([6])))
    b, _ = logits_of(clone.eval(), pad_batch(random_events([6])))
    assert torch.equal(a, b)


def test_syntax_attention_fits_the_longest_event():
    """block_size is max_tokens + 2: a truncated longest event fits the syntax queries."""
    config = config_from_dict({"tokenizer": {"kind": "char", "max_tokens": 12},
                               "model": {"rnn": {"hidden_size": 8, "attention": "syntax"}}})
    model = build_model(model_args_for(config, vocab_size=260))
    longest = [BOS, *range(N_SPECIAL, N_SPECIAL + 12), EOS]
    (mean, _, per_token), = score_sequences(model, [longest])
    assert len(per_token) == 13 and mean > 0
    with pytest.raises(AssertionError, match="longer than block_size"):  # control: the limit is real
        score_sequences(model, [longest + [EOS, EOS]])


# ------------------------------------------------------------------------------ checkpoints


def tiny_config(attention: str):
    return config_from_dict({
        "seed": 3, "tokenizer": {"kind": "char", "max_tokens": 60},
        "model": {"rnn": {"hidden_size": 8, "attention": attention}},
        "training": {"epochs": 1, "batch_size": 16},
    })


def window_events(config, window: int):
    from pipeline.parsing import LineParser

    parser = LineParser(config.input)
    lines = [f"{window * 86400 + i},U{i % 3}@D,U{i % 3}@D,C{i % 5},C{i % 4},NTLM,Network,LogOn,Success"
             for i in range(30)]
    return [parser.parse(line, 1 + window * 30 + i) for i, line in enumerate(lines)]


def test_checkpoint_from_before_attention_resumes_as_none_and_refuses_attention_on(tmp_path):
    config = tiny_config("none")
    learner = WindowLearner(config)
    learner.train(0, window_events(config, 0))
    path = tmp_path / "learner.pt"
    learner.save(path)
    data = load_checkpoint(path)
    del data["config"]["model"]["rnn"]["attention"]  # as a checkpoint of an earlier release
    for key in ("attention", "block_size"):
        del data["model_args"][key]
    save_checkpoint(path, **{k: v for k, v in data.items() if k != "format"})
    probe = window_events(config, 1)
    resumed = WindowLearner.load(path, config)
    assert [s.loss for s in resumed.score(1, probe)] == [s.loss for s in learner.score(1, probe)]
    from nn.training import CheckpointError

    with pytest.raises(CheckpointError, match="another model configuration"):
        WindowLearner.load(path, tiny_config("fixed"))


@pytest.mark.parametrize("attention", ATTENTION)
def test_learner_with_attention_checkpoints_and_resumes_exactly(attention, tmp_path):
    config = tiny_config(attention)
    learner = WindowLearner(config)
    learner.train(0, window_events(config, 0))
    path = tmp_path / "learner.pt"
    learner.save(path)
    loaded = WindowLearner.load(path, config)
    assert loaded.model.config.attention == attention
    probe = window_events(config, 1)
    scores = [s.loss for s in learner.score(1, probe)]
    assert [s.loss for s in loaded.score(1, probe)] == scores
    assert len(set(scores)) > 1
    with pytest.raises(Exception, match="another model configuration"):
        WindowLearner.load(path, tiny_config("none"))


# ------------------------------------------------------------------------------ the report


@pytest.mark.slow
def test_report_shows_attention_from_a_replay_model_and_refuses_one_without(tmp_path):
    """replay --save-model, then report --model: the top events carry the attention of their
    worst-predicted token (weights of the readable states summing to 1); mistakes are one line."""
    import re

    from tests.helpers import TINY_MODEL, invoke, one_error_line

    log, labels = tmp_path / "auth.csv", tmp_path / "labels.csv"
    assert invoke("generate", "--output", log, "--labels", labels, "--users", 6, "--computers", 16,
                  "--days", 2, "--events-per-day", 150, "--redteam-events", 4).exit_code == 0
    runs = {}
    for attention in ("fixed", "none"):
        scores, model = tmp_path / f"{attention}.csv.gz", tmp_path / f"{attention}.pt"
        result = invoke("replay", *TINY_MODEL, "--set", f"model.rnn.attention={attention}",
                        "--input", log, "--output", scores, "--save-model", model)
        assert result.exit_code == 0, result.output
        runs[attention] = scores, model
    scores, model = runs["fixed"]
    html = tmp_path / "report.html"
    fixed = ["--set", "model.rnn.attention=fixed", *TINY_MODEL]
    result = invoke("report", *fixed, "--scores", scores, "--input", log, "--model", model,
                    "-n", 5, "--output", html)
    assert result.exit_code == 0, result.output
    page = html.read_text()
    blocks = re.findall(r'<div class="event attention">(.*?)</div>', page, re.S)
    assert len(blocks) == 5  # every top event explained
    for block in blocks:
        weights = [float(w) for w in re.findall(r"weight ([0-9.]+)", block)]
        assert weights and sum(weights) == pytest.approx(1.0, abs=0.01)
    assert "model trained through window 1," in page  # 2 days: windows 0 and 1
    # Without --model: no attention blocks (the report is as before).
    plain = tmp_path / "plain.html"
    assert invoke("report", *fixed, "--scores", scores, "--input", log,
                  "--output", plain).exit_code == 0
    assert 'class="event attention"' not in plain.read_text()
    # Mistakes: no --input; a model without attention; a config the checkpoint was not made with.
    line = one_error_line(invoke("report", *fixed, "--scores", scores, "--model", model,
                                 "--output", html), 2)
    assert "--model needs --input" in line
    none_scores, none_model = runs["none"]
    line = one_error_line(invoke("report", "--set", "model.rnn.attention=none", *TINY_MODEL,
                                 "--scores", none_scores, "--input", log, "--model", none_model,
                                 "--output", html), 1)
    assert "no attention" in line and str(none_model) in line
    line = one_error_line(invoke("report", *TINY_MODEL, "--scores", scores, "--input", log,
                                 "--model", model, "--output", html), 1)
    assert "another model configuration" in line
