"""`runledger deployment ...`: create, list, inspect, run, pause, resume, schedule and delete
deployments, through the client only. Exit codes: see `output.py` (3 not found, 4 conflict, 5
invalid, 6 unavailable, 2 usage, 1 other).

A deployment is named `<flow>/<deployment>` (or given by its id). `create` makes the flow when
it does not exist, and is an upsert, as Prefect's: creating a deployment that exists updates it
in place (the options given change; its schedules become the one given, or none).

Each CLI run is a new client, so the reads here first wait until the read models hold every
write the service had acknowledged (`RunledgerClient.catch_up`): `deployment create` followed
at once by `deployment run` or `ls` finds the deployment."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import typer
from rich.text import Text

from runledger.client import UNSET, Deployment, FlowRun, Invalid, NotFound, RunledgerClient
from runledger.commands.queries import DEFAULT_LIMIT

from .main import app
from .output import (
    JsonFlag,
    KeyOption,
    OutputOption,
    command_line,
    emit,
    emit_done,
    err_console,
    print_json,
    run,
    run_command,
    say,
    show_details,
    show_rows,
    success,
    visible,
    wants_json,
)

deployment_app = typer.Typer(name="deployment", help="Manage deployments.", no_args_is_help=True)
app.add_typer(deployment_app, name="deployment")

DEPLOYMENT_COLUMNS = ("Name", "Pool", "Queue", "Schedules", "Paused", "ID")
RUN_COLUMNS = ("Name", "State", "Expected Start", "ID")
NAME_HELP = "The deployment, as <flow>/<deployment>, or its id."
PARAM_HELP = "A parameter, KEY=VALUE; VALUE is JSON, or else text (repeat for more)."


# ---------------------------------------------------------------------------------------------
# Shared with `flow-run`


def as_uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def parse_params(pairs: Sequence[str] | None) -> dict[str, Any] | None:
    """`KEY=VALUE` pairs as a dict: VALUE as JSON when it parses, else the text itself."""
    if not pairs:
        return None
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--param")
        try:
            params[key] = json.loads(text)
        except json.JSONDecodeError:
            params[key] = text
    return params


def check_deployment_name(name: str) -> None:
    """A usage error (exit 2) for a NAME that is neither an id nor `<flow>/<deployment>`."""
    if as_uuid(name) is None and "/" not in name:
        raise typer.BadParameter(f"{name!r} is neither <flow>/<deployment> nor an id", param_hint="NAME")


async def resolve_deployment(rl: RunledgerClient, name: str) -> Deployment:
    """The deployment NAME names (an id, or `<flow>/<deployment>`), as the service holds it now."""
    await rl.catch_up()
    deployment_id = as_uuid(name)
    try:
        if deployment_id is not None:
            return await rl.read_deployment(deployment_id)
        return await rl.read_deployment_by_name(name)
    except NotFound as e:
        raise NotFound(f"Deployment {name!r} not found.", field=e.field, details=e.details) from None


async def flow_names(rl: RunledgerClient, flow_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, str]:
    """The names of these flows (a deleted flow is left out), a page at a time."""
    wanted = list(dict.fromkeys(flow_ids))
    names: dict[uuid.UUID, str] = {}
    for at in range(0, len(wanted), DEFAULT_LIMIT):
        chunk = wanted[at:at + DEFAULT_LIMIT]
        names.update((f.id, f.name) for f in await rl.list_flows(ids=chunk, limit=len(chunk)))
    return names


def state_words(type_: str | None, name: str | None) -> str:
    """`TYPE`, or `TYPE (Name)` when the name says more (`SCHEDULED (Late)`)."""
    if type_ is None:
        return "-"
    default = type_.replace("_", " ").title().replace(" ", "")
    return f"{type_} ({name})" if name and name != default else type_


def state_label(run: FlowRun) -> str:
    return state_words(run.state_type, run.state_name)


def when(value: datetime | None) -> str:
    return "-" if value is None else value.isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# Output


def schedule_text(schedule: dict[str, Any]) -> str:
    """One schedule in a few words: `cron 0 2 * * * (Europe/Berlin)`, `every 3600s`, `rrule ...`."""
    zone = schedule.get("timezone")
    if "cron" in schedule:
        text = f"cron {schedule['cron']}"
    elif "interval" in schedule:
        text = f"every {schedule['interval']:g}s" if isinstance(schedule["interval"], int | float) \
            else f"every {schedule['interval']}"
        zone = zone if zone not in (None, "UTC") else None
    elif "rrule" in schedule:
        text = f"rrule {schedule['rrule']}"
        zone = zone if zone not in (None, "UTC") else None
    else:
        text = json.dumps(schedule)
    return f"{text} ({zone})" if zone else text


def _schedules_cell(deployment: Deployment) -> str:
    if not deployment.schedules:
        return "-"
    return "; ".join(schedule_text(s.schedule) + ("" if s.active else " [inactive]") for s in deployment.schedules)


def show_deployments(deployments: Iterable[Deployment], flows: dict[uuid.UUID, str]) -> None:
    rows = [(visible(f"{flows.get(d.flow_id, d.flow_id)}/{d.name}"), visible(d.work_pool_name or "-"),
             visible(d.work_queue_name or "-"), visible(_schedules_cell(d)), "yes" if d.paused else "no", str(d.id))
            for d in deployments]
    show_rows("Deployments", DEPLOYMENT_COLUMNS, rows, "No deployments found.")


def show_runs(runs: Iterable[FlowRun], title: str, empty: str) -> None:
    rows = [(visible(r.name), visible(state_label(r)), when(r.expected_start_time), str(r.id)) for r in runs]
    show_rows(title, RUN_COLUMNS, rows, empty)


def _title(label: str) -> str:
    return f"Deployment {label!r}"


def _check(name: str) -> str:
    return command_line("runledger", "deployment", "inspect", name)


# ---------------------------------------------------------------------------------------------
# Verbs


def _one_schedule(cron: str | None, interval: float | None, rrule: str | None,
                  timezone: str | None) -> list[dict[str, Any]] | None:
    given = [(k, v) for k, v in (("cron", cron), ("interval", interval), ("rrule", rrule)) if v is not None]
    if len(given) > 1:
        raise typer.BadParameter("give one of --cron, --interval, --rrule", param_hint="--" + given[1][0])
    if not given:
        if timezone is not None:
            raise typer.BadParameter("--timezone needs --cron, --interval or --rrule", param_hint="--timezone")
        return None
    schedule: dict[str, Any] = dict(given)
    if timezone is not None:
        schedule["timezone"] = timezone
    return [{"schedule": schedule}]


@deployment_app.command()
def create(
    flow: str = typer.Option(..., "--flow", "-f", help="The flow's name (made when it does not exist)."),
    name: str = typer.Option(..., "--name", "-n", help="The deployment's name, unique within its flow."),
    pool: str | None = typer.Option(None, "--pool", "-p", help="The work pool its runs go to."),
    queue: str | None = typer.Option(None, "--queue", "-q",
                                     help="A queue of the pool (made when missing; default: the pool's default)."),
    cron: str | None = typer.Option(None, "--cron", help="A schedule: a cron expression."),
    interval: float | None = typer.Option(None, "--interval", min=0, help="A schedule: every this many seconds."),
    rrule: str | None = typer.Option(None, "--rrule", help="A schedule: an RFC 5545 recurrence rule."),
    timezone: str | None = typer.Option(None, "--timezone", help="The schedule's time zone (e.g. Europe/Berlin)."),
    params: list[str] | None = typer.Option(None, "--param", help=PARAM_HELP),
    tags: list[str] | None = typer.Option(None, "--tag", "-t", help="A tag (repeat for more)."),
    limit: int | None = typer.Option(None, "--limit", "-l", help="Most runs of the deployment at once (> 0)."),
    description: str | None = typer.Option(None, "--description", "-d", help="What the deployment is for."),
    paused: bool = typer.Option(False, "--paused", help="Create the deployment paused."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Create a deployment of a flow; if it exists, update it with the options given.

    The flow is made when it does not exist. An update replaces the deployment's schedules with
    the one given, or none."""
    schedules = _one_schedule(cron, interval, rrule, timezone)
    parameters = parse_params(params)
    label = f"{flow}/{name}"

    before: list[int] = []  # the schedules the deployment had, when it existed

    async def action(rl: RunledgerClient, key: str) -> tuple[Deployment, bool]:
        with contextlib.suppress(NotFound, Invalid):  # none yet (or a name the read cannot take): nothing to compare
            before[:] = [len((await rl.read_deployment_by_name(label)).schedules)]
        # Their own keys, derived from the run's: re-running with the same key is still safe.
        made_flow = await rl.create_flow(flow, idempotency_key=f"{key}:flow")
        return await rl.create_deployment(
            made_flow.id, name, work_pool_name=UNSET if pool is None else pool,
            work_queue_name=UNSET if queue is None else queue, schedules=UNSET if schedules is None else schedules,
            parameters=UNSET if parameters is None else parameters, tags=UNSET if tags is None else tags,
            concurrency_limit=UNSET if limit is None else limit,
            description=UNSET if description is None else description, paused=True if paused else UNSET,
            idempotency_key=key)

    deployment, created = run_command(action, idempotency_key, _check(label))
    emit(deployment, wants_json(as_json, output),
         f"Created deployment {label!r}." if created else f"Updated deployment {label!r}.", _title(label))
    had = before[0] if before else 0
    if not created and had > len(deployment.schedules) and not wants_json(as_json, output):
        # Easy to miss when only another option was meant to change.
        err_console.print(Text(f"note: the update replaced the deployment's {had} schedule{'' if had == 1 else 's'} "
                               f"with {len(deployment.schedules) or 'none'} (an update takes the schedules given, as "
                               "Prefect's does); the future runs they had scheduled were deleted"))


async def _deployments(rl: RunledgerClient, flows: list[str] | None, pools: list[str] | None,
                       tags: list[str] | None, limit: int | None) -> list[Deployment]:
    """Every matching deployment (at most `limit`), page by page."""
    await rl.catch_up()
    deployments: list[Deployment] = []
    while limit is None or len(deployments) < limit:
        want = DEFAULT_LIMIT if limit is None else min(DEFAULT_LIMIT, limit - len(deployments))
        page = await rl.list_deployments(flow_names=flows, work_pool_names=pools, tags=tags, limit=want,
                                         offset=len(deployments))
        deployments.extend(page)
        if len(page) < want:
            break
    return deployments


@deployment_app.command("ls")
def list_deployments(
    flows: list[str] | None = typer.Option(None, "--flow", "-f", help="Only this flow's (repeat for more)."),
    pools: list[str] | None = typer.Option(None, "--pool", "-p", help="Only this pool's (repeat for more)."),
    tags: list[str] | None = typer.Option(None, "--tag", "-t", help="Only with this tag (repeat: all of them)."),
    limit: int | None = typer.Option(None, "--limit", "-l", min=0, help="Most deployments to list (default: all)."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """List deployments, by name."""

    async def action(rl: RunledgerClient) -> tuple[list[Deployment], dict[uuid.UUID, str]]:
        found = await _deployments(rl, flows or None, pools or None, tags or None, limit)
        return found, ({} if wants_json(as_json, output) else await flow_names(rl, (d.flow_id for d in found)))

    deployments, names = run(action)
    if wants_json(as_json, output):
        print_json(deployments)
    else:
        show_deployments(deployments, names)


@deployment_app.command()
def inspect(
    name: str = typer.Argument(..., metavar="NAME", help=NAME_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
) -> None:
    """Show one deployment."""
    check_deployment_name(name)
    deployment = run(lambda rl: resolve_deployment(rl, name))
    if wants_json(as_json, output):
        print_json(deployment)
    else:
        show_details(deployment, _title(name))


@deployment_app.command("run")
def run_deployment(
    name: str = typer.Argument(..., metavar="NAME", help=NAME_HELP),
    params: list[str] | None = typer.Option(None, "--param", help=PARAM_HELP + " Over the deployment's."),
    queue: str | None = typer.Option(None, "--queue", "-q",
                                     help="A queue of the deployment's pool (made when missing)."),
    tags: list[str] | None = typer.Option(None, "--tag", "-t", help="A tag, beside the deployment's (repeat)."),
    run_name: str | None = typer.Option(None, "--name", "--flow-run-name",
                                        help="The run's name (default: a generated one)."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Create a flow run of a deployment, scheduled now; prints its id and state."""
    check_deployment_name(name)
    parameters = parse_params(params)

    async def action(rl: RunledgerClient, key: str) -> FlowRun:
        deployment = await resolve_deployment(rl, name)
        return await rl.create_flow_run_from_deployment(
            deployment.id, parameters=UNSET if parameters is None else parameters,
            work_queue_name=UNSET if queue is None else queue, tags=UNSET if tags is None else tags,
            name=UNSET if run_name is None else run_name, request_idempotency_key=key)

    made = run_command(action, idempotency_key, command_line("runledger", "flow-run", "ls", "--deployment", name))
    if wants_json(as_json, output):
        print_json(made)
        return
    success(f"Created flow run {made.name!r} of deployment {name!r}.")
    say(f"ID: {made.id}")
    say(f"State: {state_label(made)}")


def _paused(name: str, paused: bool, key: str | None, as_json: bool, output: Any) -> None:
    async def action(rl: RunledgerClient, k: str) -> Deployment:
        deployment = await resolve_deployment(rl, name)
        if paused:
            await rl.pause_deployment(deployment.id, idempotency_key=k)
        else:
            await rl.resume_deployment(deployment.id, idempotency_key=k)
        return await rl.read_deployment(deployment.id)  # waits for the write just made

    check_deployment_name(name)
    deployment = run_command(action, key, _check(name))
    emit(deployment, wants_json(as_json, output),
         f"{'Paused' if paused else 'Resumed'} deployment {name!r}.", _title(name))


@deployment_app.command()
def pause(
    name: str = typer.Argument(..., metavar="NAME", help=NAME_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Pause a deployment: the scheduler makes no new runs of its schedules until it is resumed
    (`deployment schedule` and `deployment run` still make runs when asked, as in Prefect)."""
    _paused(name, True, idempotency_key, as_json, output)


@deployment_app.command()
def resume(
    name: str = typer.Argument(..., metavar="NAME", help=NAME_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Resume a paused deployment."""
    _paused(name, False, idempotency_key, as_json, output)


def parse_time(text: str, option: str) -> datetime:
    """An ISO 8601 time given to `option`; else a usage error."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not an ISO 8601 time (e.g. 2025-01-31T09:00:00+01:00; "
                                 "without an offset: UTC)", param_hint=option) from None


@deployment_app.command()
def schedule(
    name: str = typer.Argument(..., metavar="NAME", help=NAME_HELP),
    start: str | None = typer.Option(None, "--start", help="From this time (ISO 8601; default: now). "
                                                           "In the past: a backfill."),
    end: str | None = typer.Option(None, "--end", help="Up to this time (ISO 8601; default: 100 days after the start)."),
    min_runs: int | None = typer.Option(None, "--min-runs", min=0, help="At least this many runs per schedule "
                                                                         "(default 3)."),
    max_runs: int | None = typer.Option(None, "--max-runs", min=0, help="At most this many runs per schedule "
                                                                         "(default 100)."),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Make the scheduled runs of a deployment's active schedules.

    A time whose run exists is skipped, so scheduling again makes no duplicates. A paused
    deployment is scheduled all the same (as in Prefect): a note says so."""
    check_deployment_name(name)
    start_time = UNSET if start is None else parse_time(start, "--start")
    end_time = UNSET if end is None else parse_time(end, "--end")

    paused = [False]

    async def action(rl: RunledgerClient, key: str) -> tuple[list[uuid.UUID], list[FlowRun]]:
        deployment = await resolve_deployment(rl, name)
        paused[0] = bool(deployment.paused)
        ids = await rl.schedule_deployment_runs(
            deployment.id, start_time=start_time, end_time=end_time, min_runs=UNSET if min_runs is None else min_runs,
            max_runs=UNSET if max_runs is None else max_runs, idempotency_key=key)
        if wants_json(as_json, output):
            return ids, []
        runs: list[FlowRun] = []
        for at in range(0, len(ids), DEFAULT_LIMIT):
            chunk = ids[at:at + DEFAULT_LIMIT]
            runs += await rl.list_flow_runs(ids=chunk, limit=len(chunk), sort="EXPECTED_START_TIME_ASC")
        return ids, runs

    ids, runs = run_command(action, idempotency_key,
                            command_line("runledger", "flow-run", "ls", "--deployment", name))
    if wants_json(as_json, output):
        print_json({"flow_run_ids": [str(i) for i in ids]})
        return
    success(f"Scheduled {len(ids)} run{'' if len(ids) == 1 else 's'} of deployment {name!r}.")
    if paused[0] and ids:
        err_console.print(Text(f"note: deployment {name!r} is paused; its scheduler makes no runs, but these were "
                               "asked for and workers will get them (`runledger deployment resume` or cancel them)"))
    if runs:
        show_runs(runs, "Scheduled Runs", "")  # earliest first, as the service made them


@deployment_app.command()
def delete(
    name: str = typer.Argument(..., metavar="NAME", help=NAME_HELP),
    as_json: JsonFlag = False,
    output: OutputOption = None,
    idempotency_key: KeyOption = None,
) -> None:
    """Delete a deployment; its name is free again at once."""
    check_deployment_name(name)

    async def action(rl: RunledgerClient, key: str) -> None:
        deployment = await resolve_deployment(rl, name)
        await rl.delete_deployment(deployment.id, idempotency_key=key)

    run_command(action, idempotency_key, _check(name))
    emit_done(wants_json(as_json, output), f"Deleted deployment {name!r}.")
