"""Transferability study (issue 9, part 2): do the transferability scores rank the zoo's
encoders the way training on the target does?

One command regenerates ``docs/results/transfer_study.{json,csv,md,png}``:

1. the zoo of ``bench/_zoo.py`` (ImageNet MobileNetV2 and EfficientNet-Lite0, MAEs pretrained
   here on PneumoniaMNIST and on brain MRI, a random-init MobileNetV2);
2. on each target (BreastMNIST, PneumoniaMNIST, brain-tumour MRI) every metric of
   ``medcurate score`` (probe of 100 training images per class, seed 24, as in the paper);
3. ground truth under one fixed protocol: each encoder's frozen features of a class-stratified
   sample of the target's train split (``GT["train_per_class"]``), a linear probe (dropout 0.5
   + linear head, AdamW, early stopping on a stratified 20% validation share) per seed, test
   AUC on a class-stratified sample of the official test split; mean over seeds;
4. per target, the weighted Kendall tau (hyperbolic weights: the top of the ranking counts
   most) between each metric and the ground truth, the metrics' rank per target and mean rank;
5. the reproduction of the published per-target tau and method ranks of Juodelyte et al. from
   ``../shared/reference/transferability-in-medical-imaging``.

    .venv/bin/python bench/transfer_study.py             # 3 targets x 5 encoders (< 1 h, 2 cores)
    .venv/bin/python bench/transfer_study.py --quick     # 2 targets, 2 seeds, smaller samples
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _study import (  # bench/ sibling module; pins numeric threads before numpy loads
    DEFAULT_DATA, RESULTS, Timings, check_against, check_data, comma, ensure_collection,
    ensure_embedding, ingest_config, log, machine, open_study, single_threaded_numerics,
    write_results)
from _zoo import ensure_zoo

DEFAULT_WORKSPACE = Path(tempfile.gettempdir()) / "medcurate-evidence"
DEFAULT_OUT = RESULTS / "transfer_study"
REFERENCE = DEFAULT_DATA.parent / "reference" / "transferability-in-medical-imaging"
TARGETS = ["breastmnist", "pneumoniamnist", "brain-tumor-mri"]
SCORE = {"per_class": 100, "seed": 24}  # the paper's probe
MIN_MODELS = 3  # a metric's tau on a target needs values for this many models
# Ground truth: sample sizes and the training protocol, fixed before any result was seen.
GT = {"train_per_class": 150, "test_per_class": 100, "sample_seed": 0, "seeds": [0, 1, 2, 3, 4]}
PROTOCOL = {"mode": "linear", "augment": False, "epochs": 100, "patience": 10, "lr": 1e-3,
            "weight_decay": 1e-4, "batch_size": 32, "val_fraction": 0.2, "metrics": ["auc"]}
# The optional full fine-tuning check (--finetune): every layer trains, at 64 px (the MAEs' size;
# the CNNs at 224 px would take hours here), with the paper's augmentation.
FINETUNE = {"mode": "full", "img_size": 64, "augment": True, "epochs": 30, "patience": 5,
            "lr": 1e-4, "weight_decay": 1e-4, "batch_size": 32, "val_fraction": 0.2,
            "metrics": ["auc"], "seeds": [0, 1, 2], "targets": ["breastmnist"]}
QUICK = {"targets": ["breastmnist", "pneumoniamnist"], "seeds": [0, 1], "score_per_class": 30,
         "train_per_class": 60, "test_per_class": 40}


# -- ground truth -------------------------------------------------------------------------------
def ground_truth_sets(target: str, workspace, train_per_class: int, test_per_class: int,
                      seed: int) -> dict[str, str]:
    """Class-stratified samples of the target's train and test splits, published as
    collections (``<target>--gt-train<k>-s<seed>-<hash>``) so each encoder embeds them once."""
    import numpy as np

    from medcurate.ingest import MANIFEST_FILE, read_manifest
    from medcurate.transfer.score import ensure_subset, probe_indices

    manifest = read_manifest(workspace, target)
    sha = workspace.provenance("collections", target)["outputs"][MANIFEST_FILE]["sha256"]
    labels = manifest.column("label").to_pylist()
    splits = np.array(manifest.column("split").to_pylist(), dtype=object)
    names = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        # probe_indices draws from rows marked 'train': mark the wanted split so.
        marked = np.where(splits == split, "train", "other")
        rows = np.sort(probe_indices(labels, marked.tolist(), per_class, seed))
        name = f"{target}--gt-{split}{per_class}-s{seed}-{sha[:8]}"
        names[split] = ensure_subset(workspace, target, manifest, sha, rows, name,
                                     {"subset_of": target, "split": split,
                                      "per_class": per_class, "seed": seed}, seed)
    return names


def ground_truth(entry: dict, sets: dict[str, str], workspace, timings: Timings,
                 seeds: list[int]) -> tuple[dict[int, float], float]:
    """Test AUC of a linear probe on the encoder's frozen features, per seed, and the recorded
    seconds of the embeddings reused from an earlier invocation (to count them as compute)."""
    from medcurate.config import TrainingConfig
    from medcurate.embed import load_embeddings
    from medcurate.train.evaluation import classification_metrics, fold_plan
    from medcurate.train.finetune import classes_of, fit_head, label_targets

    training = TrainingConfig(**PROTOCOL)
    data, reused_s = {}, 0.0
    for split, collection in sets.items():
        run = ensure_embedding(collection, workspace, timings, model=entry["model"])
        reused_s += (run["seconds"] or 0.0) if run["reused"] else 0.0
        data[split] = load_embeddings(workspace, run["run_id"])
    classes, positive = classes_of(data["train"][0], training)
    y = {split: label_targets(rows, classes, split) for split, (rows, _) in data.items()}
    x = {split: matrix for split, (_, matrix) in data.items()}
    aucs = {}
    for seed in seeds:
        train_at, val_at = fold_plan(y["train"], 1, training.val_fraction, seed)[0]
        fit = fit_head({"train": (x["train"][train_at], y["train"][train_at]),
                        "val": (x["train"][val_at], y["train"][val_at])}, len(classes),
                       training, seed, {"test": x["test"]})
        aucs[seed] = classification_metrics(y["test"], fit.predictions["test"], ["auc"],
                                            positive)["auc"]
    return aucs, reused_s


def finetune_truth(entry: dict, sets: dict[str, str], workspace, timings: Timings,
                   seeds: list[int]) -> dict[int, float]:
    """Test AUC after fine-tuning every layer (``medcurate finetune --mode full``), per seed;
    finished runs are reused by name."""
    from medcurate.config import FinetuneConfig
    from medcurate.train.finetune import finetune

    settings = {k: v for k, v in FINETUNE.items() if k not in ("seeds", "targets")}
    aucs = {}
    for seed in seeds:
        config = FinetuneConfig(train=sets["train"], model=entry["model"], test=[sets["test"]],
                                seed=seed, **settings)
        run_id = f"study-ft-{sets['train'][:60]}-{entry['name']}-s{seed}-{config.digest()}"
        if workspace.exists("models", run_id):
            document = json.loads((Path(workspace.require("models", run_id))
                                   / "metrics.json").read_text())
        else:
            log(f"fine-tune {entry['name']} on {sets['train']}, seed {seed}")
            with timings.measure(f"finetune/{run_id}"):
                document = finetune(config.model_copy(update={"run_id": run_id}), workspace)
        aucs[seed] = document["metrics"][sets["test"]]["auc"]["mean"]
    return aucs


# -- evaluation ---------------------------------------------------------------------------------
def wide(values: dict[str, dict[str, float | None]], models: list[str], targets: list[str]):
    """A WideTable (rows models, columns targets) from {target: {model: value}}."""
    import numpy as np

    from medcurate.transfer.evaluate import WideTable

    matrix = np.array([[np.nan if values[t].get(m) is None else values[t][m] for t in targets]
                       for m in models], dtype=float)
    return WideTable(tuple(models), tuple(targets), matrix)


def evaluate(scores: dict[str, dict], truth: dict[str, dict[str, float]], models: list[str],
             targets: list[str]) -> dict:
    """Weighted tau per metric and target, metric ranks per target, mean rank per metric."""
    import numpy as np

    from medcurate.transfer.evaluate import rank_metrics, weighted_tau

    metrics = list(next(iter(scores.values()))["metrics"])
    gt = wide(truth, models, targets)
    taus, covered = {}, {}
    for metric in metrics:
        table = wide({t: {row["model"]: row["values"].get(metric) for row in
                          scores[t]["models"]} for t in targets}, models, targets)
        taus[metric] = weighted_tau(table, gt)
        for t in targets:  # a tau over one or two models says nothing
            if np.isfinite(table.column(t)).sum() < MIN_MODELS:
                taus[metric][t] = float("nan")
        covered[metric] = int(np.isfinite(table.values).all(axis=1).sum())
    ranks = rank_metrics(taus)
    mean_rank = {m: float(np.mean([ranks[t][m] for t in targets])) for m in metrics}
    mean_tau = {m: float(np.nanmean(list(taus[m].values())))
                if np.isfinite(list(taus[m].values())).any() else None for m in metrics}
    return {"tau": {m: {t: (None if not np.isfinite(v) else round(v, 6)) for t, v in
                        taus[m].items()} for m in metrics},
            "rank": ranks, "mean_rank": mean_rank, "mean_tau": mean_tau,
            "models_with_values": covered}


def published(folder: Path) -> dict:
    """The paper's per-target tau and method ranks, recomputed from its published tables."""
    from medcurate.transfer.evaluate import evaluate_published, rank_metrics, read_rank_table

    taus = evaluate_published(folder, "dataset")
    ranks = rank_metrics(taus)
    reference = read_rank_table(folder / "ktau_dataset_rank.csv")
    matches = all(ranks[t][m] == reference[t][m] for t in reference for m in reference[t]
                  if t in ranks and m in ranks[t])
    targets = list(ranks)
    mean_rank = {m: sum(ranks[t][m] for t in targets) / len(targets) for m in taus}
    return {"tau": {m: {t: round(v, 6) for t, v in per.items()} for m, per in taus.items()},
            "rank": ranks, "mean_rank": mean_rank, "matches_published_rank_table": matches}


# -- outputs ------------------------------------------------------------------------------------
def write_markdown(report: dict, path: Path) -> None:
    targets, models = report["targets"], report["models"]
    parts = ["# Transferability study (issue 9, part 2)", "", f"Command: `{report['command']}`",
             "", "Zoo: " + "; ".join(f"`{e['name']}` ({e['source']})" for e in report["zoo"])
             + ".", "",
             f"Scores: `medcurate score` with every metric, probe of {report['score']['per_class']}"
             f" training images per class, seed {report['score']['seed']}. Ground truth: a "
             f"linear probe on each encoder's frozen features of up to "
             f"{report['ground_truth']['train_per_class']} training images per class (20% of "
             f"them for early stopping), tested on up to "
             f"{report['ground_truth']['test_per_class']} test images per class; AUC (one-vs-"
             f"rest mean for several classes), mean ± 95% interval over seeds "
             f"{report['ground_truth']['seeds']}.", "", "## Ground truth: test AUC", "",
             "| model | " + " | ".join(targets) + " |", "| --- |" + " --- |" * len(targets)]
    for model in models:
        cells = []
        for t in targets:
            entry = report["truth"][t][model]
            cells.append(f"{entry['mean']:.3f} ± {(entry['high'] - entry['low']) / 2:.3f}"
                         if entry["low"] is not None else f"{entry['mean']:.3f}")
        parts.append(f"| {model} | " + " | ".join(cells) + " |")
    ev = report["evaluation"]
    order = sorted(ev["mean_rank"], key=ev["mean_rank"].get)
    parts += ["", "## Weighted Kendall tau of each metric with the ground truth", "",
              f"{len(models)} models per target; n/a where a metric scores every model alike or "
              f"has values for fewer than {MIN_MODELS} models (LEEP and NCE need a source "
              "classifier head, which only the two ImageNet models have); `models` = "
              "how many models the metric scores on every target. Mean tau over the targets "
              "with a value; metrics ordered by mean rank (n/a ranks last).", "",
              "| metric | " + " | ".join(targets) + " | mean tau | mean rank | models |",
              "| --- |" + " --- |" * (len(targets) + 3)]
    for metric in order:
        taus = [ev["tau"][metric][t] for t in targets]
        cells = ["n/a" if v is None else f"{v:+.3f}" for v in taus]
        mean_tau = ev["mean_tau"][metric]
        parts.append(f"| {metric} | " + " | ".join(cells) + f" | "
                     f"{'n/a' if mean_tau is None else f'{mean_tau:+.3f}'} | "
                     f"{ev['mean_rank'][metric]:.2f} | {ev['models_with_values'][metric]} |")
    parts += ["", "## Rankings per target", ""]
    for t in targets:
        truth = sorted(models, key=lambda m: -report["truth"][t][m]["mean"])
        parts.append(f"- {t}: ground truth {' > '.join(truth)}; paper score "
                     f"{' > '.join(report['scores'][t]['ranking'])}")
    pub = report["published"]
    targets_pub = list(pub["rank"])
    parts += ["", "## Published table reproduced (Juodelyte et al., dataset level)", "",
              "Weighted tau per target recomputed from the published score and AUC tables; "
              f"the method ranks "
              f"{'match' if pub['matches_published_rank_table'] else 'DO NOT match'}"
              " the published `ktau_dataset_rank.csv`.", "",
              "| method | " + " | ".join(targets_pub) + " | mean rank |",
              "| --- |" + " --- |" * (len(targets_pub) + 1)]
    for metric in sorted(pub["mean_rank"], key=pub["mean_rank"].get):
        parts.append(f"| {metric} | " + " | ".join(
            f"{pub['tau'][metric][t]:+.3f}" if pub['tau'][metric][t] == pub['tau'][metric][t]
            else "n/a" for t in targets_pub)
                     + f" | {pub['mean_rank'][metric]:.2f} |")
    if "reproducibility" in report:
        check = report["reproducibility"]
        parts += ["", f"Reproducibility: {check['identical']} of {check['cells']} values "
                  f"identical to {check['against']} (max |diff| {check['max_abs_diff']:.3g})."]
    parts += ["", f"Runtime: {report['timing']['total_compute_s'] / 60:.1f} min of compute on "
              f"{report['machine']}.", ""]
    path.write_text("\n".join(parts))


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    targets, models = report["targets"], report["models"]
    fig, axes = plt.subplots(1, len(targets) + 1, figsize=(4 * (len(targets) + 1), 3.8))
    colours = plt.get_cmap("tab10")
    for ax, t in zip(axes, targets):
        values = {row["model"]: row["values"].get("score") for row in report["scores"][t]["models"]}
        for index, model in enumerate(models):
            truth = report["truth"][t][model]
            if values.get(model) is None:
                continue
            ax.errorbar(values[model], truth["mean"],
                        yerr=None if truth["low"] is None else [[truth["mean"] - truth["low"]],
                                                                 [truth["high"] - truth["mean"]]],
                        fmt="o", color=colours(index), label=model, capsize=2)
        tau = report["evaluation"]["tau"]["score"][t]
        ax.set(title=f"{t} (weighted tau {tau:+.2f})" if tau is not None else t,
               xlabel="paper score minmax(LP)·minmax(FU)", ylabel="ground-truth test AUC")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ev = report["evaluation"]
    order = sorted(ev["mean_rank"], key=ev["mean_rank"].get)
    matrix = np.array([[np.nan if ev["tau"][m][t] is None else ev["tau"][m][t] for t in targets]
                       for m in order])
    image = axes[-1].imshow(matrix, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    axes[-1].set_xticks(range(len(targets)), targets, rotation=20, fontsize=7)
    axes[-1].set_yticks(range(len(order)), order, fontsize=7)
    axes[-1].set_title("weighted tau (metrics by mean rank)")
    fig.colorbar(image, ax=axes[-1])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_finetune(report: dict, finetuned: dict, rows: list[dict], prefix: Path) -> None:
    """The fine-tuning check: per target, fine-tuned AUC per model, how its ranking agrees with
    the linear-probe ground truth, and each metric's weighted tau against it."""
    from scipy import stats

    models = report["models"]
    check = {"command": report["command"], "protocol": FINETUNE, "targets": {}}
    parts = ["# Transferability study: full fine-tuning check", "",
             f"Command: `{report['command']}`", "",
             f"Every layer fine-tuned (`medcurate finetune --mode full`) at "
             f"{FINETUNE['img_size']} px with augmentation, AdamW lr {FINETUNE['lr']:g}, at most "
             f"{FINETUNE['epochs']} epochs (patience {FINETUNE['patience']}), seeds "
             f"{FINETUNE['seeds']}, on the same training and test samples as the linear-probe "
             "ground truth.", ""]
    for target, per_model in finetuned.items():
        probe = [report["truth"][target][m]["mean"] for m in models]
        tuned = [per_model[m]["mean"] for m in models]
        agreement = float(stats.kendalltau(probe, tuned).statistic)
        taus = evaluate(report["scores"], {target: dict(zip(models, tuned))}, models,
                        [target])["tau"]
        check["targets"][target] = {"fine_tuned": per_model, "kendall_tau_vs_probe": agreement,
                                    "metric_tau": {m: v[target] for m, v in taus.items()}}
        parts += [f"## {target}", "", "| model | linear probe AUC | fine-tuned AUC |",
                  "| --- | --- | --- |"]
        for m, a, b in zip(models, probe, tuned):
            e = per_model[m]
            half = "" if e["low"] is None else f" ± {(e['high'] - e['low']) / 2:.3f}"
            parts.append(f"| {m} | {a:.3f} | {b:.3f}{half} |")
        ordered = sorted(taus, key=lambda m: -(taus[m][target] if taus[m][target] is not None
                                               else -9))
        parts += ["", f"Kendall tau between the two ground truths' model rankings: "
                  f"{agreement:+.2f}.", "", "Weighted tau of each metric against the fine-tuned "
                  "ranking: " + ", ".join(
                      f"{m} {'n/a' if taus[m][target] is None else f'{taus[m][target]:+.2f}'}"
                      for m in ordered) + ".", ""]
    prefix.with_suffix(".json").write_text(json.dumps(check, indent=2) + "\n")
    prefix.with_suffix(".md").write_text("\n".join(parts))


# -- main ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--reference", type=Path, default=REFERENCE,
                        help="folder of the paper's published tables")
    parser.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE,
                        help=f"medcurate workspace; finished artefacts are reused "
                             f"(default {DEFAULT_WORKSPACE}, shared with robustness_study.py)")
    parser.add_argument("--targets", type=comma(str), default=None,
                        help=f"comma list (default {','.join(TARGETS)})")
    parser.add_argument("--seeds", type=comma(int), default=None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: BreastMNIST and PneumoniaMNIST, 2 seeds, small "
                             "samples, quick zoo; results go to the workspace")
    parser.add_argument("--recompute", action="store_true",
                        help="recompute the scores (embeddings and models are reused)")
    parser.add_argument("--finetune", action="store_true",
                        help=f"also fine-tune every layer on {', '.join(FINETUNE['targets'])} "
                             f"(seeds {FINETUNE['seeds']}) and compare with the linear-probe "
                             "ground truth; writes <out>_finetune.{json,md} (~30 min more)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gt = dict(GT)
    score_per_class = SCORE["per_class"]
    if args.quick:
        args.targets = args.targets or QUICK["targets"]
        args.seeds = args.seeds or QUICK["seeds"]
        gt.update(train_per_class=QUICK["train_per_class"],
                  test_per_class=QUICK["test_per_class"])
        score_per_class = QUICK["score_per_class"]
    targets = args.targets or TARGETS
    gt["seeds"] = args.seeds or gt["seeds"]
    check_data(sorted(set(targets) | {"pneumoniamnist", "brain-tumor-mri"}), args.data)
    if not (args.reference / "AUCs_dataset.csv").is_file():
        sys.exit(f"error: the published tables are missing under {args.reference}")
    prefix = args.out or (args.workspace / "results" / "transfer_study_quick" if args.quick
                          else DEFAULT_OUT)

    started = time.perf_counter()
    single_threaded_numerics()
    from medcurate.config import ScoreConfig
    from medcurate.train.evaluation import mean_interval
    from medcurate.transfer.score import score

    workspace, inputs, timings = open_study(args.workspace)
    zoo_path, zoo = ensure_zoo(workspace, args.data, timings, quick=args.quick)
    models = [e["name"] for e in zoo]
    compute = sum(e.get("pretrain_s") or 0.0 for e in zoo)
    scores, truth, rows = {}, {}, []
    for target in targets:
        log(f"== {target}")
        collection = ensure_collection(ingest_config(target, args.data, inputs), workspace,
                                       timings)
        compute += collection["seconds"] or 0.0
        config = ScoreConfig(target=target, zoo=str(zoo_path), per_class=score_per_class,
                             seed=SCORE["seed"], overwrite=args.recompute)
        key = f"score/{target}/{config.digest('zoo', 'overwrite')}"
        start = time.perf_counter()
        scores[target] = score(config, workspace)
        if not scores[target]["reused"]:
            timings.record(key, time.perf_counter() - start)
        compute += timings.get(key) or 0.0
        log(f"{target}: paper score ranks {', '.join(scores[target]['ranking'])}")
        for row in scores[target]["models"]:
            rows += [{"target": target, "model": row["model"], "kind": "score", "metric": m,
                      "seed": "", "value": v} for m, v in row["values"].items()]
        sets = ground_truth_sets(target, workspace, gt["train_per_class"], gt["test_per_class"],
                                 gt["sample_seed"])
        truth[target] = {}
        for entry in zoo:
            start = time.perf_counter()
            aucs, reused_s = ground_truth(entry, sets, workspace, timings, gt["seeds"])
            compute += time.perf_counter() - start + reused_s
            truth[target][entry["name"]] = mean_interval(list(aucs.values()))
            rows += [{"target": target, "model": entry["name"], "kind": "ground-truth",
                      "metric": "auc", "seed": s, "value": v} for s, v in aucs.items()]
        log(f"{target}: ground truth " + ", ".join(
            f"{m} {truth[target][m]['mean']:.3f}" for m in models))
    finetuned = {}
    for target in FINETUNE["targets"] if args.finetune else []:
        sets = ground_truth_sets(target, workspace, gt["train_per_class"], gt["test_per_class"],
                                 gt["sample_seed"])
        finetuned[target] = {}
        for entry in zoo:
            start = time.perf_counter()
            aucs = finetune_truth(entry, sets, workspace, timings, FINETUNE["seeds"])
            compute += time.perf_counter() - start
            finetuned[target][entry["name"]] = mean_interval(list(aucs.values()))
            rows += [{"target": target, "model": entry["name"], "kind": "fine-tuned",
                      "metric": "auc", "seed": s, "value": v} for s, v in aucs.items()]
    report = {"command": "python bench/transfer_study.py" + "".join(f" {a}" for a in sys.argv[1:]),
              "zoo": zoo, "models": models, "targets": targets, "machine": machine(),
              "score": {"per_class": score_per_class, "seed": SCORE["seed"]},
              "ground_truth": {**gt, "protocol": PROTOCOL}, "truth": truth,
              "scores": {t: {"ranking": d["ranking"], "metrics": d["metrics"],
                             "models": [{"model": r["model"], "values": r["values"],
                                         "notes": r["notes"]} for r in d["models"]]}
                         for t, d in scores.items()},
              "timing": {}}
    report["evaluation"] = evaluate(report["scores"], {t: {m: v["mean"] for m, v in
                                                           truth[t].items()} for t in targets},
                                    models, targets)
    report["published"] = published(args.reference)
    report["timing"] = {"total_compute_s": round(compute, 1),
                        "this_invocation_s": round(time.perf_counter() - started, 1)}
    if args.quick or args.recompute:
        check = check_against([r for r in rows if r["kind"] != "fine-tuned"],
                              DEFAULT_OUT.with_suffix(".csv"),
                              ["target", "model", "kind", "metric", "seed"])
        if check and prefix != DEFAULT_OUT:
            report["reproducibility"] = check
            log(f"reproducibility against {check['against']}: {check['identical']} of "
                f"{check['cells']} values identical, max |diff| {check['max_abs_diff']:.3g}")
    main_rows = [r for r in rows if r["kind"] != "fine-tuned"]
    write_results(prefix, report, main_rows, ["target", "model", "kind", "metric", "seed",
                                              "value"], write_markdown, write_plot)
    if finetuned:
        write_finetune(report, finetuned, rows, Path(f"{prefix}_finetune"))
    best = sorted(report["evaluation"]["mean_rank"], key=report["evaluation"]["mean_rank"].get)
    log(f"metrics by mean rank: {', '.join(best)}; wrote {prefix}.{{json,csv,md,png}}; "
        f"compute {compute / 60:.1f} min")


if __name__ == "__main__":
    main()
