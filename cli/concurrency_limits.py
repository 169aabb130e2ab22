"""`runledger concurrency-limit ...`: create, list, inspect and delete global concurrency
limits (Prefect's `prefect global-concurrency-limit`), through the client only. Exit codes:
see `output.py` (3 not found, 4 conflict, 5 invalid, 6 unavailable, 2 usage, 1 other).

`inspect` and `delete` take a name or an id (a NAME that is a UUID is an id, as Prefect's
`/v2/concurrency_limits/{id_or_name}` reads it)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import typer

from runledger.client import UNSET, ConcurrencyLimit, RunledgerClient
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

limit_app = typer.Typer(name="concurrency-limit", help="Manage global concurrency limits.", no_args_is_help=True)
app.add_typer(limit_app, name="concurrency-limit")

LIMIT_COLUMNS = ("Name", "Active", "Limit", "Active Slots", "Slot Decay Per Second", "ID")


def _title(limit: ConcurrencyLimit) -> str:
    return f"Concurrency limit {limit.name!r}"


def show_limits(limits: Iterable[ConcurrencyLimit]) -> None:
    rows = [(visible(lim.name), "yes" if lim.active else "no", str(lim.limit), str(lim.active_slots),
             f"{lim.slot_decay_per_second:g}", str(lim.id)) for lim in limits]
    show_rows("Global Concurrency Limits", LIMIT_COLUMNS, rows, "No global concurrency limits found.")


def _is_id(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


@limit_app.command()
def create(
    name: str = typer.Argument(..., help="The limit's name, unique on the server."),
    limit: int = typer.Option(..., "--limit", "-l", help="Most slots taken at once (>= 0)."),
    disable: bool = typer.Option(False, "--disable", help="Create it inactive."),
    active_slots: int | None = typer.Option(None, "--active-slots", help="Slots taken to begin with (default 0)."),
    slot_decay_per_second: float | None = typer.Option(
        None, "--slot-decay-per-second", help="Slots given back per second, for a rate limit (default 0)."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Create a global concurrency limit."""
    made = run_command(
        lambda rl, k: rl.create_concurrency_limit(
            name, limit, active=False if disable else UNSET,
            active_slots=UNSET if active_slots is None else active_slots,
            slot_decay_per_second=UNSET if slot_decay_per_second is None else slot_decay_per_second,
            idempotency_key=k),
        idempotency_key, command_line("runledger", "concurrency-limit", "inspect", name))
    emit(made, wants_json(as_json, output), f"Created global concurrency limit {name!r}.", _title(made))


async def _limits(rl: RunledgerClient, limit: int | None) -> list[ConcurrencyLimit]:
    """Every limit (at most `limit`), page by page (a page holds at most DEFAULT_LIMIT)."""
    limits: list[ConcurrencyLimit] = []
    while limit is None or len(limits) < limit:
        want = DEFAULT_LIMIT if limit is None else min(DEFAULT_LIMIT, limit - len(limits))
        page = await rl.list_concurrency_limits(limit=want, offset=len(limits))
        limits.extend(page)
        if len(page) < want:
            break
    return limits


@limit_app.command("ls")
def list_limits(
    limit: int | None = typer.Option(None, "--limit", min=0, help="Most limits to list (default: all)."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """List global concurrency limits, by name."""
    limits = run(lambda rl: _limits(rl, limit))
    if wants_json(as_json, output):
        print_json(limits)
    else:
        show_limits(limits)


@limit_app.command()
def inspect(
    name: str = typer.Argument(..., help="The limit's name, or its id."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """Show one global concurrency limit, by name or by id."""
    if _is_id(name):
        found = run(lambda rl: rl.read_concurrency_limit(name))
    else:
        found = run(lambda rl: rl.read_concurrency_limit_by_name(name))
    if wants_json(as_json, output):
        print_json(found)
    else:
        show_details(found, _title(found))


@limit_app.command()
def delete(
    name: str = typer.Argument(..., help="The limit's name, or its id."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Delete a global concurrency limit; its name is free again at once."""
    run_command(lambda rl, k: rl.delete_concurrency_limit(name, idempotency_key=k), idempotency_key,
                command_line("runledger", "concurrency-limit", "inspect", name))
    emit_done(wants_json(as_json, output), f"Deleted global concurrency limit {name!r}.")
