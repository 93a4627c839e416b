"""Score latency on arrival: produce -> score, per event, with hourly windows at a steady rate.

Run: python benchmarks/latency.py [--rate 2000 --events-per-window 10000 --windows 4 --scorers 1]

An embedded broker (or KAFKA_BOOTSTRAP_SERVERS), the topics, and every stage as its own process
(tokenizer, windower, trainer, N scorers, archiver; OMP_NUM_THREADS=1 each), as in production.
The log is generated (pipeline/generate.py) with one day per window, its event time compressed
24x so each day becomes one hour: hourly windows (window.size_seconds=3600) of
--events-per-window events each, published at --rate events/s, so each window takes
events-per-window / rate seconds of wall time. A small model (word tokenizer, LSTM d32 x 1, one
epoch) makes each model quickly: ~10 field tokens per event, where char's ~90 made a 10k-event
window take 12-17 s to train on this machine, longer than the window itself.

An event's latency is the scores record's timestamp (the scorer's produce wall clock) minus its
tokens record's timestamp (the tokenizer's), joined by the event's identity (its raw record's
topic/partition/offset). Raw records carry the event time as their timestamp, so the clock starts
at the tokens topic. Reported over all events, and over the events whose predecessor model had
been announced (models topic record timestamp) when they reached the tokens topic: issue 13's
goal (p99 <= 1 s) is about those; the others waited for the model to be trained.

Where the model-ready events' latency goes, printed under the totals: the windower's hop (tokens
-> windows record timestamp) and the scorer's (windows -> scores record), and the latency by how
long after its window's model was announced the event came. Events that came right after a model
queue behind the ones that waited for it (the scorer's backlog, about "model after" x --rate
events): draining it takes the scorer's CPU time per event x that backlog, and on 2 cores what the
other processes take meanwhile. That drain, not the batching or fetch waits (tens of ms), is the
tail. The CPU line adds the broker's, the producer's and this process's own.

--sample-events N sets training.sample_events, the issue's knob for windows far larger than
training needs: each window trains on a deterministic sample of at most N events (and the
exclusion pass of training.exclude_top_fraction scores and ranks only that sample); every event is
still scored. A model comes that much sooner after its window closes, and the events that waited
for it are fewer. Measured on this 2-core machine (README, "Score latency").
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # this process and every stage it starts

from pipeline.broker import EmbeddedBroker  # noqa: E402
from pipeline.config import Config, config_from_dict, config_to_dict, load_config  # noqa: E402
from pipeline.demo import StageProcesses  # noqa: E402
from pipeline.generate import DAY, GenerateSpec, write_log  # noqa: E402
from pipeline.kafka import create_topics  # noqa: E402
from pipeline.serde import DecodeError, codec  # noqa: E402
from pipeline.topicread import TopicReader  # noqa: E402
from pipeline.topicrecords import identity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOUR = 3600
# A model that trains a 10k-event window in 1-3 s on one idle thread, so models come quickly.
SMALL_MODEL = ["tokenizer.kind=word", "model.kind=rnn", "model.rnn.hidden_size=32",
               "model.rnn.n_layer=1", "training.epochs=1", f"window.size_seconds={HOUR}"]


# ---------------------------------------------------------------------------- set-up


def compressed_log(path: Path, windows: int, events_per_window: int, seed: int = 7) -> int:
    """A generated LANL-style log, one generated day per hour of event time (t -> day * 1 h +
    time of day / 24: order and habits kept). Returns the number of events."""
    raw = path.with_suffix(".days.csv")
    write_log(GenerateSpec(days=windows, events_per_day=events_per_window, seed=seed), raw,
              path.with_suffix(".labels.csv"))
    n = 0
    with open(raw, newline="") as src, open(path, "w", newline="") as dst:
        reader, writer = csv.reader(src), csv.writer(dst, lineterminator="\n")
        writer.writerow(next(reader))  # the header row
        for row in reader:
            t = int(row[0])
            writer.writerow([str((t // DAY) * HOUR + (t % DAY) // 24), *row[1:]])
            n += 1
    raw.unlink()
    return n


def bench_config(overrides: list[str], lateness: float = 0.0) -> Config:
    return load_config(ROOT / "config.yaml",
                       [*SMALL_MODEL, f"window.allowed_lateness_seconds={lateness}", *overrides])


def fresh_config(base: Config, work: Path, bootstrap: str, topics: dict[str, str] | None = None,
                 model_store: str | None = None) -> tuple[Config, Path]:
    """``base`` on fresh topics, groups and state (models topic included: a scorer must not find
    another run's announcements); ``topics`` (and ``model_store``) share some with an earlier run.
    The topics are created; the effective config is written for the stage processes."""
    import yaml

    run = f"bench{uuid.uuid4().hex[:8]}"
    data = config_to_dict(base)
    data["kafka"] = {**data["kafka"], "bootstrap.servers": bootstrap}
    names = {k: f"{run}.{k}" for k, v in data["topics"].items() if isinstance(v, str)}
    data["topics"] = {**data["topics"], **names, **(topics or {})}
    data["streaming"] = {**data["streaming"], "group_prefix": run,
                         "state_dir": str(work / run / "state"),
                         "archive_dir": str(work / run / "archive")}
    if model_store is not None:
        data["streaming"]["model_store"] = model_store
    config = config_from_dict(data)
    path = work / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config)))
    create_topics(config)
    return config, path


def assigned(log: Path, stage: str) -> set[str]:
    """The partitions the stage's newest assignment line names (empty: none yet)."""
    if not log.exists():
        return set()
    found = re.findall(rf"{stage} assigned \[(.*)\]", log.read_text())
    return {p.strip(" '\"") for p in found[-1].split(",") if p.strip()} if found else set()


def wait_until(predicate, timeout: float, what: str, poll: float = 0.05) -> float:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return time.time()
        time.sleep(poll)
    raise TimeoutError(f"benchmark: {what} did not happen within {timeout:.0f}s")


# --eager-consume: each stage takes a batch as soon as one record is there, not when poll_batch
# records came or 0.2 s passed (what consume(poll_batch, timeout=0.2) in pipeline/runner.py waits
# for: up to 0.2 s per hop when records trickle in). An experiment, not a setting.
EAGER_LAUNCHER = """
import sys
import pipeline.runner as runner
real = runner.make_consumer
class Eager:
    def __init__(self, consumer):
        self._consumer = consumer
    def consume(self, num_messages=1, timeout=-1):
        first = self._consumer.consume(1, timeout)
        return first + self._consumer.consume(num_messages - 1, 0) if first and num_messages > 1 else first
    def __getattr__(self, name):
        return getattr(self._consumer, name)
runner.make_consumer = lambda *args, **kwargs: Eager(real(*args, **kwargs))
sys.argv = ["pipeline", *sys.argv[1:]]
from pipeline.cli import main
main()
"""


class EagerStageProcesses(StageProcesses):
    """Stage processes whose runner consumes eagerly (``EAGER_LAUNCHER``)."""

    def start(self, stage: str, instance: int = 0) -> None:
        from pipeline import demo

        real = demo.subprocess.Popen

        def popen(argv, **kwargs):
            return real([argv[0], "-c", EAGER_LAUNCHER, *argv[3:]], **kwargs)

        demo.subprocess.Popen = popen
        try:
            super().start(stage, instance)
        finally:
            demo.subprocess.Popen = real


def start_stages(stages: StageProcesses, names: list[tuple[str, int]], config: Config) -> None:
    """Start the stages and wait until each has its partitions; scorer replicas, until together
    they hold every windows and late partition (a rebalance mid-run would add to the latency)."""
    for stage, instance in names:
        stages.start(stage, instance)
    for stage, instance in names:
        if stage != "scorer":
            wait_until(lambda s=stage, i=instance: assigned(stages.log_dir / f"{s}-{i}.log", s),
                       120, f"{stage}-{instance} assignment")
    scorers = [i for s, i in names if s == "scorer"]
    if scorers:
        want = config.topics.partitions + 1  # windows partitions + the late topic's one

        def covered() -> bool:
            held = [assigned(stages.log_dir / f"scorer-{i}.log", "scorer") for i in scorers]
            return sum(len(h) for h in held) == want and len(set().union(*held)) == want

        wait_until(covered, 120, "scorer assignment")
        time.sleep(1.0)  # a late joiner's rebalance settles
        if not covered():
            wait_until(covered, 120, "scorer assignment")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_producer(config_path: Path, log: Path, rate: float, out: Path) -> subprocess.Popen:
    """``pipeline produce --rate`` in its own process, as a log shipper would be."""
    with open(out, "ab") as handle:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "produce", "--config",
                                 str(config_path), "--input", str(log), "--rate", str(rate)],
                                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------------------- reading topics


def decoded(msg) -> tuple[str, dict] | None:
    if msg.value() is None:
        return None
    try:
        return codec().decode(msg.value())
    except DecodeError:
        return None


def ts(msg) -> float:
    return msg.timestamp()[1] / 1000


@dataclass
class Collected:
    """What the topics say: per event identity its tokens and first score timestamps, window,
    and whether the score was late; the models topic's announcements with their timestamps."""

    tokens: dict[tuple, float] = field(default_factory=dict)
    windows: dict[tuple, float] = field(default_factory=dict)  # the windower's forward
    scores: dict[tuple, float] = field(default_factory=dict)
    window: dict[tuple, int] = field(default_factory=dict)
    late: set = field(default_factory=set)
    models: list[tuple[float, dict]] = field(default_factory=list)


def read_scores(config: Config, n: int, into: Collected, timeout: float) -> None:
    """Read the scores topic until ``n`` distinct events are scored (a redelivered score counts
    once, with its first timestamp). Records are decoded once ``n`` of them have come, not as they
    come: decoding each on arrival (~40 us a record, 0.4 s of CPU per 10k) competed on 2 cores
    with the scorer draining its backlog after each model, the tail this benchmark measures."""
    deadline = time.time() + timeout
    unread: list = []
    # Each idle fetch costs the embedded broker CPU (6 idle consumers at the stages' 20 ms: ~15%
    # of a core, at 500 ms: ~1%); this reader is no part of what is measured.
    data = config_to_dict(config)
    quiet = config_from_dict({**data, "kafka": {**data["kafka"], "fetch.wait.max.ms": 500}})
    with TopicReader(quiet, [config.topics.scores], "bench-scores") as reader:
        while len(into.scores) < n:
            if time.time() > deadline:
                raise TimeoutError(f"only {len(into.scores) + len(unread)} of {n} events scored "
                                   f"after {timeout:.0f}s")
            unread.extend(reader.poll(timeout=0.5, max_records=5000))
            if len(into.scores) + len(unread) < n:  # not all scored yet, whatever repeats there are
                continue
            batch, unread = unread, []
            for msg in batch:
                got = decoded(msg)
                if got is None or got[0] != "salka.ScoredEvent":
                    continue
                key = identity(got[1])
                into.scores.setdefault(key, ts(msg))
                into.window.setdefault(key, got[1]["window"])
                if got[1]["late"]:
                    into.late.add(key)


def read_rest(config: Config, into: Collected) -> None:
    """The tokens, windows and models topics, whole."""
    topics = [config.topics.tokens, config.topics.windows, config.topics.models]
    with TopicReader(config, topics, "bench-rest") as reader:
        while not reader.at_end:
            for msg in reader.poll(timeout=0.5, max_records=5000):
                got = decoded(msg)
                if got is None:
                    continue
                name, record = got
                if name == "salka.TokenizedEvent":
                    into.tokens.setdefault(identity(record), ts(msg))
                elif name == "salka.WindowedEvent":
                    into.windows.setdefault(identity(record["event"]), ts(msg))
                elif name == "salka.ModelAnnouncement":
                    into.models.append((ts(msg), record))


# ---------------------------------------------------------------------------- figures


def model_ready_at(models: list[tuple[float, dict]], window: int) -> float | None:
    """When a model trained through an earlier window (not the empty "no model yet") was first
    announced as serving ``window``; None: never."""
    times = [t for t, r in models if r["trained_through"] is not None
             and r["trained_through"] < window <= r["serves_through"]]
    return min(times) if times else None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * q // 100) - 1))]


def summary(values: list[float]) -> str:
    if not values:
        return "no events"
    return (f"p50 {percentile(values, 50):.3f} s, p99 {percentile(values, 99):.3f} s, "
            f"max {max(values):.3f} s ({len(values)} events)")


def cell(values: list[float], q: float) -> str:
    return f"{percentile(values, q):.3f}" if values else "-"


def latency_report(data: Collected) -> dict:
    """Latencies overall, after the model, and per window (with when its model came)."""
    both = [k for k in data.scores if k in data.tokens]
    ready = {w: model_ready_at(data.models, w) for w in set(data.window.values())}
    first_token = {}
    for k in both:
        w = data.window[k]
        first_token[w] = min(first_token.get(w, float("inf")), data.tokens[k])
    rows, every, after = {}, [], []
    for k in both:
        w, lat = data.window[k], data.scores[k] - data.tokens[k]
        every.append(lat)
        rows.setdefault(w, ([], []))[0].append(lat)
        if ready[w] is not None and data.tokens[k] >= ready[w] and k not in data.late:
            after.append(lat)
            rows[w][1].append(lat)
    return {"all": every, "after_model": after, "windows": rows, "ready": ready,
            "first_token": first_token, "joined": len(both)}


SINCE_MODEL = [0.0, 0.25, 0.5, 1.0, 2.0, 5.0]  # bucket starts, seconds after the announcement


def breakdown(data: Collected, report: dict) -> list[str]:
    """Where the model-ready events' latency goes: the windower's hop (tokens -> windows record)
    and the scorer's (windows -> scores record), and the latency by how long after the window's
    model was announced the event reached the tokens topic (a scorer draining the backlog of
    events that waited for the model delays the events that come just after it)."""
    ready = report["ready"]
    hops, buckets = ([], []), {b: [] for b in SINCE_MODEL}
    for k in data.scores:
        w = data.window[k]
        if k not in data.tokens or k in data.late or ready[w] is None or data.tokens[k] < ready[w]:
            continue
        lat = data.scores[k] - data.tokens[k]
        if k in data.windows:
            hops[0].append(data.windows[k] - data.tokens[k])
            hops[1].append(data.scores[k] - data.windows[k])
        since = data.tokens[k] - ready[w]
        buckets[max(b for b in SINCE_MODEL if b <= since)].append(lat)
    lines = [f"  windower hop (tokens -> windows record): {summary(hops[0])}",
             f"  scorer hop (windows -> scores record):   {summary(hops[1])}"]
    ends = [*SINCE_MODEL[1:], None]
    for start, end in zip(SINCE_MODEL, ends):
        span = f"{start:g}-{end:g} s" if end is not None else f">= {start:g} s"
        lines.append(f"  arrived {span:>9} after the model: {summary(buckets[start])}")
    return lines


def trainer_seconds(log: Path) -> dict[int, float]:
    """Window -> the seconds the trainer's log says training on it took (read-back excluded)."""
    found = re.findall(r"window (\d+): trained on \d+ events in ([\d.]+)s",
                       log.read_text() if log.exists() else "")
    return {int(w): float(s) for w, s in found}


def print_report(report: dict, data: Collected, n: int, produce_s: float, started: float,
                 rate: float, trained: dict[int, float] | None = None) -> None:
    trained = trained or {}
    print(f"{'window':>6} {'events':>7} {'train s':>7} {'model after':>12} {'p50 all':>8} "
          f"{'p99 all':>8} {'after model':>11} {'p50':>7} {'p99':>7}")
    for w in sorted(report["windows"]):
        every, after = report["windows"][w]
        ready = report["ready"][w]
        came = f"{ready - report['first_token'][w]:.2f} s" if ready is not None else "none"
        took = f"{trained[w]:.1f}" if w in trained else "-"
        print(f"{w:>6} {len(every):>7} {took:>7} {came:>12} {cell(every, 50):>8} "
              f"{cell(every, 99):>8} {len(after):>11} {cell(after, 50):>7} {cell(after, 99):>7}")
    print("('train s': the trainer's seconds on that window; 'model after': seconds from the "
          "window's first tokens record to the announcement of the model that scores it, trained "
          "on the window before; latencies in seconds)")
    print(f"latency, all events:              {summary(report['all'])}")
    print(f"latency, predecessor model ready: {summary(report['after_model'])}  (goal: p99 <= 1 s)")
    print("\n".join(breakdown(data, report)))
    last = max(data.scores.values())
    print(f"events: {n} produced in {produce_s:.1f} s at --rate {rate:.0f}; {report['joined']} "
          f"joined, {len(data.late)} late; end to end {n / (last - started):.0f} events/s "
          f"(produce start -> last score)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="events/s produced")
    parser.add_argument("--events-per-window", type=int, default=10000)
    parser.add_argument("--windows", type=int, default=4, help="hourly windows of event time")
    parser.add_argument("--scorers", type=int, default=1, help="scorer replicas")
    parser.add_argument("--lateness", type=float, default=0.0,
                        help="window.allowed_lateness_seconds (of the compressed event time)")
    parser.add_argument("--sample-events", type=int, default=0,
                        help="training.sample_events: train on at most N events per window (0: all)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override, e.g. --set model.rnn.hidden_size=64")
    parser.add_argument("--eager-consume", action="store_true",
                        help="experiment: stages take a batch as soon as a record is there")
    parser.add_argument("--keep", type=Path, help="keep the work folder (logs, archive) here")
    args = parser.parse_args()
    base = bench_config([f"training.sample_events={args.sample_events}", *args.overrides],
                        args.lateness)
    with tempfile.TemporaryDirectory() as folder:
        work = args.keep or Path(folder)  # --keep: logs and archive stay for a look
        work.mkdir(parents=True, exist_ok=True)
        log = work / "auth.csv"
        n = compressed_log(log, args.windows, args.events_per_window)
        print(f"load before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores); OMP_NUM_THREADS="
              f"{os.environ['OMP_NUM_THREADS']} in every process")
        print(f"{n} events in {args.windows} hourly windows, {args.rate:.0f} events/s; "
              f"tokenizer={base.tokenizer.kind} model={base.model.kind} "
              f"d{base.model.rnn.hidden_size}x{base.model.rnn.n_layer} epochs={base.training.epochs} "
              f"sample_events={base.training.sample_events} "
              f"exclude_top_fraction={base.training.exclude_top_fraction:g} "
              f"lateness={base.window.allowed_lateness_seconds:g} s; {args.scorers} scorer(s)"
              f"{'; eager consume (experiment)' if args.eager_consume else ''}",
              flush=True)
        external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        broker = None if external else EmbeddedBroker(log_file=work / "broker.log").start()
        try:
            config, path = fresh_config(base, work, external or broker.bootstrap)
            stages = (EagerStageProcesses if args.eager_consume else StageProcesses)(path, work / "logs")
            try:
                start_stages(stages, [("tokenizer", 0), ("windower", 0), ("trainer", 0),
                                      *[("scorer", i) for i in range(args.scorers)],
                                      ("archiver", 0)], config)
                started = time.time()
                producer = run_producer(path, log, args.rate, work / "logs" / "produce.log")
                data = Collected()
                reading = time.process_time()
                read_scores(config, n, data, timeout=120 + 5 * n / args.rate)
                cpu_reading = time.process_time() - reading
                children = resource.getrusage(resource.RUSAGE_CHILDREN)
                producer.wait(60)
                after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the producer, reaped
                cpu_producer = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
                cpu = {name: cpu_seconds(p.pid) for name, p in stages.processes if p.poll() is None}
                cpu_broker = cpu_seconds(broker.process.pid) if broker is not None else float("nan")
                if stages.dead():
                    print(f"warning: stages died: {stages.dead()}")
            finally:
                stages.stop()
            read_rest(config, data)
        finally:
            if broker is not None:
                broker.stop()
        produced = re.findall(r"produced \d+ records .* in ([\d.]+)s",
                              (work / "logs" / "produce.log").read_text())
        produce_s = float(produced[-1]) if produced else float("nan")
        print_report(latency_report(data), data, n, produce_s, started, args.rate,
                     trainer_seconds(work / "logs" / "trainer-0.log"))
        print("CPU seconds per stage process (start-up included): "
              + ", ".join(f"{name} {s:.1f}" for name, s in cpu.items())
              + f"; {1000 * sum(cpu.values()) / n:.2f} ms per event in all; besides: broker "
              f"{cpu_broker:.1f}, producer {cpu_producer:.1f}, this process reading scores "
              f"{cpu_reading:.1f}")
        print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
