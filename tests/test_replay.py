"""The offline workflow end to end: generate -> replay -> eval, through the real CLI."""

import csv
import gzip
import json

import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.generate import GenerateSpec, write_log

TINY = ["--set", "model.rnn.hidden_size=16", "--set", "window.size_seconds=3600"]


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def read_rows(path):
    with gzip.open(path, "rt", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def small_log(tmp_path_factory):
    """A few hours of synthetic auth events (hour windows), with a header row."""
    folder = tmp_path_factory.mktemp("small")
    log, labels = folder / "auth.csv", folder / "labels.csv"
    write_log(GenerateSpec(users=10, computers=30, days=1, events_per_day=1500,
                           redteam_events=0, seed=3), log, labels)
    return log


def test_scores_file_has_one_row_per_event_with_the_contract_columns(small_log, tmp_path):
    out = tmp_path / "scores.csv.gz"
    run("replay", "--input", small_log, "--output", out, *TINY)
    rows = read_rows(out)
    lines = small_log.read_text().splitlines()
    assert list(rows[0]) == ["line", "event_time", "window", "user", "src_host", "dst_host",
                             "loss", "loss_total"]
    # every event once; the header row is line 1, so events are lines 2..N
    assert sorted(int(r["line"]) for r in rows) == list(range(2, len(lines) + 1))
    for row in rows[:50]:
        fields = lines[int(row["line"]) - 1].split(",")
        assert row["event_time"] == fields[0] and row["user"] == fields[1]
        assert row["src_host"] == fields[3] and row["dst_host"] == fields[4]
        assert int(row["window"]) == int(fields[0]) // 3600
    first = min(int(r["window"]) for r in rows)
    assert all(r["loss"] == "" and r["loss_total"] == "" for r in rows if int(r["window"]) == first)
    later = [r for r in rows if int(r["window"]) != first]
    assert later and all(float(r["loss"]) > 0 for r in later)
    # loss is the mean and loss_total the sum over the event's predicted tokens (>= 1 token)
    assert all(float(r["loss_total"]) >= float(r["loss"]) - 1e-6 for r in later)


def test_replay_is_deterministic(small_log, tmp_path):
    a, b = tmp_path / "a.csv.gz", tmp_path / "b.csv.gz"
    run("replay", "--input", small_log, "--output", a, *TINY)
    run("replay", "--input", small_log, "--output", b, *TINY)
    assert gzip.decompress(a.read_bytes()) == gzip.decompress(b.read_bytes())
    c = tmp_path / "c.csv.gz"
    run("replay", "--input", small_log, "--output", c, *TINY, "--set", "seed=99")
    assert gzip.decompress(a.read_bytes()) != gzip.decompress(c.read_bytes())


def test_malformed_lines_are_reported_and_skipped_and_the_rest_scored(small_log, tmp_path, caplog):
    lines = small_log.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    body = lines[:5] + ["this,is,not,an,event", "", "x" * 50] + lines[5:]
    bad.write_text("\n".join(body) + "\n")
    out = tmp_path / "scores.csv.gz"
    with caplog.at_level("WARNING"):
        result = run("replay", "--input", bad, "--output", out, *TINY)
    assert "3 malformed lines skipped" in result.output
    assert "line 6 skipped: expected 9 CSV columns, got 5" in caplog.text
    assert "line 7 skipped: empty line" in caplog.text
    rows = read_rows(out)
    assert len(rows) == len(lines) - 1  # every good event, none of the bad lines
    assert {6, 7, 8}.isdisjoint(int(r["line"]) for r in rows)


@pytest.mark.parametrize("options", [
    ["--set", "model.kind=gpt", "--set", "model.gpt.n_embd=32", "--set", "model.gpt.n_layer=1"],
    ["--set", "tokenizer.kind=word"],
    ["--set", "tokenizer.kind=bpe", "--set", "tokenizer.bpe.vocab_size=300"],
    ["--set", "model.rnn.bidirectional=true", "--set", "model.rnn.cell=gru"],
])
def test_other_models_and_tokenizers_replay(small_log, tmp_path, options):
    out = tmp_path / "scores.csv.gz"
    run("replay", "--input", small_log, "--output", out, *TINY, *options)
    rows = read_rows(out)
    assert len(rows) == len(small_log.read_text().splitlines()) - 1
    assert any(r["loss"] for r in rows)


@pytest.mark.slow
def test_default_config_detects_planted_red_team_events(root, tmp_path):
    """The acceptance bar of the demo: ROC AUC >= 0.95 with config.yaml as shipped."""
    log, labels, out = tmp_path / "auth.csv", tmp_path / "labels.csv", tmp_path / "scores.csv.gz"
    run("generate", "--output", log, "--labels", labels)
    run("replay", "--config", root / "config.yaml", "--input", log, "--output", out)
    result = json.loads(run("eval", "--scores", out, "--labels", labels, "--json").output)
    print("default config on generated data:", result)
    assert result["positives"] >= 50
    assert result["roc_auc"] >= 0.95
    assert result["average_precision"] > 0.1
    top = run("top", "--scores", out, "-n", "5", "--input", log).output
    # ranked by the entity-normalised score (alerting.normalise: auto), the raw loss beside it
    assert top.splitlines()[0].split()[:4] == ["rank", "score", "loss", "line"]


@pytest.mark.parametrize("tokenizer", ["word", "char"])
def test_explanations_give_each_tokens_loss(small_log, tmp_path, tokenizer):
    out = tmp_path / "scores.csv.gz"
    run("replay", "--input", small_log, "--output", out, *TINY, "--set", "scores.explain=true",
        "--set", f"tokenizer.kind={tokenizer}")
    rows = [r for r in read_rows(out) if r["loss"]]
    lines = small_log.read_text().splitlines()
    assert rows
    for row in rows[:100]:
        tokens, losses = json.loads(row["tokens"]), json.loads(row["token_losses"])
        assert len(tokens) == len(losses) and tokens[-1] == "[EOS]"
        # the event's loss is the mean of its tokens' losses, its total their sum
        assert abs(sum(losses) / len(losses) - float(row["loss"])) < 1e-3
        assert abs(sum(losses) - float(row["loss_total"])) < 1e-2
        fields = lines[int(row["line"]) - 1].split(",")[1:]
        if tokenizer == "word":  # a field value, or its field's out-of-vocabulary bucket
            names = ["src_user", "dst_user", "src_computer", "dst_computer", "auth_type",
                     "logon_type", "auth_orientation", "success"]
            for token, value, name in zip(tokens[:-1], fields, names, strict=True):
                assert token == value or token.startswith(f"<{name}:oov"), (token, value)
        else:
            assert "".join(tokens[:-1]) == ",".join(fields)


def test_a_window_is_read_chunk_by_chunk_while_it_is_trained(monkeypatch):
    """What the trainer holds of a window is bounded by the chunk: when chunk k is trained, the
    pass that reads the window back has handed out no more than k + 1 chunks (not the window)."""
    import pipeline.learner as learner_module
    from pipeline.config import config_from_dict
    from pipeline.parsing import LineParser

    config = config_from_dict({}, ["training.max_chunk_events=40", "model.rnn.hidden_size=16"])
    parser = LineParser(config.input)
    events = [parser.parse(f"{i},U{i % 7}@DOM1,U1@DOM1,C{i % 5},C2,Kerberos,Network,LogOn,Success", i + 1)
              for i in range(200)]
    handed_out = []  # per read() pass: events yielded so far

    def read():
        handed_out.append(0)
        for event in events:
            handed_out[-1] += 1
            yield event

    read_when_trained = []
    real = learner_module.train_sequences

    def spy(model, optimizer, seqs, **kwargs):
        read_when_trained.append(handed_out[-1])
        return real(model, optimizer, seqs, **kwargs)

    monkeypatch.setattr(learner_module, "train_sequences", spy)
    learner_module.WindowLearner(config).train_ordered(0, read, len(events))
    assert read_when_trained == [40, 80, 120, 160, 200]


def test_large_windows_are_trained_in_bounded_chunks(monkeypatch):
    """With training.max_chunk_events, no single training call sees more events than the cap."""
    import pipeline.learner as learner_module
    from pipeline.config import config_from_dict
    from pipeline.parsing import LineParser

    sizes = []
    real = learner_module.train_sequences

    def spy(model, optimizer, seqs, **kwargs):
        sizes.append(len(seqs))
        return real(model, optimizer, seqs, **kwargs)

    monkeypatch.setattr(learner_module, "train_sequences", spy)
    config = config_from_dict({}, ["training.max_chunk_events=40", "model.rnn.hidden_size=16"])
    parser = LineParser(config.input)
    events = [parser.parse(f"{i},U{i % 7}@DOM1,U1@DOM1,C{i % 5},C2,Kerberos,Network,LogOn,Success", i + 1)
              for i in range(100)]
    learner = learner_module.WindowLearner(config)
    learner.train(0, events)
    assert sizes == [40, 40, 20]
    again = learner_module.WindowLearner(config)
    again.train(0, events)  # chunking is deterministic
    assert all(torch.equal(a, b) for a, b in zip(learner.model.state_dict().values(),
                                                  again.model.state_dict().values()))
