"""Where and how torch computes for salka: device, precision, batch sizes and threads.

The config says what the user wants (``training.device / precision / threads``); this module turns
it into torch settings once, at start-up, so that a wrong request fails before any work is done
(``ConfigError`` naming the key) and the numeric code in nn/ only receives a ``torch.device``.

Threads. torch's default is one intra-op thread per core, and its OpenMP workers spin while they
wait. When several torch processes share a host (a trainer and scorers, or a replay beside them),
those spinning threads fight over the cores: a 4,274-event replay beside two other torch processes
on a 2-core machine took 202.6 s with the default and 13.5 s with one thread each (issue 13). So
the default policy (``training.threads: 0``) is one thread, for a pipeline stage (one of several
torch processes by design) and for an offline replay alike. A policy that read the host's load
would make the thread count, and with it the last bits of the floating-point sums, depend on what
else ran at that moment; one thread keeps every run of the same input byte-identical. Set
``training.threads`` for a replay on an idle many-core host. benchmarks/threads.py measures it.
``OMP_NUM_THREADS``, when the user sets it, wins over the config and the policy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import torch

from nn.device import DeviceUnavailable, resolve_device
from pipeline.config import ConfigError, TrainingConfig

log = logging.getLogger(__name__)

def training_device(training: TrainingConfig) -> torch.device:
    """The device ``training.device`` asks for; ConfigError (one line, the key) when absent."""
    try:
        device = resolve_device(training.device)
    except DeviceUnavailable as exc:
        raise ConfigError(f"training.device: {exc}; set training.device to cpu or auto "
                          "(--set training.device=cpu), or run where a CUDA GPU is visible") from exc
    if device.type == "cuda" and training.precision == "fp32":
        # fp32 means fp32: cuDNN's default TF32 (10-bit mantissa) for the LSTM made a scorer's
        # losses differ from replay's by more than 1e-5, depending on how events were batched.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return device


def score_batch_size(training: TrainingConfig, device: torch.device) -> int:
    """Events per scoring forward pass: GPUs want big batches, CPUs the usual size."""
    return training.score_batch_size_gpu if device.type == "cuda" else training.score_batch_size


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, as taskset or a container sets it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(role: str) -> int:
    """The default policy (module docstring): one thread whatever the ``role`` ("stage" or
    "replay"), so that results never depend on the host's load."""
    return 1


def thread_count(requested: int, role: str, environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """(threads, why): OMP_NUM_THREADS when set to a positive integer, else ``requested`` when
    not 0, else the default policy for ``role``."""
    environ = os.environ if environ is None else environ
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    # ASCII and short: "²".isdigit() and so are 5,000 digits, but int() refuses both
    if omp.isascii() and omp.isdigit() and len(omp) <= 6 and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    if requested > 0:
        return requested, "training.threads"
    return default_threads(role), f"default for {role}"


def configure_threads(requested: int, role: str, environ: Mapping[str, str] | None = None) -> int:
    """Set torch's intra- and inter-op threads for this process; the intra-op count chosen.

    The inter-op pool can only be sized once per process and before any parallel work: a second
    call (a test, or a library that already ran torch) keeps the pool it has and says so in the
    debug log; the intra-op count can change at any time."""
    threads, why = thread_count(requested, role, environ)
    if requested and why == "OMP_NUM_THREADS" and requested != threads:
        log.info("training.threads %d ignored: OMP_NUM_THREADS=%d is set and wins", requested, threads)
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError as exc:  # already sized, or parallel work has started
            log.debug("inter-op threads stay %d: %s", torch.get_num_interop_threads(), exc)
    log.debug("torch threads: %d intra-op, %d inter-op (%s)", torch.get_num_threads(),
              torch.get_num_interop_threads(), why)
    return threads


def start_torch(training: TrainingConfig, role: str) -> torch.device:
    """Start-up of a process that runs models: check the device (ConfigError when it is not
    there), then size the thread pools before any torch work starts. The device is returned."""
    device = training_device(training)
    configure_threads(training.threads, role)
    return device
