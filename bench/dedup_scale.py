"""Near-duplicate search at scale: ``medcurate.dedup.near_duplicate_groups`` on N × 768.

The matrix is ``select_scale.planted_embeddings`` (clustered, as embeddings of an archive are)
with a share of its rows replaced by near copies of other rows: the original plus noise scaled
to a chosen cosine, as a re-encoded or resized image sits next to its original. Reports wall
time, peak RSS (this process and its children), the lists used, and how many planted copies
were found at the threshold (recall) and how many pairs were found that were not planted
(pairs among the clustered rows above the threshold: false groups at this threshold).

Targets of issue 20 on this 2-core, 24 GiB machine: 1M × 768 in at most 10 minutes and 8 GiB.

    .venv/bin/python bench/dedup_scale.py                                  # 1M (minutes)
    .venv/bin/python bench/dedup_scale.py --sizes 100000,1000000 --json docs/results/dedup_scale.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from medcurate import backends
from medcurate.dedup import PROBES, near_duplicate_groups, unit_rows

from _memory import PeakMemory  # bench/ sibling module
from select_scale import planted_embeddings  # bench/ sibling module


def plant_copies(X: np.ndarray, share: float, cosine: float, seed: int) -> np.ndarray:
    """Replace ``share`` of the rows with near copies of other rows, in place: each copy is
    its source plus noise orthogonal-ish to it, scaled so the pair's cosine is about
    ``cosine``. Returns the planted pairs [P, 2] (source, copy)."""
    rng = np.random.default_rng(seed)
    n = len(X)
    rows = rng.permutation(n)[: 2 * int(share * n)]
    sources, copies = rows[::2], rows[1::2]
    dim = X.shape[1]
    for start in range(0, len(copies), 50_000):  # chunked: no second full-size copy
        src, dst = sources[start:start + 50_000], copies[start:start + 50_000]
        base = X[src]
        norms = np.linalg.norm(base, axis=1, keepdims=True)
        noise = rng.standard_normal((len(src), dim), dtype=np.float32)
        noise *= norms / np.sqrt(dim) * np.float32(np.tan(np.arccos(cosine)))
        X[dst] = base + noise
    return np.stack([sources, copies], axis=1)


def run(n: int, dim: int, threshold: float, share: float, cosine: float, probes: int,
        seed: int) -> dict:
    X, _, _ = planted_embeddings(n, dim, classes=2, seed=seed)
    planted = plant_copies(X, share, cosine, seed)
    with PeakMemory() as memory:
        start = time.perf_counter()
        X = unit_rows(X, in_place=True)  # as ``medcurate dedup`` does when it loads a run
        found = near_duplicate_groups(X, threshold, probes=probes, seed=seed)
        seconds = time.perf_counter() - start
    together = found.group[planted[:, 0]] == found.group[planted[:, 1]]
    together &= found.group[planted[:, 0]] >= 0
    planted_keys = set(map(tuple, np.sort(planted, axis=1).tolist()))
    extra = sum(1 for pair in map(tuple, found.pairs.tolist()) if pair not in planted_keys)
    return {"rows": n, "dim": dim, "threshold": threshold, "planted_copies": len(planted),
            "planted_cosine": cosine, "seconds": round(seconds, 1),
            "peak_rss_gib": memory.gib, "matrix_gib": round(X.nbytes / 2**30, 2),
            "index": found.index, "backend": backends.backend_name(),
            "recall": round(float(together.mean()), 4), "pairs_found": int(len(found.pairs)),
            "pairs_not_planted": int(extra),
            "groups": int(found.group.max() + 1) if len(found.pairs) else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000",
                        help="comma list of row counts (default 1000000)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--threshold", type=float, default=0.99)
    parser.add_argument("--share", type=float, default=0.01,
                        help="share of rows replaced by a near copy of another row")
    parser.add_argument("--cosine", type=float, default=0.995,
                        help="cosine of a planted copy to its source")
    parser.add_argument("--probes", type=int, default=PROBES,
                        help=f"lists each row is compared in (default {PROBES})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    results = []
    for n in (int(size) for size in args.sizes.split(",")):
        result = run(n, args.dim, args.threshold, args.share, args.cosine, args.probes,
                     args.seed)
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
