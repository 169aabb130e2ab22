"""`runledger work-pool ...`: create, list, inspect, update, pause, resume and delete work pools
(BEHAVIOUR §1), through the client only. Exit codes: see `output.py` (3 not found, 4 conflict,
5 invalid or forbidden, 6 unavailable, 2 usage, 1 other)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from runledger.client import UNSET, Invalid, RunledgerClient, WorkPool
from runledger.commands.queries import DEFAULT_LIMIT

from .main import app
from .output import JSON_HELP, details, fail, print_json, run, show, success, work_pool_table

work_pool_app = typer.Typer(name="work-pool", help="Manage work pools.", no_args_is_help=True)
app.add_typer(work_pool_app, name="work-pool")

TEMPLATE_HELP = "A JSON file with the base job template (job_configuration and variables)."


def read_template(path: Path) -> Any:
    """The file's JSON, sent as is: the service judges whether it is a valid template (WP-6)."""
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


def _emit_pool(pool: WorkPool, as_json: bool, message: str) -> None:
    if as_json:
        print_json(pool)
    else:
        success(message)
        show(details(pool, f"Work pool {pool.name!r}"))


@work_pool_app.command()
def create(
    name: str = typer.Argument(..., help="The pool's name, unique on the server."),
    type: str | None = typer.Option(None, "--type", "-t", help="The pool's type (default: prefect-agent)."),
    description: str | None = typer.Option(None, "--description", "-d", help="What the pool is for."),
    paused: bool = typer.Option(False, "--paused", help="Create the pool paused."),
    concurrency_limit: int | None = typer.Option(None, "--concurrency-limit", help="Most runs at once (>= 0)."),
    base_job_template: Path | None = typer.Option(None, "--base-job-template", help=TEMPLATE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Create a work pool (and its `default` queue)."""
    template = read_template(base_job_template) if base_job_template is not None else UNSET
    pool = run(lambda rl: rl.create_work_pool(
        name,
        type=UNSET if type is None else type,
        description=UNSET if description is None else description,
        is_paused=True if paused else UNSET,
        concurrency_limit=UNSET if concurrency_limit is None else concurrency_limit,
        base_job_template=template,
    ))
    _emit_pool(pool, as_json, f"Created work pool {name!r}.")


async def all_work_pools(rl: RunledgerClient) -> list[WorkPool]:
    """Every pool, page by page (a page holds at most DEFAULT_LIMIT, C-2)."""
    pools: list[WorkPool] = []
    while True:
        page = await rl.list_work_pools(limit=DEFAULT_LIMIT, offset=len(pools))
        pools.extend(page)
        if len(page) < DEFAULT_LIMIT:
            return pools


@work_pool_app.command("ls")
def list_pools(as_json: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """List work pools, by name."""
    pools = run(all_work_pools)
    if as_json:
        print_json(pools)
    else:
        show(work_pool_table(pools))


@work_pool_app.command()
def inspect(
    name: str = typer.Argument(..., help="The pool's name."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show one work pool."""
    pool = run(lambda rl: rl.read_work_pool(name))
    if as_json:
        print_json(pool)
    else:
        show(details(pool, f"Work pool {pool.name!r}"))


@work_pool_app.command()
def update(
    name: str = typer.Argument(..., help="The pool's name."),
    description: str | None = typer.Option(None, "--description", "-d", help="A new description."),
    concurrency_limit: int | None = typer.Option(None, "--concurrency-limit", help="A new limit (>= 0)."),
    clear_concurrency_limit: bool = typer.Option(False, "--clear-concurrency-limit", help="Remove the limit."),
    base_job_template: Path | None = typer.Option(None, "--base-job-template", help=TEMPLATE_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Change a work pool; options not given keep their value."""
    fields: dict[str, Any] = _limit_update(concurrency_limit, clear_concurrency_limit)
    if description is not None:
        fields["description"] = description
    if base_job_template is not None:
        fields["base_job_template"] = read_template(base_job_template)
    if not fields:
        raise typer.BadParameter("nothing to update: give at least one option")
    pool = run(lambda rl: rl.update_work_pool(name, **fields))
    _emit_pool(pool, as_json, f"Updated work pool {name!r}.")


@work_pool_app.command()
def pause(
    name: str = typer.Argument(..., help="The pool's name."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Pause a work pool: its workers get no runs."""
    pool = run(lambda rl: rl.update_work_pool(name, is_paused=True))
    _emit_pool(pool, as_json, f"Paused work pool {name!r}.")


@work_pool_app.command()
def resume(
    name: str = typer.Argument(..., help="The pool's name."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Resume a paused work pool."""
    pool = run(lambda rl: rl.update_work_pool(name, is_paused=False))
    _emit_pool(pool, as_json, f"Resumed work pool {name!r}.")


@work_pool_app.command()
def delete(
    name: str = typer.Argument(..., help="The pool's name."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Delete a work pool with all its queues."""
    run(lambda rl: rl.delete_work_pool(name))
    if as_json:
        print_json(None)
    else:
        success(f"Deleted work pool {name!r}.")
