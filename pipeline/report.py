"""Plain-text views of a scores file for a terminal."""

from __future__ import annotations

from pathlib import Path


def raw_lines(path: str | Path, wanted: set[int]) -> dict[int, str]:
    """The text of the wanted physical lines of a log file."""
    found = {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number in wanted:
                found[number] = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    return found


def top_events(rows: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    scored = [r for r in rows if r["loss"] != ""]
    # Ties break by line so the listing is stable.
    return sorted(scored, key=lambda r: (-float(r["loss"]), int(r["line"])))[:limit]


def format_top_events(rows: list[dict[str, str]], limit: int, input_path: str | Path | None = None) -> str:
    top = top_events(rows, limit)
    if not top:
        return "no scored events"
    raw = raw_lines(input_path, {int(r["line"]) for r in top}) if input_path else {}
    fixed = {"line", "event_time", "window", "loss", "loss_total",
             "source_topic", "source_partition", "source_offset"}
    entity_columns = [c for c in top[0] if c not in fixed]
    header = ["rank", "loss", "line", "window", *entity_columns] + (["raw line"] if raw else [])
    table = [header]
    for rank, row in enumerate(top, start=1):
        cells = [str(rank), f"{float(row['loss']):.3f}", row["line"], row["window"],
                 *(row[c] for c in entity_columns)]
        if raw:
            cells.append(raw.get(int(row["line"]), ""))
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)
