"""Selection runs on real HAM10000 embeddings: outputs, summary, report, provenance, bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medcurate.config import EmbedConfig, IngestConfig, SelectConfig
from medcurate.embed import embed
from medcurate.errors import MedcurateError
from medcurate.ingest import ingest
from medcurate.select.run import run_selection

REPO = Path(__file__).resolve().parents[1]
# HAM10000 subset: up to 60 images per class keeps the embedding under a minute; two classes
# are kept smaller so a budget of 50 exceeds them.
PER_CLASS = {"df": 30, "vasc": 40}
DEFAULT_PER_CLASS = 60


@pytest.fixture(scope="module")
def ham_run(tmp_path_factory, shared_data, ray_session):
    """A real HAM10000 subset (every class, all four sites) embedded with MobileNetV2."""
    from medcurate.workspace import Workspace

    root = tmp_path_factory.mktemp("select")
    with open(shared_data / "ham10000" / "metadata.csv") as handle:
        rows = list(csv.DictReader(handle))
    taken: dict[str, int] = {}
    subset = []
    for row in rows:
        if taken.get(row["dx"], 0) < PER_CLASS.get(row["dx"], DEFAULT_PER_CLASS):
            taken[row["dx"]] = taken.get(row["dx"], 0) + 1
            subset.append({"path": str(shared_data / "ham10000" / "images" /
                                       f"{row['image_id']}.jpg"), **row})
    table = root / "ham.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(subset[0]))
        writer.writeheader()
        writer.writerows(subset)
    workspace = Workspace(str(root / "ws"))
    ingest(IngestConfig(source=str(table), name="ham", label_column="dx"), workspace)
    run = embed(EmbedConfig(collection="ham", model="mobilenetv2-imagenet"), workspace)
    return workspace, run["run_id"], taken


def test_confounder_aware_selection_writes_explained_artefacts(ham_run):
    workspace, run_id, taken = ham_run
    summary = run_selection(SelectConfig(embedding_run=run_id, budget_per_class=20), workspace)
    folder = Path(workspace.path("selections", summary["selection_id"]))
    selection = pq.read_table(folder / "selection.parquet")
    per_class = {label: min(20, n) for label, n in taken.items()}
    counts = {}
    for label in selection.column("label").to_pylist():
        counts[label] = counts.get(label, 0) + 1
    assert counts == per_class
    assert all(reason for reason in selection.column("reason").to_pylist())
    assert len(set(selection.column("id").to_pylist())) == selection.num_rows

    # Per-site and per-sex distributions of the selection next to the archive's.
    on_disk = json.loads((folder / "summary.json").read_text())
    for column in ("site", "sex"):
        counts = on_disk["metadata"][column]
        assert sum(v["archive"] for v in counts.values()) == sum(taken.values())
        assert sum(v["selected"] for v in counts.values()) == selection.num_rows
    report = (folder / "report.html").read_text()
    assert "<h2>site</h2>" in report and "<h2>sex</h2>" in report
    assert report.count("data:image/png;base64,") >= 3

    groups = pq.read_table(folder / "map.parquet")
    assert groups.num_rows == sum(taken.values())
    assert sum(groups.column("selected").to_pylist()) == selection.num_rows

    record = workspace.provenance("selections", summary["selection_id"])
    assert record["config"]["strategy"] == "confounder-aware"
    assert record["model"]["spec"] == "mobilenetv2-imagenet"
    assert {i["role"] for i in record["inputs"]} == {"embedding_run", "collection"}


def test_same_seed_same_selection_and_class_smaller_than_budget(ham_run):
    workspace, run_id, taken = ham_run
    first = run_selection(SelectConfig(embedding_run=run_id, budget_per_class=50,
                                       strategy="kcenter", selection_id="a"), workspace)
    second = run_selection(SelectConfig(embedding_run=run_id, budget_per_class=50,
                                        strategy="kcenter", selection_id="b"), workspace)
    ids = [pq.read_table(Path(workspace.path("selections", key, "selection.parquet")))
           .column("id").to_pylist() for key in ("a", "b")]
    assert ids[0] == ids[1]
    small = [label for label, n in taken.items() if n < 50]
    assert small, "the subset should hold classes smaller than the budget"
    for label in small:
        assert first["classes"][label]["selected"] == taken[label]
        assert any(label in note for note in first["notes"]), first["notes"]
    assert second["selected"] == first["selected"]


def test_stratified_by_site_and_sex_keeps_joint_strata(ham_run):
    workspace, run_id, _ = ham_run
    summary = run_selection(SelectConfig(embedding_run=run_id, budget_per_class=20,
                                         strategy="stratified", stratify_by="site,sex"),
                            workspace)
    table = pq.read_table(Path(workspace.path("selections", summary["selection_id"],
                                              "selection.parquet")))
    assert {"site", "sex"} <= set(table.column_names)
    manifest = pq.read_table(Path(workspace.path("collections", "ham", "manifest.parquet")))
    archive = Counter(zip(manifest.column("label").to_pylist(), manifest.column("site").to_pylist()))
    picked = Counter(zip(table.column("label").to_pylist(), table.column("site").to_pylist()))
    sizes = Counter(manifest.column("label").to_pylist())
    for (label, site), n in archive.items():
        expected = min(20, sizes[label]) * n / sizes[label]
        # Largest-remainder rounding per joint site × sex cell: off by at most one per sex value.
        assert abs(picked[(label, site)] - expected) <= 3, (label, site, picked[(label, site)],
                                                            expected)


def test_bad_selection_requests_fail_clearly(ham_run):
    workspace, run_id, _ = ham_run
    with pytest.raises(MedcurateError, match="no column"):
        run_selection(SelectConfig(embedding_run=run_id, budget_per_class=5,
                                   stratify_by=["scanner"]), workspace)
    with pytest.raises(MedcurateError, match="takes no --within"):
        run_selection(SelectConfig(embedding_run=run_id, budget_per_class=5, strategy="random",
                                   within="nearest"), workspace)
    with pytest.raises(MedcurateError, match="no embedding named"):
        run_selection(SelectConfig(embedding_run="missing", budget_per_class=5), workspace)
    run_selection(SelectConfig(embedding_run=run_id, budget_per_class=5, selection_id="keep",
                               strategy="random"), workspace)
    before = Path(workspace.path("selections", "keep", "selection.parquet")).read_bytes()
    with pytest.raises(MedcurateError, match="already exists"):
        run_selection(SelectConfig(embedding_run=run_id, budget_per_class=9,
                                   selection_id="keep"), workspace)
    assert Path(workspace.path("selections", "keep", "selection.parquet")).read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--budget-per-class", "0"], "--budget-per-class"),
    (["--budget-per-class", "5", "--strategy", "magic"], "magic"),
])
def test_cli_rejects_bad_budget_and_strategy(ham_run, args, message):
    workspace, run_id, _ = ham_run
    done = subprocess.run([sys.executable, "-m", "medcurate", "select", run_id, *args,
                           "--workspace", workspace.uri], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr
