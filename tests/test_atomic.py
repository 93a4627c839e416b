"""The one atomic writer, and the one policy for a state file a stage cannot read: moved aside
with one error line, then the stage falls back (the same in the windower, alerter and trainer)."""

from __future__ import annotations

import json
import logging
import os
import resource
import signal
import subprocess
import sys

import pytest
from helpers import ROOT, invoke, one_error_line, write_small_scores

from pipeline.atomic import atomic_text, atomic_write, quarantine, write_bytes_atomic
from pipeline.config import config_from_dict


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_whole_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "state.bin"
    write_bytes_atomic(target, b"old")
    with atomic_write(target) as handle:
        handle.write(b"new ")
        assert target.read_bytes() == b"old"  # a reader sees the old file until the rename
        assert len(leftovers(target.parent)) == 1
        handle.write(b"content")
    assert target.read_bytes() == b"new content"
    assert leftovers(target.parent) == []
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError, SystemExit])
def test_atomic_write_removes_its_temp_file_on_any_exception(tmp_path, error):
    target = tmp_path / "scores.csv.gz"
    target.write_bytes(b"previous")
    with pytest.raises(error):
        with atomic_write(target) as handle:
            handle.write(b"half of it")
            raise error()
    assert target.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_atomic_write_fsyncs_file_and_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.realpath(f"/proc/self/fd/{fd}")),
                                                 real(fd)))
    write_bytes_atomic(tmp_path / "a.json", b"{}")
    assert len(synced) == 2 and synced[1] == str(tmp_path.resolve())
    assert synced[0].startswith(str(tmp_path.resolve() / ".a.json."))


def test_quarantine_moves_aside_with_one_error_line(tmp_path, caplog):
    bad = tmp_path / "windower.json"
    bad.write_text("{")
    first = quarantine(bad, "unreadable", "falling back")
    bad.write_text("[")
    second = quarantine(bad, "unreadable", "falling back")
    assert not bad.exists() and first != second
    assert first.read_text() == "{" and second.read_text() == "["
    assert first.name.startswith("windower.json.corrupt-")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and "\n" not in errors[0].getMessage()
    assert str(bad) in errors[0].getMessage() and first.name in errors[0].getMessage()


# ---------------------------------------------------------------------------- every stage


def state_config(tmp_path):
    return config_from_dict({"streaming": {"state_dir": str(tmp_path / "state")}})


def damage_windower(config, state_dir):
    (state_dir / "windower.json").write_text('{"closed_through": 7, "seen": [[1]]}')
    return state_dir / "windower.json"


def damage_alerter(config, state_dir):
    from pipeline.alerting import AlertEngine, encode_state

    data = encode_state(AlertEngine(config.alerting), {"resume_offset": 5})
    (state_dir / "alerter.npz").write_bytes(data[: len(data) - 40])
    return state_dir / "alerter.npz"


def damage_trainer(config, state_dir):
    import torch

    from pipeline.learner import WindowLearner

    (state_dir / "trainer").mkdir()
    good, bad = state_dir / "trainer" / "checkpoint-000000.pt", state_dir / "trainer" / "checkpoint-000001.pt"
    WindowLearner(config).save(good, resume_offset=3)
    bad.write_bytes(good.read_bytes()[:500])
    assert torch.load(good, weights_only=True)["format"]  # control: the good one loads
    return bad


def start_windower(config):
    from pipeline.stages.windower import WindowerStage

    stage = WindowerStage(config)
    return stage.closed_through == float("-inf") and stage.seen == {}


def start_alerter(config):
    from pipeline.stages.alerter import AlerterStage

    stage = AlerterStage(config)
    return stage.resume_offset is None and stage.engine.histories == {}


def start_trainer(config):
    from pipeline.stages.trainer import TrainerStage

    stage = TrainerStage(config)
    return stage.resume_offset == 3  # fell back to the previous checkpoint


@pytest.mark.parametrize("stage", ["windower", "alerter", "trainer"])
def test_every_stage_moves_a_corrupt_state_file_aside_and_falls_back(tmp_path, caplog, stage):
    config = state_config(tmp_path)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    bad = globals()[f"damage_{stage}"](config, state_dir)
    assert globals()[f"start_{stage}"](config)
    assert not bad.exists()
    moved = list(bad.parent.glob(f"{bad.name}.corrupt-*"))
    assert len(moved) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(bad) in errors[0] and moved[0].name in errors[0], errors
    assert globals()[f"start_{stage}"](config)  # and the next start is clean
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1


def test_a_good_windower_state_still_resumes(tmp_path):
    config = state_config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "windower.json").write_text(json.dumps(
        {"closed_through": 7200.0, "reported_through": 1, "open": {"2": 5}, "seen": [["raw", 0, 41]],
         "newest": {"0": 9000.0}, "resume": {"0": 12}}))
    from pipeline.stages.windower import WindowerStage

    stage = WindowerStage(config)
    assert stage.closed_through == 7200.0 and stage.seen == {("raw", 0): 41}
    assert stage.open == {2: 5} and stage.reported_through == 1
    assert stage.resume == {0: 12} and stage.restored_newest == {0: 9000.0}
    assert list((tmp_path / "state").glob("*.corrupt-*")) == []


def _file_size_limit(limit: int):
    """A child whose files cannot grow past ``limit`` bytes: writes past it fail with EFBIG, as a
    full disk's fail with ENOSPC (SIGXFSZ ignored, so that the write reports it)."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("profile", [[], ["--profile", "sessions"]])
def test_a_disk_that_fills_while_writing_is_one_line_and_leaves_no_file(tmp_path, profile):
    """A full disk (here, a file size limit: the same failed write, EFBIG for ENOSPC) named no
    file, so it was a traceback, and generate left a partial log behind."""
    args = ["generate", "--days", "1", *profile, "--output", tmp_path / "log.csv",
            "--labels", tmp_path / "l.csv"]
    proc = subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          timeout=120, preexec_fn=_file_size_limit(20_000), cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("Error: ")]
    assert line == f"Error: {tmp_path}/log.csv: File too large; free some disk space or write elsewhere"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no partial file, no temporary one


def test_atomic_text_writes_utf8_as_given(tmp_path):
    path = tmp_path / "t.csv"
    with atomic_text(path) as handle:
        handle.write("a,\u00e9\r\nb\n")
    assert path.read_bytes() == "a,\u00e9\r\nb\n".encode()


@pytest.mark.parametrize("args", [["check", "--input", "/proc/self/mem"],
                                  ["eval", "--scores", "{scores}", "--labels", "/proc/self/mem"]])
def test_a_read_that_fails_names_the_file(args, tmp_path):
    """/proc/self/mem cannot be read from its start (EIO): a traceback once, now one line."""
    scores = write_small_scores(tmp_path / "s.csv.gz", 11)
    line = one_error_line(invoke(*(a.format(scores=scores) for a in args)), 1)
    assert line.startswith("Error: /proc/self/mem: Input/output error; the device could not be read")


def test_a_failed_write_into_a_stream_leaves_a_truncated_gzip_not_a_short_whole_one(tmp_path):
    """A FIFO or stdout is written straight: after a failure its reader must see a cut file, not
    a complete-looking one with the rows so far."""
    import gzip
    import threading

    from pipeline.scorefile import write_rows

    fifo = tmp_path / "scores.fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()

    def rows():
        yield from ([str(i)] for i in range(5))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_rows(fifo, ["n"], rows())
    reader.join(10)
    with pytest.raises(EOFError):
        gzip.decompress(got[0])
