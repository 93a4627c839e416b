"""Secrets in librdkafka settings (sasl.password, ssl.key.password, sasl.oauthbearer.*) never reach
a log line or an error message, in text or JSON logs; and a kafka: key given alone adds to the
default settings instead of replacing them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import ROOT, delete_topics, stream_config

from pipeline.cli import cli
from pipeline.config import load_config
from pipeline.kafka import redacted, user_settings

SECRETS = {"sasl.password": "hunter2", "ssl.key.password": "k3yPass",
           "sasl.oauthbearer.config": "principal=x secret=oauthS3cret",
           "sasl.oauthbearer.client.secret": "cl1entS3cret"}


def secret_sets() -> list[str]:
    return [arg for key, value in SECRETS.items() for arg in ("--set", f"kafka.{key}={value}")]


def leaked(text: str) -> list[str]:
    return [value for value in SECRETS.values() if value in text]


@pytest.mark.parametrize("key", ["sasl.password", "ssl.key.password", "sasl.oauthbearer.config"])
@pytest.mark.parametrize("value", ["[hunter2]", "{a: hunter2}", "{hunter2: x}"])
def test_a_config_error_on_a_secret_names_the_key_but_not_the_value(key, value):
    result = CliRunner().invoke(cli, ["status", "--set", f"kafka.{key}={value}"])
    assert result.exit_code == 2, result.output
    assert "hunter2" not in result.output
    assert key in result.output and "Traceback" not in result.output


def test_a_config_error_from_the_environment_does_not_echo_the_secret():
    result = CliRunner().invoke(cli, ["status"], env={"SALKA__KAFKA__SASL__PASSWORD": "[hunter2]"})
    assert result.exit_code == 2, result.output
    assert "hunter2" not in result.output and "SALKA__KAFKA__SASL__PASSWORD" in result.output


def test_client_settings_are_redacted_with_the_one_list_of_secret_names():
    settings = {**SECRETS, "sasl.username": "bob", "bootstrap.servers": "b:9092"}
    shown = redacted(settings)
    assert {k: v for k, v in shown.items() if v != "***"} == {"sasl.username": "bob",
                                                            "bootstrap.servers": "b:9092"}


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_commands_with_secret_settings_never_log_them(kafka_bootstrap, tmp_path, log_format):
    """-vv logs every client's settings (debug): the keys show, their values do not."""
    config, config_path = stream_config(tmp_path, kafka_bootstrap)  # topics unique to this test
    sample = tmp_path / "one.csv"
    sample.write_text("1,U1@D,U2@D,C1,C2,Kerberos,Network,LogOn,Success\n")
    outputs = []
    try:
        for command in (["produce", "--input", str(sample)], ["status"],
                        ["check", "--input", str(sample), "-n", "1"]):
            proc = subprocess.run(
                [sys.executable, "-m", "pipeline", "-vv", "--log-format", log_format, *command,
                 "--config", str(config_path), *secret_sets(), "--set", "kafka.sasl.username=bob"],
                cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            outputs.append(proc.stdout + proc.stderr)
    finally:
        delete_topics(config)
    text = "\n".join(outputs)
    assert not leaked(text), leaked(text)
    assert "sasl.password" in text and "***" in text  # the settings were logged, redacted
    if log_format == "json":
        for output in outputs:
            for line in output.splitlines():
                if line.startswith("{"):
                    json.loads(line)


def test_one_kafka_key_keeps_the_default_bootstrap_servers(tmp_path):
    config = load_config(None, ["kafka.client.id=x"], environ={})
    assert user_settings(config) == {"bootstrap.servers": "127.0.0.1:9092", "client.id": "x"}
    path = tmp_path / "c.yaml"
    path.write_text("kafka:\n  security.protocol: SSL\n")
    assert user_settings(load_config(path, environ={}))["bootstrap.servers"] == "127.0.0.1:9092"
    path.write_text("kafka:\n  bootstrap.servers: far:9092\n")
    assert user_settings(load_config(path, environ={}))["bootstrap.servers"] == "far:9092"
