"""Load on the HTTP service: concurrent synchronous ``POST /v1/select`` over a large run.

Builds a synthetic embedding run (planted sub-groups, as ``select_scale.py``) straight into a
temporary workspace in the embedding pipeline's format, starts ``medcurate serve`` on it (its
own local Ray), and fires ``--requests`` selections from ``--clients`` concurrent clients, each
with its own selection id (distinct artefacts, no 409s). Prints latency p50 / p99 and
throughput. Every request reads the run (N x D float32), selects, and writes the selection
with its summary and HTML report; those are the service's costs measured.

    .venv/bin/python bench/service_load.py                 # 100k x 64, 48 requests, 8 clients
    .venv/bin/python bench/service_load.py --quick         # smoke run: 10k points, 12 requests
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
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
from service.process import ServiceProcess

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
    with ServiceProcess(Path(workspace.root), [root / "data"], root / "tokens",
                        root / "serve.log",
                        env={"MEDCURATE_REPLICAS": str(args.replicas)}) as service:
        def select(index: int) -> tuple[int, float]:
            return post(f"{service.url}/v1/select", token, {
                "embedding_run": run_id, "budget_per_class": args.budget,
                "strategy": args.strategy, "seed": index, "selection_id": f"load-{index}",
                "page_size": 10})

        for warm_up in range(-args.replicas, 0):  # each replica imports the selection code
            select(warm_up)
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(select, range(args.requests)))
        wall = time.perf_counter() - started
    latencies = np.array([seconds for _, seconds in results])
    statuses = sorted({status for status, _ in results})
    return {"rows": args.rows, "dim": args.dim, "strategy": args.strategy,
            "requests": args.requests, "clients": args.clients, "replicas": args.replicas,
            "statuses": statuses,
            "errors": sum(status != 201 for status, _ in results),
            "p50_s": round(float(np.percentile(latencies, 50)), 3),
            "p99_s": round(float(np.percentile(latencies, 99)), 3),
            "mean_s": round(float(latencies.mean()), 3),
            "throughput_per_s": round(args.requests / wall, 2), "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--budget", type=int, default=50, help="per class")
    parser.add_argument("--strategy", choices=["random", "stratified"], default="stratified")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=1, help="Serve replicas of the API")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: 10k points, 12 "
                        "requests, 4 clients")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.requests, args.clients = 10_000, 12, 4
    with tempfile.TemporaryDirectory(prefix="medcurate-load-") as tmp:
        report = {"machine": f"{os.cpu_count()} cores", **run(args, Path(tmp))}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
