"""RNN language model: LSTM / GRU / vanilla cells, residual layers, optional bidirectional.

Contract shared with ``nn.gpt.GPT``: ``inputs_and_targets(seq)`` aligns a padded batch of
BOS..EOS sequences into model input and targets (-1 = not predicted), and
``forward(idx, targets=None) -> (logits, loss)`` where ``logits[:, t]`` predicts ``targets[:, t]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from nn.context import next_token_targets, split_context
from nn.tokenizers import PAD

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


@dataclass
class RNNLMConfig:
    """The model's hyperparameters (the config file's ``model.rnn`` maps onto them)."""

    vocab_size: int = 260
    cell: str = "lstm"  # lstm | gru | rnn
    hidden_size: int = 128  # also the embedding size, so the output projection can be tied
    n_layer: int = 1
    bidirectional: bool = False  # forward state at t-1 + backward state at t+1 predict token t
    dropout: float = 0.0
    # Brown et al. 2018: none | fixed (one learned query) | syntax (one learned query per position)
    attention: str = "none"
    block_size: int = 0  # longest sequence (BOS..EOS); syntax attention has a query per position


class ResidualRNN(nn.Module):
    """A stack of one-directional recurrent layers, each adding its output to its input."""

    def __init__(self, config: RNNLMConfig):
        super().__init__()
        cell = CELLS[config.cell]
        self.layers = nn.ModuleList(
            cell(config.hidden_size, config.hidden_size, batch_first=True)
            for _ in range(config.n_layer)
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            out, _ = layer(x)  # (B, T, H)
            x = x + self.drop(out)
        return x


def reverse_each(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first ``lengths[b]`` steps in place, leaving the padding at the end.

    Applying it twice is the identity, so it also maps backward-stack outputs back into place.
    """
    B, T = x.shape[:2]
    steps = torch.arange(T, device=x.device).expand(B, T)
    index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    if x.dim() == 3:
        index = index[:, :, None].expand_as(x)
    return x.gather(1, index)


ATTENTION = ("none", "fixed", "syntax")


def attention_mask(lengths: torch.Tensor, T: int, bidirectional: bool) -> torch.Tensor:
    """(B, T, S) True where the state s may be attended to when predicting position t's target.

    One-directional: the states h_0..h_t (h_s has read idx[:s+1]; position t's target is
    idx[t+1]). Bidirectional: S = 2T, the forward states before t then the backward states after
    t (inside the event): exactly the states that never read token t."""
    steps = torch.arange(T, device=lengths.device)
    before = steps[None, :] <= steps[:, None]  # (T, T): s <= t
    if not bidirectional:
        return before.expand(lengths.size(0), T, T)
    forward = steps[None, :] < steps[:, None]  # s < t
    backward = (steps[None, None, :] > steps[None, :, None]) & (steps < lengths[:, None])[:, None, :]
    return torch.cat([forward.expand(lengths.size(0), T, T), backward], dim=-1)


class RecurrentAttention(nn.Module):
    """Brown et al. 2018: weights a_ts = softmax_s(q_t . tanh(W k_s)) over the allowed states,
    context c_t = sum_s a_ts k_s, and tanh(W_c [c_t; h_t]) replaces h_t. ``fixed``: one learned
    query for every position; ``syntax``: one per position (with a field-level word tokenizer,
    position = field, so the query learns which fields matter for predicting each field)."""

    def __init__(self, config: RNNLMConfig):
        super().__init__()
        if config.attention == "syntax" and config.block_size <= 0:
            raise ValueError("syntax attention needs block_size (the longest sequence) > 0")
        H = config.hidden_size
        self.key = nn.Linear(H, H)
        self.query = nn.Parameter(torch.zeros(config.block_size if config.attention == "syntax" else 1, H))
        self.combine = nn.Linear(2 * H, H)

    def forward(self, h: torch.Tensor, states: torch.Tensor, allowed: torch.Tensor):
        B, T, H = h.shape
        keys = torch.tanh(self.key(states))  # (B, S, H)
        if self.query.size(0) == 1:  # fixed: one score per state, the same for every t
            scores = (keys @ self.query[0]).unsqueeze(1).expand(B, T, -1)  # (B, T, S)
        else:  # syntax: position t's own query scores every state
            assert T <= self.query.size(0), f"sequence of {T} longer than block_size"
            scores = (keys @ self.query[:T].transpose(0, 1)).transpose(1, 2)  # (B, T, S)
        # A finite fill, not -inf: a row with no allowed state (nothing to read) must not give NaN
        # (also not in the backward pass); its weights are zeroed below.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = F.softmax(scores, dim=-1) * allowed.any(-1, keepdim=True)  # (B, T, S)
        context = weights @ states  # (B, T, H)
        return torch.tanh(self.combine(torch.cat([context, h], dim=-1))), weights


class RNNLM(nn.Module):
    # Scoring on a GPU keeps the batches in input order (nn/scoring.py): there an LSTM's scoring
    # waits on the host's work per batch, and cutting batches in length order added more host
    # work than its shorter batches saved the GPU (H200, char LSTM d128, batch 4096, bf16:
    # 1.33M events/s in input order against 1.10M-1.13M in length order).
    gpu_scores_in_length_order = False

    def __init__(self, config: RNNLMConfig):
        super().__init__()
        if config.cell not in CELLS:
            raise ValueError(f"unknown RNN cell {config.cell!r}; expected one of {sorted(CELLS)}")
        if config.attention not in ATTENTION:
            raise ValueError(f"unknown RNN attention {config.attention!r}; expected one of {ATTENTION}")
        self.config = config
        H = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, H, padding_idx=PAD)
        self.drop = nn.Dropout(config.dropout)
        self.forward_rnn = ResidualRNN(config)
        if config.bidirectional:
            self.backward_rnn = ResidualRNN(config)
            self.merge = nn.Linear(2 * H, H)
        if config.attention != "none":  # only then: no new parameters (or RNG draws) when off
            self.attention = RecurrentAttention(config)
        self.ln_f = nn.LayerNorm(H)
        self.lm_head = nn.Linear(H, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one Parameter, two uses
        # Small embeddings: with tying they are also the output weights, and N(0, 1) would start
        # every prediction far from uniform (initial loss ~100 nats instead of ~log V).
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)

    def inputs_and_targets(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """seq: (B, T) BOS..EOS ids, right-padded with PAD; entity context (negative ids,
        nn/context.py) is read but never a target."""
        if not self.config.bidirectional:
            return next_token_targets(seq)
        # Bidirectional: predict the tokens strictly between BOS and EOS. Position n-1 (EOS) and
        # the padding are masked because their backward state would have read past the event.
        # Context comes before the event, so the backward state at t+1 never reads it (nor t).
        seq, context = split_context(seq)
        lengths = (seq != PAD).sum(1)
        steps = torch.arange(seq.size(1), device=seq.device)
        inside = (steps[None, :] >= 1) & (steps[None, :] < lengths[:, None] - 1) & ~context
        return seq, seq.masked_fill(~inside, -1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                return_attention: bool = False):
        """``return_attention``: also return the attention weights (B, T, S), row t over the
        states ``attention_mask`` allows for position t (None without attention)."""
        x = self.drop(self.wte(idx))  # (B, T, H)
        h = self.forward_rnn(x)  # h[:, t] has read idx[:, :t+1]
        states = h
        if self.config.bidirectional:
            lengths = (idx != PAD).sum(1)
            back = reverse_each(self.backward_rnn(reverse_each(x, lengths)), lengths)
            # back[:, t] has read idx[:, t:n]. Token t sees h[t-1] and back[t+1], never itself.
            zero = h.new_zeros(h.size(0), 1, h.size(2))
            before = torch.cat([zero, h[:, :-1]], dim=1)
            after = torch.cat([back[:, 1:], zero], dim=1)
            states = torch.cat([h, back], dim=1)  # (B, 2T, H): forward, then backward states
            h = self.merge(torch.cat([before, after], dim=-1))
        weights = None
        if self.config.attention != "none":
            allowed = attention_mask((idx != PAD).sum(1), idx.size(1), self.config.bidirectional)
            h, weights = self.attention(h, states, allowed)
        logits = self.lm_head(self.ln_f(h))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        if return_attention:
            return logits, loss, weights
        return logits, loss


@torch.no_grad()
def attention_weights(model: RNNLM, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The explanation of each prediction: ``(weights, losses, targets)`` for a padded BOS..EOS
    batch ``seq``, in eval mode. ``weights[b, t, j]``: how much predicting ``targets[b, t]`` read
    the state at input position j (B, T, T; the forward and backward state of a bidirectional
    model at j summed: they are never both allowed); ``losses``: per-token cross-entropy (nats,
    0 where ``targets`` is -1)."""
    if getattr(model.config, "attention", "none") == "none":
        raise ValueError("the model has no attention (model.rnn.attention: none)")
    was_training = model.training
    model.eval()
    try:
        idx, targets = model.inputs_and_targets(seq)
        logits, _, weights = model(idx, return_attention=True)
    finally:
        model.train(was_training)
    T = idx.size(1)
    if weights.size(-1) == 2 * T:  # bidirectional: forward states, then backward states
        weights = weights[..., :T] + weights[..., T:]
    losses = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                             ignore_index=-1, reduction="none").view(targets.shape)
    return weights.float(), losses, targets
