"""A self-contained HTML report of a scores file: summary, plots, top events and entities.

The file loads nothing: plots are inline base64 PNGs (matplotlib, Agg), styles are inline, and a
Content-Security-Policy forbids scripts and any fetch. All log text is HTML-escaped (log lines are
attacker-controlled).
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Mapping
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import numpy as np

from pipeline import report as textreport
from pipeline.report import (
    columns_for,
    entity_columns,
    entity_ranking,
    entity_values,
    line_number,
    top_events,
    window_number,
)

TREND_ENTITIES = 8  # lines in an entity trend plot
CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       margin: 0 auto; max-width: 1400px; padding: 0 24px 48px; color: #1f2328; background: #fff; }
h1 { font-size: 24px; margin: 24px 0 4px; }
h2 { font-size: 18px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #d0d7de; }
p.note { color: #59636e; margin: 4px 0 8px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; margin: 8px 0; }
dl.summary dt { color: #59636e; } dl.summary dd { margin: 0; font-variant-numeric: tabular-nums; }
figure { margin: 8px 0; } figure img { max-width: 100%; height: auto; }
figcaption { color: #59636e; font-size: 13px; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.event { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12px;
         overflow-wrap: anywhere; max-width: 760px; }
.event .tok { white-space: pre-wrap; border-radius: 2px; padding: 0 1px; margin-right: 1px; }
.event .raw { color: #59636e; display: block; margin-top: 2px; white-space: pre-wrap; }
.legend { display: inline-block; width: 160px; height: 10px; vertical-align: middle;
          border: 1px solid #d0d7de;
          background: linear-gradient(to right, rgba(220,38,38,0.03), rgba(220,38,38,0.9)); }
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(fig, alt: str, element_id: str | None = None) -> str:
    ident = f' id="{element_id}"' if element_id else ""
    return f'<img{ident} alt="{escape(alt)}" src="data:image/png;base64,{_png(fig)}">'


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


def _tokens_html(pairs: list[tuple[str, float | None]], scale: float) -> str:
    spans = []
    for token, loss in pairs:
        if loss is None:
            spans.append(f'<span class="tok" title="not scored">{escape(token)}</span>')
            continue
        alpha = 0.03 + 0.87 * min(1.0, max(0.0, loss) / scale)
        color = "#fff" if alpha > 0.6 else "inherit"
        spans.append(f'<span class="tok" style="background: rgba(220,38,38,{alpha:.3f}); color: {color}" '
                     f'title="{escape(token)}: {loss:.3f} nats">{escape(token)}</span>')
    return "".join(spans)


def _table(element_id: str, header: list[str], body: list[list[str]], numeric: set[int]) -> str:
    """An HTML table; ``body`` cells are already HTML (escape before)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    rows = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                         for i, c in enumerate(cells)) + "</tr>"
        for cells in body)
    return f'<table id="{element_id}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _window_losses(scored: list[dict[str, str]]) -> dict[int, np.ndarray]:
    by_window: dict[int, list[float]] = {}
    for row in scored:
        by_window.setdefault(window_number(row), []).append(float(row["loss"]))
    return {w: np.array(by_window[w]) for w in sorted(by_window)}


def _window_ticks(ax, windows: list[int], positions: list[int]) -> None:
    step = max(1, math.ceil(len(windows) / 24))
    ax.set_xticks(positions[::step], [str(w) for w in windows[::step]],
                  rotation=45 if len(windows) > 8 else 0, ha="right" if len(windows) > 8 else "center")


def _loss_by_window_plot(per_window: dict[int, np.ndarray]) -> str:
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
    return _img(fig, "loss distribution per window", "loss-by-window-plot")


def _trend_plot(rows: list[dict[str, str]], kind: str, columns: list[str], names: list[str],
                all_windows: list[int]) -> str:
    wanted = set(names)
    per: dict[str, dict[int, list[float]]] = {n: {} for n in names}
    for row in rows:
        if row["loss"] == "":
            continue
        for value in (v for v in entity_values(row, columns) if v in wanted):
            per[value].setdefault(window_number(row), []).append(float(row["loss"]))
    fig = _figure(12.0, 3.4)
    axes = fig.subplots(1, 2, sharex=True)
    positions = list(range(len(all_windows)))
    for name in names:
        series = per[name]
        maxima = [max(series[w]) if w in series else np.nan for w in all_windows]
        means = [float(np.mean(series[w])) if w in series else np.nan for w in all_windows]
        label = _plain_label(name if len(name) <= 24 else name[:23] + "…")
        axes[0].plot(positions, maxima, marker="o", markersize=3, linewidth=1.2, label=label)
        axes[1].plot(positions, means, marker="o", markersize=3, linewidth=1.2, label=label)
    for ax, what in zip(axes, ("max", "mean")):
        ax.set_title(f"{what} loss per window, top {len(names)} {kind}", fontsize=10)
        ax.set_xlabel("window")
        ax.set_ylabel("loss (nats)")
        ax.grid(alpha=0.3)
        _window_ticks(ax, all_windows, positions)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _img(fig, f"loss trend of the top {kind}", f"top-{kind}-trend")


def _entity_section(rows: list[dict[str, str]], kind: str, entity: str, title: str, top_n: int,
                    all_windows: list[int], plots: list[int]) -> tuple[str, int]:
    section = [f'<section id="top-{kind}"><h2>{escape(title)}</h2>']
    try:
        columns = columns_for(rows, entity)
    except ValueError:
        columns = []
    if not columns:
        section.append(f'<p class="note">no {escape(entity)} column in this scores file.</p></section>')
        return "".join(section), 0
    ranking = entity_ranking(rows, entity, top_n)
    if not ranking:
        section.append('<p class="note">no scored events.</p></section>')
        return "".join(section), 0
    section.append(f'<p class="note">columns: {escape(", ".join(columns))}; '
                   "ranked by their highest event loss. "
                   "&ldquo;top 1%&rdquo; counts their events among the top 1% of all scored events.</p>")
    header = ["rank", entity, "max loss", "mean loss", "scored", "events", "top 1%", "worst line",
              "worst window"]
    body = [[str(rank), escape(e["entity"]), _fmt(e["max_loss"]), _fmt(e["mean_loss"]), str(e["scored"]),
             str(e["events"]), str(e["top1pct"]), str(e["worst_line"]) if e["worst_line"] >= 0 else "",
             str(e["worst_window"]) if e["worst_window"] >= 0 else ""]
            for rank, e in enumerate(ranking, start=1)]
    section.append(_table(f"top-{kind}-table", header, body, {0, 2, 3, 4, 5, 6, 7, 8}))
    names = [e["entity"] for e in ranking[:TREND_ENTITIES]]
    section.append(f"<figure>{_trend_plot(rows, kind, columns, names, all_windows)}"
                   f"<figcaption>max and mean event loss per window of the top {len(names)} "
                   f"{escape(kind)} (gaps: no scored event in that window)</figcaption></figure>")
    plots[0] += 1
    section.append("</section>")
    return "".join(section), len(ranking)


def _labels_section(scored: list[dict[str, str]], labels: Mapping[int, int],
                    plots: list[int]) -> tuple[str, dict]:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    losses = np.array([float(r["loss"]) for r in scored])
    truth = np.array([1 if labels.get(line_number(r), 0) else 0 for r in scored])
    section = ['<section id="labels"><h2>Detection against labels</h2>']
    info: dict = {"positives": int(truth.sum())}
    if len(truth) == 0 or truth.sum() == 0 or truth.sum() == len(truth):
        section.append(f'<p class="note">cannot evaluate: need both labelled and normal scored events '
                       f"({int(truth.sum())} labelled anomalous among {len(truth)} scored).</p></section>")
        return "".join(section), info
    auc = float(roc_auc_score(truth, losses))
    ap = float(average_precision_score(truth, losses))
    info.update(roc_auc=auc, average_precision=ap)
    section.append(f'<dl class="summary"><dt>labelled anomalous (scored)</dt><dd>{int(truth.sum())} of '
                   f'{len(truth)}</dd><dt>ROC AUC</dt><dd id="roc-auc">{auc:.4f}</dd>'
                   f'<dt>average precision</dt><dd id="average-precision">{ap:.4f}</dd></dl>')
    fpr, tpr, _ = roc_curve(truth, losses)
    fig = _figure(4.8, 4.2)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="#1f77b4", linewidth=1.6, label=f"AUC = {auc:.3f}")
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", linewidth=0.8, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("ROC curve", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    roc = _img(fig, "ROC curve", "roc-plot")
    precision, recall, _ = precision_recall_curve(truth, losses)
    fig = _figure(4.8, 4.2)
    ax = fig.add_subplot()
    ax.step(recall, precision, where="post", color="#2ca02c", linewidth=1.6, label=f"AP = {ap:.3f}")
    base = truth.mean()
    ax.axhline(base, color="#999", linestyle="--", linewidth=0.8, label=f"base rate {base:.3g}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title("precision-recall curve", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    pr = _img(fig, "precision-recall curve", "pr-plot")
    plots[0] += 2
    section.append(f'<div class="plots"><figure id="roc">{roc}<figcaption>ROC, all scored events'
                   f'</figcaption></figure><figure id="pr">{pr}<figcaption>precision-recall, all scored '
                   "events</figcaption></figure></div>")
    windows = np.array([window_number(r) for r in scored])
    body = []
    for w in sorted(set(windows.tolist())):
        mask = windows == w
        positives = int(truth[mask].sum())
        if 0 < positives < int(mask.sum()):
            body.append([str(w), str(int(mask.sum())), str(positives),
                         f"{roc_auc_score(truth[mask], losses[mask]):.4f}",
                         f"{average_precision_score(truth[mask], losses[mask]):.4f}"])
    info["windows_evaluated"] = len(body)
    section.append("<h3>per window</h3>")
    if body:
        section.append(_table("window-auc", ["window", "scored", "labelled", "ROC AUC", "AP"], body,
                              {0, 1, 2, 3, 4}))
    else:
        section.append('<p class="note" id="window-auc">no window has both labelled and normal scored '
                       "events.</p>")
    section.append("</section>")
    return "".join(section), info


def build_report(rows: list[dict[str, str]], output_path: str | Path,
                 labels: Mapping[int, int] | None = None,
                 raw_lines: Mapping[int, str] | str | Path | None = None,
                 top_n: int = 30, title: str = "salka report") -> dict:
    """Write a self-contained HTML report of scores ``rows`` (from ``read_scores``) to ``output_path``.

    ``labels``: line -> 0/1 (``read_labels``), adds ROC / precision-recall curves and per-window AUC.
    ``raw_lines``: line -> raw log text, or the path of the scored log file, to show each top event's
    raw line. Returns what the report contains: ``events``, ``scored``, ``windows``, ``plots``,
    ``top_events``, ``top_users``, ``top_hosts``, ``explained`` (top events shown with per-token
    losses), ``has_labels`` (plus ``roc_auc`` / ``average_precision`` where they could be computed)
    and ``path``.
    """
    output_path = Path(output_path)
    scored = [r for r in rows if r["loss"] != ""]
    per_window = _window_losses(scored)
    all_windows = sorted({window_number(r) for r in rows})
    plots = [0]
    top = top_events(rows, top_n)
    if isinstance(raw_lines, (str, Path)):
        wanted = {line_number(r) for r in top} - {-1}
        raw: Mapping[int, str] = textreport.raw_lines(raw_lines, wanted) if wanted else {}
    else:
        raw = raw_lines or {}

    times = [float(r["event_time"]) for r in rows if r.get("event_time")]
    losses = np.array([float(r["loss"]) for r in scored])
    summary = [("events", str(len(rows))), ("scored", str(len(scored))),
               ("unscored (first window)", str(len(rows) - len(scored))),
               ("windows", f"{len(all_windows)}" + (f" ({all_windows[0]} … {all_windows[-1]})" if all_windows
                                                    else ""))]
    if times:
        summary.append(("time range", f"{_time(min(times))} — {_time(max(times))}"))
    if len(losses):
        p50, p99 = np.percentile(losses, [50, 99])
        summary.append(("loss (nats)", f"min {losses.min():.3f} · median {p50:.3f} · 99th percentile "
                                       f"{p99:.3f} · max {losses.max():.3f}"))
    columns = entity_columns(rows)
    summary.append(("entity columns", ", ".join(columns) or "none"))
    parts = ['<section id="summary"><h2>Summary</h2><dl class="summary">'
             + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in summary) + "</dl></section>"]

    parts.append('<section id="loss-by-window"><h2>Loss distribution per window</h2>')
    if per_window:
        parts.append(f"<figure>{_loss_by_window_plot(per_window)}<figcaption>each window is scored by "
                     "the model trained on all earlier windows; the first window is not scored."
                     "</figcaption></figure>")
        plots[0] += 1
    else:
        parts.append('<p class="note">no scored events.</p>')
    parts.append("</section>")

    parts.append(f'<section id="top-events"><h2>Top {len(top)} events</h2>')
    explained = 0
    if top:
        pairs = {id(r): _token_explanation(r) for r in top}
        token_losses = [loss for p in pairs.values() if p for _, loss in p if loss is not None]
        scale = max(max(token_losses, default=1.0), 1e-6)
        if token_losses:
            parts.append(f'<p class="note">tokens are shaded by their cross-entropy: '
                         f'<span class="legend"></span> 0 … {scale:.2f} nats (hover a token for its '
                         "value).</p>")
        header = ["rank", "loss", "line", "window", *columns, "event"]
        body = []
        for rank, row in enumerate(top, start=1):
            text = raw.get(line_number(row))
            if pairs[id(row)]:
                explained += 1
                event = f'<div class="event">{_tokens_html(pairs[id(row)], scale)}'
                event += f'<span class="raw">{escape(text)}</span></div>' if text is not None else "</div>"
            else:
                event = f'<div class="event">{escape(text)}</div>' if text is not None else ""
            body.append([str(rank), f"{float(row['loss']):.3f}", escape(row["line"]), escape(row["window"]),
                         *(escape(row.get(c) or "") for c in columns), event])
        parts.append(_table("top-events-table", header, body, {0, 1, 2, 3}))
    else:
        parts.append('<p class="note">no scored events.</p>')
    parts.append("</section>")

    scored_windows = list(per_window)  # trends leave out the unscored first window
    users_html, top_users = _entity_section(rows, "users", "user", "Top users", top_n, scored_windows, plots)
    hosts_html, top_hosts = _entity_section(rows, "hosts", "host", "Top hosts", top_n, scored_windows, plots)
    parts += [users_html, hosts_html]

    info: dict = {}
    if labels is not None:
        labels_html, info = _labels_section(scored, labels, plots)
        parts.append(labels_html)

    document = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{escape(title)}</h1><p class=\"note\">salka log anomaly report: higher loss = the model was "
        "more surprised by the event.</p>\n" + "\n".join(parts) + "\n</body></html>\n")
    output_path.write_text(document, encoding="utf-8")
    return {"path": str(output_path), "events": len(rows), "scored": len(scored), "windows": len(all_windows),
            "plots": plots[0], "top_events": len(top), "explained": explained, "top_users": top_users,
            "top_hosts": top_hosts, "has_labels": labels is not None, **info}
