"""``python -m jobs.run``, the entry point of every Ray job, run directly: the result is the last
stdout line as JSON; bad input is one ``error:`` line and exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from medcurate.synthetic import write_embedding_run
from medcurate.workspace import Workspace


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.run", *args], capture_output=True,
                          text=True, timeout=300, check=False)


@pytest.mark.parametrize("args, message", [
    (["no-such-kind"], "unknown command kind 'no-such-kind'"),
    (["select", "--params-json", "{not json"], "--params-json is not valid JSON"),
    (["select", "--params-json", "[1]"], "must be a JSON object"),
    (["select", "--params-json", '{"budget_per_class": 0}'], "--budget-per-class"),
    (["select", "--params-json", '{"embedding_run": "nope", "budget_per_class": 2}'],
     "no embedding named 'nope'"),
])
def test_bad_input_is_one_error_line(tmp_path, args, message):
    result = run_job(*args, "--workspace", str(tmp_path / "ws"))
    assert result.returncode == 2 and result.stdout == ""
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr
    assert "Traceback" not in result.stderr


def test_result_is_the_last_stdout_line(tmp_path):
    workspace = Workspace(str(tmp_path / "ws"))
    run_id = write_embedding_run(workspace, "syn", np.random.default_rng(0).normal(size=(90, 8)),
                                 [f"c{i % 3}" for i in range(90)])
    result = run_job("select", "--params-json", json.dumps(
        {"embedding_run": run_id, "budget_per_class": 4, "strategy": "stratified"}),
        "--workspace", workspace.uri)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["selected"] == 12 and workspace.exists("selections", summary["selection_id"])
    assert "running select" in result.stderr
