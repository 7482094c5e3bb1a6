"""The library's command line: every COMMANDS entry becomes a command in one loop, its options
generated from its pydantic config (so the CLI, the HTTP API and cluster jobs accept exactly
the same parameters), its help and its stderr line taken from the entry; plus collections and
gc. ``python -m medcurate`` runs it; the ``medcurate`` program (``service.cli``) adds serve,
submit and jobs to it."""

from __future__ import annotations

import inspect
import json
import sys
import typing
from collections.abc import Callable

import typer
from pydantic import BaseModel, ValidationError

from medcurate.commands import COMMANDS, Command
from medcurate.errors import MedcurateError, validation_message
from medcurate.workspace import GRACE_SECONDS, Workspace, store_error_message

app = typer.Typer(
    help="Curate medical image archives: ingest, embed, find confounders, select, score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
collections_app = typer.Typer(help="Inspect the collections in the workspace.",
                              no_args_is_help=True)
app.add_typer(collections_app, name="collections")

WorkspaceOption = typing.Annotated[
    typing.Optional[str],
    typer.Option("--workspace", envvar="MEDCURATE_WORKSPACE",
                 help="Workspace root: local path or object-store URI "
                      "[default: ./medcurate-workspace]"),
]


def fail(message: str, code: int = 2) -> typing.NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def open_workspace(uri: str | None) -> Workspace:
    """The workspace, checked before any work: a store that cannot be read is one ``error:``
    line naming the URI and the fix, exit 2."""
    try:
        workspace = Workspace(uri)
        workspace.check()
    except MedcurateError as exc:
        fail(str(exc))
    return workspace


def build_config(config_cls: type[BaseModel], values: dict) -> BaseModel:
    try:
        return config_cls(**values)
    except ValidationError as exc:
        fail(validation_message(exc))


def _cli_type(annotation):
    """What typer parses: validators stripped (the config runs them), lists as strings so
    "0,0.5,1" reaches the config whole, ``X | None`` kept optional."""
    if typing.get_origin(annotation) is typing.Annotated:
        return _cli_type(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) is list:
        return list[str]
    args = typing.get_args(annotation)
    if type(None) in args and len(args) == 2:
        return typing.Optional[_cli_type(next(a for a in args if a is not type(None)))]  # noqa: UP045
    return annotation


def _parameter(name: str, field) -> inspect.Parameter:
    """A typer parameter for one pydantic field: its type, default, help and choices."""
    if (field.json_schema_extra or {}).get("cli") == "argument":
        info = typer.Argument(help=field.description, show_default=False)
    else:
        info = typer.Option(help=field.description)
    default = (inspect.Parameter.empty if field.is_required()
               else field.get_default(call_default_factory=True))
    annotation = _cli_type(field.annotation)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=typing.Annotated[annotation, info])


def _command(entry: Command) -> Callable:
    """The typer function of one COMMANDS entry: the config's fields as options and arguments;
    the result as JSON on stdout, after the entry's one line on stderr."""

    def command(**kwargs):
        config = build_config(entry.config, {k: v for k, v in kwargs.items()
                                             if k != "workspace"})
        workspace = open_workspace(kwargs["workspace"])
        try:
            result = entry.run(config, workspace)
            message = entry.printer(config, workspace, result) if entry.printer else None
        except MedcurateError as exc:
            fail(str(exc))
        except OSError as exc:  # the store failed mid-command; drafts were cleaned up
            fail(store_error_message(workspace.uri, exc))
        if message:
            typer.echo(message, err=True)
        shown = {k: v for k, v in result.items() if k not in entry.cli_omits}
        typer.echo(json.dumps(shown, indent=2, default=str))

    params = [inspect.Parameter("workspace", inspect.Parameter.KEYWORD_ONLY, default=None,
                                annotation=WorkspaceOption)]
    params += [_parameter(field_name, field)
               for field_name, field in entry.config.model_fields.items()]
    command.__signature__ = inspect.Signature(params)
    command.__doc__ = entry.help
    return command


for _name, _entry in COMMANDS.items():
    app.command(_name, help=_entry.help)(_command(_entry))


@collections_app.command("list")
def collections_list(workspace: WorkspaceOption = None) -> None:
    """List the complete collections with their image counts."""
    ws = open_workspace(workspace)
    for name in ws.list("collections"):
        summary = ws.provenance("collections", name).get("summary", {})
        typer.echo(f"{name}\t{summary.get('ingested', '?')} images\t{summary.get('format', '')}")


@collections_app.command("show")
def collections_show(name: str, workspace: WorkspaceOption = None) -> None:
    """Print a collection's provenance: source, parameters, counts, output hashes."""
    ws = open_workspace(workspace)
    try:
        ws.require("collections", name)
    except MedcurateError as exc:
        fail(str(exc))
    typer.echo(json.dumps(ws.provenance("collections", name), indent=2))


@app.command("gc")
def gc_command(workspace: WorkspaceOption = None,
               grace_hours: float = typer.Option(
                   GRACE_SECONDS / 3600, min=0,
                   help="Keep versions younger than this: a writer may still be filling one, "
                        "a reader may still be reading the one an overwrite replaced.")) -> None:
    """Delete what no reader can reach: versions left by crashed or killed writers and versions
    replaced by an overwrite, once older than the grace period. Live artefacts are never touched."""
    ws = open_workspace(workspace)
    try:
        removed = ws.gc(grace_seconds=grace_hours * 3600)
    except OSError as exc:
        fail(store_error_message(ws.uri, exc))
    for path in removed:
        typer.echo(f"removed {path}")
    typer.echo(f"{len(removed)} unreachable version(s) removed from {ws.uri}", err=True)


def main() -> None:
    try:
        app()
    except MedcurateError as exc:  # raised outside a command body, e.g. a bad workspace
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
