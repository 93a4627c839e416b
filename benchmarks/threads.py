"""Torch threads on a shared host: `pipeline replay` beside two other busy torch processes.

Run: python benchmarks/threads.py [--events 4274] [--epochs 2] [--neighbours 2] [--timeout 900]
A trainer and scorers share a host by design, so a replay (or a stage) rarely has the cores to
itself. For each setting, side by side in one run, two neighbour processes train an LSTM d128 in
a loop (as a trainer and a scorer would) while `pipeline replay` of the same generated log is
timed:
- torch default: every process with torch's own default (intra- and inter-op = cores), as salka
  ran before training.threads existed;
- salka default: training.threads 0 (pipeline/compute.py: one thread for stages and replay);
- one thread: OMP_NUM_THREADS=1 everywhere.
Prints the replay's wall time per setting and the ratios to "one thread".
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def neighbour(threads: int) -> None:
    """A busy torch process: train a d128 LSTM on random events until killed."""
    import torch

    from nn.training import build_model, make_optimizer, train_sequences
    from pipeline.compute import configure_threads

    configure_threads(threads, "stage")
    torch.manual_seed(0)
    model = build_model({"kind": "rnn", "vocab_size": 300, "hidden_size": 128})
    optimizer = make_optimizer(model, 3e-3, 0.0)
    seqs = torch.randint(4, 300, (512, 40)).tolist()
    while True:
        train_sequences(model, optimizer, seqs, epochs=1, batch_size=64, grad_clip=1.0, seed=0)


def environment(one_thread: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, "OMP_NUM_THREADS": "1"} if one_thread else env


def timed_replay(log: Path, out: Path, threads: int, one_thread: bool, epochs: int, timeout: float,
                 neighbours: int) -> float | None:
    env = environment(one_thread)
    others = [subprocess.Popen([sys.executable, __file__, "--neighbour", str(threads or 0)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for _ in range(neighbours)]
    try:
        time.sleep(3)  # let the neighbours import torch and start training
        start = time.perf_counter()
        try:
            subprocess.run([sys.executable, "-m", "pipeline", "-q", "replay", "--input", str(log),
                            "--output", str(out), "--set", f"training.threads={threads}",
                            "--set", f"training.epochs={epochs}"],
                           cwd=ROOT, env=env, check=True, timeout=timeout, capture_output=True)
        except subprocess.TimeoutExpired:
            return None
        return time.perf_counter() - start
    finally:
        for proc in others:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=4274)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--neighbours", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per replay")
    parser.add_argument("--neighbour", type=int, default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.neighbour is not None:
        neighbour(opts.neighbour)
        return
    from pipeline.compute import usable_cores
    from pipeline.generate import GenerateSpec, write_log

    cores = usable_cores()
    settings = [("torch default", cores, False), ("salka default", 0, False), ("one thread", 1, True)]
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "auth.csv"
        # Two daily windows: the second is scored with the model trained on the first.
        summary = write_log(GenerateSpec(days=2, events_per_day=opts.events // 2, redteam_events=0, seed=7),
                            log, Path(folder) / "labels.csv")
        print(f"{summary['events']} events, {opts.epochs} epochs, {cores} cores, "
              f"{opts.neighbours} neighbour torch processes, load {os.getloadavg()[0]:.1f}")
        times = {}
        for name, threads, one in settings:
            times[name] = timed_replay(log, Path(folder) / "scores.csv.gz", threads, one, opts.epochs,
                                       opts.timeout, opts.neighbours)
            shown = f"{times[name]:.1f} s" if times[name] is not None else f"> {opts.timeout:.0f} s"
            print(f"{name:<14} replay {shown}", flush=True)
    base = times["one thread"]
    for name, _, _ in settings[:2]:
        if times[name] is not None and base:
            print(f"{name} / one thread: {times[name] / base:.2f}x")


if __name__ == "__main__":
    main()
