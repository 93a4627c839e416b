"""Helpers for tests against a real Kafka-protocol broker (embedded Tansu, or the external
cluster named by KAFKA_BOOTSTRAP_SERVERS)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import yaml

from pipeline.config import Config, config_from_dict, config_to_dict
from pipeline.kafka import create_topics, make_admin, make_consumer
from pipeline.serde import codec

SMALL_MODEL = {"model": {"rnn": {"hidden_size": 32}}}


def stream_config(tmp_path: Path, bootstrap: str, data: dict | None = None,
                  overrides: tuple[str, ...] = ()) -> tuple[Config, Path]:
    """A config with unique topics and groups and its own state/archive dirs, saved to a file
    that stage processes can read."""
    run = f"t{uuid.uuid4().hex[:10]}"
    base = {
        "kafka": {"bootstrap.servers": bootstrap},
        "topics": {name: f"{run}.{name}" for name in
                   ("raw", "tokens", "windows", "scores", "dead_letters", "late")},
        "streaming": {"group_prefix": run, "state_dir": str(tmp_path / "state"),
                      "archive_dir": str(tmp_path / "archive"), "commit_interval_seconds": 0.5},
    }
    merged = _merge(_merge(base, SMALL_MODEL), data or {})
    config = config_from_dict(merged, overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    create_topics(config)
    return config, path


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if nested else value
    return out


def delete_topics(config: Config) -> None:
    t = config.topics
    names = [t.raw, t.tokens, t.windows, t.scores, t.dead_letters, t.late]
    try:
        for future in make_admin(config).delete_topics(names, operation_timeout=10).values():
            future.result()
    except Exception:  # best effort: a leftover uniquely named test topic harms nobody
        pass


def read_records(config: Config, topic: str, expected: int | None = None, idle: float = 3.0,
                 timeout: float = 60.0) -> list[tuple[str, dict]]:
    """Decode every record of ``topic`` from the start: until ``expected`` records were read,
    or nothing new came for ``idle`` seconds."""
    consumer = make_consumer(config, f"reader-{uuid.uuid4().hex[:8]}")
    consumer.subscribe([topic])
    records: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout
    last_new = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume(500, timeout=0.2)
            for msg in batch:
                if not msg.error() and msg.value() is not None:
                    records.append(codec().decode(msg.value()))
                    last_new = time.monotonic()
            if expected is not None and len(records) >= expected:
                break
            if expected is None and records and time.monotonic() - last_new > idle:
                break
    finally:
        consumer.close()
    return records


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
