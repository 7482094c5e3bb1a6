"""A self-contained HTML report of a selection: what was picked, shown as the images themselves
(a strip of thumbnails per found group), an interactive map per class, and how the selection's
class, group and metadata distributions compare with the archive's.

The page is one file that loads nothing from outside: BokehJS, the map data and every thumbnail
are inlined, so it can be mailed or archived, and served under a policy that runs exactly its
own scripts (``report_policy``). The caps below keep it under ``MAX_PAGE_BYTES`` at any archive
size, and the page says when one of them cut something.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

MAX_MAP_POINTS = 20_000  # per class map; more points are subsampled for drawing only
MAP_BYTES = 1_500_000  # every map's points together: fewer per class where classes are many
POINT_BYTES = 20  # one point's inlined bytes besides its id (position, colour, group, hover)
MAX_GROUPS_SHOWN = 12  # group strips per class, largest groups first
MEMBERS_SHOWN = 4  # other members per group strip, besides its medoid and its picks
PICKS_SHOWN = 8  # selected images per group strip
SELECTED_SHOWN = 24  # selected images per class where the strategy finds no groups
MAX_THUMBNAILS = 600  # per page
THUMBNAIL_BYTES = 800_000  # per page; each thumbnail is inlined twice (its strip, its hover)
MAX_PAGE_BYTES = 5_000_000  # what the caps above keep a page under, BokehJS (1.3 MB) included
NO_GROUP_COLOUR = "#d0d0d0"  # the noise group, and every point where no groups were found
STRIP_LEGEND = ("Amber frame: the group's medoid (the member nearest its mean embedding, its "
                "most typical image); red frame: selected; no frame: other members, drawn at "
                "random.")
_SCRIPT = re.compile(rb"<script\b([^>]*)>(.*?)</script\s*>", re.IGNORECASE | re.DOTALL)


def _colours() -> list[str]:
    """Group g is drawn in tab10 colour g mod 10 (0 blue, 1 orange, ...); index 10 is grey."""
    from bokeh.palettes import Category10_10

    return [*Category10_10, NO_GROUP_COLOUR]


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


def _bars(name: str, title: str, counts: dict[str, dict[str, int]]) -> str:
    return (f'<img alt="{html.escape(name)}" src="data:image/png;base64,'
            f'{bars_figure(title, counts)}">')


# -- which images the page shows ----------------------------------------------------------------
@dataclass
class Strip:
    """One row of thumbnails: a found group of a class, or (``group`` None, for strategies that
    find no groups) the class's selected images. ``medoid``, ``members`` and ``picked`` are
    row positions, disjoint, the medoid counted in neither list."""

    label: str
    group: int | None
    size: int
    selected: int
    noise: bool
    medoid: int | None
    members: list[int]
    picked: list[int]


def _sample(rows: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    rows = rows if len(rows) <= k else np.sort(rng.choice(rows, k, replace=False))
    return [int(r) for r in rows]


def _medoid(X: np.ndarray, members: np.ndarray, chunk: int = 65_536) -> int:
    """The member nearest the group's mean embedding, its most typical image; in chunks, so a
    group of a million rows is never copied out of ``X`` at once."""
    total = np.zeros(X.shape[1], dtype=np.float64)
    for start in range(0, len(members), chunk):
        total += X[members[start:start + chunk]].sum(axis=0, dtype=np.float64)
    mean = total / len(members)
    best, best_distance = int(members[0]), np.inf
    for start in range(0, len(members), chunk):
        part = members[start:start + chunk]
        distances = ((X[part] - mean) ** 2).sum(axis=1)
        nearest = int(np.argmin(distances))
        if distances[nearest] < best_distance:
            best, best_distance = int(part[nearest]), distances[nearest]
    return best


def class_strips(label: str, rows: np.ndarray, selected: np.ndarray, groups: np.ndarray | None,
                 X: np.ndarray, noise_group: int | None,
                 rng: np.random.Generator) -> tuple[list[Strip], int]:
    """The strips of one class (its ``rows``) and how many groups it has: one strip per group,
    the ``MAX_GROUPS_SHOWN`` largest, each with its medoid, ``MEMBERS_SHOWN`` other members and
    ``PICKS_SHOWN`` of its selected images; one strip of selected images where ``groups`` is
    None. Members and picks are drawn with ``rng``, so a seed gives the same page."""
    if groups is None:
        picked = rows[selected[rows]]
        return [Strip(label, None, len(rows), len(picked), False, None, [],
                      _sample(picked, SELECTED_SHOWN, rng))], 0
    found, sizes = np.unique(groups[rows], return_counts=True)
    strips = []
    for group in found[np.argsort(-sizes, kind="stable")][:MAX_GROUPS_SHOWN]:
        members = rows[groups[rows] == group]
        medoid = _medoid(X, members)
        chosen = members[selected[members]]
        others = members[~selected[members] & (members != medoid)]
        strips.append(Strip(label, int(group), len(members), len(chosen),
                            noise_group is not None and group == noise_group, medoid,
                            _sample(others, MEMBERS_SHOWN, rng),
                            _sample(chosen[chosen != medoid], PICKS_SHOWN, rng)))
    return strips, len(found)


def thumbnail_order(strips: list[Strip]) -> np.ndarray:
    """Every strip's rows taken in turns (each strip's medoid, then each one's first pick, ...,
    then its other members), so that the page's caps trim every strip a little rather than
    drop the last classes whole."""
    queues = [[r for r in (s.medoid, *s.picked, *s.members) if r is not None] for s in strips]
    depth = max(map(len, queues), default=0)
    return np.array([q[i] for i in range(depth) for q in queues if i < len(q)], dtype=np.int64)


def fetch_thumbnails(rows: np.ndarray, thumbnails: Callable[[np.ndarray], list[str | None]]
                     ) -> tuple[dict[int, str | None], int]:
    """The thumbnails of ``rows`` (in priority order) that fit ``MAX_THUMBNAILS`` and
    ``THUMBNAIL_BYTES``, asked for in one call so the images can be decoded in one batch; and
    how many rows the caps left out. None marks an image that could not be decoded."""
    asked = rows[:MAX_THUMBNAILS]
    kept: dict[int, str | None] = {}
    used = 0
    for row, uri in zip(asked.tolist(), thumbnails(asked)):
        used += len(uri or "")
        if used > THUMBNAIL_BYTES:
            break
        kept[row] = uri
    return kept, len(rows) - len(kept)


# -- strips as HTML -----------------------------------------------------------------------------
def _thumb_html(uri: str | None, caption: str, roles: list[str]) -> str:
    image = (f'<img src="{uri}" alt="{html.escape(caption)}">' if uri
             else '<span class="missing">thumbnail unavailable</span>')
    return (f'<figure class="{" ".join(roles)}">{image}<figcaption>{html.escape(caption)}'
            f'<br>{", ".join(roles)}</figcaption></figure>')


def _strip_html(strip: Strip, thumbs: dict[int, str | None], ids: np.ndarray,
                selected: np.ndarray) -> str:
    cells = [(strip.medoid, ["medoid", *(["selected"] if selected[strip.medoid] else [])])
             ] if strip.medoid is not None else []
    cells += [(r, ["member"]) for r in strip.members] + [(r, ["selected"]) for r in strip.picked]
    shown = [(row, roles) for row, roles in cells if row in thumbs]
    if strip.group is None:
        head = f"{strip.selected} of {strip.size} images selected"
        colour = NO_GROUP_COLOUR
    else:
        kind = ", noise: the points no group took" if strip.noise else ""
        head = f"group {strip.group}{kind} · {strip.size} images · {strip.selected} selected"
        colour = NO_GROUP_COLOUR if strip.noise else _colours()[strip.group % 10]
    return (f'<div class="strip"><p><span class="swatch" style="background:{colour}"></span>'
            f'{html.escape(head)}</p>'
            + "".join(_thumb_html(thumbs[row], str(ids[row]), roles) for row, roles in shown)
            + "</div>")


# -- maps ---------------------------------------------------------------------------------------
def points_per_class(ids: np.ndarray, n_classes: int) -> int:
    """Points drawn per class map: ``MAX_MAP_POINTS``, fewer where the page's ``MAP_BYTES``
    would not hold that many for every class (each point carries its id for the hover)."""
    id_bytes = float(np.char.str_len(ids).mean()) + 3 if len(ids) else 0.0  # "id",
    return int(min(MAX_MAP_POINTS, MAP_BYTES / (max(n_classes, 1) * (POINT_BYTES + id_bytes))))


def _class_map(label: str, rows: np.ndarray, coords: np.ndarray, groups: np.ndarray | None,
               selected: np.ndarray, ids: np.ndarray, thumbs: dict[int, str | None],
               noise_group: int | None, n_points: int, rng: np.random.Generator):
    """A Bokeh scatter of one class: points coloured by group (grey without groups), selected
    ones ringed; hovering shows a point's id, group and thumbnail (where the page shows one);
    a click marks a point. At most ``n_points`` drawn, plus every one with a thumbnail."""
    from bokeh.models import ColumnDataSource, HoverTool, LinearColorMapper, Scatter, TapTool
    from bokeh.plotting import figure

    palette = _colours()
    drawn = rows if len(rows) <= n_points else rng.choice(rows, n_points, replace=False)
    drawn = np.union1d(drawn, np.intersect1d(rows, np.fromiter(thumbs, np.int64, len(thumbs))))
    if groups is None:
        colour = np.full(len(drawn), len(palette) - 1, dtype=np.uint8)
    else:
        noise = (groups[drawn] == noise_group if noise_group is not None
                 else np.zeros(len(drawn), dtype=bool))
        colour = np.where(noise, len(palette) - 1, groups[drawn] % 10).astype(np.uint8)
    data = {"x": coords[drawn, 0].astype(np.float32), "y": coords[drawn, 1].astype(np.float32),
            "colour": colour, "id": ids[drawn].tolist(),
            "thumb": [f'<img src="{thumbs[r]}" alt="">' if thumbs.get(r) else ""
                      for r in drawn.tolist()]}
    tooltip = "<div>@id</div>"
    if groups is not None:
        data["group"] = groups[drawn].astype(np.int32)
        tooltip += "<div>group @group</div>"
    title = f"{label}: {len(rows):,} images"
    if len(drawn) < len(rows):
        title += f", {len(drawn):,} drawn"
    fig = figure(width=440, height=380, title=title, tools="pan,wheel_zoom,box_zoom,reset",
                 toolbar_location="above")
    fill = {"field": "colour", "transform": LinearColorMapper(
        palette=palette, low=-0.5, high=len(palette) - 0.5)}
    points = fig.scatter("x", "y", source=ColumnDataSource(data, name=f"points {label}"),
                         size=5, fill_color=fill, fill_alpha=0.75, line_color=None)
    points.selection_glyph = Scatter(size=13, fill_color=fill, line_color="#d62728",
                                     line_width=3)
    points.nonselection_glyph = None  # the others keep their look: a mark, not a filter
    picked = drawn[selected[drawn]]
    fig.scatter(coords[picked, 0].astype(np.float32), coords[picked, 1].astype(np.float32),
                size=9, fill_color=None, line_color="black", line_width=1.2,
                legend_label=f"selected ({len(picked):,})")
    fig.add_tools(HoverTool(renderers=[points], tooltips=tooltip + "@thumb{safe}"),
                  TapTool(renderers=[points]))
    fig.axis.visible = False
    fig.grid.visible = False
    fig.legend.location = "top_right"
    fig.legend.label_text_font_size = "8pt"
    return fig


def _bokeh_parts(figures: list) -> tuple[list[str], list[str]]:
    """The figures' divs, and the scripts that draw them: BokehJS's core, inlined once, then
    the figures' data. Nothing is loaded from outside the page."""
    from bokeh.embed import components
    from bokeh.resources import Resources

    script, divs = components(figures)
    return list(divs), [Resources(mode="inline", components=["bokeh"]).render_js(), script]


# -- the page -----------------------------------------------------------------------------------
def noise_groups(strategy_info: dict) -> dict[str, int | None]:
    """Per class, the id of its noise group (the points DBSCAN or HDBSCAN left unclustered) or
    None, from a strategy's ``info``: what the report reads from ``summary["noise_groups"]``
    to tell the noise group from the others."""
    shared = (strategy_info.get("map") or {}).get("cluster")
    return {str(label): (shared or entry.get("cluster") or {}).get("noise_group")
            for label, entry in strategy_info.get("classes", {}).items()}


def write_report(summary: dict, labels: np.ndarray, selected: np.ndarray,
                 coords: np.ndarray | None, groups: np.ndarray | None, X: np.ndarray,
                 title: str, model: dict, ids: np.ndarray | None = None,
                 thumbnails: Callable[[np.ndarray], list[str | None]] | None = None,
                 near_duplicates: dict | None = None) -> bytes:
    """The report as HTML bytes with every figure, map and thumbnail inlined (one file to mail
    or archive). ``ids[i]`` names row i (its row number where ``ids`` is None);
    ``thumbnails(rows)`` gives the data URIs (None where undecodable) of the rows the page
    shows, asked once; without it the page shows maps and counts but no images.
    ``near_duplicates``: the dedup the selection left out (``near_duplicates_section``)."""
    ids = np.arange(len(labels)).astype(str) if ids is None else np.asarray(ids).astype(str)
    caption = ("UMAP map of each class, coloured by confounder group (light grey: noise), "
               "selected images ringed in black")
    if coords is None:
        coords, groups = _display_map(X), None
        caption = ("PCA view (this strategy builds no map): grey = archive, ringed in black = "
                   "selected")
    caption += ". Hover a point for its id and, where the page shows it, its image; click to "
    caption += "mark it."
    classes = sorted(set(labels.tolist()), key=str)
    noise = summary.get("noise_groups", {})
    rng = np.random.default_rng(summary.get("seed", 0))
    class_rows = {label: np.flatnonzero(labels == label) for label in classes}
    strips, n_groups = {}, {}
    for label in classes:
        strips[label], n_groups[label] = class_strips(label, class_rows[label], selected, groups,
                                                      X, noise.get(str(label)), rng)
    order = thumbnail_order([s for label in classes for s in strips[label]])
    thumbs, left_out = ({}, 0) if thumbnails is None else fetch_thumbnails(order, thumbnails)
    n_points = points_per_class(ids, len(classes))
    figures = [_class_map(label, class_rows[label], coords, groups, selected, ids, thumbs,
                          noise.get(str(label)), n_points, rng) for label in classes]
    divs, scripts = _bokeh_parts(figures)
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
    notes = list(summary.get("notes", [])) + _cap_notes(
        classes, n_groups, thumbs, left_out, thumbnails is None, n_points,
        max(map(len, class_rows.values()), default=0))
    if notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    parts += ["<h2>Classes</h2>", _table(summary["classes"], "class"),
              _bars("classes", "class distribution", summary["classes"]),
              *near_duplicates_section(near_duplicates),
              f"<h2>What was picked</h2><p>{html.escape(caption)}</p>"]
    if thumbs:
        parts.append(f"<p>{html.escape(STRIP_LEGEND)}</p>")
    for label, div in zip(classes, divs):
        counts = summary.get("groups", {}).get(str(label))
        beside = ("" if counts is None else
                  f"<div><h3>Groups of class {html.escape(label)}</h3>{_table(counts, 'group')}"
                  f"{_bars(f'groups {label}', f'groups of {label}', counts)}</div>")
        parts += [f"<h2>Class {html.escape(label)}</h2>", f'<div class="row">{div}{beside}</div>']
        parts += [_strip_html(strip, thumbs, ids, selected) for strip in strips[label]
                  if thumbs]
    parts += _grouping_quality(summary)
    for column, counts in summary.get("metadata", {}).items():
        parts += [f"<h2>{html.escape(column)}</h2>", _table(counts, column),
                  _bars(column, f"{column} distribution", counts)]
    return html_page(title, parts + scripts)


def _cap_notes(classes: list[str], n_groups: dict[str, int], thumbs: dict[int, str | None],
               left_out: int, no_images: bool, n_points: int, largest: int) -> list[str]:
    """What the page leaves out, and why: a reader must not take a cut for the whole."""
    notes = []
    if no_images:
        notes.append("No thumbnails: this report was made without access to the images, so "
                     "it shows no images; the maps and counts are complete.")
    for label in classes:
        if n_groups[label] > MAX_GROUPS_SHOWN:
            notes.append(f"Class {label}: the {MAX_GROUPS_SHOWN} largest of its "
                         f"{n_groups[label]} groups are shown as images (at most "
                         f"{MAX_GROUPS_SHOWN} a class).")
    if left_out:
        notes.append(f"{left_out} images are not shown as thumbnails: a page holds at most "
                     f"{MAX_THUMBNAILS} thumbnails, {THUMBNAIL_BYTES / 1e6:g} MB of them.")
    failed = sum(uri is None for uri in thumbs.values())
    if failed:
        notes.append(f"{failed} images could not be decoded (thumbnail unavailable).")
    if largest > n_points:
        notes.append(f"Each map draws at most {n_points:,} points of its class, drawn at "
                     "random, plus every image shown as a thumbnail (the page's size cap).")
    return notes


def report_policy(page: bytes) -> str:
    """The content-security policy to serve ``page`` under: inline images and styles, and
    exactly the page's own inline scripts, each allowed by its hash, nothing from elsewhere.

    Taken from the page itself, so it is only as safe as the page: ``write_report``
    HTML-escapes every id and value it writes (Bokeh escapes its data alike), so no data can
    open a script element of its own. A script that loads a URL is refused."""
    hashes = []
    for attributes, body in _SCRIPT.findall(page):
        if re.search(rb"\bsrc\s*=", attributes, re.IGNORECASE):
            raise ValueError("the page loads a script from a URL; a report inlines everything")
        # The browser hashes the text as parsed: line breaks normalised to \n.
        text = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        hashes.append("'sha256-" + base64.b64encode(hashlib.sha256(text).digest()).decode() + "'")
    scripts = " ".join(dict.fromkeys(hashes)) or "'none'"
    return f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src {scripts}"


def near_duplicates_section(near: dict | None) -> list[str]:
    """The "Near-duplicates" section: the dedup the selection was made with (``select
    --exclude-duplicates``): its key, threshold, groups, removed images, test images that
    repeat training images per split pair, and how many images this selection left out (its
    splits only). Only the dedup the selection used is shown, not any dedup of its run: the
    report describes what the selection did, and a run may have several dedups. Without
    one, a sentence says the selection may hold near-copies."""
    parts = ["<h2>Near-duplicates</h2>"]
    if near is None:
        return parts + ["<p>This selection was made without a dedup, so near-duplicate "
                        "images were not looked for and may share the budget: run "
                        "<code>medcurate dedup RUN</code> and select with "
                        "<code>--exclude-duplicates</code>.</p>"]
    if near["groups"]:
        text = (f"Dedup {near['dedup_id']} (cosine similarity at least {near['threshold']}, "
                f"kept image of each group: {near['keep']}) found {near['groups']} groups of "
                f"near-duplicates among {near['images']} images and removed {near['removed']}; "
                f"this selection left out {near['excluded']} of them (those in its splits).")
    else:
        text = (f"Dedup {near['dedup_id']} (cosine similarity at least {near['threshold']}) "
                f"found no near-duplicates among {near['images']} images: the selection left "
                "nothing out.")
    parts.append(f"<p>{html.escape(text)}</p>")
    leaks = near.get("leaks_by_split_pair") or {}
    if leaks:
        parts += [f"<p>{html.escape(str(near['leaks']))} test images repeat training or "
                  "validation images (leaks), by split pair (test~train):</p>",
                  html_table(["split pair", "leaked test images"], list(map(list, leaks.items())))]
    else:
        parts.append("<p>No test image repeats a training or validation image.</p>")
    return parts


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
             "td:first-child,th:first-child{text-align:left}"
             ".strip{border-top:1px solid #eee;padding:.2em 0}.strip p{margin:.2em 0}"
             ".swatch{display:inline-block;width:.9em;height:.9em;margin-right:.4em;"
             "vertical-align:middle}"
             "figure{display:inline-block;width:76px;margin:2px;vertical-align:top;"
             "text-align:center;font-size:9px;overflow-wrap:anywhere}"
             "figure img{display:block;margin:auto;border:2px solid #fff}"
             "figure.selected img{border-color:#c53}figure.medoid img{outline:2px solid #e90}"
             ".row{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}"
             ".missing{display:block;width:64px;height:64px;margin:auto;background:#eee}")
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
