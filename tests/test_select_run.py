"""Selection runs on real embeddings (HAM10000, and the synthetic demo archive with its planted
site): outputs, summary, report, group recovery and stability, provenance, bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from medcurate.config import EmbedConfig, IngestConfig, SelectConfig
from medcurate.demo import make_demo_archive
from medcurate.embed import embed
from medcurate.errors import MedcurateError
from medcurate.ingest import ingest
from medcurate.select.run import (ALL_CLASSES, group_recovery, grouping_stability, recovery,
                                  run_selection)

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

    # Found groups against every charted column but split, per class; stability per class.
    assert set(on_disk["recovery"]) == set(taken)
    for label, columns in on_disk["recovery"].items():
        assert "split" not in columns and "site" in columns, (label, columns)
        for v in columns.values():
            assert -1 <= v["ari"] <= 1 and 0 <= v["nmi"] <= 1 and v["rows"] == taken[label]
    assert set(on_disk["stability"]) <= set(taken) and on_disk["stability"]
    assert "Do the groups match known metadata?" in report

    groups = pq.read_table(folder / "map.parquet")
    assert groups.num_rows == sum(taken.values())
    assert sum(groups.column("selected").to_pylist()) == selection.num_rows

    record = workspace.provenance("selections", summary["selection_id"])
    assert record["config"]["strategy"] == "confounder-aware"
    assert record["model"]["spec"] == "mobilenetv2-imagenet"
    assert {i["role"] for i in record["inputs"]} == {"embedding_run", "collection", "map"}


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
    with pytest.raises(ValidationError, match="takes no --within"):  # refused by the config
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


def test_group_recovery_perfect_and_independent():
    values = np.array(["a", "b", "c"] * 200, dtype=object)
    same = group_recovery(np.array([7, 3, 5] * 200), values)  # group ids need not match values
    assert same == {"ari": 1.0, "nmi": 1.0, "rows": 600}
    rng = np.random.default_rng(0)
    chance = group_recovery(rng.integers(0, 3, 4000), rng.choice(["x", "y"], 4000))
    assert abs(chance["ari"]) < 0.02 and chance["nmi"] < 0.02

    labels = np.array(["p"] * 4 + ["q"] * 4, dtype=object)
    groups = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    metadata = {"site": np.array(["s", "s", "t", "t", "s", "s", "s", "s"], dtype=object),
                "split": np.array(["train", "test"] * 4, dtype=object)}
    found = recovery(labels, groups, metadata)
    # split is never scored; class q holds one site value only, so nothing to recover there
    assert found == {"p": {"site": {"ari": 1.0, "nmi": 1.0, "rows": 4}}, "q": {}}


def test_grouping_stability_reads_per_class_and_shared_groupings():
    dbscan = {"params": {"eps_scale": 2.0, "stability": {"1.0": 0.5, "2.0": 0.95}}}
    hdbscan = {"params": {"min_cluster_share": 0.02, "stability": {"0.01": 0.7, "0.02": 0.92}}}
    fixed = {"params": {"eps": 0.3, "min_samples": 4}}
    info = {"classes": {"a": {"cluster": dbscan}, "b": {"cluster": hdbscan},
                        "c": {"cluster": fixed}}}
    found = grouping_stability(info)
    assert found["a"]["parameter"] == "eps_scale" and found["a"]["stability"] == 0.95
    assert found["b"]["parameter"] == "min_cluster_share" and found["b"]["stability"] == 0.92
    assert "c" not in found  # a fixed eps: nothing was measured
    assert set(grouping_stability({"map": {"cluster": dbscan}, "classes": {}})) == {ALL_CLASSES}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, ray_session):
    """The built-in demo archive (3 shape classes x 100, 10% of each from a planted "site_b"
    with a burned-in tag), embedded with MobileNetV2: a metadata column known to be a
    confounder the map's groups should recover."""
    from medcurate.workspace import Workspace

    root = tmp_path_factory.mktemp("demo")
    archive = make_demo_archive(root / "archive", seed=0)
    workspace = Workspace(str(root / "ws"))
    ingest(IngestConfig(source=str(archive), metadata=str(archive / "metadata.csv"),
                        id_column="file", name="demo"), workspace)
    return workspace, embed(EmbedConfig(collection="demo", model="mobilenetv2-imagenet"),
                            workspace)["run_id"]


@pytest.mark.parametrize("strategy", ["confounder-aware", "confounder-aware-paper",
                                      "cluster-random"])
def test_map_selection_reports_recovery_of_planted_site_and_stability(demo_run, strategy):
    workspace, run_id = demo_run
    summary = run_selection(SelectConfig(embedding_run=run_id, budget_per_class=10,
                                         strategy=strategy), workspace)
    folder = Path(workspace.path("selections", summary["selection_id"]))
    on_disk = json.loads((folder / "summary.json").read_text())
    assert on_disk["recovery"] == summary["recovery"]
    classes = {"disc", "ring", "bar"}
    assert set(on_disk["recovery"]) == classes
    for columns in on_disk["recovery"].values():
        assert set(columns) == {"site"}  # split is not scored
        site = columns["site"]
        assert -1 <= site["ari"] <= 1 and 0 <= site["nmi"] <= 1 and site["rows"] == 100
    # The planted site is found as a group of its own in at least one class.
    assert max(c["site"]["ari"] for c in on_disk["recovery"].values()) >= 0.9
    assert set(on_disk["stability"]) == classes
    for v in on_disk["stability"].values():
        assert v["parameter"] == "eps_scale" and 0 <= v["stability"] <= 1
        assert v["stability"] == v["candidates"][str(v["value"])]
    report = (folder / "report.html").read_text()
    assert "Do the groups match known metadata?" in report and "<th>ARI</th>" in report
    assert "How stable is the grouping?" in report and "eps_scale = " in report


def test_balanced_and_mapless_selections_report_stability_accordingly(demo_run):
    workspace, run_id = demo_run
    balanced = run_selection(SelectConfig(embedding_run=run_id, budget_per_class=10,
                                          balance_groups=True), workspace)
    assert set(balanced["stability"]) == {ALL_CLASSES}  # one grouping spans every class
    assert set(balanced["recovery"]) == {"disc", "ring", "bar"}
    plain = run_selection(SelectConfig(embedding_run=run_id, budget_per_class=10,
                                       strategy="random"), workspace)
    assert "recovery" not in plain and "stability" not in plain
    report = Path(workspace.path("selections", plain["selection_id"], "report.html")).read_text()
    assert "Do the groups match known metadata?" not in report


def test_maps_are_stored_beside_the_run_and_reused_by_other_budgets_and_seeds(demo_run):
    """A class map (UMAP + groups) depends on the rows, the map parameters and the map seed,
    never on the budget or the selection seed: it is fitted once, stored as a ``maps``
    artefact with its provenance, and later selections read it back with identical results."""
    from artefacts import assert_outputs_match_their_hashes

    workspace, run_id = demo_run
    first = run_selection(SelectConfig(embedding_run=run_id, budget_per_class=5, map_seed=11,
                                       selection_id="maps-a"), workspace)
    computed = first["maps"]["computed"]
    assert len(computed) == 3 and first["maps"]["reused"] == []
    second = run_selection(SelectConfig(embedding_run=run_id, budget_per_class=12, seed=3,
                                        map_seed=11, selection_id="maps-b"), workspace)
    assert second["maps"] == {"reused": computed, "computed": []}
    assert second["timing"]["select_s"] < first["timing"]["select_s"] / 3  # no UMAP
    maps = [pq.read_table(workspace.path("selections", key, "map.parquet"))
            for key in ("maps-a", "maps-b")]
    assert maps[0].select(["id", "x", "y", "group"]).equals(maps[1].select(["id", "x", "y",
                                                                            "group"]))
    run_digest = next(ref["sha256"] for ref in workspace.provenance("selections", "maps-a")
                      ["inputs"] if ref["role"] == "embedding_run")
    for key in computed:
        record = assert_outputs_match_their_hashes(workspace, "maps", key)
        assert key.startswith(run_id) and record["config"]["n_neighbors"] == 15
        assert record["inputs"] == [{"role": "embedding_run", "uri": run_id,
                                     "sha256": run_digest}]
    again = run_selection(SelectConfig(embedding_run=run_id, budget_per_class=5, map_seed=11,
                                       selection_id="maps-c"), workspace)
    assert again["maps"]["reused"] == computed  # a stored map selects exactly as a fresh one
    assert (pq.read_table(workspace.path("selections", "maps-c", "selection.parquet"))
            .equals(pq.read_table(workspace.path("selections", "maps-a", "selection.parquet"))))
    other = run_selection(SelectConfig(embedding_run=run_id, budget_per_class=5, map_seed=12,
                                       selection_id="maps-d"), workspace)
    assert len(other["maps"]["computed"]) == 3 and not set(other["maps"]["computed"]) & set(
        computed)


def test_inputs_cache_reads_a_run_once_and_never_serves_a_replaced_one(tmp_path):
    """The service's in-memory runs: one read per run version, shared read-only; a run
    written again (new version) is read afresh; a cache too small keeps nothing."""
    from medcurate.select.run import InputsCache
    from medcurate.synthetic import write_embedding_run
    from medcurate.workspace import Workspace

    workspace = Workspace(str(tmp_path / "ws"))
    rng = np.random.default_rng(0)
    labels = ["a"] * 60 + ["b"] * 60
    run_id = write_embedding_run(workspace, "cached", rng.normal(size=(120, 8)), labels)
    cache = InputsCache(max_bytes=1 << 30)
    first = cache.get(workspace, run_id, [])
    assert cache.get(workspace, run_id, []) is first and not first.X.flags.writeable
    config = SelectConfig(embedding_run=run_id, budget_per_class=5, strategy="kcenter",
                          selection_id="via-cache")
    summary = run_selection(config, workspace, inputs=cache, report=False)
    direct = run_selection(config.model_copy(update={"selection_id": "direct"}), workspace)
    assert summary["selected"] == direct["selected"] == 10
    assert (pq.read_table(workspace.path("selections", "via-cache", "selection.parquet"))
            .equals(pq.read_table(workspace.path("selections", "direct", "selection.parquet"))))
    replaced = rng.normal(size=(120, 8))
    write_embedding_run(workspace, "cached", replaced, labels)
    fresh = cache.get(workspace, run_id, [])
    assert fresh is not first and np.allclose(fresh.X, replaced.astype(np.float32))
    assert cache.get(workspace, run_id, ["train"]) is not fresh  # another key: other splits
    tiny = InputsCache(max_bytes=1)
    assert tiny.get(workspace, run_id, []) is not tiny.get(workspace, run_id, [])


def test_load_compute_publish_are_the_run_in_steps_and_compute_writes_nothing(tmp_path):
    """``run_selection`` is ``load`` → ``compute`` → ``publish``: ``compute`` leaves no
    selection behind, and publishing it gives the files ``run_selection`` writes."""
    from medcurate.provenance import utc_now
    from medcurate.select.run import compute, load, publish
    from medcurate.synthetic import write_embedding_run
    from medcurate.workspace import Workspace

    workspace = Workspace(str(tmp_path / "ws"))
    labels = ["a"] * 40 + ["b"] * 40
    run_id = write_embedding_run(workspace, "steps",
                                 np.random.default_rng(1).normal(size=(80, 8)), labels)
    config = SelectConfig(embedding_run=run_id, budget_per_class=6, strategy="herding",
                          selection_id="steps")
    data = load(config, workspace)
    selection = compute(config, data, "steps")
    assert selection.table.num_rows == 12 and selection.summary["selected"] == 12
    assert workspace.list("selections") == []
    publish(workspace, config, data, selection, started=utc_now(), report=False)
    direct = run_selection(config.model_copy(update={"selection_id": "direct"}), workspace)
    assert direct["selected"] == 12
    assert (pq.read_table(workspace.path("selections", "steps", "selection.parquet"))
            .equals(pq.read_table(workspace.path("selections", "direct", "selection.parquet"))))


def test_a_report_drawn_after_the_selection_is_added_as_a_new_version(demo_run):
    """The service publishes a selection without its report and draws it later: the report
    joins the selection's files through the workspace's protocol, hashes updated, the other
    files as they were; a selection whose run was replaced since is refused clearly."""
    from artefacts import assert_outputs_match_their_hashes

    from medcurate.select.run import has_report, render_report

    workspace, run_id = demo_run
    run_selection(SelectConfig(embedding_run=run_id, budget_per_class=4, map_seed=11,
                               selection_id="later"), workspace, report=False)
    before = workspace.provenance("selections", "later")["outputs"]
    assert "report.html" not in before and not has_report(workspace, "later")
    assert render_report(workspace, "later")
    after = assert_outputs_match_their_hashes(workspace, "selections", "later")["outputs"]
    assert {k: v for k, v in after.items() if k != "report.html"} == before
    page = Path(workspace.path("selections", "later", "report.html")).read_text()
    assert "Selection later" in page and "data:image/jpeg;base64," in page  # thumbnails
