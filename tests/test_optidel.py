"""OptiDEL pretraining-data selection: patches, margins, diversity, synthesis, the optidel and
pretrain commands on real BreastMNIST, and the perceptron theory behind keeping hard samples."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from medcurate import backends
from medcurate.config import (EmbedConfig, IngestConfig, OptidelConfig, PretrainConfig,
                              SelectConfig)
from medcurate.embed import embed, load_embeddings
from medcurate.errors import MedcurateError
from medcurate.ingest import ingest, read_manifest
from medcurate.ingest.decode import load_rows
from medcurate.select.optidel import optidel, prototype_margins
from medcurate.select.patches import GridExtractor, make_extractor
from medcurate.select.pool import run_optidel
from medcurate.select.run import run_selection
from pruning_theory import perceptron_pruning_error
from medcurate.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
FRACTION = 0.05  # of BreastMNIST's 546 training images: 27, of which 14 synthetic


def breast_images(shared_data: Path) -> np.ndarray:
    return np.load(shared_data / "breastmnist" / "breastmnist.npz")["train_images"]


# -- patches ------------------------------------------------------------------------------------
def test_grid_patches_drop_blank_cells_and_are_deterministic(shared_data):
    """A real ultrasound image in the middle of a black 56 px canvas: the 12 border cells are
    blank and dropped, the 4 cells holding the image are kept, the same each time."""
    canvas = np.zeros((1, 56, 56), dtype=np.float32)
    canvas[0, 14:42, 14:42] = breast_images(shared_data)[0] / 255.0
    extractor = GridExtractor(patch_size=14, min_content=0.02)
    patches = extractor(canvas)
    assert patches.boxes.shape == (4, 4) and patches.content.shape == (4,)
    assert patches.boxes.tolist() == [[14, 14, 28, 28], [14, 28, 28, 42],
                                      [28, 14, 42, 28], [28, 28, 42, 42]]
    assert (patches.content >= 0.02).all() and patches.masks is None
    again = extractor(canvas)
    assert np.array_equal(again.boxes, patches.boxes)
    assert np.array_equal(again.content, patches.content)
    assert len(GridExtractor(patch_size=14, min_content=0.0)(canvas)) == 16
    assert len(GridExtractor(min_content=0.0)(canvas)) == 16  # default: a quarter of the side
    with pytest.raises(MedcurateError, match="exceeds"):
        GridExtractor(patch_size=64)(canvas)


def test_sam_without_checkpoint_or_package_names_what_is_missing(tmp_path):
    with pytest.raises(MedcurateError, match=r"checkpoint.*segment_anything package"):
        make_extractor("sam")
    with pytest.raises(MedcurateError, match="does not exist"):
        make_extractor(f"sam:{tmp_path / 'sam_vit_b_01ec64.pth'}")
    with pytest.raises(MedcurateError, match="unknown patch extractor"):
        make_extractor("watershed")
    with pytest.raises(MedcurateError, match="min_content"):
        make_extractor("grid", min_content=-0.1)


# -- margins and diversity ----------------------------------------------------------------------
def planted_boundary(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two blobs at ±3 on axis 0, and ten points planted within 0.05 of the plane x0 = 0."""
    rng = np.random.default_rng(seed)
    blobs = rng.normal(0, 1, (800, 8))
    blobs[:400, 0] -= 3
    blobs[400:, 0] += 3
    planted = rng.normal(0, 1, (10, 8))
    planted[:, 0] = rng.uniform(-0.05, 0.05, 10)
    return np.concatenate([blobs, planted]).astype(np.float32), np.arange(800, 810)


def test_margin_is_the_distance_to_the_prototype_boundary_and_smallest_go_first():
    X, planted = planted_boundary()
    margin, cluster = prototype_margins(X, 2, seed=0)
    centres = np.stack([X[cluster == c].mean(axis=0) for c in (0, 1)])
    # With two prototypes the margin is the distance to their bisecting hyperplane.
    normal = (centres[1] - centres[0]) / np.linalg.norm(centres[1] - centres[0])
    to_plane = np.abs((X - centres.mean(axis=0)) @ normal)
    assert np.allclose(margin, to_plane, atol=1e-3)
    assert set(np.argsort(margin)[:10]) == set(planted)

    result = optidel(X, np.zeros(len(X)), None, fraction=10 / len(X),
                     hard_share=10 / len(X), synth_share=0.0, n_clusters=2)
    assert sorted(result.indices) == sorted(planted) and result.synthesis is None
    assert all(reason.startswith("margin ") for reason in result.reason)


def test_the_catalogues_pool_strategies_are_commands_not_select_strategies():
    """The catalogue lists them without importing the strategies (the CLI starts light)."""
    import typing

    from medcurate import catalogue, config
    from medcurate.commands import COMMANDS
    from medcurate.select import STRATEGIES

    assert set(catalogue.POOL_STRATEGIES) <= set(COMMANDS)
    assert not set(catalogue.POOL_STRATEGIES) & (set(STRATEGIES)
                                                 | set(typing.get_args(config.Strategy)))


def test_optidel_refuses_bad_input():
    X, _ = planted_boundary()
    labels = np.zeros(len(X))
    for params, message in [({}, "needs fraction"), ({"fraction": 0.0}, "fraction"),
                            ({"fraction": 1.5}, "fraction"),
                            ({"fraction": 0.1, "synth_share": 2}, "synth_share"),
                            ({"fraction": 0.1, "n_clusters": 1}, "n_clusters"),
                            ({"fraction": 0.1, "extractor": "sam"}, "checkpoint")]:
        with pytest.raises(MedcurateError, match=message):
            optidel(X, labels, None, **params)
    with pytest.raises(MedcurateError, match="not a budget per class"):
        optidel(X, labels, 5, fraction=0.1)


@pytest.mark.parametrize("config_cls, params, message", [
    (OptidelConfig, {}, "--fraction"),
    (OptidelConfig, {"fraction": 0.0}, "fraction"),
    (OptidelConfig, {"fraction": 1.01}, "fraction"),
    (OptidelConfig, {"fraction": 0.05, "budget_per_class": 5}, "no --budget-per-class"),
    (OptidelConfig, {"fraction": 0.05, "stratify_by": "site"}, "--stratify-by"),
    (SelectConfig, {"strategy": "kcenter"}, "needs --budget-per-class"),
    (SelectConfig, {"strategy": "kcenter", "budget_per_class": 5, "fraction": 0.05},
     "--fraction is for"),
])
def test_select_config_wants_fraction_for_optidel_and_a_budget_otherwise(config_cls, params,
                                                                         message):
    with pytest.raises(ValidationError, match=message):
        config_cls(embedding_run="run", **params)


# -- the commands on real BreastMNIST ----------------------------------------------------------
@pytest.fixture(scope="module")
def breast(tmp_path_factory, shared_data, ray_session):
    """BreastMNIST's train split as PNGs (so that only its 546 images are embedded), every
    fourth one unlabeled (outside the class folders, ingested with --unlabeled): OptiDEL must
    take labelled and unlabeled images alike. Embedded with MobileNetV2, 5% selected."""
    root = tmp_path_factory.mktemp("optidel")
    data = np.load(shared_data / "breastmnist" / "breastmnist.npz")
    for index, (image, label) in enumerate(zip(data["train_images"], data["train_labels"][:, 0],
                                               strict=True)):
        folder = root / "breast" / "train" / ("" if index % 4 == 0 else str(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    workspace = Workspace(str(root / "ws"))
    ingest(IngestConfig(source=str(root / "breast"), name="breast", unlabeled=True), workspace)
    run = embed(EmbedConfig(collection="breast", model="mobilenetv2-imagenet"), workspace)
    summary = run_optidel(OptidelConfig(embedding_run=run["run_id"], fraction=FRACTION,
                                        splits=["train"], patch_size=7), workspace)
    return workspace, run["run_id"], summary


def test_optidel_selects_a_fraction_and_publishes_its_synthetic_images(breast, shared_data):
    workspace, run_id, summary = breast
    assert (summary["selected"], summary["synthesised"], summary["pretraining_images"]) == \
        (13, 14, 27)
    selection = pq.read_table(Path(workspace.path("selections", summary["selection_id"],
                                                  "selection.parquet")))
    assert selection.num_rows == 13 and set(selection.column("split").to_pylist()) == {"train"}

    name = summary["synthetic_collection"]
    record = workspace.provenance("collections", name)
    manifest_file = Path(workspace.path("collections", name, "manifest.parquet"))
    assert record["outputs"]["manifest.parquet"]["sha256"] == \
        hashlib.sha256(manifest_file.read_bytes()).hexdigest()
    assert record["summary"]["synthesised_by"] == summary["selection_id"]
    assert {i["role"] for i in record["inputs"]} == {"embedding_run", "collection"}
    synthetic = read_manifest(workspace, name)
    assert synthetic.num_rows == 14 and set(synthetic.column("split").to_pylist()) == {"train"}
    assert synthetic.column("label").null_count == 14
    images = load_rows(synthetic.to_pydict())
    for image, digest, path in zip(images, synthetic.column("sha256").to_pylist(),
                                   synthetic.column("uri").to_pylist(), strict=True):
        assert image.shape == (28, 28) and image.dtype == np.uint8
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == digest

    # Each image is its base with up to half its 7-px cells, those with content, from a donor
    # of another cluster, pasted in place.
    originals = {row["id"]: row for row in read_manifest(workspace, "breast").to_pylist()}

    def original(image_id: str) -> np.ndarray:
        row = originals[image_id]
        return load_rows({"uri": [row["uri"]], "member": [row["member"]]})[0]

    cells = [(slice(t, t + 7), slice(c, c + 7)) for t in range(0, 28, 7) for c in range(0, 28, 7)]
    for image, row in zip(images, synthetic.to_pylist(), strict=True):
        assert row["base_cluster"] != row["donor_cluster"] and 0 < row["donor_share"] <= 0.5
        base, donor = original(row["base_id"]), original(row["donor_id"])
        assert all(np.array_equal(image[cell], base[cell]) or
                   np.array_equal(image[cell], donor[cell]) for cell in cells)
        from_donor = [cell for cell in cells if not np.array_equal(image[cell], base[cell])]
        assert 1 <= len(from_donor) <= round(row["donor_share"] * 16)
        assert all(donor[cell].std() / 255 >= 0.02 for cell in from_donor)
    assert np.mean(synthetic.column("donor_share").to_numpy()) > 0.4


def test_the_real_picks_are_hard_and_spread_out(breast):
    workspace, run_id, summary = breast
    rows, X = load_embeddings(workspace, run_id)
    train = np.array(rows.column("split").to_pylist()) == "train"
    X, ids = X[train], np.array(rows.column("id").to_pylist())[train]
    selection = pq.read_table(Path(workspace.path("selections", summary["selection_id"],
                                                  "selection.parquet")))
    chosen = np.flatnonzero(np.isin(ids, selection.column("id").to_pylist()))
    margin, _ = prototype_margins(X, 10, seed=0)
    pool = np.argsort(margin, kind="stable")[:round(0.2 * len(X))]
    assert set(chosen) <= set(pool)  # from the hard pool only

    def covering_radius(picks: np.ndarray) -> float:
        return float(np.sqrt(backends.sq_dists(X[picks], X[pool]).min(axis=0).max()))

    rng = np.random.default_rng(0)
    random_radii = [covering_radius(rng.choice(pool, len(chosen), replace=False))
                    for _ in range(20)]
    assert covering_radius(chosen) < min(random_radii)  # k-center covers the pool best


def test_cli_selects_with_optidel_and_refuses_bad_input(breast):
    workspace, run_id, _ = breast

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "medcurate", "optidel", run_id, *args,
                               "--workspace", workspace.uri], capture_output=True, text=True,
                              cwd=REPO, timeout=300)

    done = cli("--fraction", "0.05", "--synth-share", "0", "--selection-id", "cli-optidel")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["selected"] == summary["pretraining_images"] == round(0.05 * 546)
    assert "synthetic_collection" not in summary
    for args, message in [([], "--fraction"),
                          (["--fraction", "0"], "--fraction"),
                          (["--fraction", "2"], "--fraction"),
                          (["--fraction", "0.05", "--extractor", "sam"], "needs a checkpoint")]:
        bad = cli(*args)
        assert bad.returncode == 2 and bad.stderr.startswith("error:"), bad.stderr
        assert message in bad.stderr and "Traceback" not in bad.stderr


def test_pretrain_trains_only_on_the_selection_and_its_synthetic_images(breast):
    from medcurate.train import pretrain

    workspace, _, summary = breast
    config = PretrainConfig(collection="breast", selection=summary["selection_id"], img_size=28,
                            patch_size=7, depth=1, epochs=1, batch_size=16)
    result = pretrain(config, workspace)
    assert result["images"] == 27  # 13 selected + 14 synthetic, not the 546 of the split
    assert result["name"] == f"{summary['selection_id']}-mae-vit-tiny"
    record = workspace.provenance("models", result["name"])
    roles = {i["role"]: i for i in record["inputs"]}
    assert set(roles) == {"collection", "selection", "synthetic_collection"}
    assert roles["synthetic_collection"]["sha256"] == workspace.provenance(
        "collections", summary["synthetic_collection"])["outputs"]["manifest.parquet"]["sha256"]
    with pytest.raises(MedcurateError, match="was made from collection 'breast'"):
        pretrain(PretrainConfig(collection=summary["synthetic_collection"],
                                selection=summary["selection_id"]), workspace)


def test_optidel_takes_unlabeled_images_where_budgeted_strategies_refuse_them(breast):
    workspace, run_id, summary = breast
    archive = {label: counts["archive"] for label, counts in summary["classes"].items()}
    assert archive == {"(missing)": 137, "0": 103, "1": 306}
    assert sum(counts["selected"] for counts in summary["classes"].values()) == 13
    with pytest.raises(MedcurateError, match="unlabeled images"):
        run_selection(SelectConfig(embedding_run=run_id, strategy="kcenter",
                                   budget_per_class=5), workspace)


# -- theory -------------------------------------------------------------------------------------
def test_keeping_the_hardest_beats_random_only_when_data_are_abundant():
    """Teacher–student perceptron, 50 dimensions, keep 20% of the pool (mean of 10 seeds):
    pool of 50 per dimension (10 kept per dimension): hardest wins; pool of 2 per dimension
    (0.4 kept per dimension): random wins. Measured: 0.008 vs 0.044 and 0.46 vs 0.33."""
    def mean_error(pool_per_dim: float, rule: str) -> float:
        return float(np.mean([perceptron_pruning_error(50, pool_per_dim, 0.2, rule, seed=s)
                              for s in range(10)]))

    assert mean_error(50, "hard") < 0.5 * mean_error(50, "random")
    assert mean_error(2, "hard") > mean_error(2, "random") + 0.05
    with pytest.raises(MedcurateError, match="unknown pruning rule"):
        perceptron_pruning_error(50, 2, 0.2, "easy")
