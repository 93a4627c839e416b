"""The hand-off of models from the trainer to the scorers: model files in a store, announced on
the compacted models topic (salka.ModelAnnouncement).

After training window u the trainer writes the model (weights, tokenizer state, no optimizer) to
the store, a directory or an fsspec URL, and announces it: trained through u, serving the windows
after u up to ``serves_through`` (every window between closed empty), with the file's SHA-256 and
the fingerprint of the configuration that made it. A scorer takes a model only when both match,
so it never scores with a damaged file or a model of another configuration; it waits for a good
announcement instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path

import torch

from nn.device import to_cpu
from nn.tokenizers import tokenizer_from_state
from nn.training import build_model, model_args_of
from pipeline.atomic import write_bytes_atomic
from pipeline.config import Config, ConfigError, compared_sections, config_to_dict, model_store_location
from pipeline.context import EntityHistory
from pipeline.learner import WindowLearner
from pipeline.outpaths import check_file_writable

log = logging.getLogger(__name__)
MODEL_FORMAT = "salka-model-v1"


class ModelRefused(ValueError):
    """A model file a scorer must not use: missing, damaged, or made by another configuration."""


def config_fingerprint(config: Config) -> str:
    """What decides a model's numbers besides its training data: the model, tokenizer and seed
    sections (as WindowLearner.load compares them for checkpoints)."""
    # Keys added since models were first announced count only when in use, so that a scorer
    # of this release takes the models an earlier trainer announced (a rolling upgrade, or the
    # announcements already on the compacted topic), and the reverse.
    chosen = compared_sections(config_to_dict(config))
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def model_bytes(learner: WindowLearner, fingerprint: str) -> bytes:
    """The model file: weights on the CPU, tokenizer state, the window it was trained through."""
    payload = {"format": MODEL_FORMAT, "fingerprint": fingerprint,
               "trained_through": learner.last_window,
               "model_args": model_args_of(learner.model),
               "model": to_cpu(learner.model.state_dict()),
               "tokenizer": learner.tokenizer.state_dict()}
    if learner.history is not None:  # model.context: the entity table is part of the model
        payload["history"] = learner.history.state_dict()
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def write_file(location: str, name: str, data: bytes) -> str:
    """Store ``data`` as ``name`` under ``location``; returns its URL (a path for a directory).
    A directory gets an atomic write; an object store writes whole objects anyway."""
    if not is_url(location):
        # Absolute: a scorer started in another directory reads the same file.
        path = Path(location.removeprefix("file://")).absolute() / name
        write_bytes_atomic(path, data)
        return str(path)
    import fsspec

    url = location.rstrip("/") + "/" + name
    try:
        with fsspec.open(url, "wb") as handle:
            handle.write(data)
    except (ImportError, ValueError) as exc:  # e.g. s3:// without s3fs installed
        raise ConfigError(f"streaming.model_store: cannot write {url}: {exc}") from exc
    return url


def check_writable(location: str) -> None:
    """`pipeline run trainer`'s start-up: a directory store that cannot be made or written is a
    config problem now, not when the first window closes (a day later, by default)."""
    if is_url(location):
        return
    path = Path(location.removeprefix("file://"))
    try:
        check_file_writable(path / "model.pt")  # as the command's own outputs are checked
    except OSError as exc:
        raise ConfigError(f"streaming.model_store: cannot write models to {path} "
                          f"({exc.strerror or exc}): set it to a directory the trainer can write, "
                          f"which the scorers can read") from None


def read_file(url: str) -> bytes:
    if not is_url(url):
        return Path(url.removeprefix("file://")).read_bytes()
    import fsspec

    with fsspec.open(url, "rb") as handle:
        return handle.read()


def publish(config: Config, learner: WindowLearner, serves_through: int) -> dict:
    """Write the learner's model to the store; the announcement to send (salka.ModelAnnouncement)."""
    fingerprint = config_fingerprint(config)
    data = model_bytes(learner, fingerprint)
    digest = hashlib.sha256(data).hexdigest()
    name = f"model-{learner.last_window:012d}-{digest[:12]}.pt"
    url = write_file(model_store_location(config.streaming), name, data)
    return announcement(learner.last_window, serves_through, url, digest, fingerprint)


def announcement(trained_through: int | None, serves_through: int, url: str | None = None,
                 sha256: str | None = None, fingerprint: str = "") -> dict:
    return {"trained_through": trained_through, "serves_through": serves_through, "url": url,
            "sha256": sha256, "fingerprint": fingerprint, "time_ms": int(time.time() * 1000)}


def announcement_key(trained_through: int | None) -> bytes:
    """The compaction key: one live announcement per model (its range may grow)."""
    return b"none" if trained_through is None else str(trained_through).encode()


def load(config: Config, record: dict) -> WindowLearner:
    """The announced model as a learner that only scores (no optimizer; with no model yet, every
    loss empty), checked; ModelRefused (one line: which file, what is wrong)."""
    through = record["trained_through"]
    ours = config_fingerprint(config)
    if record["fingerprint"] != ours:
        raise ModelRefused(f"model trained through window {through} was made by another "
                           f"configuration (fingerprint {record['fingerprint']}, ours {ours})")
    learner = WindowLearner(config)  # an empty learner scores with empty losses
    if through is None:
        return learner
    url = record["url"] or ""
    try:
        data = read_file(url)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelRefused(f"model {url} for window {through} cannot be read: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != record["sha256"]:
        raise ModelRefused(f"model {url} does not match its announced SHA-256 ({digest[:12]}... "
                           f"instead of {str(record['sha256'])[:12]}...): damaged or replaced")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        if payload.get("format") != MODEL_FORMAT or payload["fingerprint"] != ours \
                or payload["trained_through"] != through:
            raise ModelRefused(f"model {url} is not the announced salka model of window {through}")
        learner.tokenizer = tokenizer_from_state(payload["tokenizer"])
        learner.model = build_model(payload["model_args"])
        learner.model.load_state_dict(payload["model"])
        learner.model.to(learner.device)
        learner.history = EntityHistory.from_state(payload.get("history"), config)
    except ModelRefused:
        raise
    except Exception as exc:  # a file that hashes right but was written wrong, or not by us
        raise ModelRefused(f"model {url} cannot be loaded ({type(exc).__name__}: {exc})") from exc
    learner.last_window = through
    return learner
