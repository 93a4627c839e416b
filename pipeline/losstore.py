"""The entities' kept losses on disk, not in memory: what keeps the alerter's memory flat.

The robust z-score rule (pipeline/alerting.py) needs each entity's last ``alerting.history``
losses, but only twice: when a window closes (the window's losses join them, and their median
and MAD are computed for the next window) and when the state is saved or loaded. Kept in RAM they
cost 8 B per loss, up to ``max_entities`` x ``history`` x 8 B (400 MB at the defaults), growing
with every event until then. Here they live in a scratch file instead:

- ``LossStore``: an append-only file of float64. An entity's kept losses are one run in it
  (offset, count in its EntityHistory); a window's close appends the entity's new run, and the
  old run becomes garbage. When garbage outweighs the live runs, the live ones are copied into a
  fresh file (``compact``). The file is anonymous (``tempfile.TemporaryFile``: gone when the
  process ends); the saved state (pipeline/alerting.py write_state) holds the losses themselves,
  so the file needs no crash safety of its own. Reads and writes are ``os.pread`` / ``os.pwrite``:
  the page cache holds the file, not the process.
- ``WindowTails``: each entity's last ``history`` losses of one window, gathered with bounded
  memory however large the window or skewed its entities: (entity, loss) pairs go to 64 hash
  buckets, spilled to scratch files past a few thousand pairs each, and each bucket is reduced
  to its entities' tails, chunk by chunk, when the window closes.
"""

from __future__ import annotations

import math
import os
import tempfile
from array import array
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np

ITEM = 8  # bytes per loss (float64)
COPY_CHUNK = 1 << 20  # bytes per read/write when compacting


class KeptRun(Protocol):
    """Where an entity's kept losses are in a LossStore (pipeline/alerting.py EntityHistory)."""
    offset: int
    count: int


class LossStore:
    """Runs of float64 in an anonymous scratch file, addressed by (offset, count) in losses.
    The file is created on the first write: an engine keeping no losses (history 0) has none."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = directory
        self._file = None
        self.size = 0  # losses written (the end of the file)

    def _fd(self) -> int:
        if self._file is None:
            self._file = scratch_file(self.directory)
        return self._file.fileno()

    def append(self, values: np.ndarray | bytes) -> int:
        """Writes ``values`` (float64) at the end; returns their offset."""
        data = memoryview(values).cast("B")
        offset = self.size
        if len(data):
            _pwrite_all(self._fd(), data, offset * ITEM)
            self.size += len(data) // ITEM
        return offset

    def read_bytes(self, offset: int, count: int) -> bytes:
        if count == 0:
            return b""
        return read_exactly(self._fd(), count * ITEM, offset * ITEM)

    def read(self, offset: int, count: int) -> np.ndarray:
        return np.frombuffer(self.read_bytes(offset, count), dtype=np.float64)

    def compact(self, runs: Iterable[KeptRun]) -> None:
        """Copies the live ``runs`` (every one that is still pointed at) into a fresh file, in
        the order given, and points them there; the old file and its garbage go."""
        old = self._file
        self._file, self.size = None, 0
        chunk = bytearray()
        for run in runs:
            start = self.size + len(chunk) // ITEM  # where it lands once the chunk is written
            if old is not None and run.count:
                chunk += read_exactly(old.fileno(), run.count * ITEM, run.offset * ITEM)
            run.offset = start
            if len(chunk) >= COPY_CHUNK:
                self.append(bytes(chunk))
                chunk.clear()
        self.append(bytes(chunk))
        if old is not None:
            old.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _pwrite_all(fd: int, data: memoryview, position: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, position)
        data, position = data[written:], position + written


def read_exactly(fd: int, size: int, position: int) -> bytes:
    """``size`` bytes of a scratch file at byte ``position`` (os.pread: the page cache holds
    them, not the process); OSError if the file ends before."""
    data = os.pread(fd, size, position)
    if len(data) != size:
        raise OSError(f"scratch file: short read of {size} bytes at byte {position}")
    return data


def scratch_file(directory: str | os.PathLike | None):
    """An anonymous temporary file in ``directory`` (made if missing; the system's temporary
    directory when None): gone when closed or when the process ends."""
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    return tempfile.TemporaryFile(dir=directory)


BUCKETS = 64  # power of two: a pair's bucket is ident & (BUCKETS - 1)
FLUSH_PAIRS = 4096  # pairs a bucket holds in memory before they go to its file (64 KB)
REDUCE_PAIRS = 1 << 15  # pairs of a bucket file reduced at once (512 KB read, ~2 MB at peak)


class WindowTails:
    """The last ``keep`` losses of each entity (an int ``ident``) of one window, in the order
    added, with memory bounded by the buckets' buffers, one chunk, and the tails themselves of
    one bucket's entities (at most max_entities / 64 x keep)."""

    def __init__(self, keep: int, directory: str | os.PathLike | None = None):
        self.keep = keep
        self.directory = directory
        # Per bucket used: ident, loss, ident, loss, ... as float64 (idents are exact up to
        # 2**53). Made when first used: a small window touches few buckets.
        self.buffers: dict[int, array] = {}
        self.files: list = [None] * BUCKETS

    def buffer(self, ident: int) -> array:
        """Where ``ident``'s pairs go: append ident then loss, and call ``full`` when
        ``len(buffer) >= 2 * FLUSH_PAIRS`` (the caller's loop stays free of method calls)."""
        bucket = ident & (BUCKETS - 1)
        buffer = self.buffers.get(bucket)
        if buffer is None:
            buffer = self.buffers[bucket] = array("d")
        return buffer

    def full(self, ident: int) -> None:
        bucket = ident & (BUCKETS - 1)
        if self.files[bucket] is None:
            self.files[bucket] = scratch_file(self.directory)
        buffer = self.buffers[bucket]
        self.files[bucket].write(buffer)
        del buffer[:]

    def tails(self) -> Iterator[tuple[int, np.ndarray]]:
        """(ident, its last ``keep`` losses of the window, oldest first), every ident with a
        loss, bucket by bucket; the buckets' files are closed as they are read."""
        for bucket in sorted(self.buffers):
            found: dict[int, np.ndarray] = {}
            for pairs in self._chunks(bucket):
                _reduce(pairs, self.keep, found)
            for ident in sorted(found):
                yield ident, found[ident]

    def _chunks(self, bucket: int) -> Iterator[np.ndarray]:
        handle = self.files[bucket]
        if handle is not None:
            handle.seek(0)
            while chunk := handle.read(REDUCE_PAIRS * 2 * ITEM):
                yield np.frombuffer(chunk, dtype=np.float64)
            handle.close()
            self.files[bucket] = None
        buffer = self.buffers[bucket]
        if buffer:
            yield np.frombuffer(buffer, dtype=np.float64).copy()
            del buffer[:]

    def close(self) -> None:
        for handle in self.files:
            if handle is not None:
                handle.close()
        self.files = [None] * BUCKETS


def _reduce(pairs: np.ndarray, keep: int, found: dict[int, np.ndarray]) -> None:
    """Folds a chunk of (ident, loss) pairs, in the order they were added, into ``found``:
    each ident's last ``keep`` losses so far."""
    idents = pairs[0::2].astype(np.int64)
    losses = pairs[1::2]
    order = np.argsort(idents, kind="stable")  # stable: each ident's losses stay in order
    idents, losses = idents[order], losses[order]
    starts = np.flatnonzero(np.concatenate(([True], idents[1:] != idents[:-1])))
    ends = np.append(starts[1:], len(idents))
    for start, end in zip(starts.tolist(), ends.tolist()):
        ident = int(idents[start])
        tail = losses[max(start, end - keep):end]
        before = found.get(ident)
        if before is not None and len(tail) < keep:
            tail = np.concatenate((before, tail))[-keep:]
        found[ident] = tail.copy()  # not a view that keeps the whole chunk alive


def robust_stats(values: np.ndarray) -> tuple[float, float]:
    """(median, MAD) of ``values`` as Python's ``sorted`` and the middle (the mean of the two
    middle ones for an even count) give them, to the bit: numpy's stable sort keeps -0.0 and 0.0
    in Python's order; with a NaN or an infinity (a NaN deviation) numpy would sort NaN last
    where Python's comparisons leave it, so those few go through Python itself."""
    if len(values) == 0:
        return math.nan, math.nan
    if not np.isfinite(values).all():
        ordered = sorted(values.tolist())
        median = _sorted_median(ordered)
        return median, _sorted_median(sorted(abs(v - median) for v in ordered))
    median = _sorted_median(np.sort(values, kind="stable"))
    return median, _sorted_median(np.sort(np.abs(values - median)))  # no -0.0 among these


def _sorted_median(ordered) -> float:
    n = len(ordered)
    mid = n // 2
    return float(ordered[mid]) if n % 2 else (float(ordered[mid - 1]) + float(ordered[mid])) / 2
