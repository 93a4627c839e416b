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


class RNNLM(nn.Module):
    def __init__(self, config: RNNLMConfig):
        super().__init__()
        if config.cell not in CELLS:
            raise ValueError(f"unknown RNN cell {config.cell!r}; expected one of {sorted(CELLS)}")
        self.config = config
        H = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, H, padding_idx=PAD)
        self.drop = nn.Dropout(config.dropout)
        self.forward_rnn = ResidualRNN(config)
        if config.bidirectional:
            self.backward_rnn = ResidualRNN(config)
            self.merge = nn.Linear(2 * H, H)
        self.ln_f = nn.LayerNorm(H)
        self.lm_head = nn.Linear(H, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one Parameter, two uses
        # Small embeddings: with tying they are also the output weights, and N(0, 1) would start
        # every prediction far from uniform (initial loss ~100 nats instead of ~log V).
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)

    def inputs_and_targets(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """seq: (B, T) BOS..EOS ids, right-padded with PAD."""
        if not self.config.bidirectional:
            targets = seq[:, 1:].masked_fill(seq[:, 1:] == PAD, -1)
            return seq[:, :-1], targets
        # Bidirectional: predict the tokens strictly between BOS and EOS. Position n-1 (EOS) and
        # the padding are masked because their backward state would have read past the event.
        lengths = (seq != PAD).sum(1)
        steps = torch.arange(seq.size(1), device=seq.device)
        inside = (steps[None, :] >= 1) & (steps[None, :] < lengths[:, None] - 1)
        return seq, seq.masked_fill(~inside, -1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        x = self.drop(self.wte(idx))  # (B, T, H)
        h = self.forward_rnn(x)  # h[:, t] has read idx[:, :t+1]
        if self.config.bidirectional:
            lengths = (idx != PAD).sum(1)
            back = reverse_each(self.backward_rnn(reverse_each(x, lengths)), lengths)
            # back[:, t] has read idx[:, t:n]. Token t sees h[t-1] and back[t+1], never itself.
            zero = h.new_zeros(h.size(0), 1, h.size(2))
            before = torch.cat([zero, h[:, :-1]], dim=1)
            after = torch.cat([back[:, 1:], zero], dim=1)
            h = self.merge(torch.cat([before, after], dim=-1))
        logits = self.lm_head(self.ln_f(h))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1
            )
        return logits, loss
