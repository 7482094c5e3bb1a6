"""The report.html of a selection of the demo archive (3 shape classes, 10% of each from a
planted "site_b" that burns a bright tag into the top-left corner), thumbnails of its own files
included: the planted site shows as a strip of tagged images, and a headless Chromium runs the
page, as a file and served under ``report_policy``, without an error, a policy violation or an
undecoded image, with every map's points, a hover that shows a point's image and a click that
marks it."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import Browser, browser, serve
from medcurate.config import EmbedConfig, IngestConfig, SelectConfig
from medcurate.demo import DEMO_CLASSES, make_demo_archive
from medcurate.embed import embed
from medcurate.ingest import ingest, read_manifest
from medcurate.report import MAX_PAGE_BYTES, report_policy
from medcurate.select.run import run_selection

PER_CLASS, PLANTED = 100, 10  # the demo's images per class, and of them from site_b

# Every figure drawn, then per map its points: what BokehJS built from the page's data.
RENDERED = ("typeof Bokeh !== 'undefined' && Bokeh.documents.length > 0 && "
            "Object.values(Bokeh.index).filter(v => v.model.type === 'Figure')"
            ".every(v => v.has_finished()) && Object.values(Bokeh.index).length > 0")
POINTS = ("Object.fromEntries([...Bokeh.documents[0].all_models].filter(m => "
          "(m.name || '').startsWith('points ')).map(m => [m.name, m.get_length()]))")
IMAGES = "[...document.images].map(i => i.complete && i.naturalWidth > 0)"
# Where on screen a point of a map lies that has a thumbnail (or any point): for the hover.
POINT_ON_SCREEN = """(() => {
  const view = Object.values(Bokeh.index).find(v => v.model.type === 'Figure');
  const points = [...view.renderer_views.values()].find(r =>
    (r.model.data_source.name || '').startsWith('points '));
  const data = points.model.data_source.data;
  const i = Math.max(0, data.thumb.findIndex(t => t !== ''));
  view.el.scrollIntoView();
  const box = view.canvas_view.el.getBoundingClientRect();
  return {name: points.model.data_source.name, index: i, id: data.id[i],
          x: box.left + view.frame.x_scale.compute(data.x[i]),
          y: box.top + view.frame.y_scale.compute(data.y[i])};
})()"""
# The tooltip lives in a shadow root: its text and whether its images decoded.
TOOLTIP = """(() => {
  const found = {text: '', images: []};
  const walk = root => { for (const e of root.querySelectorAll('*')) {
    if (e.shadowRoot) walk(e.shadowRoot);
    if (root !== document && /tooltip/i.test(e.className)) found.text += e.textContent;
    if (e.tagName === 'IMG' && root !== document)
      found.images.push(e.complete && e.naturalWidth > 0); } };
  walk(document);
  return found;
})()"""
SELECTED = ("[...Bokeh.documents[0].all_models].find(m => m.name === '{name}')"
            ".selected.indices")


@pytest.fixture(scope="module")
def demo_selection(tmp_path_factory, ray_session):
    """The demo archive embedded with MobileNetV2 and a confounder-aware selection of 10 a
    class: (workspace, selection id)."""
    from medcurate.workspace import Workspace

    root = tmp_path_factory.mktemp("report")
    archive = make_demo_archive(root / "archive", per_class=PER_CLASS, seed=0)
    workspace = Workspace(str(root / "ws"))
    ingest(IngestConfig(source=str(archive), metadata=str(archive / "metadata.csv"),
                        id_column="file", name="demo"), workspace)
    run_id = embed(EmbedConfig(collection="demo", model="mobilenetv2-imagenet"),
                   workspace)["run_id"]
    summary = run_selection(SelectConfig(embedding_run=run_id, budget_per_class=10), workspace)
    return workspace, summary["selection_id"]


@pytest.fixture(scope="module")
def demo_report(demo_selection) -> tuple[Path, dict[str, str]]:
    """The selection's ``report.html``, and each image's site."""
    workspace, selection_id = demo_selection
    images = read_manifest(workspace, "demo", columns=["id", "site"])
    return (Path(workspace.path("selections", selection_id, "report.html")),
            dict(zip(images.column("id").to_pylist(), images.column("site").to_pylist())))


def _strips(page: str) -> dict[str, list[tuple[str, list[tuple[str, str]]]]]:
    """Per class section, each strip's heading and its (thumbnail URI, image id) pairs."""
    sections = re.split(r"<h2>Class ([^<]+)</h2>", page)[1:]
    return {label: [(head, re.findall(r'<img src="([^"]+)" alt="([^"]+)">', body))
                    for head, body in re.findall(r'<div class="strip"><p>.*?</span>(.*?)</p>'
                                                 r'(.*?)</div>', section)]
            for label, section in zip(sections[::2], sections[1::2])}


def _corner(uri: str) -> float:
    """Mean brightness of a thumbnail's top-left corner, where site_b burns its tag."""
    image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("L")
    return float(np.asarray(image, dtype=np.float32)[3:9, 3:9].mean())


def test_planted_site_shows_as_its_own_strip_of_tagged_images(demo_selection, demo_report):
    workspace, selection_id = demo_selection
    report, site = demo_report
    recovery = workspace.provenance("selections", selection_id)["summary"]["recovery"]
    strips = _strips(report.read_text())
    assert set(strips) == set(DEMO_CLASSES)
    found = []
    for label, class_strips in strips.items():
        for head, thumbs in class_strips:
            assert thumbs and re.match(r"group \d+.* · \d+ images · \d+ selected", head)
            for uri, image_id in thumbs:  # the thumbnail is the image: tagged iff site_b
                assert (_corner(uri) > 200) == (site[image_id] == "site_b"), (image_id, head)
            if {site[i] for _, i in thumbs} == {"site_b"}:
                found.append(label)
                assert f"· {PLANTED} images ·" in head, head
        if recovery[label]["site"]["ari"] >= 0.9:  # the grouping found the site here
            assert label in found, (label, [h for h, _ in class_strips])
    assert found  # as the selection test requires, the site is found in some class


def _check_page(b: Browser, url: str, shot: Path) -> None:
    b.open(url)
    b.wait_for(RENDERED)
    assert b.evaluate(POINTS) == {f"points {c}": PER_CLASS for c in DEMO_CLASSES}
    images = b.evaluate(IMAGES)
    assert images and all(images), f"{images.count(False)} images did not decode"
    point = b.evaluate(POINT_ON_SCREEN)
    b.call("Input.dispatchMouseEvent", session=True, type="mouseMoved", x=point["x"],
           y=point["y"])
    b.wait_for(f"({TOOLTIP}).text.includes({json.dumps(point['id'])})", timeout=10)
    assert b.evaluate(TOOLTIP)["images"] == [True]  # the point's thumbnail, decoded
    for kind in ("mousePressed", "mouseReleased"):
        b.call("Input.dispatchMouseEvent", session=True, type=kind, x=point["x"],
               y=point["y"], button="left", clickCount=1)
    b.wait_for(SELECTED.format(name=point["name"]) + f".includes({point['index']})",
               timeout=10)
    assert b.errors() == []
    assert b.screenshot(shot).stat().st_size > 10_000


@pytest.mark.timeout(300)  # the demo's embedding, a first apt-get install of Chromium, 4 pages
def test_report_runs_in_a_browser_under_its_policy(demo_report, tmp_path):
    report, _ = demo_report
    page = report.read_bytes()
    assert len(page) < MAX_PAGE_BYTES
    with browser() as b:
        _check_page(b, report.as_uri(), tmp_path / "file.png")
        with serve(page, {"Content-Security-Policy": report_policy(page)}) as url:
            _check_page(b, url, tmp_path / "served.png")
        # The checks do see a refusal: under a policy that allows no script, nothing runs.
        with serve(page, {"Content-Security-Policy": "default-src 'none'"}) as url:
            b.open(url)
            assert any("script-src" in error for error in b.errors()), b.errors()
