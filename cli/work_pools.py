"""`runledger work-pool ...`: create, list, inspect, update, pause, resume, delete work pools and
set or clear their concurrency limits; `get-runs` polls a pool as its workers do and `preview`
shows what they would get without polling; through the client only. Exit codes: see
`output.py` (3 not found, 4 conflict, 5 invalid or forbidden, 6 unavailable, 2 usage, 1 other).

`get-runs` and `preview` are reads by a new client (each CLI run is one): they first wait until
the read models hold every write the service had acknowledged (`RunledgerClient.catch_up`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import typer

from runledger.client import (
    UNSET,
    Conflict,
    FlowRun,
    Invalid,
    NotFound,
    RunledgerClient,
    WorkPool,
    WorkQueue,
)
from runledger.client.models import WorkerFlowRun
from runledger.commands.queries import DEFAULT_LIMIT

from .deployments import when
from .main import app
from .output import (
    JsonFlag,
    KeyOption,
    OutputOption,
    command_line,
    emit,
    emit_done,
    fail,
    print_json,
    run,
    run_command,
    say,
    show_details,
    show_rows,
    show_work_pools,
    visible,
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
    emit_done(wants_json(as_json, output), f"Deleted work pool {name!r}.")


# ---------------------------------------------------------------------------------------------
# get-runs (the worker's poll) and preview (the same runs, without a poll)

POLL_COLUMNS = ("ID", "Name", "Queue", "State", "Scheduled", "Priority")
QUEUES_HELP = "Only this queue of the pool (repeat for more; default: every queue)."


def show_poll_runs(runs: Iterable[FlowRun], title: str, empty: str) -> None:
    """The runs as the poll orders them: queue priority, run priority, scheduled time, id."""
    rows = [(str(r.id), visible(r.name), visible(r.work_queue_name or "-"), visible(r.state_name or "-"),
             when(r.next_scheduled_start_time), str(r.priority)) for r in runs]
    show_rows(title, POLL_COLUMNS, rows, empty)


def _scheduled_before(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time (e.g. 2025-01-31T09:00:00+01:00; "
                                 "without an offset: UTC)", param_hint="--scheduled-before") from None


@work_pool_app.command("get-runs")
def get_runs(
    name: str = typer.Argument(..., help=NAME_HELP),
    queues: list[str] | None = typer.Option(None, "--queue", "-q", help=QUEUES_HELP),
    limit: int | None = typer.Option(None, "--limit", "-l", min=0, max=DEFAULT_LIMIT,
                                     help=f"Most runs to get (default and most: {DEFAULT_LIMIT})."),
    scheduled_before: str | None = typer.Option(None, "--scheduled-before",
                                                help="Only runs scheduled at or before this time (ISO 8601; "
                                                     "without an offset: UTC)."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """Poll a work pool as a worker does: the SCHEDULED runs its limits leave room for.

    The poll is recorded, as a worker's: the queues polled, and their deployments, become READY.

    Runs print in the service's order: queue priority, run priority, scheduled time. A paused pool or queue gives none.

    With --json: the service's items, {work_pool_id, work_queue_id, flow_run}. To look without polling: `work-pool preview`."""
    before = _scheduled_before(scheduled_before)

    async def action(rl: RunledgerClient) -> list[WorkerFlowRun]:
        await rl.catch_up()
        return await rl.get_scheduled_flow_runs(name, work_queue_names=queues or None, scheduled_before=before,
                                                limit=UNSET if limit is None else limit)

    found = run(action)
    if wants_json(as_json, output):
        print_json(found)
    else:
        show_poll_runs((item.flow_run for item in found), f"Runs for work pool {name!r}",
                       "No scheduled flow runs found.")


def _poll_order(runs: Iterable[FlowRun], priorities: dict[uuid.UUID, int]) -> list[FlowRun]:
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(runs, key=lambda r: (priorities.get(r.work_queue_id, 0) if r.work_queue_id else 0, r.priority,
                                       r.next_scheduled_start_time or far, str(r.id)))


async def _pool_queues(rl: RunledgerClient, name: str) -> list[WorkQueue]:
    queues: list[WorkQueue] = []
    while True:
        page = await rl.list_work_queues(name, limit=DEFAULT_LIMIT, offset=len(queues))
        queues.extend(page)
        if len(page) < DEFAULT_LIMIT:
            return queues


# How far `preview` may look: past this, the horizon leaves what a date can hold.
MAX_PREVIEW_HOURS = 876_000


async def _preview(rl: RunledgerClient, name: str, queue_names: Sequence[str], hours: float
                   ) -> tuple[WorkPool, list[WorkQueue], list[FlowRun]]:
    await rl.catch_up()
    pool = await rl.read_work_pool(name)
    queues = await _pool_queues(rl, name)
    by_name = {q.name: q for q in queues}
    for queue_name in queue_names:  # as the poll: every name must be a queue of this pool
        if queue_name not in by_name:
            raise NotFound(f"Work pool queue '{name}/{queue_name}' not found.")
    chosen = [by_name[n] for n in dict.fromkeys(queue_names)] if queue_names else queues
    where: dict[str, Any] = ({"work_queue_ids": [q.id for q in chosen]} if queue_names
                             else {"work_pool_names": [name]})
    horizon = datetime.now(UTC) + timedelta(hours=hours)
    found: dict[uuid.UUID, FlowRun] = {}
    offset = 0
    while True:
        page = await rl.list_flow_runs(
            **where, state_types=["SCHEDULED"], sort="NEXT_SCHEDULED_START_TIME_ASC", limit=DEFAULT_LIMIT,
            offset=offset, flow_run_filter={"next_scheduled_start_time": {"before_": horizon.isoformat()}})
        offset += len(page)
        # As the poll: a retry the run makes in its own process is not a worker's to start.
        found.update((r.id, r) for r in page if r.empirical_policy.get("retry_type") != "in_process")
        if len(page) < DEFAULT_LIMIT:
            break
    return pool, chosen, _poll_order(found.values(), {q.id: q.priority for q in queues})


@work_pool_app.command()
def preview(
    name: str = typer.Argument(..., help=NAME_HELP),
    queues: list[str] | None = typer.Option(None, "--queue", "-q", help=QUEUES_HELP),
    hours: float = typer.Option(1.0, "--hours", "-h", min=0, max=MAX_PREVIEW_HOURS,
                                help=f"How far ahead to look, in hours (default 1; at most {MAX_PREVIEW_HOURS:,}: "
                                     "a hundred years)."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """Preview the runs a worker of the pool would get in the next HOURS hours; records no poll.

    The service's poll always records itself, so preview reads the flow runs instead: the SCHEDULED runs of the pool's queues (or those given) due before now + HOURS, sorted as the poll sorts them (queue priority, run priority, scheduled time).

    Concurrency limits and pauses are not applied (a paused pool or queue is noted): `work-pool get-runs` applies them, as a real poll. With --json: the flow runs."""
    pool, chosen, found = run(lambda rl: _preview(rl, name, queues or [], hours))
    if wants_json(as_json, output):
        print_json(found)
        return
    show_poll_runs(found, f"Preview of work pool {name!r}", "No scheduled flow runs found.")
    if pool.is_paused:
        say(f"Note: work pool {name!r} is paused: its workers get no runs until it is resumed.")
    paused = [q.name for q in chosen if q.is_paused]
    if paused and not pool.is_paused:
        say(f"Note: paused queues, whose runs workers do not get: {', '.join(paused)}.")
