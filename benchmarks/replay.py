"""Replay throughput: events/s for training and for scoring, and peak RSS, per model setup.

Run: python benchmarks/replay.py [--days 3 --events-per-day 4000]
Each setup runs in its own process (so peak RSS is its own) on the same generated log, side by
side in one run: compare the ratios, not the absolute numbers (machines here are noisy).
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
sys.path.insert(0, str(ROOT))

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--events-per-day", type=int, default=4000)
    parser.add_argument("--setups", nargs="*", default=list(SETUPS))
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
        print(f"{'setup':<10} {'train ev/s':>11} {'score ev/s':>11} {'peak RSS MB':>12}")
        for name in args.setups:
            out = subprocess.run([sys.executable, __file__, "--child", str(log), name],
                                 check=True, capture_output=True, text=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{name:<10} {r['train_events_per_s']:>11.0f} {r['score_events_per_s']:>11.0f} "
                  f"{r['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
