"""A window's scores in ascending order with bounded memory: what the alerter ranks by.

The percentile rule needs a window's scores sorted: the threshold is the lowest score whose
mid-rank percentile reaches ``alerting.window_percentile``, the reference grid is the scores at
1001 evenly spaced ranks, and the first window with losses gives each flagged event its
percentile. Held as one float64 array that is 8 B an event: 24 MB for 3M events, the alerter's
last memory that grew with the window. So ``ScoreSorter`` keeps up to ``RUN`` scores in memory
and, beyond that, writes sorted runs of them to a scratch file and merges the runs into one
sorted file (a vectorised k-way merge: from each run a block, everything up to the smallest of
the blocks' last values sorted and written at a time). Up to ``RUN`` scores the result is the
sorted numpy array itself, as before; beyond, a ``SortedFile`` that answers the same three
questions (``len``, ``[i]``, ``searchsorted``) from disk, through an in-memory index of every
``STRIDE``-th score, so a search costs one 4 KB read.

NaN sorts last, as np.sort puts it. -0.0 and 0.0 are equal, and a merge of runs may order them
otherwise than one np.sort of the whole: beyond ``RUN`` scores a zero in the grid or threshold
may carry the other sign, the same value, with the same decisions (replay and the stage still
agree: both sort the same way).
"""

from __future__ import annotations

import os
from array import array

import numpy as np

from pipeline.losstore import ITEM, read_exactly, scratch_file

RUN = 1 << 18  # scores sorted in memory at once (2 MB); a window up to this many stays there
STRIDE = 512  # scores per index entry of a SortedFile: a search reads 4 KB
MERGE_BYTES = 2 << 20  # the merge's blocks, all runs together (and about as much sorted)
MIN_BLOCK = 4096  # scores a run's block holds at least: past 64 runs (16M scores) blocks add up


class SortedFile:
    """Sorted float64 scores in an anonymous scratch file, read with ``os.pread``."""

    def __init__(self, handle, count: int):
        self._file = handle
        self.count = count
        # Every STRIDE-th score (8 / STRIDE B an event): narrows a search to one block.
        step = STRIDE * 1024
        self.index = np.concatenate([np.empty(0)] + [
            self._read(start, min(count, start + step))[::STRIDE].copy()
            for start in range(0, count, step)])

    def __len__(self) -> int:
        return self.count

    def _read(self, start: int, stop: int) -> np.ndarray:
        data = read_exactly(self._file.fileno(), (stop - start) * ITEM, start * ITEM)
        return np.frombuffer(data, dtype=np.float64)

    def __getitem__(self, key):
        if isinstance(key, np.ndarray):
            return np.array([self[int(i)] for i in key], dtype=np.float64)
        i = int(key) + self.count if key < 0 else int(key)
        if not 0 <= i < self.count:
            raise IndexError(key)
        return float(self._read(i, i + 1)[0])

    def searchsorted(self, value: float, side: str = "left") -> int:
        """np.searchsorted's answer over the whole file."""
        block = int(np.searchsorted(self.index, value, side))  # index[block - 1] is before
        start = max(0, (block - 1) * STRIDE)
        stop = min(self.count, block * STRIDE + 1)
        return start + int(np.searchsorted(self._read(start, stop), value, side))

    def close(self) -> None:
        self._file.close()


class ScoreSorter:
    """Scores added one by one (``add``), then ``sorted()`` once; ``close()`` when done with
    them (it closes the scratch files, the sorted one included)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = directory
        self.buffer = array("d")
        self._runs_file = None
        self._runs: list[tuple[int, int]] = []  # (start, count) of each sorted run, NaN apart
        self._nans = 0
        self._written = 0
        self._sorted: SortedFile | None = None

    def __len__(self) -> int:
        return self._written + self._nans + len(self.buffer)

    def add(self, value: float) -> None:
        self.buffer.append(value)
        if len(self.buffer) >= RUN:
            self.spill()

    def spill(self) -> None:
        run = np.frombuffer(self.buffer, dtype=np.float64)
        run.sort()  # in place: the buffer is not copied
        finite = int(np.searchsorted(np.isnan(run), True))  # NaN sorts last: the first of them
        self._nans += len(run) - finite
        if self._runs_file is None:
            self._runs_file = scratch_file(self.directory)
        self._runs_file.seek(self._written * ITEM)
        self._runs_file.write(run[:finite].tobytes())
        self._runs.append((self._written, finite))
        self._written += finite
        del run
        self.buffer = array("d")

    def sorted(self) -> np.ndarray | SortedFile:
        """The scores in ascending order: a numpy array when they fit one run (sorted in
        place, no copy), else a SortedFile."""
        if self._runs_file is None:
            ordered = np.frombuffer(self.buffer, dtype=np.float64) if self.buffer else np.empty(0)
            ordered.sort()
            return ordered
        if self.buffer:
            self.spill()
        self._runs_file.flush()  # the merge reads it with os.pread
        out = scratch_file(self.directory)
        try:
            _merge(self._runs_file, self._runs, out)
            out.write(np.full(self._nans, np.nan).tobytes())
            out.flush()
        except BaseException:
            out.close()
            raise
        finally:
            self._runs_file.close()
            self._runs_file = None
        self._sorted = SortedFile(out, self._written + self._nans)
        return self._sorted

    def close(self) -> None:
        for handle in (self._runs_file, self._sorted):
            if handle is not None:
                handle.close()
        self._runs_file = self._sorted = None


def _merge(runs_file, runs: list[tuple[int, int]], out) -> None:
    """Writes the sorted, NaN-free ``runs`` of ``runs_file`` to ``out`` as one sorted run."""
    block = max(MIN_BLOCK, MERGE_BYTES // ITEM // max(1, len(runs)))
    fd = runs_file.fileno()

    def load(start: int, end: int) -> np.ndarray:
        stop = min(end, start + block)
        return np.frombuffer(read_exactly(fd, (stop - start) * ITEM, start * ITEM),
                             dtype=np.float64)

    # Per run: its loaded block, where the next block starts, where the run ends.
    heads = [[load(start, start + count), start + min(block, count), start + count]
             for start, count in runs if count]
    while heads:
        # Everything up to the smallest last value of the blocks is in the blocks: no run's
        # unread part holds a smaller value.
        cutoff = min(head[0][-1] for head in heads)
        taken = []
        for head in heads:
            cut = int(np.searchsorted(head[0], cutoff, "right"))
            taken.append(head[0][:cut])
            head[0] = head[0][cut:]
        out.write(np.sort(np.concatenate(taken)).tobytes())
        for head in heads:
            if not len(head[0]) and head[1] < head[2]:
                head[0] = load(head[1], head[2])
                head[1] += len(head[0])
        heads = [head for head in heads if len(head[0])]
