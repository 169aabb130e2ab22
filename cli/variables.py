"""`runledger variable ...`: set, get, list, inspect and unset variables, through the client
only, as Prefect's `prefect variable` does. Exit codes: see `output.py` (3 not found, 4
conflict, 5 invalid, 6 unavailable, 2 usage, 1 other).

`set NAME VALUE` reads VALUE as JSON when it is JSON (`42`, `true`, `{"a": 1}`, `"quoted"`),
else as the text itself. A name that exists is a conflict unless `--overwrite` is given: then
the value and the tags are replaced (no `--tag`: no tags), as Prefect's `--overwrite` does."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import typer

from runledger.client import Conflict, RunledgerClient, Variable
from runledger.commands.queries import DEFAULT_LIMIT

from .main import app
from .output import (
    JsonFlag,
    KeyOption,
    OutputOption,
    command_line,
    emit,
    emit_done,
    print_json,
    run,
    run_command,
    show_details,
    show_rows,
    visible,
    wants_json,
)

variable_app = typer.Typer(name="variable", help="Manage variables.", no_args_is_help=True)
app.add_typer(variable_app, name="variable")

VARIABLE_COLUMNS = ("Name", "Value", "Tags", "Updated")


def parse_value(text: str) -> Any:
    """VALUE as JSON when it parses, else the text itself (Prefect's `_parse_value`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _title(variable: Variable) -> str:
    return f"Variable {variable.name!r}"


def show_variables(variables: Iterable[Variable]) -> None:
    # json.dumps escapes every control character and non-ASCII character: safe to print.
    rows = [(visible(v.name), json.dumps(v.value), visible(",".join(v.tags)) if v.tags else "-",
             v.updated.isoformat(timespec="seconds")) for v in variables]
    show_rows("Variables", VARIABLE_COLUMNS, rows, "No variables found.")


@variable_app.command("set")
def set_variable(
    name: str = typer.Argument(..., help="The variable's name: lowercase letters, digits, - and _."),
    value: str = typer.Argument(..., help="The value: JSON, or else text."),
    tags: list[str] | None = typer.Option(None, "--tag", "-t", help="A tag (repeat for more)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="If the variable exists, replace its value and tags."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Set a variable; with --overwrite, replace it if it exists."""
    parsed = parse_value(value)

    async def action(rl: RunledgerClient, key: str) -> tuple[Variable, bool]:
        try:
            return await rl.create_variable(name, parsed, tags=tags or [], idempotency_key=key), True
        except Conflict as e:
            if not overwrite:
                raise Conflict(f"Variable {name!r} already exists; use --overwrite to update it.",
                               field=e.field, details=e.details) from None
        # Its own key, derived from the run's: re-running with the same key is still safe.
        return await rl.update_variable(name, value=parsed, tags=tags or [], idempotency_key=f"{key}:overwrite"), False

    variable, created = run_command(action, idempotency_key, command_line("runledger", "variable", "inspect", name))
    emit(variable, wants_json(as_json, output), f"Set variable {name!r}." if created else f"Updated variable {name!r}.",
         _title(variable))


@variable_app.command()
def get(
    name: str = typer.Argument(..., help="The variable's name."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """Print a variable's value, as JSON (always: --json changes nothing)."""
    variable = run(lambda rl: rl.read_variable_by_name(name))
    print_json(variable.value)


async def _variables(rl: RunledgerClient, names: list[str] | None, like: str | None, tags: list[str] | None,
                     limit: int | None) -> list[Variable]:
    """Every matching variable (at most `limit`), page by page (a page holds at most DEFAULT_LIMIT)."""
    variables: list[Variable] = []
    while limit is None or len(variables) < limit:
        want = DEFAULT_LIMIT if limit is None else min(DEFAULT_LIMIT, limit - len(variables))
        page = await rl.list_variables(names=names, like=like, tags=tags, limit=want, offset=len(variables))
        variables.extend(page)
        if len(page) < want:
            break
    return variables


@variable_app.command("ls")
def list_variables(
    names: list[str] | None = typer.Option(None, "--name", "-n", help="Only this variable (repeat for more)."),
    like: str | None = typer.Option(None, "--like", help="Only names containing this (any case; % and _ are wildcards)."),
    tags: list[str] | None = typer.Option(None, "--tag", "-t", help="Only variables with this tag (repeat: all of them)."),
    limit: int | None = typer.Option(None, "--limit", "-l", min=0, help="Most variables to list (default: all)."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """List variables, by name."""
    variables = run(lambda rl: _variables(rl, names or None, like, tags or None, limit))
    if wants_json(as_json, output):
        print_json(variables)
    else:
        show_variables(variables)


@variable_app.command()
def inspect(
    name: str = typer.Argument(..., help="The variable's name."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """Show one variable."""
    variable = run(lambda rl: rl.read_variable_by_name(name))
    if wants_json(as_json, output):
        print_json(variable)
    else:
        show_details(variable, _title(variable))


@variable_app.command()
def unset(
    name: str = typer.Argument(..., help="The variable's name."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Delete a variable; its name is free again at once."""
    run_command(lambda rl, k: rl.delete_variable(name, idempotency_key=k), idempotency_key,
                command_line("runledger", "variable", "inspect", name))
    emit_done(wants_json(as_json, output), f"Unset variable {name!r}.")

