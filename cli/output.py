"""How the user verbs (`work-pool`, `work-queue`) talk to the service and show what came back.

Results go to stdout: rich tables by default, or with `--json` the result's JSON and nothing
else, so scripts can pipe it. Errors go to stderr as one line, `Error (<code>): <message>`, and
set the exit code:

    0  success
    1  any other error (including a reply that is not a runledger envelope)
    2  usage error (bad or conflicting options; typer's own code)
    3  not_found
    4  conflict
    5  invalid or forbidden
    6  unavailable (no broker, no service answering, a timeout)
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.json import JSON
from rich.markup import escape
from rich.table import Table

from runledger.client import (
    Conflict,
    Invalid,
    NotFound,
    RunledgerClient,
    RunledgerError,
    Unavailable,
    WorkPool,
    WorkQueue,
)

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_INVALID = 5
EXIT_UNAVAILABLE = 6

# Most specific first: Forbidden is a kind of Invalid.
EXIT_CODES: tuple[tuple[type[RunledgerError], int], ...] = (
    (NotFound, EXIT_NOT_FOUND),
    (Conflict, EXIT_CONFLICT),
    (Invalid, EXIT_INVALID),
    (Unavailable, EXIT_UNAVAILABLE),
)

# Rich resolves sys.stdout / sys.stderr when printing, so test runners that swap them still work.
console = Console(highlight=False)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)

T = TypeVar("T")

JSON_HELP = "Print the result as JSON and nothing else."


def exit_code_for(error: RunledgerError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return EXIT_ERROR


def fail(error: RunledgerError) -> typer.Exit:
    """Print the error's one line on stderr; return the `typer.Exit` to raise."""
    message = error.message
    if error.field and error.field not in message:
        message = f"{message} (field: {error.field})"
    err_console.print(f"[red]Error ({escape(error.code)}):[/red] {escape(message)}")
    return typer.Exit(exit_code_for(error))


def run(action: Callable[[RunledgerClient], Awaitable[T]]) -> T:
    """Connect, run `action` with the client, close; a runledger error exits with its code."""

    async def main() -> T:
        async with RunledgerClient() as rl:
            return await action(rl)

    try:
        return asyncio.run(main())
    except RunledgerError as e:
        raise fail(e) from None


def to_json(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def print_json(value: Any) -> None:
    """The result as JSON on stdout, bypassing rich so nothing is wrapped or coloured."""
    sys.stdout.write(json.dumps(to_json(value), indent=2) + "\n")
    sys.stdout.flush()


def success(message: str) -> None:
    console.print(f"[green]{escape(message)}[/green]")


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def work_pool_table(pools: Iterable[WorkPool]) -> Table:
    table = Table(title="Work Pools")
    for column in ("Name", "Type", "Status", "Paused", "Concurrency Limit", "ID"):
        table.add_column(column, overflow="fold")
    for p in pools:
        table.add_row(escape(p.name), escape(p.type), _cell(p.status), "yes" if p.is_paused else "no",
                      _cell(p.concurrency_limit), str(p.id))
    return table


def work_queue_table(queues: Iterable[WorkQueue], title: str = "Work Queues") -> Table:
    table = Table(title=escape(title))
    for column in ("Name", "Pool", "Priority", "Status", "Paused", "Concurrency Limit", "ID"):
        table.add_column(column, overflow="fold")
    for q in queues:
        table.add_row(escape(q.name), escape(q.work_pool_name), str(q.priority), _cell(q.status),
                      "yes" if q.is_paused else "no", _cell(q.concurrency_limit), str(q.id))
    return table


def details(obj: BaseModel, title: str) -> Table:
    """Every field of a pool or queue, one per row, values as JSON shows them."""
    table = Table(title=escape(title), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in obj.model_dump(mode="json").items():
        if isinstance(value, dict | list) and value:
            table.add_row(key, JSON.from_data(value))
        elif value is None or isinstance(value, str):
            table.add_row(key, escape(_cell(value)))
        else:
            table.add_row(key, json.dumps(value))
    return table


def show(value: Any) -> None:
    console.print(value)
