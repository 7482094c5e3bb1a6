"""The exception types meant for users: the message is shown as is, without a traceback;
the subclasses only tell the HTTP service which 4xx to answer; and the one formatter of
pydantic's validation errors that every front end uses."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import ValidationError


class MedcurateError(ValueError):
    """Bad input or an impossible request, explained in the message.

    The CLI prints it and exits non-zero; the HTTP service answers it with a 4xx.
    """


class NotFound(MedcurateError):
    """The request names an artefact that does not exist (the HTTP service answers 404)."""


class AlreadyExists(MedcurateError):
    """The artefact to write exists and no overwrite was asked for (the HTTP service answers
    409): also what the later of two concurrent writers of one key gets."""


def option_location(loc: tuple) -> str:
    """Where a field is on the command line: ``("budget_per_class",)`` is ``--budget-per-class``."""
    return "--" + "-".join(map(str, loc)).replace("_", "-")


def dotted_location(loc: tuple) -> str:
    """Where a field is in a JSON body or in settings: ``("body", "seed")`` is ``body.seed``."""
    return ".".join(map(str, loc))


def error_text(item: dict) -> str:
    """pydantic's message for one error, without the "Value error, " it puts before a
    validator's own message."""
    return item["msg"].removeprefix("Value error, ")


def validation_message(error: ValidationError,
                       location: Callable[[tuple], str] = option_location) -> str:
    """A pydantic ``ValidationError`` as one line, ``where: what`` per error joined by ``; ``;
    the front end picks how a field's place is written (``location``). The CLI, jobs, the HTTP
    service and its settings all explain bad input with this one function."""
    lines = []
    for item in error.errors():
        where = location(item["loc"]) if item["loc"] else ""
        lines.append(f"{where}: {error_text(item)}" if where else error_text(item))
    return "; ".join(lines)
