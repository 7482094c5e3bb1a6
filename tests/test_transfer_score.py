"""``medcurate score`` end to end on BreastMNIST with four real encoders, and its bad input
through the real command line (a clear error before any work, nothing written)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medcurate.config import IngestConfig, ScoreConfig
from medcurate.errors import MedcurateError
from medcurate.ingest import ingest
from medcurate.models.mae import build_mae, save_checkpoint
from medcurate.transfer.score import AGREEMENT_CSV, SCORES_CSV, SCORES_JSON, format_table, score
from medcurate.transfer.tasks import NO_SOURCE
from medcurate.workspace import PROVENANCE_FILE, Workspace

MEDCURATE = Path(sys.executable).with_name("medcurate")
IMAGENET = ("mobilenetv2-imagenet", "efficientnet-lite0-imagenet")
NO_HEAD = ("mobilenetv2-random", "mae-tiny-random-init")
PER_CLASS = 30
ZOO = """models:
  - {name: mobilenetv2-imagenet, model: mobilenetv2-imagenet}
  - {name: efficientnet-lite0-imagenet, model: efficientnet-lite0-imagenet}
  - {name: mobilenetv2-random, model: random/mobilenetv2}
  - {name: mae-tiny-random-init, model: "mae:mae-tiny-random-init.pt"}
"""


@pytest.fixture(scope="module")
def breast(tmp_path_factory, shared_data, ray_session):
    """BreastMNIST ingested, a zoo file of four encoders, and one scoring of the zoo."""
    root = tmp_path_factory.mktemp("score")
    workspace = Workspace(str(root / "ws"))
    ingest(IngestConfig(source=str(shared_data / "breastmnist" / "breastmnist.npz"),
                        name="breast"), workspace)
    # A random-init MAE stands in for a pretrained one: pretraining is far too slow for a test.
    torch.manual_seed(0)
    save_checkpoint(build_mae("mae-vit-tiny", img_size=64, patch_size=8, in_chans=1, depth=2),
                    root / "mae-tiny-random-init.pt", {"note": "random init, not pretrained"})
    zoo = root / "zoo.yaml"
    zoo.write_text(ZOO)
    config = ScoreConfig(target="breast", zoo=str(zoo), per_class=PER_CLASS)
    return workspace, config, score(config, workspace)


def test_every_metric_is_finite_for_every_model(breast):
    _, _, document = breast
    assert document["reused"] is False
    assert len(document["metrics"]) == 14  # the paper's score, LP, FU and 11 baselines
    for row in document["models"]:
        for metric, value in row["values"].items():
            if row["model"] in NO_HEAD and metric in ("leep", "nce"):
                assert value is None and row["notes"][metric] == NO_SOURCE
            else:
                assert value is not None and np.isfinite(value), (row["model"], metric)


def test_ranking_is_a_permutation_and_imagenet_features_beat_random_init(breast):
    _, _, document = breast
    models = {row["model"]: row for row in document["models"]}
    assert sorted(document["ranking"]) == sorted(models)
    assert [row["rank"] for row in document["models"]] == [1, 2, 3, 4]
    assert [row["model"] for row in document["models"]] == document["ranking"]
    scores = [row["values"]["score"] for row in document["models"]]
    assert scores == sorted(scores, reverse=True)
    for pretrained in IMAGENET:
        for random_init in NO_HEAD:
            assert models[pretrained]["values"]["lp"] > models[random_init]["values"]["lp"]
    # Measured here: the ImageNet models rank first and second, both random inits score 0.
    assert set(document["ranking"][:2]) == set(IMAGENET)


def test_probe_is_a_stratified_sample_of_the_training_split(breast):
    workspace, _, document = breast
    probe = document["probe"]
    assert probe["images"] == 2 * PER_CLASS and probe["classes"] == {"0": 30, "1": 30}
    manifest = workspace.read_table(f"{workspace.path('collections', probe['collection'])}/"
                                    "manifest.parquet")
    assert set(manifest.column("split").to_pylist()) == {"train"}
    for row in document["models"]:  # features cached through the embedding pipeline
        assert workspace.exists("embeddings", row["embedding_run"])


def test_outputs_are_written_and_agree(breast):
    workspace, _, document = breast
    folder = Path(workspace.path("scores", document["score_id"]))
    written = json.loads((folder / SCORES_JSON).read_text())
    assert written == {k: v for k, v in document.items() if k != "reused"}
    with open(folder / SCORES_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == document["ranking"]
    for row, expected in zip(rows, document["models"]):
        for metric, value in expected["values"].items():
            assert (row[metric] == "" if value is None else float(row[metric]) == value)
    with open(folder / AGREEMENT_CSV, newline="") as handle:
        agreement = {r["metric"]: r for r in csv.DictReader(handle)}
    assert float(agreement["lp"]["lp"]) == 1.0
    assert agreement["score"]["lp"] == agreement["lp"]["score"]  # symmetric
    record = json.loads((folder / PROVENANCE_FILE).read_text())
    for name, ref in record["outputs"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == ref["sha256"]
    table = format_table(document)
    assert all(name in table for name in document["ranking"]) and "agreement" in table


def test_same_command_reuses_the_finished_result(breast):
    workspace, config, document = breast
    again = score(config, workspace)
    assert again["reused"] is True and again["ranking"] == document["ranking"]


# -- bad input -------------------------------------------------------------------------------------
def run_score(workspace: Workspace, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([str(MEDCURATE), "score", *args, "--workspace", workspace.root],
                          capture_output=True, text=True, env=env, timeout=300)


def test_bad_input_is_a_clear_error_before_any_work(breast, tmp_path):
    workspace, config, _ = breast
    one_class = tmp_path / "one-class.npz"
    images = np.random.default_rng(0).integers(0, 255, (20, 28, 28), dtype=np.uint8)
    np.savez(one_class, train_images=images, train_labels=np.zeros((20, 1), np.uint8))
    ingest(IngestConfig(source=str(one_class), name="one-class"), workspace)
    before = {kind: workspace.list(kind) for kind in ("collections", "embeddings", "scores")}
    unknown_model = tmp_path / "unknown.yaml"
    unknown_model.write_text(ZOO.replace("random/mobilenetv2", "no-such-model"))
    invalid = tmp_path / "invalid.yaml"
    invalid.write_text("models: [{name: a, model: x}\n")
    cases = [
        ({"metrics": ["lp", "accuracy"]}, "unknown metric 'accuracy'"),
        ({"metrics": ["ncti:times"]}, "no variant 'times'"),
        ({"zoo": str(unknown_model)}, "unknown encoder spec 'no-such-model'"),
        ({"zoo": str(tmp_path / "missing.yaml")}, "zoo file not found"),
        ({"zoo": str(invalid)}, "not valid YAML"),
        ({"target": "one-class"}, "1 labelled class(es)"),
        ({"target": "no-such-collection"}, "no collection named 'no-such-collection'"),
    ]
    for change, fragment in cases:
        with pytest.raises(MedcurateError) as error:
            score(config.model_copy(update=change), workspace)
        assert fragment in str(error.value) and "\n" not in str(error.value)
    # The command line shows such an error as one line and exits non-zero, no traceback.
    for args, fragment in [(["breast", "--zoo", config.zoo, "--metrics", "lp,accuracy"],
                            "unknown metric 'accuracy'"),
                           (["one-class", "--zoo", config.zoo], "1 labelled class(es)")]:
        result = run_score(workspace, *args)
        assert result.returncode == 2 and result.stdout == "", result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("error: ")
        assert fragment in result.stderr and "Traceback" not in result.stderr
    assert before == {kind: workspace.list(kind) for kind in ("collections", "embeddings",
                                                               "scores")}


def test_relative_fu_is_a_column_beside_the_papers_fu_and_score(breast):
    workspace, config, document = breast
    update = {"metrics": ["lp", "fu", "fu:relative"], "score_id": "breast-fu-relative"}
    relative = score(config.model_copy(update=update), workspace)
    assert relative["metrics"] == ["score", "lp", "fu", "fu:relative"]
    before = {row["model"]: row["values"] for row in document["models"]}
    for row in relative["models"]:  # the paper's score and FU are untouched by the variant
        for column in ("score", "lp", "fu"):
            assert row["values"][column] == pytest.approx(before[row["model"]][column])
        assert row["values"]["fu:relative"] > 0


# -- fine-tuned models as zoo entries, self-sources left out by provenance ------------------------
TUNED_ZOO = """models:
  - {name: tuned, model: "model:tuned"}
  - {name: mobilenetv2-random, model: random/mobilenetv2}
"""


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, shared_data, ray_session):
    """BreastMNIST under three names: an MAE pretrained (briefly) on ``breast-mae``, fine-tuned
    (one epoch, 32 px) on ``breast`` as run ``tuned``; ``breast-other`` is a target neither saw."""
    from medcurate.config import FinetuneConfig, PretrainConfig
    from medcurate.train.finetune import finetune
    from medcurate.train.pretrain import pretrain

    root = tmp_path_factory.mktemp("tuned")
    workspace = Workspace(str(root / "ws"))
    for name in ("breast", "breast-mae", "breast-other"):
        ingest(IngestConfig(source=str(shared_data / "breastmnist" / "breastmnist.npz"),
                            name=name), workspace)
    mae = pretrain(PretrainConfig(collection="breast-mae", img_size=32, patch_size=8, depth=1,
                                  epochs=1, max_images=64, name="mae"), workspace)
    finetune(FinetuneConfig(train="breast", run_id="tuned", model=f"mae:{mae['checkpoint']}",
                            mode="full", augment=False, epochs=1, folds=1, metrics=["auc"]),
             workspace)
    zoo = root / "zoo.yaml"
    zoo.write_text(TUNED_ZOO)
    return workspace, zoo, mae


def test_a_finetuned_run_is_an_encoder_with_its_training_preprocessing(tuned):
    """``model:<run>``: the fine-tuned backbone, as trained, named by run and hash."""
    from medcurate.models import create_encoder, source_collections
    from medcurate.train.finetune import MODEL_FILE

    workspace, _, mae = tuned
    encoder = create_encoder("model:tuned", workspace=workspace)
    saved = torch.load(Path(workspace.path("models", "tuned", MODEL_FILE)), weights_only=True)
    record = workspace.provenance("models", "tuned")
    described = encoder.describe()
    assert described["spec"] == "model:tuned" and described["embed_dim"] == 192
    assert described["weights"] == workspace.path("models", "tuned", MODEL_FILE)
    assert described["weights_sha256"] == record["outputs"][MODEL_FILE]["sha256"]
    assert described["preprocessing"] == saved["preprocessing"]  # 32 px, the MAE's mean/std
    # The backbone is the fine-tuned one (not the MAE it started from), its head dropped.
    backbone = {f"backbone.{k}": v for k, v in encoder.backbone.state_dict().items()}
    assert set(saved["states"][0]) - set(backbone) == {"head.1.weight", "head.1.bias"}
    assert all(torch.equal(v, saved["states"][0][k]) for k, v in backbone.items())
    start = create_encoder(saved["model"])
    assert not torch.equal(start.backbone.patch_embed.proj.weight,
                           encoder.backbone.patch_embed.proj.weight)
    with torch.no_grad():
        assert encoder(torch.zeros(2, 1, 32, 32)).shape == (2, 192)
    # Its sources: the collection it was fine-tuned on and, through the MAE, pretrained on.
    assert source_collections("model:tuned", workspace) == ["breast", "breast-mae"]
    assert source_collections(saved["model"], workspace) == ["breast-mae"]
    assert source_collections("model:mae", workspace) == ["breast-mae"]
    assert create_encoder("model:mae", workspace=workspace).describe()["weights"] == mae["checkpoint"]


def test_scoring_excludes_a_model_trained_on_the_target_by_provenance(tuned):
    """Left out (and recorded) for its own training collection, ranked for another one."""
    workspace, zoo, _ = tuned
    own = score(ScoreConfig(target="breast", zoo=str(zoo), per_class=20, metrics=["lp"]),
                workspace)
    assert own["ranking"] == ["mobilenetv2-random"]
    assert own["excluded"] == {"tuned": {"spec": "model:tuned", "sources": ["breast", "breast-mae"],
                                         "reason": "trained on the target 'breast' (by provenance)"}}
    record = workspace.provenance("scores", own["score_id"])
    assert record["summary"]["excluded"] == own["excluded"]
    assert "tuned: excluded, trained on the target 'breast'" in format_table(own)
    other = score(ScoreConfig(target="breast-other", zoo=str(zoo), per_class=20,
                              metrics=["lp"]), workspace)
    assert other["excluded"] == {} and sorted(other["ranking"]) == ["mobilenetv2-random", "tuned"]
    row = next(r for r in other["models"] if r["model"] == "tuned")
    embedded = workspace.provenance("embeddings", row["embedding_run"])
    assert embedded["model"]["spec"] == "model:tuned" and row["embed_dim"] == 192
    assert np.isfinite(row["values"]["lp"])


def test_provenance_is_followed_through_samples_and_a_model_start_in_the_given_workspace(
        tuned, tmp_path, monkeypatch):
    """A model fine-tuned from ``model:tuned`` on a sample of 'breast-other' counts as trained
    on 'breast-other' (the sample's own record names it), on 'breast' and on 'breast-mae'.
    Its start is found in the workspace it is handed, never through MEDCURATE_WORKSPACE (here
    a folder without it); retraining it under its name changes the id of its embeddings."""
    from medcurate.config import EmbedConfig, FinetuneConfig
    from medcurate.embed import default_run_id
    from medcurate.ingest import MANIFEST_FILE, read_manifest
    from medcurate.models import source_collections
    from medcurate.train.finetune import finetune
    from medcurate.transfer.probe import ensure_subset, probe_indices
    from medcurate.transfer.score import self_sources
    from medcurate.transfer.zoo import load_zoo

    workspace, _, _ = tuned
    monkeypatch.setenv("MEDCURATE_WORKSPACE", str(tmp_path / "elsewhere"))
    manifest = read_manifest(workspace, "breast-other")
    sha = workspace.provenance("collections", "breast-other")["outputs"][MANIFEST_FILE]["sha256"]
    rows = probe_indices(manifest.column("label").to_pylist(),
                         manifest.column("split").to_pylist(), 20, 0)
    sample = ensure_subset(workspace, "breast-other", manifest, sha, np.sort(rows),
                           "other-sample", {"subset_of": "breast-other"})
    config = FinetuneConfig(train=sample, run_id="chained", model="model:tuned", mode="full",
                            augment=False, epochs=1, folds=1, metrics=["auc"])
    finetune(config, workspace)
    assert source_collections("model:chained", workspace) == [
        "breast", "breast-mae", "breast-other", "other-sample"]
    zoo = tmp_path / "chained.yaml"
    zoo.write_text('models:\n  - {name: chained, model: "model:chained"}\n'
                   '  - {name: random, model: random/mobilenetv2}\n')
    assert list(self_sources(load_zoo(str(zoo)), "breast-other", workspace)) == ["chained"]
    # Its source task's head is the fine-tuned classifier's (LEEP and NCE need it).
    from medcurate.models import create_encoder
    from medcurate.train.finetune import MODEL_FILE
    from medcurate.transfer.zoo import source_classifier

    weight, bias = source_classifier(create_encoder("model:chained", workspace=workspace))
    state = torch.load(Path(workspace.path("models", "chained", MODEL_FILE)),
                       weights_only=True)["states"][0]
    assert np.array_equal(weight, state["head.1.weight"].numpy()) and bias.shape == (2,)
    assert source_classifier(create_encoder("model:mae", workspace=workspace)) is None
    embedding = EmbedConfig(collection="breast", model="model:chained")
    before = default_run_id(embedding, workspace)
    finetune(config.model_copy(update={"seed": 1, "overwrite": True}), workspace)
    assert default_run_id(embedding, workspace) != before


def test_a_zoo_trained_only_on_the_target_or_naming_a_missing_run_is_refused(tuned, tmp_path):
    """Both fail before any work: nothing to rank, or a run the workspace lacks."""
    workspace, _, _ = tuned
    only_own = tmp_path / "own.yaml"
    only_own.write_text('models:\n  - {name: tuned, model: "model:tuned"}\n'
                        '  - {name: mae, model: "model:mae"}\n')
    missing = tmp_path / "missing.yaml"
    missing.write_text(TUNED_ZOO.replace("model:tuned", "model:no-such-run"))
    before = workspace.list("scores")
    for target, zoo, fragment in [("breast-mae", only_own, "every model of"),
                                  ("breast", missing, "has no model 'no-such-run'")]:
        with pytest.raises(MedcurateError, match=fragment):
            score(ScoreConfig(target=target, zoo=str(zoo), per_class=20, metrics=["lp"]),
                  workspace)
    assert workspace.list("scores") == before
