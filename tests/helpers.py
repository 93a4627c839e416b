"""Helpers the tests import (fixtures stay in conftest.py): paths, sample lines, and what tests
against a real Kafka-protocol broker need (embedded Tansu, or the external cluster named by
KAFKA_BOOTSTRAP_SERVERS)."""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import yaml

from pipeline.config import Config, config_from_dict, config_to_dict
from pipeline.kafka import create_topics, make_admin, topic_plan
from pipeline.scorefile import write_rows
from pipeline.serde import codec
from pipeline.topicread import TopicReader

ROOT = Path(__file__).resolve().parent.parent
LANL_LINE = "3600,U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success"
SMALL_MODEL = {"model": {"rnn": {"hidden_size": 32}}}
TOPIC_ROLES = ("raw", "tokens", "windows", "scores", "dead_letters", "late", "alerts", "models",
               "sessions")
# Configs whose topics stream_config created during the current test: conftest.py deletes them
# when the test ends, whatever happened, so nothing is left on an external cluster.
created: list[Config] = []


def key_comments(path: Path) -> dict[str, bool]:
    """Every key path of a YAML file (a.b.c) -> whether a comment line comes right before it."""
    stack: list[tuple[int, str]] = []
    commented: dict[str, bool] = {}
    previous = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^( *)([A-Za-z_]+):", line)
        if match:
            indent, name = len(match.group(1)), match.group(2)
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, name))
            commented[".".join(n for _, n in stack)] = previous.lstrip().startswith("#")
        if line.strip():
            previous = line
    return commented


def unique_prefix() -> str:
    """A topic and group prefix unique to this call, naming the running test (so a leftover on
    an external cluster says where it came from)."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
    name = re.sub(r"[^A-Za-z0-9]+", "-", current.removeprefix("test_"))[:40].strip("-")
    return f"t-{name}-{uuid.uuid4().hex[:10]}" if name else f"t{uuid.uuid4().hex[:10]}"


def stream_config(tmp_path: Path, bootstrap: str, data: dict | None = None,
                  overrides: tuple[str, ...] = ()) -> tuple[Config, Path]:
    """A config with topics and groups unique to this call (every topic salka uses) and its own
    state/archive dirs, saved to a file that stage processes can read."""
    run = unique_prefix()
    base = {
        "kafka": {"bootstrap.servers": bootstrap},
        "topics": {name: f"{run}.{name}" for name in TOPIC_ROLES},
        "streaming": {"group_prefix": run, "state_dir": str(tmp_path / "state"),
                      "archive_dir": str(tmp_path / "archive"), "commit_interval_seconds": 0.5},
    }
    merged = _merge(_merge(base, SMALL_MODEL), data or {})
    config = config_from_dict(merged, overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    created.append(config)
    create_topics(config)
    return config, path


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if nested else value
    return out


def delete_topics(config: Config) -> None:
    """Delete every topic of ``config`` (best effort: a leftover uniquely named test topic harms
    nobody, and a test's broker may be gone)."""
    admin = make_admin(config)  # held until the futures resolve: a freed client cancels them
    try:
        futures = admin.delete_topics(list(topic_plan(config)), operation_timeout=10,
                                      request_timeout=15)
        for future in futures.values():
            future.result()
    except Exception:
        pass


def read_records(config: Config, topic: str, expected: int | None = None,
                 timeout: float = 60.0) -> list[tuple[str, dict]]:
    """Decode the records of ``topic`` (control records, with no value, left out): until
    ``expected`` were read, waiting for them, else all of them to the topic's end. Fewer after
    ``timeout``: the caller's assertion says so."""
    records: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout
    with TopicReader(config, [topic], "test-reader") as reader:
        while time.monotonic() < deadline:
            records += [codec().decode(m.value()) for m in reader.poll() if m.value() is not None]
            if len(records) >= expected if expected is not None else reader.at_end:
                break
    return records


def log_text(path: Path) -> str:
    """A stage's log so far ("" before the process has written one)."""
    return path.read_text() if path.exists() else ""


def wait_for(predicate, timeout: float = 120.0, interval: float = 0.3, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def invoke(*args):
    """``pipeline ARGS`` in-process: never a traceback, never an exception other than the exit."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def one_error_line(result, code):
    """The exit code, and the message as the single line that starts with Error:."""
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return errors[0]


# CLI overrides for a tiny, quick model (first-hour and user-mistake tests)
TINY_MODEL = ["--set", "model.rnn.hidden_size=8", "--set", "training.epochs=1"]


def write_small_scores(path: Path, last_line: int) -> Path:
    """A scores file of lines 2..last_line, one window, loss rising with the line (line / 10)."""
    columns = ["line", "event_time", "window", "user", "src_host", "dst_host", "loss", "loss_total"]
    write_rows(path, columns, ([str(n), str(n), "1", f"U{n}", "C1", "C2", f"{n / 10:.6f}",
                                f"{n / 5:.6f}"] for n in range(2, last_line + 1)))
    return path

