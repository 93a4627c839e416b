"""Throughput ratios of issue 13, side by side in one run: scorer on arrival vs offline scoring,
trainer vs a plain PyTorch loop, tokenizer events/s per process.

Run: python benchmarks/throughput.py [--events-per-window 10000 --windows 4 --rounds 2]
     python benchmarks/throughput.py --tokenizer-only [--baseline DIR]   ((c) alone)
     python benchmarks/throughput.py --scoring-only [--baseline DIR] [--pure]   ((a) alone)

One pipeline run fills the topics first: the generated, time-compressed log of
benchmarks/latency.py (hourly windows, small char-LSTM) goes through a tokenizer (timed alone:
events/s per process), then a windower and a trainer, which trains every window and announces
every model. Then, with no stage running:

(a) one scorer process (a fresh group and scores topic) scores every event already in the windows
    topic, the models announced: events / (its last score's timestamp - its assignment), against
    ``WindowLearner.score`` (the learner modelstore.load gives) called once per window on the same events in
    this process, with the same models. Goal >= 0.9x. Also against scoring the same log offline as
    ``pipeline replay`` does it: parse its lines into Events, then the same score calls (the
    in-memory side above starts from Events decoded before the clock starts).
(b) nn/training.py ``train_sequences`` (and WindowLearner.train, what the trainer stage calls) vs
    a minimal loop (pad, forward, backward, clip, step; same model, seed, batches and AdamW) on
    the largest window. Goal >= 0.8x. The trainer stage's own per-window figure is printed too.
(c) the tokenizer stage alone (above) and benchmarks/replay.py --tokenize-only (encode only).

OMP_NUM_THREADS=1 (and torch.set_num_threads(1)) on both sides of every ratio. Rounds alternate
the order of the two sides; the best of the rounds counts (a shared machine only slows things),
and the scorer's ratio is also given round by round (median and range), each round's scorer
against that round's offline scoring.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: this process and the stages

from latency import bench_config, compressed_log, cpu_seconds, decoded, fresh_config, ts  # noqa: E402

from pipeline.broker import EmbeddedBroker  # noqa: E402
from pipeline.config import Config  # noqa: E402
from pipeline.demo import StageProcesses  # noqa: E402
from pipeline.produce import produce_file  # noqa: E402
from pipeline.topicread import TopicReader  # noqa: E402
from pipeline.topicrecords import identity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def logged_at(log: Path, pattern: str, timeout: float = 120, poll: float = 0.05) -> float:
    """Epoch time of the first line matching ``pattern`` in a stage log (its own timestamp,
    to the millisecond), waiting for it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists():
            for line in log.read_text().splitlines():
                stamp = LOG_TIME.match(line)
                if stamp and re.search(pattern, line):
                    return datetime.strptime(stamp[1], "%Y-%m-%d %H:%M:%S").timestamp() \
                        + int(stamp[2]) / 1000
        time.sleep(poll)
    raise TimeoutError(f"{log.name}: no line matching {pattern!r} within {timeout:.0f}s")


def read_until(config: Config, topic: str, done, timeout: float = 600):
    """Every record of ``topic`` (decoded, with its timestamp) until ``done(records)``."""
    records = []
    deadline = time.time() + timeout
    with TopicReader(config, [topic], "bench") as reader:
        while not done(records):
            if time.time() > deadline:
                raise TimeoutError(f"{topic}: {len(records)} records after {timeout:.0f}s")
            for msg in reader.poll(timeout=0.3, max_records=5000):
                got = decoded(msg)
                if got is not None:
                    records.append((ts(msg), msg, *got))
    return records


# ---------------------------------------------------------------------------- the pipeline run


def fill(config: Config, path: Path, log: Path, n: int, windows: int, work: Path) -> dict:
    """Produce the log, run the tokenizer alone (timed), then windower + trainer until every
    window's model is announced. Returns the tokenizer's events/s and the trainer's log figure."""
    produce_file(config, log)
    stages = StageProcesses(path, work / "logs")
    try:
        stages.start("tokenizer")
        t0 = logged_at(work / "logs" / "tokenizer-0.log", r"tokenizer assigned \[.+\]")
        pid = stages.processes[-1][1].pid
        cpu0 = cpu_seconds(pid)
        tokens = read_until(config, config.topics.tokens,
                            lambda r: sum(name == "salka.TokenizedEvent" for _, _, name, _ in r) >= n)
        tokenizer_rate = n / (max(t for t, *_ in tokens) - t0)
        tokenizer_cpu = n / (cpu_seconds(pid) - cpu0)
        stages.start("windower")
        stages.start("trainer")
        read_until(config, config.topics.models,
                   lambda r: any(rec["trained_through"] == windows - 1 for *_, rec in r))
    finally:
        stages.stop()
    trained = re.findall(r"trained on (\d+) events in ([\d.]+)s",
                         (work / "logs" / "trainer-0.log").read_text())
    events, seconds = sum(int(e) for e, _ in trained), sum(float(s) for _, s in trained)
    return {"tokenizer": tokenizer_rate, "tokenizer_cpu": tokenizer_cpu,
            "trainer_log": (events, seconds, len(trained))}


def windows_and_models(config: Config) -> tuple[dict[int, list], list[dict]]:
    """The windows topic's events as Events per window (each once), and the announcements."""
    from pipeline.modelspec import make_masker
    from pipeline.parsing import LineParser
    from pipeline.topicrecords import record_to_event

    fields, masker = LineParser(config.input).model_fields, make_masker(config)
    events: dict[int, dict] = {}
    with TopicReader(config, [config.topics.windows, config.topics.models], "bench-read") as reader:
        models = []
        while not reader.at_end:
            for msg in reader.poll(timeout=0.5, max_records=5000):
                got = decoded(msg)
                if got is None:
                    continue
                name, record = got
                if name == "salka.WindowedEvent":
                    events.setdefault(record["window"], {})[identity(record["event"])] = \
                        record_to_event(record["event"], fields, masker)
                elif name == "salka.ModelAnnouncement":
                    models.append(record)
    return {w: list(e.values()) for w, e in sorted(events.items())}, models


# ---------------------------------------------------------------------------- (a) scoring


def offline_scoring(config: Config, windows: dict[int, list],
                    models: list[dict]) -> tuple[float, float, float]:
    """(seconds in score calls, seconds loading models, CPU seconds in score calls): each
    window's events in one call."""
    from pipeline.modelstore import load
    from pipeline.stages.scorer import ModelIndex

    index = ModelIndex()
    for record in models:
        index.add(record)
    score_s = load_s = cpu_s = 0.0
    for window, events in windows.items():
        start = time.perf_counter()
        model = load(config, index.find(window))
        load_s += time.perf_counter() - start
        start, cpu = time.perf_counter(), time.process_time()
        scores = model.score(window, events)
        score_s += time.perf_counter() - start
        cpu_s += time.process_time() - cpu
        assert len(scores) == len(events)
    return score_s, load_s, cpu_s


def offline_from_log(config: Config, log: Path, models: list[dict]) -> tuple[float, float, int]:
    """(seconds, CPU seconds, events) of ``pipeline replay``'s way to the same scores: parse the
    log's lines into Events (pipeline.replay.parse_file: parse, mask, window), then
    ``offline_scoring`` of them (loading the models not counted)."""
    from pipeline.replay import parse_file

    start, cpu = time.perf_counter(), time.process_time()
    windows, _ = parse_file(log, config)
    parse_s, parse_cpu = time.perf_counter() - start, time.process_time() - cpu
    score_s, _, score_cpu = offline_scoring(config, windows, models)
    return parse_s + score_s, parse_cpu + score_cpu, sum(len(events) for events in windows.values())


def scorer_stage(base: Config, filled: Config, work: Path, bootstrap: str, n: int,
                 tree: Path | None = None, env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """One scorer process (this tree's, or ``tree``'s; ``env``: more environment) over the filled
    windows topic, writing to a fresh scores topic: (seconds from its assignment to its last
    score, from its first score to its last, and the CPU seconds it used from its assignment to
    its last score)."""
    from pipeline.config import model_store_location

    config, path = fresh_config(base, work, bootstrap,
                                topics={"windows": filled.topics.windows,
                                        "models": filled.topics.models,
                                        "late": filled.topics.late},
                                model_store=model_store_location(filled.streaming))
    logs = work / f"logs-{config.streaming.group_prefix}"
    stages = StageProcesses(path, logs, code=tree, env=env)
    try:
        stages.start("scorer")
        pid = stages.processes[-1][1].pid
        t0 = logged_at(logs / "scorer-0.log", r"scorer assigned \[.+\]", poll=0.01)
        cpu0 = cpu_seconds(pid)  # start-up (imports, group join) left out
        times = stamps(config, config.topics.scores, n)
        cpu = cpu_seconds(pid) - cpu0
    finally:
        stages.stop()
    return max(times) - t0, max(times) - min(times), cpu


def stamps(config: Config, topic: str, n: int, timeout: float = 600) -> list[float]:
    """The timestamps of ``topic``'s first ``n`` records, waiting for them: records counted, not
    decoded (read_until's decoding took CPU from the process being timed, on 2 cores; the
    broker's end offsets would be cheaper still, but Tansu's are wrong: ../KAFKA-NOTES.md)."""
    times: list[float] = []
    deadline = time.time() + timeout
    with TopicReader(config, [topic], "bench-count") as reader:
        while len(times) < n:
            if time.time() > deadline:
                raise TimeoutError(f"{topic}: {len(times)} records after {timeout:.0f}s")
            times += map(ts, reader.poll(timeout=0.3, max_records=5000))
    return times


def kafka_floor(base: Config, filled: Config, work: Path, bootstrap: str, n: int) -> float:
    """CPU seconds per event (this process, librdkafka's threads included) to consume the
    windows topic's records and produce one record of the same size each, with the stages'
    client settings and nothing else: what any scorer pays before it reads, scores or writes."""
    import resource

    from pipeline.kafka import DeliveryTracker, make_producer, produce

    config, _ = fresh_config(base, work, bootstrap, topics={"windows": filled.topics.windows})
    producer, tracker = make_producer(config), DeliveryTracker()
    done, cpu0 = 0, None
    with TopicReader(config, [config.topics.windows], "bench-floor") as reader:
        while done < n:
            msgs = reader.poll(timeout=0.5, max_records=config.streaming.score_poll_batch)
            if msgs and cpu0 is None:
                usage = resource.getrusage(resource.RUSAGE_SELF)
                cpu0 = usage.ru_utime + usage.ru_stime
            for msg in msgs:
                produce(producer, config.topics.scores, msg.value(), partition=0, on_delivery=tracker)
            done += len(msgs)
            producer.poll(0)
        producer.flush()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (usage.ru_utime + usage.ru_stime - cpu0) / done


# ---------------------------------------------------------------------------- (b) training


def plain_loop(model, optimizer, seqs, epochs: int, batch_size: int, grad_clip: float,
               seed: int) -> float:
    """What anyone would write: pad, forward, backward, clip, step (same shuffle as
    train_sequences, so the same batches); mean batch loss."""
    import torch
    from torch.nn.utils.rnn import pad_sequence

    from nn.tokenizers import PAD

    tensors = [torch.tensor(s) for s in seqs]
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(tensors), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            batch = pad_sequence([tensors[i] for i in order[start:start + batch_size]],
                                 batch_first=True, padding_value=PAD)
            idx, targets = model.inputs_and_targets(batch)
            _, loss = model(idx, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            losses.append(loss.item())
    return sum(losses) / len(losses)


def training_compare(config: Config, events: list, rounds: int) -> dict[str, tuple[float, float]]:
    """Best seconds (and the mean loss) of each way to train one window from the same start."""
    import torch

    from nn.tokenizers import needs_fit
    from nn.training import build_model, make_optimizer, train_sequences
    from pipeline.learner import WindowLearner
    from pipeline.modelspec import model_args_for
    from pipeline.windowing import event_order

    tc = config.training
    learner = WindowLearner(config)
    ordered = sorted(events, key=event_order)  # the order (so the batches) the trainer uses
    if needs_fit(learner.tokenizer):  # a word vocabulary / BPE merges, as the trainer fits them
        learner.tokenizer.fit(e.text_fields for e in ordered)
    seqs = learner.encode(ordered)
    seed = config.seed * 1_000_003

    def fresh(plain: bool):
        torch.manual_seed(config.seed)
        model = build_model(model_args_for(config, learner.tokenizer.vocab_size))
        optimizer = (torch.optim.AdamW(model.parameters(), lr=tc.learning_rate,
                                       weight_decay=tc.weight_decay) if plain
                     else make_optimizer(model, tc.learning_rate, tc.weight_decay))
        return model, optimizer

    def run_plain():
        return plain_loop(*fresh(True), seqs, tc.epochs, tc.batch_size, tc.grad_clip, seed)

    def run_salka():
        return train_sequences(*fresh(False), seqs, epochs=tc.epochs, batch_size=tc.batch_size,
                               grad_clip=tc.grad_clip, seed=seed)

    def run_learner():  # what the trainer stage calls: order, encode, build, train
        return WindowLearner(config).train(0, events)

    ways = {"plain loop": run_plain, "train_sequences": run_salka, "WindowLearner.train": run_learner}
    best: dict[str, tuple[float, float]] = {}
    for round_ in range(rounds):
        for name in (list(ways) if round_ % 2 == 0 else list(ways)[::-1]):
            start = time.perf_counter()
            loss = ways[name]()
            took = time.perf_counter() - start
            if name not in best or took < best[name][0]:
                best[name] = (took, loss)
    return best


# ---------------------------------------------------------------------------- --tokenizer-only


def tokenizer_alone(base: Config, work: Path, bootstrap: str, log: Path, n: int,
                    tree: Path | None) -> tuple[float, float]:
    """The tokenizer stage (this tree's, or ``tree``'s) over the log on fresh topics: (events/s
    from its assignment to its last tokens record, events per CPU second it used)."""
    config, path = fresh_config(base, work, bootstrap)
    produce_file(config, log)
    logs = work / f"logs-{config.streaming.group_prefix}"
    stages = StageProcesses(path, logs, code=tree)
    try:
        stages.start("tokenizer")
        pid = stages.processes[-1][1].pid
        t0 = logged_at(logs / "tokenizer-0.log", r"tokenizer assigned \[.+\]", poll=0.01)
        cpu0 = cpu_seconds(pid)
        tokens = read_until(config, config.topics.tokens,
                            lambda r: sum(name == "salka.TokenizedEvent" for _, _, name, _ in r) >= n)
        cpu = cpu_seconds(pid) - cpu0
    finally:
        stages.stop()
    return n / (max(t for t, *_ in tokens) - t0), n / cpu


def tokenizer_main(args, base: Config) -> None:
    """--tokenizer-only: (c) alone, this tree against ``--baseline`` in alternating rounds."""
    sides = {"this tree": None, **({f"baseline {args.baseline}": args.baseline} if args.baseline else {})}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        log = work / "auth.csv"
        n = compressed_log(log, args.windows, args.events_per_window)
        print(f"load before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores); {n} events; "
              f"tokenizer={base.tokenizer.kind}", flush=True)
        external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        broker = None if external else EmbeddedBroker(log_file=work / "broker.log").start()
        try:
            for round_ in range(args.rounds):
                for name in (list(sides) if round_ % 2 == 0 else list(sides)[::-1]):
                    rate, per_cpu = tokenizer_alone(base, work, external or broker.bootstrap, log, n,
                                                    sides[name])
                    results[name].append((rate, per_cpu))
                    print(f"round {round_ + 1}: {name}: {rate:.0f} events/s, {per_cpu:.0f} per CPU "
                          f"second", flush=True)
        finally:
            if broker is not None:
                broker.stop()
    print(f"\n(c) tokenizer stage alone, one process, best of {args.rounds} (goal >= 50k events/s)")
    for name, got in results.items():
        print(f"    {name:<30} {max(r for r, _ in got):>8.0f} events/s (assignment -> last tokens "
              f"record), {max(c for _, c in got):>8.0f} per CPU second")
    print(f"load after: {os.getloadavg()[0]:.2f}")


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events-per-window", type=int, default=10000)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per comparison")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="config override, e.g. --set model.rnn.hidden_size=128")
    parser.add_argument("--tokenizer-only", action="store_true",
                        help="only (c), the tokenizer stage alone, once per round")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="also run the tokenizer (--tokenizer-only) or the scorer (a) of this "
                             "code tree (e.g. git archive HEAD | tar -x -C DIR), alternating with "
                             "this one")
    parser.add_argument("--pure", action="store_true",
                        help="also run this tree's scorer with SALKA_PURE_PYTHON=1 (pipeline/"
                             "scorewire.py as Python, not its compiled build; setup.py)")
    parser.add_argument("--scoring-only", action="store_true",
                        help="only (a), scorer vs offline scoring (no (b), no (c))")
    args = parser.parse_args()
    if args.tokenizer_only:
        return tokenizer_main(args, bench_config(args.overrides))

    import torch

    torch.set_num_threads(1)
    base = bench_config(args.overrides)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        log = work / "auth.csv"
        n = compressed_log(log, args.windows, args.events_per_window)
        print(f"load before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores); OMP_NUM_THREADS="
              f"{os.environ['OMP_NUM_THREADS']} and torch threads {torch.get_num_threads()} here and "
              f"in every stage process (both sides of every ratio)")
        print(f"{n} events in {args.windows} hourly windows; tokenizer={base.tokenizer.kind} "
              f"model={base.model.kind} d{base.model.rnn.hidden_size}x{base.model.rnn.n_layer} "
              f"epochs={base.training.epochs} batch={base.training.batch_size} "
              f"score_batch={base.training.score_batch_size}", flush=True)
        external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        broker = None if external else EmbeddedBroker(log_file=work / "broker.log").start()
        try:
            bootstrap = external or broker.bootstrap
            config, path = fresh_config(base, work, bootstrap)
            filled = fill(config, path, log, n, args.windows, work)
            windows, models = windows_and_models(config)
            total = sum(len(e) for e in windows.values())
            # the scorer of this tree and, with --baseline, of that tree, with --pure of this
            # tree in pure Python: each its own side, (code tree, more environment)
            trees: dict[str, tuple[Path | None, dict[str, str] | None]] = {"": (None, None)}
            if args.baseline:
                trees[f" (baseline {args.baseline})"] = (args.baseline, None)
            if args.pure:
                trees[" (this tree, SALKA_PURE_PYTHON=1)"] = (None, {"SALKA_PURE_PYTHON": "1"})
            sides = ["offline", *trees]
            offline, from_log, stage = [], [], {name: [] for name in trees}
            for round_ in range(args.rounds):  # alternate the order of the sides
                for side in (sides if round_ % 2 == 0 else sides[::-1]):
                    if side == "offline":
                        offline.append(offline_scoring(config, windows, models))
                        from_log.append(offline_from_log(config, log, models))
                    else:
                        stage[side].append(scorer_stage(base, config, work, bootstrap, total, *trees[side]))
                print(f"round {round_ + 1}: offline {total / offline[-1][0]:.0f} ev/s, " + ", ".join(
                    f"scorer{name} {total / got[-1][0]:.0f} ev/s" for name, got in stage.items()), flush=True)
            floor = kafka_floor(base, config, work, bootstrap, total)
        finally:
            if broker is not None:
                broker.stop()
        if not args.scoring_only:
            largest = max(windows, key=lambda w: len(windows[w]))
            trained = training_compare(config, windows[largest], max(args.rounds, 2))

    score_s, load_s, _ = min(offline)
    offline_cpu = min(o[2] for o in offline)
    print(f"\n(a) scoring {total} events ({len(windows)} windows, best of {args.rounds})")
    print(f"    offline WindowLearner.score, one call per window: {total / score_s:>8.0f} ev/s "
          f"({score_s:.2f} s; + {load_s:.2f} s loading models)")
    log_s, log_cpu, log_n = min(from_log)
    print(f"    offline from the log (pipeline replay's parse_file, then the same score calls): "
          f"{log_n / log_s:.0f} ev/s ({log_n} events, {log_s:.2f} s; {log_n / log_cpu:.0f} per CPU second)")
    print(f"    consume + produce alone (the Kafka client's share): {floor * 1e6:.1f} CPU us/event "
          f"against {offline_cpu / total * 1e6:.1f} us for offline scoring: even a scorer with no "
          f"Python work of its own would reach {offline_cpu / (offline_cpu + floor * total):.2f}x")
    for name, got in stage.items():
        stage_s, steady_s = min(s[0] for s in got), min(s[1] for s in got)
        stage_cpu = min(s[2] for s in got)
        print(f"  scorer{name or ' (this tree)'}:")
        print(f"    scorer stage, assignment -> last score:          {total / stage_s:>8.0f} ev/s "
              f"({stage_s:.2f} s)   ratio {score_s / stage_s:.2f}x (goal >= 0.9x)")
        print(f"    scorer stage, first score -> last score:         {total / steady_s:>8.0f} ev/s "
              f"({steady_s:.2f} s)   ratio {score_s / steady_s:.2f}x")
        print(f"    per CPU second (load-proof): offline {total / offline_cpu:.0f} ev/s, scorer stage "
              f"{total / stage_cpu:.0f} ev/s   ratio {offline_cpu / stage_cpu:.2f}x "
              f"({(stage_cpu - offline_cpu) / total * 1e6:.1f} CPU us/event more than offline)")
        print(f"    against offline from the log: {(total / stage_s) / (log_n / log_s):.2f}x, "
              f"{(total / stage_cpu) / (log_n / log_cpu):.2f}x per CPU second")
        # Each round's scorer against the same round's offline scoring: a best-of ratio pairs two
        # lucky rounds, and rounds of the same code differ by up to 10% on a shared machine.
        paired = sorted(o[0] / s[0] for o, s in zip(offline, got))
        paired_cpu = sorted(o[2] / s[2] for o, s in zip(offline, got))
        print(f"    round by round (median, range): {statistics.median(paired):.2f}x "
              f"[{paired[0]:.2f}-{paired[-1]:.2f}], per CPU second {statistics.median(paired_cpu):.2f}x "
              f"[{paired_cpu[0]:.2f}-{paired_cpu[-1]:.2f}]")
    if args.scoring_only:
        print(f"load after: {os.getloadavg()[0]:.2f}")
        return
    epochs = base.training.epochs
    m = len(windows[largest]) * epochs
    plain_s = trained["plain loop"][0]
    print(f"\n(b) training window {largest} ({len(windows[largest])} events x {epochs} epoch(s), "
          f"best of {max(args.rounds, 2)})")
    for name, (took, loss) in trained.items():
        print(f"    {name:<22} {m / took:>8.0f} ev/s ({took:.2f} s, mean loss {loss:.6f})   "
              f"ratio {plain_s / took:.2f}x (goal >= 0.8x)")
    events, seconds, count = filled["trainer_log"]
    if seconds:
        print(f"    trainer stage (its log, {count} windows, 0.1 s resolution): "
              f"{events * epochs / seconds:.0f} ev/s ({seconds:.1f} s)")
    print(f"\n(c) tokenizer stage alone, one process: {filled['tokenizer']:.0f} events/s "
          f"(assignment -> last tokens record), {filled['tokenizer_cpu']:.0f} per CPU second; "
          f"goal >= 50k")
    print("    benchmarks/replay.py --tokenize-only (encode only, one process):", flush=True)
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "replay.py"), "--tokenize-only"],
                         capture_output=True, text=True, check=True).stdout
    print("\n".join("    " + line for line in out.strip().splitlines()))
    print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
