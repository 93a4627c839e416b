"""User mistakes in the files a command is given (log, labels, scores): one line, no traceback.

A subclass of click's exception (as Flask's ``NoAppException`` is), so wherever it is raised
under a command, click prints ``Error: <message>`` and exits with ``exit_code``. The message
names the file and row (``labels.csv:7``) and says what to do.
"""

from __future__ import annotations

import click


class InputError(click.ClickException):
    """A file given on the command line is not what the command expects."""

    exit_code = 1
