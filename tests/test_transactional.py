"""Exactly-once: the transactional.id a stage process takes outlives the process (so that its
restart aborts what it left open), and no two live processes take the same one."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

from pipeline.config import config_from_dict
from pipeline.transactional import TransactionalId


def make_config(tmp_path, state_dir=None):
    return config_from_dict({"streaming": {"group_prefix": "grp",
                                           "state_dir": str(state_dir or tmp_path / "state")}})


def test_a_stage_that_runs_once_takes_the_same_id_on_every_host_and_every_start(tmp_path):
    config = make_config(tmp_path)
    for stage in ("windower", "trainer", "archiver", "alerter"):
        ids = [TransactionalId(config, stage) for _ in range(2)]
        assert {i.value for i in ids} == {f"grp.{stage}"}


def test_replicas_on_one_host_take_the_lowest_free_slot(tmp_path):
    config = make_config(tmp_path)
    host = socket.gethostname()
    first, second = TransactionalId(config, "scorer"), TransactionalId(config, "scorer")
    tokenizer = TransactionalId(config, "tokenizer")
    assert (first.value, second.value) == (f"grp.scorer.{host}.0", f"grp.scorer.{host}.1")
    assert tokenizer.value == f"grp.tokenizer.{host}.0"  # slots are per stage
    first.release()
    assert TransactionalId(config, "scorer").value == f"grp.scorer.{host}.0"


def test_a_killed_replica_leaves_its_slot_to_the_next_process(tmp_path):
    config = make_config(tmp_path)
    host = socket.gethostname()
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from pipeline.config import config_from_dict\n"
         "from pipeline.transactional import TransactionalId\n"
         f"streaming = {{'group_prefix': 'grp', 'state_dir': {str(tmp_path / 'state')!r}}}\n"
         "config = config_from_dict({'streaming': streaming})\n"
         "held = TransactionalId(config, 'scorer')\n"
         "print(held.value, flush=True)\n"
         "time.sleep(60)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == f"grp.scorer.{host}.0"
        alive = TransactionalId(config, "scorer")
        assert alive.value == f"grp.scorer.{host}.1"  # slot 0 is the live child's
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert TransactionalId(config, "scorer").value == f"grp.scorer.{host}.0"  # the dead one's


def test_no_lock_possible_gives_an_id_of_its_own_and_says_so(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = make_config(tmp_path, state_dir=blocker)
    ids = {TransactionalId(config, "scorer").value for _ in range(2)}
    assert len(ids) == 2 and all(i.startswith(f"grp.scorer.{socket.gethostname()}.") for i in ids)
    assert "no slot lock under" in caplog.text and "transaction.timeout.ms" in caplog.text


def test_containers_sharing_a_state_volume_each_keep_their_slot_across_a_restart(tmp_path, monkeypatch):
    # Two scorer containers (host names c1, c2) mount one state volume. Restarted together in
    # the other order, each must take its own id back: slots are counted per host.
    config = make_config(tmp_path)
    first = {}
    for host in ("c1", "c2"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        first[host] = TransactionalId(config, "scorer")
    assert {h: i.value for h, i in first.items()} == {"c1": "grp.scorer.c1.0", "c2": "grp.scorer.c2.0"}
    for held in first.values():
        held.release()  # both containers die
    for host in ("c2", "c1"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        assert TransactionalId(config, "scorer").value == first[host].value
