"""A self-contained HTML report of a selection: what was picked, from which groups, and how
the selection's class, group and metadata distributions compare with the archive's."""

from __future__ import annotations

import base64
import html
import io
import math

import numpy as np
from matplotlib.figure import Figure

MAX_MAP_POINTS = 20_000  # per class panel; more points are subsampled for drawing only


def _subplots(figsize: tuple[float, float], rows: int = 1, cols: int = 1, **kwargs):
    """A figure outside pyplot's global registry, which is not thread-safe: the HTTP service
    renders reports from several threads at once."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(rows, cols, **kwargs)


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _display_map(X: np.ndarray) -> np.ndarray:
    """A 2-D PCA view for strategies that build no map of their own (display only)."""
    centred = X - X.mean(axis=0)
    sample = centred[:: max(1, len(centred) // 50_000)].astype(np.float64)
    # The top two eigenvectors of the D x D scatter matrix: the axes an SVD of the sample gives,
    # without its N x D factor (an SVD took 2 of the 3 s of a 100k x 64 selection).
    _, vectors = np.linalg.eigh(sample.T @ sample)
    return centred @ vectors[:, [-1, -2]].astype(centred.dtype)


def map_figure(labels, selected, coords, groups, X) -> tuple[str, str]:
    """Per-class panels: points coloured by group, the selected ones ringed in black."""
    caption = "UMAP map of each class, coloured by confounder group"
    if coords is None:
        coords, groups = _display_map(X), None
        caption = "PCA view (this strategy builds no map): grey = archive, black = selected"
    classes = sorted(set(labels.tolist()), key=str)
    cols = min(4, len(classes))
    rows = math.ceil(len(classes) / cols)
    fig, axes = _subplots((4 * cols, 3.6 * rows), rows, cols, squeeze=False)
    rng = np.random.default_rng(0)
    for ax, label in zip(axes.flat, classes):
        members = np.flatnonzero(labels == label)
        shown = members if len(members) <= MAX_MAP_POINTS else np.sort(
            rng.choice(members, MAX_MAP_POINTS, replace=False))
        if groups is not None:  # group g gets tab10 colour g (mod 10): 0 blue, 1 orange, ...
            ax.scatter(coords[shown, 0], coords[shown, 1], c=groups[shown] % 10, cmap="tab10",
                       vmin=0, vmax=9, s=6, alpha=0.7, linewidths=0)
        else:
            ax.scatter(coords[shown, 0], coords[shown, 1], c="lightgrey", s=6, linewidths=0)
        picked = members[selected[members]]
        ax.scatter(coords[picked, 0], coords[picked, 1], facecolors="none", edgecolors="black",
                   s=40, linewidths=1.2, label=f"selected ({len(picked)})")
        n_groups = len(set(groups[members].tolist())) if groups is not None else 0
        grouping = f", {n_groups} group{'s' if n_groups != 1 else ''}" if n_groups else ""
        ax.set_title(f"{label}: {len(members)} images{grouping}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(loc="best", fontsize=8)
    for ax in list(axes.flat)[len(classes):]:
        ax.axis("off")
    return _png(fig), caption


def bars_figure(title: str, counts: dict[str, dict[str, int]]) -> str:
    """Archive vs selection shares side by side, so a skew shows at a glance."""
    keys = list(counts)
    archive = np.array([counts[k]["archive"] for k in keys], dtype=float)
    picked = np.array([counts[k]["selected"] for k in keys], dtype=float)
    fig, ax = _subplots((max(4.0, 0.6 * len(keys) + 2), 3.0))
    x = np.arange(len(keys))
    ax.bar(x - 0.2, archive / max(archive.sum(), 1), 0.4, label="archive", color="#9ab")
    ax.bar(x + 0.2, picked / max(picked.sum(), 1), 0.4, label="selection", color="#c53")
    ax.set_xticks(x)
    ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def _table(counts: dict[str, dict[str, int]], name: str) -> str:
    head = f"<tr><th>{html.escape(name)}</th><th>archive</th><th>selected</th></tr>"
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{v['archive']}</td>"
                   f"<td>{v['selected']}</td></tr>" for k, v in counts.items())
    return f"<table>{head}{body}</table>"


def write_report(summary: dict, labels: np.ndarray, selected: np.ndarray,
                 coords: np.ndarray | None, groups: np.ndarray | None, X: np.ndarray,
                 title: str, model: dict) -> bytes:
    """The report as HTML bytes with every figure inlined (one file to mail or archive)."""
    map_png, caption = map_figure(labels, selected, coords, groups, X)
    size = (f"{summary['budget_per_class']} per class" if summary.get("fraction") is None
            else f"fraction {summary['fraction']} of the pool")
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>" + html.escape(
            f"strategy {summary['strategy']}, {size}, seed "
            f"{summary['seed']}; {summary['selected']} of {summary['images']} images selected; "
            f"collection {summary.get('collection')}, embeddings {summary.get('embedding_run')}"
            f" ({model.get('spec', 'unknown model')})") + "</p>",
    ]
    if summary.get("notes"):
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in summary["notes"])
                     + "</ul>")
    parts += [f"<h2>What was picked</h2><p>{html.escape(caption)}</p>",
              f'<img alt="map" src="data:image/png;base64,{map_png}">',
              "<h2>Classes</h2>", _table(summary["classes"], "class"),
              f'<img alt="classes" src="data:image/png;base64,'
              f'{bars_figure("class distribution", summary["classes"])}">']
    for label, counts in summary.get("groups", {}).items():
        parts += [f"<h2>Groups of class {html.escape(label)}</h2>", _table(counts, "group"),
                  f'<img alt="groups {html.escape(label)}" src="data:image/png;base64,'
                  f'{bars_figure(f"groups of {label}", counts)}">']
    parts += _grouping_quality(summary)
    for column, counts in summary.get("metadata", {}).items():
        parts += [f"<h2>{html.escape(column)}</h2>", _table(counts, column),
                  f'<img alt="{html.escape(column)}" src="data:image/png;base64,'
                  f'{bars_figure(f"{column} distribution", counts)}">']
    return html_page(title, parts)


def _grouping_quality(summary: dict) -> list[str]:
    """The summary's ``recovery`` and ``stability`` as two small tables: whether the groups
    stand for known metadata, and whether they would come out the same on other samples."""
    parts = []
    rows = [[label, column, v["ari"], v["nmi"], v["rows"]]
            for label, columns in summary.get("recovery", {}).items()
            for column, v in columns.items()]
    if rows:
        parts += ["<h2>Do the groups match known metadata?</h2>",
                  "<p>Per class, the found groups (noise as one group) against each metadata "
                  "column: ARI 1 = the groups are exactly the column's values, 0 = chance; "
                  "NMI 0..1 = how much the group tells about the value.</p>",
                  html_table(["class", "column", "ARI", "NMI", "rows"], rows)]
    rows = [[label, f"{v['parameter']} = {v['value']:g}", v["stability"]]
            for label, v in summary.get("stability", {}).items()]
    if rows:
        parts += ["<h2>How stable is the grouping?</h2>",
                  "<p>The clustering parameter chosen per class and its stability: the mean "
                  "adjusted Rand index between the groups of seeded subsamples and of all "
                  "points (1 = identical).</p>",
                  html_table(["class", "parameter", "stability"], rows)]
    return parts


def html_page(title: str, parts: list[str]) -> bytes:
    """One self-contained HTML page of the given body parts."""
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    return page.encode("utf-8")


def html_table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        if value is None:
            return ""
        return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def curves_figure(title: str, x_label: str, y_label: str,
                  curves: list[tuple[str, list[float], list[dict], str]]) -> str:
    """Lines of mean with a shaded 95% interval: (name, x, intervals, line style) per curve,
    each interval a ``mean_interval`` dict. Returns base64 PNG."""
    fig, ax = _subplots((7, 4.2))
    for name, x, intervals, style in curves:
        mean = np.array([np.nan if i["mean"] is None else i["mean"] for i in intervals])
        line, = ax.plot(x, mean, style, marker="o", label=name)
        low = np.array([np.nan if i["low"] is None else i["low"] for i in intervals])
        high = np.array([np.nan if i["high"] is None else i["high"] for i in intervals])
        if np.isfinite(low).any():
            ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
    ax.set(title=title, xlabel=x_label, ylabel=y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
