"""Commands as Ray jobs: their one entry point, submission, and how a job reads back.

Every job runs ``python -m jobs.run KIND --params-json JSON [--workspace ROOT]`` through the Ray
Jobs API (the dashboard, ``http://HEAD:8265``), so the cluster's ``python`` must have medcurate
installed; a job's state lives in Ray, so it outlives the service that submitted it. The HTTP
service and ``medcurate submit`` / ``medcurate jobs`` both go through :class:`JobsGateway`.
A job's result is the last line of its output that is a JSON object (``jobs.run`` prints it
last); its error, the last ``error: ...`` line.

Every job declares the CPUs of its driver (``entrypoint_num_cpus``), so Ray starts it only on a
node with them free and queues it (PENDING) until then, instead of starting every driver on the
head at once. The HTTP service also caps its own jobs: ``submit(..., limit=K)`` refuses with
:class:`QuotaExceeded` while K jobs it submitted for its workspace are pending or running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import threading
from datetime import UTC, datetime

from pydantic import BaseModel

from medcurate.errors import MedcurateError, NotFound

KIND_KEY, WORKSPACE_KEY = "medcurate_kind", "medcurate_workspace"  # job metadata
SUBMITTER_KEY = "medcurate_submitter"  # "service" for the HTTP service's jobs (its quota)
DEFAULT_JOB_CPUS = 0.2  # a job driver's CPUs (entrypoint_num_cpus); see Settings.job_cpus
PASSED_ENV = ("RAY_AUTH_MODE", "MEDCURATE_BACKEND", "MEDCURATE_MAX_IMAGE_BYTES",
              "MEDCURATE_MAX_DECOMPRESSED_BYTES")  # the submitter's, where set
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # Ray's ids; anything else never reaches its API
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsUnavailable(MedcurateError):
    """The Ray Jobs API cannot be reached or refused the call (the service answers 503)."""


class QuotaExceeded(MedcurateError):
    """As many jobs as allowed are pending or running (the service answers 429)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _auth_message(address: str, error: str) -> str:
    """A Ray Jobs API with token auth refused the call: say which setting is wrong."""
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    if error.startswith("Authentication failed"):  # 403: a token was sent but is not the one
        return (f"the Ray Jobs API at {address} refused the Ray auth token (RAY_AUTH_MODE="
                f"{mode}): use the cluster's token (RAY_AUTH_TOKEN, or the file "
                "RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token)")
    return (f"the Ray Jobs API at {address} requires a Ray auth token and none was sent "
            f"(RAY_AUTH_MODE={mode}): export RAY_AUTH_MODE=token with the cluster's token in "
            "RAY_AUTH_TOKEN (or ~/.ray/auth_token)")


def entrypoint(kind: str, params: dict, workspace: str | None) -> str:
    parts = ["python", "-m", "jobs.run", kind, "--params-json",
             json.dumps(params, separators=(",", ":"))]
    return shlex.join(parts + (["--workspace", workspace] if workspace else []))


def job_params(config: BaseModel) -> dict:
    """What a job gets: the fields given (or resolved) explicitly, as JSON values."""
    return config.model_dump(mode="json", exclude_unset=True)


def _iso(millis: int | None) -> str | None:
    return None if millis is None else datetime.fromtimestamp(
        millis / 1000, UTC).isoformat(timespec="seconds")


def _lines(logs: str) -> list[str]:
    return [line.strip() for line in logs.splitlines() if line.strip()]


def job_result(logs: str) -> dict | None:
    for line in reversed(_lines(logs)):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


_RAY_LOG_LINE = re.compile(r"[\[(]|\d{4}-\d\d-\d\d[ T]")  # Ray's own, timestamped or tagged


def job_progress(logs: str) -> str | None:
    """The job's latest line of its own (Ray's log lines skipped)."""
    return next((line for line in reversed(_lines(logs)) if not _RAY_LOG_LINE.match(line)), None)


def job_error(logs: str) -> str | None:
    return next((line.removeprefix("error: ") for line in reversed(_lines(logs))
                 if line.startswith("error: ")), None)


def _status(info) -> str:
    return str(getattr(info.status, "value", info.status))


class JobsGateway:
    """Ray Jobs API calls for medcurate's jobs; other jobs on the cluster are not visible."""

    def __init__(self, address: str, job_cpus: float = DEFAULT_JOB_CPUS):
        self.address, self.job_cpus = address, job_cpus
        self._client = None
        self._lock = threading.Lock()
        self._submit_lock = threading.Lock()  # quota check and submission as one step

    def _call(self, method: str, *args, **kwargs):
        """One client call; unreachable or failing API → ``JobsUnavailable``, 404 → NotFound;
        a cluster with token auth refusing us → ``JobsUnavailable`` naming RAY_AUTH_MODE."""
        from ray.exceptions import AuthenticationError

        try:
            with self._lock:  # the client checks the API when made: made on first use
                if self._client is None:
                    from ray.job_submission import JobSubmissionClient

                    self._client = JobSubmissionClient(self.address)
            return getattr(self._client, method)(*args, **kwargs)
        except AuthenticationError as exc:
            raise JobsUnavailable(_auth_message(self.address, str(exc))) from None
        except OSError as exc:
            raise JobsUnavailable(f"the Ray Jobs API at {self.address} cannot be reached "
                                  f"({type(exc).__name__}); is the cluster up with its "
                                  "dashboard?") from None
        except RuntimeError as exc:
            if "status code 404" in str(exc):
                raise NotFound(f"no job {args[0] if args else ''!r}") from None
            raise JobsUnavailable(f"the Ray Jobs API at {self.address} failed: {exc}") from None

    def submit(self, kind: str, config: BaseModel, workspace: str | None,
               limit: int | None = None, retry_after_s: int = 30) -> str:
        """Submit a validated config; returns the job id. With ``limit`` (the HTTP service) the
        job counts against the service's quota: ``QuotaExceeded`` while ``limit`` of the
        service's jobs for ``workspace`` are pending or running. Across replicas the check is
        not atomic: at most one job per replica over ``limit``."""
        env = {"PYTHONUNBUFFERED": "1",
               **{name: os.environ[name] for name in PASSED_ENV if name in os.environ}}
        metadata = {KIND_KEY: kind, WORKSPACE_KEY: workspace or ""}
        if limit is not None:
            metadata[SUBMITTER_KEY] = "service"
        with self._submit_lock if limit is not None else contextlib.nullcontext():
            if limit is not None:
                active = self.active(workspace)
                if active >= limit:
                    raise QuotaExceeded(f"{active} jobs of this service are pending or running, "
                                        f"its limit; retry when one has finished",
                                        retry_after_s)
            return self._call("submit_job",
                              entrypoint=entrypoint(kind, job_params(config), workspace),
                              runtime_env={"env_vars": env}, metadata=metadata,
                              entrypoint_num_cpus=self.job_cpus or None)

    def active(self, workspace: str | None) -> int:
        """The service's jobs for ``workspace`` that are pending or running."""
        return sum(1 for job in self.list()
                   if job.metadata.get(SUBMITTER_KEY) == "service"
                   and job.metadata.get(WORKSPACE_KEY) == (workspace or "")
                   and _status(job) not in TERMINAL)

    def info(self, job_id: str):
        if not _JOB_ID.fullmatch(job_id):
            raise NotFound(f"no job {job_id!r}")
        info = self._call("get_job_info", job_id)
        if KIND_KEY not in (info.metadata or {}):
            raise NotFound(f"no job {job_id!r}")
        return info

    def list(self) -> list:
        jobs = [job for job in self._call("list_jobs") if KIND_KEY in (job.metadata or {})]
        return sorted(jobs, key=lambda job: job.start_time or 0, reverse=True)

    def logs(self, job_id: str) -> str:
        self.info(job_id)
        return self._call("get_job_logs", job_id)

    def stop(self, job_id: str) -> bool:
        self.info(job_id)
        return self._call("stop_job", job_id)

    def status(self, job_id: str) -> str:
        return _status(self.info(job_id))

    def view(self, info, logs: str | None = None) -> dict:
        """A job as the API shows it; with its logs: the result, error or latest progress line."""
        status = _status(info)
        view = {"job_id": info.submission_id, "kind": info.metadata.get(KIND_KEY),
                "status": status, "message": info.message,
                "submitted_at": _iso(info.start_time), "finished_at": _iso(info.end_time)}
        if logs is not None:
            if status == "SUCCEEDED":
                view["result"] = job_result(logs)
            elif status == "FAILED":
                view["error"] = job_error(logs)
            elif status not in TERMINAL:
                view["progress"] = job_progress(logs)
        return view

    def describe(self, job_id: str) -> dict:
        info = self.info(job_id)
        return self.view(info, self._call("get_job_logs", job_id))
