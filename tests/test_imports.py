"""Torch stays where it belongs: the Kafka-only stages (tokenizer, windower, archiver, alerter)
and the one-shot commands (produce, audit, create-topics, status) never import it, so their
processes start in a fraction of a second and stay small (issue 13, item 6).

Each check runs in a fresh interpreter: this test process has imported torch long ago."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, read_records, stream_config, wait_for

from pipeline.demo import ArchiveCounter, StageProcesses
from pipeline.generate import GenerateSpec, write_log
from pipeline.stages.alerter import state_path as alerter_state

KAFKA_ONLY_STAGES = ("tokenizer", "windower", "archiver", "alerter")

# What `pipeline run <stage>` and the one-shot commands import (pipeline/cli.py), and the stage
# objects built as `pipeline run` builds them (the tokenizer's char tokenizer included).
PROBE = """
import sys, tempfile
from pipeline.cli import make_stage
import pipeline.logs, pipeline.metrics, pipeline.runner
import pipeline.audit, pipeline.kafka, pipeline.produce, pipeline.status
from pipeline.config import config_from_dict
work = tempfile.mkdtemp()
config = config_from_dict({"tokenizer": {"kind": "char"},
                           "streaming": {"state_dir": work + "/state", "archive_dir": work + "/archive"}})
for name in sys.argv[1:]:
    make_stage(name, config)
print(sorted(m for m in sys.modules if m.split(".")[0] == "torch")[:3])
"""


def torch_modules_after(code: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("module", [f"pipeline.stages.{s}" for s in KAFKA_ONLY_STAGES]
                         + ["pipeline.cli", "pipeline.produce", "pipeline.audit", "pipeline.kafka",
                            "pipeline.status", "pipeline.runner", "pipeline.topicrecords"])
def test_module_does_not_import_torch(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    assert torch_modules_after(code) == "[]"


def test_kafka_only_stages_and_command_paths_do_not_import_torch():
    assert torch_modules_after(PROBE, *KAFKA_ONLY_STAGES) == "[]"


def test_the_probe_sees_torch_where_it_is_imported():
    """The check itself can fail: the trainer's path does load torch."""
    assert torch_modules_after(PROBE, "trainer") != "[]"


IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$", re.MULTILINE)


def imported(text: str) -> set[str]:
    """Modules named by ``-X importtime`` (PYTHONPROFILEIMPORTTIME) lines in a process's output."""
    return set(IMPORT_LINE.findall(text))


def assert_torch_free(what: str, text: str, must_have: str) -> None:
    modules = imported(text)
    assert must_have in modules, f"{what}: no import trace of {must_have} (trace not captured?)"
    torch = sorted(m for m in modules if m.split(".")[0] == "torch")
    assert not torch, f"{what} imported {torch[:3]}"


@pytest.mark.slow
def test_running_stages_and_commands_never_import_torch(kafka_bootstrap, tmp_path, monkeypatch):
    """The real processes, over the broker, while they work: every import they make is traced."""
    log, labels = tmp_path / "auth.csv", tmp_path / "labels.csv"
    write_log(GenerateSpec(users=5, computers=16, days=1, events_per_day=300, redteam_events=2,
                           seed=3), log, labels)
    config, config_path = stream_config(tmp_path, kafka_bootstrap, {
        "tokenizer": {"kind": "char"}, "window": {"size_seconds": 3600}})
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # inherited by every process below

    def command(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "pipeline", *args, "--config", str(config_path)],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        return result.stdout + result.stderr

    assert_torch_free("create-topics", command("create-topics"), "pipeline.kafka")
    stages = StageProcesses(config_path, tmp_path / "logs")
    try:
        # The trainer and scorer (which load torch in processes of their own) make the scores
        # that the archiver and the alerter handle: their per-record code runs too.
        for stage in (*KAFKA_ONLY_STAGES, "trainer", "scorer"):
            stages.start(stage)
        assert_torch_free("produce", command("produce", "--input", str(log)), "pipeline.produce")
        # The tokenizer and windower have handled events once windows come out; the archiver
        # once a window file is written, the alerter once its state is saved (per window judged).
        read_records(config, config.topics.windows, expected=1, timeout=90)
        wait_for(lambda: ArchiveCounter(Path(config.streaming.archive_dir)).count()[0] > 0
                 and alerter_state(config).exists() or stages.dead(), 180,
                 what="scores archived and judged")
        assert not stages.dead(), stages.dead()
        assert_torch_free("status", command("status"), "pipeline.status")
        assert_torch_free("audit", command("audit"), "pipeline.audit")
        logs = tmp_path / "logs"
        wait_for(lambda: all("assigned" in Path(logs / f"{s}-0.log").read_text() for s in KAFKA_ONLY_STAGES),
                 60, what="every stage assigned its partitions")
    finally:
        stages.stop()
    for stage in KAFKA_ONLY_STAGES:
        assert_torch_free(f"pipeline run {stage}", (logs / f"{stage}-0.log").read_text(),
                          f"pipeline.stages.{stage}")
