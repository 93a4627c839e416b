"""The GPU training loop's check for a batch with nothing to predict (nn/training.py has_targets)
agrees with the whole-batch check the CPU loop makes, whatever the batch holds."""

from __future__ import annotations

import random

import pytest
import torch

from nn.scoring import pad_batch
from nn.tokenizers import BOS, EOS
from nn.training import build_model, has_targets


@pytest.mark.parametrize("bidirectional", [False, True])
def test_has_targets_agrees_with_the_whole_batch_check(bidirectional):
    torch.manual_seed(0)
    model = build_model({"kind": "rnn", "vocab_size": 40, "cell": "lstm", "hidden_size": 8,
                         "n_layer": 1, "bidirectional": bidirectional})
    rng = random.Random(2)
    answers = set()
    for _ in range(60):
        # BOS EOS rows have nothing inside to predict for the bidirectional model.
        batch = pad_batch([[BOS, *([7] * rng.choice([0, 0, 0, 1, 3])), EOS]
                           for _ in range(rng.randrange(1, 5))])
        whole = bool((model.inputs_and_targets(batch)[1] != -1).any())
        assert has_targets(model, batch) == whole, batch
        answers.add(whole)
    assert answers == ({True, False} if bidirectional else {True})  # both outcomes were tried
