"""A command's output paths, checked before its work starts.

A replay that trains for an hour and only then finds its ``--save-model`` directory missing has
lost the hour; an ``--output`` that names the ``--input`` log replaces the log with scores. So a
command names its inputs and outputs here first: a problem is one line (``Error: ...``) before
anything is read, trained or written.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from pathlib import Path

import click

from pipeline.atomic import is_stream

PathArg = str | os.PathLike | None


def check_outputs(inputs: Mapping[str, PathArg | list[Path]], outputs: Mapping[str, PathArg]) -> None:
    """``inputs`` and ``outputs``: option name -> path (None: not given; for an input, also a
    list of paths: an archive's window files). Refuses an output that
    is one of the inputs or another output (the same file, however it is spelled: links, ``..``),
    and one that cannot be written: a directory, under a file, or where the nearest existing
    directory is not writable. The atomic writer creates missing directories; so may this. A
    character device or FIFO (``/dev/null``, ``/dev/stdout``) is a stream the writer writes
    straight (pipeline/atomic.py): left to open() to judge."""
    taken: dict[tuple | str, str] = {}
    for option, given in inputs.items():
        for path in given if isinstance(given, list) else [given]:
            taken.update(dict.fromkeys(_identities(path), option) if path else {})
    for option, path in outputs.items():
        if not path or is_stream(path):  # /dev/null, /dev/stdout, a FIFO: written as a stream
            continue
        keys = _identities(path)
        others = [taken[key] for key in keys if key in taken]
        if others:
            raise click.UsageError(f"{option} {path} is the same file as {others[0]}: writing it "
                                   f"would replace that file; name another file for {option}")
        taken.update(dict.fromkeys(keys, option))
        check_file_writable(Path(path))


def _identities(path: PathArg) -> list[tuple | str]:
    """Ways to know the file a path names: its resolved spelling (``x/../f`` is ``f`` even while
    ``x`` does not exist: the writer creates it), and its device and inode when it exists."""
    keys: list[tuple | str] = [os.path.realpath(path)]
    try:
        stat = os.stat(path)
        keys.append((stat.st_dev, stat.st_ino))
    except OSError:
        pass
    return keys


def check_file_writable(path: Path) -> None:
    """An OSError naming the path when ``path`` cannot be written as a file (its missing
    directories created by the writer): a directory, under a file, or where the nearest existing
    directory is not writable."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory; name a file", str(path))
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(ancestor))
    if not os.access(ancestor, os.W_OK | os.X_OK):  # also a read-only file system, for root
        raise PermissionError(errno.EACCES, "cannot write there", str(ancestor))
