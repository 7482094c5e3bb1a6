"""The ``medcurate`` command line: every command is generated from its pydantic config, so the
CLI, the HTTP API and cluster jobs accept exactly the same parameters."""

from __future__ import annotations

import inspect
import json
import sys
import typing
from collections.abc import Callable

import typer
from pydantic import BaseModel, ValidationError

from medcurate.commands import COMMANDS
from medcurate.config import IngestConfig, ScoreConfig, SelectConfig
from medcurate.errors import MedcurateError
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


def validation_message(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = "--" + "-".join(str(p) for p in item["loc"]).replace("_", "-") if item["loc"] else ""
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


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


def config_command(typer_app: typer.Typer, name: str, config_cls: type[BaseModel],
                   help: str) -> Callable:
    """Register ``run(config, workspace) -> dict`` as a command taking the config's fields."""

    def decorator(run: Callable[[BaseModel, Workspace], dict]) -> Callable:
        def command(**kwargs):
            config = build_config(config_cls, {k: v for k, v in kwargs.items()
                                               if k != "workspace"})
            workspace = open_workspace(kwargs["workspace"])
            try:
                result = run(config, workspace)
            except MedcurateError as exc:
                fail(str(exc))
            except OSError as exc:  # the store failed mid-command; drafts were cleaned up
                fail(store_error_message(workspace.uri, exc))
            typer.echo(json.dumps(result, indent=2, default=str))

        params = [inspect.Parameter("workspace", inspect.Parameter.KEYWORD_ONLY, default=None,
                                    annotation=WorkspaceOption)]
        params += [_parameter(field_name, field)
                   for field_name, field in config_cls.model_fields.items()]
        command.__signature__ = inspect.Signature(params)
        command.__doc__ = help
        typer_app.command(name, help=help)(command)
        return run

    return decorator


@config_command(app, "ingest", IngestConfig,
                "Ingest an archive into a collection: manifest.parquet (ids, labels, splits, "
                "image properties, metadata) and rejects.parquet (every unusable file and why).")
def ingest_command(config: IngestConfig, workspace: Workspace) -> dict:
    from medcurate.ingest import ingest

    summary = ingest(config, workspace)
    typer.echo(f"ingested {summary['ingested']} images into collection {config.name!r} "
               f"({summary['rejected']} rejected, {summary['exact_duplicates']} exact duplicates)",
               err=True)
    return summary


@config_command(app, "select", SelectConfig,
                "Select a budget of images per class from an embedding run: selection.parquet "
                "(id, label, group, reason), summary.json and report.html.")
def select_command(config: SelectConfig, workspace: Workspace) -> dict:
    from medcurate.select.run import run_selection

    summary = run_selection(config, workspace)
    report = workspace.location(workspace.path("selections", summary["selection_id"],
                                                "report.html"))
    typer.echo(f"selected {summary['selected']} of {summary['images']} images; report: {report}",
               err=True)
    return {k: v for k, v in summary.items() if k != "metadata"}


@config_command(app, "score", ScoreConfig,
                "Rank a zoo of pretrained models for a target collection without fine-tuning: "
                "the paper's LP x FU score and 11 baseline metrics, as a table and CSV/JSON.")
def score_command(config: ScoreConfig, workspace: Workspace) -> dict:
    from medcurate.transfer.score import format_table, score

    document = score(config, workspace)
    typer.echo(format_table(document), err=True)
    return document


PLAIN_COMMANDS = {
    "embed": "Embed a collection with an encoder on Ray Data into Parquet shards; re-running "
             "the same command resumes a run that was cut short.",
    "curate": "The main job: ingest → embed → select → report. Without SOURCE it runs on a "
              "built-in synthetic demo archive (clearly labelled as such).",
    "pretrain": "Pretrain a masked autoencoder (ViT) on a collection with Ray Train; the "
                "checkpoint lands in models/<name>/ and loads as the encoder mae:<path>.",
    "finetune": "Fine-tune (or linear-probe) a registry encoder + linear head on a selection or "
                "collection with Ray Train; AUC and balanced accuracy on every test set, "
                "published as models/<run>/ (model.pt, metrics.json/csv, predictions).",
    "audit": "Shortcut audit: train every zoo model with a synthetic or metadata confounder in "
             "a share p of the positives; i.i.d. vs o.o.d. (reversed) AUC per level, the drop, "
             "paired permutation tests, an HTML report and CSV under audits/<id>/.",
    "compare-selections": "Closed-loop check: select with several strategies at equal budgets "
                          "and seeds, train on each, and report mean and 95% interval of each "
                          "metric per strategy and budget (table, CSV, plot).",
}


def _register_plain(name: str, help: str) -> None:
    entry = COMMANDS[name]
    config_command(app, name, entry.config, help)(entry.run)


for _name, _help in PLAIN_COMMANDS.items():
    _register_plain(_name, _help)

__import__("medcurate.remote", fromlist=["register"]).register(app)  # serve, submit, jobs


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
