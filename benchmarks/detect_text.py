"""benchmarks/detect.py on text logs: the ``sessions`` generator profile and the shared BGL sample.

Methods, each scoring window w with what it learned from windows < w (first window unscored):
- LM variants over the profile's example config (examples/sessions.yaml, examples/bgl.yaml):
  ``example`` (the config as it is), ``word-mask`` (whitespace words, tokenizer.mask on),
  ``template`` (drain3 templates + parameter words, mask on), ``template-only`` (the template
  id alone), or NAME:key=value;... (default: word-mask, template and session-LM). Session
  scores are off in these (sessions.entity="", before the variant's own overrides).
- byte-3gram and byte-3gram-masked (digits -> 0): detect.py's baselines, on the raw lines.
- template-bigram (sessions only): -log P(template | the session's previous template) under an
  add-k smoothed bigram of the earlier windows' sessions, templates from the first window (the
  template tokenizer). Not an LM: a sequence comparator, to show what in-session order is worth.
- session-LM (sessions only): the product's session scores (pipeline/sessions.py): replay_scores
  with sessions.entity=session on the example config, each session of a window scored by the
  session LM of the earlier windows. Two rankings of one run: ``session-LM`` by the session's
  ``loss`` (mean per predicted template), ``session-LM total`` by its ``loss_total``. Variants:
  ``--lm session-LM:key=value;...`` or ``--lm "session-LM NAME:key=value;..."``. Each line gets
  its (window, session)'s score, so the line and session columns below apply unchanged (a
  session that spans windows: max / mean over its parts, weighted by lines for the mean). The
  replay is timed under the first ranking's ``seconds``; the second reuses it.

Metrics: per line (ROC AUC, AP, precision@k, as detect.py) and, for sessions, per session: a
session's score is the max (s-*-max) or the mean (s-*-mean) of its scored lines' scores; a
session with no scored line is left out. A session's label is its generator label.
"""

from __future__ import annotations

import csv
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.config import Config, load_config
from pipeline.evaluate import precision_at_k, scored_truth
from pipeline.generate import GenerateSpec
from pipeline.generate_sessions import session_labels_path, write_sessions
from pipeline.parsing import Event, read_lines
from pipeline.replay import parse_file, replay_scores
from pipeline.scorefile import ScoreRow
from pipeline.sessions import SessionScore
from pipeline.stats import detection_scores

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("sessions", "bgl")
BGL_LOG = Path("/work/shared/data/BGL_2k.log")  # not in the repository (shared/ data, README)
TEXT_LM_PRESETS = {
    "example": [],  # the example config as it is (sessions: template + mask; bgl: bpe + mask)
    "word-mask": ["tokenizer.kind=word", "tokenizer.word.split=whitespace", "tokenizer.mask.enabled=true"],
    "template": ["tokenizer.kind=template", "tokenizer.mask.enabled=true"],
    "template-only": ["tokenizer.kind=template", "tokenizer.mask.enabled=true",
                      "tokenizer.template.parameters=none"],
}
SESSION_LM = "session-LM"  # a --lm variant named so (or "session-LM NAME") is a session LM
SESSION_RANKINGS = {"": "loss", " total": "loss_total"}  # method-name suffix -> SessionScore field
DEFAULT_LMS = ("word-mask", "template", SESSION_LM)
BIGRAM_K = 0.1
KS = (10, 50, 100)
COLUMNS = ("auc", "ap", "p@10", "p@100", "s-auc-max", "s-ap-max", "s-auc-mean", "s-ap-mean", "seconds")


class TextProblem(Exception):
    """A user mistake (e.g. the BGL sample is missing): one line, exit status 2."""


def template_bigram(windows: dict[int, list[Event]], sessions: dict[int, str],
                    config: Config) -> dict[int, float]:
    """Line -> -log P(template | previous template of its session), learned window by window."""
    from nn.templates import TemplateTokenizer

    first = min(windows)
    tc = config.tokenizer.template
    tokenizer = TemplateTokenizer(tc.sim_threshold, tc.depth, tc.max_children, tc.max_templates, "none",
                                  tc.max_word_vocab, tc.oov_buckets)
    tokenizer.fit(e.text_fields for e in windows[first])
    vocab = tokenizer.param_start  # templates + unknown-template buckets (+ specials, unused)
    pairs: Counter = Counter()
    context: Counter = Counter()
    previous: dict[str, int] = {}
    out: dict[int, float] = {}
    for w in sorted(windows):
        seen = []
        for e in windows[w]:
            sid = sessions.get(e.line, "")
            t = tokenizer.encode(e.text_fields)[0]
            prev = previous.get(sid, -1)  # -1: the session's first line
            if w != first:
                out[e.line] = -math.log((pairs[prev, t] + BIGRAM_K) / (context[prev] + BIGRAM_K * vocab))
            previous[sid] = t
            seen.append((prev, t))
        for prev, t in seen:  # learn from the window only after scoring all of it
            pairs[prev, t] += 1
            context[prev] += 1
    return out


def session_line_scores(windows: dict[int, list[Event]], sessions: list[SessionScore],
                        config: Config, column: str) -> dict[int, float]:
    """Line -> the ``column`` (loss or loss_total) of its window's session score; lines of an
    unscored session (the first window) and lines without a session value get none."""
    by_key = {(s.window, s.session): getattr(s, column) for s in sessions}
    entity, inputs = config.sessions.entity, config.input
    out: dict[int, float] = {}
    for w, events in windows.items():
        for e in events:
            score = by_key.get((w, e.entity(entity, inputs)))
            if score is not None:
                out[e.line] = score
    return out


def session_lm(windows: dict[int, list[Event]], config: Config) -> dict[str, dict[int, float]]:
    """One replay with session scores: ranking suffix -> line scores (session_line_scores)."""
    sessions: list[SessionScore] = []
    for _ in replay_scores(windows, config, progress=False, on_sessions=sessions.extend):
        pass  # the event scores are the LM variants' business; the sessions are this one's
    return {suffix: session_line_scores(windows, sessions, config, column)
            for suffix, column in SESSION_RANKINGS.items()}


def session_metrics(rows: list[ScoreRow], line_session: dict[int, str],
                    session_label: dict[str, int]) -> dict:
    by_session: dict[str, list[float]] = {}
    for r in rows:
        if r.loss is not None and r.line in line_session:
            by_session.setdefault(line_session[r.line], []).append(r.loss)
    if not by_session:
        return {}
    names = sorted(by_session)
    truth = np.array([session_label[s] for s in names])
    out = {}
    for how, fn in (("max", max), ("mean", lambda v: sum(v) / len(v))):
        detection = detection_scores(truth, np.array([fn(by_session[s]) for s in names]))
        auc, ap = detection if detection else (math.nan, math.nan)
        out[f"s-auc-{how}"], out[f"s-ap-{how}"] = auc, ap
    out["sessions"], out["anomalous_sessions"] = len(names), int(truth.sum())
    return out


def line_metrics(rows: list[ScoreRow], labels: dict[int, int]) -> dict:
    losses, truth = scored_truth(rows, labels)
    detection = detection_scores(truth, losses)
    auc, ap = detection if detection else (math.nan, math.nan)
    return {"auc": auc, "ap": ap, **{f"p@{k}": v for k, v in precision_at_k(truth, losses, KS).items()},
            "positives": int(truth.sum()), "scored": len(losses)}


def run_seed(profile: str, seed: int, args, folder: Path) -> dict[str, dict]:
    """Every method on one log: the sessions profile generated with ``seed``; BGL with the LM
    seeded by ``seed`` (the data is fixed)."""
    if profile == "bgl":
        if not BGL_LOG.exists():
            raise TextProblem(f"{BGL_LOG} not found: the bgl profile reads the shared BGL sample")
        log, example = BGL_LOG, "bgl"
        labels = {n: int(not line.startswith(b"- ")) for n, line in read_lines(log)}
        line_session: dict[int, str] = {}
        session_label: dict[str, int] = {}
    else:
        small = dict(users=12, computers=32, days=3, events_per_day=400, redteam_events=12)
        full = dict(users=60, computers=120, days=4, events_per_day=6000, redteam_events=60)
        sizes = {**(small if args.small else full),
                 **{k: v for k, v in (("days", args.days), ("events_per_day", args.events_per_day)) if v}}
        log, labels_path = folder / f"sessions-{seed}.log", folder / f"sessions-{seed}.labels.csv"
        write_sessions(GenerateSpec(**sizes, seed=seed, profile="sessions"), log, labels_path)
        example = "sessions"
        with open(labels_path) as f:
            rows = list(csv.DictReader(f))
        labels = {int(r["line"]): int(r["label"]) for r in rows}
        line_session = {int(r["line"]): r["session"] for r in rows}
        with open(session_labels_path(labels_path)) as f:
            session_label = {r["session"]: int(r["label"]) for r in csv.DictReader(f)}
    small_model = ["model.rnn.hidden_size=16", "model.gpt.n_embd=16", "model.gpt.n_layer=1",
                   "sessions.hidden_size=16", "training.epochs=1"]
    overrides = [*(small_model if args.small else []), *args.set, f"seed={seed}"]
    config_path = ROOT / "examples" / f"{example}.yaml"
    base = load_config(config_path, overrides)
    windows, _ = parse_file(log, base)
    raw = {n: line.rstrip(b"\r\n") for n, line in read_lines(log)}
    from detect import byte_trigram, rows_from_losses  # the same baselines as the auth profiles

    methods = {
        "byte-3gram": lambda: byte_trigram(windows, raw, mask_digits=False),
        "byte-3gram-masked": lambda: byte_trigram(windows, raw, mask_digits=True),
    }
    if line_session:
        methods["template-bigram"] = lambda: template_bigram(windows, line_session, base)
    session_runs: dict[str, dict[str, dict[int, float]]] = {}  # one replay per session-LM variant
    for variant in args.lm or DEFAULT_LMS:
        name, _, extra = variant.partition(":")
        more = [s for s in extra.split(";") if s]
        if name.split(" ")[0] == SESSION_LM:
            if not line_session:
                continue  # BGL has no session ids: no session labels to rank against
            config = load_config(config_path, [*overrides, "sessions.entity=session", *more])
            for suffix in SESSION_RANKINGS:
                methods[f"{name}{suffix}"] = lambda config=config, name=name, suffix=suffix: (
                    session_runs.get(name) or session_runs.setdefault(name, session_lm(windows, config))
                )[suffix]
            continue
        if name not in TEXT_LM_PRESETS and not extra:
            raise TextProblem(f"--lm {variant!r}: unknown text-log variant; use one of "
                              f"{', '.join(TEXT_LM_PRESETS)}, {SESSION_LM} or NAME:key=value;key=value")
        # Session scores off (examples/sessions.yaml turns them on): they need the template
        # tokenizer, and the line variants are scored by their event losses only.
        config = load_config(config_path, [*overrides, "sessions.entity=",
                                           *TEXT_LM_PRESETS.get(name, []), *more])
        methods[f"LM {name}"] = lambda config=config: {
            s.event.line: s.loss for s in replay_scores(windows, config, progress=False)
            if s.loss is not None}
    results: dict[str, dict] = {}
    for name, method in methods.items():
        started = time.perf_counter()
        rows = rows_from_losses(windows, base, method())
        results[name] = {**line_metrics(rows, labels), **session_metrics(rows, line_session, session_label),
                         "seconds": time.perf_counter() - started}
    return results
