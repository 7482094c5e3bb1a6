"""The selection report on synthetic selections, no browser: its size caps at archive scale,
what it says when it has no images or cuts some, and the content-security policy it is
served under (see test_report_browser.py for the page as a browser runs it)."""

from __future__ import annotations

import base64
import hashlib
import io
import re

import numpy as np
import pytest
from PIL import Image

from medcurate.report import (MAX_GROUPS_SHOWN, MAX_PAGE_BYTES, MAX_THUMBNAILS,
                              SELECTED_SHOWN, THUMBNAIL_BYTES, noise_groups, points_per_class,
                              report_policy, write_report)

SCRIPT = re.compile(rb"<script\b[^>]*>(.*?)</script>", re.DOTALL)


def _selection(classes: int, per_class: int, groups: int, budget: int = 100,
               seed: int = 0) -> dict:
    """A confounder-aware-like selection: per class ``groups`` groups plus a 5% noise group
    (the last id), ``budget`` picks per class, HAM10000-like ids."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([f"class{c}" for c in range(classes)], per_class)
    n = len(labels)
    point_groups = rng.integers(0, groups, n)
    point_groups[rng.random(n) < 0.05] = groups
    selected = np.zeros(n, dtype=bool)
    for c in range(classes):
        selected[c * per_class + rng.choice(per_class, budget, replace=False)] = True
    summary = {
        "strategy": "confounder-aware", "budget_per_class": budget, "seed": seed, "images": n,
        "selected": int(selected.sum()),
        "classes": {f"class{c}": {"archive": per_class, "selected": budget}
                    for c in range(classes)},
        "groups": {f"class{c}": {str(g): {"archive": 1, "selected": 1} for g in range(groups + 1)}
                   for c in range(classes)},
        "noise_groups": {f"class{c}": groups for c in range(classes)},
        "metadata": {"site": {"a": {"archive": n // 2, "selected": 50},
                              "b": {"archive": n - n // 2, "selected": 50}}}}
    return {"summary": summary, "labels": labels, "selected": selected,
            "coords": rng.normal(size=(n, 2)).astype(np.float32), "groups": point_groups,
            "X": rng.normal(size=(n, 64)).astype(np.float32),
            "ids": np.array([f"ISIC_{i:07d}" for i in range(n)])}


def _noise_jpeg_uri(seed: int) -> str:
    """The worst case for the byte cap: a 64 px thumbnail of pure colour noise (~5 KB)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _report(selection: dict, thumbnails=None) -> bytes:
    return write_report(selection["summary"], selection["labels"], selection["selected"],
                        selection["coords"], selection["groups"], selection["X"], "t", {},
                        ids=selection["ids"], thumbnails=thumbnails)


@pytest.mark.parametrize("thumbs", ["none", "typical", "noise"])
def test_page_stays_under_its_cap_at_archive_scale(thumbs):
    """4 classes x 25k images with 20 groups each: maps subsampled, strips and thumbnails cut,
    each cut stated, the page under MAX_PAGE_BYTES even with incompressible thumbnails."""
    selection = _selection(classes=4, per_class=25_000, groups=20, budget=500)
    typical = "data:image/jpeg;base64," + "A" * 1_600  # what 64 px medical images weigh
    asked = []

    def thumbnails(rows):
        asked.append(len(rows))
        return [typical if thumbs == "typical" else _noise_jpeg_uri(int(r)) for r in rows]

    page = _report(selection, None if thumbs == "none" else thumbnails)
    print(f"{thumbs} thumbnails: page of {len(page):,} bytes")
    assert len(page) <= MAX_PAGE_BYTES, len(page)
    text = page.decode()
    assert f"the {MAX_GROUPS_SHOWN} largest of its 21 groups" in text
    assert f"Each map draws at most {points_per_class(selection['ids'], 4):,} points" in text
    if thumbs == "none":
        assert asked == [] and "No thumbnails" in text and "<figure" not in text
        return
    assert asked == [MAX_THUMBNAILS]  # one call, for no more than the page shows
    shown = len(re.findall(r'<figure[^>]*><img src="data:image/jpeg', text))
    inlined = sum(len(uri) for uri in re.findall(r'<figure[^>]*><img src="([^"]*)"', text))
    assert THUMBNAIL_BYTES - 10_000 < inlined <= THUMBNAIL_BYTES  # the byte cap, filled
    assert f"at most {MAX_THUMBNAILS} thumbnails" in text
    if thumbs == "typical":
        assert shown == min(MAX_THUMBNAILS, THUMBNAIL_BYTES // len(typical))
    assert text.count("<div class=\"strip\">") == 4 * MAX_GROUPS_SHOWN


def test_strips_label_groups_noise_and_undecodable_images():
    selection = _selection(classes=2, per_class=300, groups=3)
    page = _report(selection, lambda rows: [None if r % 7 == 0 else _noise_jpeg_uri(int(r))
                                            for r in rows]).decode()
    heads = re.findall(r'<div class="strip"><p>.*?</span>(.*?)</p>', page)
    assert len(heads) == 8 and sum("noise" in h for h in heads) == 2
    assert all(re.fullmatch(r"group \d+(, noise: the points no group took)? · \d+ images · "
                            r"\d+ selected", h) for h in heads), heads
    assert "thumbnail unavailable" in page and "could not be decoded" in page
    # A strip starts at the group's medoid: the member nearest its mean embedding.
    X, groups, labels = selection["X"], selection["groups"], selection["labels"]
    members = np.flatnonzero((labels == "class0") & (groups == 0))
    medoid = members[np.argmin(((X[members] - X[members].mean(0)) ** 2).sum(1))]
    first = re.search(r"group 0 · .*?<figcaption>(.*?)<br>", page).group(1)
    assert first == selection["ids"][medoid]


def test_mapless_strategy_shows_selected_images_on_a_pca_view():
    selection = _selection(classes=2, per_class=300, groups=3)
    summary = {k: v for k, v in selection["summary"].items() if k not in ("groups",)}
    page = write_report(summary, selection["labels"], selection["selected"], None, None,
                        selection["X"], "t", {}, thumbnails=lambda rows: [
                            _noise_jpeg_uri(0)] * len(rows)).decode()
    assert "PCA view" in page and "100 of 300 images selected" in page
    assert page.count('<div class="strip">') == 2
    captions = re.findall(r"<figcaption>(\d+)<br>(.*?)</figcaption>", page)  # row numbers
    assert len(captions) == 2 * SELECTED_SHOWN and {role for _, role in captions} == {"selected"}
    assert all(selection["selected"][int(row)] for row, _ in captions)


def test_ids_cannot_open_a_script_and_the_policy_hashes_exactly_the_scripts():
    selection = _selection(classes=2, per_class=50, groups=2, budget=10)
    selection["ids"] = selection["ids"].astype(object)
    selection["ids"][:50] = "</script><script>alert(1)</script><img src=x onerror=alert(2)>"
    page = _report(selection, lambda rows: [_noise_jpeg_uri(0)] * len(rows))
    scripts = SCRIPT.findall(page)
    assert len(scripts) == 3  # BokehJS, its log-level line, the maps: nothing of the data's
    assert b"<script>alert" not in page and b"<img src=x" not in page
    policy = report_policy(page)
    hashes = re.findall(r"'sha256-([^']+)'", policy)
    assert sorted(hashes) == sorted(base64.b64encode(hashlib.sha256(s).digest()).decode()
                                    for s in scripts)
    assert policy.startswith("default-src 'none'; img-src data:; style-src 'unsafe-inline'; ")
    assert "unsafe-inline' " not in policy.split("script-src")[1] and "eval" not in policy
    assert report_policy(b"<html><body>no scripts</body></html>").endswith("script-src 'none'")
    with pytest.raises(ValueError, match="from a URL"):
        report_policy(b'<script src="https://cdn.example/bokeh.js"></script>')


def test_noise_groups_from_strategy_info():
    per_class = {"classes": {"a": {"cluster": {"noise_group": 3}}, "b": {"cluster": {
        "noise_group": None}}, "c": {"size": 2}}}
    assert noise_groups(per_class) == {"a": 3, "b": None, "c": None}
    shared = {"map": {"cluster": {"noise_group": 5}}, "classes": {"a": {}, "b": {}}}
    assert noise_groups(shared) == {"a": 5, "b": 5}
