"""``pipeline check``: what salka reads from the first lines of a log under a config.

For each line: the fields, the event time, the window, the entities, what the model reads and
its tokens, or why the line is malformed. This is the way to fit a config to a new format
without reading code (word and BPE vocabularies are learned from the lines shown, as replay
learns them from the first window, so the tokens are indicative).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

from pipeline.config import Config
from pipeline.parsing import CommentRow, Event, HeaderRow, LineParser, Malformed, read_lines
from pipeline.replay import ParseReport, malformed_problem, parse_file
from pipeline.safetext import printable
from pipeline.scorefile import format_number
from pipeline.windowing import window_of

MAX_SHOWN_TOKENS = 40


def _show(value: str) -> str:
    return printable(json.dumps(value, ensure_ascii=False))


def _time(seconds: float | None) -> str:
    if seconds is None:
        return "none (windows count lines)"
    stamp = datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")
    return f"{stamp} ({format_number(seconds)})"


STOP = "replay would stop: "  # the verdict line that makes ``pipeline check`` exit 1


def check_lines(config: Config, path: str | Path, limit: int) -> list[str]:
    """The report for the first ``limit`` physical lines of ``path``, as printable lines; the
    last is the verdict (``STOP``... when replay would refuse the file)."""
    from nn.tokenizers import encode_event
    from pipeline.modelspec import make_masker, make_tokenizer

    parser = LineParser(config.input, masker=make_masker(config))
    # One line past the limit: whether the whole file was read (a verdict of replay's) or not.
    results = [parser.parse(raw, number) for number, raw in islice(read_lines(path), limit + 1)]
    whole = len(results) <= limit
    results = results[:limit]
    events = [r for r in results if isinstance(r, Event)]
    tokenizer = make_tokenizer(config)
    if events:
        tokenizer.fit([e.text_fields for e in events])
    out: list[str] = []
    report = ParseReport()
    for result in results:
        if isinstance(result, HeaderRow):
            what = "comment line" if isinstance(result, CommentRow) else "header row"
            out.append(f"line {result.line}: {what}, skipped")
            report.header_rows += 1
            continue
        if isinstance(result, Malformed):
            out.append(f"line {result.line}: MALFORMED: {printable(result.reason)}")
            report.errors.append(result)
            continue
        report.events += 1
        window = window_of(result, config.window)
        out.append(f"line {result.line}: time {_time(result.time)}, window {window}")
        out.append("  fields:   " + " ".join(f"{k}={_show(v)}" for k, v in result.fields.items()))
        entities = {name: result.entity(name, config.input) for name in config.input.entities}
        out.append("  entities: " + " ".join(f"{k}={_show(v)}" for k, v in entities.items()))
        out.append("  model:    " + " ".join(f"{k}={_show(v)}" for k, v in result.text_fields))
        ids = encode_event(tokenizer, result.text_fields, config.tokenizer.max_tokens)
        tokens = tokenizer.decode(ids)
        more = f" ... ({len(tokens)} in all)" if len(tokens) > MAX_SHOWN_TOKENS else ""
        # Spaces inside a token (BPE's word starts) shown as ␣, so token edges stay visible.
        shown = " ".join(printable(t).replace(" ", "␣") for t in tokens[:MAX_SHOWN_TOKENS])
        out.append(f"  tokens ({config.tokenizer.kind}, {len(ids)}): {shown}{more}")
    lines = report.events + len(report.errors)
    out.append(f"{len(results)} lines read: {report.events} events, {len(report.errors)} malformed, "
               f"{report.header_rows} header / comment lines skipped")
    problem = (malformed_problem(report, str(path), config.input.max_malformed_fraction) if lines
               else f"{path}: no events (the file is empty or only header / comment lines)")
    if not problem:
        out.append("replay would accept lines like these")
    elif whole:
        out.append(f"{STOP}{problem}")
    else:  # the rest of the file may differ: not a verdict (exit 0)
        out.append(f"replay would stop if the whole file were like its first {limit} lines: "
                   f"{problem}; read more of them with -n")
    return out


def require_fit(config: Config, path: str | Path, limit: int = 10_000) -> None:
    """Stop with replay's one line (``InputError``) when the first ``limit`` lines show that the
    config does not fit the file: the demo checks its --input this way before it starts a broker
    and five processes that would dead-letter every line."""
    from pipeline.errors import InputError

    _, report = parse_file(path, config, limit)
    problem = malformed_problem(report, str(path), config.input.max_malformed_fraction)
    if problem:
        raise InputError(problem)
