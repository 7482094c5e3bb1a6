"""Load on the HTTP service: concurrent synchronous ``POST /v1/select`` over a large run.

Builds a synthetic embedding run (planted sub-groups, as ``select_scale.py``) straight into a
temporary workspace in the embedding pipeline's format, starts ``medcurate serve`` on it (its
own local Ray), and for each strategy: ``--single`` requests one after another (the
single-client p50), then ``--requests`` selections from ``--clients`` concurrent clients, each
with its own selection id, seed and budget (distinct artefacts, no 409s). Prints latency p50 /
p99 and throughput per strategy. Every request selects from the run (read once per replica and
kept in memory) and publishes the selection with its summary; the report is drawn later, on
its first GET, so it is not in these figures. Confounder-aware is measured cold (the first
request fits each class's UMAP map and stores it beside the run) and warm (later requests,
other budgets and seeds, reuse the stored maps).

    .venv/bin/python bench/service_load.py                 # 100k x 64, 48 requests, 8 clients
    .venv/bin/python bench/service_load.py --json docs/results/service_load.json
    .venv/bin/python bench/service_load.py --quick         # smoke run: 10k points, 12 requests
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from select_scale import planted_embeddings  # bench/ sibling module

from medcurate.synthetic import write_embedding_run
from medcurate.workspace import Workspace

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def post(url: str, token: str, body: dict) -> tuple[int, float]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {token}",
                                              "Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with DIRECT.open(request, timeout=600) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    return status, time.perf_counter() - started


FAST_STRATEGIES = ("stratified", "random", "kcenter", "herding", "typicality")
MAP_STRATEGY = "confounder-aware"
WARM_UP_SEEDS = 10_000  # seeds of the warm-up requests, apart from the measured ones


def latencies(results: list[tuple[int, float]], wall: float) -> dict:
    seconds = np.array([t for _, t in results])
    return {"requests": len(results), "errors": sum(status != 201 for status, _ in results),
            "statuses": sorted({status for status, _ in results}),
            "p50_s": round(float(np.percentile(seconds, 50)), 3),
            "p99_s": round(float(np.percentile(seconds, 99)), 3),
            "mean_s": round(float(seconds.mean()), 3),
            "throughput_per_s": round(len(results) / wall, 2), "wall_s": round(wall, 1)}


def measure(select, strategy: str, first: int, requests: int, clients: int) -> dict:
    """``requests`` selections from ``clients`` concurrent clients, seeds ``first``, ...:
    each a distinct artefact (its own id, seed and a budget of 40-59 per class)."""
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: select(strategy, i), range(first, first + requests)))
    return latencies(results, time.perf_counter() - started)


def run(args, root: Path) -> dict:
    workspace = Workspace(str(root / "ws"))
    X, labels, _ = planted_embeddings(args.rows, args.dim, args.classes, args.seed)
    started = time.perf_counter()
    run_id = write_embedding_run(workspace, "load", X, [f"class{c}" for c in labels])
    print(f"wrote {args.rows:,} x {args.dim} synthetic embeddings in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    token = secrets.token_hex(16)
    (root / "tokens").write_text(token + "\n")
    (root / "tokens").chmod(0o600)  # the service refuses a tokens file others can read
    (root / "data").mkdir()
    figures: dict[str, dict] = {}
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from service_process import ServiceProcess  # the tests' harness: the service on free ports

    with ServiceProcess(Path(workspace.root), [root / "data"], root / "tokens",
                        root / "serve.log",
                        env={"MEDCURATE_REPLICAS": str(args.replicas)}) as service:
        def select(strategy: str, index: int) -> tuple[int, float]:
            return post(f"{service.url}/v1/select", token, {
                "embedding_run": run_id, "budget_per_class": args.budget + index % 20,
                "strategy": strategy, "seed": index, "page_size": 10,
                "selection_id": f"load-{strategy}-{index}"})

        for warm_up in range(args.replicas):  # each replica imports the code, reads the run
            select("random", WARM_UP_SEEDS + warm_up)
        for strategy in args.strategies:
            if strategy == MAP_STRATEGY:  # the first request fits the maps, later ones reuse
                status, cold = select(strategy, 0)
                figures[f"{strategy} (cold maps)"] = latencies([(status, cold)], cold)
                first = 1
            else:
                first = 0
            single = measure(select, strategy, first, args.single, 1)
            loaded = measure(select, strategy, first + args.single, args.requests,
                             args.clients)
            figures[strategy] = {"single_p50_s": single["p50_s"], **loaded,
                                 "errors": loaded["errors"] + single["errors"]}
            print(strategy, json.dumps(figures[strategy]), flush=True)
    return {"rows": args.rows, "dim": args.dim, "budget_per_class": f"{args.budget}-"
            f"{args.budget + 19}", "clients": args.clients, "replicas": args.replicas,
            "single_client_requests": args.single, "strategies": figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--budget", type=int, default=40, help="smallest budget per class; "
                        "requests cycle through 20 budgets from it")
    parser.add_argument("--strategies", nargs="+", default=[*FAST_STRATEGIES, MAP_STRATEGY],
                        choices=[*FAST_STRATEGIES, MAP_STRATEGY])
    parser.add_argument("--single", type=int, default=8, help="requests of the single-client "
                        "figure, one after another")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=1, help="Serve replicas of the API")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 10k points, 12 "
                        "requests, 4 clients")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.requests, args.clients, args.single = 10_000, 12, 4, 3
    with tempfile.TemporaryDirectory(prefix="medcurate-load-") as tmp:
        report = {"machine": f"{os.cpu_count()} cores", **run(args, Path(tmp))}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
