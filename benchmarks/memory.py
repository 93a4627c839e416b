"""Peak memory of every stage as one window grows: 100k, 1M and 3M events.

Run: python benchmarks/memory.py [--sizes 100000,1000000,3000000] [--quick]
Uses the embedded broker (or KAFKA_BOOTSTRAP_SERVERS). Per size: a LANL-style log whose window 1
holds N events (window 0 and window 2 hold a few, so that a model exists to score window 1 and the
scorer really runs it), every stage as its own process (OMP_NUM_THREADS=1) on a tiny model (char
tokenizer, 16-unit LSTM, 1 epoch, training.sample_events and training.max_chunk_events 20,000),
the log produced as fast as possible, and the run waited out until every event is archived, the
alerter judged every window and the trainer checkpointed the last one (of those three, the ones
that run; --stages without them, e.g. tokenizer,windower: until the other stages' consumer
groups have committed all of their input). A stage's peak is its
VmHWM (/proc/<pid>/status) read just before it is stopped; the max of VmRSS sampled every 0.25 s
is printed beside it. The goal (issue 13): flat, within 20% from 100k to 3M. For the stages that
are not, ``growth`` is (peak at the largest size - peak at the smallest) / extra events.
The embedded broker's own RSS is shown too: its memory:// storage keeps every record, so it grows
with the data by design (not a salka stage).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import threading
import time
import uuid
from pathlib import Path

import yaml

from pipeline.broker import EmbeddedBroker
from pipeline.config import Config, config_from_dict, config_to_dict, load_config
from pipeline.demo import ArchiveCounter, StageProcesses
from pipeline.kafka import create_topics, make_admin
from pipeline.produce import produce_file
from pipeline.stages.alerter import judged_through
from pipeline.status import committed_offsets, end_offsets, group_id, partition_lag, stage_inputs

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("tokenizer", "windower", "trainer", "scorer", "archiver", "alerter")
DAY = 86400
EDGE_EVENTS = 300  # events in window 0 (trains the model that scores window 1) and in window 2
TINY = {  # a tiny model and bounded training: the run measures the plumbing, not the model
    "tokenizer": {"kind": "char"},
    "model": {"kind": "rnn", "rnn": {"hidden_size": 16, "n_layer": 1}},
    "training": {"epochs": 1, "sample_events": 20_000, "max_chunk_events": 20_000},
    "window": {"size_seconds": DAY, "allowed_lateness_seconds": 0},
}


def write_input(path: Path, events: int) -> int:
    """LANL auth lines: EDGE_EVENTS in window 0, ``events`` spread over window 1, EDGE_EVENTS in
    window 2 (closed by the end-of-input marker). Returns the number of lines."""
    times = ([DAY // 2 + i for i in range(EDGE_EVENTS)]
             + [DAY + i * DAY // events for i in range(events)]
             + [2 * DAY + i for i in range(EDGE_EVENTS)])
    with open(path, "w", buffering=1 << 20) as handle:
        for i, t in enumerate(times):
            user, src, dst = i * 7919 % 20000, i * 104729 % 9000, i * 13 % 9000
            handle.write(f"{t},U{user}@DOM1,U{user}@DOM1,C{src},C{dst},"
                         f"{'Kerberos' if i % 3 else 'NTLM'},Network,LogOn,Success\n")
    return len(times)


def run_config(base: Config, work: Path, bootstrap: str) -> tuple[Config, Path]:
    """Fresh topics, groups and directories for one run; the tiny model on top of ``base``."""
    run = f"mem{uuid.uuid4().hex[:8]}"
    data = config_to_dict(base)
    for section, values in TINY.items():
        merged = {**data[section]}
        for key, value in values.items():
            merged[key] = {**merged[key], **value} if isinstance(value, dict) else value
        data[section] = merged
    data["kafka"] = {**data["kafka"], "bootstrap.servers": bootstrap}
    data["topics"] = {k: f"{run}.{v}" if isinstance(v, str) else v for k, v in data["topics"].items()}
    data["streaming"] = {**data["streaming"], "group_prefix": run,
                         "state_dir": str(work / run / "state"),
                         "archive_dir": str(work / run / "archive")}
    config = config_from_dict(data)
    path = work / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    create_topics(config)
    return config, path


def proc_kb(pid: int, field: str) -> int | None:
    """A /proc/<pid>/status field in kB (VmRSS, VmHWM); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class RssSampler(threading.Thread):
    """The max VmRSS of each process, sampled every ``interval`` seconds."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25):
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], proc_kb(pid, "VmRSS") or 0)


# Stages whose end is seen in their output (archive files, the alerter's state, the trainer's
# last checkpoint); any other stage is done when its group has committed all of its input.
SEEN_DONE = ("trainer", "archiver", "alerter")
LAG_CHECK_SECONDS = 3.0


def caught_up(config: Config, admin, stages: tuple[str, ...]) -> bool:
    """Whether every stage in ``stages`` has committed the end of each of its input partitions."""
    if not stages:
        return True
    inputs = stage_inputs(config)
    topics = admin.list_topics(timeout=10).topics
    wanted = {s: [(t, p) for t in inputs[s] if t in topics for p in topics[t].partitions]
              for s in stages}
    ends = end_offsets(config, sorted({tp for parts in wanted.values() for tp in parts}))
    for stage, parts in wanted.items():
        committed = committed_offsets(admin, group_id(config, stage), parts)
        if any(partition_lag(committed.get(tp), *ends[tp][:2]) for tp in parts):
            return False
    return True


class DoneWatch:
    """When a run is over: every event archived, the alerter through the last window, the
    trainer's last checkpoint written, for those of the three that run; and the other stages'
    groups caught up on two successive looks (ends read on the second look come after the
    first look saw the upstream stages commit, and a stage flushes its output before it commits:
    an end read at the same time as an upstream commit could be an old one)."""

    def __init__(self, config: Config, stages: tuple[str, ...], lines: int):
        self.config, self.stages, self.lines = config, stages, lines
        self.archive = ArchiveCounter(Path(config.streaming.archive_dir))
        self.last_checkpoint = Path(config.streaming.state_dir) / "trainer" / "checkpoint-000000000002.pt"
        self.by_lag = tuple(s for s in stages if s not in SEEN_DONE)
        self.admin = make_admin(config) if self.by_lag else None
        self.caught_up_looks, self.next_look = 0, 0.0

    def archived(self) -> int:
        return self.archive.count()[0] if "archiver" in self.stages else self.lines

    def judged(self) -> int | None:
        return judged_through(self.config) if "alerter" in self.stages else 2

    def done(self) -> bool:
        if self.archived() < self.lines or (self.judged() or 0) < 2:
            return False
        if "trainer" in self.stages and not self.last_checkpoint.exists():
            return False
        if not self.by_lag or time.monotonic() < self.next_look:
            return not self.by_lag
        self.next_look = time.monotonic() + LAG_CHECK_SECONDS
        looks_done = caught_up(self.config, self.admin, self.by_lag)
        self.caught_up_looks = self.caught_up_looks + 1 if looks_done else 0
        return self.caught_up_looks >= 2


def wait_assigned(log: Path, stage: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and re.search(rf"{stage} assigned \[.+\]", log.read_text()):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{stage} got no partitions in {timeout:.0f}s (log: {log})")


def measure(base: Config, work: Path, bootstrap: str, broker_pid: int | None, events: int,
            stages: tuple[str, ...], timeout: float, progress: float = 0.0) -> dict:
    """One size: returns {stage: (idle kB, VmHWM kB, max sampled VmRSS kB)} and timings.
    ``progress`` > 0: a line every that many seconds with the peaks so far (a run stopped
    before the end still tells something)."""
    log_path = work / f"auth-{events}.csv"
    lines = write_input(log_path, events)
    config, path = run_config(base, work, bootstrap)
    logs = work / f"logs-{events}"
    procs = StageProcesses(path, logs)
    try:
        for stage in stages:
            procs.start(stage)
        for stage in stages:
            wait_assigned(logs / f"{stage}-0.log", stage)
        pids = {name.rsplit("-", 1)[0]: p.pid for name, p in procs.processes}
        idle = {name: proc_kb(pid, "VmRSS") or 0 for name, pid in pids.items()}
        if broker_pid is not None:
            pids["broker"] = broker_pid
            idle["broker"] = proc_kb(broker_pid, "VmRSS") or 0
        sampler = RssSampler(pids)
        sampler.start()
        started = time.monotonic()
        produced = produce_file(config, log_path)
        assert produced.records == lines, (produced.records, lines)
        watch = DoneWatch(config, stages, lines)
        deadline, next_report = started + timeout, started + progress
        while not watch.done():
            if (dead := procs.dead()):
                raise RuntimeError(f"stage exited: {', '.join(dead)} (logs: {logs})")
            if progress and time.monotonic() >= next_report:
                next_report = time.monotonic() + progress
                print_progress(time.monotonic() - started, watch.archived(), lines, watch.judged(),
                               sampler.peak)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{events} events: archived {watch.archived()}/{lines}, alerter "
                                   f"through {watch.judged()} after {timeout:.0f}s, groups of "
                                   f"{', '.join(watch.by_lag) or 'no other stage'} caught up: "
                                   f"{watch.caught_up_looks > 0} (logs: {logs})")
            time.sleep(0.5)
        elapsed = time.monotonic() - started
        hwm = {name: proc_kb(pid, "VmHWM") or 0 for name, pid in pids.items()}
        sampler.done.set()
        sampler.join()
    finally:
        procs.stop()
    log_path.unlink()
    return {"stages": {name: (idle[name], hwm[name], sampler.peak[name]) for name in pids},
            "produce_s": produced.seconds, "total_s": elapsed, "lines": lines}


def mb(kb: int) -> str:
    return f"{kb / 1024:.0f}"


def print_progress(seconds: float, archived: int, lines: int, judged: int | None,
                   peaks: dict[str, int]) -> None:
    so_far = ", ".join(f"{name} {mb(kb)}" for name, kb in peaks.items())
    print(f"  [{seconds:.0f}s] archived {archived}/{lines}, alerter through window {judged}; "
          f"max RSS so far (MB): {so_far}", flush=True)


def print_size(events: int, result: dict) -> None:
    print(f"\n{events} events in window 1 ({result['lines']} lines): produced in "
          f"{result['produce_s']:.0f}s, all archived/judged/trained {result['total_s']:.0f}s "
          f"after the first record", flush=True)
    print(f"  {'stage':<10} {'idle MB':>8} {'VmHWM MB':>9} {'max RSS MB':>11}")
    for name, (idle, hwm, sampled) in result["stages"].items():
        print(f"  {name:<10} {mb(idle):>8} {mb(hwm):>9} {mb(sampled):>11}", flush=True)


def print_table(results: dict[int, dict]) -> None:
    sizes = sorted(results)
    low, high = sizes[0], sizes[-1]
    names = list(results[low]["stages"])
    print("\npeak RSS (VmHWM) in MB per stage process; window 1 holds N events")
    header = "".join(f"{_label(n):>9}" for n in sizes)
    print(f"{'stage':<10}{header} {f'{_label(high)}/{_label(low)}':>10} {'growth B/event':>15}  flat?")
    for name in names:
        peaks = [results[n]["stages"][name][1] for n in sizes]
        ratio = peaks[-1] / peaks[0] if peaks[0] else float("nan")
        growth = (peaks[-1] - peaks[0]) * 1024 / (high - low) if high > low else 0.0
        verdict = "n/a (broker storage)" if name == "broker" else ("yes" if ratio <= 1.2 else "NO")
        print(f"{name:<10}" + "".join(f"{mb(p):>9}" for p in peaks)
              + f" {ratio:>10.2f} {growth:>15.0f}  {verdict}")


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000,3000000",
                        help="events in the big window, comma-separated")
    parser.add_argument("--quick", action="store_true", help="sizes 20000,100000,300000")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"stages to run (default: all of {','.join(STAGES)})")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per size")
    parser.add_argument("--progress", type=float, default=60,
                        help="seconds between progress lines with the peaks so far (0: none)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override, e.g. --set streaming.spill_events=20000")
    args = parser.parse_args()
    sizes = [20_000, 100_000, 300_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    stages = tuple(s for s in args.stages.split(",") if s)
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base = load_config(ROOT / "config.yaml", args.overrides)
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for events in sizes:
            # A fresh broker per size: memory:// storage never gives memory back, and a broker
            # swollen by the previous size would slow this one.
            broker = None if external else EmbeddedBroker(log_file=work / "broker.log").start()
            try:
                bootstrap = external or broker.bootstrap
                results[events] = measure(base, work, bootstrap,
                                          broker.process.pid if broker else None,
                                          events, stages, args.timeout, args.progress)
            finally:
                if broker is not None:
                    broker.stop()
            print_size(events, results[events])
    print_table(results)


if __name__ == "__main__":
    main()
