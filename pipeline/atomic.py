"""The one way salka writes a file others may read, and the one policy for state it cannot read.

``atomic_write``: the new content goes to a temporary file in the same directory, is fsynced,
renamed over the target and the directory is fsynced, so after a crash or power loss a reader
finds the old file or the new one, never half of one; the temporary file is removed on any
exception, KeyboardInterrupt included. Checkpoints, windower and alerter state, score files and
the stages' remembered topic ids all use it.

``quarantine``: a state file a stage cannot use (truncated, corrupt, not salka's, or made by
another configuration) is moved aside to ``<name>.corrupt-<UTC time>`` with one error line, and
the stage falls back (the previous checkpoint, or the committed offsets with empty state). The
file is kept for forensics and can be moved back; the stage never crash-loops on it.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TextIO

log = logging.getLogger(__name__)
_FULL = frozenset(getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EFBIG") if hasattr(errno, name))


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def fsync_dir(directory: str | Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces ``path`` whole when the block ends without error.
    A character device or a FIFO (``/dev/null``, ``/dev/stdout``, ``<(...)``) is a stream, not a
    file to replace: it is written straight, as the bytes come."""
    path = Path(path)
    if is_stream(path):
        with open(path, "wb") as stream:
            yield stream
        return
    if path.is_symlink():  # write where the link points, as open() would; never replace the link
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():  # a rename would replace a directory, a socket, ...
        raise FileExistsError(errno.EEXIST, "exists and is not a regular file (a directory, "
                              "block device or socket); name a file", str(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # a file where a directory of the path should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), exc.filename) from exc
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:  # name the file the caller asked for, not the hidden temporary one
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide archives from readers
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno in _FULL:
            # A write or close that found the disk full names no file: name the one being written.
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_text(path: str | Path) -> Iterator[TextIO]:
    """``atomic_write`` for text: UTF-8, newlines written as given (``newline=""``, as csv wants)."""
    with atomic_write(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        try:
            yield text
        finally:
            text.detach()  # flushed, not closed: atomic_write closes the file after its fsync


def is_stream(path: str | os.PathLike) -> bool:
    """A character device or FIFO, through links: written straight, never replaced."""
    try:
        mode = os.stat(path).st_mode  # through links: /dev/stdout -> /proc/self/fd/1 -> a pipe
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_write(path) as handle:
        handle.write(data)


def quarantine(path: str | Path, problem: str, fallback: str) -> Path:
    """Move an unusable state file aside and say so in one line; returns where it went."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        n += 1
    os.replace(path, target)
    fsync_dir(path.parent)
    log.error("%s: %s; moved aside to %s; %s", path, problem, target.name, fallback)
    return target
