"""Log text is attacker-controlled: make it harmless before a terminal or a spreadsheet sees it.

Two hazards, one helper each:

- Terminals obey control characters. An ESC in a user name can recolour the screen, rewrite
  earlier lines, set the window title or (OSC 8 / OSC 52) plant links and clipboard content;
  a CR or a bidi override can make a line read differently from what it holds.
  :func:`printable` shows every such character as a visible escape instead.
- Spreadsheets evaluate a cell that starts with ``= + - @`` (or a tab / CR before one) as a
  formula (CSV injection). :func:`csv_cell` prefixes such a cell with a single quote, as OWASP
  recommends; :func:`csv_uncell` undoes it, so the escaping is reversible.
"""

from __future__ import annotations

# OWASP "CSV Injection": cells starting with these are formulas to Excel / LibreOffice / Sheets.
FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def _escape(char: str) -> str:
    # repr gives \x1b, \t, \u202e, \U000e0001: Python's own spelling, unambiguous and ASCII.
    return char if char == " " or char.isprintable() else repr(char)[1:-1]


def printable(text: str) -> str:
    """``text`` with every character Python does not count as printable (C0 / C1 controls
    including ESC, CR, LF and TAB, bidi and other format characters, line separators,
    unassigned code points; the plain space excepted) shown as a backslash escape."""
    if text.isprintable():  # the common case costs one C-level scan
        return text
    return "".join(_escape(char) for char in text)


def csv_cell(value: str) -> str:
    """A CSV cell a spreadsheet will show as text: a formula-leading value (or one that already
    starts with the quote, so that :func:`csv_uncell` can tell the two apart) gets a ``'`` in
    front."""
    if value.startswith(FORMULA_LEADS) or value.startswith(QUOTE):
        return QUOTE + value
    return value


def csv_uncell(cell: str) -> str:
    """The value :func:`csv_cell` was given (its exact inverse)."""
    return cell[1:] if cell.startswith(QUOTE) else cell
