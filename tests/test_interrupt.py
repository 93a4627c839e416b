"""Ctrl-C or SIGTERM during `pipeline replay`: no temporary file left behind, one line, 130/143."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.generate import GenerateSpec, write_log


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_replay_cleans_up_and_says_so_in_one_line(tmp_path, signum):
    log = tmp_path / "auth.csv"
    write_log(GenerateSpec(users=20, computers=40, days=4, events_per_day=3000, redteam_events=0,
                           seed=3), log, tmp_path / "labels.csv")
    out = tmp_path / "out" / "scores.csv.gz"
    out.parent.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A shell's background job inherits SIGINT ignored; Python then never raises on it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "replay", "--input", str(log), "--output", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not list(out.parent.iterdir()) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [p.name.endswith(".tmp") for p in out.parent.iterdir()] == [True], "not writing yet"
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    assert list(out.parent.iterdir()) == []  # neither the scores file nor its temporary file
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: replay interrupted by {signal.Signals(signum).name}; nothing was "
                      "left half-written"], stderr
    assert Path(log).exists()
