"""Balanced groups under a label-correlated confounder (issue 16): does confounder-aware
selection with ``balance_groups=True`` train a probe that leans less on a shortcut?

The shortcut audit's reversed-correlation design, on PneumoniaMNIST (0 normal, 1 pneumonia):
the "tag" confounder (a burned-in "R", ``medcurate.confounders``) marks 90% of the pneumonia
and 10% of the normal images of train and val, and the reverse on test (10% of pneumonia, 90%
of normal), so a probe that learnt "tag means pneumonia" loses AUC on test. The tagged copy
is written as a MedMNIST-layout npz in the workspace (never in the repository), ingested as
``pneumonia-tagged`` and embedded with mobilenetv2-imagenet (224 px).

Arms: ``confounder-aware`` (per-class groups), the same with ``balance_groups=True`` (groups
found once over both classes, each class's budget split by the archive-wide group shares),
``stratified`` and ``herding``; N images per class from the train split, seeds 0-4. Each
selection trains the linear probe of the selection study's protocol (``fit_head``; early
stopping on the fixed, tagged val split) and is scored by AUC on the reversed test split.
Recorded besides: the tag share among the selected normal and pneumonia images (how strong
the shortcut is in the training set) and, for the balanced arm, the adjusted Rand index
between its groups and the tag (whether the groups found the confounder at all).

    .venv/bin/python bench/balance_groups.py            # 4 arms x N 10, 25, 50 x 5 seeds
    .venv/bin/python bench/balance_groups.py --quick    # 1 seed, N = 10: a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _study import (  # bench/ sibling module; pins numeric threads before numpy loads
    DEFAULT_DATA, RESULTS, comma, ensure_collection, ensure_embedding, fmt, interval, log,
    machine, open_study, paired, single_threaded_numerics)
from selection_study import cache_pure_steps  # each seed's maps are the same at every N

DEFAULT_WORKSPACE = Path(tempfile.gettempdir()) / "medcurate-balance-groups"
DEFAULT_OUT = RESULTS / "balance_groups"
COLLECTION = "pneumonia-tagged"
MODEL = "mobilenetv2-imagenet"
CLASSES = ("0", "1")  # normal, pneumonia (the positive class)
POSITIVE = 1
# Share of each class carrying the tag, (normal, pneumonia), per split: test reverses train.
TAG_SHARES = {"train": (0.1, 0.9), "val": (0.1, 0.9), "test": (0.9, 0.1)}
TAG_SEED = 0
DEFAULT, BALANCED = "confounder-aware", "confounder-aware balanced"
ARMS = {DEFAULT: ("confounder-aware", {}),
        BALANCED: ("confounder-aware", {"balance_groups": True}),
        "stratified": ("stratified", {}),
        "herding": ("herding", {})}
BUDGETS = [10, 25, 50]
SEEDS = [0, 1, 2, 3, 4]
QUICK = {"budgets": [10], "seeds": [0]}
# The selection study's probe protocol (bench/selection_study.py), fixed before any result.
PROTOCOL = {"mode": "linear", "augment": False, "epochs": 100, "patience": 10, "lr": 1e-3,
            "weight_decay": 1e-4, "batch_size": 32}


# -- the tagged archive ---------------------------------------------------------------------------
def tag_flags(labels, shares: tuple[float, float], rng):
    """Exactly round(share x class size) images of each class tagged, drawn with ``rng``: a
    fixed count, not a coin per image, so the correlation is the same in every split."""
    import numpy as np

    flags = np.zeros(len(labels), dtype=bool)
    for label, share in enumerate(shares):
        rows = np.flatnonzero(labels == label)
        flags[rng.choice(rows, size=round(share * len(rows)), replace=False)] = True
    return flags


def tagged_arrays(source: Path) -> dict:
    """The MedMNIST arrays of ``source`` with the tag burned into the flagged images, plus
    ``<split>_tagged`` (the flags; the npz reader ignores members not named ``*_images`` or
    ``*_labels``, so the flags travel with the images they describe)."""
    import numpy as np

    from medcurate.confounders import apply_confounder

    data = np.load(source)
    rng = np.random.default_rng(TAG_SEED)
    arrays = {}
    for split, shares in TAG_SHARES.items():
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
        flags = tag_flags(labels[:, 0], shares, rng)
        tagged = [apply_confounder("tag", image / 255.0, confounded=bool(flag), seed=TAG_SEED)
                  for image, flag in zip(images, flags)]
        arrays[f"{split}_images"] = np.round(np.stack(tagged) * 255).astype(np.uint8)
        arrays[f"{split}_labels"] = labels
        arrays[f"{split}_tagged"] = flags
    return arrays


def ensure_archive(source: Path, path: Path) -> Path:
    """Write the tagged npz once; a later run checks that the file holds the same arrays (a
    rewrite would change the zip's timestamps, and an ingested collection points at it)."""
    import numpy as np

    arrays = tagged_arrays(source)
    if path.is_file():
        with np.load(path) as old:
            if set(old.files) != set(arrays) or any(not np.array_equal(old[k], v)
                                                    for k, v in arrays.items()):
                sys.exit(f"error: {path} holds another tagged archive; use another --workspace")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    log(f"wrote the tagged archive {path}")
    return path


# -- data --------------------------------------------------------------------------------------
def load_splits(workspace, run_id: str, archive: Path) -> dict:
    """Per split: embeddings ``x``, class index ``y`` and the tag flag ``tag``, joined to the
    npz through the manifest's ``member`` (``<split>/<index>``)."""
    import numpy as np

    from medcurate.embed import load_embeddings
    from medcurate.ingest import read_manifest

    rows, X = load_embeddings(workspace, run_id)
    manifest = read_manifest(workspace, COLLECTION, columns=["id", "member"])
    member = dict(zip(manifest.column("id").to_pylist(), manifest.column("member").to_pylist()))
    with np.load(archive) as data:
        flags = {split: data[f"{split}_tagged"] for split in TAG_SHARES}
    tags = []
    for row_id in rows.column("id").to_pylist():
        split, index = member[row_id].split("/")
        tags.append(flags[split][int(index)])
    labels = np.array([CLASSES.index(v) for v in rows.column("label").to_pylist()])
    splits, tags = np.array(rows.column("split").to_pylist()), np.array(tags)
    return {s: {"x": X[splits == s], "y": labels[splits == s], "tag": tags[splits == s]}
            for s in TAG_SHARES}


def tag_facts(data: dict) -> dict:
    """Images and tag share per split and class: proof that the archive is built as designed."""
    return {split: {CLASSES[c]: {"images": int((part["y"] == c).sum()),
                                 "tag_share": round(float(part["tag"][part["y"] == c].mean()), 4)}
                    for c in range(len(CLASSES))} for split, part in data.items()}


# -- one run ------------------------------------------------------------------------------------
def run_once(arm: str, budget: int, seed: int, data: dict, training) -> dict:
    """Select from train, train the probe, score AUC on the reversed test; with the tag share
    of the selection per class and, where one grouping covers every row, its ARI with the tag."""
    import numpy as np
    from sklearn.metrics import adjusted_rand_score

    from medcurate.select import select
    from medcurate.train.evaluation import classification_metrics
    from medcurate.train.finetune import fit_head

    train, val, test = data["train"], data["val"], data["test"]
    strategy, params = ARMS[arm]
    start = time.perf_counter()
    result = select(strategy, train["x"], train["y"], budget, seed=seed, **params)
    select_s = time.perf_counter() - start
    chosen = result.indices
    fit = fit_head({"train": (train["x"][chosen], train["y"][chosen]),
                    "val": (val["x"], val["y"])}, len(CLASSES), training, seed,
                   {"test": test["x"]})
    auc = classification_metrics(test["y"], fit.predictions["test"], ["auc"], POSITIVE)["auc"]
    picked_y, picked_tag = train["y"][chosen], train["tag"][chosen]
    record = {"arm": arm, "budget": budget, "seed": seed, "auc": auc,
              "select_s": round(select_s, 2), "epochs": len(fit.history)}
    for c, name in enumerate(("normal", "pneumonia")):
        record[f"tag_share_{name}"] = float(picked_tag[picked_y == c].mean())
    if params.get("balance_groups"):
        record["groups"] = int(len(np.unique(result.point_groups)))
        record["group_tag_ari"] = float(adjusted_rand_score(train["tag"], result.point_groups))
    return record


# -- summary ------------------------------------------------------------------------------------
def by_seed(records: list[dict], arm: str, budget: int, key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in records if r["arm"] == arm and r["budget"] == budget
            and r.get(key) is not None}


def summarise(records: list[dict], budgets: list[int]) -> dict:
    """Per N: each arm's AUC interval and mean tag shares, the balanced arm's paired
    differences and its groups' ARI with the tag."""
    out = {}
    for budget in budgets:
        arms = {}
        for arm in ARMS:
            arms[arm] = {key: interval(list(by_seed(records, arm, budget, key).values()))
                         for key in ("auc", "tag_share_normal", "tag_share_pneumonia")}
        auc = {arm: by_seed(records, arm, budget, "auc") for arm in ARMS}
        out[str(budget)] = {
            "arms": arms,
            "balanced_minus_default": paired(auc[BALANCED], auc[DEFAULT]),
            "balanced_minus_stratified": paired(auc[BALANCED], auc["stratified"]),
            "group_tag_ari": interval(list(by_seed(records, BALANCED, budget,
                                                   "group_tag_ari").values()))}
    return out


def call(diff: dict | None) -> str:
    """One paired interval read plainly: above zero, below zero, or spanning it."""
    if diff is None:
        return "inconclusive"
    return "helps" if diff["low"] > 0 else "hurts" if diff["high"] < 0 else "inconclusive"


def verdict(summary: dict) -> dict:
    """Against the default arm, per N: "helps" where the paired 95% interval of balanced −
    default lies above zero, "hurts" below it. Overall: helps if it helps at some N and hurts
    at none, does not help if it hurts at some N and helps at none, else inconclusive."""
    calls = {n: call(entry["balanced_minus_default"]) for n, entry in summary.items()}
    helps, hurts = "helps" in calls.values(), "hurts" in calls.values()
    overall = ("helps" if helps and not hurts else "does not help" if hurts and not helps
               else "inconclusive")
    versus_stratified = {n: call(entry["balanced_minus_stratified"])
                         for n, entry in summary.items()}
    return {"overall": overall, "per_budget": calls, "versus_stratified": versus_stratified}


# -- outputs ------------------------------------------------------------------------------------
def diff_cell(diff: dict | None) -> str:
    if diff is None:
        return "n/a (one seed)"
    return f"{diff['diff']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}]"


def share_cell(entry: dict) -> str:
    return "n/a" if entry["mean"] is None else f"{entry['mean']:.2f}"


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} s"


def write_markdown(report: dict, path: Path) -> None:
    budgets = list(report["summary"])
    heads = " | ".join(f"N = {n}" for n in budgets)
    rule = "| --- |" + " --- |" * len(budgets)
    facts = report["data"]
    parts = ["# Balanced groups under a label-correlated confounder (issue 16)", "",
             f"Command: `{report['command']}`", "",
             "Design: PneumoniaMNIST with the shortcut audit's `tag` confounder burned in at "
             "28 px: train and val tag "
             f"{facts['train']['1']['tag_share']:.0%} of pneumonia and "
             f"{facts['train']['0']['tag_share']:.0%} of normal images; test reverses it "
             f"({facts['test']['1']['tag_share']:.0%} of pneumonia, "
             f"{facts['test']['0']['tag_share']:.0%} of normal). Embeddings: {report['model']} "
             f"(224 px). N images per class selected from the train split "
             f"({facts['train']['0']['images']} normal, {facts['train']['1']['images']} "
             "pneumonia); a linear probe (dropout 0.5 + linear head, AdamW lr 1e-3, weight "
             "decay 1e-4, batch 32, at most 100 epochs, patience 10) with early stopping on the "
             f"tagged val split; AUC on the reversed test split "
             f"({facts['test']['0']['images'] + facts['test']['1']['images']} images). Seeds "
             f"{report['seeds']}; cells: mean ± half-width of the 95% t-interval over seeds.",
             "", "Test AUC (reversed tag):", "", f"| arm | {heads} |", rule]
    summary = report["summary"]
    for arm in ARMS:
        parts.append(f"| {arm} | " + " | ".join(fmt(summary[n]["arms"][arm]["auc"])
                                                for n in budgets) + " |")
    parts += ["", "Paired differences by seed (mean [95% interval]):", "",
              f"| contrast | {heads} |", rule,
              "| balanced − default | " + " | ".join(
                  diff_cell(summary[n]["balanced_minus_default"]) for n in budgets) + " |",
              "| balanced − stratified | " + " | ".join(
                  diff_cell(summary[n]["balanced_minus_stratified"]) for n in budgets) + " |",
              "", "Tag share among the selected images, normal / pneumonia (the shortcut in the "
              "training set; equal shares mean the tag carries no label information):", "",
              f"| arm | {heads} |", rule]
    for arm in ARMS:
        parts.append(f"| {arm} | " + " | ".join(
            f"{share_cell(summary[n]['arms'][arm]['tag_share_normal'])} / "
            f"{share_cell(summary[n]['arms'][arm]['tag_share_pneumonia'])}"
            for n in budgets) + " |")
    ari = summary[budgets[0]]["group_tag_ari"]
    groups = sorted({r["groups"] for r in report["records"] if "groups" in r})
    parts += ["", f"Balanced arm's groups (one map over both classes per seed, the same at "
              f"every N): "
              f"{', '.join(map(str, groups))} groups; adjusted Rand index with the tag flag "
              f"{fmt(ari)} (1: the groups are the tag; 0: unrelated).", ""]
    decided, timing = report["verdict"], report["timing"]
    parts += [f"Verdict: **{decided['overall']}**. Balanced − default per N: "
              + ", ".join(f"N = {n} {c}" for n, c in decided["per_budget"].items())
              + "; balanced − stratified: "
              + ", ".join(f"N = {n} {c}" for n, c in decided["versus_stratified"].items())
              + " (helps / hurts: the paired 95% interval lies above / below zero).", "",
              f"Runtime: {timing['this_invocation_s'] / 60:.1f} min for this invocation "
              f"(ingest {seconds(timing['ingest_s'])} and embedding "
              f"{seconds(timing['embed_s'])} when first computed) on {report['machine']}.",
              ""]
    path.write_text("\n".join(parts))


# -- main ---------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="folder of the shared data sets (default ../shared/data)")
    parser.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE,
                        help=f"medcurate workspace; the tagged archive, collection and "
                             f"embeddings in it are reused (default {DEFAULT_WORKSPACE})")
    parser.add_argument("--budgets", type=comma(int), default=None,
                        help=f"images per class (default {BUDGETS})")
    parser.add_argument("--seeds", type=comma(int), default=None,
                        help=f"seeds of selection and training (default {SEEDS})")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: N = 10, seed 0 (unless given); results go to the "
                             "workspace, not docs/results")
    parser.add_argument("--out", type=Path, default=None,
                        help="output prefix (default docs/results/balance_groups; with "
                             "--quick <workspace>/results/balance_groups_quick)")
    args = parser.parse_args()
    if args.quick:
        args.budgets = args.budgets or QUICK["budgets"]
        args.seeds = args.seeds or QUICK["seeds"]
    args.budgets, args.seeds = args.budgets or BUDGETS, args.seeds or SEEDS
    args.out = args.out or (args.workspace / "results" / "balance_groups_quick" if args.quick
                            else DEFAULT_OUT)
    return args


def main() -> None:
    args = parse_args()
    source = args.data / "pneumoniamnist" / "pneumoniamnist.npz"
    if not source.is_file():
        sys.exit(f"error: {source} is missing; this study needs PneumoniaMNIST from "
                 "../shared/data (see its README) or --data FOLDER")
    started = time.perf_counter()
    single_threaded_numerics()
    cache_pure_steps()
    from medcurate.config import IngestConfig, TrainingConfig

    workspace, inputs, timings = open_study(args.workspace)
    archive = ensure_archive(source, inputs / f"{COLLECTION}.npz")
    ingested = ensure_collection(IngestConfig(source=str(archive), name=COLLECTION,
                                              format="npz"), workspace, timings)
    embedded = ensure_embedding(COLLECTION, workspace, timings, model=MODEL)
    data = load_splits(workspace, embedded["run_id"], archive)
    training = TrainingConfig(**PROTOCOL)
    records = []
    for seed in args.seeds:
        for budget in args.budgets:
            for arm in ARMS:
                records.append(run_once(arm, budget, seed, data, training))
                log(json.dumps(records[-1]))
    summary = summarise(records, args.budgets)
    command = "python bench/balance_groups.py" + "".join(f" {a}" for a in sys.argv[1:])
    report = {"command": command, "model": MODEL, "protocol": PROTOCOL,
              "tag_shares": TAG_SHARES, "tag_seed": TAG_SEED, "budgets": args.budgets,
              "seeds": args.seeds, "arms": {arm: {"strategy": s, "params": p}
                                            for arm, (s, p) in ARMS.items()},
              "data": tag_facts(data), "embedding_run": embedded["run_id"],
              "machine": machine(), "summary": summary, "verdict": verdict(summary),
              "records": records,
              "timing": {"ingest_s": ingested["seconds"], "embed_s": embedded["seconds"],
                         "this_invocation_s": round(time.perf_counter() - started, 1)}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out.with_suffix(".md"))
    log(f"wrote {args.out}.{{json,md}}; verdict: {report['verdict']['overall']}")


if __name__ == "__main__":
    main()
