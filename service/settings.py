"""The service's settings in one pydantic class, read from builder args / CLI flags over env vars.

Every field has an env var ``MEDCURATE_<FIELD>``: ``MEDCURATE_WORKSPACE``,
``MEDCURATE_DATA_ROOTS`` (folders separated by ``os.pathsep``), ``MEDCURATE_JOBS_ADDRESS``,
``MEDCURATE_SYNC_SELECT_MAX_ROWS``, ...; tokens come from ``MEDCURATE_API_TOKENS`` (comma list)
or ``MEDCURATE_TOKENS_FILE`` (one token a line, ``#`` comments; like ssh with a private key,
the file is refused unless only its owner may read it: ``chmod 600``). Local paths are made
absolute and resolved where the settings are built (the driver): replicas run in another
directory.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from medcurate.config import MAX_PAGE_SIZE
from medcurate.errors import MedcurateError, dotted_location, validation_message
from medcurate.workspace import DEFAULT_WORKSPACE

DEFAULT_JOBS_ADDRESS = "http://127.0.0.1:8265"
MIN_TOKEN_LENGTH = 16


def _split(separator: str):
    """A list field that also takes one string, as env vars and ``serve run key=value`` give."""
    def split(value):
        if isinstance(value, str):
            return [part.strip() for part in value.split(separator) if part.strip()]
        return value
    return BeforeValidator(split)


def local_or_uri(value: str) -> str:
    """URIs stay as given; local paths become absolute with symlinks resolved."""
    if "://" in value and not value.startswith("file://"):
        return value.rstrip("/")
    return os.path.realpath(Path(value.removeprefix("file://")).expanduser())


def read_tokens(path: str) -> list[str]:
    """One token a line; blank lines and lines starting with ``#`` (after leading blanks) are
    not tokens. A file that its group or others may read or write is refused, as ssh refuses
    such a private key: the tokens in it are as good as published."""
    file = Path(path).expanduser()
    try:
        with file.open(encoding="utf-8") as stream:
            mode = stat.S_IMODE(os.fstat(stream.fileno()).st_mode)
            if mode & 0o077:
                raise MedcurateError(
                    f"the tokens file {path} is accessible by its group or others (mode "
                    f"{mode:04o}); make it private with `chmod 600 {path}`") from None
            lines = stream.read().splitlines()
    except OSError as exc:
        raise MedcurateError(f"cannot read the tokens file {path}: {exc.strerror}") from None
    tokens = (line.strip() for line in lines)
    return [token for token in tokens if token and not token.startswith("#")]


class Settings(BaseModel):
    """Everything a replica needs; built once by the driver and passed to every replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    workspace: str = Field(DEFAULT_WORKSPACE, description="Workspace root: local path or URI.")
    data_roots: Annotated[list[str], _split(os.pathsep)] = Field(
        default_factory=list, description="Folders (or URI prefixes) whose files requests may "
        "name, besides the workspace.")
    tokens: Annotated[list[SecretStr], _split(",")] = Field(
        default_factory=list, validate_default=True, description="Bearer tokens accepted by "
        "every route but /v1/health; at least one.")
    jobs_address: str = Field(DEFAULT_JOBS_ADDRESS, description="Ray Jobs API (the dashboard).")
    sync_select_max_rows: int = Field(200_000, ge=0, description="Largest embedding run "
                                      "POST /v1/select selects from in the request; larger "
                                      "ones become a job.")
    max_page_size: int = Field(1000, ge=1, le=MAX_PAGE_SIZE, description="Largest page of ids "
                               f"a request may ask (at most {MAX_PAGE_SIZE:,}).")
    max_body_bytes: int = Field(1 << 20, ge=1, description="Largest request body (413 above).")
    run_cache_bytes: int = Field(2 << 30, ge=0, description="Memory each replica keeps "
                                 "recently used embedding runs in (least recently used out "
                                 "first; 0 reads the run on every request).")
    replicas: int = Field(1, ge=1, description="Serve replicas of the API, each a process: a "
                          "selection in the request is CPU-bound, so throughput grows with "
                          "replicas up to the cores.")
    wait_timeout_s: float = Field(300.0, gt=0, le=3600, description="How long ?wait=true holds "
                                  "a request for its job before answering 202 (the wait holds "
                                  "no thread: it polls the job asynchronously).")
    max_running_jobs: int = Field(4, ge=1, description="Jobs of this service (its workspace) "
                                  "that may be pending or running at once; a request for "
                                  "another job is answered 429 with Retry-After.")
    job_cpus: float = Field(0.2, ge=0, description="CPUs each job's driver declares to Ray "
                            "(entrypoint_num_cpus): Ray starts a job only where they are free "
                            "and queues it (PENDING) until then. The job's own tasks and "
                            "actors declare theirs apart, so on a small head keep "
                            "max_running_jobs x job_cpus + 0.1 (the replica) <= CPUs - 1, "
                            "or the jobs' 1-CPU tasks find no CPU.")

    @field_validator("workspace")
    @classmethod
    def _workspace(cls, value: str) -> str:
        return local_or_uri(value)

    @field_validator("data_roots")
    @classmethod
    def _roots(cls, values: list[str]) -> list[str]:
        roots = [local_or_uri(value) for value in values]
        missing = [root for root in roots if "://" not in root and not os.path.isdir(root)]
        if missing:
            raise ValueError(f"data root(s) not found: {', '.join(missing)}")
        return roots

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, values: list[SecretStr]) -> list[SecretStr]:
        if not values:
            raise ValueError("no API tokens: set MEDCURATE_API_TOKENS or MEDCURATE_TOKENS_FILE "
                             "(--tokens-file)")
        if any(len(token.get_secret_value()) < MIN_TOKEN_LENGTH for token in values):
            raise ValueError(f"API tokens need {MIN_TOKEN_LENGTH} characters or more "
                             "(e.g. `openssl rand -hex 32`)")
        return values

    @classmethod
    def load(cls, args: Mapping[str, Any] | None = None) -> Settings:
        """``args`` (builder args or CLI flags; None means unset) over the env vars; in each of
        the two, explicit tokens over a tokens file."""
        names = {field: f"MEDCURATE_{field.upper()}" for field in [*cls.model_fields,
                                                                   "tokens_file"]}
        names["tokens"] = "MEDCURATE_API_TOKENS"
        env = {field: os.environ[name] for field, name in names.items() if name in os.environ}
        values = {**_with_file_tokens(env), **_with_file_tokens(args or {})}
        try:
            return cls(**values)
        except ValidationError as exc:
            raise MedcurateError(validation_message(exc, location=dotted_location)) from None


def _with_file_tokens(values: Mapping[str, Any]) -> dict:
    values = {key: value for key, value in values.items() if value is not None}
    tokens_file = values.pop("tokens_file", None)
    if tokens_file and "tokens" not in values:
        values["tokens"] = read_tokens(tokens_file)
    return values
