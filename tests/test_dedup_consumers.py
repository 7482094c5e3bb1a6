"""The commands that honour a dedup (``--exclude-duplicates``) besides ``select``
(tests/test_dedup.py): ``finetune`` trains without the removed near-duplicates and tests
without the leaked test images, ``compare-selections`` passes the dedup to every selection and
drops its leaks, the selection report shows a near-duplicates section; a dedup of another run
or collection is refused. On a small real set: BreastMNIST images, embedded with a packaged
ImageNet encoder, with byte copies planted within 'train' and across 'train' and 'test'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from medcurate.config import (CompareConfig, DedupConfig, EmbedConfig, FinetuneConfig,
                              IngestConfig, SelectConfig)
from medcurate.dedup import GROUPS_FILE, LEAKS_FILE, dedup
from medcurate.embed import embed
from medcurate.errors import MedcurateError
from medcurate.ingest import ingest, read_manifest
from medcurate.provenance import outputs_digest
from medcurate.workspace import Workspace
from test_cli import assert_clean_error, run_cli

SIZES = {"train": 60, "val": 20, "test": 30}
TRAIN_COPIES = 4  # training images copied once more into 'train'
TEST_COPIES = 10  # training images copied into 'test': leaks
QUICK = {"model": "mobilenetv2-imagenet", "img_size": 32, "augment": False, "epochs": 3}


@pytest.fixture(scope="module")
def deduped(tmp_path_factory, shared_data, ray_session):
    """Workspace, collection, embedding run and dedup of a 124-image BreastMNIST subset with
    4 byte copies within 'train' and 10 training images copied into 'test'."""
    root = tmp_path_factory.mktemp("dedup-consumers")
    with np.load(shared_data / "breastmnist" / "breastmnist.npz") as source:
        arrays = {f"{split}_{part}": source[f"{split}_{part}"][:size]
                  for split, size in SIZES.items() for part in ("images", "labels")}
    copied = {"train": np.arange(TRAIN_COPIES), "test": np.arange(20, 20 + TEST_COPIES)}
    for split, rows in copied.items():
        for part in ("images", "labels"):
            arrays[f"{split}_{part}"] = np.concatenate([arrays[f"{split}_{part}"],
                                                        arrays[f"train_{part}"][rows]])
    np.savez(root / "small.npz", **arrays)
    workspace = Workspace(str(root / "ws"))
    ingest(IngestConfig(source=str(root / "small.npz"), name="small"), workspace)
    run = embed(EmbedConfig(collection="small", model="mobilenetv2-imagenet"),
                workspace)["run_id"]
    key = dedup(DedupConfig(embedding_run=run), workspace)["dedup_id"]
    return workspace, run, key


def _ids(table) -> set[str]:
    return set(table.column("id").to_pylist())


def _dedup_sets(workspace: Workspace, key: str) -> tuple[set[str], set[str]]:
    """The ids the dedup removed and the test ids it reports as leaks, read from its files."""
    groups = workspace.read_table(workspace.path("dedups", key, GROUPS_FILE))
    leaks = workspace.read_table(workspace.path("dedups", key, LEAKS_FILE))
    removed = groups.filter(pc.invert(groups["kept"])).column("id").to_pylist()
    return set(removed), set(leaks.column("test_id").to_pylist())


def _split(workspace: Workspace, split: str):
    manifest = read_manifest(workspace, "small")
    return manifest.filter(pc.equal(manifest["split"], split))


def test_the_planted_copies_are_what_the_dedup_removes_and_leaks(deduped):
    """The ground the other tests stand on: every planted byte copy is found (one of each
    'train' pair removed, every 'test' copy a leak)."""
    workspace, _, key = deduped
    removed, leaked = _dedup_sets(workspace, key)
    manifest = read_manifest(workspace, "small")
    split_of = dict(zip(manifest["id"].to_pylist(), manifest["split"].to_pylist()))
    pairs = [(row["id"], row["duplicate_of"]) for row in manifest.to_pylist()
             if row["duplicate_of"]]
    assert len(pairs) >= TRAIN_COPIES + TEST_COPIES
    for pair in pairs:
        splits = {split_of[i] for i in pair}
        if splits == {"train"}:
            assert len(removed & set(pair)) == 1
        elif splits == {"train", "test"}:
            assert next(i for i in pair if split_of[i] == "test") in leaked
    assert sum("test" in {split_of[i] for i in pair} for pair in pairs) >= TEST_COPIES


def test_finetune_trains_without_removed_copies_and_tests_without_leaks(deduped):
    workspace, _, key = deduped
    removed, leaked = _dedup_sets(workspace, key)
    train, test = _split(workspace, "train"), _split(workspace, "test")
    dropped_train = _ids(train) & removed
    assert dropped_train and leaked <= _ids(test)
    result = finetune_with(workspace, key)
    assert result["images"] == {"train": train.num_rows - len(dropped_train),
                                "test": test.num_rows - len(leaked)}
    record = workspace.provenance("dedups", key)
    assert result["duplicates"] == {"dedup_id": key, "sha256": outputs_digest(record),
                                    "train_dropped": len(dropped_train),
                                    "test_dropped": {"test": len(leaked)}}
    predictions = pq.read_table(Path(workspace.path("models", "deduped")) / "predictions.parquet")
    tested = predictions.filter(pc.equal(predictions["test_set"], "test"))
    assert _ids(tested) == _ids(test) - leaked  # exactly the leaks left out
    model = workspace.provenance("models", "deduped")
    assert {"role": "dedup", "uri": key, "sha256": outputs_digest(record)} in \
        [{k: ref[k] for k in ("role", "uri", "sha256")} for ref in model["inputs"]]
    assert model["config"]["exclude_duplicates"] == key


def finetune_with(workspace: Workspace, key: str) -> dict:
    from medcurate.train.finetune import finetune

    return finetune(FinetuneConfig(train="small", run_id="deduped", exclude_duplicates=key,
                                   **QUICK), workspace)


def test_compare_passes_the_dedup_to_every_selection_and_drops_its_leaks(deduped):
    from medcurate.train.compare import compare_selections

    workspace, run, key = deduped
    removed, leaked = _dedup_sets(workspace, key)
    train = _split(workspace, "train")
    # budget 200 exceeds each class: a selection takes the whole deduplicated 'train' split
    config = CompareConfig(embedding_run=run, strategies=["random"], budgets=[5, 200],
                           seeds=[0], augment=False, comparison_id="cmp",
                           exclude_duplicates=key)
    summary = compare_selections(config, workspace)
    train_excluded = len(_ids(train) & removed)
    assert summary["duplicates"] == {"dedup_id": key,
                                     "sha256": outputs_digest(workspace.provenance("dedups", key)),
                                     "train_excluded": train_excluded,
                                     "test_dropped": summary["test_dropped"]["dedup_leaks"]}
    # the own check drops the byte copies; the leaks add what it missed, never fewer
    dropped = summary["test_dropped"]
    assert dropped["exact"] >= TEST_COPIES
    assert summary["test_images"] == _split(workspace, "test").num_rows - dropped["exact"] \
        - dropped["near"] - dropped["dedup_leaks"]
    assert summary["test_images"] <= _split(workspace, "test").num_rows - len(leaked)
    for budget in (5, 200):
        selection = f"cmp-random-n{budget}-s0"
        record = workspace.provenance("selections", selection)
        assert record["config"]["exclude_duplicates"] == key
        picked = _ids(workspace.read_table(workspace.path("selections", selection,
                                                          "selection.parquet")))
        assert not picked & removed
    whole = _ids(workspace.read_table(workspace.path("selections", "cmp-random-n200-s0",
                                                     "selection.parquet")))
    assert whole == _ids(train) - removed
    ceiling = [line.split(",") for line in (Path(workspace.path("comparisons", "cmp"))
                                            / "results.csv").read_text().splitlines()[1:]]
    assert {int(row[1]) for row in ceiling if row[0] == "all"} == \
        {train.num_rows - train_excluded}
    page = (Path(workspace.path("comparisons", "cmp")) / "report.html").read_text()
    assert f"more that dedup {key} reports as leaks" in page
    # the selection's report: its near-duplicates section
    report = (Path(workspace.path("selections", "cmp-random-n200-s0"))
              / "report.html").read_text()
    dedup_summary = workspace.provenance("dedups", key)["summary"]
    assert "<h2>Near-duplicates</h2>" in report
    assert (f"Dedup {key} (cosine similarity at least {dedup_summary['threshold']}, kept image "
            f"of each group: central) found {dedup_summary['groups']} groups of "
            f"near-duplicates among {dedup_summary['images']} images and removed "
            f"{dedup_summary['removed']}; this selection left out {train_excluded} of them"
            ) in report
    leaks_row = "".join(f"<tr><td>{pair}</td><td>{count}</td></tr>" for pair, count
                        in dedup_summary["leaks_by_split_pair"].items())
    assert f"{dedup_summary['leaks']} test images repeat" in report and leaks_row in report


def test_a_selection_without_a_dedup_says_so_in_its_report(deduped):
    from medcurate.select.run import run_selection

    workspace, run, _ = deduped
    summary = run_selection(SelectConfig(embedding_run=run, budget_per_class=5,
                                         strategy="random", selection_id="plain"), workspace)
    report = (Path(workspace.path("selections", "plain")) / "report.html").read_text()
    assert "duplicates" not in summary and "<h2>Near-duplicates</h2>" in report
    assert "made without a dedup, so near-duplicate images were not looked for" in report


def test_a_dedup_of_another_run_or_collection_is_refused(deduped):
    from medcurate.select.run import run_selection
    from medcurate.synthetic import write_embedding_run
    from medcurate.train.compare import compare_selections
    from medcurate.train.finetune import finetune

    workspace, run, key = deduped
    other = write_embedding_run(workspace, "other", np.random.default_rng(0).normal(
        size=(12, 8)), ["0", "1"] * 6)
    foreign = dedup(DedupConfig(embedding_run=other), workspace)["dedup_id"]
    with pytest.raises(MedcurateError, match=f"dedup {foreign!r} is of collection 'other' "
                                             f"\\(embedding run {other!r}\\), not 'small'"):
        finetune(FinetuneConfig(train="small", exclude_duplicates=foreign, **QUICK), workspace)
    run_selection(SelectConfig(embedding_run=run, budget_per_class=5, strategy="random",
                               selection_id="picked"), workspace, report=False)
    with pytest.raises(MedcurateError, match=f"dedup {foreign!r} was made from embedding run "
                                             f"{other!r}, not {run!r}"):
        finetune(FinetuneConfig(train="picked", exclude_duplicates=foreign, **QUICK), workspace)
    with pytest.raises(MedcurateError, match=f"dedup {foreign!r} was made from embedding run"):
        compare_selections(CompareConfig(embedding_run=run, exclude_duplicates=foreign,
                                         comparison_id="refused"), workspace)
    assert "refused" not in workspace.list("comparisons")
    # on the command line (which takes the option from the config): a clean error
    done = run_cli("finetune", "picked", "--model", "mobilenetv2-imagenet",
                   "--exclude-duplicates", foreign, workspace=Path(workspace.uri))
    assert_clean_error(done, f"not {run!r}")


def test_finetune_on_a_selection_drops_the_dedups_removed_images_from_it(deduped):
    """A selection made without the dedup: finetune takes its removed near-copies out (the
    selection's run is the dedup's, so its ids apply); nothing is trained here."""
    from medcurate.select.run import run_selection, selection_rows
    from medcurate.train.finetune import test_sets, training_dedup, without_duplicates

    workspace, run, key = deduped
    removed, leaked = _dedup_sets(workspace, key)
    run_selection(SelectConfig(embedding_run=run, budget_per_class=200, strategy="random",
                               splits=["train"], selection_id="all-train"), workspace,
                  report=False)
    used = training_dedup(workspace, key, "all-train", "small", True)
    _, rows = selection_rows(workspace, "all-train")
    kept, tests, record = without_duplicates(used, rows, test_sets(workspace, "small", []),
                                             "small")
    assert _ids(kept) == _ids(rows) - removed and record["train_dropped"] == len(
        _ids(rows) & removed)
    assert _ids(tests["test"]) == _ids(_split(workspace, "test")) - leaked


def test_default_ids_are_unchanged_while_exclude_duplicates_is_unset():
    """Models and comparisons made before the field existed keep their default keys."""
    import hashlib

    from medcurate.train.compare import _default_id
    from medcurate.train.finetune import default_run_id

    def before(config, name: str) -> str:  # the digest as computed before the field existed
        fields = config.model_dump(exclude={"overwrite", "num_workers", "use_gpu", name,
                                            "exclude_duplicates"})
        text = json.dumps(fields, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    finetune = FinetuneConfig(train="small", **QUICK)
    compare = CompareConfig(embedding_run="small--run", seeds=[0])
    assert default_run_id(finetune).endswith(before(finetune, "run_id"))
    assert _default_id(compare).endswith(before(compare, "comparison_id"))
    for config, name in ((finetune, default_run_id), (compare, _default_id)):
        assert name(config.model_copy(update={"exclude_duplicates": "d"})) != name(config)


def test_nothing_left_to_train_or_test_on_is_one_clear_error(deduped):
    """The dedup's real sets, applied to tables holding only what it removes or leaks: finetune
    and compare refuse with a message rather than train or score on nothing."""
    from medcurate.dedup_use import for_collection, in_ids
    from medcurate.train.compare import _without_dedup
    from medcurate.train.finetune import without_duplicates

    workspace, _, key = deduped
    used = for_collection(workspace, key, "small")
    train, test = _split(workspace, "train"), _split(workspace, "test")
    only_leaks = test.filter(in_ids(test.column("id"), used.leaked))
    only_removed = train.filter(in_ids(train.column("id"), used.removed))
    assert only_leaks.num_rows and only_removed.num_rows
    with pytest.raises(MedcurateError, match="every image of test set 'test' repeats a "
                                             "training image"):
        without_duplicates(used, train, {"test": ("small", only_leaks)}, "small")
    with pytest.raises(MedcurateError, match=f"dedup '{key}' removed every training image"):
        without_duplicates(used, only_removed, {"test": ("small", test)}, "small")
    with pytest.raises(MedcurateError, match="every test image is a leak"):
        _without_dedup(used, train, only_leaks)
    # a test set of another collection keeps its images: leak ids name this collection's
    kept, _, record = without_duplicates(used, train, {"other": ("elsewhere", only_leaks)},
                                         "small")
    assert record["test_dropped"] == {"other": 0} and kept.num_rows < train.num_rows
