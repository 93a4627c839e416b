"""The optimizer follows nanoGPT (weight decay on matrices only, in two parameter groups) and
models are built through one registry (nn/training.py)."""

from __future__ import annotations

import random

import pytest
import torch

from nn.gpt import GPT, GPTConfig
from nn.rnn import RNNLM, RNNLMConfig
from nn.training import MODELS, build_model, make_optimizer, model_args_of, parameter_groups
from pipeline.config import config_from_dict
from pipeline.learner import WindowLearner
from pipeline.parsing import Event, LineParser

KINDS = ["gpt", "lstm", "bi-gru"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        return GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16))
    return RNNLM(RNNLMConfig(vocab_size=40, cell=kind.removeprefix("bi-"), hidden_size=16, n_layer=2,
                             bidirectional=kind.startswith("bi-")))


@pytest.mark.parametrize("kind", KINDS)
def test_weight_decay_shrinks_matrices_only(kind):
    """With zero gradients AdamW's update is only the decay, p *= 1 - lr * wd: matrices of the
    linear and recurrent layers shrink; biases, LayerNorm and the (tied) embeddings stay."""
    model = make_model(kind)
    optimizer = make_optimizer(model, learning_rate=0.1, weight_decay=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    decayed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    for name, p in model.named_parameters():
        if name in decayed:
            torch.testing.assert_close(p, before[name] * 0.95, rtol=0, atol=1e-7)
    embeddings = {"wte.weight", "wpe.weight"}
    expected = {name for name, p in model.named_parameters() if p.dim() >= 2} - embeddings
    assert decayed == expected
    assert expected and any(p.dim() == 1 for p in model.parameters())  # both groups non-empty
    assert {"wte.weight"} <= set(before) - decayed and not any("ln" in n or "bias" in n for n in decayed)


def test_parameter_groups_cover_every_parameter_once():
    model = make_model("gpt")
    groups = parameter_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


@pytest.mark.parametrize("kind", KINDS)
def test_registry_builds_and_names_every_model(kind):
    model = make_model(kind)
    args = model_args_of(model)
    assert MODELS[args["kind"]][1] is type(model)
    assert model_args_of(build_model(args)) == args
    with pytest.raises(ValueError, match="unknown model kind 'mamba'"):
        build_model({**args, "kind": "mamba"})
    with pytest.raises(ValueError, match="not a registered model"):
        model_args_of(torch.nn.Linear(2, 2))


def events(config, window: int, n: int = 30) -> list[Event]:
    rng = random.Random(window)
    parser = LineParser(config.input)
    lines = [f"{window * 86400 + i},U{rng.randint(1, 5)}@DOM1,U1@DOM1,C{rng.randint(1, 9)},C2,"
             f"Kerberos,Network,LogOn,Success" for i in range(n)]
    return [parser.parse(line, i + 1) for i, line in enumerate(lines)]


def test_checkpoint_with_a_single_group_optimizer_still_resumes_exactly(tmp_path):
    """A checkpoint written before the two groups holds one group over model.parameters(): it
    is mapped onto the groups, and (weight decay 0) training goes on exactly as it would have."""
    config = config_from_dict({"tokenizer": {"kind": "char", "max_tokens": 60},
                               "model": {"rnn": {"hidden_size": 16}},
                               "training": {"epochs": 1, "batch_size": 8}})
    old = WindowLearner(config)
    old._ensure_model(lambda: iter(events(config, 0)))
    old.optimizer = torch.optim.AdamW(old.model.parameters(), lr=config.training.learning_rate,
                                      weight_decay=0.0)  # the optimizer as it was built before
    old.train(0, events(config, 0))
    path = tmp_path / "old.pt"
    old.save(path)
    resumed = WindowLearner.load(path, config)
    assert len(resumed.optimizer.param_groups) == 2
    assert len(resumed.optimizer.state) == len(list(old.model.parameters()))  # moments kept
    old.train(1, events(config, 1))
    resumed.train(1, events(config, 1))
    for (name, a), b in zip(old.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
