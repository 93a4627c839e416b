"""Streaming throughput: each stage alone, the whole pipeline, and replay on the same data.

Run: python benchmarks/stream.py [--days 3 --events-per-day 4000]
Uses the embedded broker (or KAFKA_BOOTSTRAP_SERVERS). Every stage runs as its own process, as
in production. "Alone" means the stage drains a topic that was filled beforehand, timed from its
partition assignment (after start-up and group join) to its last output. Compare ratios measured
in this one run; absolute numbers on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
import uuid
from pathlib import Path

from pipeline.broker import EmbeddedBroker
from pipeline.config import config_from_dict, config_to_dict, load_config
from pipeline.demo import ArchiveCounter, StageProcesses
from pipeline.generate import GenerateSpec, write_log
from pipeline.kafka import create_topics
from pipeline.produce import produce_file
from pipeline.replay import replay
from pipeline.topicread import TopicReader

ROOT = Path(__file__).resolve().parent.parent


def count_records(reader: TopicReader) -> int:
    """Records in the reader's topic so far, after one more poll."""
    reader.poll(timeout=0.1, max_records=5000)
    return reader.count


def assigned_at(log: Path, stage: str, timeout: float = 60) -> float:
    """Wall time at which the stage logged its (non-empty) partition assignment."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and re.search(rf"{stage} assigned \[.+\]", log.read_text()):
            return time.time()
        time.sleep(0.05)
    raise TimeoutError(f"{stage} never got partitions")


def wait_until(predicate, timeout: float = 1800) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return time.time()
        time.sleep(0.05)
    raise TimeoutError("benchmark step did not finish")


def fresh_config(base, workdir: Path, bootstrap: str):
    run = f"bench{uuid.uuid4().hex[:8]}"
    data = config_to_dict(base)
    data["kafka"] = {**data["kafka"], "bootstrap.servers": bootstrap}
    data["topics"] = {**data["topics"], **{k: f"{run}.{k}" for k in
                      ("raw", "tokens", "windows", "scores", "dead_letters", "late", "alerts",
                       "models")}}
    data["streaming"] = {**data["streaming"], "group_prefix": run,
                         "state_dir": str(workdir / run / "state"),
                         "archive_dir": str(workdir / run / "archive")}
    config = config_from_dict(data)
    path = workdir / f"{run}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config_to_dict(config)))
    create_topics(config)
    return config, path


def drain_alone(base, work: Path, bootstrap: str, log: Path, n: int, windows: int,
                metrics: bool) -> dict[str, float]:
    """Tokenizer, then windower, each alone over a pre-filled topic: events/s from assignment.
    With ``metrics`` the stage serves /metrics, scraped every second as Prometheus would."""
    import socket
    import urllib.request

    port = 0
    if metrics:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    data = config_to_dict(base)
    data["metrics"] = {**data["metrics"], "port": port, "host": "127.0.0.1"}
    config, path = fresh_config(config_from_dict(data), work, bootstrap)
    produce_file(config, log)
    logs = work / f"logs-{uuid.uuid4().hex[:6]}"
    stages = StageProcesses(path, logs)
    rates = {}
    try:
        for stage, expected, topic in (("tokenizer", n + config.topics.partitions, config.topics.tokens),
                                       ("windower", n + windows, config.topics.windows)):
            counter = TopicReader(config, [topic], "bench")
            stages.start(stage)
            if hasattr(os, "sched_setaffinity"):  # same core for the stage on both sides
                os.sched_setaffinity(stages.processes[-1][1].pid, {os.cpu_count() - 1})
            t0 = assigned_at(logs / f"{stage}-0.log", stage)
            scraped = [time.time()]

            def done(c=counter, e=expected, scraped=scraped) -> bool:
                if port and time.time() - scraped[0] >= 1.0:  # a 1 s scrape interval
                    scraped[0] = time.time()
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
                return count_records(c) >= e

            rates[stage] = n / (wait_until(done) - t0)
            stages.stop()
            stages.processes.clear()
    finally:
        stages.stop()
    return rates


def metrics_compare(base, work: Path, log: Path, n: int, windows: int, rounds: int,
                    external: str | None) -> None:
    """Metrics off vs on, alternating the order each round so drift on a loaded machine hits
    both sides alike; the ratio of medians is the metrics' cost."""
    import statistics

    broker = None if external else EmbeddedBroker().start()
    try:
        bootstrap = external or broker.bootstrap
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for round_ in range(rounds):
            for metrics in ((False, True) if round_ % 2 == 0 else (True, False)):
                rates = drain_alone(base, work, bootstrap, log, n, windows, metrics)
                runs[metrics].append(rates)
                print(f"round {round_ + 1} metrics {'on ' if metrics else 'off'}: "
                      + ", ".join(f"{s} {r:.0f}/s" for s, r in rates.items()), flush=True)
    finally:
        if broker is not None:
            broker.stop()
    print(f"{'stage':<12} {'off ev/s':>10} {'on ev/s':>10} {'on/off':>8}  (medians of {rounds})")
    for stage in runs[False][0]:
        off = statistics.median(r[stage] for r in runs[False])
        on = statistics.median(r[stage] for r in runs[True])
        print(f"{stage:<12} {off:>10.0f} {on:>10.0f} {on / off:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--events-per-day", type=int, default=4000)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override, e.g. --set tokenizer.kind=char")
    parser.add_argument("--metrics-compare", type=int, default=0, metavar="ROUNDS",
                        help="instead: tokenizer and windower alone with metrics off and on, "
                             "alternating, ROUNDS times each; prints the throughput ratio")
    args = parser.parse_args()
    base = load_config(ROOT / "config.yaml", args.overrides)
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        log = work / "auth.csv"
        summary = write_log(GenerateSpec(days=args.days, events_per_day=args.events_per_day),
                            log, work / "labels.csv")
        n = summary["events"]
        windows = args.days
        print(f"{n} events, {windows} windows; tokenizer={base.tokenizer.kind} model={base.model.kind}")
        if args.metrics_compare:
            return metrics_compare(base, work, log, n, windows, args.metrics_compare, external)

        started = time.time()
        replay(log, work / "replay.csv.gz", base, progress=False)
        replay_s = time.time() - started

        broker = None if external else EmbeddedBroker().start()
        try:
            bootstrap = external or broker.bootstrap
            results = {}
            # ---- each stage alone, draining a pre-filled topic
            config, path = fresh_config(base, work, bootstrap)
            produce_file(config, log)
            stages = StageProcesses(path, work / "logs-alone")
            try:
                steps = [
                    ("tokenizer", lambda c: count_records(c) >= n + config.topics.partitions,
                     config.topics.tokens),
                    ("windower", lambda c: count_records(c) >= n + windows, config.topics.windows),
                    ("trainer", lambda c: count_records(c) >= n + windows, config.topics.scores),
                ]
                for stage, done, topic in steps:
                    counter = TopicReader(config, [topic], "bench")
                    stages.start(stage)
                    t0 = assigned_at(work / "logs-alone" / f"{stage}-0.log", stage)
                    results[stage] = n / (wait_until(lambda d=done, c=counter: d(c)) - t0)
                archive = ArchiveCounter(Path(config.streaming.archive_dir))
                stages.start("archiver")
                t0 = assigned_at(work / "logs-alone" / "archiver-0.log", "archiver")
                results["archiver"] = n / (wait_until(lambda: archive.count()[0] >= n) - t0)
            finally:
                stages.stop()
            # ---- the whole pipeline, stages running before the data arrives
            config, path = fresh_config(base, work, bootstrap)
            stages = StageProcesses(path, work / "logs-whole")
            try:
                for stage in ("tokenizer", "windower", "trainer", "scorer", "archiver"):
                    stages.start(stage)
                for stage in ("tokenizer", "windower", "trainer", "scorer", "archiver"):
                    assigned_at(work / "logs-whole" / f"{stage}-0.log", stage)
                archive = ArchiveCounter(Path(config.streaming.archive_dir))
                t0 = time.time()
                produce_file(config, log)
                whole_s = wait_until(lambda: archive.count()[0] >= n) - t0
            finally:
                stages.stop()
        finally:
            if broker is not None:
                broker.stop()

        print(f"{'what':<28} {'events/s':>10}")
        print(f"{'replay (offline)':<28} {n / replay_s:>10.0f}")
        for stage, rate in results.items():
            print(f"{stage + ' alone':<28} {rate:>10.0f}")
        print(f"{'whole pipeline':<28} {n / whole_s:>10.0f}")
        print(f"streaming/replay ratio: {replay_s / whole_s:.2f}")


if __name__ == "__main__":
    main()
