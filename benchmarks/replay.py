"""Replay throughput: tokenize-only events/s per tokenizer; events/s for training and for
scoring, and peak RSS, per model setup.

Run: python benchmarks/replay.py [--days 3 --events-per-day 4000] [--tokenize-only]
Each setup runs in its own process (so peak RSS is its own) on the same generated log, side by
side in one run: compare the ratios, not the absolute numbers (machines here are noisy).
Tokenizing is timed in this process, on the parsed events (the LANL fields the model reads) and
on the whole raw lines as one free-text field (long lines with unique numbers, like syslog).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SETUPS = {
    "char-LSTM": ["tokenizer.kind=char", "model.kind=rnn"],
    "char-GPT": ["tokenizer.kind=char", "model.kind=gpt"],
    "word-LSTM": ["tokenizer.kind=word", "model.kind=rnn"],
    "BPE-GPT": ["tokenizer.kind=bpe", "model.kind=gpt"],
}


def measure(log_path: str, overrides: list[str]) -> dict:
    """Runs inside the child process: parse, then time score and train per window."""
    from pipeline.config import load_config
    from pipeline.learner import WindowLearner
    from pipeline.replay import parse_file

    config = load_config(ROOT / "config.yaml", overrides)
    windows, _ = parse_file(log_path, config)
    learner = WindowLearner(config)
    train_s = score_s = 0.0
    trained = scored = 0
    for index in sorted(windows):
        events = windows[index]
        start = time.perf_counter()
        scores = learner.score(index, events)
        score_s += time.perf_counter() - start
        scored += sum(s.loss is not None for s in scores)
        start = time.perf_counter()
        learner.train(index, events)
        train_s += time.perf_counter() - start
        trained += len(events) * config.training.epochs
    return {
        "train_events_per_s": trained / train_s,
        "score_events_per_s": scored / score_s if score_s else float("nan"),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def tokenize_throughput(log_path: Path, repeats: int = 3) -> list[tuple[str, str, float, float]]:
    """(tokenizer, input, events/s, tokens/s): encode_event over every event, best of
    ``repeats`` passes, each by a fresh copy of the tokenizer (cold caches: one pass over a log is
    what a stage does); vocabularies / merges are fitted first on the first day, untimed."""
    from nn.tokenizers import encode_event, join_fields, tokenizer_from_state
    from pipeline.config import load_config
    from pipeline.modelspec import make_tokenizer
    from pipeline.parsing import Event, LineParser, read_lines

    config = load_config(ROOT / "config.yaml")
    parser = LineParser(config.input)
    parsed = [(parser.parse(raw, n), raw.decode().rstrip("\n")) for n, raw in read_lines(log_path)]
    events = [(e, raw) for e, raw in parsed if isinstance(e, Event)]
    first_day = events[0][0].time + 86400
    inputs = {}
    for name, view in (("fields", lambda e, raw: e.text_fields), ("line", lambda e, raw: (("text", raw),))):
        fields = [view(e, raw) for e, raw in events]
        inputs[name] = (fields, [f for f, (e, _) in zip(fields, events) if e.time < first_day])
    rows = []
    for kind in ("char", "word", "bpe"):
        for name, (fields, sample) in inputs.items():
            fitted = make_tokenizer(load_config(ROOT / "config.yaml", [f"tokenizer.kind={kind}"]))
            fitted.fit(sample)
            encoders = {kind: lambda tok, f: encode_event(tok, f, config.tokenizer.max_tokens)}
            if kind == "bpe":  # the library called once per line: what the caches save
                encoders["bpe (library/line)"] = lambda tok, f: tok._tok.encode(
                    join_fields(f), add_special_tokens=False).ids
            for label, encode in encoders.items():
                best, tokens = float("inf"), 0
                for _ in range(repeats):
                    tok = tokenizer_from_state(fitted.state_dict())
                    start = time.perf_counter()
                    tokens = sum(len(encode(tok, f)) for f in fields)
                    best = min(best, time.perf_counter() - start)
                rows.append((label, name, len(fields) / best, tokens / best))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--events-per-day", type=int, default=4000)
    parser.add_argument("--setups", nargs="*", default=list(SETUPS))
    parser.add_argument("--tokenize-only", action="store_true", help="Skip the model setups.")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], SETUPS[args.child[1]])))
        return

    from pipeline.generate import GenerateSpec, write_log

    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "auth.csv"
        spec = GenerateSpec(days=args.days, events_per_day=args.events_per_day)
        summary = write_log(spec, log, Path(folder) / "labels.csv")
        print(f"{summary['events']} events, {args.days} daily windows, config.yaml + setup overrides")
        print("\ntokenize only (one process; fields = the model fields, line = the raw line as text)")
        print(f"{'tokenizer':<20} {'input':<7} {'events/s':>10} {'tokens/s':>11}")
        for label, name, events_s, tokens_s in tokenize_throughput(log):
            print(f"{label:<20} {name:<7} {events_s:>10.0f} {tokens_s:>11.0f}")
        if args.tokenize_only:
            return
        print()
        print(f"{'setup':<10} {'train ev/s':>11} {'score ev/s':>11} {'peak RSS MB':>12}")
        for name in args.setups:
            out = subprocess.run([sys.executable, __file__, "--child", str(log), name],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{name:<10} {r['train_events_per_s']:>11.0f} {r['score_events_per_s']:>11.0f} "
                  f"{r['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
