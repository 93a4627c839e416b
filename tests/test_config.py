import dataclasses

import pytest
from click.testing import CliRunner
from helpers import key_comments

from pipeline.cli import cli
from pipeline.config import Config, ConfigError, config_from_dict, load_config


def test_shipped_config_yaml_is_valid_and_equals_the_defaults(root):
    # environ={}: KAFKA_BOOTSTRAP_SERVERS (tests against an external cluster) is a config layer
    assert load_config(root / "config.yaml", environ={}) == load_config(None, environ={}) == Config()


def _leaf_keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_config_key_is_in_config_yaml_under_a_comment(root):
    """config.yaml documents every setting: each key line follows a comment line."""
    commented = key_comments(root / "config.yaml")
    for key in _leaf_keys(Config()):
        assert key in commented, f"{key} missing from config.yaml"
        assert commented[key], f"{key} has no comment above it in config.yaml"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.rnn.hidden_size=abc"], 'model.rnn.hidden_size: expected a positive integer, got "abc"'),
        (["model.rnn.hidden_size=0"], "model.rnn.hidden_size: expected a positive integer, got 0"),
        (["model.rnn.hiden_size=3"], "model.rnn.hiden_size: unknown key"),
        (["model.kind=lstm"], 'model.kind: expected one of "rnn", "gpt", got "lstm"'),
        (["training.learning_rate=-1"], "training.learning_rate: expected a positive number, got -1"),
        (["model.gpt.dropout=1.0"], "model.gpt.dropout: expected a number in [0, 1), got 1.0"),
        (["model.rnn.bidirectional=yes please"], "model.rnn.bidirectional: expected true or false"),
        (["input.entities.user=nosuchcolumn"], "input.entities.user: expected one of input.csv.columns"),
        (["input.csv.columns=notalist"], 'input.csv.columns: expected a list, got "notalist"'),
        (["tokenzier.kind=char"], "tokenzier: unknown key"),
    ],
)
def test_config_errors_name_the_key_path(overrides, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, overrides)
    assert message in str(info.value)


def test_gpt_heads_must_divide_width():
    with pytest.raises(ConfigError, match="model.gpt.n_embd"):
        config_from_dict({"model": {"kind": "gpt", "gpt": {"n_embd": 30, "n_head": 4}}})


def test_overrides_apply_with_yaml_types():
    config = config_from_dict(
        {}, ["model.kind=gpt", "window.size_seconds=3600", "model.rnn.bidirectional=true"])
    assert config.model.kind == "gpt"
    assert config.window.size_seconds == 3600.0
    assert config.model.rnn.bidirectional is True


def test_yaml_file_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  rnn:\n    n_layer: two\n")
    with pytest.raises(ConfigError, match="model.rnn.n_layer: expected a positive integer"):
        load_config(path)
    path.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_renamed_key_names_its_new_name_in_one_line(tmp_path):
    message = "model.rnn.layers: renamed to model.rnn.n_layer; rename the key in your config"
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  rnn:\n    layers: 2\n    hidden: 3\n")  # also an unknown key
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="renamed to model.rnn.n_layer.*SALKA__MODEL__RNN__LAYERS"):
        load_config(None, environ={"SALKA__MODEL__RNN__LAYERS": "2"})
    result = CliRunner().invoke(cli, ["replay", "--config", str(path), "--input", str(path),
                                      "--output", str(tmp_path / "s.csv.gz")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"Error: {message}"]
    assert config_from_dict({}, ["model.rnn.n_layer=2"]).model.rnn.n_layer == 2


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_cli_reports_config_error_with_key_and_exit_code_2(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("1,U1@DOM1,U1@DOM1,C1,C2,Kerberos,Network,LogOn,Success\n")
    result = CliRunner().invoke(
        cli, ["replay", "--input", str(log), "--output", str(tmp_path / "s.csv.gz"),
              "--set", "model.rnn.hidden_size=abc"],
    )
    assert result.exit_code == 2
    assert 'model.rnn.hidden_size: expected a positive integer, got "abc"' in result.output
    assert not (tmp_path / "s.csv.gz").exists()
