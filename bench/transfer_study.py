"""Transferability study (issues 9 and 18): do the transferability scores rank a zoo's
encoders the way fine-tuning on the target does?

One command regenerates ``docs/results/transfer_study.{json,csv,md,png}``, for two settings:

- **one-architecture** (the paper's dataset-level setting): MobileNetV2 whose sources differ
  only in data: its ImageNet weights, and those weights fine-tuned on a sample of each shared
  collection (brain MRI, HAM10000, PneumoniaMNIST, BreastMNIST), each a ``model:<run>``
  encoder (``bench/_zoo.py``);
- **mixed**: today's zoo of two ImageNet CNNs, two MAEs pretrained here and a random init.

On each target (BreastMNIST, PneumoniaMNIST, brain-tumour MRI):

1. every metric of ``medcurate score`` and FU's relative variant (probe of 100 training images
   per class, seed 24, as in the paper); a model trained on the target is left out by provenance (``score``
   records it under ``excluded``), in scoring and in the ground truth alike;
2. two ground truths on the same class-stratified samples of the target (train split; test
   split less any image whose content a training image repeats):
   - **fine-tuned**: every layer trained (``medcurate finetune --mode full``, one protocol for
     every source and target: ``_zoo.FINETUNE``), seeds ``GT["seeds"]``;
   - **linear probe**: a linear head on the encoder's frozen features, the same seeds;
3. per metric and target, the weighted Kendall tau (hyperbolic weights: the top of the
   ranking counts most) against each ground truth, with a 95% bootstrap interval over test
   images and training seeds (``medcurate.transfer.evaluate.bootstrap_tau``); the mean over
   targets with its interval, and each metric's paired difference from the best one;
4. the reproduction of the published per-target tau and method ranks of Juodelyte et al. from
   ``../shared/reference/transferability-in-medical-imaging``.

Fine-tuning runs two at a time (each on one thread). Every artefact is reused from the
workspace on a re-run.

    .venv/bin/python bench/transfer_study.py             # both settings, 3 targets (< 2 h, 2 cores)
    .venv/bin/python bench/transfer_study.py --quick     # smoke run: 2 targets, small samples
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _study import (  # bench/ sibling module; pins numeric threads before numpy loads
    DEFAULT_DATA, RESULTS, Timings, check_against, check_data, comma, ensure_collection,
    ensure_embedding, ensure_finetuned, ingest_config, log, machine, open_study,
    single_threaded_numerics, split_samples, write_results)
from _zoo import ensure_source_zoo, ensure_zoo, finetune_config, finetune_protocol

DEFAULT_WORKSPACE = Path(tempfile.gettempdir()) / "medcurate-evidence"
DEFAULT_OUT = RESULTS / "transfer_study"
REFERENCE = DEFAULT_DATA.parent / "reference" / "transferability-in-medical-imaging"
SETTINGS = ["one-architecture", "mixed"]
TARGETS = ["breastmnist", "pneumoniamnist", "brain-tumor-mri"]
SCORE = {"per_class": 100, "seed": 24}  # the paper's probe
# Every metric at its default, and FU's architecture-free variant (issue 18) beside the paper's.
METRICS = ["all", "fu:relative"]
MIN_MODELS = 3  # a metric's tau on a target needs values for this many models
# Ground truth: sample sizes, seeds and the linear probe's protocol, fixed before any result
# was seen (the fine-tuning protocol is _zoo.FINETUNE).
GT = {"train_per_class": 100, "test_per_class": 100, "sample_seed": 0, "seeds": [0, 1, 2]}
PROBE = {"mode": "linear", "augment": False, "epochs": 100, "patience": 10, "lr": 1e-3,
         "weight_decay": 1e-4, "batch_size": 32, "val_fraction": 0.2, "metrics": ["auc"]}
BOOTSTRAP = {"replicates": 1000, "seed": 0}
GROUND_TRUTHS = ["fine-tuned", "linear"]
CONCURRENT_FITS = 2
QUICK = {"targets": ["breastmnist", "pneumoniamnist"], "seeds": [0, 1], "score_per_class": 30,
         "train_per_class": 30, "test_per_class": 40, "replicates": 200}


# -- ground truth -------------------------------------------------------------------------------
class TestSet:
    """A target's test sample: its labels as class indices, the row order every model's
    probabilities are put in, and the positive class of binary AUC."""

    def __init__(self, workspace, collection: str):
        from medcurate.config import TrainingConfig
        from medcurate.ingest import read_manifest
        from medcurate.train.finetune import classes_of, label_targets

        manifest = read_manifest(workspace, collection, columns=["id", "label"])
        self.ids = manifest.column("id").to_pylist()
        self.classes, self.positive = classes_of(manifest, TrainingConfig(**PROBE))
        self.y = label_targets(manifest, self.classes, collection)

    def align(self, ids: list, probs):
        """``probs`` (rows in ``ids`` order) in this test set's row order."""
        at = {i: n for n, i in enumerate(ids)}
        return probs[[at[i] for i in self.ids]]


def linear_truth(model: str, sets: dict[str, str], test: TestSet, workspace,
                 timings: Timings, seeds: list[int]) -> dict:
    """Test probabilities of a linear probe on the encoder's frozen features, per seed."""
    from medcurate.config import TrainingConfig
    from medcurate.embed import load_embeddings
    from medcurate.train.evaluation import fold_plan
    from medcurate.train.finetune import classes_of, fit_head, label_targets

    training = TrainingConfig(**PROBE)
    data = {split: load_embeddings(workspace, ensure_embedding(collection, workspace, timings,
                                                               model=model)["run_id"])
            for split, collection in sets.items()}
    classes, _ = classes_of(data["train"][0], training)
    y = {split: label_targets(rows, classes, split) for split, (rows, _) in data.items()}
    x = {split: matrix for split, (_, matrix) in data.items()}
    probs = {}
    for seed in seeds:
        train_at, val_at = fold_plan(y["train"], 1, training.val_fraction, seed)[0]
        fit = fit_head({"train": (x["train"][train_at], y["train"][train_at]),
                        "val": (x["train"][val_at], y["train"][val_at])}, len(classes),
                       training, seed, {"test": x["test"]})
        probs[seed] = test.align(data["test"][0].column("id").to_pylist(),
                                 fit.predictions["test"])
    return probs


def finetuned_probs(config, test: TestSet, workspace):
    """Test probabilities of a finished fine-tuning run, in the test set's row order."""
    import numpy as np

    from medcurate.train.finetune import PREDICTIONS_FILE

    table = workspace.read_table(workspace.path("models", config.run_id, PREDICTIONS_FILE))
    table = table.filter(table.column("test_set").to_numpy(zero_copy_only=False)
                         == config.test[0])
    probs = np.stack([table.column(f"p_{c}").to_numpy() for c in test.classes], axis=1)
    return test.align(table.column("id").to_pylist(), probs)


def fine_tune_all(jobs: list, workspace, timings: Timings) -> None:
    """Every fine-tuning run of ``jobs`` (FinetuneConfigs), two at a time, each reused when
    the workspace has it."""
    unique = list({config.run_id: config for config in jobs}.values())
    with ThreadPoolExecutor(CONCURRENT_FITS) as pool:
        list(pool.map(lambda config: ensure_finetuned(config, workspace, timings), unique))


# -- evaluation ---------------------------------------------------------------------------------
def evaluate(scores: dict, probs: dict, tests: dict[str, TestSet], targets: list[str],
             bootstrap: dict) -> dict:
    """Per metric: weighted tau against one ground truth on each target with its bootstrap
    interval, the mean over targets (interval from the same draws), the mean's paired
    difference from the best metric's, and ranks."""
    import numpy as np

    from medcurate.transfer.evaluate import BootstrapTau, bootstrap_tau

    metrics = list(next(iter(scores.values()))["metrics"])
    per_target = {}
    for t in targets:
        models = list(probs[t])
        values = {row["model"]: row["values"] for row in scores[t]["models"]}
        table = {m: np.array([np.nan if values.get(name, {}).get(m) is None
                              else values[name][m] for name in models], dtype=float)
                 for m in metrics}
        for m in metrics:  # a tau over one or two models says nothing
            if np.isfinite(table[m]).sum() < MIN_MODELS:
                table[m][:] = np.nan
        stacked = np.stack([np.stack([probs[t][name][s] for s in sorted(probs[t][name])])
                            for name in models])
        per_target[t] = bootstrap_tau(table, tests[t].y, stacked, tests[t].positive,
                                      bootstrap["replicates"], bootstrap["seed"])

    def summary(point: float, draws) -> dict:
        interval = BootstrapTau(point, draws).interval()
        if not np.isfinite(point) or interval is None:
            return {"tau": None, "low": None, "high": None}
        return {"tau": round(float(point), 6), "low": round(interval[0], 6),
                "high": round(interval[1], 6)}

    out = {"tau": {}, "mean": {}}
    mean_draws = {}
    for m in metrics:
        out["tau"][m] = {t: summary(per_target[t][m].tau, per_target[t][m].draws)
                         for t in targets}
        points = [per_target[t][m].tau for t in targets]
        if all(np.isfinite(points)):  # a mean over fewer targets would not compare
            mean_draws[m] = np.mean([per_target[t][m].draws for t in targets], axis=0)
            out["mean"][m] = summary(float(np.mean(points)), mean_draws[m])
        else:
            out["mean"][m] = summary(np.nan, np.array([]))
    order = sorted(metrics, key=lambda m: -(out["mean"][m]["tau"] if out["mean"][m]["tau"]
                                             is not None else -9))
    best = order[0]
    out["order"], out["best"] = order, best
    out["difference_from_best"] = {
        m: summary(out["mean"][best]["tau"] - out["mean"][m]["tau"],
                   mean_draws[best] - mean_draws[m]) if m in mean_draws else
        summary(np.nan, np.array([])) for m in metrics}
    return out


def seed_aucs(probs: dict, test: TestSet) -> dict[int, float]:
    from medcurate.transfer.evaluate import mean_auc

    return {s: mean_auc(test.y, p, test.positive) for s, p in probs.items()}


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
def _tau_cell(entry: dict) -> str:
    if entry["tau"] is None:
        return "n/a"
    return f"{entry['tau']:+.2f} [{entry['low']:+.2f}, {entry['high']:+.2f}]"


def write_markdown(report: dict, path: Path) -> None:
    targets = report["targets"]
    gt = report["ground_truth"]
    parts = ["# Transferability study (issues 9 and 18)", "", f"Command: `{report['command']}`",
             "", f"Scores: `medcurate score` with every metric, probe of "
             f"{report['score']['per_class']} training images per class, seed "
             f"{report['score']['seed']}. Ground truths, on the same class-stratified samples of "
             f"each target ({gt['train_per_class']} training images per class, 20% of them for "
             f"early stopping; {gt['test_per_class']} test images per class that repeat no "
             f"training image), seeds {gt['seeds']}: **fine-tuned** (every layer, "
             f"{report['finetune']['img_size']} px, augmentation, AdamW lr "
             f"{report['finetune']['lr']:g}, at most {report['finetune']['epochs']} epochs, "
             f"patience {report['finetune']['patience']}) and **linear probe** (a linear head on "
             "the frozen features). Test AUC (one-vs-rest mean for several classes). Weighted "
             "Kendall tau of each metric with each ground truth, 95% bootstrap interval over "
             f"test images and seeds ({report['bootstrap']['replicates']} draws); a model trained "
             "on the target is left out by provenance.", ""]
    for setting in report["settings"]:
        block = report["results"][setting]
        parts += [f"## Setting: {setting}", "", "Zoo: " + "; ".join(
            f"`{e['name']}` ({e['source']})" for e in block["zoo"]) + ".", ""]
        for t in targets:
            if block["excluded"][t]:
                parts.append(f"- on {t}, left out by provenance: "
                             + ", ".join(block["excluded"][t]))
        parts += ["", "### Test AUC (mean ± 95% interval over seeds)", "",
                  "| model | " + " | ".join(f"{t} {kind}" for t in targets
                                           for kind in GROUND_TRUTHS) + " |",
                  "| --- |" + " --- |" * (len(targets) * len(GROUND_TRUTHS))]
        for entry in block["zoo"]:
            cells = []
            for t in targets:
                for kind in GROUND_TRUTHS:
                    value = block["truth"][kind][t].get(entry["name"])
                    cells.append("–" if value is None else
                                 f"{value['mean']:.3f} ± {(value['high'] - value['low']) / 2:.3f}"
                                 if value["low"] is not None else f"{value['mean']:.3f}")
            parts.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
        for kind in GROUND_TRUTHS:
            ev = block["evaluation"][kind]
            parts += ["", f"### Weighted tau against the {kind} ground truth", "",
                      f"Metrics by mean tau over the targets; n/a where a metric scores fewer "
                      f"than {MIN_MODELS} models or all alike; last column: the best metric's "
                      "mean tau minus this one's (paired over the same bootstrap draws).", "",
                      "| metric | " + " | ".join(targets) + " | mean tau | best − this |",
                      "| --- |" + " --- |" * (len(targets) + 2)]
            for metric in ev["order"]:
                parts.append(f"| {metric} | " + " | ".join(
                    _tau_cell(ev["tau"][metric][t]) for t in targets)
                    + f" | {_tau_cell(ev['mean'][metric])} | "
                    f"{'' if metric == ev['best'] else _tau_cell(ev['difference_from_best'][metric])} |")
        parts += ["", "### Rankings per target", ""]
        for t in targets:
            for kind in GROUND_TRUTHS:
                truth = block["truth"][kind][t]
                parts.append(f"- {t}, {kind}: " + " > ".join(
                    sorted(truth, key=lambda m: -truth[m]["mean"])))
            parts.append(f"- {t}, paper score: " + " > ".join(block["scores"][t]["ranking"]))
        parts.append("")
    pub = report["published"]
    targets_pub = list(pub["rank"])
    parts += ["## Published table reproduced (Juodelyte et al., dataset level)", "",
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
    timing = report["timing"]
    parts += ["", f"Runtime: {timing['this_invocation_s'] / 60:.1f} min for this invocation "
              f"({timing['stage_sum_s'] / 60:.1f} min of stage time, fine-tuning two runs at "
              f"a time) on {report['machine']}.", ""]
    path.write_text("\n".join(parts))


def write_plot(report: dict, path: Path) -> None:
    """Mean tau over the targets with its interval, per metric: settings in rows, ground
    truths in columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = report["settings"]
    fig, axes = plt.subplots(len(settings), len(GROUND_TRUTHS), squeeze=False,
                             figsize=(5 * len(GROUND_TRUTHS), 4 * len(settings)))
    for row, setting in enumerate(settings):
        for col, kind in enumerate(GROUND_TRUTHS):
            ev, ax = report["results"][setting]["evaluation"][kind], axes[row][col]
            shown = [m for m in ev["order"] if ev["mean"][m]["tau"] is not None]
            for y, metric in enumerate(shown):
                e = ev["mean"][metric]
                ax.errorbar(e["tau"], y, xerr=[[e["tau"] - e["low"]], [e["high"] - e["tau"]]],
                            fmt="o", color="C3" if metric == "score" else "C0", capsize=2)
            ax.set_yticks(range(len(shown)), shown, fontsize=7)
            ax.invert_yaxis()
            ax.axvline(0, color="grey", lw=0.5)
            ax.set(xlim=(-1, 1), xlabel="mean weighted tau over targets (95% interval)",
                   title=f"{setting}: {kind} ground truth")
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--reference", type=Path, default=REFERENCE,
                        help="folder of the paper's published tables")
    parser.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE,
                        help=f"medcurate workspace; finished artefacts are reused "
                             f"(default {DEFAULT_WORKSPACE}, shared with robustness_study.py)")
    parser.add_argument("--settings", type=comma(str), default=SETTINGS,
                        help=f"comma list of {', '.join(SETTINGS)} (default both)")
    parser.add_argument("--targets", type=comma(str), default=None,
                        help=f"comma list (default {','.join(TARGETS)})")
    parser.add_argument("--seeds", type=comma(int), default=None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: BreastMNIST and PneumoniaMNIST, 2 seeds, small "
                             "samples, short training; results go to the workspace")
    parser.add_argument("--recompute", action="store_true",
                        help="recompute the scores (embeddings and models are reused)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown or not args.settings:
        sys.exit(f"error: --settings takes {', '.join(SETTINGS)}; got {', '.join(unknown)}")
    gt, bootstrap = dict(GT), dict(BOOTSTRAP)
    score_per_class = SCORE["per_class"]
    if args.quick:
        args.targets = args.targets or QUICK["targets"]
        args.seeds = args.seeds or QUICK["seeds"]
        gt.update(train_per_class=QUICK["train_per_class"],
                  test_per_class=QUICK["test_per_class"])
        bootstrap["replicates"] = QUICK["replicates"]
        score_per_class = QUICK["score_per_class"]
    targets = args.targets or TARGETS
    gt["seeds"] = args.seeds or gt["seeds"]
    check_data(sorted(set(targets) | {"pneumoniamnist", "brain-tumor-mri", "breastmnist",
                                      "ham10000-iid"}), args.data)
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
    builders = {"one-architecture": ensure_source_zoo, "mixed": ensure_zoo}
    zoos = {setting: builders[setting](workspace, args.data, timings, quick=args.quick)
            for setting in args.settings}
    stage_s = sum(e.get("pretrain_s") or 0.0 for _, zoo in zoos.values() for e in zoo)
    sets, tests = {}, {}
    for target in targets:
        collection = ensure_collection(ingest_config(target, args.data, inputs), workspace,
                                       timings)
        stage_s += collection["seconds"] or 0.0
        sets[target] = split_samples(workspace, target, {"train": gt["train_per_class"],
                                                         "test": gt["test_per_class"]},
                                     gt["sample_seed"], "gt")
        tests[target] = TestSet(workspace, sets[target]["test"])

    scores, members = {}, {}
    for setting, (zoo_path, zoo) in zoos.items():
        scores[setting], members[setting] = {}, {}
        for target in targets:
            config = ScoreConfig(target=target, zoo=str(zoo_path), per_class=score_per_class,
                                 seed=SCORE["seed"], metrics=METRICS, overwrite=args.recompute)
            key = f"score/{target}/{zoo_path.name}/{config.digest('zoo', 'overwrite')}"
            start = time.perf_counter()
            scores[setting][target] = score(config, workspace)
            if not scores[setting][target]["reused"]:
                timings.record(key, time.perf_counter() - start)
            stage_s += timings.get(key) or 0.0
            excluded = scores[setting][target].get("excluded", {})
            members[setting][target] = [e for e in zoo if e["name"] not in excluded]
            log(f"{setting} / {target}: paper score ranks "
                f"{', '.join(scores[setting][target]['ranking'])}; left out {list(excluded)}")

    runs = {(setting, target, e["name"], seed):
            finetune_config(e["model"], sets[target]["train"], [sets[target]["test"]], seed,
                            args.quick)
            for setting in zoos for target in targets for e in members[setting][target]
            for seed in gt["seeds"]}
    fine_tune_all(list(runs.values()), workspace, timings)
    stage_s += sum(timings.get(f"finetune/{c.run_id}") or 0.0
                   for c in {c.run_id: c for c in runs.values()}.values())

    results, rows = {}, []
    for setting, (zoo_path, zoo) in zoos.items():
        probs = {kind: {t: {} for t in targets} for kind in GROUND_TRUTHS}
        for target in targets:
            for e in members[setting][target]:
                probs["fine-tuned"][target][e["name"]] = {
                    s: finetuned_probs(runs[setting, target, e["name"], s], tests[target],
                                       workspace) for s in gt["seeds"]}
                start = time.perf_counter()
                probs["linear"][target][e["name"]] = linear_truth(
                    e["model"], sets[target], tests[target], workspace, timings, gt["seeds"])
                stage_s += time.perf_counter() - start
        truth = {kind: {t: {} for t in targets} for kind in GROUND_TRUTHS}
        for kind in GROUND_TRUTHS:
            for t in targets:
                for name, per_seed in probs[kind][t].items():
                    aucs = seed_aucs(per_seed, tests[t])
                    truth[kind][t][name] = mean_interval(list(aucs.values()))
                    rows += [{"setting": setting, "target": t, "model": name, "kind": kind,
                              "metric": "auc", "seed": s, "value": v} for s, v in aucs.items()]
        for t in targets:
            for row in scores[setting][t]["models"]:
                rows += [{"setting": setting, "target": t, "model": row["model"],
                          "kind": "score", "metric": m, "seed": "", "value": v}
                         for m, v in row["values"].items()]
        results[setting] = {
            "zoo": zoo, "excluded": {t: sorted(scores[setting][t].get("excluded", {}))
                                     for t in targets},
            "truth": truth,
            "scores": {t: {"ranking": d["ranking"], "metrics": d["metrics"],
                           "models": [{"model": r["model"], "values": r["values"],
                                       "notes": r["notes"]} for r in d["models"]]}
                       for t, d in scores[setting].items()},
            "evaluation": {kind: evaluate(scores[setting], probs[kind], tests, targets,
                                          bootstrap) for kind in GROUND_TRUTHS}}
        for kind in GROUND_TRUTHS:
            ev = results[setting]["evaluation"][kind]
            log(f"{setting}, {kind} ground truth: best {ev['best']} (mean tau "
                f"{_tau_cell(ev['mean'][ev['best']])}); order {', '.join(ev['order'])}")
    report = {"command": "python bench/transfer_study.py" + "".join(f" {a}" for a in sys.argv[1:]),
              "settings": list(zoos), "targets": targets, "machine": machine(),
              "score": {"per_class": score_per_class, "seed": SCORE["seed"],
                        "metrics": METRICS},
              "ground_truth": {**gt, "probe": PROBE, "test_images": {
                  t: len(tests[t].ids) for t in targets}},
              "finetune": finetune_protocol(args.quick), "bootstrap": bootstrap,
              "results": results, "published": published(args.reference),
              "timing": {"this_invocation_s": round(time.perf_counter() - started, 1),
                         "stage_sum_s": round(stage_s, 1)}}
    if args.quick or args.recompute:
        check = check_against(rows, DEFAULT_OUT.with_suffix(".csv"),
                              ["setting", "target", "model", "kind", "metric", "seed"])
        if check and prefix != DEFAULT_OUT:
            report["reproducibility"] = check
            log(f"reproducibility against {check['against']}: {check['identical']} of "
                f"{check['cells']} values identical, max |diff| {check['max_abs_diff']:.3g}")
    write_results(prefix, report, rows, ["setting", "target", "model", "kind", "metric", "seed",
                                         "value"], write_markdown, write_plot)
    log(f"wrote {prefix}.{{json,csv,md,png}} in {report['timing']['this_invocation_s'] / 60:.1f}"
        " min")


if __name__ == "__main__":
    main()
