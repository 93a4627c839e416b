"""Session scores (sessions.*, pipeline/sessions.py): a session's score comes from the model of
earlier windows only, reads its steps in order (a missing, extra or swapped step is surprising
where no line is), survives a checkpoint, and is off without the key. Tiny models on the CPU;
streaming == replay is tests/test_sessions_stream.py."""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from nn.scoring import score_sequences
from nn.tokenizers import BOS, EOS
from pipeline.cli import cli
from pipeline.config import ConfigError, config_from_dict, config_to_dict, load_config
from pipeline.learner import WindowLearner
from pipeline.replay import parse_file, replay
from pipeline.sessions import SESSION_COLUMNS, sequences

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sessions.yaml"
HOUR = 3600
WORKFLOW = ["open {s} from 10.0.0.{n}", "auth {s} ok", "read {s} block {n}", "write {s} block {n}",
            "close {s}"]


def make_config(**sessions):
    data = {"input": {"format": "text",
                      "text": {"pattern": r"^(?P<time>\d+) \[(?P<session>[^\]]+)\] (?P<msg>.*)$"},
                      "time_field": "time", "time_format": "epoch",
                      "entities": {"session": "session"}, "model_fields": ["msg"]},
            "window": {"size_seconds": HOUR},
            "tokenizer": {"kind": "template", "mask": {"enabled": True}},
            "model": {"rnn": {"hidden_size": 16, "attention": "none"}},
            "training": {"epochs": 4, "batch_size": 16, "exclude_top_fraction": 0},
            "sessions": {"entity": "session", "hidden_size": 16, **sessions}}
    return config_from_dict(data)


def session_lines(window: int, count: int, steps: list[int] | None = None, name: str = "s",
                  start: int = 0) -> list[str]:
    """``count`` sessions of the workflow (or of its ``steps``, in that order) in one window."""
    lines = []
    for i in range(count):
        sid = f"{name}{window}-{start + i}"
        for k, step in enumerate(steps if steps is not None else range(len(WORKFLOW))):
            t = window * HOUR + (start + i) * 10 + k
            lines.append(f"{t} [{sid}] " + WORKFLOW[step].format(s=sid, n=(i * 7 + k) % 250))
    return lines


def windows_of(lines: list[str], tmp_path: Path, config, name: str = "app.log"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return parse_file(path, config)[0]


def scores_by_session(learner: WindowLearner) -> dict[str, float | None]:
    return {s.session: s.loss for s in learner.session_scores}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A learner trained on three windows of normal sessions; window 3 holds the tests'."""
    tmp = tmp_path_factory.mktemp("sessions")
    config = make_config()
    windows = windows_of(session_lines(0, 60) + session_lines(1, 60) + session_lines(2, 60),
                         tmp, config)
    learner = WindowLearner(config)
    for w in (0, 1, 2):
        learner.process_window(w, windows[w])
    return config, learner, tmp


def window_3_scores(trained, extra: list[str]) -> dict[str, float | None]:
    """Session scores of window 3 (normal sessions plus ``extra``) by a copy of the learner."""
    config, learner, tmp = trained
    path = tmp / "ckpt.pt"
    learner.save(path)
    copy = WindowLearner.load(path, config)
    events = windows_of(session_lines(3, 20) + extra, tmp, config, "w3.log")[3]
    copy.process_window(3, events)
    return scores_by_session(copy)


def test_the_first_window_has_sessions_but_no_scores(tmp_path):
    config = make_config()
    learner = WindowLearner(config)
    learner.process_window(0, windows_of(session_lines(0, 5), tmp_path, config)[0])
    assert [s.session for s in learner.session_scores] == [f"s0-{i}" for i in range(5)]
    assert all(s.loss is None and s.events == len(WORKFLOW) for s in learner.session_scores)


@pytest.mark.parametrize("steps", [[0, 1, 2, 4], [0, 1, 2, 3, 3, 4], [0, 1, 3, 2, 4], [0, 1, 2, 3]],
                         ids=["missing", "extra", "swapped", "no-end"])
def test_a_wrong_sequence_of_normal_lines_scores_above_every_normal_session(trained, steps):
    """Each line of these sessions is a normal line; only their order or number is wrong."""
    scores = window_3_scores(trained, session_lines(3, 1, steps, name="odd", start=50))
    odd = scores.pop("odd3-50")
    assert odd > max(scores.values()), (odd, max(scores.values()))


def test_a_score_is_from_earlier_windows_only(trained):
    """The same session scores the same whatever else its window holds: sessions of window w
    are scored before the model trains on w."""
    alone = window_3_scores(trained, [])
    crowded = window_3_scores(trained, session_lines(3, 30, [0, 1, 3, 2, 4], name="odd", start=40))
    assert {k: crowded[k] for k in alone} == alone


def test_a_resumed_run_scores_what_an_uninterrupted_one_does(tmp_path):
    config = make_config()
    windows = windows_of(session_lines(0, 30) + session_lines(1, 30) + session_lines(2, 30)
                         + session_lines(3, 10, [0, 2, 1, 4], name="odd"), tmp_path, config)
    straight = WindowLearner(config)
    for w in sorted(windows):
        straight.process_window(w, windows[w])
    first = WindowLearner(config)
    for w in (0, 1):
        first.process_window(w, windows[w])
    first.save(tmp_path / "ckpt.pt")
    resumed = WindowLearner.load(tmp_path / "ckpt.pt", config)
    for w in (2, 3):
        resumed.process_window(w, windows[w])
    assert resumed.session_scores == straight.session_scores
    assert any(s.loss is not None for s in straight.session_scores)

    fresh = WindowLearner.load(tmp_path / "ckpt.pt", config)  # the session model is in it
    fresh.sessions = None
    fresh.process_window(2, windows[2])
    assert all(s.loss is None for s in fresh.session_scores)


def test_long_sessions_are_read_in_parts_and_only_the_last_ends():
    assert sequences([5, 6, 7, 8, 9], 2) == [[BOS, 5, 6], [BOS, 7, 8], [BOS, 9, EOS]]
    assert sequences([5, 6], 2) == [[BOS, 5, 6, EOS]]


def test_a_long_session_is_scored_over_all_its_parts(tmp_path):
    """max_events 3: a 9-event session is 3 sequences; its loss is their summed loss over their
    10 predicted symbols (3 + 3 + 3 and the last part's EOS), by the model before its window."""
    config = make_config(max_events=3)
    windows = windows_of(session_lines(0, 20) + session_lines(1, 20)
                         + session_lines(2, 1, [0, 1, 2, 3, 2, 3, 2, 3, 4], name="long"),
                         tmp_path, config)
    learner = WindowLearner(config)
    for w in (0, 1):
        learner.process_window(w, windows[w])
    parts = sequences([symbol for _, symbol in learner.template_ids(windows[2])], 3)
    assert [len(p) for p in parts] == [4, 4, 5]
    expected = sum(total for _, total, _ in score_sequences(learner.sessions.model, parts,
                                                            device=learner.device))
    learner.process_window(2, windows[2])
    (score,) = learner.session_scores
    assert score.events == 9
    assert score.loss_total == pytest.approx(expected, rel=1e-6)
    assert score.loss == pytest.approx(expected / 10, rel=1e-6)


def test_replay_writes_the_session_file(tmp_path):
    config = make_config()
    log = tmp_path / "app.log"
    log.write_text("\n".join(session_lines(0, 10) + session_lines(1, 10)) + "\n")
    replay(log, tmp_path / "scores.csv.gz", config, progress=False,
           sessions_output=tmp_path / "sessions.csv.gz")
    with gzip.open(tmp_path / "sessions.csv.gz", "rt", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == SESSION_COLUMNS
    assert len(rows) == 1 + 20
    assert {r[0] for r in rows[1:]} == {"0", "1"}
    assert all(r[7] == "" for r in rows[1:11]) and all(float(r[7]) > 0 for r in rows[11:])


def test_sessions_off_keeps_no_model(tmp_path):
    config = config_from_dict({"model": {"rnn": {"hidden_size": 16}}})
    assert config.sessions.entity == ""
    learner = WindowLearner(config)
    learner.process_window(0, windows_of(["1,U1@D,U1@D,C1,C2,Kerberos,Network,LogOn,Success"],
                                         tmp_path, config, "auth.csv")[0])
    assert learner.sessions is None and learner.session_scores == []


@pytest.mark.parametrize("sessions, tokenizer, message", [
    ({"entity": "nope"}, "template", "sessions.entity: expected one of input.entities"),
    ({"entity": "session"}, "word", "sessions.entity: needs tokenizer.kind: template"),
    ({"entity": "session", "max_events": 0}, "template", "sessions.max_events"),
])
def test_config_mistakes_are_named(sessions, tokenizer, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EXAMPLE, [f"tokenizer.kind={tokenizer}",
                              *(f"sessions.{k}={v}" for k, v in sessions.items())])


def test_replay_sessions_without_the_key_is_one_line(tmp_path):
    log = tmp_path / "app.log"
    log.write_text("\n".join(session_lines(0, 2)) + "\n")
    result = CliRunner().invoke(cli, ["replay", "--config", str(EXAMPLE), "--set", "sessions.entity=",
                                      "--input", str(log), "--output", str(tmp_path / "s.csv.gz"),
                                      "--sessions", str(tmp_path / "x.csv.gz")])
    assert result.exit_code == 2
    assert "session scores need sessions.entity" in result.output
    assert "Traceback" not in result.output


def test_a_window_without_sessions_trains_nothing_and_the_next_stays_unscored(tmp_path):
    """Window 0's lines belong to no session: the session model is still untrained, so window
    1's sessions get no loss rather than the random first weights' loss."""
    config = make_config()
    unnamed = [re.sub(r"\[[^\]]*\]", "[]", line, count=1) for line in session_lines(0, 4)]
    data = config_to_dict(config)
    data["input"]["text"]["pattern"] = r"^(?P<time>\d+) \[(?P<session>[^\]]*)\] (?P<msg>.*)$"
    config = config_from_dict(data)
    windows = windows_of(unnamed + session_lines(1, 5), tmp_path, config)
    learner = WindowLearner(config)
    learner.process_window(0, windows[0])
    assert learner.session_scores == []
    learner.process_window(1, windows[1])
    assert len(learner.session_scores) == 5
    assert all(s.loss is None for s in learner.session_scores)
    learner.process_window(2, windows_of(session_lines(2, 5), tmp_path, config, "w2.log")[2])
    assert all(s.loss is not None for s in learner.session_scores)
