"""`runledger work-queue ...`: create, list, inspect, update, pause, resume, delete and
re-prioritise work queues, set or clear their concurrency limits and show their health
(`status`), through the client only.
Exit codes: see `output.py` (3 not found, 4 conflict, 5 invalid or forbidden, 6 unavailable,
2 usage, 1 other).

A queue is named by `NAME --pool POOL`. Without `--pool`, as in Prefect's pool-less API: a NAME
that is a UUID is the queue's id (any pool), any other NAME is a queue of `default-agent-pool`,
where `create` also makes that pool when it is missing."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import typer

from runledger.client import RunledgerClient, WorkQueue, WorkQueueStatusDetail
from runledger.commands.queries import DEFAULT_LIMIT
from runledger.commands.work_pools import LEGACY_POOL_NAME

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
    show_work_queues,
    wants_json,
)

work_queue_app = typer.Typer(name="work-queue", help="Manage work queues.", no_args_is_help=True)
app.add_typer(work_queue_app, name="work-queue")

POOL_HELP = f"The queue's work pool (default: the queue id, or {LEGACY_POOL_NAME})."
REF_HELP = "The queue's name (or id, without --pool)."


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


def _check(ref: str, pool: str | None) -> str:
    words = ["runledger", "work-queue", "inspect", ref]
    return command_line(*words, *(["--pool", pool] if pool is not None else []))


def _title(queue: WorkQueue) -> str:
    return f"Work queue {queue.work_pool_name}/{queue.name}"


def _where(queue: WorkQueue) -> str:
    return f"work queue {queue.name!r} in pool {queue.work_pool_name!r}"


def update_queue(ref: str, pool: str | None, key: str | None, /, **fields: Any) -> WorkQueue:
    """Update through the pool API, so a new priority moves the queues in its way down."""

    async def action(rl: RunledgerClient, k: str) -> WorkQueue:
        pool_name, queue_name = await locate(rl, ref, pool)
        return await rl.update_work_queue(pool_name, queue_name, **fields, idempotency_key=k)

    return run_command(action, key, _check(ref, pool))


@work_queue_app.command()
def create(
    name: str = typer.Argument(..., help="The queue's name, unique within its pool."),
    pool: str | None = typer.Option(None, "--pool", "-p", help=f"The work pool (default: {LEGACY_POOL_NAME})."),
    priority: int | None = typer.Option(None, "--priority", "-q", help="1 is the highest; others may move down."),
    concurrency_limit: int | None = typer.Option(None, "--limit", "-l", "--concurrency-limit",
                                                 help="Most runs at once (>= 0)."),
    description: str | None = typer.Option(None, "--description", "-d", help="What the queue is for."),
    paused: bool = typer.Option(False, "--paused", help="Create the queue paused."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
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
    check = _check(name, pool)
    if pool is None:
        queue = run_command(lambda rl, k: rl.create_legacy_work_queue(name, **fields, idempotency_key=k),
                            idempotency_key, check)
    else:
        queue = run_command(lambda rl, k: rl.create_work_queue(pool, name, **fields, idempotency_key=k),
                            idempotency_key, check)
    emit(queue, wants_json(as_json, output), f"Created {_where(queue)}.", _title(queue))


async def _all_pages(fetch: Callable[[int], Awaitable[list[WorkQueue]]]) -> list[WorkQueue]:
    """Every queue, page by page (a page holds at most DEFAULT_LIMIT)."""
    queues: list[WorkQueue] = []
    while True:
        page = await fetch(len(queues))
        queues.extend(page)
        if len(page) < DEFAULT_LIMIT:
            return queues


@work_queue_app.command("ls")
def list_queues(
    pool: str | None = typer.Option(None, "--pool", "-p", help="Only this pool's queues, by priority."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """List work queues: one pool's by priority, or every pool's by name."""
    if pool is None:
        queues = run(lambda rl: _all_pages(lambda offset: rl.list_all_work_queues(limit=DEFAULT_LIMIT, offset=offset)))
        title, empty = "Work Queues", "No work queues found."
    else:
        queues = run(lambda rl: _all_pages(
            lambda offset: rl.list_work_queues(pool, limit=DEFAULT_LIMIT, offset=offset)))
        title, empty = f"Work Queues in {pool}", f"No work queues found in pool {pool!r}."
    if wants_json(as_json, output):
        print_json(queues)
    else:
        show_work_queues(queues, title, empty)


async def _read(rl: RunledgerClient, name: str, pool: str | None) -> WorkQueue:
    queue_id = _as_uuid(name)
    if pool is not None:
        return await rl.read_work_queue(pool, name)
    if queue_id is not None:
        return await rl.read_work_queue_by_id(queue_id)
    return await rl.read_legacy_work_queue(name)


@work_queue_app.command()
def inspect(
    name: str = typer.Argument(..., help=REF_HELP),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """Show one work queue."""
    queue = run(lambda rl: _read(rl, name, pool))
    if wants_json(as_json, output):
        print_json(queue)
    else:
        show_details(queue, _title(queue))


@work_queue_app.command()
def status(
    name: str = typer.Argument(..., help=REF_HELP),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """Show a work queue's health: no Late runs, and polled within the last 60 s."""

    async def health(rl: RunledgerClient) -> tuple[WorkQueue, WorkQueueStatusDetail]:
        queue = await _read(rl, name, pool)
        return queue, await rl.read_work_queue_status(queue.id)

    queue, detail = run(health)
    if wants_json(as_json, output):
        print_json(detail)
    else:
        show_details(detail, f"{_title(queue)}: {'healthy' if detail.healthy else 'unhealthy'}")


@work_queue_app.command()
def update(
    name: str = typer.Argument(..., help=REF_HELP),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    new_name: str | None = typer.Option(None, "--name", help="Rename the queue."),
    description: str | None = typer.Option(None, "--description", "-d", help="A new description."),
    priority: int | None = typer.Option(None, "--priority", "-q", help="A new priority; others may move down."),
    concurrency_limit: int | None = typer.Option(None, "--limit", "-l", "--concurrency-limit",
                                                 help="A new limit (>= 0)."),
    clear_concurrency_limit: bool = typer.Option(False, "--clear-concurrency-limit", help="Remove the limit."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
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
    queue = update_queue(name, pool, idempotency_key, **fields)
    emit(queue, wants_json(as_json, output), f"Updated {_where(queue)}.", _title(queue))


@work_queue_app.command("set-concurrency-limit")
def set_concurrency_limit(
    name: str = typer.Argument(..., help=REF_HELP),
    concurrency_limit: int = typer.Argument(..., help="Most runs at once from the queue (>= 0)."),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Set a work queue's concurrency limit."""
    queue = update_queue(name, pool, idempotency_key, concurrency_limit=concurrency_limit)
    emit(queue, wants_json(as_json, output),
         f"Set the concurrency limit of {_where(queue)} to {concurrency_limit}.", _title(queue))


@work_queue_app.command("clear-concurrency-limit")
def clear_concurrency_limit(
    name: str = typer.Argument(..., help=REF_HELP),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Remove a work queue's concurrency limit."""
    queue = update_queue(name, pool, idempotency_key, concurrency_limit=None)
    emit(queue, wants_json(as_json, output), f"Cleared the concurrency limit of {_where(queue)}.", _title(queue))


@work_queue_app.command()
def pause(
    name: str = typer.Argument(..., help=REF_HELP),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Pause a work queue: no runs are taken from it."""
    queue = update_queue(name, pool, idempotency_key, is_paused=True)
    emit(queue, wants_json(as_json, output), f"Paused {_where(queue)}.", _title(queue))


@work_queue_app.command()
def resume(
    name: str = typer.Argument(..., help=REF_HELP),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Resume a paused work queue."""
    queue = update_queue(name, pool, idempotency_key, is_paused=False)
    emit(queue, wants_json(as_json, output), f"Resumed {_where(queue)}.", _title(queue))


@work_queue_app.command("set-priority")
def set_priority(
    name: str = typer.Argument(..., help=REF_HELP),
    priority: int = typer.Argument(..., help="The new priority; 1 is the highest."),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Give a work queue a priority; queues in the way move down."""
    queue = update_queue(name, pool, idempotency_key, priority=priority)
    emit(queue, wants_json(as_json, output), f"Work queue {queue.name!r} in pool {queue.work_pool_name!r} "
                                             f"now has priority {queue.priority}.", _title(queue))


@work_queue_app.command()
def delete(
    name: str = typer.Argument(..., help=REF_HELP),
    pool: str | None = typer.Option(None, "--pool", "-p", help=POOL_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Delete a work queue (a pool's default queue cannot be deleted)."""
    queue_id = _as_uuid(name)
    check = _check(name, pool)
    if pool is None and queue_id is not None:
        run_command(lambda rl, k: rl.delete_work_queue_by_id(queue_id, idempotency_key=k), idempotency_key, check)
        where = f"work queue {name}"
    else:
        pool_name = pool if pool is not None else LEGACY_POOL_NAME
        run_command(lambda rl, k: rl.delete_work_queue(pool_name, name, idempotency_key=k), idempotency_key, check)
        where = f"work queue {name!r} in pool {pool_name!r}"
    emit_done(wants_json(as_json, output), f"Deleted {where}.")
