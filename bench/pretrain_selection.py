"""Pretraining-data selection: an MAE pretrained on 5% of a collection chosen by OptiDEL, against
5% chosen at random and against all of it (the OptiDEL paper's claim: 5% chosen its way beats
100%).

Data: PneumoniaMNIST's train split (4,682 chest X-rays, 28 px) is the pretraining pool; it is
embedded with ImageNet MobileNetV2 for OptiDEL's margins (`medcurate embed`), selected from with
`medcurate optidel --fraction 0.05 --splits train` (half of the 5% real hard,
diverse images, half synthesised), and pretrained on with `medcurate pretrain --selection`.
The random arm is `medcurate pretrain --max-images` with as many images as OptiDEL's 5%.
Model: the tiny MAE of tests/test_mae.py (28 px, patch 7, depth 4, batch 64).

Equal steps, not equal epochs: every arm takes the optimiser steps (and warmup steps) of
``--epochs`` passes over the whole split, so a 5% subset is seen about 20 times as often. The
question is which data is worth the same compute; with equal epochs the subsets would get a
twentieth of the compute and lose for that reason alone.

Evaluation: the frozen encoder's features, a logistic-regression probe on the labelled train
split (all labels, and 40 labels: mean of 10 class-balanced draws), AUC on the test split.
Several seeds: the seed drives selection, subset, initialisation and masking.

    .venv/bin/python bench/pretrain_selection.py            # 3 seeds, 10 epochs: 73 min, 2 cores
    .venv/bin/python bench/pretrain_selection.py --quick    # 1 seed, 1 epoch: a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from medcurate.config import EmbedConfig, IngestConfig, OptidelConfig, PretrainConfig
from medcurate.embed import embed
from medcurate.ingest import ingest
from medcurate.models.mae import build_mae, load_mae_encoder
from medcurate.models.preprocess import Preprocessing, preprocess_batch
from medcurate.select.pool import run_optidel
from medcurate.train import pretrain
from medcurate.train.evaluation import mean_interval
from medcurate.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pneumoniamnist" / "pneumoniamnist.npz"
ARMS = ("optidel", "random", "full")  # "init" (no pretraining) is added to every run
MAE = dict(arch="mae-vit-tiny", img_size=28, patch_size=7, depth=4, batch_size=64)
WARMUP_EPOCHS = 2.0  # of the whole split, as PretrainConfig's default
FEW_LABELS, FEW_DRAWS = 20, 10  # per class, draws


def features(encoder: torch.nn.Module, prep: Preprocessing, images: np.ndarray) -> np.ndarray:
    pixels = preprocess_batch(list(images), prep)
    encoder.eval()
    with torch.no_grad():
        return torch.cat([encoder(torch.from_numpy(pixels[i:i + 512]))
                          for i in range(0, len(pixels), 512)]).numpy()


def probe_auc(train_x, train_y, test_x, test_y) -> float:
    scaler = StandardScaler().fit(train_x)
    model = LogisticRegression(max_iter=5000).fit(scaler.transform(train_x), train_y)
    return float(roc_auc_score(test_y, model.predict_proba(scaler.transform(test_x))[:, 1]))


def evaluate(encoder: torch.nn.Module, prep: Preprocessing, data) -> dict[str, float]:
    """Test AUC of a linear probe on all train labels, and the mean over draws of 40 labels."""
    train_x = features(encoder, prep, data["train_images"])
    test_x = features(encoder, prep, data["test_images"])
    train_y, test_y = data["train_labels"][:, 0], data["test_labels"][:, 0]
    rng = np.random.default_rng(0)
    few = []
    for _ in range(FEW_DRAWS):
        rows = np.concatenate([rng.choice(np.flatnonzero(train_y == c), FEW_LABELS,
                                          replace=False) for c in (0, 1)])
        few.append(probe_auc(train_x[rows], train_y[rows], test_x, test_y))
    return {"auc_all_labels": probe_auc(train_x, train_y, test_x, test_y),
            "auc_40_labels": float(np.mean(few))}


def arm_config(arm: str, seed: int, epochs: int, pool: int, subset: int,
               selection: str | None) -> PretrainConfig:
    """Equal optimiser steps for every arm: a subset runs proportionally more epochs."""
    full_steps = math.ceil(pool / MAE["batch_size"])
    steps = full_steps if arm == "full" else math.ceil(subset / MAE["batch_size"])
    scale = full_steps / steps
    return PretrainConfig(collection="pneumonia", **MAE, seed=seed,
                          epochs=max(1, round(epochs * scale)),
                          warmup_epochs=WARMUP_EPOCHS * scale, selection=selection,
                          max_images=subset if arm == "random" else None,
                          name=f"{arm}-s{seed}", overwrite=True)


def run(args) -> dict:
    workspace = Workspace(args.workspace)
    data = np.load(args.data)
    if not workspace.exists("collections", "pneumonia"):
        ingest(IngestConfig(source=str(args.data), name="pneumonia"), workspace)
    run_id = embed(EmbedConfig(collection="pneumonia", model="mobilenetv2-imagenet"),
                   workspace)["run_id"]
    pool = len(data["train_images"])
    records = []
    for seed in args.seeds:
        selection = run_optidel(OptidelConfig(
            embedding_run=run_id, fraction=args.fraction, splits=["train"], seed=seed,
            patch_size=7, selection_id=f"optidel-s{seed}", overwrite=True), workspace)
        subset = selection["pretraining_images"]
        for arm in args.arms:
            config = arm_config(arm, seed, args.epochs, pool, subset,
                                selection["selection_id"] if arm == "optidel" else None)
            start = time.monotonic()
            result = pretrain(config, workspace)
            seconds = time.monotonic() - start
            encoder, info = load_mae_encoder(result["checkpoint"])
            prep = Preprocessing(28, 1, info["mean"], info["std"])
            record = {"arm": arm, "seed": seed, "images": result["images"],
                      "epochs": config.epochs, "final_loss": result["final_loss"],
                      "pretrain_s": round(seconds, 1), **evaluate(encoder, prep, data)}
            records.append(record)
            print(json.dumps(record), flush=True)
        # Reference: no pretraining, the starting weights every arm of this seed shares (the
        # training loop seeds torch with the config's seed before building the model).
        torch.manual_seed(seed)
        init = build_mae(MAE["arch"], 28, 7, 1, depth=MAE["depth"]).encoder_module()
        pixels = data["train_images"] / 255.0
        prep = Preprocessing(28, 1, (float(pixels.mean()),), (float(pixels.std()),))
        records.append({"arm": "init", "seed": seed, "images": 0,
                        **evaluate(init, prep, data)})
        print(json.dumps(records[-1]), flush=True)
    return {"data": str(args.data), "pool": pool, "fraction": args.fraction,
            "epochs_of_full_split": args.epochs, "model": MAE, "seeds": args.seeds,
            "records": records, "summary": summarise(records, [*args.arms, "init"])}


def summarise(records: list[dict], arms: list[str]) -> dict:
    """Mean and 95% interval per arm, and per-seed paired differences against OptiDEL."""
    summary = {}
    for metric in ("auc_all_labels", "auc_40_labels"):
        by_arm = {arm: {r["seed"]: r[metric] for r in records if r["arm"] == arm} for arm in arms}
        entry = {arm: mean_interval(list(values.values())) for arm, values in by_arm.items()}
        if "optidel" in by_arm:
            for other in (a for a in arms if a != "optidel"):
                seeds = sorted(set(by_arm["optidel"]) & set(by_arm[other]))
                entry[f"optidel - {other}"] = mean_interval(
                    [by_arm["optidel"][s] - by_arm[other][s] for s in seeds])
        summary[metric] = entry
    return summary


def table(result: dict) -> str:
    """A Markdown table: per arm, each metric's mean [95% interval] and the seeds' values."""
    lines = ["| arm | images | probe AUC, all labels | probe AUC, 40 labels |",
             "| --- | --- | --- | --- |"]
    names = [*result["summary"]["auc_all_labels"]]

    def cell(metric: str, name: str) -> str:
        stat = result["summary"][metric][name]
        seeds = [r[metric] for r in result["records"] if r["arm"] == name]
        interval = "" if stat["low"] is None else f" [{stat['low']:.3f}, {stat['high']:.3f}]"
        shown = f" (seeds: {', '.join(f'{v:.3f}' for v in seeds)})" if seeds else ""
        return f"{stat['mean']:.3f}{interval}{shown}"

    for name in names:
        images = {r["images"] for r in result["records"] if r["arm"] == name}
        lines.append(f"| {name} | {', '.join(map(str, sorted(images))) or ''} | "
                     f"{cell('auc_all_labels', name)} | {cell('auc_40_labels', name)} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    arms = [a for a in (*ARMS, "init") if any(r["arm"] == a for r in result["records"])]
    fig = Figure(figsize=(9, 3.6))
    for i, (metric, title) in enumerate((("auc_all_labels", "probe on all train labels"),
                                         ("auc_40_labels", "probe on 40 labels"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for x, arm in enumerate(arms):
            values = [r[metric] for r in result["records"] if r["arm"] == arm]
            ax.bar(x, np.mean(values), color="#bbbbbb", width=0.6)
            ax.scatter([x] * len(values), values, color="black", s=14, zorder=3)
        shares = {"full": "100%", "init": "no pretraining"}
        ax.set_xticks(range(len(arms)), [f"{a}\n({shares.get(a, '5%')})" for a in arms])
        low = min(r[metric] for r in result["records"])
        ax.set_ylim(max(0.0, low - 0.05), 1.0)
        ax.set_title(title)
        ax.set_ylabel("test AUC")
    fig.suptitle(f"MAE pretraining on PneumoniaMNIST, equal steps "
                 f"({result['epochs_of_full_split']} epochs of the full split), "
                 f"{len(result['seeds'])} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--workspace", default=str(Path(tempfile.gettempdir()) /
                                                   "medcurate-bench-pretrain-selection"))
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")],
                        default=[0, 1, 2])
    parser.add_argument("--arms", type=lambda s: s.split(","), default=list(ARMS))
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the full split; "
                        "subsets run as many steps")
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 epoch: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="folder for "
                        "pretrain_selection.json and .png (default docs/results; with --quick, "
                        "the workspace)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 1
    out = args.out or (Path(args.workspace) if args.quick else REPO / "docs" / "results")
    result = run(args)
    print(table(result))
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain_selection.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "pretrain_selection.png")
    print(f"wrote {out}/pretrain_selection.json and .png")


if __name__ == "__main__":
    main()
