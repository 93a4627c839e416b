"""A window's records kept on disk while it fills, read back in order without duplicates: what
lets the trainer train on a window of any size with bounded memory.

Records come in arrival order, from several partitions, possibly twice (at-least-once delivery).
Training wants them once each, in event order. So records are buffered in memory up to a run's
size, sorted by their order key and written out as a sorted run; reading merges the runs
(``heapq.merge``) and drops adjacent duplicates (the key ends with the event's identity, so the
copies of one event are neighbours). When runs pile up they are merged into one, so the open
files stay few. Only the buffer, one record per run and the file names are in memory.

A run is a plain file of length-prefixed frames (no pickle): the key's time, line, identity, then
the record's bytes as read from Kafka.
"""

from __future__ import annotations

import heapq
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

HEAD = struct.Struct("<dqiqI")  # time, line, partition, offset, topic length
SIZE = struct.Struct("<I")
MAX_RUNS = 64  # runs merged into one beyond this: open files stay bounded

OrderKey = tuple[float, int, tuple[str, int, int]]  # pipeline.windowing.event_order


def write_frame(handle, key: OrderKey, value: bytes) -> None:
    time, line, (topic, partition, offset) = key
    name = topic.encode()
    handle.write(HEAD.pack(time, line, partition, offset, len(name)))
    handle.write(name)
    handle.write(SIZE.pack(len(value)))
    handle.write(value)


READ_BUFFER = 1 << 16  # per run being merged: up to MAX_RUNS are read at once (4 MiB, not 64)


def read_frames(path: Path) -> Iterator[tuple[OrderKey, bytes]]:
    with open(path, "rb", buffering=READ_BUFFER) as handle:
        while head := handle.read(HEAD.size):
            time, line, partition, offset, name_size = HEAD.unpack(head)
            topic = handle.read(name_size).decode()
            (size,) = SIZE.unpack(handle.read(SIZE.size))
            yield (time, line, (topic, partition, offset)), handle.read(size)


def unique(frames: Iterator[tuple[OrderKey, bytes]]) -> Iterator[tuple[OrderKey, bytes]]:
    previous = None
    for key, value in frames:
        if key != previous:
            previous = key
            yield key, value


class SpilledWindow:
    """The records of one window: ``add`` them in any order, ``read`` them sorted and unique."""

    def __init__(self, directory: Path, run_size: int):
        self.directory = directory
        self.run_size = run_size
        self.buffer: list[tuple[OrderKey, bytes]] = []
        self.runs: list[Path] = []
        self.received = 0  # records added, duplicates included
        self._named = 0

    def add(self, key: OrderKey, value: bytes) -> None:
        self.buffer.append((key, value))
        self.received += 1
        if len(self.buffer) >= self.run_size:
            self._write_run(unique(iter(sorted(self.buffer, key=lambda kv: kv[0]))))
            self.buffer = []
            if len(self.runs) >= MAX_RUNS:
                merged = list(self.runs)
                self.runs = []
                self._write_run(self._merge(merged, []))
                for path in merged:
                    path.unlink()

    def _write_run(self, frames: Iterator[tuple[OrderKey, bytes]]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"run-{self._named:06d}"
        self._named += 1
        with open(path, "wb", buffering=1 << 20) as handle:
            for key, value in frames:
                write_frame(handle, key, value)
        self.runs.append(path)

    @staticmethod
    def _merge(runs: list[Path], buffer: list[tuple[OrderKey, bytes]]) -> Iterator[tuple[OrderKey, bytes]]:
        streams = [read_frames(path) for path in runs]
        streams.append(iter(sorted(buffer, key=lambda kv: kv[0])))
        return unique(heapq.merge(*streams, key=lambda kv: kv[0]))

    def read(self) -> Iterator[bytes]:
        """Every distinct record once, in order; as often as asked."""
        for _, value in self._merge(self.runs, self.buffer):
            yield value

    def distinct(self) -> int:
        """Distinct records (a pass over the runs when duplicates may be among them)."""
        if not self.runs:
            return len({key for key, _ in self.buffer})
        return sum(1 for _ in self.read())

    def discard(self) -> None:
        self.buffer = []
        shutil.rmtree(self.directory, ignore_errors=True)
        self.runs = []
