"""User mistakes in the files a command is given (log, labels, scores): one line, no traceback.

A subclass of click's exception (as Flask's ``NoAppException`` is), so wherever it is raised
under a command, click prints ``Error: <message>`` and exits with ``exit_code``. The message
names the file and row (``labels.csv:7``) and says what to do.
"""

from __future__ import annotations

import errno
import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from pipeline.config import ConfigError


class InputError(click.ClickException):
    """A file given on the command line is not what the command expects."""

    exit_code = 1


class UnreadableLog(InputError):
    """A gzip log that ends early or is corrupt."""


@contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """An OSError raised inside that names no file (a read of an open file that failed: EIO)
    is raised again naming ``path``, so that the one line the CLI prints says which file."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


# What a path the user named can be wrong with: said in one line, never a traceback.
_PATH_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOENT", "EACCES", "EPERM", "EISDIR", "ENOTDIR", "ENOSPC", "EDQUOT", "EROFS", "ENAMETOOLONG",
    "ELOOP", "EFBIG", "EEXIST", "EBUSY", "EIO") if hasattr(errno, name))


class FileProblem(click.ClickException):
    """A file or directory the command reads or writes is not usable (missing directory, no
    permission, a directory where a file belongs, disk full): exit 1."""

    exit_code = 1


class ConfigProblem(click.ClickException):
    """A config error, shown as ``Error: <key path>: <problem>`` with exit code 2."""

    exit_code = 2


class SalkaGroup(click.Group):
    """The ``pipeline`` group: an OS error about a path, anywhere under a command, becomes
    ``Error: PATH: problem; ...`` (an unwritable --output is the user's to fix, not a bug; a
    disk that fills while a file is written names no path where nothing could name it); a
    setting found wrong only once in use (a ``kafka:`` value librdkafka refuses) is a config
    problem like those found when the config is read."""

    def invoke(self, ctx: click.Context):
        try:
            return self._invoke_mapped(ctx)
        except click.ClickException as exc:
            if ctx.params.get("log_format") != "json":
                raise
            # --log-format json: the error is a JSON log line too, for the shipper that reads them
            logging.getLogger("pipeline").error("%s", exc.format_message(),
                                                extra={"exit_code": exc.exit_code})
            ctx.exit(exc.exit_code)

    def _invoke_mapped(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise ConfigProblem(str(exc)) from exc
        except KeyboardInterrupt as exc:  # e.g. Ctrl-C while torch loads: click's "Aborted!", exit 1
            from pipeline.interrupt import Interrupted

            name = ctx.invoked_subcommand or "the command"
            raise Interrupted(getattr(exc, "signum", signal.SIGINT), name) from None
        except OSError as exc:
            if exc.errno not in _PATH_ERRNOS:
                raise
            where = f"{exc.filename}: " if exc.filename is not None else ""
            raise FileProblem(f"{where}{exc.strerror}{_hint(exc.errno)}") from exc


def _hint(code: int) -> str:
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG):
        return "; free some disk space or write elsewhere"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "; check its permissions or write elsewhere"
    if code in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP):
        return "; check the path"
    if code == errno.EIO:
        return "; the device could not be read or written: check the disk, or use a copy elsewhere"
    return ""
