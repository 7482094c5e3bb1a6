"""Robustness study (issue 9, part 3): which encoders of the zoo learn a shortcut when one is
offered, and how far their accuracy falls when it turns against them?

One command regenerates ``docs/results/robustness_study.{json,csv,md,png}`` with the library's
``audit`` (``medcurate audit``) over the zoo of ``bench/_zoo.py`` (two ImageNet CNNs, two MAEs
pretrained here, a random init):

- image confounders ``tag``, ``lowpass`` and ``poisson`` on PneumoniaMNIST (pneumonia is the
  positive class): at level p a share p of the training positives carries the confounder; the
  i.i.d. test set is confounded the same way, the o.o.d. one carries it on the negatives only;
- metadata confounders on HAM10000, melanoma vs naevus: ``metadata:sex`` (carrier male) and
  ``metadata:site`` (carrier vidir_modern): the training set is resampled so that the
  attribute goes with melanoma at strength p, and the o.o.d. test set reverses it.

Every audit uses one protocol: a linear probe (frozen encoder, dropout 0.5 + linear head,
AdamW, early stopping on the validation loss) at 64 px, levels p = 0, 0.5, 1, three folds
(each another validation split and seed), capped, class-stratified train and test sets.

    .venv/bin/python bench/robustness_study.py             # 5 audits x 5 models (< 1 h, 2 cores)
    .venv/bin/python bench/robustness_study.py --quick     # tag only, 2 models, p = 0 and 1
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

from _study import (  # bench/ sibling module; pins numeric threads before numpy loads
    DEFAULT_DATA, RESULTS, Timings, check_against, check_data, comma, ensure_collection,
    ingest_config, log, machine, open_study, single_threaded_numerics,
    write_results)
from _zoo import ensure_zoo

DEFAULT_WORKSPACE = Path(tempfile.gettempdir()) / "medcurate-evidence"
DEFAULT_OUT = RESULTS / "robustness_study"
LEVELS = [0.0, 0.5, 1.0]
# The protocol of every audit, fixed before any result was seen.
PROTOCOL = {"mode": "linear", "augment": False, "img_size": 64, "epochs": 100, "patience": 10,
            "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 32, "val_fraction": 0.2,
            "folds": 3, "max_train": 600, "max_test": 400, "permutations": 2000, "seed": 0}
HAM_BINARY = "ham10000-mel-nv"
AUDITS = {
    "tag": {"collection": "pneumoniamnist", "confounder": "tag", "positive": "1"},
    "lowpass": {"collection": "pneumoniamnist", "confounder": "lowpass", "positive": "1"},
    "poisson": {"collection": "pneumoniamnist", "confounder": "poisson", "positive": "1"},
    "sex": {"collection": HAM_BINARY, "confounder": "metadata:sex", "carrier": "male",
            "positive": "mel"},
    "site": {"collection": HAM_BINARY, "confounder": "metadata:site", "carrier": "vidir_modern",
             "positive": "mel"},
}
QUICK = {"audits": ["tag"], "models": ["imagenet-mobilenetv2", "imagenet-efficientnet-lite0"],
         "levels": [0.0, 1.0], "folds": 1, "max_train": 300, "max_test": 200}


def ham_binary_config(data: Path, inputs: Path):
    """HAM10000 melanoma vs naevus (the two classes a dermatology shortcut study is about), on
    the i.i.d. split of the selection study, as a CSV manifest keeping sex, age and site."""
    import pandas as pd
    from medcurate.config import IngestConfig

    source = Path(ingest_config("ham10000-iid", data, inputs).source)
    table = pd.read_csv(source)
    table = table[table["dx"].isin(["mel", "nv"])]
    path = inputs / f"{HAM_BINARY}.csv"
    text = table.to_csv(index=False, lineterminator="\n")
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return IngestConfig(source=str(path), name=HAM_BINARY, format="csv", path_column="path",
                        label_column="dx", split_column="split")


def zoo_subset(zoo_path: Path, models: list[str] | None, folder: Path) -> Path:
    """The zoo file, or a copy holding only ``models`` (for quick runs)."""
    import yaml

    if not models:
        return zoo_path
    entries = yaml.safe_load(zoo_path.read_text())["models"]
    unknown = sorted(set(models) - {e["name"] for e in entries})
    if unknown:
        sys.exit(f"error: unknown zoo model(s) {', '.join(unknown)}; the zoo has "
                 f"{', '.join(e['name'] for e in entries)}")
    path = folder / f"zoo-{'-'.join(models)}.yaml"
    path.write_text(yaml.safe_dump({"models": [e for e in entries if e["name"] in models]},
                                   sort_keys=False))
    return path


def audit_config(name: str, zoo: Path, settings: dict):
    from medcurate.config import AuditConfig

    config = AuditConfig(zoo=str(zoo), metrics=["auc"], **AUDITS[name], **settings)
    # Named after the settings and the zoo's content (not its path): the same audit is reused.
    models = hashlib.sha256(zoo.read_bytes()).hexdigest()[:6]
    return config.model_copy(update={
        "audit_id": f"study-{name}-{config.digest('audit_id', 'zoo')}-{models}"})


def ensure_audit(config, workspace, timings: Timings, recompute: bool) -> tuple[dict, list]:
    from medcurate.train.audit import audit

    key = f"audit/{config.audit_id}"
    if workspace.exists("audits", config.audit_id) and not recompute:
        log(f"audit {config.audit_id}: reused")
    else:
        log(f"audit {config.audit_id}: {config.confounder} on {config.collection}")
        with timings.measure(key):
            audit(config.model_copy(update={"overwrite": recompute}), workspace)
        log(f"audit {config.audit_id}: {timings.get(key):.0f} s")
    folder = Path(workspace.require("audits", config.audit_id))
    with open(folder / "results.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    return json.loads((folder / "summary.json").read_text()), records


# -- outputs ------------------------------------------------------------------------------------
def cell(entry: dict) -> str:
    if entry.get("mean") is None:
        return "n/a"
    if entry.get("low") is None:
        return f"{entry['mean']:.3f}"
    return f"{entry['mean']:.3f} ± {(entry['high'] - entry['low']) / 2:.3f}"


def audit_table(summary: dict, models: list[str], levels: list[float]) -> list[str]:
    lines = ["| model | " + " | ".join(f"p = {p:g}: i.i.d. / o.o.d. / drop" for p in levels)
             + " |", "| --- |" + " --- |" * len(levels)]
    for model in models:
        cells = []
        for p in levels:
            auc = summary["metrics"][model][str(p)]["auc"]
            cells.append(f"{cell(auc['iid'])} / {cell(auc['ood'])} / {cell(auc['drop'])}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def most_and_least_robust(summary: dict, models: list[str], level: float) -> dict:
    """Models ordered by o.o.d. AUC at one level, with the permutation test of first vs last."""
    ood = {m: summary["metrics"][m][str(level)]["auc"]["ood"]["mean"] for m in models}
    order = sorted(ood, key=ood.get, reverse=True)
    tests = summary.get("ood_auc_permutation_tests", {}).get(str(level), {})
    pair = tests.get(f"{order[0]} vs {order[-1]}") or tests.get(f"{order[-1]} vs {order[0]}")
    return {"order": order, "ood_auc": ood, "best_vs_worst": pair}


def write_markdown(report: dict, path: Path) -> None:
    protocol = report["protocol"]
    parts = ["# Robustness study (issue 9, part 3)", "", f"Command: `{report['command']}`", "",
             f"Audits (`medcurate audit`) of the zoo {', '.join(report['models'])}: linear "
             f"probe at {protocol['img_size']} px, levels {report['levels']}, "
             f"{protocol['folds']} folds (validation split and seed), at most "
             f"{protocol['max_train']} training and {protocol['max_test']} test images "
             "(class-stratified). Cells: AUC mean ± half-width of the 95% t-interval over "
             "folds; drop = i.i.d. − o.o.d. AUC. p: the share of training positives carrying "
             "an image confounder, or the strength of the attribute–label correlation.", ""]
    for name, result in report["audits"].items():
        spec = AUDITS[name]
        what = spec["confounder"] + (f" (carrier {spec['carrier']})" if "carrier" in spec else "")
        parts += [f"## {what} on {spec['collection']} (positive class {spec['positive']})", "",
                  f"Images: {result['images']}.", "",
                  *audit_table(result["summary"], report["models"], report["levels"]), ""]
        for level, ranking in result["ranking"].items():
            pair = ranking["best_vs_worst"]
            test = f"; paired permutation test of o.o.d. AUC, {ranking['order'][0]} vs " \
                   f"{ranking['order'][-1]}: p = {pair['p_value']:.3g}" if pair else ""
            parts.append(f"- p = {level}: o.o.d. AUC from {ranking['order'][0]} "
                         f"({ranking['ood_auc'][ranking['order'][0]]:.3f}) down to "
                         f"{ranking['order'][-1]} "
                         f"({ranking['ood_auc'][ranking['order'][-1]]:.3f}){test}.")
        parts.append("")
    if "reproducibility" in report:
        check = report["reproducibility"]
        parts += [f"Reproducibility: {check['identical']} of {check['cells']} per-fold values "
                  f"identical to {check['against']} (max |diff| {check['max_abs_diff']:.3g}).",
                  ""]
    timing = report["timing"]
    parts += [f"Runtime: {timing['total_compute_s'] / 60:.1f} min of compute (MAE pretraining "
              f"{timing['zoo_s'] / 60:.1f} min of it) on {report['machine']}.", ""]
    path.write_text("\n".join(parts))


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["audits"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, name in zip(axes[0], names):
        summary = report["audits"][name]["summary"]
        for index, model in enumerate(report["models"]):
            for test, style in (("ood", "-"), ("iid", "--")):
                means = [summary["metrics"][model][str(p)]["auc"][test]["mean"]
                         for p in report["levels"]]
                ax.plot(report["levels"], means, style, marker="o", ms=3, color=colours(index),
                        label=model if test == "ood" else None, lw=1.5 if test == "ood" else 1)
        spec = AUDITS[name]
        ax.set(title=f"{spec['confounder']} ({spec['collection']})", xlabel="level p",
               ylabel="AUC (solid o.o.d., dashed i.i.d.)", ylim=(0, 1.02))
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE,
                        help=f"medcurate workspace; finished artefacts are reused "
                             f"(default {DEFAULT_WORKSPACE}, shared with transfer_study.py)")
    parser.add_argument("--audits", type=comma(str), default=None,
                        help=f"comma list of {', '.join(AUDITS)} (default: all)")
    parser.add_argument("--models", type=comma(str), default=None,
                        help="comma list of zoo model names (default: the whole zoo)")
    parser.add_argument("--levels", type=comma(float), default=None)
    parser.add_argument("--folds", type=int, default=None)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (tag, two ImageNet models, p = 0 and 1, one fold, "
                             "small sets, quick zoo); results go to the workspace")
    parser.add_argument("--recompute", action="store_true",
                        help="redo every audit (collections and the zoo are still reused)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    settings = dict(PROTOCOL)
    if args.quick:
        args.audits = args.audits or QUICK["audits"]
        args.models = args.models or QUICK["models"]
        args.levels = args.levels or QUICK["levels"]
        settings.update({k: QUICK[k] for k in ("folds", "max_train", "max_test")})
    args.audits = args.audits or list(AUDITS)
    if unknown := [a for a in args.audits if a not in AUDITS]:
        sys.exit(f"error: unknown audit(s) {', '.join(unknown)}; choose from {', '.join(AUDITS)}")
    levels = args.levels or LEVELS
    settings["levels"] = levels
    if args.folds:
        settings["folds"] = args.folds
    needed = ["pneumoniamnist", "brain-tumor-mri"] + (
        ["ham10000-iid"] if any(AUDITS[a]["collection"] == HAM_BINARY for a in args.audits)
        else [])
    check_data(needed, args.data)
    prefix = args.out or (args.workspace / "results" / "robustness_study_quick" if args.quick
                          else DEFAULT_OUT)

    started = time.perf_counter()
    single_threaded_numerics()
    workspace, inputs, timings = open_study(args.workspace)
    zoo_path, zoo = ensure_zoo(workspace, args.data, timings, quick=args.quick)
    zoo_path = zoo_subset(zoo_path, args.models, inputs)
    models = args.models or [e["name"] for e in zoo]
    zoo_s = sum(e.get("pretrain_s") or 0.0 for e in zoo if not args.models
                or e["name"] in args.models)

    command = "python bench/robustness_study.py" + "".join(f" {a}" for a in sys.argv[1:])
    report = {"command": command, "protocol": settings, "levels": levels, "models": models,
              "zoo": [e for e in zoo if e["name"] in models], "machine": machine(),
              "audits": {}, "timing": {"zoo_s": round(zoo_s, 1)}}
    rows: list[dict] = []
    compute = zoo_s
    for name in args.audits:
        spec = AUDITS[name]
        if spec["collection"] == HAM_BINARY:
            config = ham_binary_config(args.data, inputs)
        else:
            config = ingest_config(spec["collection"], args.data, inputs)
        collection = ensure_collection(config, workspace, timings)
        config = audit_config(name, zoo_path, settings)
        summary, records = ensure_audit(config, workspace, timings, args.recompute)
        seconds = timings.get(f"audit/{config.audit_id}") or 0.0
        compute += seconds + (collection["seconds"] or 0.0)
        report["timing"][name] = seconds
        report["audits"][name] = {
            "audit_id": config.audit_id, "images": summary["images"], "summary": summary,
            "ranking": {str(p): most_and_least_robust(summary, models, p) for p in levels}}
        rows += [{"audit": name, **r} for r in records]
        top = report["audits"][name]["ranking"][str(levels[-1])]
        log(f"{name}: at p = {levels[-1]} o.o.d. AUC best {top['order'][0]}, "
            f"worst {top['order'][-1]}")
    report["timing"]["total_compute_s"] = round(compute, 1)
    report["timing"]["this_invocation_s"] = round(time.perf_counter() - started, 1)
    # Only a recomputation with the default protocol can match the committed numbers
    # (--quick uses other caps and one fold).
    if args.recompute and not args.quick:
        check = check_against(rows, DEFAULT_OUT.with_suffix(".csv"),
                              ["audit", "model", "level", "fold", "test_set", "metric"])
        if check and prefix != DEFAULT_OUT:
            report["reproducibility"] = check
            log(f"reproducibility against {check['against']}: {check['identical']} of "
                f"{check['cells']} values identical, max |diff| {check['max_abs_diff']:.3g}")
    write_results(prefix, report, rows, ["audit", "model", "level", "fold", "test_set",
                                         "metric", "value", "epochs"], write_markdown,
                  write_plot)
    log(f"wrote {prefix}.{{json,csv,md,png}}; compute {compute / 60:.1f} min")


if __name__ == "__main__":
    main()
