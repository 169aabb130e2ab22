"""`runledger task-run ...`: list and inspect task runs, and list the task workers serving now,
through the client only. A run is named by its id, or by its name when exactly one run has it.

`runledger task-worker` is the command that runs a worker; the workers serving now are listed
here, by `task-run workers`, so that `task-worker --module M` stays as it is.

Exit codes: see `output.py` (3 not found, 4 conflict: a name that several runs have, 5 invalid,
6 unavailable, 2 usage, 1 other).

Each CLI run is a new client, so `ls` and `inspect` first wait until the read models hold every
write the service had acknowledged (`RunledgerClient.catch_up`). `workers` reads the workers'
heartbeats, which are not in the log: it shows who is serving at the moment it asks."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import typer

from runledger.client import (
    Conflict,
    FlowRun,
    NotFound,
    OrchestrationResult,
    RunledgerClient,
    State,
    TaskRun,
)
from runledger.client.models import TaskWorker
from runledger.commands.queries import DEFAULT_LIMIT, TaskRunSort

from .deployments import as_uuid, parse_time, state_words, when
from .flow_runs import report_orchestration, show_states, state_type
from .main import app
from .output import (
    JsonFlag,
    KeyOption,
    OutputOption,
    command_line,
    print_json,
    run,
    run_command,
    say,
    say_if_more,
    show_details,
    show_rows,
    to_json,
    visible,
    wants_json,
)

task_run_app = typer.Typer(name="task-run", help="Inspect task runs and list the task workers serving now.",
                           no_args_is_help=True)
app.add_typer(task_run_app, name="task-run")

RUN_COLUMNS = ("Name", "Task Key", "State", "Flow Run", "Expected Start", "Start", "End", "ID")
WORKER_COLUMNS = ("Identifier", "Task Keys", "Last Heartbeat")
RUN_HELP = "The task run's id, or its name when exactly one task run has it."
SORTS = tuple(s.value for s in TaskRunSort)
DEFAULT_SORT = TaskRunSort.EXPECTED_START_TIME_DESC.value
DEFAULT_LS_LIMIT = 100


def _sort(text: str) -> str:
    upper = text.upper()
    if upper not in SORTS:
        raise typer.BadParameter(f"{text!r} is not one of {', '.join(SORTS)}", param_hint="--sort")
    return upper


async def resolve_task_run(rl: RunledgerClient, name: str) -> TaskRun:
    """The task run NAME names: an id, or the name of exactly one task run."""
    await rl.catch_up()
    run_id = as_uuid(name)
    if run_id is not None:
        try:
            return await rl.read_task_run(run_id)
        except NotFound as e:
            raise NotFound(f"Task run {name!r} not found.", field=e.field, details=e.details) from None
    found = await rl.list_task_runs(names=[name], limit=2)
    if not found:
        raise NotFound(f"Task run {name!r} not found.")
    if len(found) > 1:
        raise Conflict(f"Several task runs are named {name!r}; give the id of one "
                       f"(`runledger task-run ls --name {name}` shows them).")
    return found[0]


async def flow_run_names(rl: RunledgerClient, flow_run_ids: Iterable[uuid.UUID | None]) -> dict[uuid.UUID, str]:
    """The names of these flow runs (a deleted one is left out), a page at a time."""
    wanted = list(dict.fromkeys(i for i in flow_run_ids if i is not None))
    names: dict[uuid.UUID, str] = {}
    for at in range(0, len(wanted), DEFAULT_LIMIT):
        chunk = wanted[at:at + DEFAULT_LIMIT]
        names.update((r.id, r.name) for r in await rl.list_flow_runs(ids=chunk, limit=len(chunk)))
    return names


def _flow_run_cell(run_: TaskRun, names: dict[uuid.UUID, str]) -> str:
    if run_.flow_run_id is None:
        return "-"  # a background task
    return visible(names.get(run_.flow_run_id, run_.flow_run_id))


def show_task_runs(runs: Iterable[TaskRun], names: dict[uuid.UUID, str]) -> None:
    rows = [(visible(r.name), visible(r.task_key), visible(state_words(r.state_type, r.state_name)),
             _flow_run_cell(r, names), when(r.expected_start_time), when(r.start_time), when(r.end_time), str(r.id))
            for r in runs]
    show_rows("Task Runs", RUN_COLUMNS, rows, "No task runs found.")


def show_task_workers(workers: Iterable[TaskWorker]) -> None:
    rows = [(visible(w.identifier), visible(", ".join(w.task_keys)) or "-", when(w.timestamp)) for w in workers]
    show_rows("Task Workers", WORKER_COLUMNS, rows, "No task workers serving.")


# ---------------------------------------------------------------------------------------------
# ls, inspect


async def _flow_run_ids(rl: RunledgerClient, flow_runs: list[str]) -> list[uuid.UUID]:
    """The ids of the flow runs given by id or by name (a name: every run that has it)."""
    ids = [i for i in (as_uuid(f) for f in flow_runs) if i is not None]
    names = [f for f in flow_runs if as_uuid(f) is None]
    if names:
        found: list[FlowRun] = []
        while True:
            page = await rl.list_flow_runs(names=names, limit=DEFAULT_LIMIT, offset=len(found))
            found.extend(page)
            if len(page) < DEFAULT_LIMIT:
                break
        ids += [r.id for r in found]
    return list(dict.fromkeys(ids))


async def _runs(rl: RunledgerClient, filters: dict[str, Any], flow_runs: list[str] | None, sort: str,
                limit: int) -> list[TaskRun]:
    await rl.catch_up()
    if flow_runs:
        ids = await _flow_run_ids(rl, flow_runs)
        if not ids:
            return []  # no flow run has any of the names given
        filters = {**filters, "flow_run_ids": ids}
    runs: list[TaskRun] = []
    while len(runs) < limit:
        want = min(DEFAULT_LIMIT, limit - len(runs))
        page = await rl.list_task_runs(**filters, sort=sort, limit=want, offset=len(runs))
        runs.extend(page)
        if len(page) < want:
            break
    return runs


@task_run_app.command("ls")
def list_task_runs(
    flow_runs: list[str] | None = typer.Option(None, "--flow-run", "-r",
                                               help="Only this flow run's task runs: its id or name "
                                                    "(repeat for more)."),
    background: bool = typer.Option(False, "--background", help="Only background tasks (those of no flow run)."),
    task_keys: list[str] | None = typer.Option(None, "--task-key", "-k",
                                               help="Only runs of this task key (repeat for more)."),
    states: list[str] | None = typer.Option(None, "--state", "-s",
                                            help="Only runs in this state type, e.g. RUNNING (repeat for more)."),
    state_names: list[str] | None = typer.Option(None, "--state-name",
                                                 help="Only runs whose state has this name, e.g. AwaitingRetry "
                                                      "(repeat for more)."),
    tags: list[str] | None = typer.Option(None, "--tag", "-t", help="Only runs with this tag (repeat: every tag)."),
    names: list[str] | None = typer.Option(None, "--name", "-n", help="Only runs with this name (repeat for more)."),
    started_after: str | None = typer.Option(None, "--started-after",
                                             help="Only runs started at or after this time (ISO 8601; "
                                                  "without an offset: UTC)."),
    started_before: str | None = typer.Option(None, "--started-before",
                                              help="Only runs started at or before this time (ISO 8601; "
                                                   "without an offset: UTC)."),
    sort: str = typer.Option(DEFAULT_SORT, "--sort",
                             help=f"The order: {', '.join(SORTS)} (any case)."),
    limit: int = typer.Option(DEFAULT_LS_LIMIT, "--limit", "-l", min=1,
                              help=f"Most runs to list (default {DEFAULT_LS_LIMIT})."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """List task runs, latest expected start first (see --sort)."""
    if background and flow_runs:
        raise typer.BadParameter("--background lists the runs of no flow run; leave out --flow-run",
                                 param_hint="--background")
    filters: dict[str, Any] = {
        "task_keys": task_keys or None,
        "state_types": [state_type(s, "--state") for s in states] if states else None,
        "state_names": state_names or None,
        "tags": tags or None,
        "names": names or None,
        "flow_run_id_is_null": True if background else None,
        "start_time_after": parse_time(started_after, "--started-after") if started_after else None,
        "start_time_before": parse_time(started_before, "--started-before") if started_before else None,
    }
    order = _sort(sort)
    json_out = wants_json(as_json, output)

    async def action(rl: RunledgerClient) -> tuple[list[TaskRun], dict[uuid.UUID, str]]:
        found = await _runs(rl, filters, flow_runs or None, order, limit + 1)  # one more: are there more?
        return found, ({} if json_out else await flow_run_names(rl, (r.flow_run_id for r in found[:limit])))

    runs, flow_names = run(action)
    more, runs = len(runs) > limit, runs[:limit]
    if json_out:
        print_json(runs)
    else:
        show_task_runs(runs, flow_names)
        say_if_more(len(runs), more, "task runs")


@task_run_app.command()
def inspect(
    name: str = typer.Argument(..., metavar="RUN", help=RUN_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """Show one task run: its fields, why it waits, and its state history, oldest first.

    With --json: the run, with its history as `state_history`."""

    async def action(rl: RunledgerClient) -> tuple[TaskRun, list[State]]:
        found = await resolve_task_run(rl, name)
        return found, await rl.read_task_run_states(found.id)

    task_run, states = run(action)
    if wants_json(as_json, output):
        print_json({**to_json(task_run), "state_history": to_json(states)})
        return
    show_details(task_run, f"Task run {task_run.name!r}")
    if task_run.waiting_reason:
        say(f"Waiting: {task_run.waiting_reason}")
    show_states(states)


# ---------------------------------------------------------------------------------------------
# workers


@task_run_app.command("workers")
def list_task_workers(
    task_keys: list[str] | None = typer.Option(None, "--task-key", "-k",
                                               help="Only workers serving this task key (repeat: any of them)."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """List the task workers serving now (`runledger task-worker` runs one), with their task keys.

    A worker is listed from its first heartbeat until it stops, or 15 s after its last heartbeat."""
    workers = run(lambda rl: rl.read_task_workers(task_keys or None))
    if wants_json(as_json, output):
        print_json(workers)
    else:
        show_task_workers(workers)


@task_run_app.command()
def cancel(
    name: str = typer.Argument(..., metavar="RUN", help=RUN_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Cancel a task run: one still waiting is CANCELLED and never runs; a running one is set
    CANCELLING, and the task worker running it stops it and reports CANCELLED.

    Exit 0 when accepted, 8 when not (e.g. the run has ended already)."""

    async def action(rl: RunledgerClient, key: str) -> OrchestrationResult:
        found = await resolve_task_run(rl, name)
        return await rl.cancel_task_run(found.id, idempotency_key=key)

    result = run_command(action, idempotency_key, command_line("runledger", "task-run", "inspect", name))
    report_orchestration("task run", name, result, wants_json(as_json, output))
