"""tokenizer.kind: template (nn/templates.py): drain3 templates mined from the first window, then
frozen; and the sessions generator profile (pipeline/generate_sessions.py) it is meant for."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter

import pytest
from click.testing import CliRunner
from helpers import stream_config
from test_stream import streamed_equal_to_replay

from nn.templates import TemplateMatcher, TemplateTokenizer, line_words
from nn.tokenizers import N_SPECIAL, encode_event, tokenizer_from_state
from pipeline.cli import cli
from pipeline.config import ConfigError, config_from_dict
from pipeline.generate import GenerateSpec
from pipeline.generate_sessions import LINE_PATTERN, session_events, session_labels_path, write_sessions
from pipeline.modelspec import make_masker, make_tokenizer
from pipeline.parsing import Event, LineParser

SESSIONS_INPUT = {
    "format": "text",
    "text": {"pattern": LINE_PATTERN},
    "time_format": "iso8601",
    "entities": {"session": "session", "src_host": "host"},
    "model_fields": ["level", "service", "msg"],
}
SPEC = GenerateSpec(users=12, computers=40, days=1, events_per_day=1500, redteam_events=12, seed=5)


def config_for(*overrides: str, mask: bool = True):
    return config_from_dict({"input": SESSIONS_INPUT}, ["tokenizer.kind=template",
                                                        f"tokenizer.mask.enabled={str(mask).lower()}",
                                                        *overrides])


def parse(config, lines: list[str]) -> list[Event]:
    parser = LineParser(config.input, masker=make_masker(config))
    events = [parser.parse(line, n) for n, line in enumerate(lines, start=1)]
    assert all(isinstance(e, Event) for e in events)
    return events


def session_lines(spec: GenerateSpec = SPEC) -> list[str]:
    return [text for _, text, _ in session_events(spec)[0]]


def fitted(config, events: list[Event]) -> TemplateTokenizer:
    tokenizer = make_tokenizer(config)
    tokenizer.fit(e.text_fields for e in events)
    return tokenizer


# ---------------------------------------------------------------------------- tokens

def test_the_same_line_always_gives_the_same_tokens():
    config = config_for()
    events = parse(config, session_lines())
    first, later = events[:400], events[400:]
    tokenizer = fitted(config, first)
    ids = [tokenizer.encode(e.text_fields) for e in later]
    # Again, in another order (as streaming may bring them), and by a tokenizer fitted anew
    # on the same first window by a fresh parser: nothing depends on arrival order or caches.
    shuffled = list(range(len(later)))
    random.Random(1).shuffle(shuffled)
    again = {i: tokenizer.encode(later[i].text_fields) for i in shuffled}
    other = fitted(config, parse(config, session_lines()[:400]))
    assert ids == [again[i] for i in range(len(later))]
    assert ids == [other.encode(e.text_fields) for e in later]
    assert tokenizer.state_dict() == other.state_dict()
    # The first token says the template: a handful of workflow steps, not one per line.
    templates = Counter(i[0] for i in ids)
    assert 5 <= len(tokenizer.templates) <= 40 and len(templates) >= 5
    assert all(N_SPECIAL <= i[0] < tokenizer.param_start for i in ids)


def test_masked_parts_are_not_in_the_tokens():
    config = config_for()
    a = ("2024-03-04T08:00:01.123Z gw1 INFO gateway [S1] Accepted connection from 10.11.222.117:43270 "
         "user=u026")
    b = ("2024-03-04T08:00:02.456Z gw2 INFO gateway [S2] Accepted connection from 172.16.3.9:1999 "
         "user=u026")
    events = parse(config, session_lines())
    tokenizer = fitted(config, events[:400])
    ea, eb = parse(config, [a, b])
    assert tokenizer.encode(ea.text_fields) == tokenizer.encode(eb.text_fields)
    text = " ".join(t for e in events for t in tokenizer.decode(tokenizer.encode(e.text_fields)))
    state = json.dumps(tokenizer.state_dict())
    for secret in ["10.11.222.117", "43270", "172.16.", "blk_9", "bytes) in 1"]:
        assert secret not in text and secret not in state, secret
    assert "<ipv4>" in text and "<num>" in text and "<blk>" in text
    # Without masking the same two lines differ (the parameters are their raw values).
    raw = config_for(mask=False)
    tokenizer = fitted(raw, parse(raw, session_lines()[:400]))
    ra, rb = parse(raw, [a, b])
    assert tokenizer.encode(ra.text_fields) != tokenizer.encode(rb.text_fields)


def test_templates_come_from_the_first_window_only_and_never_change():
    config = config_for()
    events = parse(config, session_lines())
    tokenizer = fitted(config, events[:400])
    before = tokenizer.state_dict()
    new = parse(config, ["2024-03-04T09:00:00.000Z gw1 ERROR gateway [S9] Kernel panic on core 7 "
                         "while holding lock 0x00ff"])[0]
    ids = tokenizer.encode(new.text_fields)
    # An unknown line: an unknown-template bucket, then all its words as parameters.
    assert tokenizer.template_oov_start <= ids[0] < tokenizer.param_start
    assert len(ids) == 1 + len(line_words(new.text_fields))
    for e in events:
        tokenizer.encode(e.text_fields)
    assert tokenizer.state_dict() == before  # encoding never learns
    with pytest.raises(RuntimeError, match="frozen"):
        tokenizer.fit(e.text_fields for e in events)


def test_a_literal_wildcard_in_the_log_is_not_a_parameter():
    tokenizer = TemplateTokenizer()
    tokenizer.fit([[("msg", f"job {n} done")] for n in range(20)])
    assert [None if t is None else t for t in tokenizer.templates[0]] == ["job", None, "done"]
    assert line_words([("msg", "job <*> done")]) == ("job", "<<*>", "done")
    known, forged = tokenizer.encode([("msg", "job 3 done")]), tokenizer.encode([("msg", "job <*> done")])
    assert known[0] == forged[0] and known[1] != forged[1]  # "<<*>" is an (unknown) word


def test_the_most_specific_matching_template_wins_then_the_lowest_id():
    matcher = TemplateMatcher([("open", None, "ok"), ("open", "disk", "ok"), (None, "disk", "ok")])
    assert matcher.match(("open", "disk", "ok")) == 1
    assert matcher.match(("open", "tape", "ok")) == 0
    assert matcher.match(("close", "disk", "ok")) == 2
    assert matcher.match(("open", "disk")) is None


def test_parameters_none_gives_the_template_id_alone():
    config = config_for("tokenizer.template.parameters=none")
    events = parse(config, session_lines())
    tokenizer = fitted(config, events[:400])
    assert tokenizer.word_vocab == []
    assert all(len(tokenizer.encode(e.text_fields)) == 1 for e in events)


# ---------------------------------------------------------------------------- restarts

def test_template_ids_stable_across_a_restart(tmp_path):
    from pipeline.learner import WindowLearner

    config = config_for("model.rnn.hidden_size=8", "training.epochs=1")
    events = parse(config, session_lines())
    learner = WindowLearner(config)
    learner.train(0, events[:400])
    path = tmp_path / "ckpt.pt"
    learner.save(path)
    loaded = WindowLearner.load(path, config)
    assert loaded.tokenizer.kind == "template"
    assert loaded.tokenizer.state_dict() == learner.tokenizer.state_dict()
    assert loaded.tokenizer.vocab_size == learner.tokenizer.vocab_size
    assert loaded.encode(events) == learner.encode(events)
    # Plain JSON, no pickle: the state survives a JSON round trip with the same ids.
    state = json.loads(json.dumps(learner.tokenizer.state_dict()))
    again = tokenizer_from_state(state)
    assert [encode_event(again, e.text_fields, 120) for e in events] == learner.encode(events)
    # A checkpoint made with other drain3 settings does not continue this run.
    from nn.training import CheckpointError

    with pytest.raises(CheckpointError, match="another tokenizer configuration"):
        WindowLearner.load(path, config_for("model.rnn.hidden_size=8", "training.epochs=1",
                                            "tokenizer.template.sim_threshold=0.6"))


@pytest.mark.parametrize("override, message", [
    ("tokenizer.template.depth=2", "tokenizer.template.depth"),
    ("tokenizer.template.sim_threshold=0", "tokenizer.template.sim_threshold"),
    ("tokenizer.template.sim_threshold=1.5", "tokenizer.template.sim_threshold"),
    ("tokenizer.template.parameters=char", "tokenizer.template.parameters"),
    ("tokenizer.template.max_templates=0", "tokenizer.template.max_templates"),
])
def test_bad_template_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config_for(override)


# ---------------------------------------------------------------------------- the generator

def test_the_sessions_profile_is_deterministic_and_labels_lines_and_sessions(tmp_path):
    paths = []
    for run in ("a", "b"):
        log, labels = tmp_path / f"{run}.log", tmp_path / f"{run}.csv"
        summary = write_sessions(SPEC, log, labels)
        paths.append((log, labels))
    (log, labels), (log2, labels2) = paths
    assert log.read_bytes() == log2.read_bytes() and labels.read_bytes() == labels2.read_bytes()
    assert session_labels_path(labels).read_bytes() == session_labels_path(labels2).read_bytes()
    lines = log.read_text().splitlines()
    with open(labels) as f:
        rows = list(csv.DictReader(f))
    with open(session_labels_path(labels)) as f:
        sessions = {r["session"]: r for r in csv.DictReader(f)}
    assert len(rows) == len(lines) == summary["events"]
    assert [int(r["line"]) for r in rows] == list(range(1, len(lines) + 1))
    for r, line in zip(rows, lines):
        assert f"[{r['session']}]" in line
        assert r["label"] == sessions[r["session"]]["label"]
    kinds = Counter(r["kind"] for r in sessions.values())
    assert kinds["normal"] > 100 and sum(kinds[k] for k in ("missing", "extra", "reordered")) == 12
    assert {"missing", "extra", "reordered"} <= set(kinds)
    times = [line.split()[0] for line in lines]
    assert times == sorted(times)
    assert write_sessions(GenerateSpec(**{**SPEC.__dict__, "seed": 6}), tmp_path / "c.log",
                          tmp_path / "c.csv")["events"] != summary["events"] or \
        (tmp_path / "c.log").read_bytes() != log.read_bytes()


def test_anomalous_sessions_are_made_of_normal_steps_in_a_wrong_order():
    """No single line gives an anomalous session away: each matches a template that normal
    sessions use. Only the sequence differs (so per-line models cannot see them)."""
    config = config_for(mask=True)
    lines, kinds = session_events(SPEC)
    events = parse(config, [text for _, text, _ in lines])
    normal = [e for e, (_, _, sid) in zip(events, lines) if kinds[sid] == "normal"]
    odd = [(e, sid) for e, (_, _, sid) in zip(events, lines) if kinds[sid] != "normal"]
    tokenizer = fitted(config, normal)
    normal_templates = {tokenizer.encode(e.text_fields)[0] for e in normal}
    assert all(tokenizer.encode(e.text_fields)[0] in normal_templates for e, _ in odd)
    sequences: dict[str, list[int]] = {}
    for e, sid in odd:
        sequences.setdefault(sid, []).append(tokenizer.encode(e.text_fields)[0])
    normal_sequences: dict[str, list[int]] = {}
    for e, (_, _, sid) in zip(events, lines):
        if kinds[sid] == "normal":
            normal_sequences.setdefault(sid, []).append(tokenizer.encode(e.text_fields)[0])
    seen = {tuple(s) for s in normal_sequences.values()}
    # Most anomalous sequences never occur among normal sessions (a swap of two packets of the
    # same step kind cannot happen: neighbours of one template are never swapped).
    assert sum(tuple(s) not in seen for s in sequences.values()) >= 0.8 * len(sequences)


def test_generate_sessions_from_the_cli(tmp_path):
    log, labels = tmp_path / "s.log", tmp_path / "labels.csv"
    result = CliRunner().invoke(cli, ["generate", "--profile", "sessions", "--output", str(log),
                                      "--labels", str(labels), "--days", "1", "--events-per-day", "300",
                                      "--redteam-events", "3", "--users", "5"])
    assert result.exit_code == 0, result.output
    assert "3 anomalous" in result.output and (tmp_path / "labels.sessions.csv").exists()
    from pipeline.evaluate import read_labels

    assert sum(read_labels(labels).values()) > 3  # every line of an anomalous session is 1


# ---------------------------------------------------------------------------- streaming

@pytest.mark.slow
def test_stream_archive_equals_replay_with_templates(kafka_bootstrap, tmp_path):
    """The trainer mines templates from the first window it reads back from Kafka (two
    partitions, any interleaving): the same templates, ids and scores as replay."""
    log = tmp_path / "sessions.log"
    spec = GenerateSpec(users=8, computers=24, days=1, events_per_day=400, redteam_events=4, seed=2)
    write_sessions(spec, log, tmp_path / "labels.csv")
    total = len(log.read_text().splitlines())
    config, config_path = stream_config(
        tmp_path, kafka_bootstrap,
        {"input": SESSIONS_INPUT, "window": {"size_seconds": 21600}, "scores": {"explain": True},
         "training": {"epochs": 1}, "topics": {"partitions": 2}},
        ("tokenizer.kind=template", "tokenizer.mask.enabled=true", "model.rnn.hidden_size=16"))
    streamed = streamed_equal_to_replay(config, config_path, log, tmp_path, total)
    tokens = " ".join("".join(json.loads(r["tokens"])) for r in streamed if r["tokens"])
    assert "<T" in tokens and "<num>" in tokens


# ---------------------------------------------------------------------------- the benchmark

def _detect_text():
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("detect", ROOT / "benchmarks" / "detect.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.detect_text


def test_template_bigram_learns_only_from_earlier_windows_of_each_session():
    detect_text = _detect_text()
    config = config_for()
    lines, _ = session_events(SPEC)
    events = parse(config, [text for _, text, _ in lines])
    sessions = {e.line: sid for e, (_, _, sid) in zip(events, lines)}
    windows = {0: events[:500], 1: events[500:800]}
    later = {**windows, 2: events[800:]}
    scores, with_later = (detect_text.template_bigram(w, sessions, config) for w in (windows, later))
    assert set(scores) == {e.line for e in events[500:800]}  # the first window is unscored
    assert all(with_later[line] == s for line, s in scores.items())  # no look-ahead
    # It reads each session's previous step: with every line in one session, scores change.
    merged = detect_text.template_bigram(windows, dict.fromkeys(sessions, "one"), config)
    assert merged != scores


def test_session_lm_scores_every_line_of_a_session_with_its_window_s_score():
    from pipeline.sessions import SessionScore

    detect_text = _detect_text()
    config = config_for("sessions.entity=session")
    lines = [f"2024-03-04T0{h}:00:00.000Z gw1 INFO gateway [{sid}] Accepted connection"
             for h, sid in ((1, "A"), (2, "B"), (3, "A"), (7, "A"), (8, "C"))]
    events = parse(config, lines)
    # A spans both windows (its window-0 lines must not get its window-1 score); C has no score.
    windows = {0: events[:3], 1: events[3:]}

    def score(window, session, loss, total):
        return SessionScore(window, session, 1, 0, 0, None, None, loss, total)

    sessions = [score(0, "A", None, None), score(0, "B", None, None),  # no model yet
                score(1, "A", 1.5, 6.0), score(1, "B", 9.0, 9.0)]  # B has no line in window 1
    assert detect_text.session_line_scores(windows, sessions, config, "loss") == {4: 1.5}
    assert detect_text.session_line_scores(windows, sessions, config, "loss_total") == {4: 6.0}


@pytest.mark.slow
def test_detect_sessions_small_runs_end_to_end(tmp_path):
    import os
    import subprocess
    import sys

    from helpers import ROOT

    out = tmp_path / "detect.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "detect.py"), "--small",
                           "--seeds", "1", "--profile", "sessions", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())["sessions"]["seeds"][0]
    assert set(result) == {"byte-3gram", "byte-3gram-masked", "template-bigram", "LM word-mask",
                           "LM template", "session-LM", "session-LM total"}
    assert len({r["scored"] for r in result.values()}) == 1  # the same windows for every method
    assert len({r["sessions"] for r in result.values()}) == 1
    for r in result.values():
        assert 0 < r["anomalous_sessions"] < r["sessions"] and 0.0 <= r["s-auc-max"] <= 1.0
    # In-session order is what the anomalies are: the bigram over each session's steps sees it.
    assert result["template-bigram"]["s-auc-mean"] > 0.7
