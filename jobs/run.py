"""``python -m jobs.run KIND --params-json JSON [--workspace URI]``: one command as a Ray job.

The entry point of every job the service or ``medcurate submit`` starts. It only parses:
``medcurate.commands.run_command`` validates the parameters against the kind's schema and runs
it. Progress goes to stderr; the result is the LAST stdout line, as one JSON object. Bad input
is one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from pydantic import ValidationError

from medcurate.commands import run_command
from medcurate.errors import MedcurateError, validation_message
from medcurate.workspace import Workspace, store_error_message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.run", description=__doc__.split("\n")[0])
    parser.add_argument("kind", help="command kind (medcurate.commands.COMMANDS)")
    parser.add_argument("--params-json", default="{}", help="the command's parameters")
    parser.add_argument("--workspace", help="workspace root (default: MEDCURATE_WORKSPACE)")
    args = parser.parse_args(argv)
    try:
        params = json.loads(args.params_json)
        if not isinstance(params, dict):
            raise MedcurateError("--params-json must be a JSON object")
        workspace = Workspace(args.workspace)
        workspace.check()
        print(f"running {args.kind} in workspace {workspace.root}", file=sys.stderr)
        result = run_command(args.kind, params, workspace)
    except json.JSONDecodeError as exc:
        return fail(f"--params-json is not valid JSON: {exc}")
    except ValidationError as exc:
        return fail(validation_message(exc))
    except MedcurateError as exc:
        return fail(str(exc))
    except OSError as exc:  # the store failed mid-command; drafts were cleaned up
        return fail(store_error_message(workspace.uri, exc))
    print(json.dumps(result, default=str), flush=True)
    return 0


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
