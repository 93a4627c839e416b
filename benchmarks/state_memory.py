"""Bounded state: the alerter's memory with many distinct entities.

Run: python benchmarks/state_memory.py [--events 200000 --windows 8 --max-entities 100000]

Alerter: each window has ``--events`` scored events, every one from a new user (so 200k new
entities a window by default, plus 1,000 hosts), judged by the alert engine and saved as the
alerter stage saves it (write_state through the atomic writer; the kept losses in a scratch file
beside it, pipeline/losstore.py), in its own process so that peak RSS is its own. Printed per
window: RSS now, peak RSS so far, histories kept, state file size, seconds.
With the cap, RSS must be flat once the cap is reached; ``--unbounded`` adds the same run with no
cap beside it. (The windower holds no events any more, only a count per open window: its
per-event measurement is gone.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def alerter_run(events: int, windows: int, max_entities: int) -> list[dict]:
    """Runs inside the child process."""
    from pipeline.alerting import AlertEngine, write_state
    from pipeline.atomic import atomic_write
    from pipeline.config import AlertingConfig

    rng = random.Random(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engine = AlertEngine(replace(AlertingConfig(), max_entities=max_entities), tmp)
        state = Path(tmp) / "alerter.npz"
        for w in range(windows):
            records = [{"source": {"topic": "salka.raw", "partition": 0, "offset": w * events + i},
                        "line": w * events + i + 1, "event_time": w * 86400.0 + i * 0.4, "window": w,
                        "entities": {"user": f"U{w}-{i}@DOM1", "src_host": f"C{i % 1000}",
                                     "dst_host": ""},
                        "loss": rng.gauss(3.0, 0.5), "raw": ""} for i in range(events)]
            started = time.monotonic()
            alerts = engine.judge_window(w, records)
            with atomic_write(state) as handle:
                write_state(engine, {"resume_offset": w}, handle)
            del records
            rows.append({"window": w, "rss_mb": round(rss_mb(), 1), "peak_rss_mb": round(peak_mb(), 1),
                         "histories": len(engine.histories), "evicted": engine.evicted,
                         "alerts": len(alerts), "state_mb": round(state.stat().st_size / 2**20, 2),
                         "seconds": round(time.monotonic() - started, 1)})
    return rows


def child(args: argparse.Namespace) -> None:
    print(json.dumps(alerter_run(args.events, args.windows, args.max_entities)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="new entities per window")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--max-entities", type=int, default=100_000)
    parser.add_argument("--unbounded", action="store_true", help="also run without a cap")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    caps = [args.max_entities] + ([10**12] if args.unbounded else [])
    for cap in caps:
        out = subprocess.run([sys.executable, __file__, "--child", "--events", str(args.events),
                              "--windows", str(args.windows), "--max-entities", str(cap)],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
        label = "unbounded" if cap == 10**12 else f"max_entities={cap}"
        print(f"alerter, {args.events} new entities per window, {label}:")
        print(f"  {'window':>6} {'rss MB':>8} {'peak MB':>8} {'histories':>10} {'evicted':>9} "
              f"{'state MB':>9} {'s':>5}")
        for row in json.loads(out.strip().splitlines()[-1]):
            print(f"  {row['window']:>6} {row['rss_mb']:>8} {row['peak_rss_mb']:>8} "
                  f"{row['histories']:>10} {row['evicted']:>9} {row['state_mb']:>9} {row['seconds']:>5}")


if __name__ == "__main__":
    main()
