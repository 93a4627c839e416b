"""Bounded state: the alerter's memory with many distinct entities, and the windower's bytes per
buffered event.

Run: python benchmarks/state_memory.py [--events 200000 --windows 8 --max-entities 100000]

Alerter: each window has ``--events`` scored events, every one from a new user (so 200k new
entities a window by default, plus 1,000 hosts), judged by the alert engine and saved as the
alerter stage saves it (write_state through the atomic writer; the kept losses in a scratch file
beside it, pipeline/losstore.py), in its own process so that peak RSS is
its own. Printed per window: RSS now, peak RSS so far, histories kept, state file size, seconds.
With the cap, RSS must be flat once the cap is reached; ``--unbounded`` adds the same run with no
cap beside it. Windower: tracemalloc bytes per buffered event, for realistic LANL events with
char token ids. ``--baseline-windower FILE`` measures another windower.py (e.g. an older one from
``git show``) beside the current one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
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


def windower_bytes_per_event(module_path: Path | None, events: int) -> float:
    from confluent_kafka import Message

    from pipeline.config import config_from_dict
    from pipeline.serde import codec
    from pipeline.windowing import Watermark

    if module_path is None:
        from pipeline.stages.windower import WindowerStage
    else:
        spec = importlib.util.spec_from_file_location("baseline_windower", module_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        WindowerStage = module.WindowerStage  # noqa: N806
    names = ["time", "src_user", "dst_user", "src_computer", "dst_computer", "auth_type",
             "logon_type", "auth_orientation", "success"]
    values = []
    for i in range(events):
        fields = [str(3600 + i), f"U{i % 5000}@DOM1", f"U{i % 5000}@DOM1", f"C{i % 9000}",
                  f"C{(i * 7) % 9000}", "Kerberos", "Network", "LogOn", "Success"]
        raw = ",".join(fields)
        record = {"source": {"topic": "salka.raw", "partition": i % 3, "offset": i}, "line": i + 2,
                  "event_time": float(fields[0]),
                  "fields": [{"name": n, "value": v} for n, v in zip(names, fields)],
                  "token_ids": [1] + [3 + (ord(c) % 90) for c in raw] + [2], "raw": raw}
        values.append(codec().encode("salka.TokenizedEvent", record))
    with tempfile.TemporaryDirectory() as tmp:
        stage = WindowerStage(config_from_dict({"streaming": {"state_dir": tmp}}))
        stage.watermark = Watermark(2, 0.0)  # partition 1 never reports: nothing closes
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for offset, value in enumerate(values):
            stage.handle(Message(topic="salka.tokens", partition=0, offset=offset, value=value), None)
        held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert sum(len(m) for m in stage.open.values()) == events
    return held / events


def child(args: argparse.Namespace) -> None:
    print(json.dumps(alerter_run(args.events, args.windows, args.max_entities)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="new entities per window")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--max-entities", type=int, default=100_000)
    parser.add_argument("--unbounded", action="store_true", help="also run without a cap")
    parser.add_argument("--windower-events", type=int, default=20_000)
    parser.add_argument("--baseline-windower", type=Path, help="another windower.py to compare")
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
    current = windower_bytes_per_event(None, args.windower_events)
    print(f"windower: {current:.0f} bytes per buffered event ({args.windower_events} events)")
    if args.baseline_windower:
        base = windower_bytes_per_event(args.baseline_windower, args.windower_events)
        print(f"windower baseline {args.baseline_windower}: {base:.0f} bytes per buffered event")


if __name__ == "__main__":
    main()
