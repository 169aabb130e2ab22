"""`runledger work-queue ...`: create, list, inspect, update, pause, resume, delete and
re-prioritise work queues (BEHAVIOUR §2), through the client only. Exit codes: see `output.py`
(3 not found, 4 conflict, 5 invalid or forbidden, 6 unavailable, 2 usage, 1 other).

A queue is named by `NAME --pool POOL`. Without `--pool`, as in Prefect's pool-less API: a NAME
that is a UUID is the queue's id (any pool), any other NAME is a queue of `default-agent-pool`
(WQ-9, WQ-10), where `create` also makes that pool when it is missing."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import typer

from runledger.client import RunledgerClient, WorkQueue
from runledger.commands.queries import DEFAULT_LIMIT
from runledger.commands.work_pools import LEGACY_POOL_NAME

from .main import app
from .output import JSON_HELP, details, print_json, run, show, success, work_queue_table

work_queue_app = typer.Typer(name="work-queue", help="Manage work queues.", no_args_is_help=True)
app.add_typer(work_queue_app, name="work-queue")

POOL_HELP = f"The queue's work pool (default: the queue id, or {LEGACY_POOL_NAME})."


def _as_uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


async def locate(rl: RunledgerClient, name: str, pool: str | None) -> tuple[str, str]:
    """(pool name, queue name) for a queue reference; a bare UUID is looked up by id."""
    if pool is not None:
        return pool, name
    queue_id = _as_uuid(name)
    if queue_id is None:
        return LEGACY_POOL_NAME, name
    queue = await rl.read_work_queue_by_id(queue_id)
    return queue.work_pool_name, queue.name


def update_queue(ref: str, pool: str | None, /, **fields: Any) -> WorkQueue:
    """Update through the pool API, so a priority change runs PR-1 (WQ-5)."""

    async def action(rl: RunledgerClient) -> WorkQueue:
        pool_name, queue_name = await locate(rl, ref, pool)
        return await rl.update_work_queue(pool_name, queue_name, **fields)

    return run(action)


def _emit_queue(queue: WorkQueue, as_json: bool, message: str) -> None:
    if as_json:
        print_json(queue)
    else:
        success(message)
        show(details(queue, f"Work queue {queue.work_pool_name}/{queue.name}"))


@work_queue_app.command()
def create(
    name: str = typer.Argument(..., help="The queue's name, unique within its pool."),
    pool: str | None = typer.Option(None, "--pool", "-p", help=f"The work pool (default: {LEGACY_POOL_NAME})."),
    priority: int | None = typer.Option(None, "--priority", help="1 is the highest; others may move down."),
    concurrency_limit: int | None = typer.Option(None, "--concurrency-limit", help="Most runs at once (>= 0)."),
    description: str | None = typer.Option(None, "--description", "-d", help="What the queue is for."),
    paused: bool = typer.Option(False, "--paused", help="Create the queue paused."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Create a work queue in a pool (without --pool: in default-agent-pool, made if missing)."""
    fields: dict[str, Any] = {}
    if priority is not None:
        fields["priority"] = priority
    if concurrency_limit is not None:
        fields["concurrency_limit"] = concurrency_limit
    if description is not None:
        fields["description"] = description
    if paused:
        fields["is_paused"] = True
    if pool is None:
        queue = run(lambda rl: rl.create_legacy_work_queue(name, **fields))
    else:
        queue = run(lambda rl: rl.create_work_queue(pool, name, **fields))
    _emit_queue(queue, as_json, f"Created work queue {name!r} in pool {queue.work_pool_name!r}.")


async def _all_pages(fetch: Callable[[int], Awaitable[list[WorkQueue]]]) -> list[WorkQueue]:
    """Every queue, page by page (a page holds at most DEFAULT_LIMIT, C-2)."""
    queues: list[WorkQueue] = []
    while True:
        page = await fetch(len(queues))
        queues.extend(page)
        if len(page) < DEFAULT_LIMIT:
            return queues


@work_queue_app.command("ls")
def list_queues(
    pool: str | None = typer.Option(None, "--pool", "-p", help="Only this pool's queues, by priority."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List work queues: one pool's by priority, or every pool's by name."""
    if pool is None:
        queues = run(lambda rl: _all_pages(lambda offset: rl.list_all_work_queues(limit=DEFAULT_LIMIT, offset=offset)))
        title = "Work Queues"
    else:
        queues = run(lambda rl: _all_pages(
            lambda offset: rl.list_work_queues(pool, limit=DEFAULT_LIMIT, offset=offset)))
        title = f"Work Queues in {pool}"
    if as_json:
        print_json(queues)
    else:
        show(work_queue_table(queues, title))


@work_queue_app.command()
def inspect(
    name: str = typer.Argument(..., help="The queue's name (or id, without --pool)."),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Show one work queue."""
    queue_id = _as_uuid(name)
    if pool is not None:
        queue = run(lambda rl: rl.read_work_queue(pool, name))
    elif queue_id is not None:
        queue = run(lambda rl: rl.read_work_queue_by_id(queue_id))
    else:
        queue = run(lambda rl: rl.read_legacy_work_queue(name))
    if as_json:
        print_json(queue)
    else:
        show(details(queue, f"Work queue {queue.work_pool_name}/{queue.name}"))


@work_queue_app.command()
def update(
    name: str = typer.Argument(..., help="The queue's name (or id, without --pool)."),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    new_name: str | None = typer.Option(None, "--name", help="Rename the queue."),
    description: str | None = typer.Option(None, "--description", "-d", help="A new description."),
    priority: int | None = typer.Option(None, "--priority", help="A new priority; others may move down."),
    concurrency_limit: int | None = typer.Option(None, "--concurrency-limit", help="A new limit (>= 0)."),
    clear_concurrency_limit: bool = typer.Option(False, "--clear-concurrency-limit", help="Remove the limit."),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Change a work queue; options not given keep their value."""
    if concurrency_limit is not None and clear_concurrency_limit:
        raise typer.BadParameter("give --concurrency-limit or --clear-concurrency-limit, not both",
                                 param_hint="--clear-concurrency-limit")
    fields: dict[str, Any] = {}
    if new_name is not None:
        fields["name"] = new_name
    if description is not None:
        fields["description"] = description
    if priority is not None:
        fields["priority"] = priority
    if concurrency_limit is not None:
        fields["concurrency_limit"] = concurrency_limit
    if clear_concurrency_limit:
        fields["concurrency_limit"] = None
    if not fields:
        raise typer.BadParameter("nothing to update: give at least one option")
    queue = update_queue(name, pool, **fields)
    _emit_queue(queue, as_json, f"Updated work queue {queue.name!r} in pool {queue.work_pool_name!r}.")


@work_queue_app.command()
def pause(
    name: str = typer.Argument(..., help="The queue's name (or id, without --pool)."),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Pause a work queue: no runs are taken from it."""
    queue = update_queue(name, pool, is_paused=True)
    _emit_queue(queue, as_json, f"Paused work queue {queue.name!r} in pool {queue.work_pool_name!r}.")


@work_queue_app.command()
def resume(
    name: str = typer.Argument(..., help="The queue's name (or id, without --pool)."),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Resume a paused work queue."""
    queue = update_queue(name, pool, is_paused=False)
    _emit_queue(queue, as_json, f"Resumed work queue {queue.name!r} in pool {queue.work_pool_name!r}.")


@work_queue_app.command("set-priority")
def set_priority(
    name: str = typer.Argument(..., help="The queue's name (or id, without --pool)."),
    priority: int = typer.Argument(..., help="The new priority; 1 is the highest."),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Give a work queue a priority; queues in the way move down (PR-1)."""
    queue = update_queue(name, pool, priority=priority)
    _emit_queue(queue, as_json, f"Work queue {queue.name!r} in pool {queue.work_pool_name!r} "
                                f"now has priority {queue.priority}.")


@work_queue_app.command()
def delete(
    name: str = typer.Argument(..., help="The queue's name (or id, without --pool)."),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    as_json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Delete a work queue (a pool's default queue cannot be deleted)."""
    queue_id = _as_uuid(name)
    if pool is None and queue_id is not None:
        run(lambda rl: rl.delete_work_queue_by_id(queue_id))
        where = f"work queue {name}"
    else:
        pool_name = pool if pool is not None else LEGACY_POOL_NAME
        run(lambda rl: rl.delete_work_queue(pool_name, name))
        where = f"work queue {name!r} in pool {pool_name!r}"
    if as_json:
        print_json(None)
    else:
        success(f"Deleted {where}.")
