"""Exactly-once delivery: which ``transactional.id`` a stage process takes.

The id outlives the process on purpose. A stage killed mid-transaction leaves that transaction
open, and an open transaction holds back every read_committed reader of its partitions: on Kafka
until ``transaction.timeout.ms`` (60 s by default), on the embedded broker for good. The process
that starts next with the same id aborts it at once (its ``init_transactions``), and fences the
dead one should it come back.

- A stage that runs once per pipeline (windower, trainer, archiver, alerter) takes
  ``<group_prefix>.<stage>``, on whichever host it runs. A second one started by mistake fences
  the first, which stops with a line that says why.
- A stage that runs as replicas (tokenizer, scorer) takes ``<group_prefix>.<stage>.<host>.<slot>``:
  the lowest slot no live process holds, found through a lock file per stage, host and slot
  under ``<state_dir>/locks``. The kernel frees a dead process's lock, so its restart takes its
  slot back. Replicas on other hosts (or containers) differ by host name; a container created
  anew (a new host name) starts a new id.
"""

from __future__ import annotations

import fcntl
import logging
import re
import socket
import uuid
from pathlib import Path
from typing import IO

import click
from confluent_kafka import KafkaError

from pipeline.config import Config

log = logging.getLogger(__name__)

REPLICATED = frozenset({"tokenizer", "scorer"})  # stages that run as several processes
MAX_SLOTS = 1024
FENCED = frozenset({KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH})


class StageFenced(click.ClickException):
    """Another process took this one's transactional.id: it must stop, not start over (starting
    over would fence the other, which would fence it back, and so on)."""


class TransactionalId:
    """A stage process's ``transactional.id``, with the lock that keeps it this process's."""

    def __init__(self, config: Config, stage: str):
        self._lock: IO[bytes] | None = None
        self.stage, self.group_prefix = stage, config.streaming.group_prefix
        prefix = f"{self.group_prefix}.{stage}"
        if stage not in REPLICATED:
            self.value = prefix
            return
        host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
        slot = self._take_slot(Path(config.streaming.state_dir) / "locks", f"{stage}.{host}")
        if slot is None:  # no lock possible here: an id of its own, which fences nothing
            self.value = f"{prefix}.{host}.{uuid.uuid4().hex[:12]}"
        else:
            self.value = f"{prefix}.{host}.{slot}"

    def _take_slot(self, folder: Path, name: str) -> int | None:
        """The lowest slot of ``name`` (stage and host: containers that share a state volume
        each count their own, so a restarted one takes its slot back) no live process holds."""
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for slot in range(MAX_SLOTS):
                handle = open(folder / f"{name}.{slot}.lock", "ab")  # noqa: SIM115 (held for life)
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # a live process holds it
                    handle.close()
                    continue
                self._lock = handle
                return slot
        except OSError as exc:
            log.warning("%s: no slot lock under %s (%s): this process's transactional.id is its own, "
                        "so a transaction it leaves open when killed holds back readers until the "
                        "broker ends it (transaction.timeout.ms)", name, folder, exc.strerror or exc)
        return None

    def fenced(self) -> StageFenced:
        stage = self.stage
        if stage in REPLICATED:
            why = (f"another host with the host name {socket.gethostname()!r} runs a {stage} of this "
                   f"pipeline with the same state_dir slot; give each host its own name")
        else:
            why = (f"a second {stage} runs against this pipeline (streaming.group_prefix "
                   f"{self.group_prefix!r}); only one may run: stop the other")
        return StageFenced(f"{stage}: another process took over transactional.id {self.value} "
                           f"(exactly-once delivery): {why}. This one stops without committing; "
                           f"what it had not committed is redone by the one that runs")

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
