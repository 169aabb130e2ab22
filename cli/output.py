"""How the user verbs (`work-pool`, `work-queue`) talk to the service and show what came back.

Results go to stdout: tables by default, or with `--json` / `--output json` the result's JSON
and nothing else, so scripts can pipe it. On a terminal, tables are rich tables; piped, they
are plain aligned text, one line per row, never wrapped, so `grep` finds whole rows. Text from
the store is shown, never obeyed: control characters (an escape sequence in a pool's name)
print as `\\x1b`, and rich markup (`[red]`) prints literally.

Every command carries an idempotency key (`--idempotency-key`, or one made for the run), and a
request that meets `unavailable` is sent again with the same key, so the service applies it at
most once. When its outcome stays unknown, the error says so and how to check.

Errors go to stderr as one line, `Error (<code>): <message>`, and set the exit code:

    0  success
    1  any other error (including a reply that is not a runledger envelope)
    2  usage error (bad or conflicting options; typer's own code)
    3  not_found
    4  conflict
    5  invalid or forbidden
    6  unavailable (no broker, no service answering, a timeout)
    7  stalled: a projection is stopped at an event it cannot apply (`status`, `verify`, `replay`)
"""

from __future__ import annotations

import asyncio
import enum
import json
import re
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.cells import cell_len
from rich.console import Console
from rich.json import JSON
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from runledger.client import (
    Conflict,
    Invalid,
    NotFound,
    RunledgerClient,
    RunledgerError,
    Unavailable,
    WorkPool,
    WorkQueue,
    new_idempotency_key,
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

# A request is tried this many times in all when the answer is `unavailable`.
CLI_TRIES = 3

# Rich resolves sys.stdout / sys.stderr when printing, so test runners that swap them still work.
# soft_wrap: a message is never broken into lines at the console's width.
console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True, highlight=False)

T = TypeVar("T")

JSON_HELP = "Print the result as JSON and nothing else."
OUTPUT_HELP = "Output format: json (the same as --json)."
KEY_HELP = ("The command's idempotency key (default: a new one for this run). The service applies "
            "a key's command once: re-running with the same key is safe.")


class OutputFormat(enum.StrEnum):
    json = "json"


# Prefect's `--output json` / `-o json`, and runledger's `--json`: every verb that prints takes both.
JsonFlag = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
OutputOption = Annotated[OutputFormat | None, typer.Option("--output", "-o", case_sensitive=False, help=OUTPUT_HELP)]
KeyOption = Annotated[str | None, typer.Option("--idempotency-key", help=KEY_HELP)]


def wants_json(as_json: bool, output: OutputFormat | None) -> bool:
    return as_json or output == OutputFormat.json


# ---------------------------------------------------------------------------------------------
# Text from the store, made harmless for a terminal

# C0 and C1 controls, DEL, and the invisible direction and line-separator characters that can
# disguise what a line says.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(value: Any) -> str:
    """`value` as text with every control character shown as an escape (`\\x1b`), never sent."""
    return _UNSAFE.sub(_escaped, str(value))


def safe(value: Any) -> str:
    """`visible(value)` for a rich markup string: `[red]` in it prints literally."""
    return escape(visible(value))


# ---------------------------------------------------------------------------------------------
# Errors and running

def exit_code_for(error: RunledgerError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return EXIT_ERROR


def fail(error: RunledgerError, hint: str | None = None) -> typer.Exit:
    """Print the error's one line on stderr; return the `typer.Exit` to raise."""
    message = error.message
    if error.field and error.field not in message:
        message = f"{message} (field: {error.field})"
    if hint:
        message = f"{message.rstrip('.')}. {hint}"
    err_console.print(f"[red]Error ({safe(error.code)}):[/red] {safe(message)}")
    return typer.Exit(exit_code_for(error))


def _client() -> RunledgerClient:
    return RunledgerClient(retries=CLI_TRIES - 1)


def run(action: Callable[[RunledgerClient], Awaitable[T]]) -> T:
    """Connect, run `action` (queries) with the client, close; a runledger error exits with its code."""

    async def main() -> T:
        async with _client() as rl:
            return await action(rl)

    try:
        return asyncio.run(main())
    except RunledgerError as e:
        raise fail(e) from None


def unknown_outcome_hint(check: str, key: str) -> str:
    return (f"The outcome is unknown: run `{check}` to see whether it was applied; re-running "
            f"the same command is safe only with --idempotency-key {key}")


def run_command(action: Callable[[RunledgerClient, str], Awaitable[T]], key: str | None, check: str) -> T:
    """Like `run`, for an action that sends commands: it gets this run's idempotency key (the
    given one, or a new one). If a command's outcome stays unknown after the retries, the error
    says so, how to check (`check`, a command line), and how to re-run it safely."""
    key = key or new_idempotency_key()

    async def main() -> T:
        async with _client() as rl:
            return await action(rl, key)

    try:
        return asyncio.run(main())
    except Unavailable as e:
        raise fail(e, unknown_outcome_hint(check, key) if e.outcome_unknown else None) from None
    except RunledgerError as e:
        raise fail(e) from None


def command_line(*words: str) -> str:
    """A command line to show the user, with arguments quoted for a POSIX shell."""
    import shlex

    return " ".join(shlex.quote(w) for w in words)


# ---------------------------------------------------------------------------------------------
# Results

def to_json(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [to_json(v) for v in value]
    return value


def print_json(value: Any) -> None:
    """The result as JSON on stdout, bypassing rich so nothing is wrapped or coloured (json.dumps
    escapes control characters, so this is safe on a terminal too)."""
    sys.stdout.write(json.dumps(to_json(value), indent=2) + "\n")
    sys.stdout.flush()


def success(message: str) -> None:
    console.print(Text(visible(message), style="green"))


def say(message: str) -> None:
    console.print(Text(visible(message)))


def say_if_more(shown: int, more: bool, what: str) -> None:
    """A listing cut at its `--limit`: said on stderr, so that no one takes the first page
    for all there is (stdout stays the listing alone)."""
    if more:
        err_console.print(Text(f"the first {shown} {what} are shown; there are more: raise --limit to see them"))


def _cell(value: Any) -> str:
    return "-" if value is None else visible(value)


def _plain_lines(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([cell_len(c)] + [cell_len(r[i]) for r in rows]) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        padded = [c + " " * (w - cell_len(c)) for c, w in zip(cells, widths, strict=True)]
        return "  ".join(padded).rstrip()

    return [line(columns), *(line(r) for r in rows)]


def show_rows(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> None:
    """A table of already `visible` cells: rich on a terminal, plain aligned lines otherwise."""
    if not rows:
        say(empty)
        return
    if not console.is_terminal:
        sys.stdout.write("".join(line + "\n" for line in _plain_lines(columns, rows)))
        sys.stdout.flush()
        return
    table = Table(title=Text(visible(title)))
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(Text(c) for c in row))
    console.print(table, soft_wrap=False)  # a centred title; cells fold at the width


POOL_COLUMNS = ("Name", "Type", "Status", "Paused", "Concurrency Limit", "ID")
QUEUE_COLUMNS = ("Name", "Pool", "Priority", "Status", "Paused", "Concurrency Limit", "ID")


def show_work_pools(pools: Iterable[WorkPool]) -> None:
    rows = [(_cell(p.name), _cell(p.type), _cell(p.status), "yes" if p.is_paused else "no",
             _cell(p.concurrency_limit), str(p.id)) for p in pools]
    show_rows("Work Pools", POOL_COLUMNS, rows, "No work pools found.")


def show_work_queues(queues: Iterable[WorkQueue], title: str = "Work Queues",
                     empty: str = "No work queues found.") -> None:
    rows = [(_cell(q.name), _cell(q.work_pool_name), str(q.priority), _cell(q.status),
             "yes" if q.is_paused else "no", _cell(q.concurrency_limit), str(q.id)) for q in queues]
    show_rows(title, QUEUE_COLUMNS, rows, empty)


def show_details(obj: BaseModel, title: str) -> None:
    """Every field of a pool or queue, one per row, values as JSON shows them."""
    fields = obj.model_dump(mode="json")
    if not console.is_terminal:
        rows = [(key, _cell(value) if value is None or isinstance(value, str) else json.dumps(value))
                for key, value in fields.items()]
        sys.stdout.write("".join(line + "\n" for line in _plain_lines(("field", "value"), rows)[1:]))
        sys.stdout.flush()
        return
    table = Table(title=Text(visible(title)), show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in fields.items():
        if isinstance(value, dict | list) and value:
            table.add_row(key, JSON.from_data(value, ensure_ascii=True))  # escapes every control character
        elif value is None or isinstance(value, str):
            table.add_row(key, Text(_cell(value)))
        else:
            table.add_row(key, json.dumps(value))
    console.print(table, soft_wrap=False)  # a centred title; cells fold at the width


def emit_done(as_json: bool, message: str) -> None:
    """A command that answers nothing (a delete): `null` as JSON, or the message."""
    if as_json:
        print_json(None)
    else:
        success(message)


def emit(obj: BaseModel, as_json: bool, message: str, title: str) -> None:
    """A command's result: the object as JSON, or the message and the object's details."""
    if as_json:
        print_json(obj)
    else:
        success(message)
        show_details(obj, title)
