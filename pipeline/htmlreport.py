"""A self-contained HTML report of a scores file: summary, plots, top events and entities.

Data preparation (pure functions returning the dataclasses below) is kept apart from rendering: the
plots are drawn with matplotlib (Agg) and the page is the Jinja2 template ``templates/report.html.j2``
with autoescape on, so all log text (attacker-controlled) is HTML-escaped by the template. The file
loads nothing: plots are inline base64 PNGs, styles are inline, and a Content-Security-Policy
forbids scripts and any fetch.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import numpy as np
from markupsafe import Markup

from pipeline import ranking
from pipeline.atomic import write_bytes_atomic
from pipeline.config import AlertingConfig
from pipeline.evaluate import scored_truth
from pipeline.normalise import entities
from pipeline.ranking import (
    columns_for,
    entity_columns,
    entity_ranking,
    entity_values,
    line_number,
    top_events,
)
from pipeline.scorefile import ScoreRow
from pipeline.stats import detection_scores

TREND_ENTITIES = 8  # lines in an entity trend plot
ENTITY_NUMERIC = frozenset({0, 2, 3, 4, 5, 6, 7, 8})  # right-aligned columns of an entity table


@dataclass(frozen=True)
class Plot:
    id: str
    alt: str
    src: Markup  # a data:image/png;base64 URI built here from matplotlib's bytes: safe by construction


@dataclass(frozen=True)
class Token:
    text: str
    loss: float | None  # None: the model did not score this token
    alpha: float = 0.0  # shading opacity, 0.03 .. 0.9
    color: str = "inherit"  # text colour: white on dark shading


@dataclass(frozen=True)
class TopEvent:
    rank: int
    loss: float
    line: str
    window: str
    entities: list[str]
    tokens: list[Token] | None  # the per-token explanation, None where the row has none
    raw: str | None  # the raw log line, None where unknown
    attention: Attention | None = None  # the RNN's attention for its worst token (report --model)
    score: float | None = None  # the entity-normalised score it ranks by (alerting.normalise)


@dataclass(frozen=True)
class Attention:
    """pipeline.attentionview.AttentionView, shaded for display: ``tokens`` carry the weight as
    ``loss`` (None: not readable for this prediction) and ``alpha`` relative to the largest."""

    target: str
    loss: float
    tokens: list[Token]
    trained_through: int | None


def _attention(view) -> Attention:
    top = max((w for _, w in view.context if w is not None), default=0.0) or 1.0
    tokens = [Token(text, None) if w is None else
              Token(text, w, 0.03 + 0.87 * w / top, "#fff" if w / top > 0.6 else "inherit")
              for text, w in view.context]
    return Attention(view.target, view.loss, tokens, view.trained_through)


@dataclass(frozen=True)
class TopEvents:
    columns: list[str]  # entity columns, one table column each
    events: list[TopEvent]
    scale: float | None  # loss of full shading (the legend's maximum), None when nothing is explained
    normalised: bool = False  # ranked by the entity-normalised score (a score column)

    @property
    def explained(self) -> int:
        return sum(1 for e in self.events if e.tokens)


@dataclass(frozen=True)
class EntityTable:
    kind: str  # "users" / "hosts": element ids and captions
    entity: str  # the entity kind ranked ("user", "host")
    title: str
    columns: list[str]  # the scores file's columns it covers; empty when none
    header: list[str]
    body: list[list[str]]  # one formatted row per ranked entity
    names: list[str]  # the entities of the trend plot
    windows: list[int]  # the trend's windows (the scored ones)
    trend: dict[str, tuple[list[float], list[float]]]  # name -> max and mean loss per window
    numeric: frozenset[int] = ENTITY_NUMERIC
    ranked_by: str = "loss"  # what "highest event ..." means: loss or normalised score


@dataclass(frozen=True)
class Detection:
    """How well one ranking (the normalised score) finds the labelled events, as Evaluation's
    fields do for the loss."""

    normalise: list[str]  # alerting.normalise: the entities the score is normalised by
    roc_auc: float
    average_precision: float
    roc: tuple[np.ndarray, np.ndarray]  # false / true positive rates
    pr: tuple[np.ndarray, np.ndarray]  # recall / precision


@dataclass(frozen=True)
class Evaluation:
    """Detection against labels by loss, and by ``score`` (the entity-normalised score events are
    ranked by) where alerting.normalise is on; ``roc_auc`` is None where it cannot be computed
    (one class only)."""

    positives: int
    scored: int
    roc_auc: float | None = None
    average_precision: float | None = None
    roc: tuple[np.ndarray, np.ndarray] | None = None  # false / true positive rates
    pr: tuple[np.ndarray, np.ndarray] | None = None  # recall / precision
    base_rate: float = 0.0
    windows: list[list[str]] = field(default_factory=list)  # window_header's cells, one row a window
    score: Detection | None = None

    @property
    def window_header(self) -> list[str]:
        by = ["score AUC", "score AP", "loss AUC", "loss AP"] if self.score else ["ROC AUC", "AP"]
        return ["window", "scored", "labelled", *by]

    def info(self) -> dict:
        """What ``build_report`` returns about it."""
        if self.roc_auc is None:
            return {"positives": self.positives}
        score = ({"score": {"normalise": self.score.normalise, "roc_auc": self.score.roc_auc,
                            "average_precision": self.score.average_precision}} if self.score else {})
        return {"positives": self.positives, "roc_auc": self.roc_auc,
                "average_precision": self.average_precision, "windows_evaluated": len(self.windows),
                **score}


@functools.cache
def _template() -> jinja2.Template:
    # autoescape=True for every value: no escaping by hand anywhere in this module.
    environment = jinja2.Environment(loader=jinja2.PackageLoader("pipeline", "templates"), autoescape=True,
                                     trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                                     undefined=jinja2.StrictUndefined)
    return environment.get_template("report.html.j2")


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _plot(fig, alt: str, element_id: str) -> Plot:
    """The figure as an inline PNG. Only the data URI is marked safe: base64 of our own bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    payload = base64.b64encode(buffer.getvalue()).decode("ascii")
    return Plot(element_id, alt, Markup(f"data:image/png;base64,{payload}"))


def _plain_label(text: str) -> str:
    """Data-derived text for a matplotlib label, shown literally: a name like ``$x^2$`` or
    ``$\\frac$`` would otherwise be parsed as math text (and crash the report on bad math).
    Every ``$`` is escaped, so matplotlib sees no math and prints ``\\$`` back as ``$``."""
    return text.replace("$", r"\$")


def _fmt(value: float, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _token_explanation(row: Mapping[str, str]) -> list[tuple[str, float | None]] | None:
    """(token, loss) pairs of a row's explanation, or None where it has none (or a broken one)."""
    if not row.get("tokens") or not row.get("token_losses"):
        return None
    try:
        tokens, losses = json.loads(row["tokens"]), json.loads(row["token_losses"])
    except ValueError:
        return None
    if not isinstance(tokens, list) or not isinstance(losses, list) or len(tokens) != len(losses):
        return None
    pairs = []
    for token, loss in zip(tokens, losses):
        number = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None
        pairs.append((str(token), number))
    return pairs


def _shade(pairs: list[tuple[str, float | None]], scale: float) -> list[Token]:
    """Tokens shaded by their loss: ``scale`` nats (or more) is the full red."""
    tokens = []
    for text, loss in pairs:
        if loss is None:
            tokens.append(Token(text, None))
            continue
        alpha = 0.03 + 0.87 * min(1.0, max(0.0, loss) / scale)
        tokens.append(Token(text, loss, alpha, "#fff" if alpha > 0.6 else "inherit"))
    return tokens


def top_events_data(top: list[ScoreRow], columns: list[str], raw: Mapping[int, str],
                    attention: Mapping[int, object] | None = None,
                    scores: ranking.Scores | None = None) -> TopEvents:
    """The top events table of ranked rows ``top``: entity ``columns``, explanations, ``raw`` lines,
    ``attention`` (line -> pipeline.attentionview.AttentionView) where given, and the normalised
    ``scores`` (ranking.ranking_scores) they were ranked by, where given."""
    attention = attention or {}
    pairs = [_token_explanation(row) for row in top]
    token_losses = [loss for p in pairs if p for _, loss in p if loss is not None]
    # One scale for the whole table, so shades compare across events.
    scale = max(max(token_losses, default=1.0), 1e-6)
    events = [TopEvent(rank, row.loss, row["line"], row["window"],
                       [row.entities.get(c, "") for c in columns], _shade(p, scale) if p else None,
                       raw.get(line_number(row)),
                       _attention(attention[line_number(row)]) if line_number(row) in attention else None,
                       scores.get(id(row)) if scores is not None else None)
              for rank, (row, p) in enumerate(zip(top, pairs), start=1)]
    return TopEvents(columns, events, scale if token_losses else None, scores is not None)


def _window_losses(scored: list[ScoreRow]) -> dict[int, np.ndarray]:
    by_window: dict[int, list[float]] = {}
    for row in scored:
        by_window.setdefault(row.window, []).append(row.loss)
    return {w: np.array(by_window[w]) for w in sorted(by_window)}


def _window_ticks(ax, windows: list[int], positions: list[int]) -> None:
    step = max(1, math.ceil(len(windows) / 24))
    ax.set_xticks(positions[::step], [str(w) for w in windows[::step]],
                  rotation=45 if len(windows) > 8 else 0, ha="right" if len(windows) > 8 else "center")


def _loss_by_window_plot(per_window: dict[int, np.ndarray]) -> Plot:
    windows = list(per_window)
    stats = []
    for w, losses in per_window.items():
        q1, median, q3 = np.percentile(losses, [25, 50, 75])
        low, high = np.percentile(losses, [1, 99])
        stats.append({"med": median, "q1": q1, "q3": q3, "whislo": low, "whishi": high,
                      "mean": float(losses.mean()), "fliers": [], "label": str(w)})
    fig = _figure(min(14.0, max(7.0, 0.35 * len(windows) + 3)), 4.0)
    ax = fig.add_subplot()
    positions = list(range(len(windows)))
    ax.bxp(stats, positions=positions, showmeans=True, patch_artist=True, widths=0.6,
           boxprops={"facecolor": "#cfe2f3", "edgecolor": "#3d6a99"},
           medianprops={"color": "#1f4e79"},
           meanprops={"marker": "D", "markerfacecolor": "#f29d38", "markeredgecolor": "none",
                      "markersize": 4})
    ax.scatter(positions, [losses.max() for losses in per_window.values()], marker="x", color="#d62728",
               zorder=3, label="max")
    ax.set_xlabel("window")
    ax.set_ylabel("loss (nats)")
    ax.set_title("event loss per window (box: quartiles, whiskers: 1st-99th percentile)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    _window_ticks(ax, windows, positions)
    return _plot(fig, "loss distribution per window", "loss-by-window-plot")


def _trend_series(rows: list[ScoreRow], columns: list[str], names: list[str],
                  windows: list[int]) -> dict[str, tuple[list[float], list[float]]]:
    """Per entity of ``names``: its max and mean event loss in each of ``windows`` (NaN: no event)."""
    wanted = set(names)
    per: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    for row in rows:
        if row.loss is None:
            continue
        for value in (v for v in entity_values(row, columns) if v in wanted):
            per[value].setdefault(row.window, []).append(row.loss)
    return {name: ([max(series[w]) if w in series else np.nan for w in windows],
                   [float(np.mean(series[w])) if w in series else np.nan for w in windows])
            for name, series in per.items()}


def _trend_plot(table: EntityTable) -> Plot:
    fig = _figure(12.0, 3.4)
    axes = fig.subplots(1, 2, sharex=True)
    positions = list(range(len(table.windows)))
    for name in table.names:
        maxima, means = table.trend[name]
        label = _plain_label(name if len(name) <= 24 else name[:23] + "…")
        axes[0].plot(positions, maxima, marker="o", markersize=3, linewidth=1.2, label=label)
        axes[1].plot(positions, means, marker="o", markersize=3, linewidth=1.2, label=label)
    for ax, what in zip(axes, ("max", "mean")):
        ax.set_title(f"{what} loss per window, top {len(table.names)} {table.kind}", fontsize=10)
        ax.set_xlabel("window")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
        _window_ticks(ax, table.windows, positions)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _plot(fig, f"loss trend of the top {table.kind}", f"top-{table.kind}-trend")


def entity_table(rows: list[ScoreRow], kind: str, entity: str, title: str, top_n: int,
                 windows: list[int], scores: ranking.Scores | None = None) -> EntityTable:
    """The ``top_n`` entities of kind ``entity`` (``user``, ``host``) ranked by their worst event
    (by the normalised ``scores`` where given, else by loss), with the loss trend of the first
    few over ``windows``."""
    try:
        columns = columns_for(rows, entity)
    except ValueError:
        columns = []
    ranked = entity_ranking(rows, entity, top_n, scores) if columns else []
    extra = ["max score"] if scores is not None else []
    header = ["rank", entity, *extra, "max loss", "mean loss", "scored", "events", "top 1%",
              "worst line", "worst window"]
    body = [[str(rank), e["entity"], *([_fmt(e["max_score"])] if extra else []), _fmt(e["max_loss"]),
             _fmt(e["mean_loss"]), str(e["scored"]),
             str(e["events"]), str(e["top1pct"]), str(e["worst_line"]) if e["worst_line"] >= 0 else "",
             str(e["worst_window"]) if e["worst_window"] >= 0 else ""]
            for rank, e in enumerate(ranked, start=1)]
    names = [e["entity"] for e in ranked[:TREND_ENTITIES]]
    numeric = frozenset({0, *range(2, len(header))})
    return EntityTable(kind, entity, title, columns, header, body, names, windows,
                       _trend_series(rows, columns, names, windows), numeric,
                       "normalised score" if extra else "loss")


def _curves(truth: np.ndarray, values: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray],
                                                                tuple[np.ndarray, np.ndarray]]:
    """((false, true positive rates), (recall, precision)) of ranking by ``values``."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(truth, values)
    precision, recall, _ = precision_recall_curve(truth, values)
    return (fpr, tpr), (recall, precision)


def evaluation_data(scored: list[ScoreRow], labels: Mapping[int, int],
                    scores: ranking.Scores | None = None, normalise: list[str] | None = None) -> Evaluation:
    """Detection of the labelled events (``labels``: line -> 0/1) by loss: AUC, AP and their curves,
    over all ``scored`` rows and per window; and the same by the normalised ``scores``
    (ranking.ranking_scores, by the entities ``normalise``) where given."""
    losses, truth = scored_truth(scored, labels)
    positives = int(truth.sum())
    detection = detection_scores(truth, losses)
    if detection is None:
        return Evaluation(positives, len(truth))
    auc, ap = detection
    roc, pr = _curves(truth, losses)
    by = [losses]
    score = None
    if scores is not None:
        values = np.array([scores[id(r)] for r in scored], dtype=np.float64)  # scored_truth's order
        by.insert(0, values)  # the score's columns first, as in eval's table
        score = Detection(list(normalise or []), *detection_scores(truth, values), *_curves(truth, values))
    windows = _window_evaluation(truth, by, np.array([r.window for r in scored]))
    return Evaluation(positives, len(truth), auc, ap, roc, pr, float(truth.mean()), windows, score)


def _window_evaluation(truth: np.ndarray, rankings: list[np.ndarray], windows: np.ndarray) -> list[list[str]]:
    """Per-window rows: window, scored, labelled, then AUC and AP of each ranking (the same
    events ranked by each of ``rankings``), for the windows with both labelled and normal
    scored events."""
    body = []
    for w in sorted(set(windows.tolist())):
        mask = windows == w
        found = [detection_scores(truth[mask], values[mask]) for values in rankings]
        if found[0] is not None:  # the truth decides, so the same for every ranking
            body.append([str(w), str(int(mask.sum())), str(int(truth[mask].sum())),
                         *(f"{value:.4f}" for detection in found for value in detection)])
    return body


# Line colours of the rankings in the ROC / PR plots: the score as the alerts rank, the raw loss.
SCORE_COLOR, LOSS_COLOR = "#d95f02", "#1f77b4"


def _legend(fig, ax, corner: str, two: bool) -> None:
    """One ranking's legend sits in the plot's empty ``corner``; with two rankings, one curve is
    often in that corner (a good score's PR curve runs along the top), so it goes below the plot."""
    if two:
        fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    else:
        ax.legend(loc=corner, fontsize=8)


def _roc_plot(evaluation: Evaluation) -> Plot:
    fpr, tpr = evaluation.roc
    fig = _figure(4.8, 4.2)
    ax = fig.add_subplot()
    score = evaluation.score
    if score is not None:
        ax.plot(*score.roc, color=SCORE_COLOR, linewidth=1.6, label=f"score: AUC = {score.roc_auc:.3f}")
    ax.plot(fpr, tpr, color=LOSS_COLOR, linewidth=1.6,
            label=f"{'loss: ' if score is not None else ''}AUC = {evaluation.roc_auc:.3f}")
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=0.8, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("ROC curve", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(fig, ax, "lower right", two=score is not None)
    return _plot(fig, "ROC curve", "roc-plot")


def _pr_plot(evaluation: Evaluation) -> Plot:
    recall, precision = evaluation.pr
    fig = _figure(4.8, 4.2)
    ax = fig.add_subplot()
    score = evaluation.score
    if score is not None:
        ax.step(*score.pr, where="post", color=SCORE_COLOR, linewidth=1.6,
                label=f"score: AP = {score.average_precision:.3f}")
    # Alone, the loss keeps the PR plot's own green; beside the score, the loss's colour of the ROC.
    ax.step(recall, precision, where="post", color="#2ca02c" if score is None else LOSS_COLOR, linewidth=1.6,
            label=f"{'loss: ' if score is not None else ''}AP = {evaluation.average_precision:.3f}")
    base = evaluation.base_rate
    ax.axhline(base, color="#999", linestyle="--", linewidth=0.8, label=f"base rate {base:.3g}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("precision-recall curve", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(fig, ax, "upper right", two=score is not None)
    return _plot(fig, "precision-recall curve", "pr-plot")


def summary_items(rows: list[ScoreRow], scored: list[ScoreRow], all_windows: list[int],
                  columns: list[str]) -> list[tuple[str, str]]:
    """The summary's (label, value) pairs."""
    times = [r.event_time for r in rows if r.event_time is not None]
    losses = np.array([r.loss for r in scored])
    span = f" ({all_windows[0]} … {all_windows[-1]})" if all_windows else ""
    summary = [("events", str(len(rows))), ("scored", str(len(scored))),
               ("unscored (first window)", str(len(rows) - len(scored))),
               ("windows", f"{len(all_windows)}{span}")]
    if times:
        summary.append(("time range", f"{_time(min(times))} — {_time(max(times))}"))
    if len(losses):
        p50, p99 = np.percentile(losses, [50, 99])
        summary.append(("loss (nats)", f"min {losses.min():.3f} · median {p50:.3f} · 99th percentile "
                                       f"{p99:.3f} · max {losses.max():.3f}"))
    summary.append(("entity columns", ", ".join(columns) or "none"))
    return summary


def _raw_lines(top: list[ScoreRow],
               raw_lines: Mapping[int, str] | str | Path | None) -> Mapping[int, str]:
    """The raw log text of the ``top`` rows: ``raw_lines`` as given, or read from the log file it names."""
    if isinstance(raw_lines, (str, Path)):
        wanted = {line_number(r) for r in top} - {-1}
        return ranking.raw_lines(raw_lines, wanted) if wanted else {}
    return raw_lines or {}


def render_report(title: str, summary: list[tuple[str, str]], per_window: dict[int, np.ndarray],
                  top: TopEvents, tables: list[EntityTable],
                  evaluation: Evaluation | None) -> tuple[str, int]:
    """The HTML page of the prepared sections, and how many plots it holds."""
    loss_plot = _loss_by_window_plot(per_window) if per_window else None
    trends = [_trend_plot(t) if t.body else None for t in tables]
    evaluated = evaluation is not None and evaluation.roc_auc is not None
    roc_plot, pr_plot = (_roc_plot(evaluation), _pr_plot(evaluation)) if evaluated else (None, None)
    document = _template().render(title=title, summary=summary, loss_plot=loss_plot, top=top,
                                  entities=list(zip(tables, trends)), evaluation=evaluation,
                                  roc_plot=roc_plot, pr_plot=pr_plot)
    return document, sum(p is not None for p in (loss_plot, *trends, roc_plot, pr_plot))


def build_report(rows: list[ScoreRow], output_path: str | Path,
                 labels: Mapping[int, int] | None = None,
                 raw_lines: Mapping[int, str] | str | Path | None = None,
                 top_n: int = 30, title: str = "salka report",
                 attention: Callable[[list[ScoreRow], Mapping[int, str]], Mapping[int, object]] | None = None,
                 alerting: AlertingConfig | None = None) -> dict:
    """Write a self-contained HTML report of scores ``rows`` (from ``read_scores``) to ``output_path``.

    ``labels``: line -> 0/1 (``read_labels``), adds ROC / precision-recall curves and per-window AUC.
    ``raw_lines``: line -> raw log text, or the path of the scored log file, to show each top event's
    raw line. Returns what the report contains: ``events``, ``scored``, ``windows``, ``plots``,
    ``top_events``, ``top_users``, ``top_hosts``, ``explained`` (top events shown with per-token
    losses), ``has_labels`` (plus ``roc_auc`` / ``average_precision`` where they could be computed)
    and ``path``. ``attention(ranked rows, raw lines)`` -> line -> AttentionView (as
    pipeline.attentionview.attention_for_rows) adds attention weights under the top events.
    ``alerting`` with ``normalise``: events and entities are ranked by the entity-normalised score
    (as ``pipeline top`` and the alerts rank them), shown next to the loss; with labels, the curves
    and AUCs are drawn for both, and the result's ``score`` holds the score's ``roc_auc`` and
    ``average_precision`` (and ``normalise``).
    """
    output_path = Path(output_path)
    scored = [r for r in rows if r.loss is not None]
    all_windows = sorted({r.window for r in rows})
    per_window = _window_losses(scored)
    columns = entity_columns(rows)
    scores = ranking.ranking_scores(rows, alerting)
    shown = scores if ranking.normalised(alerting) else None  # a score column only when it differs
    ranked = top_events(rows, top_n, scores)
    raw = _raw_lines(ranked, raw_lines)
    top = top_events_data(ranked, columns, raw, attention(ranked, raw) if attention else None, shown)
    scored_windows = list(per_window)  # trends leave out the unscored first window
    tables = [entity_table(rows, "users", "user", "Top users", top_n, scored_windows, shown),
              entity_table(rows, "hosts", "host", "Top hosts", top_n, scored_windows, shown)]
    by = entities(alerting.normalise) if shown is not None else None
    evaluation = evaluation_data(scored, labels, shown, by) if labels is not None else None
    summary = summary_items(rows, scored, all_windows, columns)
    document, plots = render_report(title, summary, per_window, top, tables, evaluation)
    write_bytes_atomic(output_path, document.encode("utf-8"))
    return {"path": str(output_path), "events": len(rows), "scored": len(scored), "windows": len(all_windows),
            "plots": plots, "top_events": len(top.events), "explained": top.explained,
            "top_users": len(tables[0].body), "top_hosts": len(tables[1].body),
            "has_labels": labels is not None, **(evaluation.info() if evaluation is not None else {})}
