"""The two-node test cluster (``tests/ray_cluster.py``): both nodes come up with their resources
and environment, Ray Data work of a Ray Job lands on both, ``medcurate submit`` runs a command on
it, and it fits CI's memory. (Its teardown raises if any of its processes survives.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from artefacts import assert_outputs_match_their_hashes
from ray_cluster import HEAD_RESOURCE, MARKER, WORKER_RESOURCE, TwoNodeCluster

from medcurate.workspace import Workspace

MEDCURATE = str(Path(sys.executable).with_name("medcurate"))
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")

# The entry point of a Ray Job: one task pinned to each node by its custom resource, then a Ray
# Data pipeline (CPU tasks, then an actor pool of two) whose every row records the node (and the
# probed environment variables) of the task and of the actor that handled it.
PIPELINE = """
import json, os, time
from collections import Counter
import numpy as np
import ray

ray.init()
ctx = ray.data.DataContext.get_current()
ctx.enable_progress_bars = False
names = json.loads(os.environ["PROBE_NAMES"])

def probe():
    return json.dumps([ray.get_runtime_context().get_node_id(),
                       {n: os.environ.get(n) for n in names}])

def tag(batch):
    time.sleep(0.05)
    batch["task"] = np.array([probe()] * len(batch["id"]))
    return batch

class Tag:
    def __init__(self):
        self.where = probe()
    def __call__(self, batch):
        time.sleep(0.05)
        batch["actor"] = np.array([json.dumps([self.where, os.getpid()])] * len(batch["id"]))
        return batch

@ray.remote(num_cpus=0.1)
def where():
    return json.loads(probe())

pinned = ray.get([where.options(resources={r: 0.01}).remote() for r in ("node_head", "node_worker")])
started = time.monotonic()
rows = (ray.data.range(64, override_num_blocks=16)
        .map_batches(tag, num_cpus=0.25, batch_size=4, scheduling_strategy="SPREAD")
        .map_batches(Tag, num_cpus=0.5, concurrency=2, batch_size=4,
                     scheduling_strategy="SPREAD")
        .take_all())
print(json.dumps({"driver": json.loads(probe()), "pinned": pinned, "rows": len(rows),
                  "tasks": sorted({r["task"] for r in rows}),
                  "task_rows": Counter(json.loads(r["task"])[0] for r in rows),
                  "actors": sorted({r["actor"] for r in rows}),
                  "seconds": round(time.monotonic() - started, 1)}))
"""


def run_job(cluster, script: Path, env_names: list[str], timeout_s: float = 120) -> dict:
    """Submit ``python script`` through the Jobs API, wait, return its last JSON line."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    job = client.submit_job(entrypoint=f"python {script}", runtime_env={
        "env_vars": {"PYTHONUNBUFFERED": "1", "PROBE_NAMES": json.dumps(env_names)}})
    status = wait_job(client, job, timeout_s)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", f"job {job} {status}:\n{logs[-4000:]}"
    return json.loads([line for line in logs.splitlines() if line.startswith("{")][-1])


def wait_job(client, job: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while (status := str(client.get_job_status(job).value)) not in TERMINAL:
        if time.monotonic() > deadline:
            client.stop_job(job)
            pytest.fail(f"job {job} still {status} after {timeout_s:.0f} s:\n"
                        f"{client.get_job_logs(job)[-4000:]}")
        time.sleep(0.5)
    return status


def test_two_nodes_with_their_resources(two_node_cluster):
    """Both nodes are up with their CPUs and custom resources, the auth mode of the nodes is the
    client's, and ``env=`` goes into the nodes' environment."""
    cluster = two_node_cluster
    head, worker = cluster.node_ids
    assert head != worker and len(head) == 56
    assert cluster.address.startswith("127.0.0.1:")
    assert cluster.dashboard_url.startswith("http://127.0.0.1:")
    resources = {node["node_id"]: node["resources_total"] for node in cluster.nodes()}
    assert resources[head]["CPU"] == 2 and resources[head][HEAD_RESOURCE] == 1
    assert resources[worker]["CPU"] == 2 and resources[worker][WORKER_RESOURCE] == 1
    assert os.environ["RAY_AUTH_MODE"] == cluster.auth_env["RAY_AUTH_MODE"]
    assert TwoNodeCluster(env={"AWS_ENDPOINT_URL": "http://x"}).node_env()[
        "AWS_ENDPOINT_URL"] == "http://x"
    assert {proc.name() for proc in cluster.processes()} >= {"raylet", "gcs_server"}


def test_ray_data_job_spreads_over_both_nodes(two_node_cluster, tmp_path):
    """A Ray Job: its driver is on the head; each custom resource pins a task to its node; the
    nodes' environment (``env=`` and the marker, which travel together) reaches the driver and
    every worker; Ray Data tasks (0.25 CPU) and an actor pool of two (0.5 CPU each) under
    SPREAD run on both nodes, one actor on each."""
    cluster = two_node_cluster
    script = tmp_path / "pipeline.py"
    script.write_text(PIPELINE)
    result = run_job(cluster, script, [MARKER, *cluster.extra_env])
    head, worker = cluster.node_ids
    expected = {MARKER: cluster.marker, **cluster.extra_env}
    assert result["driver"] == [head, expected]
    assert result["pinned"] == [[head, expected], [worker, expected]]
    assert result["rows"] == 64
    tasks = [json.loads(task) for task in result["tasks"]]
    actors = [json.loads(actor) for actor in result["actors"]]
    assert all(env == expected for _, env in tasks)
    assert all(json.loads(where)[1] == expected for where, _ in actors)
    assert {node for node, _ in tasks} == {head, worker}, result
    assert sorted(json.loads(where)[0] for where, _ in actors) == sorted([head, worker]), result
    print(f"\npipeline job: {result['seconds']} s; rows per task node "
          f"{ {n[:8]: c for n, c in result['task_rows'].items()} }; actors on "
          f"{[json.loads(w)[0][:8] for w, _ in actors]}; head {head[:8]}, worker {worker[:8]}")


def test_curate_submitted_to_two_nodes_with_an_object_store_workspace(two_node_cluster,
                                                                       seaweed_s3, tmp_path,
                                                                       monkeypatch):
    """What the README tells a cluster user to do, for real: ``medcurate submit curate
    --workspace s3://…`` to the cluster's Jobs API. The job succeeds, its stages ran on both
    nodes (recorded in the artefacts' provenance), and every artefact is complete on the store,
    which is all the nodes share."""
    cluster = two_node_cluster
    env = {**os.environ, **cluster.client_env()}
    env.pop("MEDCURATE_WORKSPACE", None)
    bucket = seaweed_s3.make_bucket()
    uri = f"s3://{bucket}/medcurate"
    started = time.monotonic()
    submitted = subprocess.run(
        [MEDCURATE, "submit", "curate", "--param", "budget_per_class=5", "--workspace", uri],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().splitlines()[-1]
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard_url)
    wait_job(client, job, timeout_s=600)
    seconds = time.monotonic() - started
    status = subprocess.run([MEDCURATE, "jobs", "status", job], env=env, capture_output=True,
                            text=True, timeout=60, check=False)
    assert status.returncode == 0, status.stderr
    view = json.loads(status.stdout)
    assert view["status"] == "SUCCEEDED", (view, client.get_job_logs(job)[-4000:])
    assert client.get_job_info(job).driver_node_id == cluster.head_node_id
    result = view["result"]
    assert result["ingest"]["ingested"] == 300 and result["selection"]["selected"] == 15

    for name, value in seaweed_s3.env().items():
        monkeypatch.setenv(name, value)  # this process reads the store as the nodes do
    workspace = Workspace(uri)
    collection = assert_outputs_match_their_hashes(workspace, "collections", "demo")
    run = assert_outputs_match_their_hashes(workspace, "embeddings",
                                            result["embedding"]["run_id"])
    assert_outputs_match_their_hashes(workspace, "selections",
                                      result["selection"]["selection_id"])
    nodes = {"ingest_probe": collection["summary"]["nodes"]["ingest_probe"],
             **run["summary"]["timing"]["nodes"]}
    assert set(nodes["ingest_probe"]) == set(cluster.node_ids), nodes
    assert set().union(*nodes.values()) == set(cluster.node_ids), nodes
    print(f"\nmedcurate submit curate: {seconds:.1f} s from submit to SUCCEEDED; nodes per "
          "stage (h = head, w = worker): " + ", ".join(
              f"{stage} {''.join('h' if n == cluster.head_node_id else 'w' for n in found)}"
              for stage, found in nodes.items()))


def test_memory_fits_ci(two_node_cluster):
    """Proportional memory (PSS) of all the cluster's processes, after the jobs above (Ray
    Data's stats/coordinator actors stay up between jobs)."""
    memory = two_node_cluster.memory()
    pss = sum(entry["pss"] for entry in memory.values())
    rss = sum(entry["rss"] for entry in memory.values())
    count = sum(entry["count"] for entry in memory.values())
    print(f"\n{count} processes, PSS {pss / 2**30:.2f} GiB (RSS summed {rss / 2**30:.2f} GiB), "
          f"started in {two_node_cluster.start_seconds:.1f} s; PSS MiB by process: "
          + ", ".join(f"{name} {entry['pss'] >> 20}" for name, entry in
                      sorted(memory.items(), key=lambda item: -item[1]["pss"])))
    assert pss < 3 * 2**30
