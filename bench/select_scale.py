"""Selection at scale: synthetic clustered embeddings at 100k and 1M × 768.

Each class holds planted sub-groups (75% / 20% / 5%). Prints wall time and peak RSS per stage
for confounder-aware selection (UMAP fitted on a sample, the rest transformed in parallel on
Ray) and k-center greedy (running min-distance vector, O(N·d)), next to the naive pipelines
(UMAP on every point; k-center over a dense N×N distance matrix) where those still fit.

Targets on a 2-core, 24 GiB machine: 1M × 768 finishes; peak memory stays within a few × the
embedding matrix itself (1M × 768 float32 = 2.9 GiB); the naive pipelines are shown only where
they fit, with the memory they would need elsewhere.

    .venv/bin/python bench/select_scale.py                   # 100k and 1M (tens of minutes)
    .venv/bin/python bench/select_scale.py --sizes 100000 --json docs/results/select_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import psutil

from medcurate.reduce import reduce_to_2d
from medcurate.runtime import ensure_ray
from medcurate.select import select
from medcurate.select.run import RayTransformMap

from _memory import PeakMemory  # bench/ sibling module

SHARES = (0.75, 0.20, 0.05)


def planted_embeddings(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray,
                                                                          np.ndarray]:
    """Float32 [n, dim] with ``classes`` classes, each of three planted sub-groups."""
    rng = np.random.default_rng(seed)
    X = np.empty((n, dim), dtype=np.float32)
    labels = np.repeat(np.arange(classes), -(-n // classes))[:n]
    groups = np.empty(n, dtype=np.int8)
    centres = rng.normal(0, 1, (classes, len(SHARES), dim)).astype(np.float32) * 0.6
    for c in range(classes):
        rows = np.flatnonzero(labels == c)
        cut = np.cumsum([int(round(s * len(rows))) for s in SHARES])[:-1]
        for g, part in enumerate(np.split(rows, cut)):
            groups[part] = g
            for start in range(0, len(part), 100_000):  # chunked: no second full-size copy
                chunk = part[start:start + 100_000]
                X[chunk] = rng.standard_normal((len(chunk), dim), dtype=np.float32) * 0.15
                X[chunk] += centres[c, g]
    return X, labels, groups


def timed(label: str, fn, results: dict) -> object:
    with PeakMemory() as memory:
        start = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - start
    results[label] = {"seconds": round(seconds, 1), "peak_rss_gib": memory.gib}
    print(f"  {label:<42} {seconds:8.1f} s   peak RSS {memory.gib:6.2f} GiB", flush=True)
    return value


def dense_kcenter(Xc: np.ndarray, k: int) -> np.ndarray:
    """Textbook k-center greedy over a full distance matrix: O(N²) memory."""
    norms = (Xc * Xc).sum(1)
    dist = norms[:, None] + norms[None, :] - 2 * Xc @ Xc.T
    picked = [0]
    nearest = dist[0].copy()
    for _ in range(k - 1):
        picked.append(int(np.argmax(nearest)))
        np.minimum(nearest, dist[picked[-1]], out=nearest)
    return np.array(picked)


def rare_coverage(result, groups: np.ndarray, labels: np.ndarray) -> str:
    chosen = np.asarray(result.indices)
    covered = sum(int((groups[chosen][labels[chosen] == c] == 2).any())
                  for c in np.unique(labels))
    return f"{covered}/{len(np.unique(labels))} classes"


def run_size(n: int, args) -> dict:
    print(f"\n== {n:,} × {args.dim} ({args.classes} classes, budget {args.budget} per class)",
          flush=True)
    results: dict = {"n": n, "dim": args.dim}
    X, labels, groups = timed("generate planted embeddings", lambda: planted_embeddings(
        n, args.dim, args.classes, args.seed), results)
    matrix_gib = X.nbytes / 2**30
    results["matrix_gib"] = round(matrix_gib, 2)
    result = timed("confounder-aware (sampled UMAP + Ray)", lambda: select(
        "confounder-aware", X, labels, args.budget, seed=args.seed, fit_sample=args.fit_sample,
        transform_map=RayTransformMap()), results)
    stages = result.info["classes"]
    results["confounder_stages_s"] = {
        stage: round(sum(c.get("seconds", {}).get(stage, 0.0) for c in stages.values()), 1)
        for stage in ("reduce", "cluster")}
    results["confounder_rare_covered"] = rare_coverage(result, groups, labels)
    print(f"    per stage: {results['confounder_stages_s']}; rare sub-group covered in "
          f"{results['confounder_rare_covered']}", flush=True)
    result = timed("k-center greedy (O(N·d))", lambda: select(
        "kcenter", X, labels, args.budget, seed=args.seed), results)
    results["kcenter_rare_covered"] = rare_coverage(result, groups, labels)

    class_rows = np.flatnonzero(labels == 0)
    if len(class_rows) <= args.naive_umap_max:
        timed(f"naive: UMAP on all {len(class_rows):,} points of one class", lambda: reduce_to_2d(
            X[class_rows], seed=args.seed, fit_sample=len(class_rows) + 1), results)
    else:
        results["naive: UMAP on all points of one class"] = "skipped: too slow at this size"
        print(f"  naive UMAP on all {len(class_rows):,} points of one class: skipped (over "
              f"--naive-umap-max {args.naive_umap_max:,})")
    need_gib = len(class_rows) ** 2 * 4 * 2 / 2**30  # distances plus a temporary
    free_gib = psutil.virtual_memory().available / 2**30
    if need_gib < free_gib * 0.5:
        timed(f"naive: dense k-center, one class ({len(class_rows):,})", lambda: dense_kcenter(
            X[class_rows], args.budget), results)
    else:
        results["naive: dense k-center, one class"] = f"does not fit: needs {need_gib:,.0f} GiB"
        print(f"  naive dense k-center, one class of {len(class_rows):,}: does not fit "
              f"(needs {need_gib:,.0f} GiB, {free_gib:.0f} GiB free)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--fit-sample", type=int, default=20_000)
    parser.add_argument("--naive-umap-max", type=int, default=30_000,
                        help="largest class for which UMAP on every point is run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ensure_ray()
    report = {"machine": f"{os.cpu_count()} cores, "
                         f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
              "runs": [run_size(n, args) for n in args.sizes]}
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
