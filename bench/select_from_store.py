"""Million-row selection from the store: `medcurate select` end to end on a workspace.

Writes an N × D embedding run with planted sub-groups (``planted_embeddings`` of
``select_scale.py``: 4 classes, each 75% / 20% / 5%) into a fresh workspace per store, in the
embedding pipeline's own shard format (``medcurate.synthetic.write_embedding_run``: Parquet
shards of id, label, split, row, embedding FixedSizeList<float32>[D]), then times
``medcurate select`` on it as its own process: load (shards streamed into one preallocated
float32 matrix) → select → publish selection.parquet, map.parquet, summary.json, report.html,
provenance.json.

Stores: ``local`` (a folder) and ``s3`` (a real SeaweedFS S3 gateway on 127.0.0.1, started
here with ``tests/s3_servers.py``'s ``SeaweedS3Server`` and stopped at the end, errors
included). The matrix is generated and written in a subprocess that exits before the select
command starts, so the select figures are of that command alone.

Memory: resident set summed over the command's whole process tree (the CLI starts a local
Ray; its raylet, GCS and workers are children), sampled every 0.2 s as ``_memory.py`` does.
That sum counts pages shared between processes (Ray's object store, shared libraries) once
per process, so it overstates; the proportional set size (PSS, each shared page split over
the processes that map it) is sampled every second beside it. Stage windows (load / select /
publish) come from the selection's provenance (``started_at``, ``timing``, ``finished_at``;
whole seconds, so the per-stage peaks are approximate).

Goals (the issue): the whole command within 600 s and 8 GiB peak on a 2-core, 24 GiB machine.

    .venv/bin/python bench/select_from_store.py --rows 100000            # quick check
    .venv/bin/python bench/select_from_store.py --rows 100000 1000000 \
        --strategy confounder-aware kcenter --json docs/results/select_from_store.json
    .venv/bin/python bench/select_from_store.py --stores local --strategy confounder-aware kcenter
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOAL_SECONDS = 600
GOAL_GIB = 8.0
RUN_NAME = "planted"


def default_shard_size() -> int:
    from medcurate.config import EmbedConfig

    return EmbedConfig.model_fields["shard_size"].default


# --------------------------------------------------------------------------------------------
# write: a subprocess of this script (``--write-only URI``), so its matrix is gone before select

def write_only(args) -> None:
    """Generate the planted matrix, publish it as an embedding run, print one JSON line."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from select_scale import planted_embeddings  # bench/ sibling module

    from medcurate.synthetic import write_embedding_run
    from medcurate.workspace import Workspace, resolve_filesystem

    clock = time.perf_counter()
    rows = args.rows[0]
    X, labels, groups = planted_embeddings(rows, args.dim, args.classes, args.seed)
    generate_s = time.perf_counter() - clock
    names = [f"class-{c}" for c in labels.tolist()]
    if args.groups_out:  # for the rare sub-group check of the selections, 1 byte a row
        np.save(args.groups_out, groups)
    del labels, groups
    workspace = Workspace(args.write_only)
    load = os.getloadavg()
    clock = time.perf_counter()
    run_id = write_embedding_run(workspace, RUN_NAME, X, names, shard_size=args.shard_size)
    write_s = time.perf_counter() - clock
    load_end = os.getloadavg()
    matrix_bytes = X.nbytes
    del X
    from pyarrow import fs as pafs

    filesystem, root = resolve_filesystem(args.write_only)
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    run_files = [i for i in files if "/embeddings/" in i.path]
    print(json.dumps({
        "run_id": run_id, "generate_s": round(generate_s, 1), "write_s": round(write_s, 1),
        "write_rows_per_s": round(rows / write_s), "matrix_bytes": matrix_bytes,
        "store_bytes": sum(i.size for i in files), "run_bytes": sum(i.size for i in run_files),
        "run_files": len(run_files), "loadavg_start": [round(x, 2) for x in load],
        "loadavg_end": [round(x, 2) for x in load_end]}))


# --------------------------------------------------------------------------------------------
# measuring one command's process tree

class TreeSampler:
    """Sum of RSS (every ``interval`` s) and PSS (every ``pss_every`` s) over a process and all
    its descendants; keeps a timeline (wall time, tree RSS, the process's own RSS) and the
    per-process breakdown at the peak."""

    def __init__(self, pid: int, interval: float = 0.2, pss_every: float = 1.0):
        self.root, self.interval, self.pss_every = psutil.Process(pid), interval, pss_every
        self.peak_rss = self.peak_pss = 0
        self.peak_rss_at = self.peak_pss_at = 0.0
        self.peak_breakdown: list = []
        self.timeline: list[tuple[float, int, int]] = []  # (time, tree RSS, root RSS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def _watch(self) -> None:
        last_pss = 0.0
        while not self._stop.is_set():
            now, procs = time.time(), self._tree()
            rss, root, parts = 0, 0, []
            want_pss = now - last_pss >= self.pss_every
            pss = 0 if want_pss else None
            for proc in procs:
                try:
                    value = proc.memory_info().rss
                    rss += value
                    parts.append((value, proc.pid, proc.name()))
                    if proc.pid == self.root.pid:
                        root = value
                    if want_pss:
                        pss += proc.memory_full_info().pss
                except psutil.Error:
                    pass
            if want_pss:
                last_pss = now
                if pss > self.peak_pss:
                    self.peak_pss, self.peak_pss_at = pss, now
            if rss > self.peak_rss:
                self.peak_rss, self.peak_rss_at = rss, now
                self.peak_breakdown = sorted(parts, reverse=True)
            if procs:
                self.timeline.append((now, rss, root))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def thinned(self, start: float, points: int = 200) -> list[tuple[float, float, float]]:
        """At most ``points`` (seconds since ``start``, tree RSS GiB, the command's own RSS
        GiB), each the peak of its stretch of samples, for plotting."""
        step = max(1, -(-len(self.timeline) // points))
        return [(round(self.timeline[i][0] - start, 1),
                 gib(max(rss for _, rss, _ in self.timeline[i:i + step])),
                 gib(max(own for _, _, own in self.timeline[i:i + step])))
                for i in range(0, len(self.timeline), step)]

    def peak_between(self, start: float, end: float) -> float | None:
        values = [rss for t, rss, _ in self.timeline if start <= t <= end]
        return gib(max(values)) if values else None


def gib(value: float) -> float:
    return round(value / 2**30, 2)


def run_measured(cmd: list[str], env: dict, log: Path, timeout: float) -> dict:
    """Run ``cmd``; wall seconds, return code, load averages, and its tree's memory."""
    load = os.getloadavg()
    start = time.time()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        with TreeSampler(proc.pid) as sampler:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_tree(proc)
                code = "timeout"
            except BaseException:  # interrupted: take the command (and its Ray) down too
                _kill_tree(proc)
                raise
    wall = time.time() - start
    return {"cmd": cmd, "rc": code, "wall_s": round(wall, 1), "start": start,
            "end": start + wall, "peak_rss_gib": gib(sampler.peak_rss),
            "peak_rss_at_s": round(sampler.peak_rss_at - start, 1) if sampler.peak_rss else None,
            "peak_pss_gib": gib(sampler.peak_pss),
            "peak_breakdown": [{"pid": pid, "name": name, "rss_gib": gib(value)}
                               for value, pid, name in sampler.peak_breakdown[:8]],
            "loadavg_start": [round(x, 2) for x in load],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()], "_sampler": sampler,
            "rss_timeline": sampler.thinned(start),
            "log": str(log)}


def _kill_tree(proc: subprocess.Popen) -> None:
    with contextlib.suppress(psutil.Error):
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
    proc.wait()


def _remove_workspace(uri: str) -> None:
    from medcurate.workspace import resolve_filesystem

    with contextlib.suppress(OSError):
        filesystem, root = resolve_filesystem(uri)
        filesystem.delete_dir(root)


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


# --------------------------------------------------------------------------------------------
# one store

def select_command(run_id: str, strategy: str, uri: str, args) -> list[str]:
    cmd = [str(REPO / ".venv/bin/medcurate"), "select", run_id, "--strategy", strategy,
           "--budget-per-class", str(args.budget), "--seed", str(args.seed),
           "--workspace", uri, "--selection-id", f"bench-{strategy}"]
    if strategy in ("confounder-aware", "cluster-random"):
        cmd += ["--fit-sample", str(args.fit_sample)]
    return cmd


def selection_figures(uri: str, strategy: str, rows: int, measured: dict,
                      groups_file: Path) -> dict:
    """Per-stage figures from the selection's provenance, and the rare sub-group check."""
    import numpy as np

    from medcurate.workspace import Workspace

    workspace = Workspace(uri)
    key = f"bench-{strategy}"
    record = workspace.provenance("selections", key)
    summary = record["summary"]
    timing = summary.get("timing", {})
    figures = {"load_s": timing.get("load_s"), "select_s": timing.get("select_s"),
               "load_rows_per_s": round(rows / timing["load_s"]) if timing.get("load_s") else None,
               "selected": summary.get("selected")}
    classes = summary.get("strategy_info", {}).get("classes", {})
    if strategy == "confounder-aware":
        figures["stages_s"] = {
            stage: round(sum(c.get("seconds", {}).get(stage, 0.0) for c in classes.values()), 1)
            for stage in ("reduce", "cluster")}
    # Stage windows on the wall clock, approximate: the provenance stamps have whole seconds
    # (the true start lies in [started, started + 1)), and reading the manifest and labels
    # between load and select is timed by neither, so the select window gets 4 s of slack and
    # the publish window starts after it.
    sampler: TreeSampler = measured["_sampler"]
    started, finished = _seconds(record["started_at"]), _seconds(record["finished_at"])
    load_end = started + (timing.get("load_s") or 0)
    select_end = load_end + (timing.get("select_s") or 0) + 4
    figures["peak_rss_gib_by_stage"] = {
        "startup": sampler.peak_between(measured["start"], started + 1),
        "load": sampler.peak_between(started, load_end + 1.5),
        "select": sampler.peak_between(load_end, select_end),
        "publish": sampler.peak_between(select_end, finished + 1),
        "exit": sampler.peak_between(finished + 1, measured["end"])}
    figures["windows_s"] = {"startup": round(started - measured["start"], 1),
                            "publish": round(max(0.0, finished + 1 - select_end), 1),
                            "exit": round(measured["end"] - finished, 1)}
    table = workspace.read_table(f"{workspace.require('selections', key)}/selection.parquet",
                                 columns=["id", "label"])
    groups = np.load(groups_file)
    picked = np.array([int(i.rsplit("-", 1)[1]) for i in table.column("id").to_pylist()])
    labels = np.array(table.column("label").to_pylist())
    classes_picked = sorted(set(labels.tolist()))
    covered = sum(int((groups[picked[labels == c]] == 2).any()) for c in classes_picked)
    figures["rare_covered"] = f"{covered}/{len(classes_picked)} classes"
    return figures


def run_store(store: str, rows: int, uri: str, env: dict, args, scratch: Path) -> dict:
    print(f"\n== {store}: {rows:,} × {args.dim} into {uri}", flush=True)
    groups_file = scratch / f"{store}-{rows}-groups.npy"
    write_cmd = [sys.executable, str(Path(__file__).resolve()), "--write-only", uri,
                 "--groups-out", str(groups_file), "--rows", str(rows),
                 "--dim", str(args.dim), "--classes", str(args.classes),
                 "--seed", str(args.seed), "--shard-size", str(args.shard_size)]
    log = scratch / f"{store}-{rows}-write.log"
    measured = run_measured(write_cmd, env, log, args.timeout)
    if measured["rc"] != 0:
        raise RuntimeError(f"writing the run into {uri} failed ({measured['rc']}):\n"
                           + log.read_text(errors="replace")[-3000:])
    written = json.loads(log.read_text().strip().splitlines()[-1])
    result = {"store": store, "uri": uri, "rows": rows, "dim": args.dim,
              "shard_size": args.shard_size, "write": {
                  **written, "process_wall_s": measured["wall_s"],
                  "process_peak_rss_gib": measured["peak_rss_gib"]}, "selects": []}
    print(f"  write: {written['write_s']} s ({written['write_rows_per_s']:,} rows/s), "
          f"{written['run_bytes'] / 2**30:.2f} GiB in {written['run_files']} files "
          f"(matrix {written['matrix_bytes'] / 2**30:.2f} GiB); generate {written['generate_s']} "
          f"s; load avg {written['loadavg_start'][0]} → {written['loadavg_end'][0]}", flush=True)
    for strategy in args.strategy:
        cmd = select_command(written["run_id"], strategy, uri, args)
        log = scratch / f"{store}-{rows}-select-{strategy}.log"
        print(f"  $ {' '.join(cmd)}", flush=True)
        measured = run_measured(cmd, env, log, args.timeout)
        entry = {"strategy": strategy, **{k: v for k, v in measured.items()
                                           if not k.startswith("_") and k not in
                                           ("cmd", "start", "end")},
                 "command": " ".join(cmd)}
        if measured["rc"] == 0:
            entry.update(selection_figures(uri, strategy, rows, measured, groups_file))
        else:
            entry["log_tail"] = log.read_text(errors="replace")[-3000:]
            print(entry["log_tail"], flush=True)
        entry["meets_time_goal"] = measured["rc"] == 0 and measured["wall_s"] <= GOAL_SECONDS
        entry["meets_memory_goal"] = measured["rc"] == 0 and measured["peak_rss_gib"] <= GOAL_GIB
        result["selects"].append(entry)
        print(f"  {strategy}: rc {measured['rc']}, wall {measured['wall_s']} s, load "
              f"{entry.get('load_s')} s ({entry.get('load_rows_per_s')} rows/s), select "
              f"{entry.get('select_s')} s {entry.get('stages_s', '')}, peak RSS "
              f"{measured['peak_rss_gib']} GiB (PSS {measured['peak_pss_gib']}), by stage "
              f"{entry.get('peak_rss_gib_by_stage')}, rare {entry.get('rare_covered')}; "
              f"load avg {measured['loadavg_start'][0]} → {measured['loadavg_end'][0]}",
              flush=True)
        print(f"    time  ≤ {GOAL_SECONDS} s: {'PASS' if entry['meets_time_goal'] else 'FAIL'}"
              f"\n    peak  ≤ {GOAL_GIB:g} GiB: "
              f"{'PASS' if entry['meets_memory_goal'] else 'FAIL'}", flush=True)
    return result


# --------------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    lines = ["| rows × dim | store | write | strategy | `medcurate select` wall | load (rows/s) "
             "| select (reduce / cluster) | peak RSS tree (PSS) | load avg start → end | goals |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in report["runs"]:
        w = run["write"]
        for s in run["selects"]:
            stages = s.get("stages_s")
            select = f"{s.get('select_s')} s" + (
                f" ({stages['reduce']} / {stages['cluster']})" if stages else "")
            goals = ("✓ / ✓" if s["meets_time_goal"] and s["meets_memory_goal"] else
                     f"{'✓' if s['meets_time_goal'] else '✗'} time / "
                     f"{'✓' if s['meets_memory_goal'] else '✗'} memory")
            lines.append(
                f"| {run['rows']:,} × {run['dim']} | {run['store']} | {w['write_s']} s, "
                f"{w['run_bytes'] / 2**30:.2f} GiB | {s['strategy']} | {s['wall_s']} s | "
                f"{s.get('load_s')} s ({s.get('load_rows_per_s') or 0:,}) | {select} | "
                f"{s['peak_rss_gib']} GiB ({s['peak_pss_gib']}) | "
                f"{s['loadavg_start'][0]} → {s['loadavg_end'][0]} | {goals} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000],
                        help="one or more sizes, each into fresh workspaces")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--budget", type=int, default=100)
    parser.add_argument("--strategy", nargs="+", default=["confounder-aware"],
                        help="one or more strategies, each timed as its own select command")
    parser.add_argument("--fit-sample", type=int, default=20_000,
                        help="confounder-aware: UMAP fitted on this many per class")
    parser.add_argument("--stores", nargs="+", choices=["local", "s3"], default=["local", "s3"])
    parser.add_argument("--shard-size", type=int, default=None,
                        help="rows per shard (default: the embed pipeline's, EmbedConfig)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=tempfile.gettempdir(),
                        help="folder for the local workspace and the logs")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="kill a command after this many seconds")
    parser.add_argument("--keep", action="store_true",
                        help="keep the workspaces (the local folder; SeaweedFS's data folder)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--write-only", help=argparse.SUPPRESS)  # internal: the write subprocess
    parser.add_argument("--groups-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.shard_size = args.shard_size or default_shard_size()
    if args.write_only:
        write_only(args)
        return

    # SIGTERM ends the run through the finally below: server stopped, figures so far written
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    scratch = Path(tempfile.mkdtemp(prefix="select-from-store-", dir=args.root))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    env.update(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    report = {"machine": f"{os.cpu_count()} cores, "
                         f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
              "goals": {"wall_s": GOAL_SECONDS, "peak_rss_gib": GOAL_GIB},
              "args": {k: v for k, v in vars(args).items()
                       if k not in ("write_only", "groups_out", "json")},
              "loadavg_start": [round(x, 2) for x in os.getloadavg()], "runs": []}
    server, complete = None, False
    try:
        if "s3" in args.stores:
            sys.path.insert(0, str(REPO / "tests"))
            from s3_servers import SeaweedS3Server

            server = SeaweedS3Server()
            server.start()
            bucket = server.make_bucket("medcurate-bench")
            os.environ.update(server.env())  # this process reads provenance back
            report["s3_server"] = {"kind": server.kind, "endpoint": server.endpoint,
                                   "startup_s": round(server.startup_seconds, 1),
                                   "data_dir": str(server.tmpdir)}
        for rows in args.rows:
            for store in args.stores:
                if store == "local":
                    uri, store_env = str(scratch / f"workspace-{rows}"), env
                else:
                    uri, store_env = f"s3://{bucket}/workspace-{rows}", {**env, **server.env()}
                run = run_store(store, rows, uri, store_env, args, scratch)
                if store == "s3":
                    run["write"]["server_disk_bytes"] = sum(
                        f.stat().st_size for f in Path(server.tmpdir).rglob("*") if f.is_file())
                report["runs"].append(run)
                if not args.keep:  # room for the next size
                    _remove_workspace(uri)
        complete = True
    finally:
        if server is not None:
            server.stop(remove_tmpdir=not args.keep)
            if args.keep:
                print(f"kept SeaweedFS data in {server.tmpdir}", file=sys.stderr)
        if not args.keep:
            for folder in scratch.glob("workspace-*"):
                shutil.rmtree(folder, ignore_errors=True)
        report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        report["logs"] = str(scratch)
        table = markdown(report)
        print("\n" + table)
        if args.json:
            report.update(markdown=table, complete=complete)
            # a cut-short run does not replace a complete one's figures
            with open(args.json if complete else f"{args.json}.partial", "w") as handle:
                json.dump(report, handle, indent=2)
                handle.write("\n")
    failed = [s for r in report["runs"] for s in r["selects"]
              if not (s["meets_time_goal"] and s["meets_memory_goal"])]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
