"""The ``medcurate`` program: the library's commands (``medcurate.cli``) plus ``serve``,
``submit`` and ``jobs``, the HTTP service and cluster jobs from the command line. Jobs take
the same config schemas as the local commands and are validated here before anything is sent.

The console script runs :func:`main`. These commands live here, not in the library, so that
the arrows run one way: this front end imports ``medcurate.cli`` and ``service``; the library
imports neither.
"""

from __future__ import annotations

import json
import logging
import signal
import time
import typing

import typer

from medcurate import cli
from medcurate.commands import command
from medcurate.config import absolute_location
from medcurate.errors import MedcurateError

SERVE_APP_NAME = "medcurate"
AddressOption = typing.Annotated[str, typer.Option(
    "--address", envvar="MEDCURATE_JOBS_ADDRESS",
    help="Ray Jobs API of the cluster (its dashboard; default http://127.0.0.1:8265).")]
ServedWorkspace = typing.Annotated[str | None, typer.Option(
    "--workspace", envvar="MEDCURATE_WORKSPACE",
    help="Workspace the service serves and its jobs write (default ./medcurate-workspace).")]
JobWorkspace = typing.Annotated[str | None, typer.Option(
    "--workspace", envvar="MEDCURATE_WORKSPACE",
    help="Workspace root as the cluster sees it (default: the job's MEDCURATE_WORKSPACE).")]
jobs_app = typer.Typer(help="List, inspect and stop the cluster's medcurate jobs.",
                       no_args_is_help=True)


def main() -> None:
    """``medcurate``: the library's CLI with serve, submit and jobs added."""
    cli.app.command("serve")(serve_command)
    cli.app.command("submit")(submit_command)
    cli.app.add_typer(jobs_app, name="jobs")
    cli.main()


def _gateway(address: str | None):
    from service.jobs import JobsGateway
    from service.settings import DEFAULT_JOBS_ADDRESS

    return JobsGateway(address or DEFAULT_JOBS_ADDRESS)


def serve_command(
    host: typing.Annotated[str, typer.Option(help="Address the HTTP proxy binds.")] = "127.0.0.1",
    port: typing.Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    workspace: ServedWorkspace = None,
    data_root: typing.Annotated[list[str] | None, typer.Option(
        help="Folder (or URI prefix) requests may name files in; repeatable "
             "(env MEDCURATE_DATA_ROOTS, separated by os.pathsep).")] = None,
    tokens_file: typing.Annotated[str | None, typer.Option(
        help="File of API tokens, one a line (env MEDCURATE_TOKENS_FILE, or a comma list in "
             "MEDCURATE_API_TOKENS).")] = None,
    ray_address: typing.Annotated[str | None, typer.Option(
        help="Cluster to run on (its GCS address, host:6379); default: a local Ray of the "
             "service's own, with the dashboard.")] = None,
    dashboard_port: typing.Annotated[int, typer.Option(
        help="Dashboard (Ray Jobs API) port of the local Ray.")] = 8265,
    jobs_address: typing.Annotated[str | None, typer.Option(
        help="Ray Jobs API with --ray-address (env MEDCURATE_JOBS_ADDRESS; default "
             "http://127.0.0.1:8265).")] = None,
    insecure_no_ray_auth: typing.Annotated[bool, typer.Option(
        "--insecure-no-ray-auth",
        help="Run the local Ray WITHOUT token authentication: anyone who can reach this "
             "machine can then run code through it. Default: a fresh token, whatever "
             "RAY_AUTH_MODE says.")] = False,
) -> None:
    """Run the HTTP service (Ray Serve + FastAPI) until Ctrl-C; docs at /docs."""
    import os

    import ray
    from ray import serve

    from service.app import application
    from service.local_ray import INSECURE_WARNING, start_local_head
    from service.settings import Settings

    if ray_address and insecure_no_ray_auth:
        cli.fail("--insecure-no-ray-auth is for the local Ray only; with --ray-address, set "
              "RAY_AUTH_MODE as the cluster runs")
    if not ray_address:
        jobs_address = f"http://127.0.0.1:{dashboard_port}"
        inherited = os.environ.get("RAY_AUTH_MODE", "")
        if insecure_no_ray_auth:
            typer.echo(INSECURE_WARNING, err=True)
        elif inherited and inherited.lower() != "token":
            typer.echo(f"note: RAY_AUTH_MODE={inherited} is ignored: the local Ray runs with "
                       "token authentication (--insecure-no-ray-auth turns it off)", err=True)
    try:
        settings = Settings.load({"workspace": workspace, "data_roots": data_root,
                                  "tokens_file": tokens_file, "jobs_address": jobs_address})
        head = None if ray_address else start_local_head(dashboard_port,
                                                         token_auth=not insecure_no_ray_auth)
    except MedcurateError as exc:
        cli.fail(str(exc))
    if head and head.token_auth:
        typer.echo(f"local Ray on {head.address} with token authentication; its clients "
                   f"(medcurate submit / jobs, ray job) need RAY_AUTH_MODE=token "
                   f"RAY_AUTH_TOKEN_PATH={head.token_path}", err=True)
    try:
        ray.init(address=ray_address or head.address, logging_level=logging.WARNING)
        signal.signal(signal.SIGTERM, _interrupt)  # after ray.init, which installs its own
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(settings), name=SERVE_APP_NAME, route_prefix="/")
        typer.echo(f"medcurate service on http://{host}:{port}/v1 (docs: /docs), workspace "
                   f"{settings.workspace}, jobs via {settings.jobs_address}; Ctrl-C stops it",
                   err=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            if ray.is_initialized():
                serve.delete(SERVE_APP_NAME)
                ray.shutdown()
        finally:
            if head:
                head.stop()


def _interrupt(signum, frame) -> None:
    """SIGTERM stops the service as Ctrl-C does. Under the handlers ``ray.init`` installs, the
    process was aborted a few seconds into its clean-up, leaving the local head running."""
    raise KeyboardInterrupt


def _params(params_json: str | None, pairs: list[str]) -> dict:
    try:
        params = json.loads(params_json) if params_json else {}
    except json.JSONDecodeError as exc:
        cli.fail(f"--params-json is not valid JSON: {exc}")
    if not isinstance(params, dict):
        cli.fail("--params-json must be a JSON object")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            cli.fail(f"--param {pair!r}: use key=value")
        params[key.strip().replace("-", "_")] = value
    return params


def submit_command(
    kind: typing.Annotated[str, typer.Argument(help="Command kind: ingest, embed, select, ...")],
    params_json: typing.Annotated[str | None, typer.Option(
        help="The command's parameters as a JSON object.")] = None,
    param: typing.Annotated[list[str] | None, typer.Option(
        help="One parameter as key=value (repeatable; over --params-json).")] = None,
    address: AddressOption = "",
    workspace: JobWorkspace = None,
) -> None:
    """Validate a command's parameters here, then run it as a Ray job; prints the job id."""
    try:
        config = cli.build_config(command(kind).config, _params(params_json, param or []))
        # A relative local workspace would resolve against the job driver's working
        # directory on the head, not the submitter's: make it absolute here, as sources are.
        typer.echo(_gateway(address).submit(kind, config, absolute_location(workspace)))
    except MedcurateError as exc:
        cli.fail(str(exc))


def _on_job(action: typing.Callable[[], str]) -> None:
    try:
        typer.echo(action())
    except MedcurateError as exc:
        cli.fail(str(exc))


@jobs_app.command("list")
def jobs_list(address: AddressOption = "") -> None:
    """The medcurate jobs of the cluster, newest first."""
    def table() -> str:
        gateway = _gateway(address)
        return "\n".join(f"{v['job_id']}\t{v['kind']}\t{v['status']}\t{v['submitted_at']}"
                         for v in map(gateway.view, gateway.list()))
    _on_job(table)


@jobs_app.command("status")
def jobs_status(job_id: str, address: AddressOption = "") -> None:
    """A job's status, and its result (or error) once finished, as JSON."""
    _on_job(lambda: json.dumps(_gateway(address).describe(job_id), indent=2))


@jobs_app.command("logs")
def jobs_logs(job_id: str, address: AddressOption = "") -> None:
    """A job's output so far."""
    _on_job(lambda: _gateway(address).logs(job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: str, address: AddressOption = "") -> None:
    """Stop a running job."""
    _on_job(lambda: "stopped" if _gateway(address).stop(job_id) else "not running")
