"""Imports the trainer would otherwise pay for inside its first windows, paid at start instead.

Measured on a 2-core machine: the first optimizer torch builds imports torch._dynamo (~3 s), and
the exclusion pass's first ranking (training.exclude_top_fraction) imports scipy.stats (1-7 s):
seconds by which the first models, and so the first windows' scores, came later.
"""

from __future__ import annotations

import torch

from pipeline.config import Config


def preload_training(config: Config) -> None:
    """Do the lazy imports of the first training now: build a throwaway optimizer (what torch
    imports then), and import scipy.stats when the exclusion pass will rank with it."""
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    if config.training.exclude_top_fraction > 0:
        import scipy.stats  # noqa: F401  (pipeline/stats.py imports it where used)
