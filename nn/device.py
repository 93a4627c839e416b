"""Where the model runs and in what precision: the device, autocast, device-free checkpoints.

fp32 adds nothing to the forward pass (no autocast context at all), so a CPU fp32 run does the
very same operations as before devices existed and its numbers stay bit-identical. bf16 wraps
forward passes in ``torch.autocast``; the weights, the optimizer state and the loss reduction stay
fp32 (bf16 keeps fp32's exponent range, so no gradient scaling is needed).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


class DeviceUnavailable(ValueError):
    """The requested device does not exist on this machine (or in this build of torch)."""


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when torch sees a GPU, else CPU; ``cuda`` without a GPU is an error."""
    if requested not in DEVICES:
        raise DeviceUnavailable(f"unknown device {requested!r}; expected one of {', '.join(DEVICES)}")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if requested == "auto":
        return torch.device("cpu")
    why = ("this torch build has no CUDA support" if torch.version.cuda is None
           else "torch sees no CUDA GPU")
    raise DeviceUnavailable(f"cuda requested but {why} (torch {torch.__version__})")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward-pass context for ``precision``: nothing for fp32, bf16 autocast otherwise."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")


def to_cpu(state: Any, _copies: dict[tuple, torch.Tensor] | None = None) -> Any:
    """A (nested) state dict with every tensor on the CPU, so that a checkpoint written on a GPU
    loads anywhere. CPU tensors are returned as they are (a CPU checkpoint is byte-identical);
    a memory met twice (tied weights) is copied once, so it stays shared in the file."""
    copies = {} if _copies is None else _copies
    if isinstance(state, torch.Tensor):
        if state.device.type == "cpu":
            return state
        # state_dict() detaches every entry, so tied weights are two objects over one memory.
        key = (state.data_ptr(), tuple(state.shape), state.stride(), state.dtype)
        if key not in copies:
            copies[key] = state.detach().cpu()
        return copies[key]
    if isinstance(state, dict):  # module state_dicts are OrderedDicts with _metadata: keep both
        out = type(state)((key, to_cpu(value, copies)) for key, value in state.items())
        if hasattr(state, "_metadata"):
            out._metadata = state._metadata
        return out
    if type(state) in (list, tuple):
        return type(state)(to_cpu(value, copies) for value in state)
    return state
