"""`runledger work-pool ...`: create, list, inspect, update, pause, resume, delete work pools and
set or clear their concurrency limits, through the client only. Exit codes: see `output.py`
(3 not found, 4 conflict, 5 invalid or forbidden, 6 unavailable, 2 usage, 1 other)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from runledger.client import UNSET, Conflict, Invalid, RunledgerClient, WorkPool
from runledger.commands.queries import DEFAULT_LIMIT

from .main import app
from .output import (
    JsonFlag,
    KeyOption,
    OutputOption,
    command_line,
    emit,
    fail,
    print_json,
    run,
    run_command,
    show_details,
    show_work_pools,
    success,
    wants_json,
)

work_pool_app = typer.Typer(name="work-pool", help="Manage work pools.", no_args_is_help=True)
app.add_typer(work_pool_app, name="work-pool")

TEMPLATE_HELP = "A JSON file with the base job template (job_configuration and variables)."
NAME_HELP = "The pool's name."


def read_template(path: Path) -> Any:
    """The file's JSON, sent as is: the service judges whether it is a valid template."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise fail(Invalid(f"cannot read {path}: {e}", field="base_job_template")) from None
    except ValueError as e:
        raise fail(Invalid(f"{path} is not valid JSON: {e}", field="base_job_template")) from None


def _limit_update(concurrency_limit: int | None, clear: bool) -> dict[str, Any]:
    if concurrency_limit is not None and clear:
        raise typer.BadParameter("give --concurrency-limit or --clear-concurrency-limit, not both",
                                 param_hint="--clear-concurrency-limit")
    if clear:
        return {"concurrency_limit": None}
    return {} if concurrency_limit is None else {"concurrency_limit": concurrency_limit}


def _check(name: str) -> str:
    return command_line("runledger", "work-pool", "inspect", name)


def _title(pool: WorkPool) -> str:
    return f"Work pool {pool.name!r}"


def _update(name: str, key: str | None, **fields: Any) -> WorkPool:
    return run_command(lambda rl, k: rl.update_work_pool(name, **fields, idempotency_key=k), key, _check(name))


@work_pool_app.command()
def create(
    name: str = typer.Argument(..., help="The pool's name, unique on the server."),
    type: str | None = typer.Option(None, "--type", "-t", help="The pool's type (default: prefect-agent)."),
    description: str | None = typer.Option(None, "--description", "-d", help="What the pool is for."),
    paused: bool = typer.Option(False, "--paused", help="Create the pool paused."),
    concurrency_limit: int | None = typer.Option(None, "--concurrency-limit", help="Most runs at once (>= 0)."),
    base_job_template: Path | None = typer.Option(None, "--base-job-template", help=TEMPLATE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="If the pool exists, update it with the options given."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Create a work pool (and its `default` queue); with --overwrite, update it if it exists."""
    template = read_template(base_job_template) if base_job_template is not None else UNSET
    fields: dict[str, Any] = {"description": UNSET if description is None else description,
                              "is_paused": True if paused else UNSET,
                              "concurrency_limit": UNSET if concurrency_limit is None else concurrency_limit,
                              "base_job_template": template}

    async def action(rl: RunledgerClient, key: str) -> tuple[WorkPool, bool]:
        try:
            return await rl.create_work_pool(name, type=UNSET if type is None else type, **fields,
                                             idempotency_key=key), True
        except Conflict as e:
            if not overwrite:
                raise Conflict(f"{e.message.rstrip('.')}; use --overwrite to update it.",
                               field=e.field, details=e.details) from None
        changes = {k: v for k, v in fields.items() if v is not UNSET}
        if type is not None or not changes:
            existing = await rl.read_work_pool(name)
            if type is not None and existing.type != type:
                raise Conflict(f"Work pool {name!r} exists with type {existing.type!r}; --overwrite cannot "
                               f"change a pool's type (delete it and create it again).")
            if not changes:
                return existing, False
        # Its own key, derived from the run's: re-running with the same key is still safe.
        return await rl.update_work_pool(name, **changes, idempotency_key=f"{key}:overwrite"), False

    pool, created = run_command(action, idempotency_key, _check(name))
    emit(pool, wants_json(as_json, output),
         f"Created work pool {name!r}." if created else f"Updated work pool {name!r}.", _title(pool))


async def all_work_pools(rl: RunledgerClient) -> list[WorkPool]:
    """Every pool, page by page (a page holds at most DEFAULT_LIMIT)."""
    pools: list[WorkPool] = []
    while True:
        page = await rl.list_work_pools(limit=DEFAULT_LIMIT, offset=len(pools))
        pools.extend(page)
        if len(page) < DEFAULT_LIMIT:
            return pools


@work_pool_app.command("ls")
def list_pools(as_json: JsonFlag = False, output: OutputOption = None) -> None:
    """List work pools, by name."""
    pools = run(all_work_pools)
    if wants_json(as_json, output):
        print_json(pools)
    else:
        show_work_pools(pools)


@work_pool_app.command()
def inspect(
    name: str = typer.Argument(..., help=NAME_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """Show one work pool."""
    pool = run(lambda rl: rl.read_work_pool(name))
    if wants_json(as_json, output):
        print_json(pool)
    else:
        show_details(pool, _title(pool))


@work_pool_app.command()
def update(
    name: str = typer.Argument(..., help=NAME_HELP),
    description: str | None = typer.Option(None, "--description", "-d", help="A new description."),
    concurrency_limit: int | None = typer.Option(None, "--concurrency-limit", help="A new limit (>= 0)."),
    clear_concurrency_limit: bool = typer.Option(False, "--clear-concurrency-limit", help="Remove the limit."),
    base_job_template: Path | None = typer.Option(None, "--base-job-template", help=TEMPLATE_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Change a work pool; options not given keep their value."""
    fields: dict[str, Any] = _limit_update(concurrency_limit, clear_concurrency_limit)
    if description is not None:
        fields["description"] = description
    if base_job_template is not None:
        fields["base_job_template"] = read_template(base_job_template)
    if not fields:
        raise typer.BadParameter("nothing to update: give at least one option")
    pool = _update(name, idempotency_key, **fields)
    emit(pool, wants_json(as_json, output), f"Updated work pool {name!r}.", _title(pool))


@work_pool_app.command("set-concurrency-limit")
def set_concurrency_limit(
    name: str = typer.Argument(..., help=NAME_HELP),
    concurrency_limit: int = typer.Argument(..., help="Most runs at once in the pool (>= 0)."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Set a work pool's concurrency limit."""
    pool = _update(name, idempotency_key, concurrency_limit=concurrency_limit)
    emit(pool, wants_json(as_json, output),
         f"Set the concurrency limit of work pool {name!r} to {concurrency_limit}.", _title(pool))


@work_pool_app.command("clear-concurrency-limit")
def clear_concurrency_limit(
    name: str = typer.Argument(..., help=NAME_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Remove a work pool's concurrency limit."""
    pool = _update(name, idempotency_key, concurrency_limit=None)
    emit(pool, wants_json(as_json, output), f"Cleared the concurrency limit of work pool {name!r}.", _title(pool))


@work_pool_app.command()
def pause(
    name: str = typer.Argument(..., help=NAME_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Pause a work pool: its workers get no runs."""
    pool = _update(name, idempotency_key, is_paused=True)
    emit(pool, wants_json(as_json, output), f"Paused work pool {name!r}.", _title(pool))


@work_pool_app.command()
def resume(
    name: str = typer.Argument(..., help=NAME_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Resume a paused work pool."""
    pool = _update(name, idempotency_key, is_paused=False)
    emit(pool, wants_json(as_json, output), f"Resumed work pool {name!r}.", _title(pool))


@work_pool_app.command()
def delete(
    name: str = typer.Argument(..., help=NAME_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Delete a work pool with all its queues."""
    run_command(lambda rl, k: rl.delete_work_pool(name, idempotency_key=k), idempotency_key, _check(name))
    if wants_json(as_json, output):
        print_json(None)
    else:
        success(f"Deleted work pool {name!r}.")
