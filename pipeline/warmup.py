"""Imports the trainer would otherwise pay for inside its first windows, paid at start instead.

Measured on a 2-core machine: the first optimizer torch builds imports torch._dynamo (~3 s):
seconds by which the first model, and so the first windows' scores, came later.
"""

from __future__ import annotations

import torch


def preload_training() -> None:
    """Do the lazy imports of the first training now: build a throwaway optimizer (what torch
    imports then)."""
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
