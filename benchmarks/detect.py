"""Detection quality: the configured language models against two counting baselines, on the same
generated logs and the same windows, over several seeds.

Run: OMP_NUM_THREADS=1 python benchmarks/detect.py [--profile realistic --profile simple]
         [--seeds 3] [--lm default --lm char-LSTM --lm word-GPT] [--set key=value] [--small]

Methods (every one scores window w with what it learned from windows < w; the first window is
left unscored, as the LM leaves it):
- LM variants: ``pipeline.replay``'s parse_file + replay_scores with config.yaml (+ --set, + the
  variant's overrides); ``default`` is config.yaml as it is. Each ranks by its raw loss.
- LM variant+norm: the same losses (no extra training) as the entity-normalised score of
  pipeline/normalise.py (alerting.normalise of the config, else user): detection and alerts
  ranked by it, as `pipeline top` / `pipeline alerts` rank them.
- pair-rarity: for the pairs (user, dst), (src, dst), (user, src), (user, auth type),
  -sum log((count + 1) / (N + K)): count = the pair's events in earlier windows, N = earlier
  events, K = distinct pairs of that kind seen + 1 (add-one smoothing over seen pairs + unseen).
- pair-rarity-cond: -sum log((count + 1) / (first + 2)), first = earlier events of the pair's
  first member (how unusual the destination is *for this user*, not in general).
- byte-3gram (and byte-3gram-masked, digits -> 0): mean negative log-probability per byte of the
  raw line under an add-k smoothed byte trigram model of the earlier windows' lines.

Metrics per method: ROC AUC, average precision, precision@10/50/100 (pipeline.stats /
pipeline.evaluate) and the precision of the 20 highest alerts that pipeline.alerting's rules
(config section alerting, with normalise [] except for +norm) raise on the method's scores, as
`pipeline alerts --labels` reports.
``seconds`` is the wall time of the method plus its metrics (noisy on a shared machine).
Baselines are comparators for this benchmark, not a product feature.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "benchmarks"))  # detect_text.py, also when a test loads this file
import detect_text  # noqa: E402  (the sessions profile and BGL)
from detect_text import PROFILES as TEXT_PROFILES  # noqa: E402

from pipeline.alerting import alert_record, alerts_from_rows, row_scores  # noqa: E402
from pipeline.alertview import highest  # noqa: E402
from pipeline.config import Config, ConfigError, load_config  # noqa: E402
from pipeline.evaluate import precision_at_k, read_labels, scored_truth  # noqa: E402
from pipeline.generate import GenerateSpec, write_log  # noqa: E402
from pipeline.parsing import Event, read_lines  # noqa: E402
from pipeline.replay import parse_file, replay_scores  # noqa: E402
from pipeline.scorefile import ScoreRow  # noqa: E402
from pipeline.stats import detection_scores  # noqa: E402

# Named LM variants: overrides on top of config.yaml and --set. "NAME:k=v;k=v" adds others.
LM_PRESETS = {
    "default": [],
    "char-LSTM": ["tokenizer.kind=char", "model.kind=rnn"],
    "word-GPT": ["tokenizer.kind=word", "model.kind=gpt"],
    "word-LSTM-fixed-att": ["tokenizer.kind=word", "model.kind=rnn", "model.rnn.attention=fixed"],
    "word-LSTM-syntax-att": ["tokenizer.kind=word", "model.kind=rnn", "model.rnn.attention=syntax"],
    "word-LSTM-ctx": ["tokenizer.kind=word", "model.kind=rnn", "model.context.entity=user"],
}
# (first, second) field pairs counted by the pair-rarity baselines (LANL column names).
PAIRS = (("src_user", "dst_computer"), ("src_computer", "dst_computer"),
         ("src_user", "src_computer"), ("src_user", "auth_type"))
TRIGRAM_K = 0.1  # add-k smoothing of the byte trigram model
KS = (10, 50, 100)
TOP_ALERTS = 20
FULL = dict(users=60, computers=120, days=4, events_per_day=6000, redteam_events=60)
SMALL = dict(users=12, computers=32, days=3, events_per_day=400, redteam_events=12)
SMALL_MODEL = ["model.rnn.hidden_size=16", "model.gpt.n_embd=16", "model.gpt.n_layer=1",
               "training.epochs=1"]


class Problem(Exception):
    """A user mistake: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- baselines


def pair_rarity(windows: dict[int, list[Event]], conditional: bool) -> dict[int, float]:
    """Line -> pair-rarity score (higher = rarer) for every event after the first window."""
    pairs: list[Counter] = [Counter() for _ in PAIRS]
    firsts: list[Counter] = [Counter() for _ in PAIRS]
    seen = 0
    out: dict[int, float] = {}
    for index, w in enumerate(sorted(windows)):
        events = windows[w]
        keys = [[(e.fields.get(a, ""), e.fields.get(b, "")) for a, b in PAIRS] for e in events]
        if index > 0:
            for event, event_keys in zip(events, keys):
                score = 0.0
                for p, key in enumerate(event_keys):
                    count = pairs[p][key]
                    if conditional:
                        score -= math.log((count + 1) / (firsts[p][key[0]] + 2))
                    else:
                        score -= math.log((count + 1) / (seen + len(pairs[p]) + 1))
                out[event.line] = score
        for event_keys in keys:  # learn from the window only after scoring all of it
            for p, key in enumerate(event_keys):
                pairs[p][key] += 1
                firsts[p][key[0]] += 1
        seen += len(events)
    return out


def _trigram_ids(lines: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(trigram id b0<<16|b1<<8|b2 for each predicted byte, its line's index): every line is
    framed as STX STX line LF, so its first bytes are predicted from a line start."""
    framed = [b"\x02\x02" + line + b"\n" for line in lines]
    buf = np.frombuffer(b"".join(framed), dtype=np.uint8).astype(np.int64)
    lengths = np.array([len(f) for f in framed], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    ids = (buf[:-2] << 16) | (buf[1:-1] << 8) | buf[2:]  # the trigram ending at position i + 2
    owner = np.repeat(np.arange(len(lines)), lengths)[2:]
    # Drop trigrams that straddle two lines: those ending at a line's first two (STX) bytes.
    pos = np.arange(2, len(buf)) - np.repeat(starts, lengths)[2:]
    keep = pos >= 2
    return ids[keep], owner[keep]


def byte_trigram(windows: dict[int, list[Event]], raw: dict[int, bytes],
                 mask_digits: bool) -> dict[int, float]:
    """Line -> mean negative log-probability per byte under an add-k smoothed byte trigram model
    trained on the earlier windows' raw lines."""
    tri = np.zeros(1 << 24, dtype=np.int64)
    ctx = np.zeros(1 << 16, dtype=np.int64)
    out: dict[int, float] = {}
    for index, w in enumerate(sorted(windows)):
        events = windows[w]
        lines = [raw[e.line] for e in events]
        if mask_digits:
            lines = [re.sub(rb"[0-9]", b"0", line) for line in lines]
        ids, owner = _trigram_ids(lines)
        if index > 0:
            nll = -(np.log(tri[ids] + TRIGRAM_K) - np.log(ctx[ids >> 8] + 256 * TRIGRAM_K))
            sums = np.bincount(owner, weights=nll, minlength=len(lines))
            counts = np.bincount(owner, minlength=len(lines))
            for event, s, c in zip(events, sums, counts):
                out[event.line] = float(s / c)
        unique, counts = np.unique(ids, return_counts=True)
        tri[unique] += counts
        np.add.at(ctx, unique >> 8, counts)
    return out


# ----------------------------------------------------------------------------- scoring runs


def rows_from_losses(windows: dict[int, list[Event]], config: Config,
                     losses: dict[int, float]) -> list[ScoreRow]:
    """Score rows as replay writes them (first window without a loss) for any method."""
    rows = []
    for w in sorted(windows):
        for e in windows[w]:
            loss = losses.get(e.line)
            rows.append(ScoreRow(e.line, e.time, w,
                                 {n: e.entity(n, config.input) for n in config.input.entities},
                                 loss, loss))
    return rows


def lm_losses(windows: dict[int, list[Event]], config: Config) -> dict[int, float]:
    return {s.event.line: s.loss for s in replay_scores(windows, config, progress=False)
            if s.loss is not None}


def metrics(rows: list[ScoreRow], labels: dict[int, int], config: Config,
            normalise: list[str] | tuple[str, ...] = ()) -> dict:
    """The metrics of the rows' losses, or with ``normalise`` (entity names) of their
    entity-normalised scores (pipeline/normalise.py), alerts ranked by them too."""
    alerting = dataclasses.replace(config.alerting, normalise=list(normalise))
    if normalise:
        rows = [dataclasses.replace(r, loss=s) for r, s in zip(rows, row_scores(rows, alerting))]
    losses, truth = scored_truth(rows, labels)
    detection = detection_scores(truth, losses)
    auc, ap = detection if detection else (math.nan, math.nan)
    # (the alert rules read the score from loss when normalise is [])
    alerts = highest([alert_record(a) for a in alerts_from_rows(rows, alerting)], TOP_ALERTS)
    hits = sum(labels.get(a["line"], 0) for a in alerts)
    return {"auc": auc, "ap": ap, **{f"p@{k}": v for k, v in precision_at_k(truth, losses, KS).items()},
            "alert@20": hits / len(alerts) if alerts else 0.0, "alerts": len(alerts),
            "positives": int(truth.sum()), "scored": len(losses)}


def lm_config(base: Path, overrides: list[str], variant: str) -> tuple[str, Config]:
    """(name, config) of an LM variant: a preset name, or NAME:key=value;key=value."""
    name, _, extra = variant.partition(":")
    if name not in LM_PRESETS and not extra:
        raise Problem(f"--lm {variant!r}: unknown variant; use one of {', '.join(LM_PRESETS)} "
                      f"or NAME:key=value;key=value")
    more = [s for s in extra.split(";") if s]
    if any(s.split("=", 1)[0].split(".")[0] in ("window", "input") for s in more):
        raise Problem(f"--lm {variant!r}: window.* and input.* must be the same for every method; "
                      f"pass them with --set")
    return name, load_config(base, [*overrides, *LM_PRESETS.get(name, []), *more])


def run_seed(profile: str, seed: int, args, folder: Path) -> dict[str, dict]:
    sizes = {**(SMALL if args.small else FULL),
             **{k: v for k, v in (("days", args.days), ("events_per_day", args.events_per_day)) if v}}
    spec = GenerateSpec(**sizes, seed=seed, profile=profile)
    log, labels_path = folder / f"{profile}-{seed}.csv", folder / f"{profile}-{seed}.labels.csv"
    try:
        write_log(spec, log, labels_path)
    except ValueError as exc:  # a spec the generator refuses (too few users / computers)
        raise Problem(f"cannot generate the {profile} log: {exc}") from exc
    labels = read_labels(labels_path)
    overrides = [*(SMALL_MODEL if args.small else []), *args.set]
    base = load_config(args.config, overrides)
    windows, _ = parse_file(log, base)
    raw = {n: line.rstrip(b"\r\n") for n, line in read_lines(log)}
    results: dict[str, dict] = {}
    methods = {
        "pair-rarity": lambda: pair_rarity(windows, conditional=False),
        "pair-rarity-cond": lambda: pair_rarity(windows, conditional=True),
        "byte-3gram": lambda: byte_trigram(windows, raw, mask_digits=False),
        "byte-3gram-masked": lambda: byte_trigram(windows, raw, mask_digits=True),
    }
    for variant in args.lm:
        name, config = lm_config(args.config, overrides, variant)
        methods[f"LM {name}"] = lambda config=config: lm_losses(windows, config)
    for name, method in methods.items():
        started = time.perf_counter()
        losses = method()
        rows = rows_from_losses(windows, base, losses)
        result = metrics(rows, labels, base)
        result["seconds"] = time.perf_counter() - started
        results[name] = result
        if name.startswith("LM "):  # the same losses, entity-normalised: no extra training
            started = time.perf_counter()
            result = metrics(rows, labels, base, base.alerting.normalise or ["user"])
            results[f"{name}+norm"] = {**result, "seconds": time.perf_counter() - started}
    return results


COLUMNS = ("auc", "ap", "p@10", "p@50", "p@100", "alert@20", "seconds")


def table(title: str, results: dict[str, dict], columns: tuple[str, ...] = COLUMNS,
          width: int = 10) -> str:
    lines = [title, f"{'method':<22}" + "".join(f"{c:>{width}}" for c in columns)]
    for name, r in results.items():
        lines.append(f"{name:<22}" + "".join(f"{r.get(c, math.nan):>{width}.3f}" for c in columns))
    return "\n".join(lines)


def mean_over_seeds(per_seed: list[dict[str, dict]], columns: tuple[str, ...] = COLUMNS) -> dict[str, dict]:
    return {name: {c: float(np.mean([s[name].get(c, math.nan) for s in per_seed])) for c in columns}
            for name in per_seed[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", action="append", choices=("realistic", "simple", *TEXT_PROFILES),
                        help="generator profile, or bgl (the shared BGL sample); text logs "
                             "(sessions, bgl): benchmarks/detect_text.py (repeatable; default: "
                             "realistic and simple)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N per profile (default 3)")
    parser.add_argument("--lm", action="append",
                        help=f"LM variant: {', '.join(LM_PRESETS)} or NAME:key=value;key=value "
                             f"(repeatable; default: default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every method (window.*, model.*, ...)")
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--days", type=int, help="days per log (default 4; --small: 3)")
    parser.add_argument("--events-per-day", type=int, help="default 6000; --small: 400")
    parser.add_argument("--small", action="store_true",
                        help="tiny logs and a tiny model, for a smoke test in seconds")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args(argv)
    args.profile = args.profile or ["realistic", "simple"]
    text_lm, args.lm = args.lm, args.lm or ["default"]  # text logs have variants of their own
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    everything = {}
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for profile in args.profile:
                text = profile in TEXT_PROFILES
                columns = detect_text.COLUMNS if text else COLUMNS  # text: session columns too
                width = 11 if text else 10
                per_seed = []
                for seed in range(1, args.seeds + 1):
                    results = detect_text.run_seed(profile, seed, argparse.Namespace(
                        **{**vars(args), "lm": text_lm}), Path(tmp)) if text \
                        else run_seed(profile, seed, args, Path(tmp))
                    positives = next(iter(results.values()))["positives"]
                    print(table(f"\n{profile} profile, seed {seed} ({positives} red-team events "
                                f"scored)", results, columns, width), flush=True)
                    per_seed.append(results)
                mean = mean_over_seeds(per_seed, columns)
                print(table(f"\n{profile} profile, mean over {args.seeds} seeds", mean, columns, width),
                      flush=True)
                everything[profile] = {"seeds": per_seed, "mean": mean}
    except (Problem, ConfigError, detect_text.TextProblem) as exc:
        print(f"detect.py: {exc}", file=sys.stderr)
        return 2
    print(f"\ntotal {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
