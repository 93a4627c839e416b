"""Config keys from the environment (``SALKA__SECTION__KEY``) and librdkafka keys under ``kafka:``;
precedence config file < environment < --set."""

from __future__ import annotations

import logging

import click
import pytest
from click.testing import CliRunner

from pipeline.cli import with_config
from pipeline.config import ConfigError, load_config
from pipeline.configenv import key_path
from pipeline.kafka import consumer_config


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  kind: rnn\nwindow:\n  size_seconds: 600\n"
                    "kafka:\n  bootstrap.servers: file:9092\n  client.rack: r1\n")
    return path


@pytest.mark.parametrize("variable, path", [
    ("SALKA__MODEL__KIND", ("model", "kind")),
    ("SALKA__MODEL__RNN__HIDDEN_SIZE", ("model", "rnn", "hidden_size")),
    ("SALKA__seed", ("seed",)),
    ("SALKA__KAFKA__BOOTSTRAP_SERVERS", ("kafka", "bootstrap.servers")),
    ("SALKA__KAFKA__SASL__USERNAME", ("kafka", "sasl.username")),
    ("SALKA__KAFKA__ssl.ca.location", ("kafka", "ssl.ca.location")),
])
def test_variable_names_map_to_key_paths(variable, path):
    assert key_path(variable) == path


def test_environment_sets_keys_with_yaml_values(config_file):
    config = load_config(config_file, environ={
        "SALKA__MODEL__KIND": "gpt", "SALKA__MODEL__GPT__N_EMBD": "64",
        "SALKA__INPUT__CSV__COLUMNS": "[time, src_user, dst_user, src_computer, dst_computer, a, b, c, d]",
        "SALKA__MODEL__RNN__BIDIRECTIONAL": "true", "SALKA__KAFKA__SASL_MECHANISM": "PLAIN",
        "UNRELATED": "x", "SALKA_SINGLE_UNDERSCORE": "ignored"})
    assert config.model.kind == "gpt" and config.model.gpt.n_embd == 64
    assert config.model.rnn.bidirectional is True
    assert config.input.csv.columns[-1] == "d"
    assert config.window.size_seconds == 600  # from the file, untouched
    assert config.kafka == {"bootstrap.servers": "file:9092", "client.rack": "r1", "sasl.mechanism": "PLAIN"}


def test_precedence_file_then_environment_then_set(config_file):
    env = {"SALKA__WINDOW__SIZE_SECONDS": "3600", "SALKA__KAFKA__BOOTSTRAP_SERVERS": "env:9092"}
    assert load_config(config_file, environ={}).window.size_seconds == 600
    assert load_config(config_file, environ=env).window.size_seconds == 3600
    config = load_config(config_file, ["window.size_seconds=60", "kafka.bootstrap.servers=set:9092"],
                         environ=env)
    assert config.window.size_seconds == 60 and config.kafka["bootstrap.servers"] == "set:9092"
    # defaults < environment too, without a file
    assert load_config(None, environ=env).window.size_seconds == 3600


def test_kafka_bootstrap_servers_keeps_working_below_salka_variables_and_set(config_file, caplog):
    legacy = {"KAFKA_BOOTSTRAP_SERVERS": "legacy:9092"}
    with caplog.at_level(logging.INFO, logger="pipeline.configenv"):
        config = load_config(config_file, environ=legacy)
        load_config(config_file, environ=legacy)  # logged once per process, not per load
    assert config.kafka["bootstrap.servers"] == "legacy:9092"
    assert consumer_config(config, "tokenizer")["bootstrap.servers"] == "legacy:9092"
    said = [r for r in caplog.records if "KAFKA_BOOTSTRAP_SERVERS" in r.getMessage()]
    assert len(said) <= 1 and all(r.levelno == logging.INFO for r in said)
    both = {**legacy, "SALKA__KAFKA__BOOTSTRAP_SERVERS": "salka:9092"}
    assert load_config(config_file, environ=both).kafka["bootstrap.servers"] == "salka:9092"
    overridden = load_config(config_file, ["kafka.bootstrap.servers=set:9092"], environ=legacy)
    assert consumer_config(overridden, "tokenizer")["bootstrap.servers"] == "set:9092"


def test_kafka_bootstrap_servers_use_is_logged_at_info(config_file, caplog, monkeypatch):
    import pipeline.configenv as configenv

    monkeypatch.setattr(configenv, "_logged", set())
    with caplog.at_level(logging.INFO, logger="pipeline.configenv"):
        load_config(config_file, environ={"KAFKA_BOOTSTRAP_SERVERS": "legacy:9092"})
        load_config(config_file, environ={"KAFKA_BOOTSTRAP_SERVERS": "legacy:9092"})
    said = [r for r in caplog.records if "KAFKA_BOOTSTRAP_SERVERS" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert "legacy:9092" in said[0].getMessage()


@pytest.mark.parametrize("environ, message", [
    ({"SALKA__MODEL__KIND": "lstm"},
     'model.kind: expected one of "rnn", "gpt", got "lstm" '
     "(set by the environment variable SALKA__MODEL__KIND)"),
    ({"SALKA__MODEL__RNN__HIDEN_SIZE": "3"},
     "model.rnn.hiden_size: unknown key (known: "),
    ({"SALKA__MODLE__KIND": "gpt"}, "(set by the environment variable SALKA__MODLE__KIND)"),
    ({"SALKA__WINDOW__SIZE_SECONDS": "-5"},
     "window.size_seconds: expected a positive number, got -5 (set by the environment variable"),
    ({"SALKA__MODEL____KIND": "gpt"},
     "environment variable SALKA__MODEL____KIND: expected SALKA__SECTION__KEY"),
    ({"SALKA__KAFKA": "x"}, "environment variable SALKA__KAFKA: expected SALKA__KAFKA__<librdkafka key>"),
    ({"SALKA__MODEL__KIND__X": "1"},
     "environment variable SALKA__MODEL__KIND__X: model.kind is not a section"),
    # one underscore after SALKA: read by nothing, silently, before
    ({"SALKA_KAFKA__BOOTSTRAP_SERVERS": "kafka:9092"},
     "environment variable SALKA_KAFKA__BOOTSTRAP_SERVERS: config keys are SALKA__SECTION__KEY "
     "(two underscores after SALKA), e.g. SALKA__KAFKA__BOOTSTRAP_SERVERS"),
    ({"SALKA_TRAINING__EPOCHS": "2"}, "e.g. SALKA__TRAINING__EPOCHS"),
    ({"salka__training__epochs": "2"}, "(names are read in capitals), e.g. SALKA__TRAINING__EPOCHS"),
])
def test_environment_errors_name_the_key_and_the_variable(config_file, environ, message):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, environ=environ)
    assert message in str(info.value)


def test_a_bad_value_overridden_by_set_is_not_blamed_on_the_environment(config_file):
    config = load_config(config_file, ["model.kind=gpt"], environ={"SALKA__MODEL__KIND": "lstm"})
    assert config.model.kind == "gpt"


def test_kafka_keys_are_one_librdkafka_key_in_yaml_set_and_environment(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text("kafka:\n  bootstrap.servers: a:1\n  sasl.mechanism: PLAIN\n")
    config = load_config(path, ["kafka.security.protocol=SASL_SSL"],
                         environ={"SALKA__KAFKA__SASL_USERNAME": "u"})
    assert config.kafka == {"bootstrap.servers": "a:1", "sasl.mechanism": "PLAIN",
                            "security.protocol": "SASL_SSL", "sasl.username": "u"}
    nested = tmp_path / "nested.yaml"
    nested.write_text("kafka:\n  bootstrap:\n    servers: a:1\n")
    with pytest.raises(ConfigError, match=r"^kafka: expected plain values"):
        load_config(nested, environ={})


def _probe():
    seen = []

    @click.command()
    @with_config
    def probe(config):
        seen.append(config)

    return probe, seen


def test_cli_reads_the_environment_and_set_wins(config_file):
    probe, seen = _probe()
    env = {"SALKA__MODEL__KIND": "gpt", "SALKA__TRAINING__EPOCHS": "5"}
    result = CliRunner().invoke(probe, ["--config", str(config_file), "--set", "training.epochs=7"], env=env)
    assert result.exit_code == 0, result.output
    assert seen[0].model.kind == "gpt" and seen[0].training.epochs == 7


def test_cli_environment_error_is_one_line_exit_2(config_file):
    probe, _ = _probe()
    result = CliRunner().invoke(probe, ["--config", str(config_file)],
                                env={"SALKA__TRAINING__EPOCHS": "many"})
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines == ['Error: training.epochs: expected a positive integer, got "many" '
                     "(set by the environment variable SALKA__TRAINING__EPOCHS)"]


def test_click_option_variables_are_not_config_keys(config_file):
    # SALKA_<COMMAND>_<OPTION> (click's auto_envvar_prefix) has single underscores only
    config = load_config(config_file, environ={"SALKA_RUN_METRICS_PORT": "9100"})
    assert config.model.kind == load_config(config_file, environ={}).model.kind


def test_a_librdkafka_key_librdkafka_refuses_names_the_variable_that_set_it(monkeypatch):
    from pipeline.config import config_from_dict
    from pipeline.kafka import make_admin

    monkeypatch.setenv("SALKA__KAFKA__BOOTSTRAP_SERVER", "kafka:9092")
    config = config_from_dict({"kafka": {"bootstrap.server": "kafka:9092"}})  # as the env sets it
    with pytest.raises(ConfigError) as info:
        make_admin(config)
    assert str(info.value).startswith('kafka: No such configuration property: "bootstrap.server"')
    assert str(info.value).endswith("; it comes from the environment variable SALKA__KAFKA__BOOTSTRAP_SERVER")
