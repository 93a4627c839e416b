"""Ctrl-C and SIGTERM in one-shot commands: the same cleanup, one line, exit 128 + signal.

Python turns Ctrl-C into KeyboardInterrupt, so ``finally`` blocks and ``atomic_write`` remove
their temporary files; SIGTERM's default action kills the process on the spot and leaves them
behind. ``interruptible`` makes SIGTERM raise the same way, and turns either into one line
(``Error: replay interrupted by SIGTERM; ...``) with exit status 130 or 143, as shells report.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import click


class Interrupted(click.ClickException):
    """The command was stopped by a signal; it cleaned up after itself."""

    def __init__(self, signum: int, what: str):
        super().__init__(f"{what} interrupted by {signal.Signals(signum).name}; "
                         "nothing was left half-written")
        self.exit_code = 128 + signum


class _Terminated(KeyboardInterrupt):
    signum = signal.SIGTERM


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


@contextmanager
def interruptible(what: str) -> Iterator[None]:
    """Usable as ``with interruptible("replay"):`` or as a decorator."""
    main = threading.current_thread() is threading.main_thread()  # signals reach only that one
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        yield
    except KeyboardInterrupt as exc:
        raise Interrupted(getattr(exc, "signum", signal.SIGINT), what) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
