"""The HTTP API: a FastAPI app built per replica from the settings (``create_api``).

Routes live under ``/v1``. Every route but ``GET /v1/health`` needs ``Authorization: Bearer
<token>`` (compared in constant time with every configured token); ``/docs`` and
``/openapi.json`` stay open, as they describe the API and hold no data. Bodies are limited to
``max_body_bytes`` (413), pages to ``max_page_size`` (422). A bad request is a 4xx with a message:
422 for invalid input, 403 for a path outside the data roots, 404 for an unknown artefact or
job, 409 for an artefact that exists (also the later of two writers of one id), 429 (with
Retry-After) while ``max_running_jobs`` of the service's jobs are pending or running, 503 when
the Ray Jobs API is down; anything unexpected is a 500 with a generic message, its traceback in
the replica's log only. Messages say what was refused, not what exists: a 404 names the
missing artefact only, never the others nor the workspace.

Heavy work runs as Ray jobs (``service.jobs``): every ``POST /v1/jobs``, every transferability
request, and selections over more than ``sync_select_max_rows`` embeddings. A smaller
selection runs in the request, on a worker thread (FastAPI runs these ``def`` routes in its
thread pool), so the replica's event loop keeps serving. ``?wait=true`` waits asynchronously
(the job is polled from the event loop), so waiting requests hold no thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pyarrow.csv as pacsv
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

import medcurate
from medcurate.commands import COMMANDS
from medcurate.config import MAX_PAGE_SIZE, ScoreConfig, SelectConfig
from medcurate.errors import (AlreadyExists, MedcurateError, NotFound, dotted_location,
                              error_text, validation_message)
from medcurate.workspace import ARTEFACT_KINDS, ARTEFACTS, Workspace
from service.jobs import TERMINAL, JobsGateway, JobsUnavailable, QuotaExceeded
from service.paths import PathPolicy, PathRefused, refuse_relative
from service.reports import ReportDrawer
from service.settings import Settings

if TYPE_CHECKING:
    from medcurate.select.run import InputsCache

logger = logging.getLogger("medcurate.service")

DEFAULT_PAGE_SIZE = 100
ERROR_STATUS = ((PathRefused, 403), (NotFound, 404), (AlreadyExists, 409),
                (QuotaExceeded, 429), (JobsUnavailable, 503), (MedcurateError, 422))
RETRY_AFTER_S = 30  # what a 429 asks a client to wait before submitting again
MAX_WAITING = 64  # ?wait=true requests a replica holds at once; more answer 202 at once
WAIT_POLL_S = (0.5, 5.0)  # first and longest interval between polls of a waited-for job
# Artefact kinds with generic list and detail routes; jobs are Ray's (see /v1/jobs).
LISTED_KINDS = tuple(kind for kind in ARTEFACT_KINDS if kind != "jobs")
REPORT_RETRY_S = 2  # what a 202 for a report being drawn asks a client to wait


@dataclass(frozen=True)
class Service:
    settings: Settings
    workspace: Workspace
    paths: PathPolicy
    jobs: JobsGateway
    inputs: InputsCache  # recently used embedding runs, in memory
    reports: ReportDrawer


def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]
bearer = HTTPBearer(auto_error=False, description="A token of the service's tokens file or "
                    "MEDCURATE_API_TOKENS.")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()  # equal lengths for compare_digest


def authorize(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                       Depends(bearer)]) -> None:
    """Compares with every configured token (no early exit), so timing tells nothing."""
    presented = _digest(credentials.credentials if credentials else "")
    matched = False
    for token in service(request).settings.tokens:
        matched |= hmac.compare_digest(presented, _digest(token.get_secret_value()))
    if not credentials or not matched:
        raise HTTPException(401, "missing or invalid bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


public = APIRouter(prefix="/v1")
v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])


# -- pages ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Page:
    page: int
    page_size: int

    def of(self, items: list) -> dict:
        start = (self.page - 1) * self.page_size
        return {"page": self.page, "page_size": self.page_size, "total": len(items),
                "items": items[start:start + self.page_size]}


def checked_page(settings: Settings, page: int, page_size: int) -> Page:
    if page_size > settings.max_page_size:
        raise HTTPException(422, f"page_size {page_size} is over this service's limit of "
                                 f"{settings.max_page_size}")
    return Page(page, page_size)


def page_query(svc: ServiceDep, page: Annotated[int, Query(ge=1)] = 1,
               page_size: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE
               ) -> Page:
    return checked_page(svc.settings, page, page_size)


PageDep = Annotated[Page, Depends(page_query)]


# -- request bodies -------------------------------------------------------------------------
class AbsolutePaths(BaseModel):
    """Refuses relative paths in ``Location`` fields before they are made absolute."""

    @model_validator(mode="before")
    @classmethod
    def _absolute(cls, data):
        refuse_relative(cls, data)
        return data


class SelectRequest(AbsolutePaths, SelectConfig):
    page: int = Field(1, ge=1, description="Page of selected ids to return.")
    page_size: int = Field(DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE, description="Ids per page "
                           "(at most the service's max_page_size).")


class ScoreRequest(AbsolutePaths, ScoreConfig):
    pass


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal[tuple(COMMANDS)] = Field(..., description="Command kind.")  # type: ignore[valid-type]
    params: dict[str, Any] = Field(default_factory=dict, description="The command's config "
                                   "fields, as `medcurate <kind> --help` lists them.")


# -- routes ---------------------------------------------------------------------------------
@public.get("/health")
async def health() -> dict:
    """On the event loop, no thread: answers while every worker thread is busy."""
    return {"status": "ok", "version": medcurate.__version__}


def _record(workspace: Workspace, kind: str, key: str) -> dict:
    workspace.require(kind, key)
    return {"id": key, **workspace.provenance(kind, key)}


def _lister(kind: str):
    def list_artefacts(svc: ServiceDep, page: PageDep) -> dict:
        listing = page.of(svc.workspace.list(kind))
        listing["items"] = [{"id": key, "url": f"/v1/{kind}/{key}",
                             "summary": svc.workspace.provenance(kind, key).get("summary", {})}
                            for key in listing["items"]]
        return listing
    return list_artefacts


def _getter(kind: str):
    def get_artefact(key: str, svc: ServiceDep) -> dict:
        return _record(svc.workspace, kind, key)
    return get_artefact


for _kind in LISTED_KINDS:
    v1.add_api_route(f"/{_kind}", _lister(_kind), methods=["GET"], summary=f"List {_kind}",
                     operation_id=f"list_{_kind}")
    if _kind != "selections":  # selections have their own detail route below
        v1.add_api_route(f"/{_kind}/{{key}}", _getter(_kind), methods=["GET"],
                         summary=f"One of the {_kind}: its provenance",
                         operation_id=f"get_{_kind}")


def selection_body(workspace: Workspace, selection_id: str, page: Page,
                   summary: dict | None = None) -> dict:
    """The summary (counts per class, group, metadata value), the selected ids paged, links."""
    from medcurate.select.run import SUMMARY_FILE, read_selection

    ids = read_selection(workspace, selection_id).column("id").to_pylist()
    summary = summary or workspace.read_json(workspace.path("selections", selection_id,
                                                            SUMMARY_FILE))
    url = f"/v1/selections/{selection_id}"
    return {**summary, "selection_id": selection_id, "ids": page.of(ids),
            "links": {"self": url, "manifest": f"{url}/manifest", "report": f"{url}/report"}}


def submit(svc: Service, kind: str, config: BaseModel) -> str:
    """Submit a job within the service's quota (``QuotaExceeded``: 429)."""
    return svc.jobs.submit(kind, config, svc.settings.workspace,
                           limit=svc.settings.max_running_jobs, retry_after_s=RETRY_AFTER_S)


QUOTA_RESPONSE = {429: {"description": "The service's jobs are at their limit; see "
                        "Retry-After"}}


def accepted(job_id: str, kind: str) -> JSONResponse:
    return JSONResponse(status_code=202, headers={"Location": f"/v1/jobs/{job_id}"},
                        content={"job_id": job_id, "kind": kind, "status": "PENDING",
                                 "links": {"self": f"/v1/jobs/{job_id}",
                                           "logs": f"/v1/jobs/{job_id}/logs"}})


@v1.post("/select", status_code=201, responses={202: {"description": "Submitted as a job"},
                                                **QUOTA_RESPONSE})
def select(body: SelectRequest, svc: ServiceDep, response: Response):
    """Select in the request when the run has at most ``sync_select_max_rows`` rows (201, the
    selection; its report is drawn on the first ``GET …/report``); else submit it as a job
    (202, the job). The run is read once and kept in the replica's memory (``InputsCache``)."""
    from medcurate.select.run import run_selection

    page = checked_page(svc.settings, body.page, body.page_size)
    config = svc.paths.confine(SelectConfig.model_validate(
        body.model_dump(exclude={"page", "page_size"}, exclude_unset=True)))
    rows = _record(svc.workspace, "embeddings", config.embedding_run)["summary"]["rows"]
    if rows > svc.settings.sync_select_max_rows:
        return accepted(submit(svc, "select", config), "select")
    summary = run_selection(config, svc.workspace, inputs=svc.inputs, report=False)
    response.headers["Location"] = f"/v1/selections/{summary['selection_id']}"
    return selection_body(svc.workspace, summary["selection_id"], page, summary)


@v1.get("/selections/{selection_id}")
def get_selection(selection_id: str, svc: ServiceDep, page: PageDep) -> dict:
    return selection_body(svc.workspace, selection_id, page)


@v1.get("/selections/{selection_id}/manifest", response_class=Response,
        responses={200: {"content": {"application/vnd.apache.parquet": {}, "text/csv": {}}}})
def get_manifest(selection_id: str, svc: ServiceDep,
                 format: Literal["parquet", "csv"] = "parquet") -> Response:
    """``selection.parquet`` as it is, or as CSV."""
    from medcurate.select.run import SELECTION_FILE, read_selection

    name = f"{selection_id}.{format}"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    if format == "csv":
        buffer = io.BytesIO()
        pacsv.write_csv(read_selection(svc.workspace, selection_id), buffer)
        return Response(buffer.getvalue(), media_type="text/csv", headers=headers)
    path = f"{svc.workspace.require('selections', selection_id)}/{SELECTION_FILE}"
    with svc.workspace.fs.open_input_stream(path) as stream:
        return Response(stream.read(), media_type="application/vnd.apache.parquet",
                        headers=headers)


@v1.get("/selections/{selection_id}/report", response_class=HTMLResponse,
        responses={202: {"description": "Being drawn; see Retry-After"}})
def get_report(selection_id: str, svc: ServiceDep):
    """``report.html``, served with a policy that runs the page's own inline scripts (its
    interactive maps) and nothing else. A selection made over HTTP has its report drawn on
    the first request for it, as a Ray task: 202 with ``Retry-After`` until it is there."""
    from medcurate.report import report_policy
    from medcurate.select.run import REPORT_FILE

    if not svc.reports.ready(selection_id):
        return JSONResponse(status_code=202, headers={"Retry-After": str(REPORT_RETRY_S)},
                            content={"selection_id": selection_id, "status": "drawing",
                                     "retry_after_s": REPORT_RETRY_S})
    page = svc.workspace.read_bytes(svc.workspace.path("selections", selection_id,
                                                       REPORT_FILE))
    return HTMLResponse(page, headers={"Content-Security-Policy": report_policy(page)})


@v1.post("/transferability", responses={202: {"description": "Submitted; not finished yet"},
                                        **QUOTA_RESPONSE})
async def transferability(body: ScoreRequest, svc: ServiceDep, request: Request,
                          wait: bool = False):
    """Scoring always runs as a job (it embeds the probe with every zoo model and runs torch),
    answered 202. With ``?wait=true`` the request waits up to ``wait_timeout_s`` for the job:
    200 with the job and its result (scores and ranking) once it has finished, else 202. The
    wait holds no thread (the job is polled between ``asyncio.sleep``s, each Ray Jobs call on a
    worker thread); beyond ``MAX_WAITING`` waits at once in a replica, the answer is 202."""
    config = await run_in_threadpool(svc.paths.confine, body)  # reads the zoo file
    job_id = await run_in_threadpool(submit, svc, "score", config)
    state = request.app.state
    if not wait or state.waiting >= MAX_WAITING:
        return accepted(job_id, "score")
    state.waiting += 1  # only the event loop's thread counts
    try:
        deadline = time.monotonic() + svc.settings.wait_timeout_s
        delay = WAIT_POLL_S[0]
        while True:
            if await run_in_threadpool(svc.jobs.status, job_id) in TERMINAL:
                return await run_in_threadpool(job_detail, job_id, svc)
            left = deadline - time.monotonic()
            if left <= 0:
                return accepted(job_id, "score")
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 1.5, WAIT_POLL_S[1])
    finally:
        state.waiting -= 1


@v1.post("/jobs", status_code=202, responses=QUOTA_RESPONSE)
def submit_job(body: JobRequest, svc: ServiceDep):
    """Validate ``params`` against the kind's schema (422 with the message), check its paths
    (403), then submit ``python -m jobs.run KIND ...`` to Ray Jobs (429 at the job quota)."""
    config_cls = COMMANDS[body.kind].config
    refuse_relative(config_cls, body.params)
    config = svc.paths.confine(config_cls.model_validate(body.params))
    return accepted(submit(svc, body.kind, config), body.kind)


@v1.get("/jobs")
def list_jobs(svc: ServiceDep, page: PageDep) -> dict:
    return page.of([svc.jobs.view(info) for info in svc.jobs.list()])


@v1.get("/jobs/{job_id}")
def job_detail(job_id: str, svc: ServiceDep) -> dict:
    """Status; while running the latest progress line; when done, the result (the job's last
    stdout line, JSON) and a link to the artefact it made, or the error."""
    view = svc.jobs.describe(job_id)
    if view.get("error"):
        view["error"] = public_message(svc.workspace, view["error"])
    artefact = _artefact_of(svc.workspace, view)
    if artefact:
        view["artefact"] = {"kind": artefact[0], "id": artefact[1],
                            "url": f"/v1/{artefact[0]}/{artefact[1]}"}
    return view


def _artefact_of(workspace: Workspace, view: dict) -> tuple[str, str] | None:
    """The artefact a finished job made: its result's key field for the kind the command
    publishes (``ARTEFACTS``), where that names a live artefact."""
    kind = COMMANDS[view["kind"]].artefact if view["kind"] in COMMANDS else None
    result = view.get("result") or {}
    for field in ARTEFACTS[kind].key_fields if kind else ():
        key = result.get(field)
        try:
            if isinstance(key, str) and workspace.exists(kind, key):
                return kind, key
        except MedcurateError:  # not a valid key: not this artefact
            continue
    return None


@v1.get("/jobs/{job_id}/logs", response_class=PlainTextResponse)
def job_logs(job_id: str, svc: ServiceDep) -> PlainTextResponse:
    return PlainTextResponse(svc.jobs.logs(job_id))


@v1.delete("/jobs/{job_id}")
def stop_job(job_id: str, svc: ServiceDep) -> dict:
    stopped = svc.jobs.stop(job_id)
    return {**svc.jobs.view(svc.jobs.info(job_id)), "stopped": stopped}


# -- errors and limits ----------------------------------------------------------------------
def _finite(value):
    """NaN and infinities (possible in provenance and scores) become null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


class FiniteJSONResponse(JSONResponse):
    def render(self, content) -> bytes:
        return json.dumps(_finite(content), allow_nan=False, separators=(",", ":")).encode()


_NOT_FOUND_TAIL = re.compile(r" in workspace | \(known: ")


def public_message(workspace: Workspace, message: str, not_found: bool = False) -> str:
    """A message for any token holder: what was refused, not what exists. The workspace's
    ``require`` lists the artefacts it knows (useful at the CLI): a 404 keeps only
    'no <kind> named <key>'; and the workspace's location is never shown."""
    if not_found or message.startswith("no "):
        message = _NOT_FOUND_TAIL.split(message, maxsplit=1)[0]
    for where in sorted({workspace.uri, workspace.root} - {""}, key=len, reverse=True):
        message = message.replace(where, "the workspace")
    return message


def medcurate_error(request: Request, exc: MedcurateError) -> JSONResponse:
    status = next(code for error, code in ERROR_STATUS if isinstance(exc, error))
    headers = ({"Retry-After": str(exc.retry_after_s)} if isinstance(exc, QuotaExceeded)
               else None)
    if isinstance(exc, JobsUnavailable):  # its address and auth settings are the operator's
        logger.warning("%s %s: %s", request.method, request.url.path, exc)
        message = "the Ray Jobs API is unavailable; retry later (the service log has details)"
    else:
        message = public_message(service(request).workspace, str(exc),
                                 isinstance(exc, NotFound))
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def validation_error(request: Request, exc: RequestValidationError | ValidationError):
    errors = [{"loc": list(e["loc"]), "msg": error_text(e), "type": e["type"]}
              for e in exc.errors()]
    detail = validation_message(exc, location=dotted_location)
    return JSONResponse({"detail": detail or "invalid request", "errors": errors},
                        status_code=422)


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` (declared or sent) is a 413, read no further."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"},
                                status_code=413)
        await response(scope, receive, send)


class Shield:
    """ASGI middleware: an unexpected exception is logged with its traceback and answered with a
    generic 500, so no internals reach the client."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await JSONResponse({"detail": "internal error; the service log has the details"},
                               status_code=500)(scope, receive, send)


def create_api(settings: Settings) -> FastAPI:
    from medcurate.select.run import InputsCache

    api = FastAPI(title="medcurate", version=medcurate.__version__,
                  description=__doc__.split("\n\n")[1],
                  default_response_class=FiniteJSONResponse)
    workspace = Workspace(settings.workspace)
    api.state.service = Service(settings, workspace,
                                PathPolicy([*settings.data_roots, settings.workspace]),
                                JobsGateway(settings.jobs_address, settings.job_cpus),
                                InputsCache(settings.run_cache_bytes), ReportDrawer(workspace))
    api.state.waiting = 0  # ?wait=true requests now waiting (see transferability)
    api.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    api.add_middleware(Shield)  # outermost: also covers the body limit
    api.add_exception_handler(MedcurateError, medcurate_error)
    api.add_exception_handler(RequestValidationError, validation_error)
    api.add_exception_handler(ValidationError, validation_error)
    api.include_router(public)
    api.include_router(v1)
    return api
